/*
 * alloc: heap allocations per received message on the receiving thread.
 *
 * This program interposes malloc, calloc, realloc (and the aligned
 * variants) for the whole process, libzmq included, forwarding to glibc's
 * __libc_* entry points, and counts the calls made by the receiver thread
 * while it handles messages after a warm-up of `count / 10` messages.
 * Allocations made by the sender thread (libzmq allocates every message
 * body larger than 33 bytes on the sending side) and by libzmq's I/O
 * thread are not the receiver's and are not counted.
 *
 * Rows (impl=): raw (blocking zmq_msg_recv), zev_borrowed, zev_kept (keep
 * + release in the callback), zloop. The target is 0 per message for
 * zev_borrowed and zev_kept.
 *
 * alloc [--full] [--runs N] [--transports inproc,ipc,tcp] [--count N]
 */
#include "common.h"

#include <zev.h>

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

/* Allocations are counted by perf/allocs.c, which interposes malloc. */
#include "allocs.h"

/* ---------------------------------------------------------------- the bench */

#define MSG_SIZE 64

enum { A_RAW, A_ZEV_BORROWED, A_ZEV_KEPT, A_ZLOOP, A__N };
static const char *const impl_names[A__N] = {"raw", "zev_borrowed", "zev_kept", "zloop"};

typedef struct rx {
    long count, warm, got;
    long allocs_at_warm, allocs;
    zev_loop_t *loop;
    zmq_msg_t zmsg;
} rx_t;

static int tick(rx_t *rx)
{
    long g = ++rx->got;
    if (g == rx->warm)
        rx->allocs_at_warm = perf_allocs_start();
    if (g == rx->count) {
        rx->allocs = perf_allocs_stop(rx->allocs_at_warm);
        return 1;
    }
    return 0;
}

static void on_borrowed(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s, (void)m;
    rx_t *rx = arg;
    if (tick(rx))
        zev_loop_stop(rx->loop);
}

static void on_kept(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *rx = arg;
    zev_frame_t *f = zev_msg_keep(m, 0);
    if (f)
        zev_frame_release(f);
    if (tick(rx))
        zev_loop_stop(rx->loop);
}

#ifdef PERF_HAVE_CZMQ
static int on_zloop(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop;
    rx_t *rx = arg;
    if (zmq_msg_recv(&rx->zmsg, item->socket, ZMQ_DONTWAIT) < 0)
        return 0;
    return tick(rx) ? -1 : 0;
}
#endif

typedef struct sender {
    void *ctx;
    const char *ep;
    long count;
    atomic_int hold;
} sender_t;

static void *sender_main(void *arg)
{
    sender_t *s = arg;
    void *push = zmq_socket(s->ctx, ZMQ_PUSH);
    zmq_connect(push, s->ep);
    unsigned char buf[MSG_SIZE];
    perf_fill(buf, sizeof buf);
    for (long i = 0; i < s->count; i++)
        if (zmq_send(push, buf, sizeof buf, 0) < 0)
            break;
    while (atomic_load(&s->hold)) /* see thr.c: libzmq drops in-flight ipc */
        usleep(1000);
    zmq_close(push);
    return NULL;
}

/* Allocations per message after warm-up, NAN on failure. */
static double run_once(int impl, const char *transport, long count)
{
    void *ctx = zmq_ctx_new();
    void *pull = zmq_socket(ctx, ZMQ_PULL);
    int to = 10000;
    zmq_setsockopt(pull, ZMQ_RCVTIMEO, &to, sizeof to);
    char ep[256];
    if (perf_bind(pull, transport, "alloc", ep, sizeof ep) < 0) {
        zmq_close(pull);
        zmq_ctx_term(ctx);
        return NAN;
    }
    sender_t snd = {.ctx = ctx, .ep = ep, .count = count};
    atomic_init(&snd.hold, 1);
    pthread_t th;
    pthread_create(&th, NULL, sender_main, &snd);
    rx_t rx = {.count = count, .warm = count / 10};
    int ok = 0;
    switch (impl) {
    case A_RAW: {
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (zmq_msg_recv(&m, pull, 0) >= 0)
            if (tick(&rx))
                break;
        zmq_msg_close(&m);
        ok = rx.got == count;
        break;
    }
    case A_ZEV_BORROWED:
    case A_ZEV_KEPT: {
        rx.loop = zev_loop_new(NULL);
        zev_stream_t *s = rx.loop ? zev_stream_new(rx.loop, pull) : NULL;
        if (s) {
            zev_stream_on_recv(s, impl == A_ZEV_KEPT ? on_kept : on_borrowed, &rx);
            zev_loop_run(rx.loop);
            zev_stream_close(s, 0);
        }
        zev_loop_destroy(rx.loop);
        ok = rx.got == count;
        break;
    }
#ifdef PERF_HAVE_CZMQ
    case A_ZLOOP: {
        zloop_t *loop = zloop_new();
        zmq_msg_init(&rx.zmsg);
        zmq_pollitem_t it = {pull, 0, ZMQ_POLLIN, 0};
        if (loop && zloop_poller(loop, &it, on_zloop, &rx) == 0)
            zloop_start(loop);
        zloop_destroy(&loop);
        zmq_msg_close(&rx.zmsg);
        ok = rx.got == count;
        break;
    }
#endif
    }
    perf_allocs_stop(0); /* a run that failed may still be counting */
    atomic_store(&snd.hold, 0);
    if (!ok) {
        int zero = 0;
        zmq_setsockopt(pull, ZMQ_LINGER, &zero, sizeof zero);
        zmq_ctx_shutdown(ctx);
    }
    pthread_join(th, NULL);
    zmq_close(pull);
    zmq_ctx_term(ctx);
    perf_unlink_ep(ep);
    if (!ok)
        return NAN;
    return (double)rx.allocs / (double)(count - rx.warm);
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 3, 5);
    perf_banner("alloc", &a);
    long count = perf_opt_long(&a, "--count", a.full ? 500000 : 30000);
    static const char *const transports[] = {"inproc", "ipc", "tcp"};
    for (size_t t = 0; t < 3; t++) {
        if (!perf_selected(&a, "--transports", transports[t]))
            continue;
        char keys[96];
        snprintf(keys, sizeof keys, "bench=alloc transport=%s size=%d", transports[t], MSG_SIZE);
        perf_series_t ser[A__N];
        memset(ser, 0, sizeof ser);
        for (int r = 0; r < a.runs; r++)
            for (int i = 0; i < A__N; i++) {
#ifndef PERF_HAVE_CZMQ
                if (i == A_ZLOOP)
                    continue;
#endif
                double v = run_once(i, transports[t], count);
                perf_series_add(&ser[i], v);
                printf("RUN %s impl=%s run=%d allocs_per_msg=%.4g\n", keys, impl_names[i], r, v);
            }
        for (int i = 0; i < A__N; i++)
            perf_report(keys, impl_names[i], "allocs_per_msg", "allocs/msg", &ser[i]);
    }
    return 0;
}
