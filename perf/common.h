/*
 * Shared helpers of the perf/ programs: clocks, statistics, endpoints and the
 * output grammar that perf/compare.py parses.
 *
 * Output grammar (one record per line, fields are key=value without spaces):
 *   RUN    bench=.. <case keys> impl=.. run=i <metric>=value ...   one run
 *   RESULT bench=.. <case keys> impl=.. metric=.. unit=.. median=.. min=.. max=.. runs=..
 *   RATIO  bench=.. <case keys> metric=.. num=<impl> den=<impl> ratio=..
 *   DELTA  bench=.. <case keys> metric=.. num=<impl> den=<impl> delta=..   num - den
 *   FAIL   bench=.. <case keys> impl=.. reason=..                  the cell stays empty
 *   INFO   free text for humans
 * A metric whose runs all failed gets a FAIL line instead of a RESULT line.
 */
#ifndef ZEV_PERF_COMMON_H
#define ZEV_PERF_COMMON_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#define PERF_MAX_RUNS 64

/* Wall clock (CLOCK_MONOTONIC) and the calling thread's CPU time, in ns. */
uint64_t perf_now_ns(void);
uint64_t perf_thread_cpu_ns(void);

/* Command line: --full selects the long version (quick is the default),
 * --runs N overrides the run count. Other options are read with
 * perf_opt_str / perf_opt_long / perf_flag. */
typedef struct perf_args {
    int argc;
    char **argv;
    int full;
    int runs;
} perf_args_t;
void perf_args_init(perf_args_t *a, int argc, char **argv, int quick_runs, int full_runs);
const char *perf_opt_str(const perf_args_t *a, const char *name, const char *def);
long perf_opt_long(const perf_args_t *a, const char *name, long def);
int perf_flag(const perf_args_t *a, const char *name);
/* 1 if the comma-separated list in option `name` (absent: everything)
 * contains `item`. */
int perf_selected(const perf_args_t *a, const char *name, const char *item);
/* 1 if the comma-separated list contains item. */
int perf_in_list(const char *list, const char *item);

/* A set of per-run values of one metric. NAN marks a failed run. */
typedef struct perf_series {
    double v[PERF_MAX_RUNS];
    int n;
} perf_series_t;
void perf_series_add(perf_series_t *s, double v);
/* Median, min and max of the successful runs; returns how many there were. */
int perf_series_stats(const perf_series_t *s, double *med, double *min, double *max);

/* Prints a RESULT line (or a FAIL line if no run succeeded). `keys` is the
 * case, e.g. "bench=thr transport=tcp size=64". Returns the median (NAN). */
double perf_report(const char *keys, const char *impl, const char *metric, const char *unit,
                   const perf_series_t *s);
/* Prints a RATIO line num/den of two medians (nothing if either is NAN). */
void perf_ratio(const char *keys, const char *metric, const char *num, double vnum, const char *den,
                double vden);

/* Prints a DELTA line num - den of two medians (nothing if either is NAN). */
void perf_delta(const char *keys, const char *metric, const char *num, double vnum, const char *den,
                double vden);

/* One run of one row of a rate benchmark: messages per second and the
 * measured thread's CPU ns per message; ok == 0 with why on failure. */
typedef struct perf_sample {
    int ok;
    double msgs_per_s;
    double cpu_ns;
    const char *why;
} perf_sample_t;

/* The receiver's marks in a rate run: wall and thread CPU time at its first
 * and its last message. */
typedef struct perf_marks {
    uint64_t t_first, t_last, cpu_first, cpu_last;
} perf_marks_t;

/* Message number `got` (from 1) of `count` has arrived: marks the first and
 * the last. Returns 1 at the last. */
static inline int perf_marks_tick(perf_marks_t *m, long got, long count)
{
    if (got == 1) {
        m->t_first = perf_now_ns();
        m->cpu_first = perf_thread_cpu_ns();
    }
    if (got == count) {
        m->t_last = perf_now_ns();
        m->cpu_last = perf_thread_cpu_ns();
        return 1;
    }
    return 0;
}

/* The sample the marks of `count` messages make (messages per second first
 * to last, receiver CPU ns per message between them) into *out, ok = 1;
 * 0 and *out untouched when the clock did not move between them. */
int perf_marks_sample(const perf_marks_t *m, long count, perf_sample_t *out);

/* Runs the rows whose on[i] is set, `runs` times, the rows interleaved run
 * by run so drift hits them all; prints a RUN line per run (count,
 * msgs_per_s and the CPU figure as `cpu_metric`) or RUNFAIL, then RESULT
 * lines. med[i] / cmed[i] get the medians (NAN for rows not run). Returns
 * the number of failed runs. */
typedef perf_sample_t (*perf_row_fn)(int row, void *arg);
int perf_rate_rows(const char *keys, const char *cpu_metric, int nrows, const char *const *names,
                   const int *on, int runs, long count, perf_row_fn fn, void *arg, double *med,
                   double *cmed);

/* A thread that aborts a stuck run: every 20 ms it reads progress(arg),
 * any figure that changes while work goes on, which sets *started once the
 * run is under way. When the figure has not changed for 5 s (10 s before
 * the run started) it calls fire(arg) once and ends. */
typedef struct perf_watchdog {
    long (*progress)(void *arg, int *started);
    void (*fire)(void *arg);
    void *arg;
    atomic_int done;
    pthread_t th;
} perf_watchdog_t;
void perf_watchdog_start(perf_watchdog_t *w, long (*progress)(void *, int *), void (*fire)(void *),
                         void *arg);
void perf_watchdog_stop(perf_watchdog_t *w); /* joins the thread */

/* Percentiles of n samples (sorted in place). p in [0, 100]. */
void perf_sort_u64(uint64_t *v, size_t n);
uint64_t perf_pct(const uint64_t *sorted, size_t n, double p);

/* Endpoints. transport is "inproc", "ipc" or "tcp". perf_bind binds sock to
 * a fresh endpoint for `name` and writes the address a peer connects to. */
int perf_bind(void *sock, const char *transport, const char *name, char *out, size_t outlen);
/* Removes the ipc socket file of an endpoint (no-op for others). */
void perf_unlink_ep(const char *ep);

/* Raises RLIMIT_NOFILE's soft limit to at least want (up to the hard
 * limit); returns the resulting soft limit. */
long perf_raise_nofile(long want);

/* One line describing the environment, printed as INFO. */
void perf_banner(const char *prog, const perf_args_t *a);

/* Fills buf with a recognisable pattern. */
void perf_fill(void *buf, size_t len);

/* The PUSH sender every throughput program feeds its receivers with: count
 * messages of size bytes (perf_fill's pattern) to ep, blocking sends. rc: 0
 * once all were sent, else -1. It then stays connected while *hold is set
 * and, with hold_stdin, until stdin reaches EOF: libzmq 4.3.4 drops the
 * messages still in flight when a PUSH peer disconnects over ipc while the
 * PULL side is at its HWM and reads with ZMQ_DONTWAIT (zmq_poll and ZMQ_FD
 * users: zloop, zev; a plain zmq_poll loop shows it too), so the sender
 * stays until the receiver has counted everything. */
typedef struct perf_sender {
    void *ctx;
    const char *ep;
    size_t size;
    long count;
    int rc;
    atomic_int *hold; /* if set: stay connected until it is 0 */
    int hold_stdin;   /* stay connected until stdin reaches EOF */
} perf_sender_t;
void *perf_sender_main(void *sender); /* a pthread start routine */

#endif
