/*
 * Shared helpers of the perf/ programs (see common.h for the output grammar).
 */
#include "common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

uint64_t perf_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t perf_thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- arguments */

void perf_args_init(perf_args_t *a, int argc, char **argv, int quick_runs, int full_runs)
{
    a->argc = argc;
    a->argv = argv;
    a->full = perf_flag(a, "--full");
    a->runs = (int)perf_opt_long(a, "--runs", a->full ? full_runs : quick_runs);
    if (a->runs < 1)
        a->runs = 1;
    if (a->runs > PERF_MAX_RUNS)
        a->runs = PERF_MAX_RUNS;
}

const char *perf_opt_str(const perf_args_t *a, const char *name, const char *def)
{
    for (int i = 1; i + 1 < a->argc; i++)
        if (strcmp(a->argv[i], name) == 0)
            return a->argv[i + 1];
    return def;
}

long perf_opt_long(const perf_args_t *a, const char *name, long def)
{
    const char *s = perf_opt_str(a, name, NULL);
    return s ? strtol(s, NULL, 10) : def;
}

int perf_flag(const perf_args_t *a, const char *name)
{
    for (int i = 1; i < a->argc; i++)
        if (strcmp(a->argv[i], name) == 0)
            return 1;
    return 0;
}

int perf_selected(const perf_args_t *a, const char *name, const char *item)
{
    const char *list = perf_opt_str(a, name, NULL);
    return !list || perf_in_list(list, item);
}

int perf_in_list(const char *list, const char *item)
{
    size_t n = strlen(item);
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, item, n) == 0)
            return 1;
        p += len + (end ? 1 : 0);
    }
    return 0;
}

/* --------------------------------------------------------------- statistics */

void perf_series_add(perf_series_t *s, double v)
{
    if (s->n < PERF_MAX_RUNS)
        s->v[s->n++] = v;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int perf_series_stats(const perf_series_t *s, double *med, double *min, double *max)
{
    double ok[PERF_MAX_RUNS];
    int n = 0;
    for (int i = 0; i < s->n; i++)
        if (!isnan(s->v[i]))
            ok[n++] = s->v[i];
    *med = *min = *max = NAN;
    if (!n)
        return 0;
    qsort(ok, (size_t)n, sizeof ok[0], cmp_double);
    *min = ok[0];
    *max = ok[n - 1];
    *med = n % 2 ? ok[n / 2] : (ok[n / 2 - 1] + ok[n / 2]) / 2;
    return n;
}

double perf_report(const char *keys, const char *impl, const char *metric, const char *unit,
                   const perf_series_t *s)
{
    double med, min, max;
    int n = perf_series_stats(s, &med, &min, &max);
    if (!n) {
        printf("FAIL %s impl=%s metric=%s reason=no_successful_run\n", keys, impl, metric);
    } else {
        printf("RESULT %s impl=%s metric=%s unit=%s median=%.6g min=%.6g max=%.6g runs=%d\n", keys,
               impl, metric, unit, med, min, max, n);
    }
    fflush(stdout);
    return med;
}

void perf_ratio(const char *keys, const char *metric, const char *num, double vnum, const char *den,
                double vden)
{
    if (isnan(vnum) || isnan(vden) || vden == 0)
        return;
    printf("RATIO %s metric=%s num=%s den=%s ratio=%.4g\n", keys, metric, num, den, vnum / vden);
    fflush(stdout);
}

void perf_delta(const char *keys, const char *metric, const char *num, double vnum, const char *den,
                double vden)
{
    if (isnan(vnum) || isnan(vden))
        return;
    printf("DELTA %s metric=%s num=%s den=%s delta=%.4g\n", keys, metric, num, den, vnum - vden);
    fflush(stdout);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

void perf_sort_u64(uint64_t *v, size_t n)
{
    qsort(v, n, sizeof v[0], cmp_u64);
}

uint64_t perf_pct(const uint64_t *sorted, size_t n, double p)
{
    if (!n)
        return 0;
    /* nearest rank: the smallest sample with at least p% at or below it */
    size_t rank = (size_t)ceil(p / 100.0 * (double)n);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

/* ---------------------------------------------------------------- endpoints */

int perf_bind(void *sock, const char *transport, const char *name, char *out, size_t outlen)
{
    static unsigned seq;
    char ep[256];
    if (strcmp(transport, "tcp") == 0)
        snprintf(ep, sizeof ep, "tcp://127.0.0.1:*");
    else if (strcmp(transport, "ipc") == 0)
        snprintf(ep, sizeof ep, "ipc:///tmp/zev-perf-%d-%s-%u", (int)getpid(), name, seq++);
    else
        snprintf(ep, sizeof ep, "inproc://%s-%u", name, seq++);
    if (zmq_bind(sock, ep) < 0)
        return -1;
    size_t len = outlen;
    if (zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, out, &len) < 0)
        return -1;
    return 0;
}

void perf_unlink_ep(const char *ep)
{
    if (strncmp(ep, "ipc://", 6) == 0)
        unlink(ep + 6);
}

long perf_raise_nofile(long want)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return -1;
    if ((long)rl.rlim_cur < want) {
        rl.rlim_cur =
            rl.rlim_max == RLIM_INFINITY || (long)rl.rlim_max > want ? (rlim_t)want : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    return (long)rl.rlim_cur;
}

void perf_banner(const char *prog, const perf_args_t *a)
{
    int maj, min, pat;
    zmq_version(&maj, &min, &pat);
    printf("INFO %s mode=%s runs=%d libzmq=%d.%d.%d cpus=%ld\n", prog, a->full ? "full" : "quick",
           a->runs, maj, min, pat, sysconf(_SC_NPROCESSORS_ONLN));
    fflush(stdout);
}

void perf_fill(void *buf, size_t len)
{
    unsigned char *p = buf;
    for (size_t i = 0; i < len; i++)
        p[i] = (unsigned char)(i * 31u + 7u);
}

int perf_rate_rows(const char *keys, const char *cpu_metric, int nrows, const char *const *names,
                   const int *on, int runs, long count, perf_row_fn fn, void *arg, double *med,
                   double *cmed)
{
    perf_series_t *rate = calloc((size_t)nrows, sizeof *rate);
    perf_series_t *cpu = calloc((size_t)nrows, sizeof *cpu);
    int fails = 0;
    if (!rate || !cpu) {
        fprintf(stderr, "perf: out of memory\n");
        exit(1);
    }
    for (int r = 0; r < runs; r++)
        for (int i = 0; i < nrows; i++) {
            if (!on[i])
                continue;
            perf_sample_t s = fn(i, arg);
            perf_series_add(&rate[i], s.msgs_per_s);
            perf_series_add(&cpu[i], s.cpu_ns);
            if (s.ok)
                printf("RUN %s impl=%s run=%d count=%ld msgs_per_s=%.6g %s=%.6g\n", keys, names[i],
                       r, count, s.msgs_per_s, cpu_metric, s.cpu_ns);
            else {
                printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, names[i], r, s.why);
                fails++;
            }
            fflush(stdout);
        }
    for (int i = 0; i < nrows; i++) {
        med[i] = cmed[i] = NAN;
        if (!on[i])
            continue;
        med[i] = perf_report(keys, names[i], "msgs_per_s", "msg/s", &rate[i]);
        cmed[i] = perf_report(keys, names[i], cpu_metric, "ns/msg", &cpu[i]);
    }
    free(rate);
    free(cpu);
    return fails;
}

static void *watchdog_main(void *arg)
{
    perf_watchdog_t *w = arg;
    long last = -1;
    uint64_t since = perf_now_ns();
    while (!atomic_load(&w->done)) {
        usleep(20000);
        int started = 0;
        long p = w->progress(w->arg, &started);
        uint64_t now = perf_now_ns();
        if (p != last) {
            last = p;
            since = now;
            continue;
        }
        if (now - since > (started ? 5000000000u : 10000000000u)) {
            w->fire(w->arg);
            break;
        }
    }
    return NULL;
}

void perf_watchdog_start(perf_watchdog_t *w, long (*progress)(void *, int *), void (*fire)(void *),
                         void *arg)
{
    w->progress = progress;
    w->fire = fire;
    w->arg = arg;
    atomic_init(&w->done, 0);
    if (pthread_create(&w->th, NULL, watchdog_main, w) != 0) {
        fprintf(stderr, "perf: cannot start the watchdog thread\n");
        exit(1);
    }
}

void perf_watchdog_stop(perf_watchdog_t *w)
{
    atomic_store(&w->done, 1);
    pthread_join(w->th, NULL);
}

void *perf_sender_main(void *arg)
{
    perf_sender_t *s = arg;
    void *push = zmq_socket(s->ctx, ZMQ_PUSH);
    int linger = 10000;
    zmq_setsockopt(push, ZMQ_LINGER, &linger, sizeof linger);
    s->rc = -1;
    if (zmq_connect(push, s->ep) == 0) {
        unsigned char *buf = malloc(s->size ? s->size : 1);
        perf_fill(buf, s->size);
        long i = 0;
        for (; i < s->count; i++)
            if (zmq_send(push, buf, s->size, 0) < 0)
                break;
        free(buf);
        s->rc = i == s->count ? 0 : -1;
    }
    /* see common.h: stay until the receiver has counted everything */
    while (s->hold && atomic_load(s->hold))
        usleep(1000);
    if (s->hold_stdin) {
        char b[64];
        while (read(0, b, sizeof b) > 0)
            ;
    }
    zmq_close(push);
    return NULL;
}

int perf_marks_sample(const perf_marks_t *m, long count, perf_sample_t *out)
{
    if (m->t_last <= m->t_first)
        return 0;
    out->ok = 1;
    out->why = NULL;
    out->msgs_per_s = (double)(count - 1) * 1e9 / (double)(m->t_last - m->t_first);
    out->cpu_ns = (double)(m->cpu_last - m->cpu_first) / (double)(count - 1);
    return 1;
}
