/*
 * Hostile peers: what one message of many parts costs the receiver.
 *
 * A peer (its own process) sends one message of N empty parts over tcp,
 * then a one-part "end" message. The receiver (another process, so each
 * row's peak RSS is its own) takes them with:
 *   raw            a blocking zmq_msg_recv loop into one zmq_msg_t, holding
 *                  nothing: the floor (libzmq's own buffering)
 *   zev_default    a zev stream with on_recv, max_parts at its default
 *                  (ZEV_MAX_PARTS_DEFAULT, 65,536): longer messages are
 *                  drained and dropped whole
 *   zev_unbounded  the same with max_parts 0: every message is delivered
 *                  whole, received over as many passes as it needs
 * while a 1 ms periodic zev timer runs on the same loop (zev rows).
 * Cases: N = 10,000, 100,000 and 1,000,000 parts.
 * Metrics:
 *   rss_mib   peak RSS minus the RSS before the message (MiB)
 *   stall_ms  the longest time the loop could not run its timer (zev: the
 *             longest gap between ticks, less the 1 ms period; raw: the
 *             whole receive, since nothing else can run meanwhile)
 *   recv_ms   from the first part's arrival to the "end" message
 * The library before issue 16 (no max_parts, no pass budget, no ring
 * shrink) is the zev_unbounded row built against it: perf/RESULTS.md.
 *
 *   hostile [--full] [--runs N] [--parts a,b] [--impls a,b]
 */
#include "common.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zev.h>

typedef struct outcome {
    double rss_mib, stall_ms, recv_ms;
    size_t parts_seen; /* parts of the long message delivered (zev) or read (raw) */
    int ok;
} outcome_t;

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, resident = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2)
            resident = 0;
        fclose(f);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static long peak_kib(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

/* ------------------------------------------------------------ the peer */

static void peer(const char *ep, long parts)
{
    void *ctx = zmq_ctx_new();
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    int hwm = 0;
    zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (zmq_connect(push, ep) != 0)
        _exit(2);
    for (long i = 0; i < parts; i++)
        if (zmq_send(push, NULL, 0, i + 1 < parts ? ZMQ_SNDMORE : 0) < 0)
            _exit(3);
    zmq_send(push, "end", 3, 0);
    int linger = -1;
    zmq_setsockopt(push, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(push);
    zmq_ctx_term(ctx);
    _exit(0);
}

/* ---------------------------------------------------------- the receiver */

typedef struct rx {
    zev_loop_t *loop;
    uint64_t first_ns, end_ns;
    uint64_t last_tick, max_gap;
    size_t parts_seen;
    int done;
} rx_t;

static void on_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    rx_t *r = arg;
    uint64_t now = perf_now_ns();
    if (r->last_tick && now - r->last_tick > r->max_gap)
        r->max_gap = now - r->last_tick;
    r->last_tick = now;
}

static void on_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *r = arg;
    size_t n = zev_msg_parts(m);
    if (n == 1 && zev_msg_size(m, 0) == 3 && !memcmp(zev_msg_data(m, 0), "end", 3)) {
        r->end_ns = perf_now_ns();
        on_tick(NULL, r); /* the pass that ends here kept the timer waiting too */
        r->done = 1;
        zev_loop_stop(r->loop);
        return;
    }
    r->parts_seen = n;
}

static outcome_t receive_zev(void *pull, bool bounded)
{
    outcome_t o = {0};
    rx_t r = {.loop = zev_loop_new(NULL)};
    zev_stream_t *s = zev_stream_new(r.loop, pull);
    if (!r.loop || !s)
        return o;
#ifdef ZEV_MAX_PARTS_DEFAULT
    if (!bounded)
        zev_stream_set_max_parts(s, 0);
#else
    (void)bounded; /* the library before issue 16: no bound */
#endif
    zev_stream_on_recv(s, on_msg, &r);
    zev_timer_start(r.loop, 1000, 1000, on_tick, &r);
    long base = rss_kib();
    /* the first part's arrival: poll the socket raw before the loop runs */
    zmq_pollitem_t it = {.socket = pull, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, 30000) != 1)
        return o;
    r.first_ns = perf_now_ns();
    r.last_tick = r.first_ns;
    zev_loop_run(r.loop);
    if (!r.done)
        return o;
    o.rss_mib = (double)(peak_kib() - base) / 1024.0;
    o.stall_ms = r.max_gap > 1000000 ? (double)(r.max_gap - 1000000) / 1e6 : 0;
    o.recv_ms = (double)(r.end_ns - r.first_ns) / 1e6;
    o.parts_seen = r.parts_seen;
    o.ok = 1;
    zev_loop_destroy(r.loop);
    return o;
}

static outcome_t receive_raw(void *pull)
{
    outcome_t o = {0};
    long base = rss_kib();
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, pull, 0) < 0)
        return o;
    uint64_t t0 = perf_now_ns();
    size_t parts = 1;
    while (zmq_msg_more(&m)) {
        if (zmq_msg_recv(&m, pull, 0) < 0)
            return o;
        parts++;
    }
    if (zmq_msg_recv(&m, pull, 0) != 3) /* "end" */
        return o;
    uint64_t t1 = perf_now_ns();
    zmq_msg_close(&m);
    o.rss_mib = (double)(peak_kib() - base) / 1024.0;
    o.recv_ms = o.stall_ms = (double)(t1 - t0) / 1e6;
    o.parts_seen = parts;
    o.ok = 1;
    return o;
}

/* One run in two fresh processes: the receiver binds and reports its
 * endpoint, the peer sends. The outcome comes back through a pipe. */
static outcome_t run_once(const char *impl, long parts)
{
    outcome_t o = {0};
    int epp[2], resp[2];
    if (pipe(epp) || pipe(resp))
        return o;
    fflush(NULL);
    pid_t rpid = fork();
    if (rpid == 0) {
        close(epp[0]);
        close(resp[0]);
        void *ctx = zmq_ctx_new();
        void *pull = zmq_socket(ctx, ZMQ_PULL);
        int hwm = 0;
        zmq_setsockopt(pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
        char ep[128];
        if (perf_bind(pull, "tcp", "hostile", ep, sizeof ep) != 0)
            _exit(2);
        if (write(epp[1], ep, sizeof ep) != (ssize_t)sizeof ep)
            _exit(2);
        outcome_t r = !strcmp(impl, "raw") ? receive_raw(pull)
                                           : receive_zev(pull, !strcmp(impl, "zev_default"));
        if (write(resp[1], &r, sizeof r) != (ssize_t)sizeof r)
            _exit(2);
        int linger = 0;
        zmq_setsockopt(pull, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(pull);
        zmq_ctx_term(ctx);
        _exit(0);
    }
    close(epp[1]);
    close(resp[1]);
    char ep[128];
    pid_t ppid = -1;
    if (rpid > 0 && read(epp[0], ep, sizeof ep) == (ssize_t)sizeof ep) {
        ppid = fork();
        if (ppid == 0)
            peer(ep, parts);
    }
    if (rpid > 0 && read(resp[0], &o, sizeof o) != (ssize_t)sizeof o)
        o.ok = 0;
    if (ppid > 0)
        waitpid(ppid, NULL, 0);
    if (rpid > 0)
        waitpid(rpid, NULL, 0);
    close(epp[0]);
    close(resp[0]);
    return o;
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 3, 5);
    perf_banner("hostile", &a);
    static const char *const impls[] = {"raw", "zev_default", "zev_unbounded"};
    static const long cases[] = {10000, 100000, 1000000};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char name[32], keys[96];
        snprintf(name, sizeof name, "%ld", cases[c]);
        if (!perf_selected(&a, "--parts", name))
            continue;
        snprintf(keys, sizeof keys, "bench=hostile parts=%ld", cases[c]);
        perf_series_t rss[3], stall[3], recv[3];
        memset(rss, 0, sizeof rss);
        memset(stall, 0, sizeof stall);
        memset(recv, 0, sizeof recv);
        for (int run = 0; run < a.runs; run++)
            for (int i = 0; i < 3; i++) {
                if (!perf_selected(&a, "--impls", impls[i]))
                    continue;
                outcome_t o = run_once(impls[i], cases[c]);
                if (!o.ok) {
                    printf("RUNFAIL %s impl=%s run=%d\n", keys, impls[i], run);
                    perf_series_add(&rss[i], NAN);
                    perf_series_add(&stall[i], NAN);
                    perf_series_add(&recv[i], NAN);
                    continue;
                }
                printf("RUN %s impl=%s run=%d rss_mib=%.1f stall_ms=%.2f recv_ms=%.1f "
                       "delivered_parts=%zu\n",
                       keys, impls[i], run, o.rss_mib, o.stall_ms, o.recv_ms, o.parts_seen);
                perf_series_add(&rss[i], o.rss_mib);
                perf_series_add(&stall[i], o.stall_ms);
                perf_series_add(&recv[i], o.recv_ms);
            }
        double mr[3], ms[3];
        for (int i = 0; i < 3; i++) {
            if (!perf_selected(&a, "--impls", impls[i]))
                continue;
            mr[i] = perf_report(keys, impls[i], "rss_mib", "MiB", &rss[i]);
            ms[i] = perf_report(keys, impls[i], "stall_ms", "ms", &stall[i]);
            perf_report(keys, impls[i], "recv_ms", "ms", &recv[i]);
        }
        if (perf_selected(&a, "--impls", "raw")) {
            for (int i = 1; i < 3; i++)
                if (perf_selected(&a, "--impls", impls[i]))
                    perf_delta(keys, "rss_mib", impls[i], mr[i], "raw", mr[0]);
        }
        (void)ms;
        fflush(stdout);
    }
    return 0;
}
