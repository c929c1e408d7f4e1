/*
 * Timers at scale: what a start + cancel costs with N timers already armed
 * (a gateway keeps one timeout per outstanding request).
 *
 *   timerscale [--full] [--runs N] [--sizes 1000,100000,1000000]
 *              [--impls start_cancel,arm_disarm,rolling_start,rolling_arm,...] [--ops N]
 *
 * Each run makes a loop (never run: the timers only have to be armed), arms
 * N background timers with deadlines spread over 30–90 s in random order,
 * then times --ops operations:
 *   start_cancel   zev_timer_start(delay 30–90 s) then zev_timer_cancel of it:
 *                  the fire-and-forget timeout of a request answered at once
 *   arm_disarm     the same with a timer the caller owns (zev_timer_new once,
 *                  zev_timer_arm / zev_timer_disarm)
 *   rolling_start  cancel one of the N armed zev_timer_start timers, picked at
 *                  random (the request that was answered), start a new one in
 *                  its place: N stays armed, removals come from anywhere
 *   rolling_arm    the same with owned timers (disarm one, re-arm it)
 *   fifo_start     every timer 30 s: cancel the oldest armed one (requests
 *                  answered in the order they came), start a new one
 *   fifo_arm       the same with owned timers
 *   rolling_floor  no timers at all: the memory rolling_* cannot avoid. Pick
 *                  a random handle as they do, write the 64-byte record it
 *                  points to (the cancel has to reach the timer), write a new
 *                  handle back; records are N x 64 B in random order. The
 *                  picks are independent, so the CPU overlaps their cache
 *                  misses: a lower bound no real program reaches.
 *   rolling_floor_dep  the same, but each pick depends on the record read
 *                  before (as a gateway's next cancel waits for the next
 *                  reply): the misses cannot overlap. What random-order
 *                  cancels cost on this machine before any queue, heap or
 *                  wheel does its work.
 * ns per pair (one start + one cancel, or arm + disarm), median of the runs.
 * Delays are whole milliseconds, so many timers share a deadline (the
 * heap's tie-break on the start order is exercised).
 * Output: RESULT bench=timerscale armed=N impl=I metric=ns_per_pair ...
 */
#include "common.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zev.h>

enum { I_START_CANCEL, I_ARM_DISARM, I_ROLLING_START, I_ROLLING_ARM, I_FIFO_START, I_FIFO_ARM,
       I_ROLLING_FLOOR, I_ROLLING_FLOOR_DEP, I__N };
static const char *const impl_names[I__N] = {"start_cancel", "arm_disarm", "rolling_start",
                                             "rolling_arm",  "fifo_start", "fifo_arm",
                                             "rolling_floor", "rolling_floor_dep"};

static void never(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
    abort(); /* the loop is never run */
}

static uint64_t rng_state = 0x9e3779b97f4a7c15u;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* 30–90 s in whole ms, in µs. */
static uint64_t delay_us(void)
{
    return (30000u + rnd() % 60000u) * 1000u;
}

/* rolling_floor: one cache line per timer, reached through a handle. */
typedef struct record {
    uint64_t deadline, seq;
    char pad[48];
} record_t;

static double floor_run(size_t armed, size_t ops, bool dependent)
{
    record_t *recs = aligned_alloc(64, armed * sizeof *recs);
    record_t **bg = malloc(armed * sizeof *bg);
    double ns = NAN;
    if (recs && bg) {
        memset(recs, 0, armed * sizeof *recs);
        size_t i = 0;
        while (i < armed) { /* handles to records in random order */
            bg[i] = &recs[i];
            size_t j = rnd() % (i + 1);
            record_t *tmp = bg[i];
            bg[i] = bg[j];
            bg[j] = tmp;
            i++;
        }
        uint64_t t0 = perf_now_ns(), seq = 0, last = 0;
        size_t k = 0;
        while (k++ < ops) {
            /* dependent: last is the previous record's deadline, always
             * even (whole µs x 1000), so last & 1 is 0 but the CPU must
             * wait for it */
            size_t j = (rnd() + (dependent ? (last & 1) : 0)) % armed;
            record_t *r = bg[j];
            last = r->deadline;
            r->seq = ++seq; /* the cancel reaches it, the start re-arms it */
            r->deadline = delay_us();
            bg[j] = r;
        }
        ns = (double)(perf_now_ns() - t0) / (double)ops;
        if (seq != ops)
            ns = NAN;
    }
    free(recs);
    free(bg);
    return ns;
}

static double one_run(int impl, size_t armed, size_t ops)
{
    if (impl == I_ROLLING_FLOOR || impl == I_ROLLING_FLOOR_DEP)
        return floor_run(armed, ops, impl == I_ROLLING_FLOOR_DEP);
    bool fifo = impl == I_FIFO_START || impl == I_FIFO_ARM;
#define DELAY() (fifo ? 30000000u : delay_us())
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop)
        return NAN;
    bool owned = impl == I_ARM_DISARM || impl == I_ROLLING_ARM || impl == I_FIFO_ARM;
    zev_timer_t **bg = malloc((armed ? armed : 1) * sizeof *bg);
    double ns = NAN;
    if (!bg)
        goto out;
    size_t i = 0;
    while (i < armed) {
        if (owned) {
            bg[i] = zev_timer_new(loop, never, NULL);
            if (!bg[i] || zev_timer_arm(bg[i], DELAY(), 0) < 0)
                goto out;
        } else if (!(bg[i] = zev_timer_start(loop, DELAY(), 0, never, NULL))) {
            goto out;
        }
        i++;
    }
    zev_timer_t *mine = owned ? zev_timer_new(loop, never, NULL) : NULL;
    if (owned && !mine)
        goto out;
    uint64_t t0 = perf_now_ns();
    size_t k = 0;
    switch (impl) {
    case I_START_CANCEL:
        while (k++ < ops) {
            zev_timer_t *t = zev_timer_start(loop, delay_us(), 0, never, NULL);
            if (!t || zev_timer_cancel(t) < 0)
                goto out;
        }
        break;
    case I_ARM_DISARM:
        while (k++ < ops)
            if (zev_timer_arm(mine, delay_us(), 0) < 0 || zev_timer_disarm(mine) < 0)
                goto out;
        break;
    case I_ROLLING_START:
        while (k++ < ops) {
            size_t j = rnd() % armed;
            if (zev_timer_cancel(bg[j]) < 0 ||
                !(bg[j] = zev_timer_start(loop, delay_us(), 0, never, NULL)))
                goto out;
        }
        break;
    case I_ROLLING_ARM:
        while (k++ < ops) {
            size_t j = rnd() % armed;
            if (zev_timer_disarm(bg[j]) < 0 || zev_timer_arm(bg[j], delay_us(), 0) < 0)
                goto out;
        }
        break;
    case I_FIFO_START:
        while (k < ops) {
            size_t j = k++ % armed; /* the oldest */
            if (zev_timer_cancel(bg[j]) < 0 ||
                !(bg[j] = zev_timer_start(loop, 30000000u, 0, never, NULL)))
                goto out;
        }
        break;
    case I_FIFO_ARM:
        while (k < ops) {
            size_t j = k++ % armed;
            if (zev_timer_disarm(bg[j]) < 0 || zev_timer_arm(bg[j], 30000000u, 0) < 0)
                goto out;
        }
        break;
    }
    ns = (double)(perf_now_ns() - t0) / (double)ops;
out:
    free(bg);
    zev_loop_destroy(loop); /* frees every timer */
    return ns;
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 3, 7);
    perf_banner("timerscale", &a);
    size_t ops = (size_t)perf_opt_long(&a, "--ops", a.full ? 2000000 : 500000);
    const char *sizes = perf_opt_str(&a, "--sizes", "1000,100000,1000000");
    char buf[256];
    snprintf(buf, sizeof buf, "%s", sizes);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        size_t armed = strtoul(tok, NULL, 10);
        if (!armed)
            continue;
        perf_series_t s[I__N];
        memset(s, 0, sizeof s);
        for (int r = 0; r < a.runs; r++)
            for (int impl = 0; impl < I__N; impl++) { /* interleaved */
                if (!perf_selected(&a, "--impls", impl_names[impl]))
                    continue;
                double v = one_run(impl, armed, ops);
                printf("RUN bench=timerscale armed=%zu impl=%s run=%d ns_per_pair=%.1f\n", armed,
                       impl_names[impl], r, v);
                fflush(stdout);
                perf_series_add(&s[impl], v);
            }
        char keys[64];
        snprintf(keys, sizeof keys, "bench=timerscale armed=%zu", armed);
        for (int impl = 0; impl < I__N; impl++)
            if (perf_selected(&a, "--impls", impl_names[impl]))
                perf_report(keys, impl_names[impl], "ns_per_pair", "ns", &s[impl]);
    }
    return 0;
}
