/*
 * loop: the reactor's own overheads, with no message traffic to hide them.
 *
 * bench=loop_iter   one zev_loop_run_once(loop, 0) with nothing ready (one
 *                   idle stream registered), per backend; baselines on the
 *                   same idle socket: zmq_poll(1 item, 0), and the bare
 *                   syscalls epoll_wait(0) and poll(1 fd, 0) on its ZMQ_FD,
 *                   and getpid() (libzmq calls it before each poll of a
 *                   socket's mailbox: its fork check), so the cost of the
 *                   syscalls perf/syscalls.py counts is known.
 * bench=callbacks   zev_loop_add_callback throughput with 1 and 2 producer
 *                   threads (clock from the producers' start to the last
 *                   callback run); baseline: the same calls sent as 16-byte
 *                   {fn, arg} messages over inproc PUSH -> PULL to a thread
 *                   in a blocking receive loop.
 * bench=timers      100,000 one-shot timers with random delays in [0, 1] ms:
 *                   start cost and fire cost, both as thread CPU time per
 *                   timer (so a reactor's millisecond resolution adds no
 *                   idle wait to the figure). Peers: libzmq's zmq_timers
 *                   (draft API, exported by Debian's libzmq; it has only
 *                   repeating timers, so each fired timer is re-armed by
 *                   libzmq and that re-arm is part of its fire cost) and
 *                   CZMQ zloop_timer(times = 1). All timers fire in one or
 *                   two passes here, the case a plain list handles best.
 * bench=timers_idle the cost of one loop iteration (kept turning by an
 *                   always-readable eventfd) with 0 and with 100,000 timers
 *                   pending far in the future: what each pending timer adds
 *                   to every iteration of the reactor.
 *
 * loop [--full] [--runs N] [--sections iter,callbacks,timers,timers_idle]
 */
#include "common.h"

#include <zev.h>

#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef PERF_HAVE_CZMQ
#include <czmq.h>
#endif

/* libzmq's draft timer API: exported by the library, declared only with
 * ZMQ_BUILD_DRAFT_API. */
typedef void(perf_zmq_timer_fn)(int timer_id, void *arg);
void *zmq_timers_new(void);
int zmq_timers_destroy(void **timers_p);
int zmq_timers_add(void *timers, size_t interval, perf_zmq_timer_fn handler, void *arg);
long zmq_timers_timeout(void *timers);
int zmq_timers_execute(void *timers);

/* ---------------------------------------------------------- empty iteration */

enum { I_ZEV_EPOLL, I_ZEV_POLL, I_ZMQ_POLL, I_EPOLL_WAIT, I_POLL, I_GETPID, I__N };
static const char *const iter_names[I__N] = {"zev_epoll",  "zev_poll", "zmq_poll",
                                             "epoll_wait", "poll",     "getpid"};

static double iter_once(int impl, void *sock, long k)
{
    int fd;
    size_t len = sizeof fd;
    zmq_getsockopt(sock, ZMQ_FD, &fd, &len);
    uint64_t t0 = 0, t1 = 0;
    switch (impl) {
    case I_ZEV_EPOLL:
    case I_ZEV_POLL: {
        zev_loop_opts_t o = {.backend = impl == I_ZEV_EPOLL ? "epoll" : "poll"};
        zev_loop_t *loop = zev_loop_new(&o);
        zev_stream_t *s = loop ? zev_stream_new(loop, sock) : NULL;
        if (!s) {
            zev_loop_destroy(loop);
            return NAN;
        }
        for (int i = 0; i < 100; i++) /* the stream's first look at ZMQ_EVENTS */
            zev_loop_run_once(loop, 0);
        t0 = perf_now_ns();
        for (long i = 0; i < k; i++)
            zev_loop_run_once(loop, 0);
        t1 = perf_now_ns();
        zev_stream_close(s, 0);
        zev_loop_destroy(loop);
        break;
    }
    case I_ZMQ_POLL: {
        zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
        t0 = perf_now_ns();
        for (long i = 0; i < k; i++)
            zmq_poll(&it, 1, 0);
        t1 = perf_now_ns();
        break;
    }
    case I_EPOLL_WAIT: {
        int ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN}, out[64];
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        t0 = perf_now_ns();
        for (long i = 0; i < k; i++)
            epoll_wait(ep, out, 64, 0);
        t1 = perf_now_ns();
        close(ep);
        break;
    }
    case I_POLL: {
        struct pollfd p = {fd, POLLIN, 0};
        t0 = perf_now_ns();
        for (long i = 0; i < k; i++)
            poll(&p, 1, 0);
        t1 = perf_now_ns();
        break;
    }
    case I_GETPID: /* syscall(): glibc may one day cache getpid() again */
        t0 = perf_now_ns();
        for (long i = 0; i < k; i++)
            syscall(SYS_getpid);
        t1 = perf_now_ns();
        break;
    }
    return (double)(t1 - t0) / (double)k;
}

static void section_iter(const perf_args_t *a)
{
    long k = a->full ? 1000000 : 50000;
    const char *keys = "bench=loop_iter";
    printf("INFO loop_iter iterations=%ld\n", k);
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_PULL); /* idle: no peer */
    perf_series_t ser[I__N];
    memset(ser, 0, sizeof ser);
    for (int r = 0; r < a->runs; r++)
        for (int i = 0; i < I__N; i++) {
            double v = iter_once(i, sock, k);
            perf_series_add(&ser[i], v);
            printf("RUN %s impl=%s run=%d ns_per_iter=%.4g\n", keys, iter_names[i], r, v);
        }
    double med[I__N];
    for (int i = 0; i < I__N; i++)
        med[i] = perf_report(keys, iter_names[i], "ns_per_iter", "ns", &ser[i]);
    perf_ratio(keys, "ns_per_iter", "zev_epoll", med[I_ZEV_EPOLL], "zmq_poll", med[I_ZMQ_POLL]);
    perf_ratio(keys, "ns_per_iter", "zev_epoll", med[I_ZEV_EPOLL], "epoll_wait", med[I_EPOLL_WAIT]);
    perf_ratio(keys, "ns_per_iter", "zev_poll", med[I_ZEV_POLL], "zmq_poll", med[I_ZMQ_POLL]);
    perf_ratio(keys, "ns_per_iter", "zev_poll", med[I_ZEV_POLL], "poll", med[I_POLL]);
    zmq_close(sock);
    zmq_ctx_term(ctx);
}

/* ---------------------------------------------------------------- callbacks */

typedef struct cb_bench {
    long per_producer;
    int producers;
    long total;
    long ran; /* consumer thread only */
    uint64_t t_last;
    atomic_int go;
    zev_loop_t *loop;
    void *ctx;
    const char *ep;
} cb_bench_t;

typedef struct call {
    void (*fn)(cb_bench_t *b);
    cb_bench_t *arg;
} call_t;

static void count_call(cb_bench_t *b)
{
    if (++b->ran == b->total)
        b->t_last = perf_now_ns();
}

static void zev_cb(zev_loop_t *loop, void *arg)
{
    cb_bench_t *b = arg;
    count_call(b);
    if (b->ran == b->total)
        zev_loop_stop(loop);
}

static void *zev_producer(void *arg)
{
    cb_bench_t *b = arg;
    while (!atomic_load(&b->go))
        ;
    for (long i = 0; i < b->per_producer; i++)
        while (zev_loop_add_callback(b->loop, zev_cb, b) < 0)
            usleep(100); /* ENOMEM only */
    return NULL;
}

static void *raw_producer(void *arg)
{
    cb_bench_t *b = arg;
    void *push = zmq_socket(b->ctx, ZMQ_PUSH);
    zmq_connect(push, b->ep);
    while (!atomic_load(&b->go))
        ;
    call_t c = {count_call, b};
    for (long i = 0; i < b->per_producer; i++)
        zmq_send(push, &c, sizeof c, 0);
    zmq_close(push);
    return NULL;
}

/* Returns callbacks per second, NAN on failure. */
static double callbacks_once(int raw, int producers, long per)
{
    cb_bench_t b = {.per_producer = per, .producers = producers, .total = per * producers};
    atomic_init(&b.go, 0);
    pthread_t th[2];
    void *pull = NULL;
    if (raw) {
        b.ctx = zmq_ctx_new();
        b.ep = "inproc://perf-callbacks";
        pull = zmq_socket(b.ctx, ZMQ_PULL);
        zmq_bind(pull, b.ep);
        for (int i = 0; i < producers; i++)
            pthread_create(&th[i], NULL, raw_producer, &b);
    } else {
        b.loop = zev_loop_new(NULL);
        if (!b.loop)
            return NAN;
        for (int i = 0; i < producers; i++)
            pthread_create(&th[i], NULL, zev_producer, &b);
    }
    usleep(10000); /* producers connected and spinning on go */
    uint64_t t0 = perf_now_ns();
    atomic_store(&b.go, 1);
    int rc = 0;
    if (raw) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        int to = 10000;
        zmq_setsockopt(pull, ZMQ_RCVTIMEO, &to, sizeof to);
        while (b.ran < b.total) {
            if (zmq_msg_recv(&m, pull, 0) != sizeof(call_t)) {
                rc = -1;
                break;
            }
            call_t c;
            memcpy(&c, zmq_msg_data(&m), sizeof c);
            c.fn(c.arg);
        }
        zmq_msg_close(&m);
    } else {
        rc = zev_loop_run(b.loop);
    }
    for (int i = 0; i < producers; i++)
        pthread_join(th[i], NULL);
    if (raw) {
        zmq_close(pull);
        zmq_ctx_term(b.ctx);
    } else {
        zev_loop_destroy(b.loop);
    }
    if (rc < 0 || b.ran != b.total)
        return NAN;
    return (double)b.total * 1e9 / (double)(b.t_last - t0);
}

static void section_callbacks(const perf_args_t *a)
{
    long per = a->full ? 1000000 : 100000;
    printf("INFO callbacks per_producer=%ld\n", per);
    for (int p = 1; p <= 2; p++) {
        char keys[64];
        snprintf(keys, sizeof keys, "bench=callbacks producers=%d", p);
        perf_series_t zs = {0}, rs = {0};
        for (int r = 0; r < a->runs; r++) {
            double z = callbacks_once(0, p, per), w = callbacks_once(1, p, per);
            perf_series_add(&zs, z);
            perf_series_add(&rs, w);
            printf("RUN %s impl=zev run=%d cb_per_s=%.4g\nRUN %s impl=raw_inproc run=%d "
                   "cb_per_s=%.4g\n",
                   keys, r, z, keys, r, w);
        }
        double mz = perf_report(keys, "zev", "cb_per_s", "calls/s", &zs);
        double mr = perf_report(keys, "raw_inproc", "cb_per_s", "calls/s", &rs);
        perf_ratio(keys, "cb_per_s", "zev", mz, "raw_inproc", mr);
    }
}

/* ------------------------------------------------------------------- timers */

#define NTIMERS 100000

typedef struct timer_bench {
    long fired;
    unsigned char *seen; /* zmq_timers: first firing per timer */
    int *ids;
} timer_bench_t;

static timer_bench_t tb;

static void zev_timer_cb(zev_timer_t *t, void *arg)
{
    (void)t, (void)arg;
    tb.fired++;
}

static void zmq_timer_cb(int id, void *arg)
{
    (void)id;
    size_t i = (size_t)(uintptr_t)arg;
    if (!tb.seen[i]) {
        tb.seen[i] = 1;
        tb.fired++;
    }
}

#ifdef PERF_HAVE_CZMQ
static int zloop_timer_cb(zloop_t *loop, int id, void *arg)
{
    (void)loop, (void)id, (void)arg;
    return ++tb.fired == NTIMERS ? -1 : 0;
}
#endif

enum { T_ZEV, T_ZMQ_TIMERS, T_ZLOOP, T__N };
static const char *const timer_names[T__N] = {"zev", "zmq_timers", "zloop"};

/* Fills start_ns and fire_ns (thread CPU per timer); returns 0 or -1. */
static int timers_once(int impl, const uint32_t *delay_us, double *start_ns, double *fire_ns)
{
    memset(&tb, 0, sizeof tb);
    uint64_t c0, c1, c2;
    int rc = 0;
    switch (impl) {
    case T_ZEV: {
        zev_loop_t *loop = zev_loop_new(NULL);
        if (!loop)
            return -1;
        c0 = perf_thread_cpu_ns();
        for (long i = 0; i < NTIMERS; i++)
            if (!zev_timer_start(loop, delay_us[i], 0, zev_timer_cb, NULL))
                rc = -1;
        c1 = perf_thread_cpu_ns();
        /* Not -1: an iteration whose timer phase fired the last timers
         * would then block in its wait phase with nothing left to wake it. */
        while (tb.fired < NTIMERS && rc == 0)
            if (zev_loop_run_once(loop, 1) < 0)
                rc = -1;
        c2 = perf_thread_cpu_ns();
        zev_loop_destroy(loop);
        break;
    }
    case T_ZMQ_TIMERS: {
        void *timers = zmq_timers_new();
        tb.seen = calloc(NTIMERS, 1);
        c0 = perf_thread_cpu_ns();
        for (long i = 0; i < NTIMERS; i++) {
            /* ms resolution; no zero interval (it would re-fire at once) */
            size_t ms = delay_us[i] / 1000u + 1u;
            if (zmq_timers_add(timers, ms, zmq_timer_cb, (void *)(uintptr_t)i) < 0)
                rc = -1;
        }
        c1 = perf_thread_cpu_ns();
        while (tb.fired < NTIMERS && rc == 0) {
            long t = zmq_timers_timeout(timers);
            if (t > 0)
                usleep((useconds_t)t * 1000u);
            zmq_timers_execute(timers);
        }
        c2 = perf_thread_cpu_ns();
        zmq_timers_destroy(&timers);
        free(tb.seen);
        break;
    }
#ifdef PERF_HAVE_CZMQ
    case T_ZLOOP: {
        zloop_t *loop = zloop_new();
        if (!loop)
            return -1;
        zloop_set_max_timers(loop, 2 * NTIMERS);
        c0 = perf_thread_cpu_ns();
        for (long i = 0; i < NTIMERS; i++)
            if (zloop_timer(loop, (delay_us[i] + 500u) / 1000u, 1, zloop_timer_cb, NULL) < 0)
                rc = -1;
        c1 = perf_thread_cpu_ns();
        if (rc == 0)
            zloop_start(loop);
        c2 = perf_thread_cpu_ns();
        zloop_destroy(&loop);
        break;
    }
#endif
    default:
        return -1;
    }
    if (rc < 0 || tb.fired != NTIMERS)
        return -1;
    *start_ns = (double)(c1 - c0) / NTIMERS;
    *fire_ns = (double)(c2 - c1) / NTIMERS;
    return 0;
}

/* Iteration cost with `pending` timers waiting far in the future: the loop
 * is kept turning by an eventfd that stays readable. */
static long idle_iters, idle_target;

static void zev_idle_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io, (void)fd, (void)events;
    if (++idle_iters == idle_target)
        zev_loop_stop(arg);
}

static void zev_never(zev_timer_t *t, void *arg)
{
    (void)t, (void)arg;
}

static void zmq_never(int id, void *arg)
{
    (void)id, (void)arg;
}

#ifdef PERF_HAVE_CZMQ
static int zloop_idle_fd(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop, (void)item, (void)arg;
    return ++idle_iters == idle_target ? -1 : 0;
}

static int zloop_never(zloop_t *loop, int id, void *arg)
{
    (void)loop, (void)id, (void)arg;
    return 0;
}
#endif

static double timers_idle_once(int impl, long pending, long k)
{
    int efd = eventfd(1, EFD_CLOEXEC); /* readable forever: never read */
    idle_iters = 0;
    idle_target = k;
    uint64_t t0 = 0, t1 = 0;
    int ok = 0;
    switch (impl) {
    case T_ZEV: {
        zev_loop_t *loop = zev_loop_new(NULL);
        for (long i = 0; i < pending; i++)
            zev_timer_start(loop, 3600000000u + (uint64_t)i, 0, zev_never, NULL);
        zev_io_t *io = zev_io_start(loop, efd, ZEV_READ, zev_idle_io, loop);
        t0 = perf_now_ns();
        ok = io && zev_loop_run(loop) == 0;
        t1 = perf_now_ns();
        zev_loop_destroy(loop);
        break;
    }
    case T_ZMQ_TIMERS: {
        void *timers = zmq_timers_new();
        for (long i = 0; i < pending; i++)
            zmq_timers_add(timers, 3600000u + (size_t)i, zmq_never, NULL);
        zmq_pollitem_t it = {NULL, efd, ZMQ_POLLIN, 0};
        t0 = perf_now_ns();
        while (idle_iters < k) {
            if (zmq_poll(&it, 1, zmq_timers_timeout(timers)) < 0)
                break;
            zmq_timers_execute(timers);
            if (it.revents)
                idle_iters++;
        }
        t1 = perf_now_ns();
        ok = idle_iters == k;
        zmq_timers_destroy(&timers);
        break;
    }
#ifdef PERF_HAVE_CZMQ
    case T_ZLOOP: {
        zloop_t *loop = zloop_new();
        zloop_set_max_timers(loop, 2 * NTIMERS);
        for (long i = 0; i < pending; i++)
            zloop_timer(loop, 3600000u + (size_t)i, 1, zloop_never, NULL);
        zmq_pollitem_t it = {NULL, efd, ZMQ_POLLIN, 0};
        zloop_poller(loop, &it, zloop_idle_fd, NULL);
        t0 = perf_now_ns();
        zloop_start(loop);
        t1 = perf_now_ns();
        ok = idle_iters == k;
        zloop_destroy(&loop);
        break;
    }
#endif
    }
    close(efd);
    return ok ? (double)(t1 - t0) / (double)k : NAN;
}

static void section_timers_idle(const perf_args_t *a)
{
    static const long pendings[2] = {0, NTIMERS};
    double med[2][T__N];
    for (int p = 0; p < 2; p++) {
        char keys[64];
        snprintf(keys, sizeof keys, "bench=timers_idle pending=%ld", pendings[p]);
        perf_series_t ser[T__N];
        memset(ser, 0, sizeof ser);
        for (int r = 0; r < a->runs; r++)
            for (int i = 0; i < T__N; i++) {
#ifndef PERF_HAVE_CZMQ
                if (i == T_ZLOOP)
                    continue;
#endif
                /* zloop walks its whole timer list twice per iteration */
                long k = i == T_ZLOOP && pendings[p] ? 200 : 20000;
                double v = timers_idle_once(i, pendings[p], k);
                perf_series_add(&ser[i], v);
                printf("RUN %s impl=%s run=%d ns_per_iter=%.4g\n", keys, timer_names[i], r, v);
            }
        for (int i = 0; i < T__N; i++)
            med[p][i] = perf_report(keys, timer_names[i], "ns_per_iter", "ns", &ser[i]);
        perf_ratio(keys, "ns_per_iter", "zev", med[p][T_ZEV], "zmq_timers", med[p][T_ZMQ_TIMERS]);
        perf_ratio(keys, "ns_per_iter", "zev", med[p][T_ZEV], "zloop", med[p][T_ZLOOP]);
    }
    for (int i = 0; i < T__N; i++) {
        char keys[64];
        snprintf(keys, sizeof keys, "bench=timers_idle_growth impl=%s", timer_names[i]);
        perf_ratio(keys, "ns_per_iter", "pending100000", med[1][i], "pending0", med[0][i]);
    }
}

static void section_timers(const perf_args_t *a)
{
    const char *keys = "bench=timers timers=100000";
    uint32_t *delay = malloc(NTIMERS * sizeof *delay);
    uint32_t x = 12345;
    for (long i = 0; i < NTIMERS; i++) {
        x = x * 1103515245u + 12345u;
        delay[i] = (x >> 8) % 1001u;
    }
    perf_series_t st[T__N], fi[T__N], sum[T__N];
    memset(st, 0, sizeof st);
    memset(fi, 0, sizeof fi);
    memset(sum, 0, sizeof sum);
    int on[T__N] = {1, 1, 1};
#ifndef PERF_HAVE_CZMQ
    on[T_ZLOOP] = 0;
    printf("FAIL %s impl=zloop metric=start_fire_ns reason=czmq_not_available\n", keys);
#endif
    for (int r = 0; r < a->runs; r++)
        for (int i = 0; i < T__N; i++) {
            if (!on[i])
                continue;
            double s = NAN, f = NAN;
            if (timers_once(i, delay, &s, &f) < 0)
                printf("RUNFAIL %s impl=%s run=%d reason=error\n", keys, timer_names[i], r);
            else
                printf("RUN %s impl=%s run=%d start_ns=%.4g fire_ns=%.4g\n", keys, timer_names[i],
                       r, s, f);
            perf_series_add(&st[i], s);
            perf_series_add(&fi[i], f);
            perf_series_add(&sum[i], s + f);
        }
    double ms[T__N], mf[T__N], mt[T__N];
    for (int i = 0; i < T__N; i++) {
        ms[i] = mf[i] = mt[i] = NAN;
        if (!on[i])
            continue;
        ms[i] = perf_report(keys, timer_names[i], "start_ns", "ns/timer", &st[i]);
        mf[i] = perf_report(keys, timer_names[i], "fire_ns", "ns/timer", &fi[i]);
        mt[i] = perf_report(keys, timer_names[i], "start_fire_ns", "ns/timer", &sum[i]);
    }
    for (int i = T_ZMQ_TIMERS; i < T__N; i++) {
        perf_ratio(keys, "start_ns", "zev", ms[T_ZEV], timer_names[i], ms[i]);
        perf_ratio(keys, "fire_ns", "zev", mf[T_ZEV], timer_names[i], mf[i]);
        perf_ratio(keys, "start_fire_ns", "zev", mt[T_ZEV], timer_names[i], mt[i]);
    }
    free(delay);
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    perf_banner("loop", &a);
    if (perf_selected(&a, "--sections", "iter"))
        section_iter(&a);
    if (perf_selected(&a, "--sections", "callbacks"))
        section_callbacks(&a);
    if (perf_selected(&a, "--sections", "timers"))
        section_timers(&a);
    if (perf_selected(&a, "--sections", "timers_idle"))
        section_timers_idle(&a);
    return 0;
}
