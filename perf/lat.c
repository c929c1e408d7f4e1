/*
 * lat: round-trip latency, REQ -> REP ping-pong of 64-byte messages.
 *
 * The measuring side (the REQ client) is the same code in every row; only
 * the echo server changes. Each round trip is timed with
 * clock_gettime(CLOCK_MONOTONIC) on the client and kept: p50, p99, p99.9,
 * max and mean come from the sorted samples of one run; RESULT lines give
 * the median over runs with min and max.
 *
 * Rows (impl=):
 *   raw        blocking client, blocking zmq_msg_recv/zmq_msg_send server
 *   zev        blocking client, zev stream server (on_recv echoes the frame
 *              by reference: zmq_msg_copy + zev_stream_send_msg)
 *   zloop      blocking client, CZMQ zloop_poller server (one recv + send per
 *              readiness callback)
 *   raw_spin   client and server both spin on ZMQ_DONTWAIT
 *   zev_spin   spinning client, zev server with busy-poll (spin_us)
 * The targets compare zev with raw (overhead in µs at p50 and p99.9) and
 * zev_spin with raw_spin (p50 ratio).
 *
 * Modes
 *   lat [--full] [--runs N] [--transports ..] [--impls ..] [--count N] [--spin-us U]
 *       [--spin-all]   (spinning rows run on inproc only unless asked: with
 *                       ipc/tcp the libzmq I/O thread needs a core too)
 *   lat --server-only EP --impl raw|zev|zloop --count TOTAL   echo TOTAL, exit
 *   lat --client-only EP --count N [--warmup W] [--impl LABEL] one run, SAMPLE line
 *   (the last two let perf/pyzmq_lat.py put a PyZMQ server in front of the
 *   same C client)
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
#define TIMEOUT_NS 5000000000ull /* one round trip taking longer fails the run */

enum { L_RAW, L_ZEV, L_ZLOOP, L_RAW_SPIN, L_ZEV_SPIN, L__N };
static const char *const impl_names[L__N] = {"raw", "zev", "zloop", "raw_spin", "zev_spin"};

static const char *backend_name;
static unsigned spin_us = 1000;

/* ------------------------------------------------------------------ server */

typedef struct server {
    void *ctx;
    void *sock;          /* bound REP */
    int impl;
    long total;          /* round trips to echo, then exit */
    long echoed;
    atomic_int ready;    /* 1 once the loop exists (or the raw loop runs) */
    atomic_int abort;    /* set by the client when it gives up */
    zev_loop_t *loop;    /* zev server's loop (server thread only) */
    int rc;
} server_t;

static int echo_raw(server_t *sv, int spin)
{
    zmq_msg_t m;
    zmq_msg_init(&m);
    atomic_store(&sv->ready, 1);
    while (sv->echoed < sv->total) {
        int rc;
        if (spin) {
            while ((rc = zmq_msg_recv(&m, sv->sock, ZMQ_DONTWAIT)) < 0 && errno == EAGAIN)
                if (atomic_load_explicit(&sv->abort, memory_order_relaxed))
                    break;
        } else {
            rc = zmq_msg_recv(&m, sv->sock, 0);
        }
        if (rc < 0 || zmq_msg_send(&m, sv->sock, 0) < 0)
            break;
        sv->echoed++;
    }
    zmq_msg_close(&m);
    return sv->echoed == sv->total ? 0 : -1;
}

static void on_echo(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    server_t *sv = arg;
    zmq_msg_t out;
    zmq_msg_init(&out);
    zmq_msg_copy(&out, zev_msg_frame(m, 0)); /* a reference, as the raw server's move */
    if (zev_stream_send_msg(s, &out, 1, 0) < 0) {
        zmq_msg_close(&out);
        zev_loop_stop(sv->loop);
        return;
    }
    if (++sv->echoed == sv->total)
        zev_loop_stop(sv->loop);
}

/* The client gives up by setting abort; the zev server looks every 100 ms. */
static void abort_check(zev_timer_t *t, void *arg)
{
    (void)t;
    server_t *sv = arg;
    if (atomic_load(&sv->abort))
        zev_loop_stop(sv->loop);
}

static int echo_zev(server_t *sv, unsigned spin)
{
    zev_loop_opts_t o = {.backend = backend_name, .spin_us = spin};
    sv->loop = zev_loop_new(&o);
    if (!sv->loop) {
        atomic_store(&sv->ready, -1);
        return -1;
    }
    zev_stream_t *s = zev_stream_new(sv->loop, sv->sock);
    if (!s) {
        zev_loop_destroy(sv->loop);
        atomic_store(&sv->ready, -1);
        return -1;
    }
    zev_stream_on_recv(s, on_echo, sv);
    zev_timer_start(sv->loop, 100000, 100000, abort_check, sv);
    atomic_store(&sv->ready, 1);
    zev_loop_run(sv->loop);
    zev_stream_close(s, 0);
    zev_loop_destroy(sv->loop);
    return sv->echoed == sv->total ? 0 : -1;
}

#ifdef PERF_HAVE_CZMQ
static int on_zloop_echo(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop;
    server_t *sv = arg;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, item->socket, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return 0;
    }
    if (zmq_msg_send(&m, item->socket, 0) < 0) {
        zmq_msg_close(&m);
        return -1;
    }
    return ++sv->echoed == sv->total ? -1 : 0;
}

static int echo_zloop(server_t *sv)
{
    zloop_t *loop = zloop_new();
    zmq_pollitem_t item = {sv->sock, 0, ZMQ_POLLIN, 0};
    if (!loop || zloop_poller(loop, &item, on_zloop_echo, sv) < 0) {
        zloop_destroy(&loop);
        atomic_store(&sv->ready, -1);
        return -1;
    }
    atomic_store(&sv->ready, 1);
    zloop_start(loop); /* returns on -1 from the handler or ETERM */
    zloop_destroy(&loop);
    return sv->echoed == sv->total ? 0 : -1;
}
#endif

static void *server_main(void *arg)
{
    server_t *sv = arg;
    switch (sv->impl) {
    case L_RAW:
        sv->rc = echo_raw(sv, 0);
        break;
    case L_RAW_SPIN:
        sv->rc = echo_raw(sv, 1);
        break;
    case L_ZEV:
        sv->rc = echo_zev(sv, 0);
        break;
    case L_ZEV_SPIN:
        sv->rc = echo_zev(sv, spin_us);
        break;
#ifdef PERF_HAVE_CZMQ
    case L_ZLOOP:
        sv->rc = echo_zloop(sv);
        break;
#endif
    default:
        atomic_store(&sv->ready, -1);
        sv->rc = -1;
    }
    return NULL;
}

/* ------------------------------------------------------------------ client */

typedef struct lat_stats {
    int ok;
    double p50, p99, p999, max, mean; /* µs */
    const char *why;
} lat_stats_t;

/* Runs warmup + n round trips on a connected REQ socket. */
static lat_stats_t client_run(void *req, long n, long warmup, int spin)
{
    lat_stats_t st = {.ok = 0, .why = "timeout"};
    uint64_t *samples = malloc((size_t)n * sizeof *samples);
    unsigned char buf[MSG_SIZE];
    perf_fill(buf, sizeof buf);
    zmq_msg_t m;
    zmq_msg_init(&m);
    long i = 0;
    for (; i < warmup + n; i++) {
        uint64_t t0 = perf_now_ns();
        if (zmq_send(req, buf, sizeof buf, spin ? ZMQ_DONTWAIT : 0) < 0)
            break;
        int rc;
        if (spin) {
            unsigned k = 0;
            while ((rc = zmq_msg_recv(&m, req, ZMQ_DONTWAIT)) < 0 && errno == EAGAIN)
                if ((++k & 1023) == 0 && perf_now_ns() - t0 > TIMEOUT_NS)
                    break;
        } else {
            rc = zmq_msg_recv(&m, req, 0); /* ZMQ_RCVTIMEO bounds it */
        }
        uint64_t t1 = perf_now_ns();
        if (rc != MSG_SIZE)
            break;
        if (i >= warmup)
            samples[i - warmup] = t1 - t0;
    }
    zmq_msg_close(&m);
    if (i == warmup + n) {
        perf_sort_u64(samples, (size_t)n);
        double sum = 0;
        for (long k = 0; k < n; k++)
            sum += (double)samples[k];
        st.ok = 1;
        st.why = NULL;
        st.p50 = (double)perf_pct(samples, (size_t)n, 50) / 1e3;
        st.p99 = (double)perf_pct(samples, (size_t)n, 99) / 1e3;
        st.p999 = (double)perf_pct(samples, (size_t)n, 99.9) / 1e3;
        st.max = (double)samples[n - 1] / 1e3;
        st.mean = sum / (double)n / 1e3;
    }
    free(samples);
    return st;
}

static void *client_socket(void *ctx, const char *ep)
{
    void *req = zmq_socket(ctx, ZMQ_REQ);
    int to = (int)(TIMEOUT_NS / 1000000u), zero = 0;
    zmq_setsockopt(req, ZMQ_RCVTIMEO, &to, sizeof to);
    zmq_setsockopt(req, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(req, ep) < 0) {
        zmq_close(req);
        return NULL;
    }
    return req;
}

/* One in-process run of one row. */
static lat_stats_t run_once(int impl, const char *transport, long n, long warmup)
{
    lat_stats_t st = {.ok = 0, .why = "setup"};
    void *ctx = zmq_ctx_new();
    server_t *sv = calloc(1, sizeof *sv);
    sv->ctx = ctx;
    sv->impl = impl;
    sv->total = n + warmup;
    atomic_init(&sv->ready, 0);
    atomic_init(&sv->abort, 0);
    sv->sock = zmq_socket(ctx, ZMQ_REP);
    int zero = 0;
    zmq_setsockopt(sv->sock, ZMQ_LINGER, &zero, sizeof zero);
    char ep[256];
    if (perf_bind(sv->sock, transport, "lat", ep, sizeof ep) < 0) {
        st.why = "bind";
        zmq_close(sv->sock);
        zmq_ctx_term(ctx);
        free(sv);
        return st;
    }
    pthread_t th;
    pthread_create(&th, NULL, server_main, sv);
    while (atomic_load(&sv->ready) == 0)
        usleep(100);
    void *req = atomic_load(&sv->ready) > 0 ? client_socket(ctx, ep) : NULL;
    if (req) {
        st = client_run(req, n, warmup, impl == L_RAW_SPIN || impl == L_ZEV_SPIN);
        zmq_close(req);
    }
    if (!st.ok) {
        /* Unblock the server wherever it waits. */
        atomic_store(&sv->abort, 1);
        zmq_ctx_shutdown(ctx);
    }
    pthread_join(th, NULL);
    zmq_close(sv->sock);
    zmq_ctx_term(ctx);
    perf_unlink_ep(ep);
    if (st.ok && sv->rc != 0) {
        st.ok = 0;
        st.why = "server_error";
    }
    free(sv);
    return st;
}

/* ------------------------------------------------------------------- modes */

static int impl_from_name(const char *name)
{
    for (int i = 0; i < L__N; i++)
        if (name && strcmp(name, impl_names[i]) == 0)
            return i;
    return -1;
}

static void print_sample(const char *impl, lat_stats_t st)
{
    if (st.ok)
        printf("SAMPLE bench=lat impl=%s p50_us=%.4g p99_us=%.4g p999_us=%.4g max_us=%.4g "
               "mean_us=%.4g\n",
               impl, st.p50, st.p99, st.p999, st.max, st.mean);
    else
        printf("FAIL bench=lat impl=%s reason=%s\n", impl, st.why);
    fflush(stdout);
}

static int mode_server(const perf_args_t *a)
{
    const char *name = perf_opt_str(a, "--impl", "raw");
    server_t sv = {.impl = impl_from_name(name), .total = perf_opt_long(a, "--count", 10000)};
    if (sv.impl < 0) {
        fprintf(stderr, "lat: unknown impl %s\n", name);
        return 2;
    }
    atomic_init(&sv.ready, 0);
    atomic_init(&sv.abort, 0);
    sv.ctx = zmq_ctx_new();
    sv.sock = zmq_socket(sv.ctx, ZMQ_REP);
    int zero = 0, to = 20000;
    zmq_setsockopt(sv.sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sv.sock, ZMQ_RCVTIMEO, &to, sizeof to); /* raw: no client for 20 s */
    const char *ep = perf_opt_str(a, "--server-only", "");
    if (zmq_bind(sv.sock, ep) < 0) {
        printf("FAIL bench=lat impl=%s reason=bind\n", name);
        return 1;
    }
    printf("READY\n");
    fflush(stdout);
    server_main(&sv);
    zmq_close(sv.sock);
    zmq_ctx_term(sv.ctx);
    perf_unlink_ep(ep);
    return sv.rc == 0 ? 0 : 1;
}

static int mode_client(const perf_args_t *a)
{
    void *ctx = zmq_ctx_new();
    void *req = client_socket(ctx, perf_opt_str(a, "--client-only", ""));
    lat_stats_t st = {.ok = 0, .why = "connect"};
    if (req) {
        st = client_run(req, perf_opt_long(a, "--count", 10000), perf_opt_long(a, "--warmup", 500),
                        perf_flag(a, "--spin"));
        zmq_close(req);
    }
    print_sample(perf_opt_str(a, "--impl", "client"), st);
    zmq_ctx_term(ctx);
    return st.ok ? 0 : 1;
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    backend_name = perf_opt_str(&a, "--backend", NULL);
    spin_us = (unsigned)perf_opt_long(&a, "--spin-us", 1000);
    if (perf_opt_str(&a, "--server-only", NULL))
        return mode_server(&a);
    if (perf_opt_str(&a, "--client-only", NULL))
        return mode_client(&a);

    perf_banner("lat", &a);
    /* 10,000 round trips per run: p99.9 then rests on 10 samples, not 2. */
    long n = perf_opt_long(&a, "--count", a.full ? 50000 : 10000);
    long warmup = n / 10 < 500 ? 500 : n / 10;
    printf("INFO lat round_trips=%ld warmup=%ld size=%d spin_us=%u\n", n, warmup, MSG_SIZE, spin_us);
    static const char *const transports[] = {"inproc", "ipc", "tcp"};
    static const char *const metrics[] = {"p50_us", "p99_us", "p999_us", "max_us", "mean_us"};
    int fails = 0;
    for (size_t t = 0; t < 3; t++) {
        if (!perf_selected(&a, "--transports", transports[t]))
            continue;
        char keys[128];
        snprintf(keys, sizeof keys, "bench=lat transport=%s size=%d", transports[t], MSG_SIZE);
        perf_series_t ser[L__N][5];
        memset(ser, 0, sizeof ser);
        int on[L__N];
        for (int i = 0; i < L__N; i++)
            on[i] = perf_selected(&a, "--impls", impl_names[i]);
        /* With ipc/tcp, libzmq's I/O thread moves the bytes: two spinning
         * ends leave it no core on a 2-core machine. --spin-all insists. */
        if (strcmp(transports[t], "inproc") != 0 && !perf_flag(&a, "--spin-all") &&
            !perf_opt_str(&a, "--impls", NULL))
            on[L_RAW_SPIN] = on[L_ZEV_SPIN] = 0;
#ifndef PERF_HAVE_CZMQ
        if (on[L_ZLOOP]) {
            printf("FAIL %s impl=zloop metric=p50_us reason=czmq_not_available\n", keys);
            on[L_ZLOOP] = 0;
        }
#endif
        for (int r = 0; r < a.runs; r++) {
            for (int i = 0; i < L__N; i++) {
                if (!on[i])
                    continue;
                lat_stats_t st = run_once(i, transports[t], n, warmup);
                double v[5] = {st.p50, st.p99, st.p999, st.max, st.mean};
                for (int k = 0; k < 5; k++)
                    perf_series_add(&ser[i][k], st.ok ? v[k] : NAN);
                if (st.ok)
                    printf("RUN %s impl=%s run=%d p50_us=%.4g p99_us=%.4g p999_us=%.4g "
                           "max_us=%.4g mean_us=%.4g\n",
                           keys, impl_names[i], r, st.p50, st.p99, st.p999, st.max, st.mean);
                else {
                    printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, impl_names[i], r, st.why);
                    fails++;
                }
                fflush(stdout);
            }
        }
        double med[L__N][5];
        for (int i = 0; i < L__N; i++)
            for (int k = 0; k < 5; k++)
                med[i][k] = on[i] ? perf_report(keys, impl_names[i], metrics[k], "us", &ser[i][k])
                                  : NAN;
        for (int k = 0; k < 3; k++) {
            perf_delta(keys, metrics[k], "zev", med[L_ZEV][k], "raw", med[L_RAW][k]);
            perf_ratio(keys, metrics[k], "zev", med[L_ZEV][k], "raw", med[L_RAW][k]);
            perf_ratio(keys, metrics[k], "zev_spin", med[L_ZEV_SPIN][k], "raw_spin",
                       med[L_RAW_SPIN][k]);
            perf_ratio(keys, metrics[k], "zloop", med[L_ZLOOP][k], "zev", med[L_ZEV][k]);
            perf_delta(keys, metrics[k], "zloop", med[L_ZLOOP][k], "raw", med[L_RAW][k]);
        }
    }
    return fails ? 1 : 0;
}
