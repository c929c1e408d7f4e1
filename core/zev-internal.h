/*
 * Internals shared by the core files. Nothing here is public; backends see
 * only backends/backend.h.
 */
#ifndef ZEV_INTERNAL_H
#define ZEV_INTERNAL_H

#include "zev.h"

#include "../backends/backend.h"
#include "ctx.h"
#include "handle.h"
#include "list.h"
#include "stack.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#define ZEV_INTERNAL __attribute__((visibility("hidden")))

/* libzmq is not instrumented: ThreadSanitizer cannot see that what the
 * loop thread did before zmq_msg_init_data() happens before libzmq calls the
 * free function on its I/O thread (the message travels through libzmq's
 * lock-free pipes). zero-copy sends tell it, or each is reported as a race. */
#if defined(__SANITIZE_THREAD__)
#define ZEV_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ZEV_TSAN 1
#endif
#endif
#ifdef ZEV_TSAN
#include <sanitizer/tsan_interface.h>
#define ZEV_HB_RELEASE(p) __tsan_release(p)
#define ZEV_HB_ACQUIRE(p) __tsan_acquire(p)
#else
#define ZEV_HB_RELEASE(p) ((void)(p))
#define ZEV_HB_ACQUIRE(p) ((void)(p))
#endif

/* Loop lag histogram (stats.c): 4 buckets per power of two of ns. */
#define ZEV__LAG_BUCKETS (4 * 48)

/* What a backend hands back in zev_fired_t.data: every registered object
 * starts with one of these. */
typedef enum {
    ZEV__H_IO = 1,
    ZEV__H_STREAM,
    ZEV__H_WAKEUP,
    ZEV__H_TIMERFD,
    ZEV__H_FIBER_FD /* an fd a fiber waits for (fiber.c) */
} zev__kind_t;

/* ------------------------------------------------ cross-thread queue (queue.c) */

typedef struct zev__qnode zev__qnode_t;
/* Runs a node on the loop thread (loop != NULL) or, once the loop is gone,
 * on whichever thread drops the hub's last reference (loop == NULL: release
 * resources only, call nothing of the user's except free functions). */
typedef void (*zev__qrun_fn)(zev__qnode_t *n, zev_loop_t *loop);

struct zev__qnode {
    _Atomic(zev__qnode_t *) next;
    zev__qrun_fn run;
};

/* The part of a loop that may outlive it: the MPSC queue, its wakeup fd and
 * the pool of kept-frame handles. They live together because kept frames and
 * trackers come home through the queue, from any thread and possibly after
 * zev_loop_destroy, and a frame's handle must return to its pool then too:
 * all three must outlast the loop for exactly as long as one such object is
 * out. Reference-counted: the loop holds one reference, each kept frame and
 * live tracker one more. Whoever drops the last reference drains what is
 * still queued (loop == NULL) and frees it. */
#define ZEV__DELAY_BUCKETS 8 /* distinct tracker delays a loop tells apart */

typedef struct zev__hub {
    _Atomic(zev__qnode_t *) head; /* producers exchange here */
    zev__qnode_t *tail;           /* consumer only */
    zev__qnode_t stub;
    atomic_int refs;
    atomic_int wake_pending;   /* 1 while a wakeup is written and not yet read */
    /* Delayed tracker completions (tracker.c): tracked zero-copy sends of
     * streams with a tracker delay whose completion has not been pushed,
     * in all and per delay bucket (the bucket's delay is the loop's). */
    atomic_size_t delayed_out;
    atomic_size_t bucket_out[ZEV__DELAY_BUCKETS];
    int wake_rfd, wake_wfd;    /* eventfd (both the same) or a pipe */
    zev__kind_t wake_kind;     /* registered with the backend as a handle */
    zev_frame_t *frame_free, *frame_free_tail; /* FIFO pool (loop thread / last ref) */
    zmq_msg_t empty; /* zmq_msg_init'ed once: what a moved message leaves (zev__msg_move) */
    struct zev__chunk *chunks; /* allocation chunks of the pool */
} zev__hub_t;

ZEV_INTERNAL zev__hub_t *zev__hub_new(void);
/* Inline: a kept frame takes and drops a reference (once per message). */
static inline void zev__hub_ref(zev__hub_t *hub)
{
    atomic_fetch_add_explicit(&hub->refs, 1, memory_order_relaxed);
}
ZEV_INTERNAL void zev__hub_free(zev__hub_t *hub); /* the last reference is gone */
static inline void zev__hub_unref(zev__hub_t *hub)
{
    if (atomic_fetch_sub_explicit(&hub->refs, 1, memory_order_acq_rel) == 1)
        zev__hub_free(hub);
}
ZEV_INTERNAL void zev__hub_push(zev__hub_t *hub, zev__qnode_t *n); /* any thread */
ZEV_INTERNAL void zev__hub_wake(zev__hub_t *hub);                  /* any thread */
ZEV_INTERNAL void zev__hub_clear_wake(zev__hub_t *hub);            /* loop thread */
ZEV_INTERNAL int zev__hub_pending(zev__hub_t *hub);                /* loop thread */
/* The loop this thread is iterating (loop_iterate sets it, and restores the
 * outer one when a callback runs another loop's iteration), else NULL. A
 * frame released on that thread comes home without the queue (msg.c). */
extern _Thread_local zev_loop_t *zev__iterating
    __attribute__((tls_model("initial-exec"), visibility("hidden")));
/* 1 while a wakeup is written and not yet read (loop thread). */
static inline int zev__hub_wake_pending(zev__hub_t *hub)
{
    return atomic_load_explicit(&hub->wake_pending, memory_order_relaxed);
}
/* Runs what was queued when the call began; returns the number run. */
ZEV_INTERNAL size_t zev__hub_drain(zev__hub_t *hub, zev_loop_t *loop);
/* Runs everything until the queue is empty, waiting out a producer between
 * its exchange and its link (the last drain: destroy, the last reference). */
ZEV_INTERNAL size_t zev__hub_drain_all(zev__hub_t *hub, zev_loop_t *loop);

/* ------------------------------------------------------------- fd map (fdmap.c) */

/* fd -> registered object, open addressing, grown on demand. Each
 * registration gets a serial; (serial, fd) is the token the backend hands
 * back, so an event from a registration the map no longer holds (or one
 * whose fd number was registered again since) finds nothing. */
typedef struct zev__fdmap {
    struct zev__fdslot {
        int fd; /* -1 empty, -2 deleted */
        uint32_t serial;
        void *obj;
    } * slots;
    size_t cap, used, tombs;
    uint32_t serial; /* the last one given */
} zev__fdmap_t;

ZEV_INTERNAL void *zev__fdmap_get(const zev__fdmap_t *m, int fd);
ZEV_INTERNAL int zev__fdmap_put(zev__fdmap_t *m, int fd, void *obj); /* -1/ENOMEM */
ZEV_INTERNAL void zev__fdmap_del(zev__fdmap_t *m, int fd);
ZEV_INTERNAL void zev__fdmap_free(zev__fdmap_t *m);
/* The backend token of fd's registration (0 if none). */
ZEV_INTERNAL uint64_t zev__fdmap_token(const zev__fdmap_t *m, int fd);
/* The object a token names, or NULL if that registration is gone. A token
 * without a serial (kqueue on 32-bit systems) matches its fd's object. */
ZEV_INTERNAL void *zev__fdmap_by_token(const zev__fdmap_t *m, uint64_t token);

/* --------------------------------------------------------------------- timers */

/* Time arithmetic saturates, as libuv's does: UINT64_MAX is the end of time,
 * a deadline that never comes (zev_timer_start(loop, UINT64_MAX, ...) is a
 * common way to say "never"), and no delay or repeat wraps around. */
static inline uint64_t zev__sat_add(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static inline uint64_t zev__us_to_ns(uint64_t us)
{
    return us > UINT64_MAX / 1000u ? UINT64_MAX : us * 1000u;
}

/* Every timer comes from its loop's pool (timer.c) and is named by a
 * generation-tagged handle (handle.h). */
struct zev_timer {
    _Alignas(ZEV__HANDLE_ALIGN) zev_loop_t *loop; /* the handle's low bits (handle.h) */
    uint64_t deadline_ns;
    uint64_t repeat_ns;
    uint64_t seq;      /* (re)arm order, breaks deadline ties (FIFO) */
    bool in_heap;      /* armed: the heap entry with its seq is live */
    zev_timer_fn fn;
    void *arg;
    uintptr_t handle;       /* what its owner holds; 0 while in the pool */
    zev_timer_t *next_free; /* the pool's FIFO */
    uint32_t gen;           /* bumped each time it ends; retired when spent */
    bool owned;             /* zev_timer_new: the user's until zev_timer_free */
    bool armed;             /* due to run (again); false once a one-shot ran */
    bool running;           /* its callback is on the stack */
    bool dead;              /* cancelled or freed in its callback: pooled after it */
};

/* A heap entry: the timer's key beside it, so ordering reads no timer. */
typedef struct zev__heap_entry {
    uint64_t deadline_ns;
    uint64_t seq;
    zev_timer_t *t;
} zev__heap_entry_t;

/* A loop's timers: the heap of armed ones and the pool they all come from. */
typedef struct zev__timers {
    zev__heap_entry_t *heap; /* 4-ary min-heap on (deadline_ns, seq), with dead entries */
    size_t heap_len, heap_cap;
    size_t live;                   /* timers out of the pool: heap_cap >= 2 x live */
    uint64_t seq;                  /* next (re)arm order */
    zev_timer_t *free_head, *free_tail;
    struct zev__timer_chunk *chunks;
} zev__timers_t;

/* ---------------------------------------------------------------------- io */

struct zev_io {
    zev__kind_t kind; /* ZEV__H_IO, first: the backend hands this back */
    zev_loop_t *loop;
    int fd;
    int events;
    zev_io_fn fn;
    void *arg;
    zev__list_t node; /* loop->ios, or loop->closing_ios once stopped */
    bool active;
};

/* -------------------------------------------------------------------- streams */

typedef struct zev__sendpart {
    zmq_msg_t msg;
    uint64_t queued_ns; /* when its message was queued (first parts): send deadlines */
    bool more;          /* more parts of this message follow */
} zev__sendpart_t;

/* on_send statuses waiting to be reported, run-length encoded: `count`
 * messages with consecutive sequence numbers from `seq`, one status. */
typedef struct zev__report {
    int status;
    uint64_t seq;
    size_t count;
} zev__report_t;

struct zev_msg {
    zev_stream_t *stream;
    zmq_msg_t *parts; /* the stream's receive ring */
    zmq_msg_t **at;   /* where part i is: &parts[i], or its kept frame's msg */
    size_t *sizes;    /* part i's size as zmq_msg_recv said, SIZE_MAX: ask libzmq */
    size_t n;
};

/* A kept frame, from the hub's pool, named by a generation-tagged handle
 * (handle.h). `handle` is what its owner holds: 0 while pooled, and
 * ZEV__FRAME_ZEVS once zev_stream_send_frame took it. Claiming it is a
 * compare-and-swap from the caller's handle, so of two releases (or a
 * release and a send) from any threads exactly one wins, and a stale handle
 * never matches. */
#define ZEV__FRAME_ZEVS ((uintptr_t)1)
struct zev_frame {
    _Alignas(ZEV__HANDLE_ALIGN) zev__qnode_t qnode; /* release travels back through the hub */
    zmq_msg_t msg;
    zev__hub_t *hub;
    zev_stream_t *stream; /* NULL once the stream is gone (loop thread) */
    zev__list_t node;     /* stream->kept_frames while kept */
    zev_frame_t *next_free;
    size_t size;
    _Atomic(uintptr_t) handle;
    uint32_t gen;
};

/* A fiber waiting on a stream (fiber.c): in the stream's recv_waiters or
 * send_waiters, first in, first out. */
typedef struct zev__waiter {
    zev__list_t node;
    zev_fiber_t *fiber;
} zev__waiter_t;

struct zev_stream {
    zev__kind_t kind; /* ZEV__H_STREAM, first */
    zev_loop_t *loop;
    void *sock;
    int fd;
    zev__list_t node;  /* loop->streams, then loop->closing_streams */
    zev__list_t ready; /* loop->ready while it may have work */

    zev_recv_fn on_recv;
    void *recv_arg;
    zev_send_fn on_send;
    void *send_arg;
    zev_close_fn on_close;
    void *close_arg;
    zev_frame_fn on_frame;
    void *frame_arg;

    unsigned batch;   /* 0: the loop's */
    size_t max_queue; /* messages, 0 = unbounded */
    size_t max_frames;
    size_t frames_out; /* kept frames not yet released */
    zev_stream_stats_t stats; /* the counters zev_stream_stats reports */
    zev__list_t kept_frames;

    /* send queue: a ring of parts; qmsgs counts messages with parts in it */
    zev__sendpart_t *q;
    size_t qcap, qhead, qlen, qmsgs;
    enum { OPEN_NONE, OPEN_DIRECT, OPEN_QUEUED, OPEN_DISCARD } open; /* message being built */

    zev__report_t *rep;
    size_t rep_head, rep_len, rep_cap;
    uint64_t seq_given;   /* number of the last message given (zev_stream_send_seq) */
    uint64_t seq_settled; /* number of the last message whose status is known */
    int settled_status;   /* and that status (a fiber's send returns it) */

    /* receive ring */
    zmq_msg_t *ring;
    zmq_msg_t **at; /* msg.at */
    size_t ring_cap;
    size_t ring_used; /* leading slots set up (zmq_msg_init), >= 1; the rest are raw memory */
    size_t rx_parts;  /* parts of a message being received (over several passes) */
    size_t rx_bytes;  /* and their bytes */
    bool rx_dropping; /* draining a message over max_parts */
    size_t max_parts; /* zev_stream_set_max_parts; 0 = unbounded */
    zev_msg_t msg;

    /* What the ZMQ_FD invariant needs (streamio.c): libzmq's last word on
     * the socket and whether anything could have changed it since. */
    uint64_t changes; /* zev's sends, recvs and ZMQ_EVENTS reads, and edges */
    uint64_t told_at; /* `changes` right after libzmq last told the state */
    int told;         /* what it told: ZMQ_POLLIN | ZMQ_POLLOUT */
    int hint;         /* ZMQ_POLLIN: an edge came, try recv before asking */
    bool out_more;    /* libzmq holds the first parts of an unfinished message */

    int err;        /* ENOTSOCK/ETERM once the socket is gone */
    int type;       /* ZMQ_TYPE */
    bool lb_socket; /* PUSH, DEALER: libzmq drops a broken message's rest */
    bool closed;    /* zev_stream_close was called */
    bool flushing;  /* closed with ZEV_CLOSE_FLUSH, queue still draining */
    bool finalized; /* unregistered; waiting for the close callback */
    bool close_socket;
    bool blocked;    /* POLLOUT was reported but the head message got EAGAIN */
    bool in_pass;    /* stream_work is on the stack */
    bool in_recv;    /* recv_some (on_recv with it) is on the stack: the ring is borrowed */
    bool delivering; /* zev__reports_deliver is on the stack */
    int broken;      /* 0, or the status of the message being sent, which
                      * libzmq refused after taking its first part */
    /* The stream's one timer (created at first need) serves three deadlines:
     * the POLLOUT back-off, ZMQ_LINGER of a flushing close, and the send
     * deadline of the message at the head of the queue. */
    zev_timer_t *timer;
    uint64_t backoff_ns;      /* current back-off step */
    uint64_t backoff_until;   /* blocked until then at the latest; 0 = not */
    uint64_t linger_end_ns;   /* ZEV_CLOSE_FLUSH: when ZMQ_LINGER runs out; 0 = never */
    uint64_t send_timeout_ns; /* zev_stream_set_send_timeout; 0 = none */
    uint64_t tracker_delay_ns; /* zev_stream_set_tracker_delay; 0 = wake at once */
    uint64_t head_since_ns;   /* when the queue's head message became the head */
    /* Fibers (fiber.c): waiting to receive or to send, in arrival order; the
     * one woken for the last POLLIN / POLLOUT, until it has acted on it;
     * fibers polling for POLLIN / POLLOUT (all woken together, as zmq_poll
     * wakes every poller); how many are inside a call on the stream (it is
     * freed after they left); the fiber building a multipart message on it
     * (valid while s->open != OPEN_NONE: zev__stream_builder). */
    zev__list_t recv_waiters, send_waiters;
    zev__list_t poll_in, poll_out;
    zev_fiber_t *handed_in, *handed_out;
    /* A fiber forwarding the message it borrows from this stream's ring
     * (zev_fiber_send_msg of its own parts) waits with it: until it
     * returns, nothing receives into the ring (fiber.c). */
    bool ring_lent;
    unsigned fiber_refs;
    bool reaped; /* its close callback ran; freed when fiber_refs is 0 */
    uint64_t fired_ns; /* watching: when its last edge was reported, 0 = none pending */
    zev_fiber_t *open_fiber;
    /* Destinations whose last message timed out (sendq.c): a ROUTER's peers
     * by their first frame's hash, the whole socket for other types. A hash
     * set (open addressing, 0 = empty slot), allocated when a destination
     * first times out and grown only then. */
    uint64_t *timed_out;
    size_t timed_out_cap; /* slots: 0 or a power of two */
    size_t ntimed_out;    /* destinations in it */
    size_t timed_out_hand; /* where eviction looks next, at the bound */
    bool routed; /* ROUTER, STREAM: a message's first frame names its peer */
};

/* --------------------------------------------------------------------- loop */

#define ZEV__TRACKER_CACHE 256 /* trackers a loop keeps for reuse */

struct zev_loop {
    const zev_backend_ops_t *ops;
    void *be;
    zev__hub_t *hub;
    unsigned batch;
    unsigned spin_us;
    uint64_t now_ns;
    atomic_int stop_requested;
    /* ZEV_THREAD_CHECKS: the thread inside zev_loop_run / run_once, while
     * `running` (written by that thread; read by any with acquire). */
    pthread_t runner;
    atomic_bool running;
    int depth;       /* > 0 while an iteration runs (inside callbacks) */
    bool destroying; /* zev_loop_destroy runs: no new streams (they would outlive it) */
    bool forked;     /* destroyed in a forked child: leave the parent's kernel objects */
    pid_t pid;       /* the process that made the loop */
    size_t nstreams; /* streams registered with the backend */
    size_t nios;     /* io watchers registered with the backend */
    size_t nfiberfds; /* fds fibers wait for (zev_fiber_wait_fd, _poll) */
    size_t reported; /* on_send statuses delivered (progress for run_once) */
    uint64_t iteration; /* iterations begun, for fibers' once-per-iteration rule */
    /* Each delay bucket's delay while the hub counts trackers out in it
     * (tracker.c). */
    uint64_t bucket_delay_ns[ZEV__DELAY_BUCKETS];
    /* Trackers freed while this loop iterated, for its next zero-copy sends
     * (tracker.c): a tracked send allocates nothing in steady state. */
    struct zev_tracker *tracker_cache[ZEV__TRACKER_CACHE];
    unsigned ntracker_cache;

    /* Statistics (stats.c): the counters of zev_loop_stats; the timing
     * ones and the slow hook only while `watching`. */
    zev_loop_stats_t stats;
    bool watching;   /* timing on or a slow hook set: callbacks are timed */
    bool timing;     /* zev_loop_set_timing */
    uint64_t slow_ns;
    zev_slow_fn slow_fn;
    void *slow_arg;
    uint32_t lag_hist[ZEV__LAG_BUCKETS];

    /* Fibers (fiber.c). */
    struct zev__fibers {
        zev__ctx_t sched;       /* the loop thread's own context, while fibers run */
        bool in_phase;          /* the fiber phase runs: spawns wait for the next */
        zev__stack_pool_t stacks;
        zev__list_t runnable;   /* fibers to resume, in order */
        zev__list_t later;      /* made runnable in the phase they resumed in */
        zev__list_t all;        /* every fiber not yet freed */
        size_t live;            /* fibers that have not returned */
    } fibers;

    zev__timers_t timers;

    zev__list_t ready;           /* streams that may have work */
    zev__list_t streams;         /* open streams */
    zev__list_t ios;             /* active io watchers */
    zev__list_t closing_streams; /* close callbacks still to run */
    zev__list_t closing_ios;     /* stopped during an iteration, freed at its end */
    zev__fdmap_t fds;

    bool embedded; /* zev_loop_fd was asked for */
    int timer_fd;  /* Linux: armed to the next deadline while embedded */
    zev__kind_t timer_fd_kind;
    uint64_t timer_fd_deadline;

    zev_fired_t fired[64];
};

ZEV_INTERNAL uint64_t zev__clock_ns(void);

/* stats.c: timing a callback while the loop watches them (one branch when
 * it does not):
 *     uint64_t t0 = zev__watch_begin(loop);
 *     fn(...);
 *     zev__watch_end(loop, t0, ZEV_SLOW_TIMER, timer, NULL);          */
static inline uint64_t zev__watch_begin(const zev_loop_t *loop)
{
    return loop->watching ? zev__clock_ns() : 0;
}
ZEV_INTERNAL void zev__watched(zev_loop_t *loop, uint64_t began, int kind, const void *what,
                               zev_cb_fn fn);
static inline void zev__watch_end(zev_loop_t *loop, uint64_t began, int kind, const void *what,
                                  zev_cb_fn fn)
{
    if (began)
        zev__watched(loop, began, kind, what, fn);
}
/* A readiness-to-callback delay, while watching. */
ZEV_INTERNAL void zev__lag(zev_loop_t *loop, uint64_t ready_ns, uint64_t now_ns);
/* The loop's time for something that starts now: the iteration's cached
 * time inside its callbacks, the clock (cached afresh) outside them, where
 * the cached time may be old. */
static inline uint64_t zev__now(zev_loop_t *loop)
{
    if (!loop->depth)
        loop->now_ns = zev__clock_ns();
    return loop->now_ns;
}
/* loop.c: the loop's work or its next deadline changed outside an
 * iteration (host code between run_once calls): make zev_loop_fd say so.
 * Every place that queues work for the next iteration (the ready-list, the
 * close list, the timer heap) calls it; it costs a branch unless embedded. */
ZEV_INTERNAL void zev__loop_changed(zev_loop_t *loop);
/* Around user callbacks zev runs outside an iteration (a flush from host
 * code, a tracker's on_done called at once): inside them the loop counts as
 * running (zev_loop_run/destroy are refused), and what they made is
 * signalled when they are over. The outermost one caches the time afresh,
 * as an iteration does: inside the callbacks zev__now returns the cached
 * time, and the last iteration's may be long past (a timer armed there
 * would be due early, a message queued there overdue at once). */
static inline void zev__callbacks_enter(zev_loop_t *loop)
{
    if (loop->depth++ == 0)
        loop->now_ns = zev__clock_ns();
}
static inline void zev__callbacks_leave(zev_loop_t *loop)
{
    if (--loop->depth == 0)
        zev__loop_changed(loop);
}

/* timer.c: runs the due timers armed before `seq_bound` (loop->timers.seq
 * when the iteration began); returns timers run. */
ZEV_INTERNAL size_t zev__timers_run(zev_loop_t *loop, uint64_t seq_bound);
ZEV_INTERNAL uint64_t zev__timers_next(zev_loop_t *loop); /* UINT64_MAX if none */
/* By when the loop must wake by itself while completions of delayed
 * trackers may wait in the hub unannounced (tracker.c); UINT64_MAX if none. */
ZEV_INTERNAL uint64_t zev__trackers_deadline(zev_loop_t *loop, uint64_t now);
ZEV_INTERNAL void zev__trackers_free(zev_loop_t *loop); /* the cache, at destroy */
ZEV_INTERNAL void zev__timers_free(zev_loop_t *loop);
/* zev's own timers (streams): owned timers used through the object, never
 * through a handle. New: NULL/ENOMEM. Arm and disarm cannot fail. */
ZEV_INTERNAL zev_timer_t *zev__timer_new(zev_loop_t *loop, zev_timer_fn fn, void *arg);
ZEV_INTERNAL void zev__timer_arm_at(zev_timer_t *t, uint64_t deadline_ns);
ZEV_INTERNAL void zev__timer_disarm(zev_timer_t *t);
ZEV_INTERNAL void zev__timer_free(zev_timer_t *t);

/* io.c */
ZEV_INTERNAL void zev__io_dispatch(zev_io_t *io, int events);
ZEV_INTERNAL void zev__io_reap(zev_loop_t *loop);
ZEV_INTERNAL void zev__io_free_all(zev_loop_t *loop);

/* A growing array's next capacity: doubled from cap (from first, a power of
 * two, when the array is empty) until it holds need elements of elem bytes.
 * 0 when that many bytes cannot be counted in a size_t: the caller fails
 * with ENOMEM instead of doubling forever or allocating a wrapped size. */
static inline size_t zev__grown_cap(size_t cap, size_t first, size_t need, size_t elem)
{
    const size_t max = SIZE_MAX / elem;
    for (cap = cap ? cap : first; cap < need; cap *= 2)
        if (cap > max / 2)
            return 0;
    return cap;
}

/* Debug builds (ZEV_THREAD_CHECKS): a function only the loop's thread may
 * call, called from another thread while the loop runs, prints which and
 * aborts. Compiled out otherwise. */
#ifdef ZEV_THREAD_CHECKS
ZEV_INTERNAL void zev__wrong_thread(const zev_loop_t *loop, const char *fn);
#define ZEV__LOOP_THREAD_AT(loop, fn)                                                            \
    do {                                                                                       \
        const zev_loop_t *loop_ = (loop);                                                      \
        if (loop_ && atomic_load_explicit(&loop_->running, memory_order_acquire) &&           \
            !pthread_equal(pthread_self(), loop_->runner))                                     \
            zev__wrong_thread(loop_, (fn));                                                    \
    } while (0)
#else
#define ZEV__LOOP_THREAD_AT(loop, fn) ((void)(fn))
#endif
#define ZEV__LOOP_THREAD(loop) ZEV__LOOP_THREAD_AT((loop), __func__)

/* Whether a libzmq call that failed is to be made again: EINTR, which
 * libzmq returns from a look at the socket's mailbox (before its send,
 * receive, ZMQ_EVENTS or connect has done anything, or after ZMQ_EVENTS ran
 * the commands and so took the ZMQ_FD edge: asking again is the only way
 * to learn what they changed), at most ZEV__EINTR_TRIES times in a row
 * (*tries counts them). A signal interrupts one look; libzmq says EINTR on
 * every call only in a forked child that uses its parent's socket (its
 * signaler checks the pid), where the loop must not be used: there the call
 * fails with EINTR rather than spin. */
#define ZEV__EINTR_TRIES 1000u
static inline bool zev__eintr_again(unsigned *tries)
{
    return errno == EINTR && ++*tries < ZEV__EINTR_TRIES;
}

/* Validates a stream argument for the public setters and sends: 0 with
 * EINVAL or EBADF. Inline because every send checks it. */
static inline int zev__stream_usable_in(const zev_stream_t *s, const char *fn)
{
    if (!s) {
        errno = EINVAL;
        return 0;
    }
    ZEV__LOOP_THREAD_AT(s->loop, fn);
    if (s->closed) {
        errno = EBADF;
        return 0;
    }
    return 1;
}
#define zev__stream_usable(s) zev__stream_usable_in((s), __func__)

/* Messages wait in the queue and it holds max_queue of them: a new one is
 * refused (EAGAIN) rather than queued. */
static inline bool zev__stream_queue_full(const zev_stream_t *s)
{
    return s->qlen && s->max_queue && s->qmsgs >= s->max_queue;
}

/* 1 if a send call for a new message would fail now, with errno set, before
 * reaching libzmq: EINVAL, EBADF, the stream's error, or EAGAIN at
 * max_queue. zev_stream_send_zc asks before it makes anything; inline, as a
 * sender topping its queue up from callbacks hears EAGAIN about as often as
 * it sends. */
static inline int zev__stream_send_refused(const zev_stream_t *s, const char *fn)
{
    if (!zev__stream_usable_in(s, fn))
        return 1;
    if (s->err || (s->open == OPEN_NONE && zev__stream_queue_full(s))) {
        errno = s->err ? s->err : EAGAIN; /* EAGAIN as hand_part would say it */
        return 1;
    }
    return 0;
}

/* stream.c: a stream's lifetime; its timer */
/* Makes sure the stream has its timer: 0, or -1/ENOMEM. */
ZEV_INTERNAL int zev__stream_timer_need(zev_stream_t *s);
/* Arms the stream's timer for the earliest of its deadlines (or disarms). */
ZEV_INTERNAL void zev__stream_timer_update(zev_stream_t *s);
ZEV_INTERNAL void zev__streams_reap(zev_loop_t *loop);
ZEV_INTERNAL void zev__streams_close_all(zev_loop_t *loop);
ZEV_INTERNAL void zev__stream_finalize(zev_stream_t *s);      /* to the close phase; idempotent */
ZEV_INTERNAL void zev__stream_fail(zev_stream_t *s, int err); /* socket gone: ENOTSOCK/ETERM */

/* fiber.c */
ZEV_INTERNAL void zev__fibers_init(zev_loop_t *loop);
ZEV_INTERNAL size_t zev__fibers_run(zev_loop_t *loop); /* the fiber phase: resumes */
ZEV_INTERNAL int zev__fibers_pending(const zev_loop_t *loop);
ZEV_INTERNAL void zev__fibers_destroy(zev_loop_t *loop); /* cancel, unwind, free */
ZEV_INTERNAL zev_fiber_t *zev__fiber_current(void);
/* Wakes the stream's first recv (POLLIN) or send (POLLOUT) waiter. */
ZEV_INTERNAL void zev__stream_wake_waiter(zev_stream_t *s, int event);
/* Wakes every fiber waiting on the stream with err (closed: EBADF). */
ZEV_INTERNAL void zev__stream_wake_all(zev_stream_t *s, int err);
/* Wakes every fiber polling the stream for POLLIN or POLLOUT. */
ZEV_INTERNAL void zev__stream_wake_pollers(zev_stream_t *s, int event);
ZEV_INTERNAL void zev__fiber_fd_fired(void *entry, int events);
ZEV_INTERNAL void zev__stream_free(zev_stream_t *s);

/* streamio.c: the ZMQ_FD readiness pass, recv and send */
ZEV_INTERNAL void zev__stream_fired(zev_stream_t *s);
/* For fibers: one whole message into the ring (1), nothing there (0), -1
 * with errno, or 2: no message yet, call again (a long message's parts
 * beyond `units` batch units wait for the next call; or one over max_parts
 * was dropped); the stream re-reads its state afterwards. */
ZEV_INTERNAL int zev__stream_recv_now(zev_stream_t *s, size_t units);
/* For fibers: one part to libzmq now, never queued: 0 taken, else the errno
 * (EAGAIN: it would have to wait; the caller waits and retries).
 * pollout_told: the stream's pass just found POLLOUT (the fiber was handed
 * the stream), so an EAGAIN now blocks POLLOUT until an edge or back-off. */
ZEV_INTERNAL int zev__stream_send_now(zev_stream_t *s, zmq_msg_t *msg, bool more,
                                      bool pollout_told);
/* zev_stream_send_msg of one part, no flags, on a stream that
 * zev__stream_send_refused has just let through (not checked again): 0 taken
 * (msg left empty, errno as it was), else -1 with errno and msg still the
 * caller's. */
ZEV_INTERNAL int zev__stream_send_one(zev_stream_t *s, zmq_msg_t *msg);
/* The fiber whose multipart message is open on the stream, or NULL. */
ZEV_INTERNAL zev_fiber_t *zev__stream_builder(const zev_stream_t *s);
/* Ends the message open on the stream (a last, empty part; or, if libzmq
 * refuses it, whatever part_refused does), its status `status`. */
ZEV_INTERNAL void zev__stream_end_message(zev_stream_t *s, int status);
/* 1 if a message is there to receive, per libzmq now (fiber poll). */
ZEV_INTERNAL int zev__stream_readable_now(zev_stream_t *s);
/* 1 if a send would not wait now (fiber poll). */
ZEV_INTERNAL int zev__stream_writable_now(zev_stream_t *s);
ZEV_INTERNAL size_t zev__streams_process(zev_loop_t *loop); /* messages handled */
/* Puts the stream on the ready-list: the next pass re-reads its state. */
ZEV_INTERNAL void zev__stream_mark_ready(zev_stream_t *s);
/* 1 when every registered stream is on the ready-list and not waiting for
 * an edge (blocked): the next iteration serves them all anyway. */
ZEV_INTERNAL int zev__streams_all_ready(zev_loop_t *loop);
/* The loop's only stream if busy-polling it through ZMQ_EVENTS is enough:
 * receiving, no send queued, not blocked (POLLIN is all it waits for). */
ZEV_INTERNAL zev_stream_t *zev__stream_spin_candidate(zev_loop_t *loop);
/* One busy-poll turn on it: 1 when it is now on the ready-list. */
ZEV_INTERNAL int zev__stream_spin_turn(zev_stream_t *s);

/* sendq.c: the send queue and on_send reports of a stream */
static inline zev__sendpart_t *zev__sendq_at(zev_stream_t *s, size_t i)
{
    return &s->q[(s->qhead + i) & (s->qcap - 1)];
}
ZEV_INTERNAL int zev__report_grow(zev_stream_t *s, size_t need); /* -1/ENOMEM */
/* Room for a status of every message given to zev and not yet reported,
 * plus `extra` messages about to be given. Each status adds at most one
 * entry and settles one such message, so after this succeeds
 * zev__report_add never needs memory: a status cannot be lost to a failed
 * allocation, which shows at once instead, as ENOMEM from the call that
 * gives the message (or sets on_send). Without on_send no status is kept. */
static inline int zev__report_reserve(zev_stream_t *s, size_t extra)
{
    size_t need = s->rep_len + s->qmsgs + (s->open == OPEN_DIRECT) + extra;
    return !s->on_send || need <= s->rep_cap ? 0 : zev__report_grow(s, need);
}
ZEV_INTERNAL void zev__report_add(zev_stream_t *s, int status);
/* 1 while on_send statuses wait to be delivered. */
static inline int zev__reports_owed(const zev_stream_t *s)
{
    return s->rep_len > s->rep_head;
}
ZEV_INTERNAL void zev__reports_deliver(zev_stream_t *s);
ZEV_INTERNAL int zev__sendq_reserve(zev_stream_t *s, size_t n);                /* -1/ENOMEM */
ZEV_INTERNAL void zev__sendq_push(zev_stream_t *s, zmq_msg_t *msg, bool more); /* reserved */
/* Takes the head part off the queue; closes it unless libzmq took it. */
ZEV_INTERNAL void zev__sendq_pop(zev_stream_t *s, bool taken);
ZEV_INTERNAL void zev__sendq_drop_rest(zev_stream_t *s);
ZEV_INTERNAL void zev__sendq_drop_head(zev_stream_t *s, int status);
ZEV_INTERNAL void zev__sendq_cancel(zev_stream_t *s, int status);
/* When the head message's fate is due under the send timeout (the time it
 * may be dropped if libzmq refuses it); UINT64_MAX if never. */
ZEV_INTERNAL uint64_t zev__sendq_deadline(const zev_stream_t *s);
/* The head message was refused past its deadline: dropped, ETIMEDOUT, and
 * its destination remembered as timed out. */
ZEV_INTERNAL void zev__sendq_time_out_head(zev_stream_t *s);
/* The destination of the message whose first part is `first` if the last
 * message to it timed out, else 0. The caller reads it before the part goes
 * to libzmq, which empties it, and when libzmq took the part, forgets it:
 * the destination is not timed out any more. */
ZEV_INTERNAL uint64_t zev__sendq_timed_out_dest(const zev_stream_t *s, const zmq_msg_t *first);
ZEV_INTERNAL void zev__sendq_forget(zev_stream_t *s, uint64_t dest);
ZEV_INTERNAL void zev__sendq_timed_out_free(zev_stream_t *s); /* the stream is freed */
/* zev__sendq_timed_out_dest at the cost of one branch while nothing timed
 * out (every message of a healthy stream). */
static inline uint64_t zev__sendq_timed_out(const zev_stream_t *s, const zmq_msg_t *first)
{
    return s->ntimed_out ? zev__sendq_timed_out_dest(s, first) : 0;
}
/* The head message changed (sent, dropped, or a first one queued). */
static inline void zev__sendq_new_head(zev_stream_t *s)
{
    s->head_since_ns = s->loop->now_ns;
}
ZEV_INTERNAL int zev__sendq_flush_done(const zev_stream_t *s);

/* msg.c */
/* Moves a zmq_msg_t bitwise, as libzmq's own pipes move it (a zmq_msg_t
 * holds no pointer into itself), and leaves src empty: a bitwise copy of
 * `empty` (the hub's, zmq_msg_init'ed once; an empty message holds nothing,
 * so libzmq copies small messages the same way). What zmq_msg_move does
 * into a fresh dst, without a call. */
static inline void zev__msg_move(zmq_msg_t *dst, zmq_msg_t *src, const zmq_msg_t *empty)
{
    memcpy(dst, src, sizeof *dst);
    memcpy(src, empty, sizeof *src);
}
ZEV_INTERNAL int zev__ring_init(zev_stream_t *s); /* a new stream's ring: -1/ENOMEM */
ZEV_INTERNAL int zev__ring_reserve(zev_stream_t *s, size_t n);
ZEV_INTERNAL void zev__ring_recycle(zev_stream_t *s);
ZEV_INTERNAL void zev__ring_free(zev_stream_t *s);
/* A message being received has reached a lowered max_parts: drop it whole
 * (set_max_parts). */
ZEV_INTERNAL void zev__stream_rx_bound(zev_stream_t *s);
/* The stream stops receiving (finalize) in the middle of a message: its
 * parts are dropped and the rest drained from libzmq, so the socket, which
 * stays the caller's, starts at a message boundary (REP: answered empty). */
ZEV_INTERNAL void zev__stream_rx_abandon(zev_stream_t *s);
ZEV_INTERNAL void zev__frames_detach(zev_stream_t *s);
ZEV_INTERNAL void zev__frame_pool_free(zev__hub_t *hub);

/* registration helpers shared by io.c and the stream files (loop.c) */
ZEV_INTERNAL int zev__register(zev_loop_t *loop, int fd, int events, void *obj);
ZEV_INTERNAL void zev__unregister(zev_loop_t *loop, int fd);
ZEV_INTERNAL int zev__reregister(zev_loop_t *loop, int fd, int events); /* new events */

#endif /* ZEV_INTERNAL_H */
