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
        size_t cap = loop->heap_cap ? loop->heap_cap * 2 : 64;
        zev_timer_t **heap = realloc(loop->heap, cap * sizeof *heap);
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
    t->deadline_ns = loop->now_ns + delay_us * 1000u;
    t->repeat_ns = repeat_us * 1000u;
    t->fn = fn;
    t->arg = arg;
    if (heap_insert(loop, t) < 0) {
        free(t);
        return NULL;
    }
    /* Inside an iteration its end re-arms the embedding fd; outside, the
     * host may block on that fd next: arm it for the new deadline now. */
    if (!loop->depth && loop->embedded)
        zev__embedded_signal(loop);
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
    if (!loop->depth && loop->embedded)
        zev__embedded_signal(loop); /* do not wake the host for it */
    return 0;
}

size_t zev__timers_run(zev_loop_t *loop)
{
    const uint64_t started_before = loop->timer_seq;
    size_t ran = 0;
    while (loop->heap_len) {
        zev_timer_t *t = loop->heap[0];
        if (t->deadline_ns > loop->now_ns || t->seq >= started_before)
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
        /* Keep the period without drift; if the loop fell behind, count from
         * now rather than firing a burst to catch up. */
        t->deadline_ns += t->repeat_ns;
        if (t->deadline_ns <= loop->now_ns)
            t->deadline_ns = loop->now_ns + t->repeat_ns;
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
