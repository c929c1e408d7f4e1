/*
 * Timers: a binary min-heap of timer pointers ordered by (deadline, seq).
 *
 * Design notes
 * - O(log n) start and cancel: each timer knows its heap index, so cancel
 *   removes it from the middle without a scan. The heap array grows by
 *   doubling and is the only allocation besides the timer itself.
 * - seq is a per-loop counter taken at every (re)start: equal deadlines fire
 *   in start order, and the run phase fires only timers whose seq predates
 *   the phase, so a timer started (or re-armed) inside a callback never runs
 *   in the same iteration, even with delay 0.
 * - Timers run one at a time off the top of the heap instead of being
 *   collected first: a callback that cancels another due timer simply
 *   removes it from the heap, and nothing stale is left to skip.
 * - A timer whose callback is on the stack is not freed by cancel; the run
 *   phase frees it when the callback returns.
 * - Deadlines are nanoseconds and saturate (zev__sat_add): UINT64_MAX is
 *   "never", which zev__timers_next reports as nothing scheduled.
 * - A periodic timer's n-th run is due at start + n x period, as PyZMQ's
 *   PeriodicCallback schedules it: the next deadline is the previous one
 *   plus the period, never "now plus the period" (that drifts by every late
 *   wakeup). A run that fell behind skips the periods it missed rather than
 *   running them in a burst.
 */
#include "zev-internal.h"

#include <errno.h>
#include <stdlib.h>

static int before(const zev_timer_t *a, const zev_timer_t *b)
{
    return a->deadline_ns < b->deadline_ns || (a->deadline_ns == b->deadline_ns && a->seq < b->seq);
}

static void place(zev_loop_t *loop, size_t i, zev_timer_t *t)
{
    loop->heap[i] = t;
    t->heap_index = i;
}

static void sift_up(zev_loop_t *loop, size_t i)
{
    zev_timer_t *t = loop->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(t, loop->heap[parent]))
            break;
        place(loop, i, loop->heap[parent]);
        i = parent;
    }
    place(loop, i, t);
}

static void sift_down(zev_loop_t *loop, size_t i)
{
    zev_timer_t *t = loop->heap[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= loop->heap_len)
            break;
        if (child + 1 < loop->heap_len && before(loop->heap[child + 1], loop->heap[child]))
            child++;
        if (!before(loop->heap[child], t))
            break;
        place(loop, i, loop->heap[child]);
        i = child;
    }
    place(loop, i, t);
}

static int heap_insert(zev_loop_t *loop, zev_timer_t *t)
{
    if (loop->heap_len == loop->heap_cap) {
        size_t cap = zev__grown_cap(loop->heap_cap, 64, loop->heap_len + 1, sizeof *loop->heap);
        zev_timer_t **heap = cap ? realloc(loop->heap, cap * sizeof *loop->heap) : NULL;
        if (!heap) {
            errno = ENOMEM;
            return -1;
        }
        loop->heap = heap;
        loop->heap_cap = cap;
    }
    t->seq = loop->timer_seq++;
    place(loop, loop->heap_len++, t);
    sift_up(loop, t->heap_index);
    return 0;
}

static void heap_remove(zev_loop_t *loop, zev_timer_t *t)
{
    size_t i = t->heap_index;
    zev_timer_t *last = loop->heap[--loop->heap_len];
    t->heap_index = SIZE_MAX;
    if (last == t)
        return;
    place(loop, i, last);
    if (i > 0 && before(last, loop->heap[(i - 1) / 2]))
        sift_up(loop, i);
    else
        sift_down(loop, i);
}

zev_timer_t *zev_timer_start(zev_loop_t *loop, uint64_t delay_us, uint64_t repeat_us,
                             zev_timer_fn fn, void *arg)
{
    if (!loop || !fn) {
        errno = EINVAL;
        return NULL;
    }
    zev_timer_t *t = calloc(1, sizeof *t);
    if (!t) {
        errno = ENOMEM;
        return NULL;
    }
    /* Outside the loop's callbacks the cached time may be old. */
    if (!loop->depth)
        loop->now_ns = zev__clock_ns();
    t->loop = loop;
    t->deadline_ns = zev__sat_add(loop->now_ns, zev__us_to_ns(delay_us));
    t->repeat_ns = zev__us_to_ns(repeat_us);
    t->fn = fn;
    t->arg = arg;
    if (heap_insert(loop, t) < 0) {
        free(t);
        return NULL;
    }
    zev__loop_changed(loop);
    return t;
}

int zev_timer_cancel(zev_timer_t *t)
{
    if (!t) {
        errno = EINVAL;
        return -1;
    }
    if (t->running) {
        t->cancelled = true;
        return 0;
    }
    zev_loop_t *loop = t->loop;
    if (t->heap_index != SIZE_MAX)
        heap_remove(loop, t);
    free(t);
    zev__loop_changed(loop); /* do not wake the host for it */
    return 0;
}

uint64_t zev_timer_due(const zev_timer_t *t)
{
    if (!t) {
        errno = EINVAL;
        return 0;
    }
    return t->heap_index != SIZE_MAX || t->running ? t->deadline_ns : 0;
}

/* The first deadline on the period's grid after `now`: the period's next
 * step from `deadline`, or further when that one is already past. */
static uint64_t next_on_grid(uint64_t deadline, uint64_t period, uint64_t now)
{
    uint64_t next = zev__sat_add(deadline, period);
    if (next > now)
        return next;
    uint64_t missed = (now - next) / period + 1;
    return missed > UINT64_MAX / period ? UINT64_MAX : zev__sat_add(next, missed * period);
}

size_t zev__timers_run(zev_loop_t *loop, uint64_t seq_bound)
{
    size_t ran = 0;
    while (loop->heap_len) {
        zev_timer_t *t = loop->heap[0];
        if (t->deadline_ns > loop->now_ns || t->seq >= seq_bound)
            break;
        heap_remove(loop, t);
        ran++;
        t->running = true;
        t->fn(t, t->arg);
        t->running = false;
        if (t->cancelled || !t->repeat_ns) {
            free(t);
            continue;
        }
        t->deadline_ns = next_on_grid(t->deadline_ns, t->repeat_ns, loop->now_ns);
        if (heap_insert(loop, t) < 0)
            free(t); /* ENOMEM growing the heap cannot happen: t just left it */
    }
    return ran;
}

uint64_t zev__timers_next(const zev_loop_t *loop)
{
    return loop->heap_len ? loop->heap[0]->deadline_ns : UINT64_MAX;
}

void zev__timers_free(zev_loop_t *loop)
{
    for (size_t i = 0; i < loop->heap_len; i++)
        free(loop->heap[i]);
    free(loop->heap);
    loop->heap = NULL;
    loop->heap_len = loop->heap_cap = 0;
}
