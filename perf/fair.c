/*
 * fair: how long a quiet socket waits while another socket is flooded.
 *
 * One receiver thread (the reactor under test) reads two PULL sockets:
 * "fire", fed as fast as possible by a firehose thread (64-byte messages,
 * the default HWM keeps ~2,000 queued), and "quiet", fed one message per
 * millisecond by a second thread once the firehose is flowing. Each quiet
 * message carries its send time and the count of firehose messages the
 * receiver had handled at that moment, so on arrival the receiver knows the
 * quiet message's delay in µs and in firehose messages handled meanwhile.
 *
 * Rows (impl=):
 *   raw    zmq_poll over both sockets, one message from each readable
 *          socket per round (the usual hand-written reactor)
 *   zev    two zev streams, the loop's default batch (64 per stream per
 *          iteration)
 *   zloop  CZMQ, two zloop_pollers, one message per readiness callback
 * Metrics: delay_p50_us, delay_p99_us, delay_max_us, msgs_p50, msgs_p99,
 * msgs_max, and fire_rate (firehose messages handled per second meanwhile,
 * so fairness bought by starving the firehose shows).
 *
 * fair [--full] [--runs N] [--transports inproc,tcp] [--impls ..] [--quiet Q]
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
#include <time.h>
#include <unistd.h>
#ifdef PERF_HAVE_CZMQ
#include <czmq.h>
#endif

#define MSG_SIZE 64
#define DEADLINE_NS 30000000000ull

enum { F_RAW, F_ZEV, F_ZLOOP, F__N };
static const char *const impl_names[F__N] = {"raw", "zev", "zloop"};

typedef struct quiet_msg {
    uint64_t sent_ns;
    long fire_seen;
} quiet_msg_t;

typedef struct bench {
    void *ctx;
    char fire_ep[256], quiet_ep[256];
    long quiet_total;
    atomic_long fire_handled; /* written by the receiver only */
    atomic_int stop;          /* firehose and quiet threads end */
    /* receiver state */
    long quiet_got;
    uint64_t *delay_ns;
    long *delay_msgs;
    uint64_t t_first_quiet, t_last_quiet;
    long fire_at_first, fire_at_last;
    uint64_t deadline;
    int failed;
    zev_loop_t *loop;
} bench_t;

/* ------------------------------------------------------------------ feeders */

static void *firehose_main(void *arg)
{
    bench_t *b = arg;
    void *push = zmq_socket(b->ctx, ZMQ_PUSH);
    int to = 100, zero = 0;
    zmq_setsockopt(push, ZMQ_SNDTIMEO, &to, sizeof to);
    zmq_setsockopt(push, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(push, b->fire_ep);
    unsigned char buf[MSG_SIZE];
    perf_fill(buf, sizeof buf);
    while (!atomic_load_explicit(&b->stop, memory_order_relaxed))
        zmq_send(push, buf, sizeof buf, 0);
    zmq_close(push);
    return NULL;
}

static void *quiet_main(void *arg)
{
    bench_t *b = arg;
    void *push = zmq_socket(b->ctx, ZMQ_PUSH);
    int zero = 0;
    zmq_setsockopt(push, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(push, b->quiet_ep);
    /* Start once the firehose is flowing (its queue full). */
    while (atomic_load(&b->fire_handled) < 5000 && !atomic_load(&b->stop))
        usleep(1000);
    unsigned char buf[MSG_SIZE];
    perf_fill(buf, sizeof buf);
    for (long i = 0; i < b->quiet_total && !atomic_load(&b->stop); i++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        quiet_msg_t q = {perf_now_ns(), atomic_load(&b->fire_handled)};
        memcpy(buf, &q, sizeof q);
        zmq_send(push, buf, sizeof buf, 0);
    }
    zmq_close(push);
    return NULL;
}

/* ------------------------------------------------------------ receiver side */

/* Returns 1 when the run is over (all quiet messages, or the deadline). */
static int on_fire(bench_t *b)
{
    long n = atomic_load_explicit(&b->fire_handled, memory_order_relaxed) + 1;
    atomic_store_explicit(&b->fire_handled, n, memory_order_relaxed);
    if ((n & 4095) == 0 && perf_now_ns() > b->deadline) {
        b->failed = 1;
        return 1;
    }
    return 0;
}

static int on_quiet(bench_t *b, const void *data, size_t size)
{
    uint64_t now = perf_now_ns();
    if (size < sizeof(quiet_msg_t))
        return 0;
    quiet_msg_t q;
    memcpy(&q, data, sizeof q);
    long fire = atomic_load_explicit(&b->fire_handled, memory_order_relaxed);
    long i = b->quiet_got++;
    b->delay_ns[i] = now - q.sent_ns;
    b->delay_msgs[i] = fire - q.fire_seen;
    if (i == 0) {
        b->t_first_quiet = now;
        b->fire_at_first = fire;
    }
    if (b->quiet_got == b->quiet_total) {
        b->t_last_quiet = now;
        b->fire_at_last = fire;
        return 1;
    }
    return 0;
}

static int recv_raw(bench_t *b, void *fire, void *quiet)
{
    zmq_pollitem_t items[2] = {{fire, 0, ZMQ_POLLIN, 0}, {quiet, 0, ZMQ_POLLIN, 0}};
    zmq_msg_t m;
    zmq_msg_init(&m);
    int done = 0;
    while (!done) {
        if (zmq_poll(items, 2, 1000) < 0)
            break;
        if (perf_now_ns() > b->deadline) {
            b->failed = 1;
            break;
        }
        if ((items[0].revents & ZMQ_POLLIN) && zmq_msg_recv(&m, fire, ZMQ_DONTWAIT) >= 0)
            done |= on_fire(b);
        if ((items[1].revents & ZMQ_POLLIN) && zmq_msg_recv(&m, quiet, ZMQ_DONTWAIT) >= 0)
            done |= on_quiet(b, zmq_msg_data(&m), zmq_msg_size(&m));
    }
    zmq_msg_close(&m);
    return 0;
}

static void zev_on_fire(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s, (void)m;
    bench_t *b = arg;
    if (on_fire(b))
        zev_loop_stop(b->loop);
}

static void zev_on_quiet(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    bench_t *b = arg;
    if (on_quiet(b, zev_msg_data(m, 0), zev_msg_size(m, 0)))
        zev_loop_stop(b->loop);
}

static void zev_deadline(zev_timer_t *t, void *arg)
{
    (void)t;
    bench_t *b = arg;
    b->failed = 1;
    zev_loop_stop(b->loop);
}

static int recv_zev(bench_t *b, void *fire, void *quiet)
{
    b->loop = zev_loop_new(NULL);
    if (!b->loop)
        return -1;
    zev_stream_t *sf = zev_stream_new(b->loop, fire);
    zev_stream_t *sq = zev_stream_new(b->loop, quiet);
    int rc = -1;
    if (sf && sq) {
        zev_stream_on_recv(sf, zev_on_fire, b);
        zev_stream_on_recv(sq, zev_on_quiet, b);
        zev_timer_start(b->loop, (b->deadline - perf_now_ns()) / 1000u, 0, zev_deadline, b);
        rc = zev_loop_run(b->loop);
    }
    if (sf)
        zev_stream_close(sf, 0);
    if (sq)
        zev_stream_close(sq, 0);
    zev_loop_destroy(b->loop);
    b->loop = NULL;
    return rc;
}

#ifdef PERF_HAVE_CZMQ
static int zl_on_fire(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop;
    zmq_msg_t m;
    zmq_msg_init(&m);
    int rc = zmq_msg_recv(&m, item->socket, ZMQ_DONTWAIT);
    zmq_msg_close(&m);
    return rc >= 0 && on_fire(arg) ? -1 : 0;
}

static int zl_on_quiet(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void)loop;
    zmq_msg_t m;
    zmq_msg_init(&m);
    int done = 0;
    if (zmq_msg_recv(&m, item->socket, ZMQ_DONTWAIT) >= 0)
        done = on_quiet(arg, zmq_msg_data(&m), zmq_msg_size(&m));
    zmq_msg_close(&m);
    return done ? -1 : 0;
}

static int recv_zloop(bench_t *b, void *fire, void *quiet)
{
    zloop_t *loop = zloop_new();
    if (!loop)
        return -1;
    zmq_pollitem_t f = {fire, 0, ZMQ_POLLIN, 0}, q = {quiet, 0, ZMQ_POLLIN, 0};
    int rc = -1;
    if (zloop_poller(loop, &f, zl_on_fire, b) == 0 && zloop_poller(loop, &q, zl_on_quiet, b) == 0) {
        zloop_start(loop);
        rc = 0;
    }
    zloop_destroy(&loop);
    return rc;
}
#endif

/* ------------------------------------------------------------------- a run */

typedef struct result {
    int ok;
    double v[7];
    const char *why;
} result_t;

static const char *const metrics[7] = {"delay_p50_us", "delay_p99_us", "delay_max_us", "msgs_p50",
                                       "msgs_p99",     "msgs_max",     "fire_rate"};
static const char *const units[7] = {"us", "us", "us", "msgs", "msgs", "msgs", "msg/s"};

static result_t run_once(int impl, const char *transport, long quiet_total)
{
    result_t r = {.ok = 0, .why = "setup"};
    bench_t *b = calloc(1, sizeof *b);
    b->ctx = zmq_ctx_new();
    b->quiet_total = quiet_total;
    b->delay_ns = calloc((size_t)quiet_total, sizeof *b->delay_ns);
    b->delay_msgs = calloc((size_t)quiet_total, sizeof *b->delay_msgs);
    b->deadline = perf_now_ns() + DEADLINE_NS;
    atomic_init(&b->fire_handled, 0);
    atomic_init(&b->stop, 0);
    void *fire = zmq_socket(b->ctx, ZMQ_PULL), *quiet = zmq_socket(b->ctx, ZMQ_PULL);
    int zero = 0;
    zmq_setsockopt(fire, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(quiet, ZMQ_LINGER, &zero, sizeof zero);
    if (perf_bind(fire, transport, "fire", b->fire_ep, sizeof b->fire_ep) == 0 &&
        perf_bind(quiet, transport, "quiet", b->quiet_ep, sizeof b->quiet_ep) == 0) {
        pthread_t tf, tq;
        pthread_create(&tf, NULL, firehose_main, b);
        pthread_create(&tq, NULL, quiet_main, b);
        int rc = -1;
        switch (impl) {
        case F_RAW:
            rc = recv_raw(b, fire, quiet);
            break;
        case F_ZEV:
            rc = recv_zev(b, fire, quiet);
            break;
#ifdef PERF_HAVE_CZMQ
        case F_ZLOOP:
            rc = recv_zloop(b, fire, quiet);
            break;
#endif
        }
        atomic_store(&b->stop, 1);
        pthread_join(tf, NULL);
        pthread_join(tq, NULL);
        if (b->failed)
            r.why = "timeout";
        else if (rc == 0 && b->quiet_got == quiet_total) {
            long n = quiet_total;
            uint64_t *d = b->delay_ns;
            uint64_t *m = calloc((size_t)n, sizeof *m);
            for (long i = 0; i < n; i++)
                m[i] = b->delay_msgs[i] < 0 ? 0 : (uint64_t)b->delay_msgs[i];
            perf_sort_u64(d, (size_t)n);
            perf_sort_u64(m, (size_t)n);
            r.ok = 1;
            r.why = NULL;
            r.v[0] = (double)perf_pct(d, (size_t)n, 50) / 1e3;
            r.v[1] = (double)perf_pct(d, (size_t)n, 99) / 1e3;
            r.v[2] = (double)d[n - 1] / 1e3;
            r.v[3] = (double)perf_pct(m, (size_t)n, 50);
            r.v[4] = (double)perf_pct(m, (size_t)n, 99);
            r.v[5] = (double)m[n - 1];
            r.v[6] = b->t_last_quiet > b->t_first_quiet
                         ? (double)(b->fire_at_last - b->fire_at_first) * 1e9 /
                               (double)(b->t_last_quiet - b->t_first_quiet)
                         : NAN;
            free(m);
        } else {
            r.why = "recv_error";
        }
    } else {
        r.why = "bind";
    }
    zmq_close(fire);
    zmq_close(quiet);
    zmq_ctx_term(b->ctx);
    perf_unlink_ep(b->fire_ep);
    perf_unlink_ep(b->quiet_ep);
    free(b->delay_ns);
    free(b->delay_msgs);
    free(b);
    return r;
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    perf_banner("fair", &a);
    long quiet_total = perf_opt_long(&a, "--quiet", a.full ? 2000 : 200);
    printf("INFO fair quiet_messages=%ld interval_ms=1 size=%d\n", quiet_total, MSG_SIZE);
    static const char *const transports[] = {"inproc", "ipc", "tcp"};
    int fails = 0;
    for (size_t t = 0; t < 3; t++) {
        if (!perf_in_list(perf_opt_str(&a, "--transports", a.full ? "inproc,tcp" : "inproc"),
                          transports[t]))
            continue;
        char keys[96];
        snprintf(keys, sizeof keys, "bench=fair transport=%s", transports[t]);
        int on[F__N];
        for (int i = 0; i < F__N; i++)
            on[i] = perf_selected(&a, "--impls", impl_names[i]);
#ifndef PERF_HAVE_CZMQ
        if (on[F_ZLOOP]) {
            printf("FAIL %s impl=zloop metric=delay_p50_us reason=czmq_not_available\n", keys);
            on[F_ZLOOP] = 0;
        }
#endif
        perf_series_t ser[F__N][7];
        memset(ser, 0, sizeof ser);
        for (int r = 0; r < a.runs; r++) {
            for (int i = 0; i < F__N; i++) {
                if (!on[i])
                    continue;
                result_t res = run_once(i, transports[t], quiet_total);
                for (int k = 0; k < 7; k++)
                    perf_series_add(&ser[i][k], res.ok ? res.v[k] : NAN);
                if (res.ok)
                    printf("RUN %s impl=%s run=%d delay_p50_us=%.4g delay_p99_us=%.4g "
                           "delay_max_us=%.4g msgs_p50=%.0f msgs_p99=%.0f msgs_max=%.0f "
                           "fire_rate=%.4g\n",
                           keys, impl_names[i], r, res.v[0], res.v[1], res.v[2], res.v[3],
                           res.v[4], res.v[5], res.v[6]);
                else {
                    printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, impl_names[i], r,
                           res.why);
                    fails++;
                }
                fflush(stdout);
            }
        }
        double med[F__N][7];
        for (int i = 0; i < F__N; i++)
            for (int k = 0; k < 7; k++)
                med[i][k] = on[i] ? perf_report(keys, impl_names[i], metrics[k], units[k], &ser[i][k])
                                  : NAN;
        for (int k = 0; k < 7; k++) {
            perf_ratio(keys, metrics[k], "zev", med[F_ZEV][k], "raw", med[F_RAW][k]);
            perf_ratio(keys, metrics[k], "zev", med[F_ZEV][k], "zloop", med[F_ZLOOP][k]);
        }
    }
    return fails ? 1 : 0;
}
