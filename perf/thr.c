/*
 * thr: PUSH -> PULL throughput, one receiver implementation at a time, all
 * fed by the same sender code (perf_sender_main, perf/common.c).
 *
 * Receivers (impl=):
 *   raw           blocking zmq_msg_recv loop: the ceiling
 *   zev_borrowed  zev stream, frames borrowed during on_recv
 *   zev_kept      zev stream, each frame kept (zev_msg_keep) and released
 *   zev_copy      zev stream, each frame copied out into a user buffer
 *   zloop         CZMQ zloop_poller, one zmq_msg_recv per readiness callback
 *                 (the usual zloop handler shape)
 *   zev_fiber     a zev fiber calling zev_fiber_recv in a loop (borrowed frames).
 *                 Not in the comparison unless --impls names it: perf/fiber.c
 *                 compares fibers with streams; this row is for
 *                 perf/instructions.py and perf/pyzmq_green.py (--recv-only).
 * Every receiver touches the payload (first byte) so none of them is skipped.
 * The clock runs from the first message received to the last; receiver CPU
 * time (CLOCK_THREAD_CPUTIME_ID) over the same span gives ns per message.
 *
 * Modes
 *   thr [--full] [--runs N] [--transports inproc,ipc,tcp] [--sizes 64,1024,65536]
 *       [--impls raw,zev_borrowed,...] [--count N] [--backend NAME] [--batch N] [--timing]
 *       the comparison: per transport and size, `runs` rounds, each round
 *       runs every receiver once (interleaved, so drift hits all alike);
 *       prints RUN, RESULT (median, min, max) and RATIO lines.
 *   thr --once --impl I --transport T --size S --count N
 *       one in-process run (for hyperfine's whole-process timing)
 *   thr --send-only EP --size S --count N [--hold-stdin]
 *       the same sender code in its own process (feeds perf/pyzmq_thr.py);
 *       with --hold-stdin it stays connected until its stdin is closed
 *   thr --recv-only EP --impl I --size S --count N
 *       binds EP, prints READY, receives N messages, prints a SAMPLE line
 *
 * A receiver that makes no progress for 5 s (10 s before the first message)
 * is woken by a watchdog with an empty message and the run is reported as
 * failed (FAIL line, empty cell) instead of hanging.
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

enum { R_RAW, R_ZEV_BORROWED, R_ZEV_KEPT, R_ZEV_COPY, R_ZLOOP, R_ZEV_FIBER, R__N };
static const char *const impl_names[R__N] = {"raw",   "zev_borrowed", "zev_kept", "zev_copy",
                                             "zloop", "zev_fiber"};

static const char *backend_name; /* --backend, NULL = zev's default */
static unsigned batch;           /* --batch, 0 = zev's default (64) */
static int timing;               /* --timing: zev_loop_set_timing on (what it costs) */

/* ---------------------------------------------------------------- receivers */

typedef struct rx {
    long count;
    long got;
    atomic_long progress; /* read by the watchdog */
    int poisoned;
    uint64_t sum;
    perf_marks_t marks;
    unsigned char *copybuf;
    zev_loop_t *loop;
} rx_t;

/* Called once per message with its first byte. Returns 1 when done. */
static inline int tick(rx_t *rx, const unsigned char *data, size_t size)
{
    if (size == 0) { /* the watchdog's poison */
        rx->poisoned = 1;
        return 1;
    }
    rx->sum += data[0];
    long g = ++rx->got;
    atomic_store_explicit(&rx->progress, g, memory_order_relaxed);
    return perf_marks_tick(&rx->marks, g, rx->count);
}

static int recv_raw(void *pull, rx_t *rx)
{
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    for (;;) {
        if (zmq_msg_recv(&msg, pull, 0) < 0) {
            zmq_msg_close(&msg);
            return -1;
        }
        if (tick(rx, zmq_msg_data(&msg), zmq_msg_size(&msg)))
            break;
    }
    zmq_msg_close(&msg);
    return 0;
}

static void on_borrowed(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *rx = arg;
    if (tick(rx, zev_msg_data(m, 0), zev_msg_size(m, 0)))
        zev_loop_stop(rx->loop);
}

static void on_kept(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *rx = arg;
    zev_frame_t *f = zev_msg_keep(m, 0);
    if (!f) {
        rx->poisoned = 1;
        zev_loop_stop(rx->loop);
        return;
    }
    int done = tick(rx, zev_frame_data(f), zev_frame_size(f));
    zev_frame_release(f);
    if (done)
        zev_loop_stop(rx->loop);
}

static void on_copy(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *rx = arg;
    size_t size = zev_msg_size(m, 0);
    memcpy(rx->copybuf, zev_msg_data(m, 0), size);
    if (tick(rx, rx->copybuf, size))
        zev_loop_stop(rx->loop);
}

/* The fiber receiver: blocking-style code on the loop. */
typedef struct fiber_rx {
    rx_t *rx;
    zev_stream_t *s;
    int rc;
} fiber_rx_t;

static void fiber_recv_main(void *arg)
{
    fiber_rx_t *fr = arg;
    zev_msg_t *m;
    fr->rc = -1;
    while (zev_fiber_recv(fr->s, &m, -1) == 0)
        if (tick(fr->rx, zev_msg_data(m, 0), zev_msg_size(m, 0))) {
            fr->rc = 0;
            break;
        }
    zev_loop_stop(fr->rx->loop);
}

static int recv_zev(void *pull, rx_t *rx, int impl)
{
    zev_loop_opts_t o = {.backend = backend_name, .batch = batch};
    rx->loop = zev_loop_new(&o);
    if (!rx->loop)
        return -1;
    if (timing)
        zev_loop_set_timing(rx->loop, 1);
    zev_stream_t *s = zev_stream_new(rx->loop, pull);
    if (!s) {
        zev_loop_destroy(rx->loop);
        return -1;
    }
    fiber_rx_t fr = {.rx = rx, .s = s, .rc = -1};
    zev_fiber_t *f = NULL;
    if (impl == R_ZEV_FIBER) {
        if (!(f = zev_fiber_spawn(rx->loop, fiber_recv_main, &fr, NULL))) {
            zev_stream_close(s, 0);
            zev_loop_destroy(rx->loop);
            return -1;
        }
        zev_fiber_detach(f);
    } else {
        zev_recv_fn fn =
            impl == R_ZEV_KEPT ? on_kept : impl == R_ZEV_COPY ? on_copy : on_borrowed;
        zev_stream_on_recv(s, fn, rx);
    }
    int rc = zev_loop_run(rx->loop);
    if (f && rc == 0)
        rc = fr.rc;
    zev_stream_close(s, 0);
    zev_loop_destroy(rx->loop);
    rx->loop = NULL;
    return rc;
}

#ifdef PERF_HAVE_CZMQ
typedef struct zl_rx {
    rx_t *rx;
    zmq_msg_t msg;
} zl_rx_t;

static int on_zloop(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop;
    zl_rx_t *z = arg;
    if (zmq_msg_recv(&z->msg, item->socket, ZMQ_DONTWAIT) < 0)
        return 0;
    return tick(z->rx, zmq_msg_data(&z->msg), zmq_msg_size(&z->msg)) ? -1 : 0;
}

static int recv_zloop(void *pull, rx_t *rx)
{
    zloop_t *loop = zloop_new();
    if (!loop)
        return -1;
    zl_rx_t z = {.rx = rx};
    zmq_msg_init(&z.msg);
    zmq_pollitem_t item = {pull, 0, ZMQ_POLLIN, 0};
    int rc = zloop_poller(loop, &item, on_zloop, &z);
    if (rc == 0)
        zloop_start(loop);
    zloop_destroy(&loop);
    zmq_msg_close(&z.msg);
    return rc;
}
#endif

/* --------------------------------------------------------------- watchdog */

/* What the watchdog of a receive needs: a stuck receiver is woken with the
 * empty poison message. */
typedef struct stall {
    void *ctx;
    const char *ep;
    rx_t *rx;
} stall_t;

static long rx_progress(void *arg, int *started)
{
    const stall_t *st = arg;
    long p = atomic_load_explicit(&st->rx->progress, memory_order_relaxed);
    *started = p > 0;
    return p;
}

static void rx_poison(void *arg)
{
    const stall_t *st = arg;
    void *s = zmq_socket(st->ctx, ZMQ_PUSH);
    int linger = 1000;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(s, st->ep);
    zmq_send(s, "", 0, 0);
    zmq_close(s);
}

/* One receive of rx->count messages with the given impl on a bound PULL. */
typedef perf_sample_t sample_t;

static sample_t receive(int impl, void *ctx, void *pull, const char *ep, long count, size_t size)
{
    sample_t out = {0, NAN, NAN, "setup"};
    rx_t *rx = calloc(1, sizeof *rx);
    rx->count = count;
    rx->copybuf = malloc(size ? size : 1);
    stall_t st = {.ctx = ctx, .ep = ep, .rx = rx};
    perf_watchdog_t w;
    atomic_init(&rx->progress, 0);
    perf_watchdog_start(&w, rx_progress, rx_poison, &st);

    int rc = -1;
    switch (impl) {
    case R_RAW:
        rc = recv_raw(pull, rx);
        break;
    case R_ZEV_BORROWED:
    case R_ZEV_KEPT:
    case R_ZEV_COPY:
    case R_ZEV_FIBER:
        rc = recv_zev(pull, rx, impl);
        break;
#ifdef PERF_HAVE_CZMQ
    case R_ZLOOP:
        rc = recv_zloop(pull, rx);
        break;
#endif
    default:
        out.why = "not_built";
        break;
    }
    perf_watchdog_stop(&w);

    if (rx->poisoned) {
        out.why = "stalled";
        fprintf(stderr, "thr: %s stalled after %ld of %ld messages\n", impl_names[impl], rx->got,
                count);
    } else if (rc == 0 && rx->got == count && count > 1) {
        perf_marks_sample(&rx->marks, count, &out);
    } else if (rc != 0 && out.why && strcmp(out.why, "setup") == 0)
        out.why = "recv_error";
    free(rx->copybuf);
    free(rx);
    return out;
}

/* A complete in-process run: fresh context, bind, sender thread, receive. */
static sample_t run_once(int impl, const char *transport, size_t size, long count)
{
    sample_t out = {0, NAN, NAN, "setup"};
    void *ctx = zmq_ctx_new();
    void *pull = zmq_socket(ctx, ZMQ_PULL);
    char ep[256];
    if (perf_bind(pull, transport, "thr", ep, sizeof ep) < 0) {
        zmq_close(pull);
        zmq_ctx_term(ctx);
        out.why = "bind";
        return out;
    }
    atomic_int hold;
    atomic_init(&hold, 1);
    perf_sender_t snd = {.ctx = ctx, .ep = ep, .size = size, .count = count, .hold = &hold};
    pthread_t th;
    pthread_create(&th, NULL, perf_sender_main, &snd);
    out = receive(impl, ctx, pull, ep, count, size);
    atomic_store(&hold, 0);
    if (!out.ok) {
        /* The sender may be stuck on a full pipe: drop what is queued. */
        int zero = 0;
        zmq_setsockopt(pull, ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(pull);
        pull = NULL;
        zmq_ctx_shutdown(ctx);
    }
    pthread_join(th, NULL);
    if (pull)
        zmq_close(pull);
    zmq_ctx_term(ctx);
    perf_unlink_ep(ep);
    return out;
}

/* ------------------------------------------------------------------- modes */

static int impl_from_name(const char *name)
{
    for (int i = 0; i < R__N; i++)
        if (name && strcmp(name, impl_names[i]) == 0)
            return i;
    return -1;
}

/* The case perf_rate_rows runs the rows of. */
typedef struct row {
    const char *transport;
    size_t size;
    long count;
} row_t;

static sample_t run_row(int impl, void *arg)
{
    const row_t *r = arg;
    return run_once(impl, r->transport, r->size, r->count);
}

static void print_sample(const char *impl, size_t size, sample_t s)
{
    if (s.ok)
        printf("SAMPLE bench=thr impl=%s size=%zu msgs_per_s=%.6g rx_cpu_ns=%.6g\n", impl, size,
               s.msgs_per_s, s.cpu_ns);
    else
        printf("FAIL bench=thr impl=%s size=%zu reason=%s\n", impl, size, s.why);
    fflush(stdout);
}

static int mode_send_only(const perf_args_t *a)
{
    perf_sender_t snd = {.ctx = zmq_ctx_new(),
                    .ep = perf_opt_str(a, "--send-only", ""),
                    .size = (size_t)perf_opt_long(a, "--size", 64),
                    .count = perf_opt_long(a, "--count", 100000),
                    .hold_stdin = perf_flag(a, "--hold-stdin")};
    perf_sender_main(&snd);
    zmq_ctx_term(snd.ctx);
    return snd.rc == 0 ? 0 : 1;
}

static int mode_recv_only(const perf_args_t *a)
{
    const char *ep = perf_opt_str(a, "--recv-only", "");
    const char *name = perf_opt_str(a, "--impl", "raw");
    int impl = impl_from_name(name);
    size_t size = (size_t)perf_opt_long(a, "--size", 64);
    long count = perf_opt_long(a, "--count", 100000);
    if (impl < 0) {
        fprintf(stderr, "thr: unknown impl %s\n", name);
        return 2;
    }
    void *ctx = zmq_ctx_new();
    void *pull = zmq_socket(ctx, ZMQ_PULL);
    if (zmq_bind(pull, ep) < 0) {
        printf("FAIL bench=thr impl=%s size=%zu reason=bind\n", name, size);
        return 1;
    }
    printf("READY\n");
    fflush(stdout);
    sample_t s = receive(impl, ctx, pull, ep, count, size);
    print_sample(name, size, s);
    int zero = 0;
    zmq_setsockopt(pull, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(pull);
    zmq_ctx_term(ctx);
    perf_unlink_ep(ep);
    return s.ok ? 0 : 1;
}

static int mode_once(const perf_args_t *a)
{
    const char *name = perf_opt_str(a, "--impl", "raw");
    int impl = impl_from_name(name);
    if (impl < 0) {
        fprintf(stderr, "thr: unknown impl %s\n", name);
        return 2;
    }
    size_t size = (size_t)perf_opt_long(a, "--size", 64);
    sample_t s = run_once(impl, perf_opt_str(a, "--transport", "inproc"), size,
                          perf_opt_long(a, "--count", 1000000));
    print_sample(name, size, s);
    return s.ok ? 0 : 1;
}

static long default_count(size_t size, int full)
{
    /* Quick mode still moves enough for a run to last 0.1-0.3 s: shorter runs
     * measured thread start-up and scheduling more than the receive loop. */
    long n = size <= 64 ? 300000 : size <= 1024 ? 60000 : size <= 16384 ? 10000 : 3000;
    return full ? n * 10 : n;
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    backend_name = perf_opt_str(&a, "--backend", NULL);
    batch = (unsigned)perf_opt_long(&a, "--batch", 0);
    timing = perf_flag(&a, "--timing");
    if (perf_opt_str(&a, "--send-only", NULL))
        return mode_send_only(&a);
    if (perf_opt_str(&a, "--recv-only", NULL))
        return mode_recv_only(&a);
    if (perf_flag(&a, "--once"))
        return mode_once(&a);

    perf_banner("thr", &a);
    static const char *const transports[] = {"inproc", "ipc", "tcp"};
    static const size_t sizes[] = {64, 1024, 65536};
    int fails = 0;
    for (size_t t = 0; t < 3; t++) {
        if (!perf_selected(&a, "--transports", transports[t]))
            continue;
        for (size_t z = 0; z < 3; z++) {
            char sz[32];
            snprintf(sz, sizeof sz, "%zu", sizes[z]);
            if (!perf_selected(&a, "--sizes", sz))
                continue;
            long count = perf_opt_long(&a, "--count", default_count(sizes[z], a.full));
            char keys[128];
            snprintf(keys, sizeof keys, "bench=thr transport=%s size=%zu", transports[t], sizes[z]);
            int on[R__N];
            for (int i = 0; i < R__N; i++)
                on[i] = perf_selected(&a, "--impls", impl_names[i]);
            /* perf/fiber.c compares fibers with streams; here only if asked */
            on[R_ZEV_FIBER] = perf_in_list(perf_opt_str(&a, "--impls", ""), "zev_fiber");
#ifndef PERF_HAVE_CZMQ
            if (on[R_ZLOOP]) {
                printf("FAIL %s impl=zloop metric=msgs_per_s reason=czmq_not_available\n", keys);
                on[R_ZLOOP] = 0;
            }
#endif
            row_t row = {transports[t], sizes[z], count};
            double med[R__N], cmed[R__N];
            fails += perf_rate_rows(keys, "rx_cpu_ns", R__N, impl_names, on, a.runs, count, run_row,
                                    &row, med, cmed);
            for (int i = R_ZEV_BORROWED; i <= R_ZEV_COPY; i++) {
                perf_ratio(keys, "msgs_per_s", impl_names[i], med[i], "raw", med[R_RAW]);
                perf_ratio(keys, "msgs_per_s", impl_names[i], med[i], "zloop", med[R_ZLOOP]);
                perf_ratio(keys, "rx_cpu_ns", impl_names[i], cmed[i], "raw", cmed[R_RAW]);
            }
            perf_ratio(keys, "msgs_per_s", "zloop", med[R_ZLOOP], "raw", med[R_RAW]);
            perf_ratio(keys, "msgs_per_s", "zev_fiber", med[R_ZEV_FIBER], "zev_borrowed",
                       med[R_ZEV_BORROWED]);
        }
    }
    return fails ? 1 : 0;
}
