/*
 * zev inside real host loops: libuv and libev drive a zev loop through
 * zev_loop_fd, zev_loop_timeout and zev_loop_run_once(loop, 0), as
 * examples/embed_libuv.c and embed_libev.c do (test_embed.c checks the same
 * contract against a bare poll()). For each host that was found, on the
 * backend under test:
 *   - messages flow both ways between a zev stream and a peer thread, sent
 *     from host callbacks and from zev callbacks, in order;
 *   - zev timers run on time (never early, within a loose bound) while the
 *     host owns the thread, taking turns with a host timer, including a zev
 *     timer started by host code;
 *   - an idle host loop with zev inside wakes a handful of times in 200 ms,
 *     not thousands, with and without a zev timer pending;
 *   - streams closed by host code and from a zev callback run their close
 *     callbacks from host-driven iterations; the host then lets go of zev's
 *     fd, the loop is destroyed, the context terminates, nothing leaks.
 *
 * The host glue is one small table per host (host_ops_t) so that every
 * test body is written once.
 */
#include "common.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#ifdef ZEV_HAVE_LIBUV
#include <uv.h>
#endif
#ifdef ZEV_HAVE_LIBEV
#include <ev.h>
#endif

#define LATE_MAX_NS (50 * 1000000u) /* loose: the machine is shared */

/* ---------------------------------------------------------------- the host */

typedef struct host host_t;
typedef struct htimer htimer_t;
typedef void (*htimer_fn)(htimer_t *t, void *arg);

/* A one-shot host timer (uv_timer_t / ev_timer). */
struct htimer {
    host_t *host;
    htimer_fn fn;
    void *arg;
#ifdef ZEV_HAVE_LIBUV
    uv_timer_t uv;
#endif
#ifdef ZEV_HAVE_LIBEV
    ev_timer ev;
#endif
};

typedef struct host_ops {
    void (*init)(host_t *h); /* the host loop, a watcher on h->fd, a prepare */
    void (*run)(host_t *h);  /* until host_stop */
    void (*stop)(host_t *h);
    void (*timer_init)(htimer_t *t);
    void (*timer_start)(htimer_t *t, uint64_t delay_ns);
    void (*timer_stop)(htimer_t *t);
    void (*fini)(host_t *h); /* stops/closes every watcher, frees the host loop */
} host_ops_t;

#define HOST_MAX_TIMERS 8

struct host {
    const host_ops_t *ops;
    zev_loop_t *zev;
    int fd;
    size_t iterations; /* host loop iterations (its prepare phase) */
    size_t zev_runs;   /* zev_loop_run_once calls */
    htimer_t zev_timeout, watchdog;
    htimer_t *timers[HOST_MAX_TIMERS];
    int ntimers;
    int watchdog_fired;
#ifdef ZEV_HAVE_LIBUV
    struct {
        uv_loop_t loop;
        uv_poll_t io;
        uv_prepare_t prepare;
    } uv;
#endif
#ifdef ZEV_HAVE_LIBEV
    struct {
        struct ev_loop *loop;
        ev_io io;
        ev_prepare prepare;
    } ev;
#endif
};

/* What every host does: run zev when its fd is readable or its timeout
 * passed, and before blocking arm the timeout with zev_loop_timeout. */
static void host_zev_run(host_t *h)
{
    h->zev_runs++;
    cr_assert_geq(zev_loop_run_once(h->zev, 0), 0, "run_once: %s", zmq_strerror(errno));
}

static void host_before_block(host_t *h)
{
    h->iterations++;
    h->ops->timer_stop(&h->zev_timeout);
    int ms = zev_loop_timeout(h->zev);
    if (ms >= 0)
        h->ops->timer_start(&h->zev_timeout, (uint64_t)ms * 1000000u);
}

static void htimer_init(host_t *h, htimer_t *t, htimer_fn fn, void *arg)
{
    cr_assert_lt(h->ntimers, HOST_MAX_TIMERS);
    *t = (htimer_t){.host = h, .fn = fn, .arg = arg};
    h->ops->timer_init(t);
    h->timers[h->ntimers++] = t;
}

static void htimer_start(htimer_t *t, uint64_t delay_ns)
{
    t->host->ops->timer_stop(t);
    t->host->ops->timer_start(t, delay_ns);
}

static void host_stop(host_t *h)
{
    h->ops->stop(h);
}

static void on_zev_timeout(htimer_t *t, void *arg)
{
    (void)t;
    host_zev_run(arg);
}

static void on_watchdog(htimer_t *t, void *arg)
{
    (void)t;
    host_t *h = arg;
    h->watchdog_fired = 1;
    host_stop(h);
}

static void host_init(host_t *h, const host_ops_t *ops, zev_loop_t *zev)
{
    *h = (host_t){.ops = ops, .zev = zev};
    h->fd = zev_loop_fd(zev);
    cr_assert_geq(h->fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    ops->init(h);
    htimer_init(h, &h->zev_timeout, on_zev_timeout, h);
    htimer_init(h, &h->watchdog, on_watchdog, h);
}

/* Runs the host loop until a callback calls host_stop; fails the test if
 * the watchdog has to (a watchdog, not a measurement). */
static void host_run(host_t *h, int timeout_ms, const char *what)
{
    htimer_start(&h->watchdog, (uint64_t)timeout_ms * 1000000u);
    h->ops->run(h);
    h->ops->timer_stop(&h->watchdog);
    cr_assert_not(h->watchdog_fired, "%s: not done after %d ms", what, timeout_ms);
}

static void host_fini(host_t *h)
{
    h->ops->fini(h);
}

/* ----------------------------------------------------------------- libuv */

#ifdef ZEV_HAVE_LIBUV
static void uvh_on_io(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    host_zev_run(p->data);
}

static void uvh_on_prepare(uv_prepare_t *p)
{
    host_before_block(p->data);
}

static void uvh_on_timer(uv_timer_t *w)
{
    htimer_t *t = w->data;
    t->fn(t, t->arg);
}

static void uvh_init(host_t *h)
{
    cr_assert_eq(uv_loop_init(&h->uv.loop), 0);
    cr_assert_eq(uv_poll_init(&h->uv.loop, &h->uv.io, h->fd), 0);
    cr_assert_eq(uv_prepare_init(&h->uv.loop, &h->uv.prepare), 0);
    h->uv.io.data = h->uv.prepare.data = h;
    cr_assert_eq(uv_poll_start(&h->uv.io, UV_READABLE, uvh_on_io), 0);
    cr_assert_eq(uv_prepare_start(&h->uv.prepare, uvh_on_prepare), 0);
}

static void uvh_run(host_t *h)
{
    uv_run(&h->uv.loop, UV_RUN_DEFAULT); /* returns after uv_stop */
}

static void uvh_stop(host_t *h)
{
    uv_stop(&h->uv.loop);
}

static void uvh_timer_init(htimer_t *t)
{
    cr_assert_eq(uv_timer_init(&t->host->uv.loop, &t->uv), 0);
    t->uv.data = t;
}

static void uvh_timer_start(htimer_t *t, uint64_t delay_ns)
{
    uv_update_time(&t->host->uv.loop);
    uv_timer_start(&t->uv, uvh_on_timer, (delay_ns + 999999u) / 1000000u, 0);
}

static void uvh_timer_stop(htimer_t *t)
{
    uv_timer_stop(&t->uv);
}

static void uvh_fini(host_t *h)
{
    for (int i = 0; i < h->ntimers; i++)
        uv_close((uv_handle_t *)&h->timers[i]->uv, NULL);
    uv_close((uv_handle_t *)&h->uv.io, NULL); /* lets go of zev's fd */
    uv_close((uv_handle_t *)&h->uv.prepare, NULL);
    uv_run(&h->uv.loop, UV_RUN_DEFAULT); /* runs the closes; nothing else is left */
    cr_assert_eq(uv_loop_close(&h->uv.loop), 0, "a libuv handle is still open");
}

static const host_ops_t uv_host = {uvh_init,        uvh_run,        uvh_stop, uvh_timer_init,
                                   uvh_timer_start, uvh_timer_stop, uvh_fini};
#endif

/* ----------------------------------------------------------------- libev */

#ifdef ZEV_HAVE_LIBEV
static void evh_on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    host_zev_run(w->data);
}

static void evh_on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop;
    (void)revents;
    host_before_block(w->data);
}

static void evh_on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    htimer_t *t = w->data;
    t->fn(t, t->arg);
}

static void evh_init(host_t *h)
{
    h->ev.loop = ev_loop_new(EVFLAG_AUTO);
    cr_assert_not_null(h->ev.loop);
    ev_io_init(&h->ev.io, evh_on_io, h->fd, EV_READ);
    ev_prepare_init(&h->ev.prepare, evh_on_prepare);
    h->ev.io.data = h->ev.prepare.data = h;
    ev_io_start(h->ev.loop, &h->ev.io);
    ev_prepare_start(h->ev.loop, &h->ev.prepare);
}

static void evh_run(host_t *h)
{
    ev_run(h->ev.loop, 0); /* returns after ev_break */
}

static void evh_stop(host_t *h)
{
    ev_break(h->ev.loop, EVBREAK_ONE);
}

static void evh_timer_init(htimer_t *t)
{
    ev_init(&t->ev, evh_on_timer);
    t->ev.data = t;
}

static void evh_timer_start(htimer_t *t, uint64_t delay_ns)
{
    ev_now_update(t->host->ev.loop);
    ev_timer_set(&t->ev, (double)delay_ns / 1e9, 0);
    ev_timer_start(t->host->ev.loop, &t->ev);
}

static void evh_timer_stop(htimer_t *t)
{
    ev_timer_stop(t->host->ev.loop, &t->ev);
}

static void evh_fini(host_t *h)
{
    for (int i = 0; i < h->ntimers; i++)
        ev_timer_stop(h->ev.loop, &h->timers[i]->ev);
    ev_io_stop(h->ev.loop, &h->ev.io); /* lets go of zev's fd */
    ev_prepare_stop(h->ev.loop, &h->ev.prepare);
    ev_loop_destroy(h->ev.loop);
}

static const host_ops_t ev_host = {evh_init,        evh_run,        evh_stop, evh_timer_init,
                                   evh_timer_start, evh_timer_stop, evh_fini};
#endif

/* ------------------------------------------------------------- the peer */

#define GREETING "hello from the peer"

/* A peer thread on plain blocking libzmq: greets, then echoes every
 * message as "echo:<message>" until the context is shut down. */
static void *peer_main(void *sock)
{
    zmq_send(sock, GREETING, strlen(GREETING), 0);
    for (;;) {
        char buf[64] = "echo:";
        int n = zmq_recv(sock, buf + 5, sizeof buf - 5, 0);
        if (n < 0)
            break; /* ETERM */
        if (zmq_send(sock, buf, 5 + (size_t)n, 0) < 0)
            break;
    }
    test_close(sock);
    return NULL;
}

/* A context, a zev loop on the backend under test inside a host loop, and
 * (with a transport) a PAIR socket joined to a peer thread's PAIR. */
typedef struct fixture {
    void *ctx;
    zev_loop_t *zev;
    host_t host;
    void *sock;
    pthread_t peer;
    bool has_peer;
} fixture_t;

static void fixture_open(fixture_t *f, const host_ops_t *ops, const char *transport)
{
    *f = (fixture_t){.ctx = test_ctx_new()};
    f->zev = test_loop_new();
    host_init(&f->host, ops, f->zev);
    if (transport) {
        void *peer = test_socket(f->ctx, ZMQ_PAIR);
        f->sock = test_socket(f->ctx, ZMQ_PAIR);
        test_bind_connect(peer, f->sock, transport);
        cr_assert_eq(pthread_create(&f->peer, NULL, peer_main, peer), 0);
        f->has_peer = true;
    }
}

/* Host first (it lets go of zev's fd), then zev, then libzmq. */
static void fixture_close(fixture_t *f)
{
    host_fini(&f->host);
    zev_loop_destroy(f->zev);
    if (f->sock)
        test_close(f->sock);
    if (f->has_peer) {
        zmq_ctx_shutdown(f->ctx); /* the peer's recv fails with ETERM */
        pthread_join(f->peer, NULL);
    }
    cr_assert_eq(zmq_ctx_term(f->ctx), 0, "zmq_ctx_term: %s", zmq_strerror(errno));
    test_expect_no_leaks();
}

/* ---------------------------------------------------- messages both ways */

#define BOTH_N 50

typedef struct both {
    fixture_t *f;
    zev_stream_t *s;
    htimer_t sender;
    int greeted, host_sent, host_echoes, zev_echoes, bad;
} both_t;

/* Host code: one message per millisecond from the host's timer callback. */
static void both_host_send(htimer_t *t, void *arg)
{
    both_t *b = arg;
    char msg[16];
    int n = snprintf(msg, sizeof msg, "h%d", b->host_sent);
    cr_assert_eq(zev_stream_send(b->s, msg, (size_t)n, 0), 0, "send: %s", zmq_strerror(errno));
    if (++b->host_sent < BOTH_N)
        htimer_start(t, 1000000u);
}

static bool is(zev_msg_t *m, const char *want)
{
    return zev_msg_size(m, 0) == strlen(want) &&
           memcmp(zev_msg_data(m, 0), want, strlen(want)) == 0;
}

/* zev code: each echo of a host message makes a send from zev's callback. */
static void both_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    both_t *b = arg;
    char want[32];
    if (!b->greeted) {
        b->greeted = is(m, GREETING);
        b->bad += !b->greeted;
        return;
    }
    if (zev_msg_size(m, 0) > 5 && ((const char *)zev_msg_data(m, 0))[5] == 'h') {
        snprintf(want, sizeof want, "echo:h%d", b->host_echoes);
        b->bad += !is(m, want);
        snprintf(want, sizeof want, "z%d", b->host_echoes++);
        cr_assert_eq(zev_stream_send(s, want, strlen(want), 0), 0);
    } else {
        snprintf(want, sizeof want, "echo:z%d", b->zev_echoes++);
        b->bad += !is(m, want);
    }
    if (b->host_echoes == BOTH_N && b->zev_echoes == BOTH_N)
        host_stop(&b->f->host);
}

static void messages_both_ways(const host_ops_t *ops, const char *transport)
{
    fixture_t f;
    fixture_open(&f, ops, transport);
    both_t b = {.f = &f, .s = test_stream_new(f.zev, f.sock)};
    cr_assert_eq(zev_stream_on_recv(b.s, both_recv, &b), 0);
    htimer_init(&f.host, &b.sender, both_host_send, &b);
    htimer_start(&b.sender, 1000000u);

    host_run(&f.host, 10000, "messages both ways");
    cr_expect(b.greeted, "the peer's first message never came");
    cr_expect_eq(b.host_sent, BOTH_N);
    cr_expect_eq(b.host_echoes, BOTH_N);
    cr_expect_eq(b.zev_echoes, BOTH_N);
    cr_expect_eq(b.bad, 0, "%d messages out of order or wrong", b.bad);
    cr_expect_geq(f.host.zev_runs, 1);
    fixture_close(&f);
}

/* ------------------------------------------------------ timers on time */

#define TIMER_RUNS 20
#define TIMER_PERIOD_NS (10 * 1000000u)

typedef struct tick {
    char who; /* 'z' zev periodic, 'o' zev one-shot started by host code, 'h' host */
    uint64_t due_ns, fired_ns;
} tick_t;

typedef struct timers {
    fixture_t *f;
    htimer_t host_timer;
    uint64_t host_due_ns, oneshot_due_ns;
    int zev_runs, host_runs, oneshot_runs;
    tick_t log[2 * TIMER_RUNS + 1];
    int nlog;
} timers_t;

static void timers_note(timers_t *t, char who, uint64_t due_ns)
{
    cr_assert_lt(t->nlog, 2 * TIMER_RUNS + 1, "more timer runs than started");
    t->log[t->nlog++] = (tick_t){who, due_ns, test_clock_ns()};
}

static void timers_maybe_done(timers_t *t)
{
    if (t->zev_runs == TIMER_RUNS && t->host_runs == TIMER_RUNS && t->oneshot_runs == 1)
        host_stop(&t->f->host);
}

static void zev_periodic(zev_timer_t *zt, void *arg)
{
    timers_t *t = arg;
    timers_note(t, 'z', zev_timer_due(zt));
    if (++t->zev_runs == TIMER_RUNS)
        zev_timer_cancel(zt);
    timers_maybe_done(t);
}

static void zev_oneshot(zev_timer_t *zt, void *arg)
{
    timers_t *t = arg;
    timers_note(t, 'o', zev_timer_due(zt));
    cr_expect_geq(zev_timer_due(zt), t->oneshot_due_ns, "the one-shot's deadline moved earlier");
    t->oneshot_runs++;
    timers_maybe_done(t);
}

/* The host timer keeps a fixed schedule, 5 ms out of phase with zev's. */
static void host_periodic(htimer_t *ht, void *arg)
{
    timers_t *t = arg;
    timers_note(t, 'h', t->host_due_ns);
    if (t->host_runs++ == TIMER_RUNS / 2) {
        /* Host code starts a zev timer: zev must wake for it by itself. */
        t->oneshot_due_ns = test_clock_ns() + 25 * 1000000u;
        cr_assert_not_null(zev_timer_start(t->f->zev, 25000, 0, zev_oneshot, t));
    }
    if (t->host_runs < TIMER_RUNS) {
        t->host_due_ns += TIMER_PERIOD_NS;
        uint64_t now = test_clock_ns();
        htimer_start(ht, t->host_due_ns > now ? t->host_due_ns - now : 0);
    }
    timers_maybe_done(t);
}

static void timers_interleave(const host_ops_t *ops)
{
    fixture_t f;
    fixture_open(&f, ops, NULL);
    timers_t t = {.f = &f};
    htimer_init(&f.host, &t.host_timer, host_periodic, &t);
    uint64_t start = test_clock_ns();
    t.host_due_ns = start + TIMER_PERIOD_NS / 2;
    htimer_start(&t.host_timer, TIMER_PERIOD_NS / 2);
    cr_assert_not_null(
        zev_timer_start(f.zev, TIMER_PERIOD_NS / 1000, TIMER_PERIOD_NS / 1000, zev_periodic, &t));

    host_run(&f.host, 10000, "timers");
    cr_assert_eq(t.nlog, 2 * TIMER_RUNS + 1);
    uint64_t zev_late_sum = 0;
    int inversions = 0;
    for (int i = 0; i < t.nlog; i++) {
        tick_t *e = &t.log[i];
        if (e->who != 'h') {
            /* zev's promise: never before the deadline. */
            cr_expect_geq(e->fired_ns, e->due_ns, "zev timer run %d came %llu ns early", i,
                          (unsigned long long)(e->due_ns - e->fired_ns));
            zev_late_sum += e->fired_ns - e->due_ns;
        }
        /* Neither loop starves the other: every timer runs soon after its
         * deadline (host timers may round to the millisecond either way). */
        cr_expect_lt((int64_t)(e->fired_ns - e->due_ns), (int64_t)LATE_MAX_NS,
                     "timer run %d ('%c') %lld us late", i, e->who,
                     (long long)(e->fired_ns - e->due_ns) / 1000);
        inversions += i > 0 && e->due_ns < t.log[i - 1].due_ns;
    }
    uint64_t zev_late_avg = zev_late_sum / (TIMER_RUNS + 1);
    cr_expect_lt(zev_late_avg, 5000000u, "zev timers %llu us late on average",
                 (unsigned long long)zev_late_avg / 1000);
    /* Out of deadline order only when both were overdue at once (a loaded
     * machine): logged, since the host runs its own phase first then. Not
     * with cr_log_warn: Criterion then exits 1 although every test passed. */
    if (inversions)
        fprintf(stderr, "[note] %d timer runs out of deadline order (both overdue)\n",
                inversions);
    fixture_close(&f);
}

/* --------------------------------------------------------- no busy spin */

typedef struct idle {
    fixture_t *f;
    htimer_t end;
    int greeted, ticks;
} idle_t;

static void idle_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    idle_t *i = arg;
    i->greeted = is(m, GREETING);
    host_stop(&i->f->host);
}

static void idle_end(htimer_t *t, void *arg)
{
    (void)t;
    host_stop(arg);
}

static void idle_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    ((idle_t *)arg)->ticks++;
}

/* A live stream (its peer is there and quiet), then 200 ms of nothing but
 * waiting: a host loop that spins on zev's fd or on a 0 ms timeout would
 * count thousands of iterations. With a zev timer every 50 ms, the loop
 * wakes for it and for little else. */
static void idle_no_spin(const host_ops_t *ops, bool with_timer)
{
    fixture_t f;
    fixture_open(&f, ops, "inproc");
    idle_t i = {.f = &f};
    zev_stream_t *s = test_stream_new(f.zev, f.sock);
    cr_assert_eq(zev_stream_on_recv(s, idle_recv, &i), 0);
    host_run(&f.host, 5000, "the peer's greeting");
    cr_assert(i.greeted);
    zev_timer_t *tick = NULL;
    if (with_timer)
        cr_assert_not_null(tick = zev_timer_start(f.zev, 50000, 50000, idle_tick, &i));

    htimer_init(&f.host, &i.end, idle_end, &f.host);
    htimer_start(&i.end, 200 * 1000000u);
    f.host.iterations = f.host.zev_runs = 0;
    struct timespec c0, c1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    host_run(&f.host, 5000, "200 ms idle");
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    double cpu_ms = (double)(c1.tv_sec - c0.tv_sec) * 1e3 + (double)(c1.tv_nsec - c0.tv_nsec) / 1e6;

    size_t wakes = with_timer ? 4 : 0; /* zev's timer's own wakeups */
    cr_log_info("%s idle 200 ms: %zu host iterations, %zu zev runs, %d ticks, %.3f ms CPU",
                with_timer ? "timer" : "plain", f.host.iterations, f.host.zev_runs, i.ticks,
                cpu_ms);
    cr_expect_leq(f.host.iterations, 10 + 3 * wakes, "%zu host iterations in 200 ms idle",
                  f.host.iterations);
    cr_expect_leq(f.host.zev_runs, 10 + 3 * wakes, "%zu zev iterations in 200 ms idle",
                  f.host.zev_runs);
    cr_expect_lt(cpu_ms, 50.0, "%.1f ms of CPU in 200 ms idle", cpu_ms);
    if (with_timer) {
        cr_expect_geq(i.ticks, 3, "the zev timer ran %d times in 200 ms", i.ticks);
        cr_expect_leq(i.ticks, 4);
        zev_timer_cancel(tick);
    }
    fixture_close(&f);
}

/* ------------------------------------------------------------- closing */

typedef struct closing {
    fixture_t *f;
    zev_stream_t *pair, *push;
    htimer_t host_close;
    int pair_closed, push_closed, pair_closed_in_run, push_closed_in_run;
} closing_t;

static void closing_done(closing_t *c)
{
    if (c->pair_closed && c->push_closed)
        host_stop(&c->f->host);
}

static void pair_on_close(zev_stream_t *s, void *arg)
{
    (void)s;
    closing_t *c = arg;
    c->pair_closed++;
    c->pair_closed_in_run = (int)c->f->host.zev_runs;
    closing_done(c);
}

static void push_on_close(zev_stream_t *s, void *arg)
{
    (void)s;
    closing_t *c = arg;
    c->push_closed++;
    c->push_closed_in_run = (int)c->f->host.zev_runs;
    closing_done(c);
}

/* Host code closes the PAIR stream; its close callback is zev's to run. */
static void close_from_host(htimer_t *t, void *arg)
{
    (void)t;
    closing_t *c = arg;
    cr_assert_eq(zev_stream_close(c->pair, 0), 0);
    cr_assert_eq(c->pair_closed, 0, "the close callback ran inside zev_stream_close");
}

/* A zev callback sends a last message and closes the PUSH stream with its
 * socket, flushing first. */
static void close_from_zev(zev_timer_t *t, void *arg)
{
    (void)t;
    closing_t *c = arg;
    cr_assert_eq(zev_stream_send(c->push, "last words", 10, 0), 0);
    cr_assert_eq(zev_stream_close(c->push, ZEV_CLOSE_FLUSH | ZEV_CLOSE_SOCKET), 0);
}

static void close_clean(const host_ops_t *ops)
{
    fixture_t f;
    fixture_open(&f, ops, "inproc");
    void *pull = test_socket(f.ctx, ZMQ_PULL);
    void *push = test_socket(f.ctx, ZMQ_PUSH);
    test_bind_connect(pull, push, "inproc");
    test_set_int(push, ZMQ_LINGER, 1000);

    closing_t c = {
        .f = &f, .pair = test_stream_new(f.zev, f.sock), .push = test_stream_new(f.zev, push)};
    cr_assert_eq(zev_stream_on_close(c.pair, pair_on_close, &c), 0);
    cr_assert_eq(zev_stream_on_close(c.push, push_on_close, &c), 0);
    htimer_init(&f.host, &c.host_close, close_from_host, &c);
    htimer_start(&c.host_close, 5 * 1000000u);
    cr_assert_not_null(zev_timer_start(f.zev, 10000, 0, close_from_zev, &c));

    host_run(&f.host, 10000, "closing");
    cr_expect_eq(c.pair_closed, 1);
    cr_expect_eq(c.push_closed, 1);
    cr_expect_gt(c.pair_closed_in_run, 0, "a close callback ran outside a host-driven iteration");
    cr_expect_gt(c.push_closed_in_run, 0, "a close callback ran outside a host-driven iteration");
    test_set_int(pull, ZMQ_RCVTIMEO, 5000);
    char buf[16];
    cr_expect_eq(zmq_recv(pull, buf, sizeof buf, 0), 10, "the flushed message: %s",
                 zmq_strerror(errno));
    cr_expect_eq(memcmp(buf, "last words", 10), 0);

    test_close(pull); /* push was closed by zev (ZEV_CLOSE_SOCKET) */
    fixture_close(&f);
}

/* ----------------------------------------------------------- the tests */

#define HOST_TESTS(suite, ops)                                                                     \
    TestSuite(suite, .timeout = 60);                                                               \
    Test(suite, messages_both_ways_inproc)                                                         \
    {                                                                                              \
        messages_both_ways(&ops, "inproc");                                                        \
    }                                                                                              \
    Test(suite, messages_both_ways_tcp)                                                            \
    {                                                                                              \
        messages_both_ways(&ops, "tcp");                                                           \
    }                                                                                              \
    Test(suite, zev_and_host_timers_on_time)                                                       \
    {                                                                                              \
        timers_interleave(&ops);                                                                   \
    }                                                                                              \
    Test(suite, idle_no_spin)                                                                      \
    {                                                                                              \
        idle_no_spin(&ops, false);                                                                 \
    }                                                                                              \
    Test(suite, idle_with_zev_timer_no_spin)                                                       \
    {                                                                                              \
        idle_no_spin(&ops, true);                                                                  \
    }                                                                                              \
    Test(suite, close_and_destroy_clean)                                                           \
    {                                                                                              \
        close_clean(&ops);                                                                         \
    }

#ifdef ZEV_HAVE_LIBUV
HOST_TESTS(embed_libuv, uv_host)
#endif
#ifdef ZEV_HAVE_LIBEV
HOST_TESTS(embed_libev, ev_host)
#endif
