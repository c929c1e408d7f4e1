/*
 * fiber: zev's fibers (issue 12) beside the callback code doing the same
 * work on the same loop, every row interleaved run by run in one process.
 *
 * Cases (bench=):
 *   fiber_pingpong  a PAIR <-> PAIR ping-pong of 64 B over inproc, both ends
 *                   on one loop, one thread: round trip in ns (wall; the
 *                   thread's CPU time per round trip too).
 *                     callback  two streams, on_recv echoes / sends the next
 *                               ping (zev_stream_send)
 *                     fiber     two fibers: zev_fiber_send + zev_fiber_recv
 *                     raw       the floor: one thread, zmq_send/zmq_msg_recv
 *                               on both sockets in turn, no loop and no wait
 *                   Target: fiber <= 1.15x callback.
 *   fiber_thr       PUSH -> PULL 64 B, the sender thread of perf/thr.c, the
 *                   receiver on the loop thread: msg/s and receiver CPU ns
 *                   per message.
 *                     raw       blocking zmq_msg_recv loop (the ceiling)
 *                     stream    on_recv with borrowed frames (thr's zev_borrowed)
 *                     fiber     one fiber calling zev_fiber_recv in a loop
 *                   Target: fiber >= 0.9x stream.
 *   fiber_yield     k fibers (k = 1, 2, 100) calling zev_fiber_yield in a
 *                   loop: ns per yield, the thread's CPU time (one
 *                   thread that never waits: on a shared machine its CPU
 *                   time leaves out the time it was not scheduled, which
 *                   wall time would count). Each iteration of the loop
 *                   resumes every runnable fiber once, so a yield costs two
 *                   context switches plus 1/k of an iteration. Baselines in
 *                   the same run: the bare switch (core/ctx.c, main <-> one
 *                   context, ns per switch, as perf/ctxswitch.c op=switch)
 *                   and a two-switch yield through a bare scheduler context
 *                   (ctxswitch op=yield). Target: k = 2 <= 30 ns.
 *   fiber_sleep     N = 100,000 fibers with default stacks (64 KiB + guard
 *                   page), each asleep in zev_fiber_sleep (60 s) at once;
 *                   a parent fiber spawns them, yields once (they all run
 *                   and sleep), reads the process RSS, cancels and joins
 *                   them. rss_mib: VmRSS while all sleep (the process's
 *                   peak: nothing else here comes near it), growth_mib:
 *                   VmRSS then minus before the spawns; spawn_ns, start_ns
 *                   (first resume until asleep), exit_ns (cancel, return,
 *                   join) per fiber; fibers_per_s: N over the whole cycle
 *                   (spawn + join rate). Baseline: `timer`, N one-shot zev
 *                   timers (the callback way to wait): rss/growth, start_ns.
 *                   Target: rss_mib <= 1024.
 *   fiber_spawn     one fiber at a time: a parent fiber spawns a child that
 *                   returns at once and joins it (stacks from the pool, the
 *                   steady state): ns per spawn + join.
 *                   Needs vm.max_map_count >= 2 N + a few thousand (each
 *                   stack is a mapping split in two by its guard page;
 *                   perf/run raises it for its run): when a stack cannot be
 *                   mapped the row fails with a FAIL line and a message.
 *
 *   fiber [--full] [--runs N] [--cases pingpong,thr,yield,sleep,spawn]
 *         [--impls ..] [--transports inproc,ipc,tcp] [--count N] [--fibers N]
 *   fiber --once --case pingpong|yield --impl I [--count N]
 *         one run, a SAMPLE line (for perf/pyzmq_green.py)
 */
#include "common.h"

#include "ctx.h"
#include "stack.h"

#include <zev.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MSG_SIZE 64
#define STALL_NS 5000000000ull /* no progress for this long fails the run */

static char payload[MSG_SIZE];

/* ------------------------------------------------------------- ping-pong */

enum { P_CALLBACK, P_FIBER, P_RAW, P__N };
static const char *const pp_names[P__N] = {"callback", "fiber", "raw"};

typedef struct pp {
    zev_loop_t *loop;
    zev_stream_t *a, *b;
    long n, warmup, done; /* round trips: to time, untimed first, completed */
    uint64_t t0, t1, c0, c1;
    int failed;
    uint64_t last_done, last_change; /* the stall check */
} pp_t;

static void pp_count(pp_t *p)
{
    long d = ++p->done;
    if (d == p->warmup) {
        p->t0 = perf_now_ns();
        p->c0 = perf_thread_cpu_ns();
    }
    if (d == p->warmup + p->n) {
        p->t1 = perf_now_ns();
        p->c1 = perf_thread_cpu_ns();
    }
}

static void pp_on_b(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)arg;
    if (zev_stream_send(s, zev_msg_data(m, 0), zev_msg_size(m, 0), 0) < 0)
        perror("fiber: pingpong echo");
}

static void pp_on_a(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)m;
    pp_t *p = arg;
    pp_count(p);
    if (p->done == p->warmup + p->n)
        zev_loop_stop(p->loop);
    else if (zev_stream_send(s, payload, MSG_SIZE, 0) < 0) {
        p->failed = 1;
        zev_loop_stop(p->loop);
    }
}

static void pp_fiber_a(void *arg)
{
    pp_t *p = arg;
    zev_msg_t *m;
    while (p->done < p->warmup + p->n) {
        if (zev_fiber_send(p->a, payload, MSG_SIZE, 0, -1) < 0 ||
            zev_fiber_recv(p->a, &m, -1) < 0) {
            p->failed = 1;
            break;
        }
        pp_count(p);
    }
    zev_loop_stop(p->loop);
}

static void pp_fiber_b(void *arg)
{
    pp_t *p = arg;
    zev_msg_t *m;
    for (long i = 0; i < p->warmup + p->n; i++) {
        if (zev_fiber_recv(p->b, &m, -1) < 0)
            break;
        /* the data is copied before the send releases the borrowed frame */
        if (zev_fiber_send(p->b, zev_msg_data(m, 0), zev_msg_size(m, 0), 0, -1) < 0)
            break;
    }
}

/* Every second: no round trip for STALL_NS fails the run. */
static void pp_stall(zev_timer_t *t, void *arg)
{
    (void)t;
    pp_t *p = arg;
    uint64_t now = perf_now_ns();
    if ((uint64_t)p->done != p->last_done) {
        p->last_done = (uint64_t)p->done;
        p->last_change = now;
    } else if (now - p->last_change > STALL_NS) {
        fprintf(stderr, "fiber: pingpong stalled after %ld round trips\n", p->done);
        p->failed = 1;
        zev_loop_stop(p->loop);
    }
}

static perf_sample_t pp_run(int impl, long n)
{
    perf_sample_t out = {0, NAN, NAN, "setup"};
    static int seq;
    char ep[64];
    snprintf(ep, sizeof ep, "inproc://fiber-pp-%d", seq++);
    void *ctx = zmq_ctx_new();
    void *a = zmq_socket(ctx, ZMQ_PAIR), *b = zmq_socket(ctx, ZMQ_PAIR);
    int zero = 0;
    zmq_setsockopt(a, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(b, ZMQ_LINGER, &zero, sizeof zero);
    pp_t p = {.n = n, .warmup = n / 10 > 1000 ? 1000 : n / 10 + 1};
    if (zmq_bind(a, ep) < 0 || zmq_connect(b, ep) < 0)
        goto done;
    if (impl == P_RAW) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        for (long i = 0; i < p.warmup + p.n; i++) {
            if (zmq_send(a, payload, MSG_SIZE, 0) < 0 || zmq_msg_recv(&m, b, 0) < 0 ||
                zmq_msg_send(&m, b, 0) < 0 || zmq_msg_recv(&m, a, 0) < 0) {
                p.failed = 1;
                break;
            }
            pp_count(&p);
        }
        zmq_msg_close(&m);
    } else {
        if (!(p.loop = zev_loop_new(NULL)))
            goto done;
        p.a = zev_stream_new(p.loop, a);
        p.b = zev_stream_new(p.loop, b);
        p.last_change = perf_now_ns();
        zev_timer_t *st = zev_timer_start(p.loop, 1000000, 1000000, pp_stall, &p);
        if (!p.a || !p.b || !st)
            p.failed = 1;
        else if (impl == P_CALLBACK) {
            zev_stream_on_recv(p.b, pp_on_b, &p);
            zev_stream_on_recv(p.a, pp_on_a, &p);
            if (zev_stream_send(p.a, payload, MSG_SIZE, 0) < 0)
                p.failed = 1;
        } else {
            zev_fiber_t *fb = zev_fiber_spawn(p.loop, pp_fiber_b, &p, NULL);
            zev_fiber_t *fa = zev_fiber_spawn(p.loop, pp_fiber_a, &p, NULL);
            if (!fa || !fb)
                p.failed = 1;
            if (fa)
                zev_fiber_detach(fa);
            if (fb)
                zev_fiber_detach(fb);
        }
        if (!p.failed && zev_loop_run(p.loop) < 0)
            p.failed = 1;
        if (p.a)
            zev_stream_close(p.a, 0);
        if (p.b)
            zev_stream_close(p.b, 0);
        zev_loop_destroy(p.loop); /* cancels and unwinds a fiber still waiting */
    }
    if (!p.failed && p.done == p.warmup + p.n && p.t1 > p.t0) {
        out.ok = 1;
        out.why = NULL;
        out.msgs_per_s = (double)(p.t1 - p.t0) / (double)p.n; /* ns per round trip */
        out.cpu_ns = (double)(p.c1 - p.c0) / (double)p.n;
    } else
        out.why = p.failed ? "failed" : "incomplete";
done:
    zmq_close(a);
    zmq_close(b);
    zmq_ctx_term(ctx);
    return out;
}

static void case_pingpong(const perf_args_t *a, int *fails)
{
    long n = perf_opt_long(a, "--count", a->full ? 500000 : 100000);
    const char *keys = "bench=fiber_pingpong transport=inproc size=64";
    int on[P__N];
    for (int i = 0; i < P__N; i++)
        on[i] = perf_selected(a, "--impls", pp_names[i]);
    perf_series_t rtt[P__N] = {0}, cpu[P__N] = {0};
    for (int r = 0; r < a->runs; r++)
        for (int i = 0; i < P__N; i++) {
            if (!on[i])
                continue;
            perf_sample_t s = pp_run(i, n);
            perf_series_add(&rtt[i], s.msgs_per_s);
            perf_series_add(&cpu[i], s.cpu_ns);
            if (s.ok)
                printf("RUN %s impl=%s run=%d count=%ld rtt_ns=%.6g cpu_ns=%.6g\n", keys,
                       pp_names[i], r, n, s.msgs_per_s, s.cpu_ns);
            else {
                printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, pp_names[i], r, s.why);
                (*fails)++;
            }
            fflush(stdout);
        }
    double med[P__N], cmed[P__N];
    for (int i = 0; i < P__N; i++) {
        med[i] = cmed[i] = NAN;
        if (!on[i])
            continue;
        med[i] = perf_report(keys, pp_names[i], "rtt_ns", "ns", &rtt[i]);
        cmed[i] = perf_report(keys, pp_names[i], "cpu_ns", "ns", &cpu[i]);
    }
    perf_ratio(keys, "rtt_ns", "fiber", med[P_FIBER], "callback", med[P_CALLBACK]);
    perf_ratio(keys, "cpu_ns", "fiber", cmed[P_FIBER], "callback", cmed[P_CALLBACK]);
    perf_delta(keys, "rtt_ns", "fiber", med[P_FIBER], "callback", med[P_CALLBACK]);
    perf_ratio(keys, "rtt_ns", "callback", med[P_CALLBACK], "raw", med[P_RAW]);
}

/* ------------------------------------------------------------ throughput */

enum { T_RAW, T_STREAM, T_FIBER, T__N };
static const char *const thr_names[T__N] = {"raw", "stream", "fiber"};

typedef struct rx {
    zev_loop_t *loop;
    zev_stream_t *s;
    long count, got;
    uint64_t sum;
    perf_marks_t marks;
    int failed;
    long last_got;
    uint64_t last_change;
} rx_t;

static inline int rx_tick(rx_t *rx, const unsigned char *data)
{
    rx->sum += data[0];
    return perf_marks_tick(&rx->marks, ++rx->got, rx->count);
}

static void rx_on_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *rx = arg;
    if (rx_tick(rx, zev_msg_data(m, 0)))
        zev_loop_stop(rx->loop);
}

static void rx_fiber(void *arg)
{
    rx_t *rx = arg;
    zev_msg_t *m;
    for (;;) {
        if (zev_fiber_recv(rx->s, &m, -1) < 0) {
            rx->failed = 1;
            break;
        }
        if (rx_tick(rx, zev_msg_data(m, 0)))
            break;
    }
    zev_loop_stop(rx->loop);
}

static void rx_stall(zev_timer_t *t, void *arg)
{
    (void)t;
    rx_t *rx = arg;
    uint64_t now = perf_now_ns();
    if (rx->got != rx->last_got) {
        rx->last_got = rx->got;
        rx->last_change = now;
    } else if (now - rx->last_change > STALL_NS) {
        fprintf(stderr, "fiber: receiver stalled after %ld of %ld\n", rx->got, rx->count);
        rx->failed = 1;
        zev_loop_stop(rx->loop);
    }
}

typedef struct thr_row {
    const char *transport;
    long count;
} thr_row_t;

static perf_sample_t thr_run(int impl, void *arg)
{
    const thr_row_t *row = arg;
    perf_sample_t out = {0, NAN, NAN, "setup"};
    void *ctx = zmq_ctx_new();
    void *pull = zmq_socket(ctx, ZMQ_PULL);
    char ep[256];
    if (perf_bind(pull, row->transport, "fiberthr", ep, sizeof ep) < 0) {
        zmq_close(pull);
        zmq_ctx_term(ctx);
        out.why = "bind";
        return out;
    }
    atomic_int hold;
    atomic_init(&hold, 1);
    perf_sender_t snd = {.ctx = ctx, .ep = ep, .size = MSG_SIZE, .count = row->count, .hold = &hold};
    pthread_t th;
    pthread_create(&th, NULL, perf_sender_main, &snd);
    rx_t rx = {.count = row->count, .last_change = perf_now_ns()};
    if (impl == T_RAW) {
        int tmo = 5000;
        zmq_setsockopt(pull, ZMQ_RCVTIMEO, &tmo, sizeof tmo);
        zmq_msg_t m;
        zmq_msg_init(&m);
        for (;;) {
            if (zmq_msg_recv(&m, pull, 0) < 0) {
                rx.failed = 1;
                break;
            }
            if (rx_tick(&rx, zmq_msg_data(&m)))
                break;
        }
        zmq_msg_close(&m);
    } else if ((rx.loop = zev_loop_new(NULL))) {
        rx.s = zev_stream_new(rx.loop, pull);
        zev_timer_t *st = zev_timer_start(rx.loop, 1000000, 1000000, rx_stall, &rx);
        if (!rx.s || !st)
            rx.failed = 1;
        else if (impl == T_STREAM)
            zev_stream_on_recv(rx.s, rx_on_recv, &rx);
        else {
            zev_fiber_t *f = zev_fiber_spawn(rx.loop, rx_fiber, &rx, NULL);
            if (f)
                zev_fiber_detach(f);
            else
                rx.failed = 1;
        }
        if (!rx.failed && zev_loop_run(rx.loop) < 0)
            rx.failed = 1;
        if (rx.s)
            zev_stream_close(rx.s, 0);
        zev_loop_destroy(rx.loop);
    } else
        rx.failed = 1;
    atomic_store(&hold, 0);
    int zero = 0;
    zmq_setsockopt(pull, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(pull);
    if (rx.failed)
        zmq_ctx_shutdown(ctx); /* a sender stuck on a full pipe */
    pthread_join(th, NULL);
    zmq_ctx_term(ctx);
    perf_unlink_ep(ep);
    if (rx.failed || rx.got != rx.count || !perf_marks_sample(&rx.marks, rx.count, &out))
        out.why = rx.failed ? "failed" : "incomplete";
    return out;
}

static void case_thr(const perf_args_t *a, int *fails)
{
    static const char *const transports[] = {"inproc", "ipc", "tcp"};
    long count = perf_opt_long(a, "--count", a->full ? 3000000 : 300000);
    for (int t = 0; t < 3; t++) {
        if (!perf_selected(a, "--transports", transports[t]))
            continue;
        char keys[128];
        snprintf(keys, sizeof keys, "bench=fiber_thr transport=%s size=64", transports[t]);
        int on[T__N];
        for (int i = 0; i < T__N; i++)
            on[i] = perf_selected(a, "--impls", thr_names[i]);
        thr_row_t row = {transports[t], count};
        double med[T__N], cmed[T__N];
        *fails += perf_rate_rows(keys, "rx_cpu_ns", T__N, thr_names, on, a->runs, count, thr_run,
                                 &row, med, cmed);
        perf_ratio(keys, "msgs_per_s", "fiber", med[T_FIBER], "stream", med[T_STREAM]);
        perf_ratio(keys, "msgs_per_s", "stream", med[T_STREAM], "raw", med[T_RAW]);
        perf_ratio(keys, "rx_cpu_ns", "fiber", cmed[T_FIBER], "stream", cmed[T_STREAM]);
        perf_delta(keys, "rx_cpu_ns", "fiber", cmed[T_FIBER], "stream", cmed[T_STREAM]);
    }
}

/* ------------------------------------------------------------------ yield */

typedef struct yielder {
    zev_loop_t *loop;
    long n;
    int left, failed;
} yielder_t;

static void yield_main(void *arg)
{
    yielder_t *y = arg;
    for (long i = 0; i < y->n; i++)
        if (zev_fiber_yield() < 0) {
            y->failed = 1;
            break;
        }
    if (--y->left == 0)
        zev_loop_stop(y->loop);
}

/* ns per yield of k fibers yielding n times each (thread CPU time). */
static double yield_run(int k, long n)
{
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop)
        return NAN;
    yielder_t y = {.loop = loop, .n = n, .left = k};
    for (int i = 0; i < k; i++) {
        zev_fiber_t *f = zev_fiber_spawn(loop, yield_main, &y, NULL);
        if (!f) {
            zev_loop_destroy(loop);
            return NAN;
        }
        zev_fiber_detach(f);
    }
    uint64_t t0 = perf_thread_cpu_ns();
    int rc = zev_loop_run(loop); /* the last fiber stops it */
    uint64_t t1 = perf_thread_cpu_ns();
    zev_loop_destroy(loop);
    return rc < 0 || y.failed ? NAN : (double)(t1 - t0) / ((double)k * (double)n);
}

/* The bare switch and a bare two-switch yield (as perf/ctxswitch.c). */
static zev__ctx_t sched_ctx, bare[2];
static zev__stack_t bare_stack[2];
static zev__stack_pool_t bare_pool;
static volatile int bare_stop;

static void bounce(void *arg)
{
    zev__ctx_t *self = arg;
    while (!bare_stop)
        zev__ctx_switch(self, &sched_ctx);
    zev__ctx_exit(self, &sched_ctx);
}

static double bare_run(int nfib, long n)
{
    bare_stop = 0;
    zev__ctx_init_main(&sched_ctx);
    for (int i = 0; i < nfib; i++)
        if (zev__stack_get(&bare_pool, 0, &bare_stack[i]) != 0 ||
            zev__ctx_make(&bare[i], bare_stack[i].lo, bare_stack[i].size, bounce, &bare[i]) != 0)
            return NAN;
    for (int i = 0; i < nfib; i++)
        zev__ctx_switch(&sched_ctx, &bare[i]);
    uint64_t t0 = perf_thread_cpu_ns();
    for (long j = 0; j < n; j++)
        for (int i = 0; i < nfib; i++)
            zev__ctx_switch(&sched_ctx, &bare[i]);
    uint64_t t1 = perf_thread_cpu_ns();
    bare_stop = 1;
    for (int i = 0; i < nfib; i++) {
        zev__ctx_switch(&sched_ctx, &bare[i]);
        zev__ctx_destroy(&bare[i]);
        zev__stack_put(&bare_pool, &bare_stack[i]);
    }
    /* one fiber: 2 switches per round, ns per switch; two: ns per yield
     * (fiber -> scheduler -> next fiber = 2 switches) */
    return (double)(t1 - t0) / (double)(nfib == 1 ? 2 * n : nfib * n);
}

enum { Y_FIBERS1, Y_FIBERS2, Y_FIBERS100, Y_BARE_SWITCH, Y_BARE_YIELD, Y__N };
static const char *const y_names[Y__N] = {"fibers_1", "fibers_2", "fibers_100", "bare_switch",
                                          "bare_yield"};

static double y_run(int i, long n)
{
    switch (i) {
    case Y_FIBERS1:
        return yield_run(1, n);
    case Y_FIBERS2:
        return yield_run(2, n / 2);
    case Y_FIBERS100:
        return yield_run(100, n / 100);
    case Y_BARE_SWITCH:
        return bare_run(1, n);
    default:
        return bare_run(2, n / 2);
    }
}

static void case_yield(const perf_args_t *a, int *fails)
{
    long n = perf_opt_long(a, "--count", a->full ? 10000000 : 2000000); /* yields per run */
    const char *keys = "bench=fiber_yield";
    int on[Y__N];
    for (int i = 0; i < Y__N; i++)
        on[i] = perf_selected(a, "--impls", y_names[i]);
    perf_series_t s[Y__N] = {0};
    zev__stack_pool_init(&bare_pool);
    for (int i = 0; i < Y__N; i++) /* warm-up: stacks mapped, predictors trained */
        if (on[i])
            y_run(i, n / 10);
    for (int r = 0; r < a->runs; r++)
        for (int i = 0; i < Y__N; i++) {
            if (!on[i])
                continue;
            double v = y_run(i, n);
            perf_series_add(&s[i], v);
            if (isnan(v)) {
                printf("RUNFAIL %s impl=%s run=%d reason=failed\n", keys, y_names[i], r);
                (*fails)++;
            } else
                printf("RUN %s impl=%s run=%d count=%ld ns=%.4g\n", keys, y_names[i], r, n, v);
            fflush(stdout);
        }
    double med[Y__N];
    for (int i = 0; i < Y__N; i++)
        med[i] = on[i] ? perf_report(keys, y_names[i],
                                     i == Y_BARE_SWITCH ? "ns_per_switch" : "ns_per_yield", "ns",
                                     &s[i])
                       : NAN;
    perf_ratio(keys, "ns_per_yield", "fibers_2", med[Y_FIBERS2], "bare_yield", med[Y_BARE_YIELD]);
    /* per iteration: 1 fiber = I + 2 sw, 2 fibers = I/2 + 2 sw */
    if (!isnan(med[Y_FIBERS1]) && !isnan(med[Y_FIBERS2]))
        printf("INFO fiber_yield iteration_ns=%.3g two_switches_ns=%.3g (from fibers_1 = I + 2s, "
               "fibers_2 = I/2 + 2s)\n",
               2 * (med[Y_FIBERS1] - med[Y_FIBERS2]), 2 * med[Y_FIBERS2] - med[Y_FIBERS1]);
    zev__stack_pool_fini(&bare_pool);
}

/* --------------------------------------------------------------- sleepers */

static double vm_kib(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double v = NAN;
    size_t n = strlen(field);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0 && line[n] == ':') {
            v = strtod(line + n + 1, NULL);
            break;
        }
    if (f)
        fclose(f);
    return v;
}

static long max_map_count(void)
{
    FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
    long v = -1;
    if (f) {
        if (fscanf(f, "%ld", &v) != 1)
            v = -1;
        fclose(f);
    }
    return v;
}

typedef struct sleepers {
    zev_loop_t *loop;
    long n, spawned, asleep;
    zev_fiber_t **kids;
    int err; /* spawn's errno */
    double rss0, rss, spawn_ns, start_ns, exit_ns, per_s;
} sleepers_t;

static void sleeper(void *arg)
{
    sleepers_t *sl = arg;
    sl->asleep++;
    zev_fiber_sleep(60000000); /* ends in ECANCELED */
}

static void sleep_parent(void *arg)
{
    sleepers_t *sl = arg;
    sl->rss0 = vm_kib("VmRSS");
    uint64_t t0 = perf_now_ns();
    for (long i = 0; i < sl->n; i++) {
        if (!(sl->kids[i] = zev_fiber_spawn(sl->loop, sleeper, sl, NULL))) {
            sl->err = errno;
            break;
        }
        sl->spawned++;
    }
    uint64_t t1 = perf_now_ns();
    zev_fiber_yield(); /* the children run first (FIFO), each until it sleeps */
    uint64_t t2 = perf_now_ns();
    sl->rss = vm_kib("VmRSS");
    for (long i = 0; i < sl->spawned; i++)
        zev_fiber_cancel(sl->kids[i]);
    for (long i = 0; i < sl->spawned; i++)
        zev_fiber_join(sl->kids[i], -1);
    uint64_t t3 = perf_now_ns();
    if (sl->spawned == sl->n && sl->asleep == sl->n) {
        sl->spawn_ns = (double)(t1 - t0) / (double)sl->n;
        sl->start_ns = (double)(t2 - t1) / (double)sl->n;
        sl->exit_ns = (double)(t3 - t2) / (double)sl->n;
        sl->per_s = (double)sl->n * 1e9 / (double)(t3 - t0);
    }
    zev_loop_stop(sl->loop);
}

static void sleep_fibers(sleepers_t *sl)
{
    sl->kids = calloc((size_t)sl->n, sizeof *sl->kids);
    sl->loop = zev_loop_new(NULL);
    zev_fiber_t *p = sl->kids && sl->loop ? zev_fiber_spawn(sl->loop, sleep_parent, sl, NULL) : NULL;
    if (!p) {
        sl->err = errno;
    } else {
        zev_fiber_detach(p);
        zev_loop_run(sl->loop);
    }
    if (sl->loop)
        zev_loop_destroy(sl->loop);
    free(sl->kids);
}

static void timer_cb(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
}

static void sleep_timers(sleepers_t *sl)
{
    zev_timer_t **ts = calloc((size_t)sl->n, sizeof *ts);
    sl->loop = zev_loop_new(NULL);
    if (!ts || !sl->loop) {
        sl->err = ENOMEM;
        free(ts);
        if (sl->loop)
            zev_loop_destroy(sl->loop);
        return;
    }
    sl->rss0 = vm_kib("VmRSS");
    uint64_t t0 = perf_now_ns();
    for (long i = 0; i < sl->n; i++) {
        if (!(ts[i] = zev_timer_start(sl->loop, 60000000, 0, timer_cb, NULL))) {
            sl->err = errno;
            break;
        }
        sl->spawned++;
    }
    uint64_t t1 = perf_now_ns();
    sl->rss = vm_kib("VmRSS");
    zev_loop_run_once(sl->loop, 0); /* one iteration with them all pending */
    for (long i = 0; i < sl->spawned; i++)
        zev_timer_cancel(ts[i]);
    uint64_t t2 = perf_now_ns();
    if (sl->spawned == sl->n) {
        sl->spawn_ns = (double)(t1 - t0) / (double)sl->n;
        sl->exit_ns = (double)(t2 - t1) / (double)sl->n;
        sl->per_s = (double)sl->n * 1e9 / (double)(t2 - t0);
    }
    zev_loop_destroy(sl->loop);
    free(ts);
}

static void case_sleep(const perf_args_t *a, int *fails)

{
    long n = perf_opt_long(a, "--fibers", 100000);
    int runs = a->runs < 3 ? a->runs : 3; /* each run maps N stacks: seconds */
    runs = (int)perf_opt_long(a, "--sleep-runs", a->full ? a->runs : runs);
    long mmc = max_map_count();
    char keys[96];
    snprintf(keys, sizeof keys, "bench=fiber_sleep fibers=%ld", n);
    printf("INFO fiber_sleep fibers=%ld max_map_count=%ld needed_about=%ld stack=default\n", n, mmc,
           2 * n + 1000);
    static const char *const names[2] = {"timer", "fiber"}; /* timers first: a fresh heap */
    static const char *const metrics[6] = {"rss_mib", "growth_mib", "spawn_ns",
                                           "start_ns", "exit_ns", "fibers_per_s"};
    static const char *const units[6] = {"MiB", "MiB", "ns", "ns", "ns", "1/s"};
    perf_series_t s[2][6] = {0};
    int failed[2] = {0, 0};
    for (int r = 0; r < runs; r++)
        for (int i = 0; i < 2; i++) {
            if (!perf_selected(a, "--impls", names[i]) || failed[i])
                continue;
            sleepers_t sl = {.n = n};
            if (i == 1)
                sleep_fibers(&sl);
            else
                sleep_timers(&sl);
            if (sl.spawned != n || isnan(sl.rss)) {
                fprintf(stderr,
                        "fiber: %s: only %ld of %ld made (%s)%s\n", names[i], sl.spawned, n,
                        strerror(sl.err),
                        i == 1 && sl.err == ENOMEM
                            ? ": a stack could not be mapped; each fiber's stack is two mappings "
                              "(guard page + stack): raise vm.max_map_count (sysctl "
                              "vm.max_map_count=262144) or lower --fibers"
                            : "");
                printf("RUNFAIL %s impl=%s run=%d reason=%s_after_%ld\n", keys, names[i], r,
                       sl.err == ENOMEM ? "ENOMEM_mmap" : "spawn_failed", sl.spawned);
                failed[i] = 1; /* the same limit would fail every run */
                (*fails)++;
                for (int m = 0; m < 6; m++)
                    perf_series_add(&s[i][m], NAN);
                continue;
            }
            double v[6] = {sl.rss / 1024, (sl.rss - sl.rss0) / 1024, sl.spawn_ns,
                           i == 1 ? sl.start_ns : NAN, sl.exit_ns, sl.per_s};
            printf("RUN %s impl=%s run=%d", keys, names[i], r);
            for (int m = 0; m < 6; m++) {
                perf_series_add(&s[i][m], v[m]);
                printf(" %s=%.4g", metrics[m], v[m]);
            }
            printf("\n");
            fflush(stdout);
        }
    for (int i = 0; i < 2; i++) {
        if (!perf_selected(a, "--impls", names[i]))
            continue;
        for (int m = 0; m < 6; m++)
            if (!(i == 0 && m == 3))
                perf_report(keys, names[i], metrics[m], units[m], &s[i][m]);
    }
    printf("INFO fiber_sleep vm_hwm_mib=%.1f\n", vm_kib("VmHWM") / 1024);
}

/* One fiber at a time: spawn, join (the child returns at once); pooled
 * stacks, the steady state. ns per spawn + join. */
typedef struct serial {
    zev_loop_t *loop;
    long n, done;
} serial_t;

static void noop_child(void *arg)
{
    (void)arg;
}

static void serial_parent(void *arg)
{
    serial_t *se = arg;
    for (long i = 0; i < se->n; i++) {
        zev_fiber_t *c = zev_fiber_spawn(se->loop, noop_child, NULL, NULL);
        if (!c || zev_fiber_join(c, -1) < 0)
            break;
        se->done++;
    }
    zev_loop_stop(se->loop);
}

static double serial_run(long n)
{
    serial_t se = {.loop = zev_loop_new(NULL), .n = n};
    if (!se.loop)
        return NAN;
    zev_fiber_t *p = zev_fiber_spawn(se.loop, serial_parent, &se, NULL);
    if (!p) {
        zev_loop_destroy(se.loop);
        return NAN;
    }
    zev_fiber_detach(p);
    uint64_t t0 = perf_now_ns();
    zev_loop_run(se.loop);
    uint64_t t1 = perf_now_ns();
    zev_loop_destroy(se.loop);
    return se.done == n ? (double)(t1 - t0) / (double)n : NAN;
}

static void case_spawn(const perf_args_t *a, int *fails)
{
    long n = perf_opt_long(a, "--spawns", a->full ? 1000000 : 200000);
    const char *keys = "bench=fiber_spawn";
    perf_series_t s = {0};
    serial_run(n / 10);
    for (int r = 0; r < a->runs; r++) {
        double v = serial_run(n);
        perf_series_add(&s, v);
        if (isnan(v)) {
            printf("RUNFAIL %s impl=serial run=%d reason=failed\n", keys, r);
            (*fails)++;
        } else
            printf("RUN %s impl=serial run=%d count=%ld ns=%.4g\n", keys, r, n, v);
    }
    perf_report(keys, "serial", "ns_per_spawn_join", "ns", &s);
}

/* ------------------------------------------------------------------- once */

static int mode_once(const perf_args_t *a)
{
    const char *c = perf_opt_str(a, "--case", "pingpong");
    const char *impl = perf_opt_str(a, "--impl", "fiber");
    if (strcmp(c, "pingpong") == 0) {
        int i = 0;
        while (i < P__N && strcmp(pp_names[i], impl) != 0)
            i++;
        if (i == P__N)
            return 2;
        perf_sample_t s = pp_run(i, perf_opt_long(a, "--count", 100000));
        if (!s.ok) {
            printf("FAIL bench=fiber_pingpong impl=%s reason=%s\n", impl, s.why);
            return 1;
        }
        printf("SAMPLE bench=fiber_pingpong impl=%s rtt_ns=%.6g cpu_ns=%.6g rt_per_s=%.6g\n",
               impl, s.msgs_per_s, s.cpu_ns, 1e9 / s.msgs_per_s);
        return 0;
    }
    return 2;
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    memset(payload, 'z', sizeof payload);
    if (perf_flag(&a, "--once"))
        return mode_once(&a);
    perf_banner("fiber", &a);
    int fails = 0;
    if (perf_selected(&a, "--cases", "pingpong"))
        case_pingpong(&a, &fails);
    if (perf_selected(&a, "--cases", "thr"))
        case_thr(&a, &fails);
    if (perf_selected(&a, "--cases", "yield"))
        case_yield(&a, &fails);
    if (perf_selected(&a, "--cases", "sleep"))
        case_sleep(&a, &fails);
    if (perf_selected(&a, "--cases", "spawn"))
        case_spawn(&a, &fails);
    return fails ? 1 : 0;
}
