/*
 * The cross-thread queue: the only way another thread touches a loop.
 *
 * Design notes
 * - Intrusive multi-producer single-consumer queue after Dmitry Vyukov's
 *   design: a producer does one atomic exchange on `head` and then links the
 *   previous node to its own; no lock, no CAS loop, wait-free for producers.
 *   The consumer owns `tail`. A `stub` node keeps the list non-empty so the
 *   consumer never races a producer for the last node.
 * - Between a producer's exchange and its link store, the consumer can see a
 *   node with no successor although `head` moved on: it then stops and the
 *   rest is taken next iteration (zev__hub_pending stays true, so the loop
 *   does not block meanwhile). The last drain, at zev_loop_destroy or when
 *   the hub's last reference goes, cannot leave anything for later: it
 *   waits until the queue is empty (zev__hub_drain_all). Producers still
 *   pushing then are those allowed to (frame releases and tracker
 *   completions, each holding a hub reference until its push is done, and
 *   finite in number), so the wait ends; every post made before destroy
 *   was called runs before it returns, on the thread that called it.
 * - One coalesced wakeup: `wake_pending` is exchanged to 1 by producers and
 *   only the one that saw 0 writes the fd. The loop reads the fd empty, then
 *   clears the flag, and drains the queue after that; a producer links its
 *   node (or sets stop_requested) before it exchanges the flag, so either
 *   the loop sees the node or the producer sees 0 and writes (after the
 *   clear, so no read eats it). Both sides use a read-modify-write on the
 *   flag, which is what makes "either ... or" hold: the two exchanges are
 *   ordered in the flag's modification order. If the producer's comes
 *   first, the loop's exchange reads the 1 it wrote and synchronises with
 *   it, so everything the producer did before (the link, the stop request)
 *   happens before the loop's drain. If the loop's comes first, the
 *   producer reads 0 and writes the fd. A plain store for the clear would
 *   leave the store-buffering pattern (store flag, load head / store head,
 *   load flag), where C11 allows both sides to miss each other: a lost
 *   wakeup, real on POWER and recent ARM even if x86 never shows it.
 * - The hub outlives the loop while kept frames or trackers reference it
 *   (they are released from libzmq's threads, perhaps after
 *   zev_loop_destroy). Whoever drops the last reference is the only consumer
 *   left: it drains with loop == NULL (free resources, run no user callback)
 *   and frees the hub.
 */
#include "zev-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

static int wake_fds(int *rfd, int *wfd)
{
#ifdef __linux__
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        return -1;
    *rfd = *wfd = fd;
#else
    int p[2];
    if (pipe(p) < 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        fcntl(p[i], F_SETFL, fcntl(p[i], F_GETFL) | O_NONBLOCK);
        fcntl(p[i], F_SETFD, FD_CLOEXEC);
    }
    *rfd = p[0];
    *wfd = p[1];
#endif
    return 0;
}

zev__hub_t *zev__hub_new(void)
{
    zev__hub_t *hub = calloc(1, sizeof *hub);
    if (!hub)
        return NULL;
    if (wake_fds(&hub->wake_rfd, &hub->wake_wfd) < 0) {
        int err = errno;
        free(hub);
        errno = err;
        return NULL;
    }
    atomic_init(&hub->stub.next, NULL);
    atomic_init(&hub->head, &hub->stub);
    hub->tail = &hub->stub;
    zmq_msg_init(&hub->empty);
    atomic_init(&hub->refs, 1);
    atomic_init(&hub->wake_pending, 0);
    hub->wake_kind = ZEV__H_WAKEUP;
    return hub;
}

void zev__hub_free(zev__hub_t *hub)
{
    zev__hub_drain_all(hub, NULL);
    zev__frame_pool_free(hub);
    zmq_msg_close(&hub->empty); /* holds nothing: for form's sake */
    close(hub->wake_rfd);
    if (hub->wake_wfd != hub->wake_rfd)
        close(hub->wake_wfd);
    free(hub);
}

void zev__hub_push(zev__hub_t *hub, zev__qnode_t *n)
{
    atomic_store_explicit(&n->next, NULL, memory_order_relaxed);
    /* acq_rel: the node's contents are published by the release half; the
     * acquire half orders us after the previous producer's exchange. */
    zev__qnode_t *prev = atomic_exchange_explicit(&hub->head, n, memory_order_acq_rel);
    atomic_store_explicit(&prev->next, n, memory_order_release);
}

void zev__hub_wake(zev__hub_t *hub)
{
    if (atomic_exchange(&hub->wake_pending, 1))
        return;
    uint64_t one = 1;
    ssize_t rc;
    int saved = errno; /* callers that succeed leave errno alone */
    do
        rc = write(hub->wake_wfd, &one, hub->wake_wfd == hub->wake_rfd ? sizeof one : 1);
    while (rc < 0 && errno == EINTR);
    /* EAGAIN: the fd is already readable, which is all a wakeup needs. */
    errno = saved;
}

void zev__hub_clear_wake(zev__hub_t *hub)
{
    /* Read first, then clear the flag: a producer that saw the flag still
     * set wrote nothing, and its node is drained after this (it was linked
     * before its exchange, which came before our store). Clearing first
     * would let a producer write after the store and have that write eaten
     * by this read, leaving the flag at 1 with the fd empty: every later
     * wakeup would then be skipped. */
    char buf[64];
    while (read(hub->wake_rfd, buf, sizeof buf) > 0 && hub->wake_rfd != hub->wake_wfd)
        ;
    atomic_exchange(&hub->wake_pending, 0); /* an exchange, not a store: see the notes */
}

int zev__hub_pending(zev__hub_t *hub)
{
    return hub->tail != &hub->stub ||
           atomic_load_explicit(&hub->head, memory_order_acquire) != &hub->stub;
}

/* Takes the oldest node, or NULL when the queue is empty or a producer is
 * between its exchange and its link. */
static zev__qnode_t *pop(zev__hub_t *hub)
{
    zev__qnode_t *tail = hub->tail;
    zev__qnode_t *next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (tail == &hub->stub) {
        if (!next)
            return NULL;
        hub->tail = tail = next;
        next = atomic_load_explicit(&next->next, memory_order_acquire);
    }
    if (next) {
        hub->tail = next;
        return tail;
    }
    if (tail != atomic_load_explicit(&hub->head, memory_order_acquire))
        return NULL; /* a producer is linking after tail */
    /* tail is the last node: put the stub behind it so tail can be taken */
    zev__hub_push(hub, &hub->stub);
    next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (next) {
        hub->tail = next;
        return tail;
    }
    return NULL;
}

size_t zev__hub_drain_all(zev__hub_t *hub, zev_loop_t *loop)
{
    size_t n = 0;
    for (;;) {
        n += zev__hub_drain(hub, loop);
        if (!zev__hub_pending(hub))
            return n;
        /* A producer between its exchange and its link (or nodes pushed
         * since the drain began): its very next store links the node, so
         * the wait is as short as the producer's thread is scheduled. */
        sched_yield();
    }
}

size_t zev__hub_drain(zev__hub_t *hub, zev_loop_t *loop)
{
    /* Only what was queued when the drain began: the newest node now marks
     * the end. (If it is the stub, nothing is queued.) */
    zev__qnode_t *last = atomic_load_explicit(&hub->head, memory_order_acquire);
    size_t n = 0;
    for (;;) {
        /* `last` may be the stub re-queued behind older nodes by pop(): the
         * snapshot then ends where the stub comes back to the tail. */
        if (last == &hub->stub && hub->tail == &hub->stub)
            break;
        zev__qnode_t *node = pop(hub);
        if (!node)
            break;
        int was_last = node == last;
        node->run(node, loop);
        n++;
        if (was_last)
            break;
    }
    return n;
}
