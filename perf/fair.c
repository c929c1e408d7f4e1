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
 * Modes
 *   fair [--full] [--runs N] [--transports inproc,tcp] [--impls ..] [--quiet Q]
 *       the comparison: feeder threads and reactor in one process
 *   fair --feed-only FIRE_EP QUIET_EP --shm PATH [--quiet Q]
 *       the same two feeder threads in their own process: connect to the
 *       endpoints, feed until stdin reaches end of file
 *   fair --react-only FIRE_EP QUIET_EP --shm PATH --impl raw|zev|zloop [--quiet Q]
 *       one reactor in its own process: binds both endpoints, prints READY,
 *       handles Q quiet messages, prints a SAMPLE line with the metrics
 *       (or a FAIL line); perf/pyzmq_fair.py runs these and its PyZMQ row
 * Across processes the receiver's handled count lives in the file PATH,
 * mapped shared by both processes: a native 8-byte long at offset 0 (the
 * file must hold at least that and start zeroed), stored by the reactor
 * after every firehose message and read by the quiet feeder, exactly as the
 * in-process count is; pyzmq_fair.py's Python reactor stores it as struct
 * "q".
 */
#include "common.h"

#include <zev.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
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
    /* Firehose messages the receiver has handled: written by the receiver
     * only, read by the quiet feeder. Points at own_count when both run in
     * this process, into the shared file when they do not. */
    atomic_long *fire_handled;
    atomic_long own_count;
    atomic_int stop; /* firehose and quiet threads end */
    pthread_t feeders[2];
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
    while (atomic_load(b->fire_handled) < 5000 && !atomic_load(&b->stop))
        usleep(1000);
    unsigned char buf[MSG_SIZE];
    perf_fill(buf, sizeof buf);
    for (long i = 0; i < b->quiet_total && !atomic_load(&b->stop); i++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        quiet_msg_t q = {perf_now_ns(), atomic_load(b->fire_handled)};
        memcpy(buf, &q, sizeof q);
        zmq_send(push, buf, sizeof buf, 0);
    }
    zmq_close(push);
    return NULL;
}

static int feeders_start(bench_t *b)
{
    if (pthread_create(&b->feeders[0], NULL, firehose_main, b) != 0)
        return -1;
    if (pthread_create(&b->feeders[1], NULL, quiet_main, b) != 0) {
        atomic_store(&b->stop, 1);
        pthread_join(b->feeders[0], NULL);
        return -1;
    }
    return 0;
}

static void feeders_stop(bench_t *b)
{
    atomic_store(&b->stop, 1);
    pthread_join(b->feeders[0], NULL);
    pthread_join(b->feeders[1], NULL);
}

/* ------------------------------------------------------------ receiver side */

/* Returns 1 when the run is over (all quiet messages, or the deadline). */
static int on_fire(bench_t *b)
{
    long n = atomic_load_explicit(b->fire_handled, memory_order_relaxed) + 1;
    atomic_store_explicit(b->fire_handled, n, memory_order_relaxed);
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
    long fire = atomic_load_explicit(b->fire_handled, memory_order_relaxed);
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

static int react(bench_t *b, int impl, void *fire, void *quiet)
{
    switch (impl) {
    case F_RAW:
        return recv_raw(b, fire, quiet);
    case F_ZEV:
        return recv_zev(b, fire, quiet);
#ifdef PERF_HAVE_CZMQ
    case F_ZLOOP:
        return recv_zloop(b, fire, quiet);
#endif
    }
    return -1;
}

/* ------------------------------------------------------------------- a run */

typedef struct result {
    int ok;
    double v[7];
    const char *why;
} result_t;

static const char *const metrics[7] = {"delay_p50_us", "delay_p99_us", "delay_max_us", "msgs_p50",
                                       "msgs_p99",     "msgs_max",     "fire_rate"};
static const char *const units[7] = {"us", "us", "us", "msgs", "msgs", "msgs", "msg/s"};

/* Terminates the context: close the sockets first. */
static void bench_free(bench_t *b)
{
    if (b->ctx)
        zmq_ctx_term(b->ctx);
    free(b->delay_ns);
    free(b->delay_msgs);
    free(b);
}

/* shared is the receiver's count in a shared file, NULL within a process. */
static bench_t *bench_new(long quiet_total, atomic_long *shared)
{
    bench_t *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->ctx = zmq_ctx_new();
    b->quiet_total = quiet_total;
    b->delay_ns = calloc((size_t)quiet_total, sizeof *b->delay_ns);
    b->delay_msgs = calloc((size_t)quiet_total, sizeof *b->delay_msgs);
    b->deadline = perf_now_ns() + DEADLINE_NS;
    atomic_init(&b->own_count, 0);
    b->fire_handled = shared ? shared : &b->own_count;
    atomic_init(&b->stop, 0);
    if (!b->ctx || !b->delay_ns || !b->delay_msgs) {
        bench_free(b);
        return NULL;
    }
    return b;
}

static void *open_pull(bench_t *b)
{
    void *s = zmq_socket(b->ctx, ZMQ_PULL);
    int zero = 0;
    if (s)
        zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    return s;
}

/* The metrics of a finished reactor run (rc is react()'s). */
static result_t summarize(bench_t *b, int rc)
{
    result_t r = {.ok = 0, .why = "recv_error"};
    long n = b->quiet_total;
    if (b->failed) {
        r.why = "timeout";
        return r;
    }
    if (rc != 0 || b->quiet_got != n)
        return r;
    uint64_t *d = b->delay_ns;
    uint64_t *m = calloc((size_t)n, sizeof *m);
    if (!m)
        return r;
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
    return r;
}

/* The rest of a RUN or SAMPLE line: one run's metrics. */
static void print_values(const result_t *r, int digits)
{
    printf(" delay_p50_us=%.*g delay_p99_us=%.*g delay_max_us=%.*g msgs_p50=%.0f msgs_p99=%.0f "
           "msgs_max=%.0f fire_rate=%.*g\n",
           digits, r->v[0], digits, r->v[1], digits, r->v[2], r->v[3], r->v[4], r->v[5], digits,
           r->v[6]);
}

/* Feeders and reactor in this process. */
static result_t run_once(int impl, const char *transport, long quiet_total)
{
    result_t r = {.ok = 0, .why = "setup"};
    bench_t *b = bench_new(quiet_total, NULL);
    if (!b)
        return r;
    void *fire = open_pull(b), *quiet = open_pull(b);
    if (perf_bind(fire, transport, "fire", b->fire_ep, sizeof b->fire_ep) == 0 &&
        perf_bind(quiet, transport, "quiet", b->quiet_ep, sizeof b->quiet_ep) == 0) {
        if (feeders_start(b) == 0) {
            int rc = react(b, impl, fire, quiet);
            feeders_stop(b);
            r = summarize(b, rc);
        } else {
            r.why = "threads";
        }
    } else {
        r.why = "bind";
    }
    zmq_close(fire);
    zmq_close(quiet);
    perf_unlink_ep(b->fire_ep);
    perf_unlink_ep(b->quiet_ep);
    bench_free(b);
    return r;
}

/* ------------------------------------------------- across processes (modes) */

/* Maps the receiver's count from the file at path (see the top comment). */
static atomic_long *map_count(const char *path)
{
    _Static_assert(ATOMIC_LONG_LOCK_FREE == 2 && sizeof(long) == 8,
                   "the shared count must be a lock-free 8-byte long");
    int fd = open(path, O_RDWR);
    if (fd < 0)
        return NULL;
    struct stat st;
    void *p = MAP_FAILED;
    /* A file shorter than the count would turn the first access into SIGBUS. */
    if (fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof(atomic_long))
        p = mmap(NULL, sizeof(atomic_long), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

static void unmap_count(atomic_long *count)
{
    if (count)
        munmap(count, sizeof *count);
}

/* The k-th argument after option name (the endpoints of the two modes);
 * NULL if absent or if it is the next option. */
static const char *arg_after(const perf_args_t *a, const char *name, int k)
{
    for (int i = 1; i + k < a->argc; i++)
        if (strcmp(a->argv[i], name) == 0)
            return strncmp(a->argv[i + k], "--", 2) == 0 ? NULL : a->argv[i + k];
    return NULL;
}

static long quiet_count(const perf_args_t *a)
{
    long n = perf_opt_long(a, "--quiet", a->full ? 2000 : 200);
    return n < 1 ? 1 : n;
}

static int impl_from_name(const char *name)
{
    for (int i = 0; i < F__N; i++)
        if (name && strcmp(name, impl_names[i]) == 0)
            return i;
    return -1;
}

static int mode_feed_only(const perf_args_t *a)
{
    const char *fire_ep = arg_after(a, "--feed-only", 1),
               *quiet_ep = arg_after(a, "--feed-only", 2);
    const char *path = perf_opt_str(a, "--shm", "");
    atomic_long *count = map_count(path);
    bench_t *b = count && fire_ep && quiet_ep ? bench_new(quiet_count(a), count) : NULL;
    int rc = -1;
    if (b) {
        snprintf(b->fire_ep, sizeof b->fire_ep, "%s", fire_ep);
        snprintf(b->quiet_ep, sizeof b->quiet_ep, "%s", quiet_ep);
        rc = feeders_start(b);
    }
    if (rc == 0) {
        /* Feed until the parent closes stdin: it knows when the reactor is
         * done (and a parent that dies closes it too). */
        char buf[64];
        while (read(0, buf, sizeof buf) > 0)
            ;
        feeders_stop(b);
    } else {
        fprintf(stderr, "fair: --feed-only FIRE_EP QUIET_EP --shm PATH: cannot start (%s)\n",
                count ? "endpoints or threads" : "shm");
    }
    if (b)
        bench_free(b);
    unmap_count(count);
    return rc == 0 ? 0 : 1;
}

static int mode_react_only(const perf_args_t *a)
{
    const char *fire_ep = arg_after(a, "--react-only", 1),
               *quiet_ep = arg_after(a, "--react-only", 2);
    const char *name = perf_opt_str(a, "--impl", "raw");
    int impl = impl_from_name(name);
    if (impl < 0 || !fire_ep || !quiet_ep) {
        fprintf(stderr, "fair: --react-only FIRE_EP QUIET_EP --shm PATH --impl raw|zev|zloop\n");
        return 2;
    }
#ifndef PERF_HAVE_CZMQ
    if (impl == F_ZLOOP) {
        printf("FAIL bench=fair impl=zloop reason=czmq_not_available\n");
        return 1;
    }
#endif
    atomic_long *count = map_count(perf_opt_str(a, "--shm", ""));
    bench_t *b = count ? bench_new(quiet_count(a), count) : NULL;
    if (!b) {
        printf("FAIL bench=fair impl=%s reason=shm\n", name);
        unmap_count(count);
        return 1;
    }
    result_t r = {.ok = 0, .why = "bind"};
    void *fire = open_pull(b), *quiet = open_pull(b);
    if (zmq_bind(fire, fire_ep) == 0 && zmq_bind(quiet, quiet_ep) == 0) {
        printf("READY\n");
        fflush(stdout);
        r = summarize(b, react(b, impl, fire, quiet));
    }
    if (r.ok) {
        printf("SAMPLE bench=fair impl=%s", name);
        print_values(&r, 6);
    } else {
        printf("FAIL bench=fair impl=%s reason=%s\n", name, r.why);
    }
    fflush(stdout);
    zmq_close(fire);
    zmq_close(quiet);
    perf_unlink_ep(fire_ep);
    perf_unlink_ep(quiet_ep);
    bench_free(b);
    unmap_count(count);
    return r.ok ? 0 : 1;
}

/* ------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    if (perf_opt_str(&a, "--feed-only", NULL))
        return mode_feed_only(&a);
    if (perf_opt_str(&a, "--react-only", NULL))
        return mode_react_only(&a);
    perf_banner("fair", &a);
    long quiet_total = quiet_count(&a);
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
                if (res.ok) {
                    printf("RUN %s impl=%s run=%d", keys, impl_names[i], r);
                    print_values(&res, 4);
                } else {
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
                med[i][k] = on[i]
                                ? perf_report(keys, impl_names[i], metrics[k], units[k], &ser[i][k])
                                : NAN;
        for (int k = 0; k < 7; k++) {
            perf_ratio(keys, metrics[k], "zev", med[F_ZEV][k], "raw", med[F_RAW][k]);
            perf_ratio(keys, metrics[k], "zev", med[F_ZEV][k], "zloop", med[F_ZLOOP][k]);
        }
    }
    return fails ? 1 : 0;
}
