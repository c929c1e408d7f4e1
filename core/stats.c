/*
 * Loop statistics and the slow-callback hook.
 *
 * Design notes
 * - The counters (iterations, wakeups, callbacks, timers fired, stream
 *   passes, fiber resumes, peaks) are increments where the work is done,
 *   always on.
 * - Timing is on while the loop `watching`: zev_loop_set_timing, or a slow
 *   hook set. Every callback site then reads the clock before and after
 *   (zev__watch_begin / zev__watch_end: one predictable branch when off)
 *   and zev__watched keeps the longest and calls the hook; the hook itself
 *   is not timed. A fiber's resume counts as one callback: what it ran
 *   until it blocked.
 * - Lag: from an fd's readiness (the iteration's time after the wait, when
 *   zev__stream_fired put the stream on the ready-list) to the start of the
 *   stream's pass, and from a timer's deadline to its callback. Kept in a
 *   histogram of 4 buckets per power of two of nanoseconds (so a
 *   percentile is within 19 % of the true value: bucket width 2^(1/4));
 *   the maximum is exact.
 */
#include "zev-internal.h"

#include <errno.h>
#include <string.h>

static void update_watching(zev_loop_t *loop)
{
    loop->watching = loop->timing || loop->slow_fn;
}

/* Bucket of a delay: 4 per power of two, 0 for < 4 ns. */
static unsigned lag_bucket(uint64_t ns)
{
    if (ns < 4)
        return 0;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns); /* >= 2 */
    unsigned sub = (unsigned)(ns >> (msb - 2)) & 3u;    /* the next two bits */
    unsigned b = (msb - 1) * 4 + sub;
    return b < ZEV__LAG_BUCKETS ? b : ZEV__LAG_BUCKETS - 1;
}

/* The largest delay that falls in bucket b. */
static uint64_t bucket_top(unsigned b)
{
    if (b == 0)
        return 3;
    unsigned msb = b / 4 + 1, sub = b % 4;
    uint64_t lo = ((uint64_t)(4 + sub)) << (msb - 2);
    return lo + (1ull << (msb - 2)) - 1;
}

void zev__lag(zev_loop_t *loop, uint64_t ready_ns, uint64_t now_ns)
{
    uint64_t lag = now_ns > ready_ns ? now_ns - ready_ns : 0;
    loop->lag_hist[lag_bucket(lag)]++;
    loop->stats.lag_samples++;
    if (lag > loop->stats.lag_max_ns)
        loop->stats.lag_max_ns = lag;
}

void zev__watched(zev_loop_t *loop, uint64_t began, int kind, const void *what, zev_cb_fn fn)
{
    uint64_t took = zev__clock_ns() - began;
    if (took > loop->stats.longest_ns) {
        loop->stats.longest_ns = took;
        loop->stats.longest_kind = kind;
    }
    if (loop->slow_fn && took >= loop->slow_ns) {
        zev_slow_t slow = {.kind = kind, .what = what, .fn = fn, .duration_ns = took};
        loop->slow_fn(loop, &slow, loop->slow_arg);
    }
}

static uint64_t percentile(const zev_loop_t *loop, double p)
{
    uint64_t n = loop->stats.lag_samples;
    if (!n)
        return 0;
    uint64_t want = (uint64_t)(p * (double)n + 0.999999), seen = 0;
    if (want == 0)
        want = 1;
    for (unsigned b = 0; b < ZEV__LAG_BUCKETS; b++) {
        seen += loop->lag_hist[b];
        if (seen >= want) {
            uint64_t top = bucket_top(b);
            return top < loop->stats.lag_max_ns ? top : loop->stats.lag_max_ns;
        }
    }
    return loop->stats.lag_max_ns;
}

int zev_loop_stats(const zev_loop_t *loop, zev_loop_stats_t *out)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop || !out) {
        errno = EINVAL;
        return -1;
    }
    *out = loop->stats;
    out->lag_p50_ns = percentile(loop, 0.50);
    out->lag_p99_ns = percentile(loop, 0.99);
    return 0;
}

int zev_loop_stats_reset(zev_loop_t *loop)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop) {
        errno = EINVAL;
        return -1;
    }
    memset(&loop->stats, 0, sizeof loop->stats);
    memset(loop->lag_hist, 0, sizeof loop->lag_hist);
    return 0;
}

int zev_loop_set_timing(zev_loop_t *loop, int on)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop) {
        errno = EINVAL;
        return -1;
    }
    loop->timing = on != 0;
    update_watching(loop);
    return 0;
}

int zev_loop_on_slow(zev_loop_t *loop, uint64_t threshold_us, zev_slow_fn fn, void *arg)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop) {
        errno = EINVAL;
        return -1;
    }
    loop->slow_fn = fn;
    loop->slow_arg = arg;
    loop->slow_ns = zev__us_to_ns(threshold_us);
    update_watching(loop);
    return 0;
}
