/*
 * Fibers: blocking-style code on the loop (PyZMQ's zmq.green for C).
 *
 * Design notes
 * - A fiber is a context (ctx.h) on a pooled, guarded stack (stack.h), run
 *   by the loop in its fiber phase, right after the ready streams: a fiber
 *   woken by a stream's pass runs in the same iteration. The phase resumes
 *   runnable fibers in order until none is left that has not resumed in this
 *   iteration (loop->iteration): each resumes at most once per iteration,
 *   and a fiber woken by another in the same phase (the next receiver of a
 *   stream) still runs in it. A fiber that yields goes to the next one.
 * - Blocking calls run on the fiber's stack. When they would wait, they put
 *   the fiber on what it waits for (a stream's recv or send waiters, its fds
 *   registered with the backend, its own timer for the timeout, a fiber to
 *   join) and switch to the loop. Whatever ends the wait calls wake(), which
 *   takes the fiber off all of them at once and makes it runnable with the
 *   reason: 0 (look again), ETIMEDOUT, ECANCELED, or a stream's error.
 * - Streams keep their ZMQ_FD rule: a stream with waiting fibers wants POLLIN
 *   (or POLLOUT) as one with on_recv (or a queue) does, and its pass, instead
 *   of receiving, wakes the first waiter (handed_in), which then receives on
 *   its own stack; every receive or send a fiber makes outside the pass puts
 *   the stream on the ready-list, as any send from outside does. A fiber
 *   that got a message wakes the next waiter, so a pool of receiving fibers
 *   drains a stream within one phase, first come first served. No timeout
 *   stands in for a missed edge.
 * - A fiber's message never waits in the stream's queue: it goes to libzmq
 *   when nothing is queued before it, else the fiber waits for its turn. So
 *   the call returns once libzmq has the message, and a timeout takes
 *   nothing. While a fiber builds a multipart message, the stream's
 *   open_fiber keeps other senders out of its middle.
 * - A fiber's calls that do not have to wait count against the loop's
 *   batch; when it is spent the next call yields first, so a fiber looping
 *   over a busy stream cannot hold the loop.
 * - Borrowed frames: a received message lives in the stream's ring until
 *   the fiber's next blocking call (release_borrowed, first thing in every
 *   call), which is also the first moment another fiber can run. The fast
 *   path (zev_fiber_recv on the stream of the fiber's last message, in its
 *   turn, within its batch) lets the next receive overwrite the ring's
 *   slots, as the stream's own pass does, and recycles the ring before
 *   the fiber waits.
 * - A fiber forwarding its borrowed message (zev_fiber_send_msg of its
 *   parts) keeps it across the send's wait, so the stream's ring is lent
 *   (ring_lent) until that call returns: other fibers' receives wait, and
 *   on_recv cannot be set, or they would receive into the parts being
 *   sent.
 * - A message longer than one pass is received over several iterations by
 *   the fiber that began it: it keeps the stream's turn (handed_in) while
 *   it yields between pieces, and its timeout bounds the call (timeout 0:
 *   EAGAIN unless it is whole in the one pass; the parts stay in the ring).
 * - The fiber phase: a fiber made runnable after it resumed in the phase
 *   goes on loop->fibers.later, spliced onto the runnable list at the end;
 *   the slow hook reports a fiber that returned before it is freed.
 * - Lifetimes: a stream a fiber is inside a call on (or holds a message of)
 *   counts it in fiber_refs and is freed by the last such call to leave
 *   (stream.c defers it). A fiber is freed by join, or when it returns once
 *   detached; zev_loop_destroy cancels every live fiber and resumes each
 *   until it returns (one that ignores ECANCELED and loops hangs destroy).
 */
#include "zev-internal.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>

enum fiber_state { F_RUNNABLE, F_RUNNING, F_WAITING, F_DONE };

/* An fd a fiber waits for, registered with the backend while it does. */
typedef struct fiber_fd {
    zev__kind_t kind; /* ZEV__H_FIBER_FD, first */
    zev_fiber_t *fiber;
    int fd, events, revents;
    bool registered;
} fiber_fd_t;

struct zev_fiber {
    zev_loop_t *loop;
    zev__ctx_t ctx;
    zev__stack_t stack;
    zev_fiber_fn fn;
    void *arg;
    zev_timer_t *timer; /* owned: sleeps and timeouts */
    zev__list_t run;    /* loop->fibers.runnable while runnable */
    zev__list_t all;    /* loop->fibers.all until freed */
    enum fiber_state state;
    int wake; /* why it was made runnable */
    bool cancelled, detached;
    bool reporting;      /* returned, its resume reported to the slow hook */
    zev_fiber_t *joiner; /* the fiber joining it */
    uint64_t resumed_in; /* the iteration it last resumed in */
    unsigned budget;     /* calls that did not wait since it resumed */
    zev_stream_t *borrowed;
    unsigned building;    /* streams it has a multipart message open on */
    zev__waiter_t *waits; /* stream waits of the current call */
    size_t nwaits, waits_cap;
    fiber_fd_t *fds; /* fd waits of the current call */
    size_t nfds, fds_cap;
};

static _Thread_local zev_fiber_t *current __attribute__((tls_model("initial-exec")));

zev_fiber_t *zev__fiber_current(void)
{
    return current;
}

zev_fiber_t *zev_fiber_self(void)
{
    return current;
}

/* ------------------------------------------------------------- streams */

static void stream_enter(zev_stream_t *s)
{
    s->fiber_refs++;
}

static void stream_leave(zev_stream_t *s)
{
    if (--s->fiber_refs == 0 && s->reaped)
        zev__stream_free(s);
}

/* The previous message's frames go back to the ring (its next blocking
 * call, or its return: the contract of zev_fiber_recv). */
static void release_borrowed(zev_fiber_t *f)
{
    if (!f->borrowed)
        return;
    zev_stream_t *s = f->borrowed;
    f->borrowed = NULL;
    zev__ring_recycle(s);
    stream_leave(s);
}

/* --------------------------------------------------------- wait and wake */

/* Runnable in FIFO order; one that already resumed in the phase that runs
 * now (it yields, or another fiber woke it) waits for the next phase. */
static void make_runnable(zev_fiber_t *f, int why)
{
    zev_loop_t *loop = f->loop;
    f->wake = why;
    f->state = F_RUNNABLE;
    bool in_phase = loop->fibers.in_phase;
    bool later = in_phase && f->resumed_in == loop->iteration;
    zev__list_push_tail(later ? &loop->fibers.later : &loop->fibers.runnable, &f->run);
    if (!in_phase) /* in the phase, the iteration's end looks at them */
        zev__loop_changed(loop);
}

/* Off everything it waits on. */
static void stop_waiting(zev_fiber_t *f)
{
    for (size_t i = 0; i < f->nwaits; i++)
        zev__list_remove(&f->waits[i].node);
    f->nwaits = 0;
    for (size_t i = 0; i < f->nfds; i++)
        if (f->fds[i].registered) {
            zev__unregister(f->loop, f->fds[i].fd);
            f->fds[i].registered = false;
            f->loop->nfiberfds--;
        }
    zev__timer_disarm(f->timer);
}

static void wake(zev_fiber_t *f, int why)
{
    if (f->state != F_WAITING)
        return;
    stop_waiting(f);
    make_runnable(f, why);
}

static void fiber_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    wake(arg, ETIMEDOUT);
}

void zev__fiber_fd_fired(void *entry, int events)
{
    fiber_fd_t *e = entry;
    e->revents |= events & e->events;
    wake(e->fiber, 0);
}

void zev__stream_wake_waiter(zev_stream_t *s, int event)
{
    zev__list_t *list = event == ZMQ_POLLIN ? &s->recv_waiters : &s->send_waiters;
    if (zev__list_empty(list))
        return;
    zev_fiber_t *f = zev__container_of(list->next, zev__waiter_t, node)->fiber;
    if (event == ZMQ_POLLIN)
        s->handed_in = f;
    else
        s->handed_out = f;
    wake(f, 0);
}

/* Wakes every fiber on a list (each wake takes it off all its lists). */
static void wake_list(zev__list_t *list, int why)
{
    while (!zev__list_empty(list))
        wake(zev__container_of(list->next, zev__waiter_t, node)->fiber, why);
}

void zev__stream_wake_pollers(zev_stream_t *s, int event)
{
    wake_list(event == ZMQ_POLLIN ? &s->poll_in : &s->poll_out, 0);
}

void zev__stream_wake_all(zev_stream_t *s, int err)
{
    wake_list(&s->recv_waiters, err);
    wake_list(&s->send_waiters, err);
    wake_list(&s->poll_in, err);
    wake_list(&s->poll_out, err);
}

/* Room for n stream waits and m fd waits; the arrays are kept, so a fiber's
 * calls allocate nothing in steady state. 0, or -1/ENOMEM. */
static int reserve_waits(zev_fiber_t *f, size_t n, size_t m)
{
    if (n > f->waits_cap) {
        size_t cap = zev__grown_cap(f->waits_cap, 2, n, sizeof *f->waits);
        zev__waiter_t *w = cap ? realloc(f->waits, cap * sizeof *w) : NULL;
        if (!w) {
            errno = ENOMEM;
            return -1;
        }
        f->waits = w;
        f->waits_cap = cap;
    }
    if (m > f->fds_cap) {
        size_t cap = zev__grown_cap(f->fds_cap, 2, m, sizeof *f->fds);
        fiber_fd_t *e = cap ? realloc(f->fds, cap * sizeof *e) : NULL;
        if (!e) {
            errno = ENOMEM;
            return -1;
        }
        f->fds = e;
        f->fds_cap = cap;
    }
    return 0;
}

/* Waits on the stream (recv or send waiters), at the back of the line or,
 * for a fiber that was just woken for it and found nothing, at the front. */
static void wait_on(zev_fiber_t *f, zev__list_t *list, bool front)
{
    zev__waiter_t *w = &f->waits[f->nwaits++];
    w->fiber = f;
    if (front) {
        w->node.next = list->next;
        w->node.prev = list;
        list->next->prev = &w->node;
        list->next = &w->node;
    } else {
        zev__list_push_tail(list, &w->node);
    }
}

/* Switches to the loop; returns when made runnable again, with the reason.
 * errno is the thread's, shared with the loop and every other fiber: the
 * fiber's is kept across the switch (a call that succeeds leaves it). */
static int suspend(zev_fiber_t *f)
{
    int saved = errno;
    zev__ctx_switch(&f->ctx, &f->loop->fibers.sched);
    errno = saved;
    return f->wake;
}

/* Waits for what the caller registered, or until `deadline` (UINT64_MAX:
 * none): 0, ETIMEDOUT, ECANCELED or a stream's error. */
static int wait_until(zev_fiber_t *f, uint64_t deadline)
{
    if (deadline != UINT64_MAX)
        zev__timer_arm_at(f->timer, deadline);
    f->state = F_WAITING;
    return suspend(f);
}

/* A blocking call's deadline counts from the clock at the call, not from
 * the iteration's cached time (the fiber phase comes after the streams'):
 * a wait never ends before its timeout, as with poll(2) or zmq_poll. */
static uint64_t deadline_in(uint64_t us)
{
    return zev__sat_add(zev__clock_ns(), zev__us_to_ns(us));
}

static uint64_t deadline_of(int64_t timeout_us)
{
    return timeout_us < 0 ? UINT64_MAX : deadline_in((uint64_t)timeout_us);
}

/* Lets the rest of the loop run: back in the next iteration. */
static int yield_now(zev_fiber_t *f)
{
    make_runnable(f, 0);
    return suspend(f);
}

/* A call that does not wait counts against the batch; once it is spent the
 * fiber yields before the next one. 0, or ECANCELED. */
static int pace(zev_fiber_t *f)
{
    if (++f->budget <= f->loop->batch)
        return 0;
    return yield_now(f) ? ECANCELED : 0;
}

/* Every blocking call starts here: in a fiber, its borrowed frames
 * returned (unless `keep_borrowed`: the call returns them itself), not
 * cancelled. NULL with errno otherwise. */
static zev_fiber_t *enter_keeping(bool keep_borrowed)
{
    zev_fiber_t *f = current;
    if (!f) {
        errno = EPERM;
        return NULL;
    }
    if (!keep_borrowed)
        release_borrowed(f);
    if (f->cancelled) {
        errno = ECANCELED;
        return NULL;
    }
    return f;
}

static zev_fiber_t *enter(void)
{
    return enter_keeping(false);
}

/* -------------------------------------------------------------- lifecycle */

void zev__fibers_init(zev_loop_t *loop)
{
    zev__list_init(&loop->fibers.runnable);
    zev__list_init(&loop->fibers.later);
    zev__list_init(&loop->fibers.all);
    zev__stack_pool_init(&loop->fibers.stacks);
}

/* The stack pool follows the most fibers live at once (at least its
 * default, 64 stacks / 16 MiB; at most POOL_MAX stacks, POOL_MAX_BYTES):
 * a program that spawns and ends fibers by the thousand reuses their
 * stacks instead of mapping and unmapping each (8-9 us + 5-6 us). Idle
 * stacks keep the pages their fibers touched, as a malloc arena keeps its
 * memory: up to that many bytes stay resident. */
#define POOL_MAX 4096u
#define POOL_MAX_BYTES ((size_t)256 * 1024 * 1024)

static void pool_follow(zev__stack_pool_t *pool, size_t live, size_t stack_size)
{
    if (live <= pool->max_idle || pool->max_idle >= POOL_MAX)
        return;
    pool->max_idle = live < POOL_MAX ? live : POOL_MAX;
    size_t bytes = stack_size && pool->max_idle <= POOL_MAX_BYTES / stack_size
                       ? pool->max_idle * stack_size
                       : POOL_MAX_BYTES;
    if (bytes > pool->max_idle_bytes)
        pool->max_idle_bytes = bytes;
}

int zev__fibers_pending(const zev_loop_t *loop)
{
    return !zev__list_empty(&loop->fibers.runnable);
}

static void free_fiber(zev_fiber_t *f)
{
    zev__list_remove(&f->all);
    free(f->waits);
    free(f->fds);
    free(f);
}

/* A fiber that ends in the middle of a multipart message (it returned, or
 * was cancelled and could not finish it): the message is ended with an
 * empty last part, reported ECANCELED, so the stream's next message is
 * whole and no later fiber is taken for its builder. */
static void end_open_messages(zev_fiber_t *f)
{
    zev__list_t *streams = &f->loop->streams;
    for (zev__list_t *p = streams->next; f->building && p != streams; p = p->next) {
        zev_stream_t *s = zev__container_of(p, zev_stream_t, node);
        if (zev__stream_builder(s) == f) {
            zev__stream_end_message(s, ECANCELED);
            s->open_fiber = NULL;
            f->building--;
        }
    }
    f->building = 0;
}

static void fiber_main(void *arg)
{
    zev_fiber_t *f = arg;
    f->fn(f->arg);
    release_borrowed(f);
    if (f->building)
        end_open_messages(f);
    f->state = F_DONE;
    f->loop->fibers.live--;
    if (f->joiner)
        wake(f->joiner, 0);
    zev__ctx_exit(&f->ctx, &f->loop->fibers.sched);
}

/* After its last switch: what only its running needed goes back (the
 * caller frees a detached one). */
static void finished(zev_fiber_t *f)
{
    zev__ctx_destroy(&f->ctx);
    zev__stack_put(&f->loop->fibers.stacks, &f->stack);
    zev__timer_free(f->timer);
    f->timer = NULL;
}

zev_fiber_t *zev_fiber_spawn(zev_loop_t *loop, zev_fiber_fn fn, void *arg,
                             const zev_fiber_opts_t *opts)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop || !fn) {
        errno = EINVAL;
        return NULL;
    }
    if (loop->destroying) {
        errno = EBUSY;
        return NULL;
    }
    int saved = errno;
    zev_fiber_t *f = calloc(1, sizeof *f);
    if (!f) {
        errno = ENOMEM;
        return NULL;
    }
    f->loop = loop;
    f->fn = fn;
    f->arg = arg;
    zev__list_init(&f->run);
    if (zev__stack_get(&loop->fibers.stacks, opts ? opts->stack_size : 0, &f->stack) < 0)
        goto fail;
    if (!(f->timer = zev__timer_new(loop, fiber_timer, f)) || reserve_waits(f, 2, 1) < 0 ||
        zev__ctx_make(&f->ctx, f->stack.lo, f->stack.size, fiber_main, f) < 0) {
        int err = errno;
        zev__timer_free(f->timer);
        zev__stack_put(&loop->fibers.stacks, &f->stack);
        errno = err;
        goto fail;
    }
    zev__list_push_tail(&loop->fibers.all, &f->all);
    loop->fibers.live++;
    pool_follow(&loop->fibers.stacks, loop->fibers.live, f->stack.size);
    if (loop->fibers.in_phase)
        f->resumed_in = loop->iteration; /* the phase that runs now is bounded */
    make_runnable(f, 0);
    errno = saved;
    return f;
fail:
    free(f->waits);
    free(f->fds);
    free(f);
    return NULL;
}

/* Resumes one fiber until it suspends or returns (the loop's stack). */
static void resume(zev_loop_t *loop, zev_fiber_t *f)
{
    f->state = F_RUNNING;
    f->resumed_in = loop->iteration;
    f->budget = 0;
    zev_fiber_t *outer = current; /* a fiber of another loop running this one */
    current = f;
    loop->stats.fibers_resumed++;
    uint64_t t0 = zev__watch_begin(loop);
    zev__ctx_switch(&loop->fibers.sched, &f->ctx);
    current = outer; /* before the slow hook, which is no fiber of this loop */
    if (f->state != F_DONE) {
        zev__watch_end(loop, t0, ZEV_SLOW_FIBER, f, NULL);
        return;
    }
    /* Returned: the slow hook may call any fiber function on it (detach
     * it, join it from a fiber of another loop): f is freed after the
     * hook, never under it. */
    finished(f);
    f->reporting = true;
    zev__watch_end(loop, t0, ZEV_SLOW_FIBER, f, NULL);
    f->reporting = false;
    if (f->detached)
        free_fiber(f);
}

size_t zev__fibers_run(zev_loop_t *loop)
{
    struct zev__fibers *fs = &loop->fibers;
    if (zev__list_empty(&fs->runnable))
        return 0;
        /* The context fibers switch back to: whoever runs the loop now. Under
         * TSan its fiber may differ from the last phase's (a loop run from
         * another loop's fiber): made every phase. Otherwise it is registers
         * that every switch saves (ASan learns the stack at each switch): made
         * once. */
#ifdef ZEV__TSAN
    zev__ctx_init_main(&fs->sched);
#else
    if (!fs->sched.main)
        zev__ctx_init_main(&fs->sched);
#endif
    zev__stack_thread_ready(); /* this thread can report an overflow */
    bool outer_phase = fs->in_phase;
    fs->in_phase = true;
    size_t n = 0;
    zev__list_t *node;
    while ((node = zev__list_pop_head(&fs->runnable))) {
        zev_fiber_t *f = zev__container_of(node, zev_fiber_t, run);
        if (__builtin_expect(f->resumed_in == loop->iteration && f->resumed_in, 0)) {
            zev__list_push_tail(&fs->later, node); /* once per iteration */
            continue;
        }
        resume(loop, f);
        n++;
    }
    if (!zev__list_empty(&fs->later)) { /* the next phase's, in order: spliced */
        zev__list_t *first = fs->later.next, *last = fs->later.prev;
        first->prev = fs->runnable.prev;
        fs->runnable.prev->next = first;
        last->next = &fs->runnable;
        fs->runnable.prev = last;
        zev__list_init(&fs->later);
    }
    fs->in_phase = outer_phase;
    return n;
}

void zev__fibers_destroy(zev_loop_t *loop)
{
    struct zev__fibers *fs = &loop->fibers;
    while (fs->live) {
        for (zev__list_t *p = fs->all.next; p != &fs->all; p = p->next) {
            zev_fiber_t *f = zev__container_of(p, zev_fiber_t, all);
            if (f->state != F_DONE)
                zev_fiber_cancel(f);
        }
        loop->iteration++;
        zev__fibers_run(loop);
    }
    while (!zev__list_empty(&fs->all))
        free_fiber(zev__container_of(fs->all.next, zev_fiber_t, all));
    zev__stack_pool_fini(&fs->stacks);
}

static int join_impl(zev_fiber_t *t, int64_t timeout_us)
{
    zev_fiber_t *f = current;
    if (!f) {
        errno = EPERM;
        return -1;
    }
    if (!t || t == f || t->detached || (t->joiner && t->joiner != f)) {
        errno = EINVAL;
        return -1;
    }
    if (t->state == F_DONE) { /* no wait: also for a cancelled fiber freeing its children */
        release_borrowed(f);
        if (t->reporting)
            t->detached = true; /* joined under the slow hook: resume frees it */
        else
            free_fiber(t);
        return 0;
    }
    if (!enter())
        return -1;
    if (timeout_us == 0) {
        int err = pace(f); /* a join(.., 0) loop must let the loop run */
        errno = err ? err : ETIMEDOUT;
        return -1;
    }
    t->joiner = f;
    int why = wait_until(f, deadline_of(timeout_us));
    t->joiner = NULL;
    if (why) {
        errno = why;
        return -1;
    }
    free_fiber(t);
    return 0;
}

int zev_fiber_detach(zev_fiber_t *t)
{
    if (!t || t->detached || t->joiner) {
        errno = EINVAL;
        return -1;
    }
    t->detached = true;
    if (t->state == F_DONE && !t->reporting) /* else resume frees it */
        free_fiber(t);
    return 0;
}

int zev_fiber_cancel(zev_fiber_t *t)
{
    if (!t) {
        errno = EINVAL;
        return -1;
    }
    if (t->state == F_DONE)
        return 0;
    t->cancelled = true;
    if (t->state == F_WAITING)
        wake(t, ECANCELED);
    else if (t->state == F_RUNNABLE)
        t->wake = ECANCELED; /* woken, not yet resumed: its call fails all the same */
    return 0;
}

/* ------------------------------------------------------- sleeping, fds */

static int sleep_impl(uint64_t us)
{
    zev_fiber_t *f = enter();
    if (!f)
        return -1;
    int why = wait_until(f, deadline_in(us));
    if (why != ETIMEDOUT) {
        errno = why ? why : ECANCELED;
        return -1;
    }
    return 0;
}

static int yield_impl(void)
{
    zev_fiber_t *f = enter();
    if (!f)
        return -1;
    int why = yield_now(f);
    if (why) {
        errno = why;
        return -1;
    }
    return 0;
}

static int valid_events(int events)
{
    return events && !(events & ~(ZEV_READ | ZEV_WRITE));
}

/* The fds of items ready now (poll(2), no wait): their revents. */
static int fds_ready_now(fiber_fd_t *e, size_t n)
{
    struct pollfd p[16];
    int ready = 0;
    for (size_t i = 0; i < n; i += 16) {
        size_t k = n - i < 16 ? n - i : 16;
        for (size_t j = 0; j < k; j++)
            p[j] =
                (struct pollfd){.fd = e[i + j].fd,
                                .events = (short)(((e[i + j].events & ZEV_READ) ? POLLIN : 0) |
                                                  ((e[i + j].events & ZEV_WRITE) ? POLLOUT : 0))};
        if (poll(p, (nfds_t)k, 0) < 0)
            return -1;
        for (size_t j = 0; j < k; j++) {
            short re = p[j].revents;
            if (re & POLLNVAL) {
                errno = EBADF;
                return -1;
            }
            int ev = ((re & (POLLIN | POLLERR | POLLHUP)) ? ZEV_READ : 0) |
                     ((re & (POLLOUT | POLLERR | POLLHUP)) ? ZEV_WRITE : 0);
            e[i + j].revents = ev & e[i + j].events;
            ready += e[i + j].revents != 0;
        }
    }
    return ready;
}

/* Registers the fd waits with the backend; on failure none stays. */
static int register_fds(zev_fiber_t *f)
{
    for (size_t i = 0; i < f->nfds; i++) {
        fiber_fd_t *e = &f->fds[i];
        if (zev__register(f->loop, e->fd, e->events, e) < 0) {
            int err = errno;
            stop_waiting(f);
            errno = err;
            return -1;
        }
        e->registered = true;
        f->loop->nfiberfds++;
    }
    return 0;
}

static int wait_fd_impl(int fd, int events, int64_t timeout_us)
{
    zev_fiber_t *f = enter();
    if (!f)
        return -1;
    if (!valid_events(events)) {
        errno = EINVAL;
        return -1;
    }
    if (fd < 0) {
        errno = EBADF;
        return -1;
    }
    f->fds[0] = (fiber_fd_t){.kind = ZEV__H_FIBER_FD, .fiber = f, .fd = fd, .events = events};
    int ready = fds_ready_now(f->fds, 1);
    if (ready != 0 || timeout_us == 0) {
        int revents = f->fds[0].revents, err = errno;
        if (ready >= 0 && (err = pace(f))) /* did not wait: counts against the batch */
            ready = -1;
        errno = err;
        return ready < 0 ? -1 : revents;
    }
    f->nfds = 1;
    if (register_fds(f) < 0) {
        f->nfds = 0;
        return -1;
    }
    int why = wait_until(f, deadline_of(timeout_us));
    f->nfds = 0;
    if (why == ETIMEDOUT)
        return 0;
    if (why) {
        errno = why;
        return -1;
    }
    return f->fds[0].revents;
}

/* ---------------------------------------------------------------- recv */

/* 0, or the errno that makes the stream unusable for a fiber's call. */
static int stream_state(const zev_stream_t *s)
{
    return s->closed ? EBADF : s->err;
}

/* Whether it is f's turn: the one the stream was handed to goes first,
 * else whoever waits longest, else whoever comes. (Pollers wait apart and
 * never hold a turn.) */
static bool my_turn(const zev__list_t *waiters, zev_fiber_t *handed, zev_fiber_t *f)
{
    return handed ? handed == f : zev__list_empty(waiters);
}

/* f no longer holds the stream's turn; if it did not act on it (cancelled,
 * timed out, or found it could not), the stream looks again so that the
 * next waiter gets it. */
static void give_turn_back(zev_stream_t *s, zev_fiber_t **handed, zev_fiber_t *f)
{
    if (*handed == f) {
        *handed = NULL;
        zev__stream_mark_ready(s);
    }
}

/* Enters a call on a stream: holds it (the stream stays allocated until
 * leave_stream, whatever closes it meanwhile), then paces. 0, or the errno
 * the call fails with (the stream released again). */
static int enter_stream(zev_fiber_t *f, zev_stream_t *s)
{
    stream_enter(s);
    int err = stream_state(s);
    if (!err && !(err = pace(f)))
        err = stream_state(s); /* it may have been closed while f yielded */
    if (err)
        stream_leave(s);
    return err;
}

/* The ring's slots past the message just received: a longer message's
 * parts that the fast path (which lets each receive overwrite the slots, as
 * the stream's pass does) left behind. Not held while f has the message. */
static void ring_trim(zev_stream_t *s)
{
    for (size_t i = s->msg.n; i < s->ring_used; i++)
        zmq_msg_close(&s->ring[i]); /* a kept part's slot is already empty */
    s->ring_used = s->msg.n;
}

/* The ring size up to which the fast path lets slots be overwritten (msg.c
 * gives a larger ring back at its recycle: RING_KEEP). */
#define RING_SMALL 1024u

/* The general path of zev_fiber_recv. `held`: the caller holds s already
 * (the fast path), paced, and `got` is what its receive gave. */
static inline __attribute__((always_inline)) int
recv_slow(zev_fiber_t *f, zev_stream_t *s, zev_msg_t **msg, int64_t timeout_us, bool held, int got)
{
    int err;
    if (held) {
        err = stream_state(s);
    } else {
        if (!s || !msg) {
            errno = EINVAL;
            return -1;
        }
        if (s->on_recv) {
            errno = EBUSY;
            return -1;
        }
        err = enter_stream(f, s);
        if (err) {
            errno = err;
            return -1;
        }
        if (s->on_recv)
            err = EBUSY; /* set while f yielded */
    }
    if (err) {
        stream_leave(s);
        errno = err;
        return -1;
    }
    uint64_t deadline = deadline_of(timeout_us);
    bool woken = false;
    int rc = -1;
    for (;;) {
        if (held) { /* the fast path's receive, as if made here */
            held = false;
            goto got_it;
        }
        if ((err = stream_state(s)))
            break;
        if (!s->ring_lent && my_turn(&s->recv_waiters, s->handed_in, f)) {
            /* puts the stream on the ready-list */
            got = zev__stream_recv_now(s, f->loop->batch);
        got_it:
            if (s->handed_in == f)
                s->handed_in = NULL;
            if (got == 1) {
                rc = 0;
                break;
            }
            if (got < 0) {
                err = errno;
                break;
            }
            if (got == 2) { /* a long message goes on, or one was dropped */
                /* Timeout 0 does not wait for the rest; a deadline bounds
                 * the call (it returns at most one piece after it). The
                 * parts taken stay in the ring for the stream's next
                 * receive, which goes on from there: never lost, never
                 * split. */
                if (timeout_us == 0 || (deadline != UINT64_MAX && zev__clock_ns() >= deadline)) {
                    err = EAGAIN;
                    break;
                }
                /* The fiber that began a message keeps the turn until it
                 * has it: the stream's pass wakes no other waiter, and a
                 * fiber that comes meanwhile queues behind it. */
                s->handed_in = f;
                if ((err = yield_now(f)))
                    break; /* the rest of the loop ran meanwhile */
                continue;
            }
        }
        give_turn_back(s, &s->handed_in, f); /* handed, but nothing to take */
        if (timeout_us == 0) {
            err = EAGAIN;
            break;
        }
        wait_on(f, &s->recv_waiters, woken);
        int why = wait_until(f, deadline);
        woken = true;
        if (why) {
            err = why == ETIMEDOUT ? EAGAIN : why;
            break;
        }
    }
    give_turn_back(s, &s->handed_in, f);
    if (rc == 0) {
        ring_trim(s);
        f->borrowed = s; /* held until its next blocking call */
        stream_enter(s);
        *msg = &s->msg;
        if (!s->handed_in)
            zev__stream_wake_waiter(s, ZMQ_POLLIN); /* the next in line tries too */
    }
    stream_leave(s);
    if (rc < 0)
        errno = err;
    return rc;
}

/* Any zev_fiber_recv: the general path (errno kept as KEEP_ERRNO does). */
static __attribute__((noinline)) int recv_any(zev_stream_t *s, zev_msg_t **msg, int64_t timeout_us)
{
    int saved = errno;
    zev_fiber_t *f = enter();
    if (!f)
        return -1;
    int rc = recv_slow(f, s, msg, timeout_us, false, 0);
    if (rc >= 0)
        errno = saved;
    return rc;
}

/* The fast path's receive gave no message for f to have at once: the
 * general path goes on from there. */
static __attribute__((noinline, cold)) int
recv_held(zev_fiber_t *f, zev_stream_t *s, zev_msg_t **msg, int64_t timeout_us, int got, int saved)
{
    if (got != 1) { /* nothing borrowed is held while the fiber waits */
        int err = errno;
        zev__ring_recycle(s);
        errno = err;
    }
    int rc = recv_slow(f, s, msg, timeout_us, true, got);
    if (rc >= 0)
        errno = saved;
    return rc;
}

/* ---------------------------------------------------------------- send */

/* Gives parts[0..n) as (the continuation of) a message, the first part
 * waiting for its turn and for libzmq; `more`: more parts follow in a later
 * call. 0 once libzmq took them, or -1 with errno (nothing taken when the
 * first part was not). */
static int send_entered(zev_fiber_t *f, zev_stream_t *s, zmq_msg_t *parts, size_t n, bool more,
                        int64_t timeout_us)
{
    int err = enter_stream(f, s);
    if (err) {
        errno = err;
        return -1;
    }
    uint64_t deadline = deadline_of(timeout_us);
    bool continuing = zev__stream_builder(s) == f;
    /* the number its status is reported under: the open message's own, or
     * the next one */
    uint64_t number = continuing ? s->seq_given : s->seq_given + 1;
    bool woken = false;
    for (;;) { /* the first part: its turn, then libzmq */
        if ((err = stream_state(s)))
            break;
        if (continuing ||
            (s->open == OPEN_NONE && !s->qlen && my_turn(&s->send_waiters, s->handed_out, f))) {
            bool handed = s->handed_out == f;
            if (handed)
                s->handed_out = NULL;
            err = zev__stream_send_now(s, &parts[0], n > 1 || more, handed);
            if (err != EAGAIN && err != EFSM)
                break;
        }
        give_turn_back(s, &s->handed_out, f); /* handed, but a message came first */
        if (timeout_us == 0) {
            err = EAGAIN;
            break;
        }
        wait_on(f, &s->send_waiters, woken);
        int why = wait_until(f, deadline);
        woken = true;
        if (why) {
            err = why == ETIMEDOUT ? EAGAIN : why;
            break;
        }
    }
    give_turn_back(s, &s->handed_out, f);
    for (size_t i = 1; i < n && !err; i++) /* the rest never waits */
        err = zev__stream_send_now(s, &parts[i], i + 1 < n || more, false);
    if (!err) {
        bool open = more && s->open != OPEN_NONE;
        if (open && !continuing)
            f->building++;
        else if (!open && continuing && f->building)
            f->building--;
        s->open_fiber = open ? f : NULL;
        /* The message's status, if it just became known: libzmq took it (0),
         * or refused a later part (the errno on_send reports too). */
        if (!more && s->seq_settled >= number && s->settled_status)
            err = s->settled_status;
        if (!open && !s->handed_out)
            zev__stream_wake_waiter(s, ZMQ_POLLOUT); /* the next sender's turn */
    }
    stream_leave(s);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

/* parts[0..n) lie in the ring of the message the fiber borrows: it
 * forwards what it received (zev_msg_frame). */
static bool parts_borrowed(const zev_fiber_t *f, const zmq_msg_t *parts, size_t n)
{
    const zev_stream_t *b = f ? f->borrowed : NULL;
    if (!b)
        return false;
    uintptr_t lo = (uintptr_t)b->ring, hi = (uintptr_t)(b->ring + b->ring_cap);
    return (uintptr_t)parts < hi && (uintptr_t)(parts + n) > lo;
}

/* send_entered from a blocking call's start. Parts that are the borrowed
 * message's own stay borrowed until the call returns, libzmq having taken
 * them or not: returned at its start, they would be closed under it. */
static int send_parts(zev_stream_t *s, zmq_msg_t *parts, size_t n, bool more, int64_t timeout_us)
{
    bool forwarding = parts_borrowed(current, parts, n);
    zev_stream_t *lent = forwarding ? current->borrowed : NULL;
    if (lent) /* other fibers run while this one waits: none receives into it */
        lent->ring_lent = true;
    zev_fiber_t *f = enter_keeping(forwarding);
    int rc = f ? send_entered(f, s, parts, n, more, timeout_us) : -1;
    if (forwarding) {
        int err = errno;
        lent->ring_lent = false;
        zev__stream_mark_ready(lent); /* a fiber that waited to receive goes on */
        release_borrowed(current);
        errno = err;
    }
    return rc;
}

/* The flags both sends take: ZMQ_SNDMORE, and ZMQ_DONTWAIT as timeout 0. */
static int send_flags_ok(int flags)
{
    return !(flags & ~(ZMQ_SNDMORE | ZMQ_DONTWAIT));
}

static int send_impl(zev_stream_t *s, const void *data, size_t len, int flags, int64_t timeout_us)
{
    if (!s || (!data && len) || !send_flags_ok(flags)) {
        errno = current ? EINVAL : EPERM;
        return -1;
    }
    zmq_msg_t msg;
    if (zmq_msg_init_size(&msg, len) < 0)
        return -1;
    if (len)
        memcpy(zmq_msg_data(&msg), data, len);
    int rc = send_parts(s, &msg, 1, flags & ZMQ_SNDMORE, (flags & ZMQ_DONTWAIT) ? 0 : timeout_us);
    int err = errno;
    zmq_msg_close(&msg); /* empty once taken */
    errno = err;
    return rc;
}

static int send_msg_impl(zev_stream_t *s, zmq_msg_t *parts, size_t nparts, int flags,
                         int64_t timeout_us)
{
    if (!s || !parts || !nparts || !send_flags_ok(flags)) {
        errno = current ? EINVAL : EPERM;
        return -1;
    }
    return send_parts(s, parts, nparts, flags & ZMQ_SNDMORE,
                      (flags & ZMQ_DONTWAIT) ? 0 : timeout_us);
}

/* ---------------------------------------------------------------- poll */

/* Each item's revents now; the count of ready items, or -1 with errno.
 * READ: a message is there; WRITE: a send would go to libzmq now (no
 * message open but the caller's own, nothing queued, libzmq has room). */
static int poll_now(zev_fiber_t *f, zev_fiber_pollitem_t *items, size_t n)
{
    int ready = 0;
    f->nfds = 0;
    for (size_t i = 0; i < n; i++) {
        zev_fiber_pollitem_t *it = &items[i];
        it->revents = 0;
        if (!it->stream) {
            f->fds[f->nfds++] = (fiber_fd_t){
                .kind = ZEV__H_FIBER_FD, .fiber = f, .fd = it->fd, .events = it->events};
            continue;
        }
        zev_stream_t *s = it->stream;
        if (stream_state(s)) {
            it->revents = it->events; /* its calls fail at once: not waiting */
        } else {
            if ((it->events & ZEV_READ) && zev__stream_readable_now(s))
                it->revents |= ZEV_READ;
            if ((it->events & ZEV_WRITE) &&
                (zev__stream_builder(s) == f || zev__stream_writable_now(s)))
                it->revents |= ZEV_WRITE;
        }
        ready += it->revents != 0;
    }
    if (f->nfds) {
        int r = fds_ready_now(f->fds, f->nfds);
        if (r < 0)
            return -1;
        for (size_t i = 0, k = 0; i < n; i++)
            if (!items[i].stream)
                ready += (items[i].revents = (short)f->fds[k++].revents) != 0;
    }
    return ready;
}

static int poll_impl(zev_fiber_pollitem_t *items, size_t n, int64_t timeout_us)
{
    zev_fiber_t *f = enter();
    if (!f)
        return -1;
    size_t nfds = 0;
    if (!items && n) {
        errno = EINVAL;
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (!valid_events(items[i].events) ||
            (items[i].stream && items[i].stream->on_recv && (items[i].events & ZEV_READ))) {
            errno = EINVAL;
            return -1;
        }
        nfds += !items[i].stream;
    }
    if (reserve_waits(f, 2 * n, nfds) < 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (items[i].stream)
            stream_enter(items[i].stream);
    uint64_t deadline = deadline_of(timeout_us);
    int rc;
    bool waited = false;
    for (;;) {
        rc = poll_now(f, items, n);
        if (rc != 0 || timeout_us == 0)
            break;
        for (size_t i = 0; i < n; i++) {
            zev_stream_t *s = items[i].stream;
            if (s && (items[i].events & ZEV_READ))
                wait_on(f, &s->poll_in, false);
            if (s && (items[i].events & ZEV_WRITE))
                wait_on(f, &s->poll_out, false);
        }
        if (register_fds(f) < 0) {
            rc = -1;
            break;
        }
        int why = wait_until(f, deadline);
        waited = true;
        if (why == ETIMEDOUT) {
            rc = poll_now(f, items, n); /* the last word: zmq_poll's 0, or what came */
            break;
        }
        if (why && why != EBADF && why != ENOTSOCK && why != ETERM) {
            errno = why;
            rc = -1;
            break;
        }
    }
    f->nfds = 0;
    if (rc >= 0 && !waited) {
        int err = pace(f); /* did not wait: counts against the batch */
        if (err) {
            errno = err;
            rc = -1;
        }
    }
    for (size_t i = 0; i < n; i++)
        if (items[i].stream)
            stream_leave(items[i].stream);
    return rc;
}

/* ------------------------------------------------- the public entry points */

/* A call that succeeds leaves errno as it found it: what the loop, other
 * fibers and the call's own tries (an EAGAIN before it waited) set in
 * between is not the caller's business. */
#define KEEP_ERRNO(call)                                                                           \
    do {                                                                                           \
        int saved_ = errno;                                                                        \
        int rc_ = (call);                                                                          \
        if (rc_ >= 0)                                                                              \
            errno = saved_;                                                                        \
        return rc_;                                                                                \
    } while (0)

int zev_fiber_join(zev_fiber_t *t, int64_t timeout_us)
{
    KEEP_ERRNO(join_impl(t, timeout_us));
}

int zev_fiber_sleep(uint64_t us)
{
    KEEP_ERRNO(sleep_impl(us));
}

int zev_fiber_yield(void)
{
    zev_fiber_t *f = current;
    if (__builtin_expect(!f || f->borrowed || f->cancelled, 0))
        KEEP_ERRNO(yield_impl());
    int why = yield_now(f); /* suspend() keeps errno */
    if (why) {
        errno = why;
        return -1;
    }
    return 0;
}

int zev_fiber_wait_fd(int fd, int events, int64_t timeout_us)
{
    KEEP_ERRNO(wait_fd_impl(fd, events, timeout_us));
}

/* Fast path: a fiber receiving from the stream it has its last message of,
 * in its turn, its batch not spent, nothing amiss. The hold on the stream
 * moves from the old message to the call and on to the new one, and the
 * ring's slots are overwritten by the receive (as in the stream's pass)
 * rather than closed and made again. Anything else: recv_any. */
static __attribute__((noinline)) int recv_again(zev_fiber_t *f, zev_stream_t *s, zev_msg_t **msg,
                                                int64_t timeout_us)
{
    if (__builtin_expect(!msg || f->cancelled || s->on_recv || s->ring_lent || stream_state(s) ||
                             f->budget >= f->loop->batch ||
                             !my_turn(&s->recv_waiters, s->handed_in, f),
                         0))
        return recv_any(s, msg, timeout_us);
    int saved = errno;
    f->borrowed = NULL;
    f->budget++; /* pace(): within the batch */
    if (__builtin_expect(s->ring_cap > RING_SMALL, 0))
        zev__ring_recycle(s); /* which gives a grown ring's memory back */
    int got = zev__stream_recv_now(s, f->loop->batch);
    if (__builtin_expect(got != 1 || s->handed_in, 0))
        return recv_held(f, s, msg, timeout_us, got, saved);
    if (__builtin_expect(s->ring_used > s->msg.n, 0))
        ring_trim(s);
    f->borrowed = s;
    *msg = &s->msg;
    if (__builtin_expect(!zev__list_empty(&s->recv_waiters), 0))
        zev__stream_wake_waiter(s, ZMQ_POLLIN); /* the next in line tries too */
    errno = saved;
    return 0;
}

int zev_fiber_recv(zev_stream_t *s, zev_msg_t **msg, int64_t timeout_us)
{
    zev_fiber_t *f = current;
    if (__builtin_expect(f && s && f->borrowed == s, 1))
        return recv_again(f, s, msg, timeout_us);
    return recv_any(s, msg, timeout_us);
}

int zev_fiber_send(zev_stream_t *s, const void *data, size_t len, int flags, int64_t timeout_us)
{
    KEEP_ERRNO(send_impl(s, data, len, flags, timeout_us));
}

int zev_fiber_send_msg(zev_stream_t *s, zmq_msg_t *parts, size_t nparts, int flags,
                       int64_t timeout_us)
{
    KEEP_ERRNO(send_msg_impl(s, parts, nparts, flags, timeout_us));
}

int zev_fiber_poll(zev_fiber_pollitem_t *items, size_t n, int64_t timeout_us)
{
    KEEP_ERRNO(poll_impl(items, n, timeout_us));
}
