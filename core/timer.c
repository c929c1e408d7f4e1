/*
 * Timers: a 4-ary min-heap ordered by (deadline, seq), and the pool every
 * timer of a loop comes from.
 *
 * Design notes
 * - Two flavours, one object. zev_timer_start makes a timer the loop owns: a
 *   one-shot goes back to the pool once it ran, a periodic one when
 *   cancelled. zev_timer_new makes one the user owns (libuv's uv_timer_t,
 *   Go's time.Timer): armed, disarmed and re-armed at will, whether or not it
 *   fired, until zev_timer_free. The per-request timeout of a gateway is the
 *   second kind: arm and disarm never allocate.
 * - Every timer comes from a per-loop pool that grows by chunks and reuses
 *   the slot freed longest ago; handles carry the slot's generation
 *   (handle.h), so a stale handle (a cancel after the one-shot fired, a
 *   free twice) fails with EINVAL instead of reaching the slot's next timer.
 *   A slot whose generations are spent (2^19 reuses) is retired rather than
 *   reused, so that never comes round. In steady state neither flavour
 *   allocates (but for the chunk that replaces 64 retired slots, once in
 *   tens of millions of timers): the heap's room for every timer out of the
 *   pool is reserved when the timer is made, so arming never needs memory.
 * - O(log n) arm, disarm and cancel: each timer knows its heap index, so
 *   removal from the middle needs no scan. The heap is 4-ary and its
 *   entries hold the key (deadline, seq) beside the timer: sifting reads
 *   the heap's array only and writes the index of each timer it moves
 *   (perf/timerscale.c: with 10^6 armed, a binary heap of pointers missed
 *   the cache on every timer it compared).
 * - seq is a per-loop counter taken at every (re)arm: equal deadlines fire
 *   in arm order, and the run phase fires only timers armed before the
 *   iteration began, so a timer armed inside a callback never runs in the
 *   same iteration, even with delay 0.
 * - Timers run one at a time off the top of the heap instead of being
 *   collected first: a callback that cancels another due timer simply
 *   removes it from the heap, and nothing stale is left to skip.
 * - A timer whose callback is on the stack is not pooled by cancel or free:
 *   its handle is cleared at once (stale from that call on, as for any
 *   ended timer), and the run phase pools the slot when the callback
 *   returns.
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

#define CHUNK_TIMERS 64

struct zev__timer_chunk {
    struct zev__timer_chunk *next;
    zev_timer_t timers[CHUNK_TIMERS];
};

/* ------------------------------------------------------------------- heap */

/* Four children per node: half the levels of a binary heap, and the
 * children of a node side by side in memory; each entry carries its key,
 * so sifting compares without touching the timers (with a million armed,
 * every timer touched is a cache miss).
 * Removal is lazy: disarming or cancelling a timer only clears its in_heap,
 * and re-arming gives it a new entry (a new seq); an entry is live while
 * its timer is in the heap with that seq. Dead entries are dropped when
 * they come to the top, or all at once when the array is full (compact);
 * the array has room for twice the timers out of the pool, so compacting
 * frees at least half of it and costs O(1) per removal, amortised. */
#define ARITY 4

static bool before(const zev__heap_entry_t *a, const zev__heap_entry_t *b)
{
    return a->deadline_ns < b->deadline_ns || (a->deadline_ns == b->deadline_ns && a->seq < b->seq);
}

static bool entry_live(const zev__heap_entry_t *e)
{
    return e->t->in_heap && e->t->seq == e->seq;
}

static void sift_up(zev__timers_t *h, size_t i)
{
    zev__heap_entry_t e = h->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / ARITY;
        if (!before(&e, &h->heap[parent]))
            break;
        h->heap[i] = h->heap[parent];
        i = parent;
    }
    h->heap[i] = e;
}

static void sift_down(zev__timers_t *h, size_t i)
{
    zev__heap_entry_t e = h->heap[i];
    for (;;) {
        size_t child = ARITY * i + 1;
        if (child >= h->heap_len)
            break;
        size_t last = child + ARITY < h->heap_len ? child + ARITY : h->heap_len;
        size_t best = child;
        while (++child < last)
            if (before(&h->heap[child], &h->heap[best]))
                best = child;
        if (!before(&h->heap[best], &e))
            break;
        h->heap[i] = h->heap[best];
        i = best;
    }
    h->heap[i] = e;
}

/* Drops every dead entry and restores the heap: O(n). */
static void compact(zev__timers_t *h)
{
    size_t n = 0, i = 0;
    while (i < h->heap_len) {
        if (entry_live(&h->heap[i]))
            h->heap[n++] = h->heap[i];
        i++;
    }
    h->heap_len = n;
    i = n > 1 ? (n - 2) / ARITY + 1 : 0; /* one past the last parent */
    while (i-- > 0)
        sift_down(h, i);
}

/* Room was reserved when t left the pool: at most live entries are live,
 * so a full array compacts to at most half. */
static void heap_insert(zev__timers_t *h, zev_timer_t *t)
{
    if (h->heap_len == h->heap_cap)
        compact(h);
    t->seq = h->seq++;
    t->in_heap = true;
    h->heap[h->heap_len] = (zev__heap_entry_t){t->deadline_ns, t->seq, t};
    sift_up(h, h->heap_len++);
}

/* Lazy: the entry stays, dead, until it comes to the top or a compaction. */
static void heap_remove(zev__timers_t *h, zev_timer_t *t)
{
    (void)h;
    t->in_heap = false;
}

static void pop_top(zev__timers_t *h)
{
    if (--h->heap_len) {
        h->heap[0] = h->heap[h->heap_len];
        sift_down(h, 0);
    }
}

/* The top entry is live, or the heap empty. */
static void drop_dead_tops(zev__timers_t *h)
{
    while (h->heap_len && !entry_live(&h->heap[0]))
        pop_top(h);
}

/* ------------------------------------------------------------------- pool */

/* A timer out of the pool, with room for it in the heap; NULL/ENOMEM. */
static zev_timer_t *pool_get(zev_loop_t *loop, zev_timer_fn fn, void *arg, bool owned)
{
    zev__timers_t *h = &loop->timers;
    if (2 * (h->live + 1) > h->heap_cap) { /* room for compact() to free half */
        size_t cap = zev__grown_cap(h->heap_cap, 64, 2 * (h->live + 1), sizeof *h->heap);
        zev__heap_entry_t *heap = cap ? realloc(h->heap, cap * sizeof *heap) : NULL;
        if (!heap) {
            errno = ENOMEM;
            return NULL;
        }
        h->heap = heap;
        h->heap_cap = cap;
    }
    if (!h->free_head) {
        struct zev__timer_chunk *c = calloc(1, sizeof *c);
        if (!c) {
            errno = ENOMEM;
            return NULL;
        }
        c->next = h->chunks;
        h->chunks = c;
        for (size_t i = 0; i < CHUNK_TIMERS; i++) {
            c->timers[i].next_free = i + 1 < CHUNK_TIMERS ? &c->timers[i + 1] : NULL;
            c->timers[i].in_heap = false;
        }
        h->free_head = &c->timers[0];
        h->free_tail = &c->timers[CHUNK_TIMERS - 1];
    }
    zev_timer_t *t = h->free_head;
    h->free_head = t->next_free;
    if (!h->free_head)
        h->free_tail = NULL;
    h->live++;
    t->loop = loop;
    t->fn = fn;
    t->arg = arg;
    t->owned = owned;
    t->armed = t->running = t->dead = false;
    t->repeat_ns = 0;
    t->handle = zev__handle_make(t, t->gen);
    return t;
}

/* Back to the pool, at the far end (FIFO), unless its generations are
 * spent: then it is retired and stays in its chunk unused (handle.h). */
static void pool_put(zev_timer_t *t)
{
    zev__timers_t *h = &t->loop->timers;
    if (t->in_heap)
        heap_remove(h, t);
    t->handle = 0;
    h->live--;
    if (zev__handle_retired(++t->gen))
        return;
    t->next_free = NULL;
    if (h->free_tail)
        h->free_tail->next_free = t;
    else
        h->free_head = t;
    h->free_tail = t;
}

/* The timer a handle names, if it is still the handle's; NULL/EINVAL. */
static zev_timer_t *timer_of(const zev_timer_t *handle)
{
    zev_timer_t *t = handle ? zev__handle_obj(handle) : NULL;
    if (!t || t->handle != (uintptr_t)handle) {
        errno = EINVAL;
        return NULL;
    }
    ZEV__LOOP_THREAD(t->loop);
    return t;
}

/* ---------------------------------------------------------------- arming */

void zev__timer_arm_at(zev_timer_t *t, uint64_t deadline_ns)
{
    zev__timers_t *h = &t->loop->timers;
    if (t->in_heap)
        heap_remove(h, t);
    t->deadline_ns = deadline_ns;
    t->armed = true;
    heap_insert(h, t);
    zev__loop_changed(t->loop);
}

void zev__timer_disarm(zev_timer_t *t)
{
    if (t->in_heap)
        heap_remove(&t->loop->timers, t);
    t->armed = false;
    zev__loop_changed(t->loop); /* the host need not wake for it */
}

static void arm(zev_timer_t *t, uint64_t delay_us, uint64_t repeat_us)
{
    t->repeat_ns = zev__us_to_ns(repeat_us);
    zev__timer_arm_at(t, zev__sat_add(zev__now(t->loop), zev__us_to_ns(delay_us)));
}

/* Ends a timer: its handle is stale at once; the slot goes back to the
 * pool now, or when its callback returns. */
static void end(zev_timer_t *t)
{
    if (t->running) {
        t->dead = true;
        t->handle = 0;        /* no handle names it any more (pool_put's rule) */
        zev__timer_disarm(t); /* if re-armed inside its callback */
        return;
    }
    zev_loop_t *loop = t->loop;
    pool_put(t);
    zev__loop_changed(loop);
}

zev_timer_t *zev__timer_new(zev_loop_t *loop, zev_timer_fn fn, void *arg)
{
    return pool_get(loop, fn, arg, true);
}

void zev__timer_free(zev_timer_t *t)
{
    if (t)
        end(t);
}

/* ------------------------------------------------------------- public API */

zev_timer_t *zev_timer_start(zev_loop_t *loop, uint64_t delay_us, uint64_t repeat_us,
                             zev_timer_fn fn, void *arg)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop || !fn) {
        errno = EINVAL;
        return NULL;
    }
    zev_timer_t *t = pool_get(loop, fn, arg, false);
    if (!t)
        return NULL;
    arm(t, delay_us, repeat_us);
    return (zev_timer_t *)t->handle;
}

int zev_timer_cancel(zev_timer_t *handle)
{
    zev_timer_t *t = timer_of(handle);
    if (!t || t->owned) {
        errno = EINVAL; /* an owned timer is disarmed or freed, not cancelled */
        return -1;
    }
    end(t);
    return 0;
}

zev_timer_t *zev_timer_new(zev_loop_t *loop, zev_timer_fn fn, void *arg)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop || !fn) {
        errno = EINVAL;
        return NULL;
    }
    zev_timer_t *t = pool_get(loop, fn, arg, true);
    return t ? (zev_timer_t *)t->handle : NULL;
}

/* An owned timer a handle names; NULL/EINVAL otherwise. */
static zev_timer_t *owned_of(const zev_timer_t *handle)
{
    zev_timer_t *t = timer_of(handle);
    if (t && !t->owned) {
        errno = EINVAL;
        return NULL;
    }
    return t;
}

int zev_timer_arm(zev_timer_t *handle, uint64_t delay_us, uint64_t repeat_us)
{
    zev_timer_t *t = owned_of(handle);
    if (!t)
        return -1;
    arm(t, delay_us, repeat_us);
    return 0;
}

int zev_timer_disarm(zev_timer_t *handle)
{
    zev_timer_t *t = owned_of(handle);
    if (!t)
        return -1;
    zev__timer_disarm(t);
    return 0;
}

int zev_timer_free(zev_timer_t *handle)
{
    zev_timer_t *t = owned_of(handle);
    if (!t)
        return -1;
    end(t);
    return 0;
}

uint64_t zev_timer_due(const zev_timer_t *handle)
{
    zev_timer_t *t = timer_of(handle);
    if (!t)
        return 0;
    return t->armed || t->running ? t->deadline_ns : 0;
}

/* ------------------------------------------------------------ run phase */

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
    zev__timers_t *h = &loop->timers;
    size_t ran = 0;
    for (;;) {
        drop_dead_tops(h);
        if (!h->heap_len || h->heap[0].deadline_ns > loop->now_ns || h->heap[0].seq >= seq_bound)
            break;
        zev_timer_t *t = h->heap[0].t;
        pop_top(h);
        t->in_heap = false;
        ran++;
        t->armed = t->repeat_ns != 0; /* a one-shot has had its run */
        t->running = true;
        loop->stats.timers_fired++;
        uint64_t t0 = zev__watch_begin(loop);
        if (t0)
            zev__lag(loop, t->deadline_ns, t0);
        zev_timer_t *handle = (zev_timer_t *)t->handle;
        t->fn(handle, t->arg);
        zev__watch_end(loop, t0, ZEV_SLOW_TIMER, handle, NULL);
        t->running = false;
        if (t->dead) { /* cancelled or freed inside its callback */
            pool_put(t);
            continue;
        }
        if (t->in_heap)
            continue; /* re-armed inside its callback: that deadline stands */
        if (t->armed)
            zev__timer_arm_at(t, next_on_grid(t->deadline_ns, t->repeat_ns, loop->now_ns));
        else if (!t->owned)
            pool_put(t); /* a loop-owned one-shot ends after its run */
    }
    return ran;
}

uint64_t zev__timers_next(zev_loop_t *loop)
{
    drop_dead_tops(&loop->timers);
    return loop->timers.heap_len ? loop->timers.heap[0].deadline_ns : UINT64_MAX;
}

void zev__timers_free(zev_loop_t *loop)
{
    zev__timers_t *h = &loop->timers;
    while (h->chunks) {
        struct zev__timer_chunk *next = h->chunks->next;
        free(h->chunks);
        h->chunks = next;
    }
    free(h->heap);
    *h = (zev__timers_t){0};
}
