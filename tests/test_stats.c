/*
 * A loop you can see into (issue 13): zev_loop_stats's counters, its timing
 * figures (longest callback, lag percentiles) and the slow-callback hook,
 * which reports every kind of callback by name. Every test runs on the
 * backend under test.
 */
#include "common.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

TestSuite(stats, .timeout = 30);

static zev_loop_stats_t stats_of(zev_loop_t *loop)
{
    zev_loop_stats_t st;
    cr_assert_eq(zev_loop_stats(loop, &st), 0);
    return st;
}

/* Holds the loop for ms without sleeping (a slow callback). */
static void busy_ms(int ms)
{
    uint64_t until = test_clock_ns() + (uint64_t)ms * 1000000u;
    while (test_clock_ns() < until)
        ;
}

static void count_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    (*(int *)arg)++;
}

static void count_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    (*(int *)arg)++;
}

static void yielder(void *arg)
{
    for (int i = 0; i < 3; i++)
        zev_fiber_yield();
    (*(int *)arg)++;
}

static void ignore_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (*(int *)arg)++;
}

Test(stats, counters_count_what_the_loop_did)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_loop_t *loop = p.loop;
    zev_loop_stats_t st = stats_of(loop);
    cr_assert_eq(st.iterations, 0);
    cr_assert_eq(st.callbacks, 0);

    int ran = 0, fired = 0, fib = 0, msgs = 0;
    for (int i = 0; i < 5; i++)
        cr_assert_eq(zev_loop_add_callback(loop, count_cb, &ran), 0);
    zev_post_t post;
    cr_assert_eq(zev_loop_post(loop, &post, count_cb, &ran), 0);
    cr_assert_not_null(zev_timer_start(loop, 0, 0, count_timer, &fired));
    cr_assert_not_null(zev_timer_start(loop, 0, 0, count_timer, &fired));
    cr_assert_not_null(zev_fiber_spawn(loop, yielder, &fib, NULL));
    zev_stream_t *s = test_stream_new(loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, ignore_msg, &msgs), 0);
    cr_assert_eq(zmq_send(p.b, "x", 1, 0), 1);
    test_run_until(loop, &fib, 5000);
    test_run_until(loop, &msgs, 5000);

    st = stats_of(loop);
    cr_assert_eq(st.callbacks, 6, "callbacks %llu", (unsigned long long)st.callbacks);
    cr_assert_eq(st.callbacks_peak, 6, "all six were queued before the first drain");
    cr_assert_eq(st.timers_fired, 2);
    cr_assert_eq(st.fibers_resumed, 4, "a fiber that yields 3 times resumes 4 times");
    cr_assert_geq(st.stream_passes, 1);
    cr_assert_geq(st.ready_peak, 1);
    cr_assert_geq(st.iterations, 4);
    cr_assert_geq(st.wakeups, 1, "the message's edge woke the wait");
    /* timing is off: no timing figures */
    cr_assert_eq(st.longest_ns, 0);
    cr_assert_eq(st.lag_samples, 0);

    uint64_t it = st.iterations;
    for (int i = 0; i < 7; i++)
        zev_loop_run_once(loop, 0);
    cr_assert_eq(stats_of(loop).iterations, it + 7, "one per run_once");

    cr_assert_eq(zev_loop_stats_reset(loop), 0);
    st = stats_of(loop);
    cr_assert_eq(st.iterations + st.callbacks + st.timers_fired + st.fibers_resumed +
                     st.stream_passes + st.ready_peak + st.callbacks_peak + st.wakeups,
                 0, "reset left counts");
    test_pair_close(&p);
}

Test(stats, bad_arguments)
{
    zev_loop_stats_t st;
    errno = 0;
    cr_assert_eq(zev_loop_stats(NULL, &st), -1);
    cr_assert_eq(errno, EINVAL);
    zev_loop_t *loop = test_loop_new();
    errno = 0;
    cr_assert_eq(zev_loop_stats(loop, NULL), -1);
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_loop_stats_reset(NULL), -1);
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_loop_set_timing(NULL, 1), -1);
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_loop_on_slow(NULL, 1, NULL, NULL), -1);
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_loop_set_timing(loop, 1), 0);
    cr_assert_eq(zev_loop_stats(loop, &st), 0);
    cr_assert_eq(errno, 0, "success touched errno");
    cr_assert_eq(zev_loop_destroy(loop), 0);
}

/* ------------------------------------------------------------- the hook */

typedef struct seen {
    int n;
    int kind[16];
    const void *what[16];
    zev_cb_fn fn[16];
    uint64_t ns[16];
} seen_t;

static void on_slow(zev_loop_t *loop, const zev_slow_t *slow, void *arg)
{
    (void)loop;
    seen_t *s = arg;
    if (s->n < 16) {
        s->kind[s->n] = slow->kind;
        s->what[s->n] = slow->what;
        s->fn[s->n] = slow->fn;
        s->ns[s->n] = slow->duration_ns;
    }
    s->n++;
}

/* The one report of the given kind; fails unless there is exactly one. */
static int only_of_kind(const seen_t *s, int kind)
{
    int at = -1, count = 0;
    for (int i = 0; i < s->n && i < 16; i++)
        if (s->kind[i] == kind) {
            at = i;
            count++;
        }
    cr_assert_eq(count, 1, "%d reports of kind %d", count, kind);
    return at;
}

typedef struct slowpoke {
    int ms;
    int done;
    zev_timer_t *timer;
} slowpoke_t;

static void slow_timer(zev_timer_t *t, void *arg)
{
    slowpoke_t *sp = arg;
    sp->timer = t;
    busy_ms(sp->ms);
    sp->done++;
}

static void slow_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    slowpoke_t *sp = arg;
    busy_ms(sp->ms);
    sp->done++;
}

/* Slow for the first message only (the test's second stream sends it
 * another). */
static void slow_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    slowpoke_t *sp = arg;
    if (!sp->done)
        busy_ms(sp->ms);
    sp->done++;
}

static void slow_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    (void)status;
    slowpoke_t *sp = arg;
    busy_ms(sp->ms);
    sp->done++;
}

static void slow_close(zev_stream_t *s, void *arg)
{
    (void)s;
    slowpoke_t *sp = arg;
    busy_ms(sp->ms);
    sp->done++;
}

static void slow_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)events;
    slowpoke_t *sp = arg;
    char c;
    (void)!read(fd, &c, 1);
    busy_ms(sp->ms);
    sp->done++;
    zev_io_stop(io);
}

static void slow_fiber(void *arg)
{
    slowpoke_t *sp = arg;
    busy_ms(sp->ms);
    sp->done++;
}

static void fast_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    (*(int *)arg)++;
}

Test(stats, the_slow_hook_names_every_kind_of_callback)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_loop_t *loop = p.loop;
    seen_t seen = {0};
    cr_assert_eq(zev_loop_on_slow(loop, 3000, on_slow, &seen), 0);
    enum { SLOW = 6 };
    slowpoke_t t = {.ms = SLOW}, cb = {.ms = SLOW}, rx = {.ms = SLOW}, tx = {.ms = SLOW},
               cl = {.ms = SLOW}, io = {.ms = SLOW}, fb = {.ms = SLOW};
    int fast = 0;
    for (int i = 0; i < 20; i++)
        cr_assert_eq(zev_loop_add_callback(loop, fast_cb, &fast), 0); /* not reported */
    cr_assert_not_null(zev_timer_start(loop, 0, 0, slow_timer, &t));
    cr_assert_eq(zev_loop_add_callback(loop, slow_cb, &cb), 0);
    zev_stream_t *in = test_stream_new(loop, p.a);
    cr_assert_eq(zev_stream_on_recv(in, slow_recv, &rx), 0);
    cr_assert_eq(zmq_send(p.b, "x", 1, 0), 1);
    zev_stream_t *out = test_stream_new(loop, p.b);
    cr_assert_eq(zev_stream_on_send(out, slow_send, &tx), 0);
    cr_assert_eq(zev_stream_on_close(out, slow_close, &cl), 0);
    cr_assert_eq(zev_stream_send(out, "y", 1, 0), 0);
    int pfd[2];
    test_pipe(pfd);
    zev_io_t *w = zev_io_start(loop, pfd[0], ZEV_READ, slow_io, &io);
    cr_assert_not_null(w);
    cr_assert_eq(write(pfd[1], "z", 1), 1);
    zev_fiber_t *f = zev_fiber_spawn(loop, slow_fiber, &fb, NULL);
    cr_assert_not_null(f);
    test_run_until(loop, &t.done, 5000);
    test_run_until(loop, &rx.done, 5000);
    test_run_until(loop, &tx.done, 5000);
    test_run_until(loop, &io.done, 5000);
    test_run_until(loop, &fb.done, 5000);
    cr_assert_eq(zev_stream_close(out, 0), 0);
    test_run_until(loop, &cl.done, 5000);
    cr_assert_eq(fast, 20);

    int i;
    i = only_of_kind(&seen, ZEV_SLOW_TIMER);
    cr_assert_eq(seen.what[i], t.timer, "the timer's handle");
    i = only_of_kind(&seen, ZEV_SLOW_CALLBACK);
    cr_assert_eq(seen.what[i], &cb, "the callback's arg");
    cr_assert(seen.fn[i] == slow_cb, "the callback's fn");
    i = only_of_kind(&seen, ZEV_SLOW_RECV);
    cr_assert_eq(seen.what[i], in);
    i = only_of_kind(&seen, ZEV_SLOW_SEND);
    cr_assert_eq(seen.what[i], out);
    i = only_of_kind(&seen, ZEV_SLOW_CLOSE);
    cr_assert_eq(seen.what[i], out);
    i = only_of_kind(&seen, ZEV_SLOW_IO);
    cr_assert_eq(seen.what[i], w);
    i = only_of_kind(&seen, ZEV_SLOW_FIBER);
    cr_assert_eq(seen.what[i], f);
    cr_assert_eq(seen.n, 7, "%d reports: a fast callback was reported", seen.n);
    for (int k = 0; k < seen.n; k++)
        cr_assert_geq(seen.ns[k], (uint64_t)SLOW * 1000000u, "report %d: %llu ns", k,
                      (unsigned long long)seen.ns[k]);

    zev_loop_stats_t st = stats_of(loop);
    cr_assert_geq(st.longest_ns, (uint64_t)SLOW * 1000000u, "timing is on with a hook");

    /* removed: no more reports, and timing is off again */
    cr_assert_eq(zev_loop_on_slow(loop, 0, NULL, NULL), 0);
    cr_assert_eq(zev_loop_stats_reset(loop), 0);
    slowpoke_t again = {.ms = SLOW};
    cr_assert_eq(zev_loop_add_callback(loop, slow_cb, &again), 0);
    test_run_until(loop, &again.done, 5000);
    cr_assert_eq(seen.n, 7);
    cr_assert_eq(stats_of(loop).longest_ns, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    p.loop = NULL;
    close(pfd[0]);
    close(pfd[1]);
    test_pair_close(&p);
}

/* ------------------------------------------------------------ lag */

typedef struct lagged {
    zev_loop_t *loop;
    slowpoke_t hold;
    int got;
} lagged_t;

/* The io callback (phase 5) queues a slow callback: it runs in phase 2 of
 * the next iteration, before the stream whose edge came in the same wait. */
static void queue_slow(zev_io_t *io, int fd, int events, void *arg)
{
    (void)events;
    lagged_t *l = arg;
    char c;
    (void)!read(fd, &c, 1);
    cr_assert_eq(zev_loop_add_callback(l->loop, slow_cb, &l->hold), 0);
    zev_io_stop(io);
}

static void got_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    ((lagged_t *)arg)->got++;
}

Test(stats, lag_counts_from_readiness_to_the_stream_pass)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    lagged_t l = {.loop = p.loop, .hold = {.ms = 8}};
    cr_assert_eq(zev_loop_set_timing(p.loop, 1), 0);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, got_msg, &l), 0);
    int pfd[2];
    test_pipe(pfd);
    cr_assert_not_null(zev_io_start(p.loop, pfd[0], ZEV_READ, queue_slow, &l));
    test_spin(p.loop, 3, 0); /* the stream's first pass is done: it waits for an edge */
    cr_assert_eq(zev_loop_stats_reset(p.loop), 0);
    cr_assert_eq(zmq_send(p.b, "m", 1, 0), 1);
    cr_assert_eq(write(pfd[1], "x", 1), 1);
    test_run_until(p.loop, &l.got, 5000);
    zev_loop_stats_t st = stats_of(p.loop);
    cr_assert_geq(st.lag_samples, 1);
    cr_assert_geq(st.lag_max_ns, 8000000u, "lag_max %llu ns behind an 8 ms callback",
                  (unsigned long long)st.lag_max_ns);
    cr_assert_leq(st.lag_p50_ns, st.lag_p99_ns);
    cr_assert_leq(st.lag_p99_ns, st.lag_max_ns);
    cr_assert_geq(st.longest_ns, 8000000u);
    cr_assert_eq(st.longest_kind, ZEV_SLOW_CALLBACK);
    close(pfd[0]);
    close(pfd[1]);
    test_pair_close(&p);
}

/* A timer's lag counts from its deadline: a timer due behind a slow one. */
Test(stats, timer_lag_counts_from_the_deadline)
{
    zev_loop_t *loop = test_loop_new();
    cr_assert_eq(zev_loop_set_timing(loop, 1), 0);
    slowpoke_t first = {.ms = 5};
    int second = 0;
    cr_assert_not_null(zev_timer_start(loop, 1000, 0, slow_timer, &first));
    cr_assert_not_null(zev_timer_start(loop, 1000, 0, count_timer, &second));
    test_run_until(loop, &second, 5000);
    zev_loop_stats_t st = stats_of(loop);
    cr_assert_eq(st.lag_samples, 2);
    cr_assert_geq(st.lag_max_ns, 5000000u, "the second timer waited for the first");
    cr_assert_eq(st.longest_kind, ZEV_SLOW_TIMER);
    cr_assert_eq(zev_loop_destroy(loop), 0);
}
