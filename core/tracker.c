/*
 * Zero-copy sends and their trackers (PyZMQ's copy=False, track=True).
 *
 * Design notes
 * - libzmq calls the message's free function exactly once, from whatever
 *   thread drops the last reference (usually its I/O thread). The
 *   trampoline runs the user's free function right there, then sends the
 *   tracker home through the hub's lock-free queue; the completion (done
 *   flag, on_done callback) runs on the loop thread. A message never sent
 *   (closed stream, ECANCELED) is closed by zev, which runs the same
 *   trampoline: every tracker completes exactly once either way.
 * - A tracker has two references: the user's (until zev_tracker_release)
 *   and the completion's (until it has run). It holds a hub reference until
 *   its completion is queued, so completions after zev_loop_destroy are safe
 *   (they then call nothing). A send without a tracker out (out NULL) has
 *   no completion to run: its trampoline ends the tracker on libzmq's
 *   thread, with no trip to the loop and no wakeup (it holds no hub
 *   reference); without a free function either, no tracker is made at all.
 * - `done` is set by the trampoline itself, right after the free function,
 *   on libzmq's thread: zev_tracker_done answers from any thread without
 *   waiting for the loop to drain the completion, which after
 *   zev_loop_destroy may take as long as an unrelated kept frame is out.
 *   `completed` is the loop thread's own flag: the completion ran there, so
 *   zev_tracker_on_done may call at once without calling twice.
 * - Delayed completions (zev_stream_set_tracker_delay): a completion
 *   normally wakes a sleeping loop, one wakeup per completion when they
 *   trickle in one by one (a tcp sender's I/O thread frees each buffer as
 *   the peer makes room). A delayed tracker's completion is pushed without
 *   a wakeup; the loop finds it at its next iteration, and while any
 *   delayed tracker is out (hub->delayed_out) it never sleeps past
 *   zev__trackers_deadline, at most the shortest delay out from when it
 *   went to sleep. Trackers are counted per delay bucket as well, so that
 *   a short delay that is no longer out stops setting the pace (up to
 *   ZEV__DELAY_BUCKETS distinct delays exactly; beyond, a tracker shares a
 *   shorter delay's bucket, never a longer one). The last delayed tracker
 *   to finish (the total reaches 0) wakes the loop as any completion
 *   would, so a burst's end is delivered at once and a loop with nothing
 *   out sleeps uncapped. The counts go up before libzmq can see the
 *   buffer and down in the trampoline, completed or abandoned, so they are
 *   never low: the loop reads 0 only after the wakeup of whoever brought
 *   it there. The trampoline reads the tracker before it pushes the
 *   completion: after the push the loop may run it and reuse the tracker.
 * - Buffers of at most ZEV_ZC_COPY_MAX bytes are copied: libzmq keeps such
 *   messages inline in the zmq_msg_t, while referencing a user buffer costs
 *   it an allocation; the free function then runs before the send returns.
 */
#include "zev-internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#ifdef ZEV__ASAN
#include <sanitizer/asan_interface.h>
#define ZEV__POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define ZEV__UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define ZEV__POISON(p, n) ((void)(p), (void)(n))
#define ZEV__UNPOISON(p, n) ((void)(p), (void)(n))
#endif

struct zev_tracker {
    zev__qnode_t qnode;
    zev__hub_t *hub;
    zev_loop_t *loop; /* for on_done's at-once call (loop thread, loop alive) */
    atomic_int refs;
    atomic_int done; /* the free function ran (any thread) */
    bool completed;  /* the completion ran on the loop thread */
    bool abandoned;  /* the send failed: the buffer stays the caller's */
    bool delayed;    /* counted in hub->delayed_out: completes without a wakeup */
    uint8_t bucket;  /* and in hub->bucket_out[bucket] */
    unsigned notify_pending; /* on_done calls from fibers tracker_notify will answer */
    zev_tracker_fn fn;
    void *arg;
    zev_free_fn free_fn;
    void *data;
    void *hint;
};

/* A tracker whose last reference goes on a thread iterating a loop is kept
 * in that loop's cache (any loop's: it is only memory), else freed. The
 * last reference of a tracked send goes on the loop thread, from its
 * completion or from zev_tracker_release, usually inside an iteration. */
static void tracker_unref(zev_tracker_t *t)
{
    if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    zev_loop_t *loop = zev__iterating;
    if (loop && loop->ntracker_cache < ZEV__TRACKER_CACHE) {
        ZEV__POISON(t, sizeof *t); /* ASan still sees a use after release */
        loop->tracker_cache[loop->ntracker_cache++] = t;
    } else
        free(t);
}

/* A zeroed tracker: from the loop's cache, or the heap (NULL, ENOMEM). */
static zev_tracker_t *tracker_new(zev_loop_t *loop)
{
    if (!loop->ntracker_cache) {
        zev_tracker_t *t = calloc(1, sizeof *t);
        if (!t)
            errno = ENOMEM;
        return t;
    }
    zev_tracker_t *t = loop->tracker_cache[--loop->ntracker_cache];
    ZEV__UNPOISON(t, sizeof *t);
    memset(t, 0, sizeof *t);
    return t;
}

void zev__trackers_free(zev_loop_t *loop)
{
    while (loop->ntracker_cache) {
        zev_tracker_t *t = loop->tracker_cache[--loop->ntracker_cache];
        ZEV__UNPOISON(t, sizeof *t);
        free(t);
    }
}

/* on_done called for a completed tracker from a fiber: run from the loop
 * (no callback on a fiber's stack); it held a reference meanwhile. */
static void tracker_notify(zev__qnode_t *n, zev_loop_t *loop)
{
    zev_tracker_t *t = (zev_tracker_t *)n;
    unsigned calls = t->notify_pending; /* one per on_done call, as outside fibers */
    t->notify_pending = 0;
    for (; loop && calls; calls--) {
        if (!t->fn)
            break;
        uint64_t t0 = zev__watch_begin(loop);
        t->fn(t, t->arg);
        zev__watch_end(loop, t0, ZEV_SLOW_TRACKER, t, NULL);
    }
    tracker_unref(t);
}

/* On the loop thread, or on the hub's last owner with loop == NULL. */
static void tracker_completed(zev__qnode_t *n, zev_loop_t *loop)
{
    zev_tracker_t *t = (zev_tracker_t *)n;
    if (loop) {
        t->completed = true;
        if (t->fn) {
            uint64_t t0 = zev__watch_begin(loop);
            t->fn(t, t->arg);
            zev__watch_end(loop, t0, ZEV_SLOW_TRACKER, t, NULL);
        }
    }
    tracker_unref(t);
}

/* The delay bucket a tracker delayed by `delay` joins (loop thread, the
 * only one that adds to the counts): the bucket with that delay; else a
 * free one, which takes it; else the one with the longest delay not above
 * it; else the shortest one, lowered to it. Its completion is then never
 * later than its delay asks, and exactly on time for up to
 * ZEV__DELAY_BUCKETS distinct delays out at once. */
static unsigned delay_bucket(zev_loop_t *loop, uint64_t delay)
{
    const unsigned none = ZEV__DELAY_BUCKETS;
    unsigned unused = none, below = none, shortest = none, b = 0;
    const uint64_t *d = loop->bucket_delay_ns;
    while (b < ZEV__DELAY_BUCKETS) {
        if (!atomic_load_explicit(&loop->hub->bucket_out[b], memory_order_relaxed)) {
            if (unused == none)
                unused = b;
        } else if (d[b] == delay) {
            return b;
        } else {
            if (d[b] < delay && (below == none || d[b] > d[below]))
                below = b;
            if (shortest == none || d[b] < d[shortest])
                shortest = b;
        }
        b++;
    }
    if (unused != none) {
        loop->bucket_delay_ns[unused] = delay;
        return unused;
    }
    if (below != none)
        return below;
    loop->bucket_delay_ns[shortest] = delay; /* its trackers only come earlier */
    return shortest;
}

/* A delayed tracker is finished with (completed or abandoned); its fields
 * were read before its completion was pushed (the loop may reuse it after
 * that). 1 if it was the last one out: its wakeup announces every delayed
 * completion. The bucket goes first, so a loop that reads the total above
 * 0 and no bucket above 0 knows that the last one is about to wake it. */
static bool delayed_last(zev__hub_t *hub, bool delayed, unsigned bucket)
{
    if (!delayed)
        return false;
    atomic_fetch_sub(&hub->bucket_out[bucket], 1);
    return atomic_fetch_sub(&hub->delayed_out, 1) == 1;
}

uint64_t zev__trackers_deadline(zev_loop_t *loop, uint64_t now)
{
    if (!atomic_load_explicit(&loop->hub->delayed_out, memory_order_relaxed))
        return UINT64_MAX;
    uint64_t cap = UINT64_MAX; /* the shortest delay out */
    unsigned b = 0;
    while (b < ZEV__DELAY_BUCKETS) {
        if (atomic_load_explicit(&loop->hub->bucket_out[b], memory_order_relaxed) &&
            loop->bucket_delay_ns[b] < cap)
            cap = loop->bucket_delay_ns[b];
        b++;
    }
    if (cap == UINT64_MAX)
        return UINT64_MAX; /* only finishing ones: the last wakes the loop */
    /* now + cap, rounded down to a multiple of cap/2: the same deadline for
     * every iteration within half a delay, so an embedded loop re-arms its
     * timer fd about twice per delay, not once per iteration. */
    uint64_t half = cap / 2 ? cap / 2 : 1;
    return zev__sat_add(now, cap) / half * half;
}

/* libzmq's free function: any thread, exactly once per message. */
static void trampoline(void *data, void *hint)
{
    (void)data;
    zev_tracker_t *t = hint;
    ZEV_HB_ACQUIRE(t); /* pairs with the release before zmq_msg_init_data */
    zev__hub_t *hub = t->hub;
    bool delayed = t->delayed; /* t is the loop's once its completion is pushed */
    unsigned bucket = t->bucket;
    if (t->abandoned) {
        if (hub && delayed_last(hub, delayed, bucket))
            zev__hub_wake(hub); /* for the delayed completions before it */
        tracker_unref(t);
        if (hub)
            zev__hub_unref(hub);
        return;
    }
    if (t->free_fn)
        t->free_fn(t->data, t->hint);
    if (!hub) { /* no one holds the tracker: no completion to run, no wakeup */
        tracker_unref(t);
        return;
    }
    atomic_store(&t->done, 1);
    zev__hub_push(hub, &t->qnode); /* the loop owns the tracker now: no t-> below */
    if (!delayed || delayed_last(hub, delayed, bucket))
        zev__hub_wake(hub);
    zev__hub_unref(hub);
}

/* zev_stream_send_zc with neither a free function nor a tracker: nothing
 * to call back, so no tracker at all (no allocation; libzmq references a
 * buffer without a free function without allocating either). */
static __attribute__((noinline)) int send_untracked(zev_stream_t *s, void *data, size_t len)
{
    if (len <= ZEV_ZC_COPY_MAX)
        return zev_stream_send(s, data, len, 0);
    zmq_msg_t msg;
    if (zmq_msg_init_data(&msg, data, len, NULL, NULL) < 0)
        return -1;
    int saved = errno;
    int rc = zev_stream_send_msg(s, &msg, 1, 0);
    int err = errno;
    zmq_msg_close(&msg); /* empty if the send took it; else references only */
    errno = rc < 0 ? err : saved;
    return rc;
}

/* zev_stream_send_zc once the stream has said it would take a message: a
 * tracker, libzmq's message referencing the buffer, and the send. Out of
 * line so that a refused call (EAGAIN at max_queue, the common case of a
 * sender topping its queue up from callbacks) pays for none of it. */
static __attribute__((noinline)) int send_tracked(zev_stream_t *s, void *data, size_t len,
                                                  zev_free_fn free_fn, void *hint,
                                                  zev_tracker_t **out)
{
    zev_tracker_t *t = tracker_new(s->loop);
    if (!t)
        return -1;
    t->qnode.run = tracker_completed;
    t->hub = out ? s->loop->hub : NULL; /* no tracker out: the trampoline ends it */
    t->loop = s->loop;
    atomic_init(&t->refs, out ? 2 : 1);
    atomic_init(&t->done, 0);
    t->free_fn = free_fn;
    t->data = data;
    t->hint = hint;
    if (t->hub)
        zev__hub_ref(t->hub);

    zmq_msg_t msg;
    bool copied = len <= ZEV_ZC_COPY_MAX;
    if (t->hub && s->tracker_delay_ns && !copied) { /* counted before libzmq sees it */
        t->delayed = true;
        t->bucket = (uint8_t)delay_bucket(s->loop, s->tracker_delay_ns);
        atomic_fetch_add(&t->hub->bucket_out[t->bucket], 1);
        atomic_fetch_add(&t->hub->delayed_out, 1);
    }
    ZEV_HB_RELEASE(t);
    int rc =
        copied ? zmq_msg_init_size(&msg, len) : zmq_msg_init_data(&msg, data, len, trampoline, t);
    if (rc < 0) {
        int err = errno;
        atomic_init(&t->refs, 1);
        t->abandoned = true;
        trampoline(data, t);
        errno = err;
        return -1;
    }
    if (copied && len)
        memcpy(zmq_msg_data(&msg), data, len);
    int saved = errno; /* a copied buffer's free_fn runs below, inside this call */
    /* Taken, msg is left empty (nothing to close); errno is as it was. */
    if (zev__stream_send_one(s, &msg) < 0) {
        int err = errno;
        atomic_init(&t->refs, 1);
        t->abandoned = true; /* nothing was taken: the buffer is the caller's */
        zmq_msg_close(&msg);
        if (copied)
            trampoline(data, t);
        errno = err;
        return -1;
    }
    if (copied) {
        trampoline(data, t); /* libzmq holds a copy: the buffer is done with */
        errno = saved;
    }
    if (out)
        *out = t;
    return 0;
}

int zev_stream_send_zc(zev_stream_t *s, void *data, size_t len, zev_free_fn free_fn, void *hint,
                       zev_tracker_t **out)
{
    if (!s || (!data && len)) {
        errno = EINVAL;
        return -1;
    }
    if (!out && !free_fn)
        return send_untracked(s, data, len);
    if (zev__stream_send_refused(s, __func__))
        return -1; /* before a tracker is made for nothing */
    return send_tracked(s, data, len, free_fn, hint, out);
}

int zev_tracker_done(const zev_tracker_t *t)
{
    if (!t) {
        errno = EINVAL;
        return -1;
    }
    return atomic_load(&((zev_tracker_t *)t)->done);
}

int zev_tracker_on_done(zev_tracker_t *t, zev_tracker_fn fn, void *arg)
{
    if (!t) {
        errno = EINVAL;
        return -1;
    }
    t->fn = fn;
    t->arg = arg;
    if (fn && t->completed && zev__fiber_current()) { /* not on a fiber's stack */
        if (t->notify_pending++)
            return 0; /* queued already (its node is in use): it answers this call too */
        atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
        t->qnode.run = tracker_notify;
        zev__hub_push(t->hub, &t->qnode);
        zev__hub_wake(t->hub);
    } else if (fn && t->completed) { /* completed before anyone asked: tell now */
        zev__callbacks_enter(t->loop);
        fn(t, arg);
        zev__callbacks_leave(t->loop);
    }
    return 0;
}

int zev_tracker_release(zev_tracker_t *t)
{
    if (!t) {
        errno = EINVAL;
        return -1;
    }
    t->fn = NULL;
    tracker_unref(t);
    return 0;
}
