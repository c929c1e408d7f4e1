/*
 * The loop: backend selection, the iteration, stop, embedding.
 *
 * Design notes
 * - One iteration (loop_iterate) runs five phases in a fixed order:
 *     1. cached time, due timers (only those started before the phase)
 *     2. cross-thread callbacks (only what was queued when the drain began)
 *     3. the ready-list: each stream handles at most `batch` messages, then
 *        goes to the tail if it still has work; then the runnable fibers
 *        (fiber.c), each resumed at most once per iteration, so a fiber a
 *        stream woke runs in the same iteration
 *     4. wait in the backend: timeout 0 while work is pending, else until
 *        the next timer (after spinning for spin_us, if set)
 *     5. ready fds: io callbacks; streams go on the ready-list
 *   and then frees what was closed during it (io watchers, streams whose
 *   close callbacks are due) — handles closed inside callbacks live until
 *   no fired entry can point at them.
 *   zev_loop_run_once is one full turn, as libuv's UV_RUN_ONCE: when its
 *   wait ended at a timer's deadline, that timer runs before it returns
 *   (the due timers run again after phase 5, bounded as in phase 1).
 * - Every drain is bounded: timers by seq, callbacks by a snapshot, the
 *   ready-list by its length at the start of the phase, the wait by
 *   the size of the fired array.
 * - Time is kept in nanoseconds and the wait is as precise as the backend
 *   can make it (epoll_pwait2, ppoll, kevent): a 100 µs timer must not
 *   become a 1 ms one. Deadlines saturate at UINT64_MAX, "never".
 * - stop_requested is the only loop field other threads write (plus the
 *   hub's queue); every zev_loop_run and zev_loop_run_once consumes it when
 *   it returns, so a stop never outlives the call it was meant for.
 * - Embedded (zev_loop_fd was asked for): the fd must be readable exactly
 *   while there is work. An iteration re-arms it when it ends; work made
 *   outside an iteration (host code sending, creating or closing a stream,
 *   starting a timer) goes through zev__loop_changed, the one place that
 *   wakes the host for it.
 * - Phase 4 skips a timeout-0 wait that could only report edges of streams
 *   already on the ready-list (a lone firehose stream out of budget), and
 *   busy-polls a lone receiving stream with ZMQ_EVENTS reads instead of the
 *   backend: on this VM each saved syscall is about 1.2 µs.
 * - fork: the child shares the parent's epoll or kqueue instance (and
 *   poll's embedding set). A child may only zev_loop_destroy its copy, and
 *   that destroy frees memory and closes the loop's own descriptors without
 *   unregistering anything from the shared kernel objects (which would
 *   remove the parent's registrations) and without touching any socket.
 */
#include "zev-internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/timerfd.h>
#endif

static const zev_backend_ops_t *const backends[] = {
#ifdef ZEV_HAVE_EPOLL
    &zev__backend_epoll,
#endif
#ifdef ZEV_HAVE_KQUEUE
    &zev__backend_kqueue,
#endif
    &zev__backend_poll,
};

uint64_t zev__clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static const zev_backend_ops_t *find_backend(const char *name)
{
    if (!name || !*name)
        return backends[0];
    for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++)
        if (strcmp(backends[i]->name, name) == 0)
            return backends[i];
    return NULL;
}

/* The three calls into the backend's registrations. A backend may try
 * one system call, get an errno and succeed another way (epoll: a modify
 * that finds no entry adds one; a remove of an fd the kernel no longer
 * holds): on success these leave errno as they found it, for every
 * backend, so the public calls built on them do too. */
int zev__register(zev_loop_t *loop, int fd, int events, void *obj)
{
    if (zev__fdmap_get(&loop->fds, fd)) {
        errno = EEXIST;
        return -1;
    }
    int saved = errno;
    if (zev__fdmap_put(&loop->fds, fd, obj) < 0)
        return -1;
    if (loop->ops->add(loop->be, fd, events, zev__fdmap_token(&loop->fds, fd)) < 0) {
        int err = errno;
        zev__fdmap_del(&loop->fds, fd);
        errno = err;
        return -1;
    }
    errno = saved;
    return 0;
}

int zev__reregister(zev_loop_t *loop, int fd, int events)
{
    int saved = errno;
    if (loop->ops->modify(loop->be, fd, events, zev__fdmap_token(&loop->fds, fd)) < 0)
        return -1;
    errno = saved;
    return 0;
}

/* In a forked child's destroy the backend's kernel object is shared with
 * the parent: only zev's own table is updated. Cannot fail (a closed fd
 * has left the kernel's set already). */
void zev__unregister(zev_loop_t *loop, int fd)
{
    int saved = errno;
    if (!loop->forked)
        loop->ops->remove(loop->be, fd);
    zev__fdmap_del(&loop->fds, fd);
    errno = saved;
}

zev_loop_t *zev_loop_new(const zev_loop_opts_t *opts)
{
    const char *name = opts && opts->backend ? opts->backend : getenv("ZEV_BACKEND");
    const zev_backend_ops_t *ops = find_backend(name);
    if (!ops) {
        errno = ENOTSUP;
        return NULL;
    }
    zev_loop_t *loop = calloc(1, sizeof *loop);
    if (!loop) {
        errno = ENOMEM;
        return NULL;
    }
    loop->ops = ops;
    loop->batch = opts && opts->batch ? opts->batch : 64;
    loop->spin_us = opts ? opts->spin_us : 0;
    loop->timer_fd = -1;
    loop->timer_fd_kind = ZEV__H_TIMERFD;
    loop->pid = getpid();
    atomic_init(&loop->stop_requested, 0);
    zev__list_init(&loop->ready);
    zev__list_init(&loop->streams);
    zev__list_init(&loop->ios);
    zev__list_init(&loop->closing_streams);
    zev__list_init(&loop->closing_ios);
    zev__fibers_init(loop);
    loop->now_ns = zev__clock_ns();

    int err;
    loop->be = ops->init();
    if (!loop->be)
        goto fail;
    loop->hub = zev__hub_new();
    if (!loop->hub)
        goto fail_be;
    if (zev__register(loop, loop->hub->wake_rfd, ZEV_READ, &loop->hub->wake_kind) < 0)
        goto fail_hub;
    return loop;

fail_hub:
    err = errno;
    zev__hub_unref(loop->hub);
    errno = err;
fail_be:
    err = errno;
    ops->destroy(loop->be);
    errno = err;
fail:
    err = errno;
    zev__fdmap_free(&loop->fds);
    free(loop);
    errno = err;
    return NULL;
}

int zev_loop_destroy(zev_loop_t *loop)
{
    if (!loop)
        return 0;
    if (loop->depth) {
        errno = EBUSY;
        return -1;
    }
    loop->forked = getpid() != loop->pid;
    loop->depth++;           /* closing streams run callbacks: they count as inside */
    loop->destroying = true; /* a stream made by those callbacks would never be closed */
    zev__fibers_destroy(loop); /* first, while what they wait on still exists */
    zev__streams_close_all(loop);
    zev__streams_reap(loop);
    zev__io_free_all(loop);
    zev__timers_free(loop);
    loop->depth--;
    zev__unregister(loop, loop->hub->wake_rfd);
    if (loop->timer_fd >= 0) {
        zev__unregister(loop, loop->timer_fd);
        close(loop->timer_fd);
    }
    /* Everything queued before now runs now, a push still in flight on
     * another thread included: add_callback's nodes are freed unrun, posts
     * run with loop NULL (here, before destroy returns: the caller may free
     * them next), frame and tracker completions take their free-only path.
     * Later releases find the hub, not the loop. */
    zev__hub_drain_all(loop->hub, NULL);
    zev__hub_unref(loop->hub);
    zev__trackers_free(loop);
    loop->ops->destroy(loop->be);
    zev__fdmap_free(&loop->fds);
    free(loop);
    return 0;
}

/* ------------------------------------------------------------ the phases */

/* Work the next iteration would do at once, timers aside. A stop request
 * is not work: it only keeps zev_loop_run's wait from blocking
 * (wait_timeout), so an embedded loop that was stopped does not look busy
 * forever. */
static int has_pending_work(zev_loop_t *loop)
{
    return !zev__list_empty(&loop->ready) || zev__hub_pending(loop->hub) ||
           !zev__list_empty(&loop->closing_streams) || zev__fibers_pending(loop);
}

/* Work now, a due timer included: what zev_loop_timeout == 0 says. */
static int work_now(zev_loop_t *loop)
{
    return has_pending_work(loop) || zev__timers_next(loop) <= zev__clock_ns();
}

/* When the loop must wake by itself: at its next timer, or sooner while
 * delayed tracker completions may be waiting (zev__trackers_deadline). */
static uint64_t next_deadline(zev_loop_t *loop, uint64_t now)
{
    uint64_t timer = zev__timers_next(loop), trackers = zev__trackers_deadline(loop, now);
    return trackers < timer ? trackers : timer;
}

/* ms until `deadline`, rounded up so a wakeup never comes early; -1 for
 * none (UINT64_MAX, the end of time). For zev_loop_timeout, whose hosts
 * count in ms. */
static int ms_until(uint64_t deadline, uint64_t now)
{
    if (deadline == UINT64_MAX)
        return -1;
    if (deadline <= now)
        return 0;
    uint64_t ms = (deadline - now + 999999u) / 1000000u;
    return ms > 0x7fffffff ? 0x7fffffff : (int)ms;
}

/* Phase 4's timeout in ns (-1: none): 0 while work is pending or a stop is
 * asked for, else until the next deadline (next_deadline), at most max_ns
 * (-1: no bound). */
static int64_t wait_timeout(zev_loop_t *loop, int64_t max_ns)
{
    if (has_pending_work(loop) || atomic_load_explicit(&loop->stop_requested, memory_order_relaxed))
        return 0;
    uint64_t next = next_deadline(loop, loop->now_ns);
    if (next != UINT64_MAX) { /* the clock only when there is a deadline to count to */
        loop->now_ns = zev__clock_ns(); /* callbacks since phase 1 took time */
        next = next_deadline(loop, loop->now_ns);
    }
    int64_t ns = -1;
    if (next != UINT64_MAX)
        ns = next <= loop->now_ns ? 0
             : next - loop->now_ns > INT64_MAX ? INT64_MAX
                                               : (int64_t)(next - loop->now_ns);
    if (max_ns >= 0 && (ns < 0 || ns > max_ns))
        ns = max_ns;
    return ns;
}

/* A wait with timeout 0 only polls for edges. It finds nothing the next
 * iteration would not handle anyway when every registered fd but the hub's
 * (callbacks are read from memory) belongs to a stream that will run then;
 * an edge left unread stays pending in the backend for the next wait. A
 * wakeup written to the hub is read by a wait, though: left unread it would
 * end a later blocking wait at once, for nothing. An embedded loop keeps the
 * wait: its host watches the hub and timer fds through zev_loop_fd. Saves an
 * epoll_wait per batch for a firehose. */
static int wait_is_useless(zev_loop_t *loop)
{
    return !loop->embedded && !loop->nios && !loop->nfiberfds && !zev__hub_wake_pending(loop->hub) &&
           zev__streams_all_ready(loop);
}

/* Phase 2, counting the callbacks it ran for the statistics. */
static size_t drain_callbacks(zev_loop_t *loop)
{
    uint64_t before = loop->stats.callbacks;
    size_t n = zev__hub_drain(loop->hub, loop);
    size_t ran = (size_t)(loop->stats.callbacks - before);
    if (ran > loop->stats.callbacks_peak)
        loop->stats.callbacks_peak = ran;
    return n;
}

/* Phase 4. Busy-poll first when asked to, then block. */
static int backend_wait(zev_loop_t *loop, int64_t timeout_ns)
{
    const int max = (int)(sizeof loop->fired / sizeof loop->fired[0]);
    if (loop->spin_us && timeout_ns != 0) {
        /* one stream and nothing else registered: spin on its ZMQ_EVENTS */
        zev_stream_t *s = loop->nstreams == 1 && !loop->nios && !loop->nfiberfds && !loop->embedded
                              ? zev__stream_spin_candidate(loop)
                              : NULL;
        uint64_t start = zev__clock_ns();
        uint64_t until = zev__sat_add(start, zev__us_to_ns(loop->spin_us));
        if (timeout_ns > 0 && zev__sat_add(start, (uint64_t)timeout_ns) < until)
            until = start + (uint64_t)timeout_ns;
        uint64_t next_timer = zev__timers_next(loop);
        if (next_timer < until)
            until = next_timer;
        for (uint64_t now = start; now < until; now = zev__clock_ns()) {
            if (s && (zev__stream_spin_turn(s) || zev__hub_pending(loop->hub)))
                return 0; /* phase 2 or 3 of the next iteration has work */
            int n = s ? 0 : loop->ops->wait(loop->be, 0, loop->fired, max);
            if (n != 0 || atomic_load_explicit(&loop->stop_requested, memory_order_relaxed))
                return n;
        }
        loop->now_ns = zev__clock_ns();
        int64_t left = timeout_ns < 0 ? -1 : (int64_t)(start + (uint64_t)timeout_ns - loop->now_ns);
        timeout_ns = wait_timeout(loop, timeout_ns < 0 ? -1 : left > 0 ? left : 0);
    }
    return loop->ops->wait(loop->be, timeout_ns, loop->fired, max);
}

static void timer_fd_read(zev_loop_t *loop)
{
    uint64_t expirations;
    while (read(loop->timer_fd, &expirations, sizeof expirations) > 0)
        ;
    loop->timer_fd_deadline = UINT64_MAX;
}

/* Phase 5. */
static void dispatch(zev_loop_t *loop, int n)
{
    for (int i = 0; i < n; i++) {
        zev__kind_t *kind = zev__fdmap_by_token(&loop->fds, loop->fired[i].token);
        if (!kind)
            continue; /* unregistered since (this iteration, or a stale kernel entry) */
        switch (*kind) {
        case ZEV__H_IO:
            zev__io_dispatch((zev_io_t *)kind, loop->fired[i].events);
            break;
        case ZEV__H_STREAM:
            zev__stream_fired((zev_stream_t *)kind);
            break;
        case ZEV__H_WAKEUP:
            zev__hub_clear_wake(loop->hub);
            break;
        case ZEV__H_TIMERFD:
            timer_fd_read(loop);
            break;
        case ZEV__H_FIBER_FD:
            zev__fiber_fd_fired(kind, loop->fired[i].events);
            break;
        }
    }
}

/* While embedded, the loop's fd must be readable while work is left and
 * become readable when the next timer is due: the hub's wakeup says the
 * first, the timerfd (Linux) the second. */
static void embedded_signal(zev_loop_t *loop)
{
    if (has_pending_work(loop)) {
        zev__hub_wake(loop->hub);
        return;
    }
#ifdef __linux__
    uint64_t next = next_deadline(loop, zev__clock_ns());
    if (next == loop->timer_fd_deadline)
        return;
    struct itimerspec its = {0};
    if (next != UINT64_MAX) {
        uint64_t at = next ? next : 1; /* all-zero would disarm it */
        its.it_value.tv_sec = (time_t)(at / 1000000000u);
        its.it_value.tv_nsec = (long)(at % 1000000000u);
    }
    if (timerfd_settime(loop->timer_fd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
        loop->timer_fd_deadline = next;
#endif
}

void zev__loop_changed(zev_loop_t *loop)
{
    /* Inside an iteration its end re-arms the fd; outside, the host may
     * block on the fd next, without running an iteration first. */
    if (loop->embedded && !loop->depth)
        embedded_signal(loop);
}

/* One iteration. With `once` (zev_loop_run_once) an iteration whose
 * phases 1-3 already ran callbacks does not block in the wait: the caller
 * gets control back after progress; one that did wait runs the timers that
 * became due meanwhile before it returns. Both as libuv's UV_RUN_ONCE. */
_Thread_local zev_loop_t *zev__iterating __attribute__((tls_model("initial-exec")));

static int loop_iterate(zev_loop_t *loop, int64_t max_wait_ns, bool once)
{
    zev_loop_t *outer = zev__iterating;
    zev__iterating = loop;
    loop->depth++;
    loop->iteration++;
    loop->stats.iterations++;
    loop->now_ns = zev__clock_ns();
    const uint64_t timers_before = loop->timers.seq; /* later ones wait an iteration */
    const size_t reported_before = loop->reported;
    size_t progress = zev__timers_run(loop, timers_before); /* 1 */
    progress += drain_callbacks(loop);                      /* 2 */
    progress += zev__streams_process(loop);                 /* 3 */
    progress += loop->reported - reported_before;           /* on_send ran in 3 */
    progress += zev__fibers_run(loop);                      /* 3, the fibers */
    if (once && progress)
        max_wait_ns = 0;
    int64_t timeout = wait_timeout(loop, max_wait_ns);
    int n = timeout == 0 && wait_is_useless(loop) ? 0 : backend_wait(loop, timeout); /* 4 */
    int err = errno;
    if (n > 0 || (once && !progress))
        loop->now_ns = zev__clock_ns();
    if (n > 0) {
        loop->stats.wakeups++;
        dispatch(loop, n); /* 5 */
    }
    if (once && !progress)
        zev__timers_run(loop, timers_before); /* the deadline the wait ended at */
    zev__io_reap(loop);
    zev__streams_reap(loop);
    loop->depth--;
    zev__iterating = outer;
    if (loop->embedded)
        embedded_signal(loop);
    errno = err;
    return n < 0 ? -1 : 0;
}

/* ---------------------------------------------------------- public entry */

/* Both run functions: a loop, and not from inside one of its callbacks. */
static int can_run(const zev_loop_t *loop)
{
    if (!loop) {
        errno = EINVAL;
        return 0;
    }
    if (loop->depth) {
        errno = EBUSY;
        return 0;
    }
    return 1;
}

/* The thread running the loop, for ZEV_THREAD_CHECKS. */
static void running_on(zev_loop_t *loop, bool on)
{
    if (on)
        loop->runner = pthread_self();
    atomic_store_explicit(&loop->running, on, memory_order_release);
}

#ifdef ZEV_THREAD_CHECKS
void zev__wrong_thread(const zev_loop_t *loop, const char *fn)
{
    fprintf(stderr,
            "zev: %s() called from thread %#lx while loop %p runs on thread %#lx: only "
            "zev_loop_add_callback, zev_loop_post, zev_loop_stop, the zev_frame_* functions and "
            "zev_tracker_done may be called from other threads (ZEV_THREAD_CHECKS)\n",
            fn, (unsigned long)pthread_self(), (const void *)loop, (unsigned long)loop->runner);
    abort();
}
#endif

int zev_loop_run(zev_loop_t *loop)
{
    if (!can_run(loop))
        return -1;
    int saved = errno;
    running_on(loop, true);
    while (!atomic_exchange(&loop->stop_requested, 0))
        if (loop_iterate(loop, -1, false) < 0) {
            running_on(loop, false);
            return -1;
        }
    running_on(loop, false);
    errno = saved;
    return 0;
}

int zev_loop_run_once(zev_loop_t *loop, int timeout_ms)
{
    if (!can_run(loop))
        return -1;
    int saved = errno;
    running_on(loop, true);
    int rc = loop_iterate(loop, timeout_ms < 0 ? -1 : (int64_t)timeout_ms * 1000000, true);
    running_on(loop, false);
    atomic_exchange(&loop->stop_requested, 0); /* the stop was for this call */
    if (rc < 0)
        return -1;
    errno = saved;
    return work_now(loop);
}

void zev_loop_stop(zev_loop_t *loop)
{
    if (!loop)
        return;
    atomic_store(&loop->stop_requested, 1);
    zev__hub_wake(loop->hub);
}

const char *zev_loop_backend(const zev_loop_t *loop)
{
    if (!loop) {
        errno = EINVAL;
        return NULL;
    }
    return loop->ops->name;
}

/* Switches the loop to embedded mode: from now on it keeps its pollable fd
 * readable exactly while it has work (a timerfd for due timers on Linux). */
static int embed(zev_loop_t *loop)
{
#ifdef __linux__
    loop->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (loop->timer_fd < 0)
        return -1;
    if (zev__register(loop, loop->timer_fd, ZEV_READ, &loop->timer_fd_kind) < 0) {
        int err = errno;
        close(loop->timer_fd);
        loop->timer_fd = -1;
        errno = err;
        return -1;
    }
    loop->timer_fd_deadline = UINT64_MAX;
#endif
    loop->embedded = true;
    embedded_signal(loop);
    return 0;
}

int zev_loop_fd(zev_loop_t *loop)
{
    if (!loop) {
        errno = EINVAL;
        return -1;
    }
    int fd = loop->ops->pollable_fd(loop->be);
    if (fd < 0 || (!loop->embedded && embed(loop) < 0))
        return -1;
    return fd;
}

int zev_loop_timeout(const zev_loop_t *loop)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop) {
        errno = EINVAL;
        return -1;
    }
    zev_loop_t *l = (zev_loop_t *)loop; /* reads, but for dead timer entries dropped */
    if (has_pending_work(l))
        return 0;
    uint64_t now = zev__clock_ns();
    return ms_until(next_deadline(l, now), now);
}

uint64_t zev_now_ns(const zev_loop_t *loop)
{
    if (!loop) {
        errno = EINVAL;
        return 0;
    }
    return loop->now_ns;
}

/* -------------------------------------------------- cross-thread callbacks */

/* A queued callback: the node zev_loop_add_callback allocates, and the
 * inside of the caller's zev_post_t for zev_loop_post. */
typedef struct post_node {
    zev__qnode_t qnode;
    zev_cb_fn fn;
    void *arg;
} post_node_t;
_Static_assert(sizeof(post_node_t) <= sizeof(zev_post_t), "zev_post_t is too small");
_Static_assert(_Alignof(post_node_t) <= _Alignof(zev_post_t), "zev_post_t is misaligned");

/* The caller's post: fn runs once either way, with NULL when dropped. */
static void run_post(zev__qnode_t *n, zev_loop_t *loop)
{
    post_node_t *p = (post_node_t *)n;
    if (!loop) {
        p->fn(NULL, p->arg);
        return;
    }
    loop->stats.callbacks++;
    uint64_t t0 = zev__watch_begin(loop);
    zev_cb_fn fn = p->fn;
    void *arg = p->arg;
    fn(loop, arg); /* may reuse its post: p is the caller's again */
    zev__watch_end(loop, t0, ZEV_SLOW_CALLBACK, arg, fn);
}

/* zev's node: freed after it ran, or dropped (and freed) without a word. */
static void run_callback(zev__qnode_t *n, zev_loop_t *loop)
{
    post_node_t *p = (post_node_t *)n;
    if (loop) {
        loop->stats.callbacks++;
        uint64_t t0 = zev__watch_begin(loop);
        p->fn(loop, p->arg);
        zev__watch_end(loop, t0, ZEV_SLOW_CALLBACK, p->arg, p->fn);
    }
    free(p);
}

static void post(zev_loop_t *loop, post_node_t *p, zev__qrun_fn run, zev_cb_fn fn, void *arg)
{
    p->qnode.run = run;
    p->fn = fn;
    p->arg = arg;
    zev__hub_push(loop->hub, &p->qnode);
    zev__hub_wake(loop->hub);
}

int zev_loop_add_callback(zev_loop_t *loop, zev_cb_fn fn, void *arg)
{
    if (!loop || !fn) {
        errno = EINVAL;
        return -1;
    }
    post_node_t *p = malloc(sizeof *p);
    if (!p) {
        errno = ENOMEM;
        return -1;
    }
    post(loop, p, run_callback, fn, arg);
    return 0;
}

int zev_loop_post(zev_loop_t *loop, zev_post_t *p, zev_cb_fn fn, void *arg)
{
    if (!loop || !p || !fn) {
        errno = EINVAL;
        return -1;
    }
    post(loop, (post_node_t *)p, run_post, fn, arg);
    return 0;
}
