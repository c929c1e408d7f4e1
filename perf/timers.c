/*
 * Timer accuracy: does a zev timer keep the microseconds it was given?
 *
 * Cases (each run interleaves every row, so drift hits them all):
 *   periodic_100us  a 100 us periodic timer for --seconds (quick 1, full 10)
 *   periodic_1ms    a 1 ms periodic timer for the same time
 *   oneshot_300us   a 300 us one-shot, armed again after each run (200 times)
 * Rows:
 *   timerfd            the floor: a blocking read() loop on a Linux timerfd
 *                      (periodic: it_interval; one-shot: it_value)
 *   zev_<backend>      zev_timer_start on a loop of that backend, the loop
 *                      run by zev_loop_run; no busy-poll
 *   zev_epoll_timerfd  epoll's wait for kernels without epoll_pwait2
 *                      (ZEV_EPOLL_PWAIT2=0): a timerfd in the set
 * Metrics:
 *   periodic: interval_avg (wall time / ticks, us), interval_p50 and
 *             interval_p99 (between consecutive ticks, us), drift (how far
 *             the average tick is from the period, %: a timer scheduled from
 *             each late wakeup drifts by that lateness every period), cpu
 *             (the timer thread's CPU time / wall time, %)
 *   one-shot: delay_p50, delay_p99 (arm to callback, us)
 * A tick is a wakeup: a late timerfd read that reports several expirations
 * counts once, as a zev timer that skipped missed periods does.
 *
 * --slack-ns N sets the thread's timer slack first (Linux prctl
 * PR_SET_TIMERSLACK; the default is 50,000 ns): epoll_pwait2 and ppoll
 * sleeps may end that much late, a timerfd's expiry does not.
 *
 *   timers [--full] [--runs N] [--seconds S] [--impls a,b] [--cases a,b] [--slack-ns N]
 */
#include "common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zev.h>
#ifdef __linux__
#include <sys/prctl.h>
#include <sys/timerfd.h>
#endif

enum { ONESHOTS = 200 };

typedef struct ticks {
    uint64_t *at; /* clock at each tick */
    size_t n, cap;
    uint64_t period_ns;
    uint64_t end_ns; /* periodic: stop after this clock */
    zev_loop_t *loop;
    zev_timer_t *timer;
} ticks_t;

static void tick_record(ticks_t *t, uint64_t now)
{
    if (t->n < t->cap)
        t->at[t->n++] = now;
}

/* ------------------------------------------------------------------ timerfd */

#ifdef __linux__
static int timerfd_periodic(ticks_t *t)
{
    int fd = timerfd_create(CLOCK_MONOTONIC, 0);
    if (fd < 0)
        return -1;
    struct itimerspec its = {0};
    its.it_value.tv_nsec = (long)t->period_ns;
    its.it_interval.tv_nsec = (long)t->period_ns;
    if (timerfd_settime(fd, 0, &its, NULL) < 0) {
        close(fd);
        return -1;
    }
    for (;;) {
        uint64_t expirations;
        if (read(fd, &expirations, sizeof expirations) != sizeof expirations) {
            if (errno == EINTR)
                continue;
            close(fd);
            return -1;
        }
        uint64_t now = perf_now_ns();
        tick_record(t, now);
        if (now >= t->end_ns)
            break;
    }
    close(fd);
    return 0;
}

static int timerfd_oneshot(uint64_t delay_ns, uint64_t *delays)
{
    int fd = timerfd_create(CLOCK_MONOTONIC, 0);
    if (fd < 0)
        return -1;
    for (int i = 0; i < ONESHOTS; i++) {
        struct itimerspec its = {0};
        its.it_value.tv_nsec = (long)delay_ns;
        uint64_t t0 = perf_now_ns();
        uint64_t expirations;
        if (timerfd_settime(fd, 0, &its, NULL) < 0 ||
            read(fd, &expirations, sizeof expirations) != sizeof expirations) {
            close(fd);
            return -1;
        }
        delays[i] = perf_now_ns() - t0;
    }
    close(fd);
    return 0;
}
#endif

/* ---------------------------------------------------------------------- zev */

static void zev_tick(zev_timer_t *timer, void *arg)
{
    (void)timer;
    ticks_t *t = arg;
    uint64_t now = perf_now_ns();
    tick_record(t, now);
    if (now >= t->end_ns) {
        zev_timer_cancel(t->timer);
        zev_loop_stop(t->loop);
    }
}

static zev_loop_t *zev_loop_for(const char *impl)
{
    const char *backend = strcmp(impl, "zev_epoll_timerfd") == 0 ? "epoll" : impl + 4;
    if (strcmp(impl, "zev_epoll_timerfd") == 0)
        setenv("ZEV_EPOLL_PWAIT2", "0", 1);
    zev_loop_opts_t opts = {.backend = backend};
    zev_loop_t *loop = zev_loop_new(&opts);
    unsetenv("ZEV_EPOLL_PWAIT2");
    return loop;
}

static int zev_periodic(const char *impl, ticks_t *t)
{
    t->loop = zev_loop_for(impl);
    if (!t->loop)
        return -1;
    uint64_t us = t->period_ns / 1000u;
    t->timer = zev_timer_start(t->loop, us, us, zev_tick, t);
    int rc = t->timer ? zev_loop_run(t->loop) : -1;
    zev_loop_destroy(t->loop);
    return rc;
}

typedef struct oneshot {
    zev_loop_t *loop;
    uint64_t fired_at;
} oneshot_t;

static void zev_fired(zev_timer_t *timer, void *arg)
{
    (void)timer;
    oneshot_t *o = arg;
    o->fired_at = perf_now_ns();
}

static int zev_oneshot(const char *impl, uint64_t delay_ns, uint64_t *delays)
{
    zev_loop_t *loop = zev_loop_for(impl);
    if (!loop)
        return -1;
    int rc = 0;
    for (int i = 0; i < ONESHOTS && rc == 0; i++) {
        oneshot_t o = {.loop = loop};
        uint64_t t0 = perf_now_ns();
        if (!zev_timer_start(loop, delay_ns / 1000u, 0, zev_fired, &o)) {
            rc = -1;
            break;
        }
        while (!o.fired_at && rc == 0)
            rc = zev_loop_run_once(loop, -1) < 0 ? -1 : 0;
        delays[i] = o.fired_at - t0;
    }
    zev_loop_destroy(loop);
    return rc;
}

/* ------------------------------------------------------------------- driver */

static const char *const impls[] = {"timerfd", "zev_epoll", "zev_poll", "zev_epoll_timerfd"};
enum { NIMPL = sizeof impls / sizeof impls[0] };

static int impl_available(const char *impl)
{
#ifndef __linux__
    if (strcmp(impl, "timerfd") == 0 || strcmp(impl, "zev_epoll_timerfd") == 0)
        return 0;
#endif
    if (strncmp(impl, "zev_", 4) != 0)
        return 1;
    zev_loop_t *loop = zev_loop_for(impl);
    if (!loop)
        return 0;
    zev_loop_destroy(loop);
    return 1;
}

typedef struct periodic_series {
    perf_series_t avg, p50, p99, drift, cpu;
} periodic_series_t;

static void periodic_case(const perf_args_t *a, const char *name, uint64_t period_ns,
                          double seconds, const int *on)
{
    char keys[128];
    snprintf(keys, sizeof keys, "bench=timer_accuracy case=%s", name);
    periodic_series_t s[NIMPL];
    memset(s, 0, sizeof s);
    size_t cap = (size_t)(seconds * 1e9 / (double)period_ns) * 2 + 16;
    uint64_t *at = malloc(cap * sizeof *at);
    uint64_t *gaps = malloc(cap * sizeof *gaps);
    if (!at || !gaps) {
        fprintf(stderr, "timers: out of memory\n");
        exit(1);
    }
    for (int run = 0; run < a->runs; run++) {
        for (int i = 0; i < NIMPL; i++) {
            if (!on[i])
                continue;
            ticks_t t = {.at = at, .cap = cap, .period_ns = period_ns};
            uint64_t cpu0 = perf_thread_cpu_ns(), t0 = perf_now_ns();
            t.end_ns = t0 + (uint64_t)(seconds * 1e9);
            int rc = -1;
#ifdef __linux__
            if (strcmp(impls[i], "timerfd") == 0)
                rc = timerfd_periodic(&t);
#endif
            if (strncmp(impls[i], "zev_", 4) == 0)
                rc = zev_periodic(impls[i], &t);
            uint64_t wall = perf_now_ns() - t0, cpu = perf_thread_cpu_ns() - cpu0;
            if (rc < 0 || t.n < 3) {
                printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, impls[i], run,
                       rc < 0 ? "error" : "no_ticks");
                perf_series_add(&s[i].avg, NAN);
                continue;
            }
            /* From the first tick to the last: start-up does not count. */
            double avg_us = (double)(t.at[t.n - 1] - t.at[0]) / (double)(t.n - 1) / 1e3;
            for (size_t k = 1; k < t.n; k++)
                gaps[k - 1] = t.at[k] - t.at[k - 1];
            perf_sort_u64(gaps, t.n - 1);
            double p50 = (double)perf_pct(gaps, t.n - 1, 50) / 1e3;
            double p99 = (double)perf_pct(gaps, t.n - 1, 99) / 1e3;
            double drift = (avg_us * 1e3 - (double)period_ns) / (double)period_ns * 100.0;
            double cpu_pct = (double)cpu / (double)wall * 100.0;
            printf("RUN %s impl=%s run=%d ticks=%zu interval_avg=%.2f interval_p50=%.2f "
                   "interval_p99=%.2f drift=%.3f cpu=%.1f\n",
                   keys, impls[i], run, t.n, avg_us, p50, p99, drift, cpu_pct);
            perf_series_add(&s[i].avg, avg_us);
            perf_series_add(&s[i].p50, p50);
            perf_series_add(&s[i].p99, p99);
            perf_series_add(&s[i].drift, drift);
            perf_series_add(&s[i].cpu, cpu_pct);
        }
    }
    double base = NAN;
    for (int i = 0; i < NIMPL; i++) {
        if (!on[i])
            continue;
        double m = perf_report(keys, impls[i], "interval_avg", "us", &s[i].avg);
        perf_report(keys, impls[i], "interval_p50", "us", &s[i].p50);
        perf_report(keys, impls[i], "interval_p99", "us", &s[i].p99);
        perf_report(keys, impls[i], "drift", "pct", &s[i].drift);
        perf_report(keys, impls[i], "cpu", "pct", &s[i].cpu);
        if (i == 0)
            base = m;
        else
            perf_ratio(keys, "interval_avg", impls[i], m, impls[0], base);
    }
    free(at);
    free(gaps);
}

static void oneshot_case(const perf_args_t *a, const int *on)
{
    const char *keys = "bench=timer_accuracy case=oneshot_300us";
    const uint64_t delay_ns = 300000;
    perf_series_t p50[NIMPL], p99[NIMPL];
    memset(p50, 0, sizeof p50);
    memset(p99, 0, sizeof p99);
    uint64_t delays[ONESHOTS];
    for (int run = 0; run < a->runs; run++) {
        for (int i = 0; i < NIMPL; i++) {
            if (!on[i])
                continue;
            int rc = -1;
#ifdef __linux__
            if (strcmp(impls[i], "timerfd") == 0)
                rc = timerfd_oneshot(delay_ns, delays);
#endif
            if (strncmp(impls[i], "zev_", 4) == 0)
                rc = zev_oneshot(impls[i], delay_ns, delays);
            if (rc < 0) {
                printf("RUNFAIL %s impl=%s run=%d reason=error\n", keys, impls[i], run);
                perf_series_add(&p50[i], NAN);
                perf_series_add(&p99[i], NAN);
                continue;
            }
            perf_sort_u64(delays, ONESHOTS);
            double m50 = (double)perf_pct(delays, ONESHOTS, 50) / 1e3;
            double m99 = (double)perf_pct(delays, ONESHOTS, 99) / 1e3;
            printf("RUN %s impl=%s run=%d delay_p50=%.2f delay_p99=%.2f early=%d\n", keys,
                   impls[i], run, m50, m99, delays[0] < delay_ns);
            perf_series_add(&p50[i], m50);
            perf_series_add(&p99[i], m99);
        }
    }
    for (int i = 0; i < NIMPL; i++) {
        if (!on[i])
            continue;
        perf_report(keys, impls[i], "delay_p50", "us", &p50[i]);
        perf_report(keys, impls[i], "delay_p99", "us", &p99[i]);
    }
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 3, 5);
    perf_banner("timers", &a);
    double seconds = (double)perf_opt_long(&a, "--seconds", a.full ? 10 : 1);
#ifdef __linux__
    long slack = perf_opt_long(&a, "--slack-ns", 0);
    if (slack > 0 && prctl(PR_SET_TIMERSLACK, (unsigned long)slack, 0, 0, 0) < 0)
        perror("timers: PR_SET_TIMERSLACK");
    printf("INFO timer slack %ld ns\n", (long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0));
#endif
    int on[NIMPL];
    for (int i = 0; i < NIMPL; i++)
        on[i] = perf_selected(&a, "--impls", impls[i]) && impl_available(impls[i]);
    if (perf_selected(&a, "--cases", "periodic_100us"))
        periodic_case(&a, "periodic_100us", 100000, seconds, on);
    if (perf_selected(&a, "--cases", "periodic_1ms"))
        periodic_case(&a, "periodic_1ms", 1000000, seconds, on);
    if (perf_selected(&a, "--cases", "oneshot_300us"))
        oneshot_case(&a, on);
    return 0;
}
