/*
 * scale: N idle sockets registered, one active; the cost of a round trip.
 *
 * A server thread watches N idle PULL sockets (no peer; each has its own
 * mailbox fd, the thing a reactor watches) plus
 * one active REP socket; the main thread's blocking REQ client ping-pongs
 * 64-byte messages with it. The client's send time travels in the payload,
 * so the server also sees how long the wake-up took (client send -> echo
 * callback). Per run:
 *   rtt_p50_us   client round trip, median
 *   wake_p50_us  client send -> server callback, median
 *   srv_cpu_ns   server thread CPU time per round trip (the cost of waking,
 *                finding the ready socket and dispatching; on a VM the
 *                awake/woken split makes wall-clock figures bimodal)
 *   reg_ns       registering one socket with the reactor
 * Rows (impl=): zev_epoll, zev_poll (zev backends; kqueue exists only as a
 * test shim on Linux), zmq_poll (an array of N+1 items, the raw baseline),
 * zloop (CZMQ, N+1 zloop_pollers).
 * The target is zev's cost at 10,000 sockets <= 1.2x its cost at 10.
 *
 * zmq_poll over N idle sockets costs one syscall per socket per call
 * (ZMQ_EVENTS processes each mailbox), so zmq_poll and zloop get fewer
 * round trips as N grows, and quick mode measures them only up to
 * N = 1,000 (10,000 takes ~0.1 s per round trip here); --full includes it.
 *
 * scale [--full] [--runs N] [--ns 10,100,1000,10000] [--impls ..]
 */
#include "common.h"

#include <zev.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef PERF_HAVE_CZMQ
#include <czmq.h>
#endif

#define MSG_SIZE 64

enum { S_ZEV_EPOLL, S_ZEV_POLL, S_ZMQ_POLL, S_ZLOOP, S__N };
static const char *const impl_names[S__N] = {"zev_epoll", "zev_poll", "zmq_poll", "zloop"};

typedef struct server {
    int impl;
    void **idle;
    int n;
    void *active;
    long warmup, total;
    long echoed;
    uint64_t *wake;      /* per timed round trip */
    uint64_t cpu0, cpu1; /* thread CPU at the first and the last timed echo */
    double reg_ns;
    atomic_int ready;    /* 1 registered, -1 failed */
    atomic_int abort;
    zev_loop_t *loop;
    int rc;
} server_t;

/* Records the wake-up time of one echo; returns 1 after the last one. */
static int account(server_t *sv, const zmq_msg_t *m)
{
    uint64_t now = perf_now_ns(), sent;
    memcpy(&sent, zmq_msg_data((zmq_msg_t *)m), sizeof sent);
    long i = sv->echoed - sv->warmup;
    if (i == 0)
        sv->cpu0 = perf_thread_cpu_ns();
    if (i >= 0 && i < sv->total - sv->warmup)
        sv->wake[i] = now - sent;
    if (++sv->echoed == sv->total) {
        sv->cpu1 = perf_thread_cpu_ns();
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------------- zev */

static void on_idle(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s, (void)m, (void)arg;
}

static void on_active(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    server_t *sv = arg;
    zmq_msg_t *in = zev_msg_frame(m, 0);
    int done = account(sv, in);
    zmq_msg_t out;
    zmq_msg_init(&out);
    zmq_msg_copy(&out, in);
    if (zev_stream_send_msg(s, &out, 1, 0) < 0) {
        zmq_msg_close(&out);
        done = 1;
    }
    if (done)
        zev_loop_stop(sv->loop);
}

static void abort_check(zev_timer_t *t, void *arg)
{
    (void)t;
    server_t *sv = arg;
    if (atomic_load(&sv->abort))
        zev_loop_stop(sv->loop);
}

static int serve_zev(server_t *sv, const char *backend)
{
    zev_loop_opts_t o = {.backend = backend};
    sv->loop = zev_loop_new(&o);
    if (!sv->loop)
        return -1;
    zev_stream_t **st = calloc((size_t)sv->n + 1, sizeof *st);
    int ok = 1;
    uint64_t t0 = perf_now_ns();
    for (int i = 0; i < sv->n && ok; i++) {
        st[i] = zev_stream_new(sv->loop, sv->idle[i]);
        ok = st[i] && zev_stream_on_recv(st[i], on_idle, sv) == 0;
    }
    if (ok) {
        st[sv->n] = zev_stream_new(sv->loop, sv->active);
        ok = st[sv->n] && zev_stream_on_recv(st[sv->n], on_active, sv) == 0;
    }
    sv->reg_ns = (double)(perf_now_ns() - t0) / (sv->n + 1);
    if (ok) {
        zev_timer_start(sv->loop, 100000, 100000, abort_check, sv);
        atomic_store(&sv->ready, 1);
        zev_loop_run(sv->loop);
    }
    for (int i = 0; i <= sv->n; i++)
        if (st[i])
            zev_stream_close(st[i], 0);
    zev_loop_destroy(sv->loop);
    free(st);
    return ok ? 0 : -1;
}

/* ----------------------------------------------------------------- zmq_poll */

static int serve_zmq_poll(server_t *sv)
{
    int n = sv->n + 1;
    uint64_t t0 = perf_now_ns();
    zmq_pollitem_t *items = calloc((size_t)n, sizeof *items);
    for (int i = 0; i < sv->n; i++)
        items[i] = (zmq_pollitem_t){sv->idle[i], 0, ZMQ_POLLIN, 0};
    items[sv->n] = (zmq_pollitem_t){sv->active, 0, ZMQ_POLLIN, 0};
    sv->reg_ns = (double)(perf_now_ns() - t0) / n;
    zmq_msg_t m;
    zmq_msg_init(&m);
    atomic_store(&sv->ready, 1);
    int rc = 0;
    while (sv->echoed < sv->total && !atomic_load_explicit(&sv->abort, memory_order_relaxed)) {
        if (zmq_poll(items, n, 100) < 0) {
            rc = -1;
            break;
        }
        for (int i = 0; i < n; i++) {
            if (!(items[i].revents & ZMQ_POLLIN))
                continue;
            if (zmq_msg_recv(&m, items[i].socket, ZMQ_DONTWAIT) < 0)
                continue;
            if (items[i].socket == sv->active) {
                account(sv, &m);
                if (zmq_msg_send(&m, sv->active, 0) < 0)
                    rc = -1;
            }
        }
        if (rc)
            break;
    }
    zmq_msg_close(&m);
    free(items);
    return rc;
}

/* -------------------------------------------------------------------- zloop */

#ifdef PERF_HAVE_CZMQ
static int on_zloop_idle(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop, (void)item, (void)arg;
    return 0;
}

static int on_zloop_active(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop;
    server_t *sv = arg;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, item->socket, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return 0;
    }
    int done = account(sv, &m);
    if (zmq_msg_send(&m, item->socket, 0) < 0) {
        zmq_msg_close(&m);
        return -1;
    }
    return done ? -1 : 0;
}

static int on_zloop_abort(zloop_t *loop, int id, void *arg)
{
    (void)loop, (void)id;
    server_t *sv = arg;
    return atomic_load(&sv->abort) ? -1 : 0;
}

static int serve_zloop(server_t *sv)
{
    zloop_t *loop = zloop_new();
    if (!loop)
        return -1;
    int ok = 1;
    uint64_t t0 = perf_now_ns();
    for (int i = 0; i < sv->n && ok; i++) {
        zmq_pollitem_t it = {sv->idle[i], 0, ZMQ_POLLIN, 0};
        ok = zloop_poller(loop, &it, on_zloop_idle, sv) == 0;
    }
    zmq_pollitem_t act = {sv->active, 0, ZMQ_POLLIN, 0};
    ok = ok && zloop_poller(loop, &act, on_zloop_active, sv) == 0;
    sv->reg_ns = (double)(perf_now_ns() - t0) / (sv->n + 1);
    if (ok) {
        zloop_timer(loop, 100, 0, on_zloop_abort, sv);
        atomic_store(&sv->ready, 1);
        zloop_start(loop);
    }
    zloop_destroy(&loop);
    return ok ? 0 : -1;
}
#endif

static void *server_main(void *arg)
{
    server_t *sv = arg;
    switch (sv->impl) {
    case S_ZEV_EPOLL:
        sv->rc = serve_zev(sv, "epoll");
        break;
    case S_ZEV_POLL:
        sv->rc = serve_zev(sv, "poll");
        break;
    case S_ZMQ_POLL:
        sv->rc = serve_zmq_poll(sv);
        break;
#ifdef PERF_HAVE_CZMQ
    case S_ZLOOP:
        sv->rc = serve_zloop(sv);
        break;
#endif
    default:
        sv->rc = -1;
    }
    if (sv->rc)
        atomic_store(&sv->ready, -1);
    return NULL;
}

/* ------------------------------------------------------------------- a run */

typedef struct result {
    int ok;
    double rtt_p50, wake_p50, cpu_ns, reg_ns;
    const char *why;
} result_t;

static result_t run_once(int impl, void **idle, int n, void *rep, void *req, long k)
{
    result_t r = {.ok = 0, .why = "setup"};
    long warmup = k / 10 < 20 ? 20 : k / 10;
    server_t sv = {.impl = impl, .idle = idle, .n = n, .active = rep, .warmup = warmup,
                   .total = warmup + k};
    sv.wake = calloc((size_t)k, sizeof *sv.wake);
    atomic_init(&sv.ready, 0);
    atomic_init(&sv.abort, 0);
    pthread_t th;
    pthread_create(&th, NULL, server_main, &sv);
    while (atomic_load(&sv.ready) == 0)
        usleep(200);
    uint64_t *rtt = calloc((size_t)k, sizeof *rtt);
    long i = 0;
    if (atomic_load(&sv.ready) > 0) {
        unsigned char buf[MSG_SIZE];
        perf_fill(buf, sizeof buf);
        zmq_msg_t m;
        zmq_msg_init(&m);
        for (; i < warmup + k; i++) {
            uint64_t t0 = perf_now_ns();
            memcpy(buf, &t0, sizeof t0);
            if (zmq_send(req, buf, sizeof buf, 0) < 0 || zmq_msg_recv(&m, req, 0) != MSG_SIZE)
                break;
            if (i >= warmup)
                rtt[i - warmup] = perf_now_ns() - t0;
        }
        zmq_msg_close(&m);
        r.why = "timeout";
    }
    atomic_store(&sv.abort, 1);
    pthread_join(th, NULL);
    if (i == warmup + k && sv.rc == 0 && sv.echoed == sv.total) {
        perf_sort_u64(rtt, (size_t)k);
        perf_sort_u64(sv.wake, (size_t)k);
        r.ok = 1;
        r.why = NULL;
        r.rtt_p50 = (double)perf_pct(rtt, (size_t)k, 50) / 1e3;
        r.wake_p50 = (double)perf_pct(sv.wake, (size_t)k, 50) / 1e3;
        r.cpu_ns = (double)(sv.cpu1 - sv.cpu0) / (double)(k - 1);
        r.reg_ns = sv.reg_ns;
    }
    free(rtt);
    free(sv.wake);
    return r;
}

static int is_scanning(int impl)
{
    return impl != S_ZEV_EPOLL;
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 7);
    perf_banner("scale", &a);
    static const int ns_all[] = {10, 100, 1000, 10000};
    static const char *const metrics[] = {"rtt_p50_us", "wake_p50_us", "srv_cpu_ns", "reg_ns"};
    static const char *const units[] = {"us", "us", "ns/rtt", "ns/socket"};
    double med[4][S__N][4];
    int fails = 0;
    for (size_t ni = 0; ni < 4; ni++) {
        for (int i = 0; i < S__N; i++)
            for (int m = 0; m < 4; m++)
                med[ni][i][m] = NAN;
        int n = ns_all[ni];
        char nstr[16];
        snprintf(nstr, sizeof nstr, "%d", n);
        if (!perf_selected(&a, "--ns", nstr))
            continue;
        char keys[96];
        snprintf(keys, sizeof keys, "bench=scale sockets=%d", n);
        int on[S__N];
        for (int i = 0; i < S__N; i++) {
            on[i] = perf_selected(&a, "--impls", impl_names[i]);
            if (on[i] && is_scanning(i) && i != S_ZEV_POLL && n > 1000 && !a.full &&
                !perf_opt_str(&a, "--impls", NULL)) {
                printf("FAIL %s impl=%s metric=srv_cpu_ns reason=skipped_in_quick_mode\n", keys,
                       impl_names[i]);
                on[i] = 0;
            }
        }
#ifndef PERF_HAVE_CZMQ
        if (on[S_ZLOOP]) {
            printf("FAIL %s impl=zloop metric=srv_cpu_ns reason=czmq_not_available\n", keys);
            on[S_ZLOOP] = 0;
        }
#endif
        long limit = perf_raise_nofile(n + 1000);
        if (limit < n + 200) {
            for (int i = 0; i < S__N; i++)
                if (on[i])
                    printf("FAIL %s impl=%s metric=srv_cpu_ns reason=fd_limit_%ld\n", keys,
                           impl_names[i], limit);
            continue;
        }
        uint64_t t0 = perf_now_ns();
        void *ctx = zmq_ctx_new();
        zmq_ctx_set(ctx, ZMQ_MAX_SOCKETS, n + 64);
        void **idle = calloc((size_t)n, sizeof *idle);
        int made = 0;
        /* Not bound: libzmq unregisters inproc endpoints with a scan of all
         * of them, which makes closing 10,000 bound sockets take seconds. An
         * unbound socket has the same mailbox fd, which is what is watched. */
        for (; made < n; made++) {
            idle[made] = zmq_socket(ctx, ZMQ_PULL);
            if (!idle[made])
                break;
        }
        void *rep = zmq_socket(ctx, ZMQ_REP);
        void *req = zmq_socket(ctx, ZMQ_REQ);
        int to = 20000, zero = 0;
        zmq_setsockopt(req, ZMQ_RCVTIMEO, &to, sizeof to);
        zmq_setsockopt(req, ZMQ_LINGER, &zero, sizeof zero);
        zmq_setsockopt(rep, ZMQ_LINGER, &zero, sizeof zero);
        int setup_ok = made == n && rep && req && zmq_bind(rep, "inproc://scale-active") == 0 &&
                       zmq_connect(req, "inproc://scale-active") == 0;
        printf("INFO scale n=%d sockets_created_in_ms=%.1f\n", n, (perf_now_ns() - t0) / 1e6);
        perf_series_t ser[S__N][4];
        memset(ser, 0, sizeof ser);
        int broken = !setup_ok;
        for (int r = 0; r < a.runs && !broken; r++) {
            for (int i = 0; i < S__N && !broken; i++) {
                if (!on[i])
                    continue;
                long k = a.full ? 5000 : 1000;
                if (is_scanning(i)) {
                    /* zmq_poll pays a syscall per socket, poll() ~0.1 µs */
                    long s = (i == S_ZEV_POLL ? 2000000 : a.full ? 100000 : 50000) / n;
                    long floor = i == S_ZEV_POLL ? 100 : 20;
                    k = s < floor ? floor : s > k ? k : s;
                }
                k = perf_opt_long(&a, "--round-trips", k);
                result_t res = run_once(i, idle, n, rep, req, k);
                double v[4] = {res.rtt_p50, res.wake_p50, res.cpu_ns, res.reg_ns};
                for (int m = 0; m < 4; m++)
                    perf_series_add(&ser[i][m], res.ok ? v[m] : NAN);
                if (res.ok) {
                    printf("RUN %s impl=%s run=%d round_trips=%ld rtt_p50_us=%.4g wake_p50_us=%.4g "
                           "srv_cpu_ns=%.5g reg_ns=%.4g\n",
                           keys, impl_names[i], r, k, res.rtt_p50, res.wake_p50, res.cpu_ns,
                           res.reg_ns);
                } else {
                    printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, impl_names[i], r,
                           res.why);
                    fails++;
                    broken = 1; /* REQ/REP state is unknown now: stop this N */
                }
                fflush(stdout);
            }
        }
        if (!setup_ok)
            printf("INFO scale n=%d setup failed: %s\n", n, zmq_strerror(errno));
        for (int i = 0; i < S__N; i++)
            if (on[i])
                for (int m = 0; m < 4; m++)
                    med[ni][i][m] = perf_report(keys, impl_names[i], metrics[m], units[m], &ser[i][m]);
        perf_ratio(keys, "srv_cpu_ns", "zmq_poll", med[ni][S_ZMQ_POLL][2], "zev_epoll",
                   med[ni][S_ZEV_EPOLL][2]);
        perf_ratio(keys, "srv_cpu_ns", "zloop", med[ni][S_ZLOOP][2], "zev_epoll",
                   med[ni][S_ZEV_EPOLL][2]);
        uint64_t t1 = perf_now_ns();
        zmq_close(req);
        zmq_close(rep);
        for (int i = 0; i < made; i++)
            zmq_close(idle[i]);
        zmq_ctx_term(ctx);
        free(idle);
        printf("INFO scale n=%d sockets_closed_in_ms=%.1f\n", n, (perf_now_ns() - t1) / 1e6);
    }
    /* Growth from N = 10 to each larger N, per impl. */
    for (int i = 0; i < S__N; i++)
        for (size_t ni = 1; ni < 4; ni++)
            for (int m = 0; m < 3; m++) {
                char keys[96], num[16];
                snprintf(keys, sizeof keys, "bench=scale_growth impl=%s", impl_names[i]);
                snprintf(num, sizeof num, "n%d", ns_all[ni]);
                perf_ratio(keys, metrics[m], num, med[ni][i][m], "n10", med[0][i][m]);
            }
    return fails ? 1 : 0;
}
