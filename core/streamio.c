/*
 * A stream's I/O: the ZMQ_FD readiness pass, receiving, sending and flush.
 * This is the per-message path, kept in one file so the compiler can inline
 * it; the stream's lifetime (new, close, failure, setters) is in stream.c,
 * its send queue and on_send reports in sendq.c.
 *
 * Design notes
 * - ZMQ_FD is edge-triggered and any zmq_send, zmq_recv or ZMQ_EVENTS read
 *   may consume its edge. One function, stream_work, owns that fact: it reads
 *   ZMQ_EVENTS, handles up to its budget of messages, and repeats. A stream
 *   leaves the ready-list only when stream_work returns `idle`, which it
 *   does only right after ZMQ_EVENTS reported nothing the stream wants, or
 *   right after a recv found nothing while no send is queued (that recv
 *   made libzmq process its commands unthrottled: for POLLIN it is the same
 *   read, and it saves a getpid + poll per wakeup). Out of budget it stays
 *   on the ready-list (tail), so the next iteration serves it without
 *   waiting for an edge that is gone.
 * - Everything that touches the socket outside the stream's own pass (a
 *   send from another callback, a timer or user code, a flush) and every
 *   change of interest (on_recv set, frames returned under max_frames, a
 *   message queued) puts the stream on the ready-list: mark_ready. That is a
 *   list insert, not a syscall; the pass re-reads ZMQ_EVENTS.
 * - Sends go straight to libzmq while the queue is empty; once libzmq says
 *   EAGAIN (HWM, or EFSM: REQ/REP state) the message and all after it wait
 *   in the stream's FIFO of parts, so order is kept. A multipart message
 *   follows the path its first part took. The queue is bounded in messages.
 * - on_send statuses are recorded run-length encoded and delivered from the
 *   loop (the pass, flush, or the close phase), never inside a send call.
 * - POLLOUT with EAGAIN on the head message (ROUTER_MANDATORY, one peer's
 *   pipe full) sets `blocked`: POLLOUT stops counting as work until the next
 *   ZMQ_FD edge or a back-off timer (doubling up to BACKOFF_MAX), because a
 *   ZMQ_EVENTS read right after the EAGAIN may have swallowed the edge that
 *   says there is room again. One blocked peer holds the messages behind it.
 * - Errors that mean the socket is gone (ENOTSOCK, ETERM) go to
 *   zev__stream_fail; a pass that finds the flush of a closing stream done
 *   hands it to zev__stream_finalize (both in stream.c).
 */
#include "zev-internal.h"

#include <errno.h>
#include <string.h>

#define BACKOFF_MIN_NS 100000u   /* 100 µs */
#define BACKOFF_MAX_NS 20000000u /* 20 ms */

static int would_block(int err)
{
    return err == EAGAIN || err == EFSM;
}

static int socket_gone(int err)
{
    return err == ENOTSOCK || err == ETERM;
}

/* A stream whose socket is gone is only scheduled while it still owes
 * on_send statuses: its next pass delivers them and finds s->err. */
static void mark_ready(zev_stream_t *s)
{
    if (!s->finalized && (!s->err || zev__reports_owed(s)) && !zev__list_linked(&s->ready))
        zev__list_push_tail(&s->loop->ready, &s->ready);
}

void zev__stream_kick(zev_stream_t *s)
{
    mark_ready(s);
}

/* ----------------------------------------------------------- POLLOUT back-off */

static void backoff_fire(zev_timer_t *t, void *arg)
{
    (void)t;
    zev_stream_t *s = arg;
    s->backoff_timer = NULL;
    s->blocked = false;
    mark_ready(s);
}

static void set_blocked(zev_stream_t *s)
{
    s->blocked = true;
    if (s->backoff_timer)
        return;
    s->backoff_ns = s->backoff_ns ? s->backoff_ns * 2 : BACKOFF_MIN_NS;
    if (s->backoff_ns > BACKOFF_MAX_NS)
        s->backoff_ns = BACKOFF_MAX_NS;
    s->backoff_timer = zev_timer_start(s->loop, s->backoff_ns / 1000u, 0, backoff_fire, s);
    if (!s->backoff_timer)
        s->blocked = false; /* no timer would end the wait: keep trying rather than stall */
}

/* ------------------------------------------------------------------- sending */

/* Hands one part to libzmq now, or queues it. Returns 0 when the part was
 * taken (sent, queued, or discarded with its failed message), -1 with errno
 * when it was not, which only happens at the first part of a message. The
 * caller reserved queue space. */
static int send_part(zev_stream_t *s, zmq_msg_t *msg, bool more)
{
    bool first = s->open == OPEN_NONE;
    if (first && zev__report_reserve(s, 1) < 0)
        return -1;
    if (s->open == OPEN_DISCARD) {
        zmq_msg_close(msg);
        zmq_msg_init(msg);
        if (!more)
            s->open = OPEN_NONE;
        return 0;
    }
    if (first ? s->qlen == 0 : s->open == OPEN_DIRECT) {
        int rc, err;
        do { /* EINTR took nothing: a later part given up here would leave
              * libzmq holding the earlier ones with SNDMORE set */
            s->touches++;
            rc = zmq_msg_send(msg, s->sock, ZMQ_DONTWAIT | (more ? ZMQ_SNDMORE : 0));
            err = errno;
        } while (rc < 0 && err == EINTR);
        if (!s->in_pass)
            mark_ready(s); /* the send may have consumed the ZMQ_FD edge */
        if (rc >= 0) {
            s->open = more ? OPEN_DIRECT : OPEN_NONE;
            if (!more)
                zev__report_add(s, 0);
            return 0;
        }
        if (!would_block(err)) {
            if (socket_gone(err))
                zev__stream_fail(s, err);
            if (first) {
                errno = err;
                return -1;
            }
            zmq_msg_close(msg);
            zmq_msg_init(msg);
            if (!socket_gone(err)) /* else zev__stream_fail reported the message */
                zev__report_add(s, err);
            s->open = more ? OPEN_DISCARD : OPEN_NONE;
            return 0;
        }
    } else if (first && s->max_queue && s->qmsgs >= s->max_queue) {
        errno = EAGAIN;
        return -1;
    }
    zev__sendq_push(s, msg, more);
    mark_ready(s);
    return 0;
}

/* Checks the state and the flags shared by the send functions. */
static int send_allowed(const zev_stream_t *s, int flags)
{
    if (!zev__stream_usable(s))
        return 0;
    if (flags & ~(ZMQ_SNDMORE | ZMQ_DONTWAIT)) {
        errno = EINVAL;
        return 0;
    }
    if (s->err) {
        errno = s->err;
        return 0;
    }
    return 1;
}

int zev_stream_send(zev_stream_t *s, const void *data, size_t len, int flags)
{
    if (!send_allowed(s, flags))
        return -1;
    if (!data && len) {
        errno = EINVAL;
        return -1;
    }
    if (zev__sendq_reserve(s, 1) < 0)
        return -1;
    zmq_msg_t msg;
    if (zmq_msg_init_size(&msg, len) < 0)
        return -1;
    if (len)
        memcpy(zmq_msg_data(&msg), data, len);
    int rc = send_part(s, &msg, flags & ZMQ_SNDMORE);
    zmq_msg_close(&msg);
    return rc;
}

int zev_stream_send_msg(zev_stream_t *s, zmq_msg_t *parts, size_t nparts, int flags)
{
    if (!send_allowed(s, flags))
        return -1;
    if (!parts || !nparts) {
        errno = EINVAL;
        return -1;
    }
    if (zev__sendq_reserve(s, nparts) < 0)
        return -1;
    for (size_t i = 0; i < nparts; i++) {
        bool more = i + 1 < nparts || (flags & ZMQ_SNDMORE);
        if (send_part(s, &parts[i], more) < 0)
            return -1; /* only the first part can fail: nothing was taken */
    }
    return 0;
}

/* Sends queued parts while libzmq takes them; returns messages handled. */
static size_t send_some(zev_stream_t *s, size_t room)
{
    size_t n = 0;
    while (s->qlen && n < room) {
        /* A message the closed user can never finish stays out of libzmq. */
        if (s->closed && s->open == OPEN_QUEUED && s->qmsgs == 1)
            break;
        zev__sendpart_t *p = zev__sendq_at(s, 0);
        bool more = p->more;
        s->touches++;
        if (zmq_msg_send(&p->msg, s->sock, ZMQ_DONTWAIT | (more ? ZMQ_SNDMORE : 0)) < 0) {
            int err = errno;
            if (err == EINTR)
                continue;
            if (would_block(err)) {
                /* Only when POLLOUT was reported and not even one message
                 * went out (ROUTER_MANDATORY, one peer full) is POLLOUT
                 * untrustworthy. After n > 0 sends this is plain HWM: the
                 * pass re-reads ZMQ_EVENTS, which either shows room again
                 * or leaves the next activate_write to signal a new edge. */
                if (n == 0)
                    set_blocked(s);
                break;
            }
            if (socket_gone(err)) {
                zev__stream_fail(s, err);
                break;
            }
            zev__sendq_drop_head(s, err);
            n++;
            continue;
        }
        zev__sendq_pop(s);
        if (!more) {
            s->qmsgs--;
            s->backoff_ns = 0;
            zev__report_add(s, 0);
            n++;
        }
    }
    return n;
}

/* ----------------------------------------------------------------- receiving */

static int frames_allow(const zev_stream_t *s)
{
    return !s->max_frames || s->frames_out < s->max_frames;
}

/* Receives one whole message into the ring: 1, 0 (nothing there), -1.
 * When the ring cannot grow for a long multipart message, the parts already
 * received stay in it (rx_parts) and the next call goes on from there:
 * leaving the rest in libzmq would make its tail look like a new message. */
static int recv_message(zev_stream_t *s)
{
    size_t i = s->rx_parts;
    s->rx_parts = 0;
    for (;;) {
        if (i == s->ring_cap && zev__ring_reserve(s, i + 1) < 0) {
            s->rx_parts = i;
            return -1;
        }
        if (i == s->ring_used)
            s->ring_used++; /* its old content goes in the recv, its last in recycle */
        s->kept[i] = NULL;
        s->touches++;
        if (zmq_msg_recv(&s->ring[i], s->sock, ZMQ_DONTWAIT) < 0) {
            if (errno == EINTR)
                continue;
            if (i == 0 && errno == EAGAIN)
                return 0;
            return -1;
        }
        if (!zmq_msg_more(&s->ring[i++]))
            break;
    }
    s->msg.n = i;
    return 1;
}

/* Receives and dispatches up to `room` messages. *drained says the last
 * socket operation was a recv that found nothing: libzmq processed every
 * pending command for it, unthrottled, so for POLLIN it is as good as a
 * ZMQ_EVENTS read (and consumed the same edge). */
static size_t recv_some(zev_stream_t *s, size_t room, bool *drained)
{
    size_t n = 0;
    while (n < room && s->on_recv && !s->closed && frames_allow(s)) {
        int rc = recv_message(s);
        if (rc <= 0) {
            if (rc < 0 && socket_gone(errno))
                zev__stream_fail(s, errno);
            *drained = rc == 0;
            s->drained_at = s->touches;
            break;
        }
        s->in_recv_cb = true;
        s->on_recv(s, &s->msg, s->recv_arg);
        s->in_recv_cb = false;
        n++;
    }
    zev__ring_recycle(s); /* nothing borrowed is held while the stream waits */
    return n;
}

/* ------------------------------------------------------------- the one pass */

static int wants(const zev_stream_t *s)
{
    int w = 0;
    if (s->on_recv && !s->closed && frames_allow(s))
        w |= ZMQ_POLLIN;
    if (s->qlen && !s->blocked)
        w |= ZMQ_POLLOUT;
    return w;
}

/* Handles up to `limit` messages (0 = no limit) of the kinds in `mask`
 * (ZMQ_POLLIN / ZMQ_POLLOUT). Sets *idle when it stopped because ZMQ_EVENTS
 * reported nothing the stream wants (or the stream is finished). */
static size_t stream_work(zev_stream_t *s, int mask, size_t limit, bool *idle)
{
    bool outer = s->in_pass;
    size_t done = 0;
    /* An edge on ZMQ_FD, or a pass that ran out of budget while receiving,
     * leaves a hint: try recv first and read ZMQ_EVENTS only when needed.
     * Only a fresh read, or a recv that found nothing while no send waits,
     * may end the pass as idle: the hint can cost a syscall, never an edge. */
    int hint = s->recv_hint;
    s->recv_hint = 0;
    *idle = false;
    s->in_pass = true;
    zev__reports_deliver(s);
    for (;;) {
        if (s->finalized || s->err) {
            *idle = true;
            break;
        }
        if (limit && done >= limit)
            break;
        int events = hint;
        bool fresh = !hint;
        size_t len = sizeof events;
        hint = 0;
        if (fresh && (s->touches++, zmq_getsockopt(s->sock, ZMQ_EVENTS, &events, &len) < 0)) {
            if (socket_gone(errno))
                zev__stream_fail(s, errno);
            *idle = true;
            break;
        }
        int act = events & wants(s) & mask;
        if (!act) {
            *idle = fresh;
            if (fresh)
                break;
            continue;
        }
        size_t room = limit ? limit - done : SIZE_MAX, n = 0;
        bool was_blocked = s->blocked, drained = false;
        if (act & ZMQ_POLLIN)
            n += recv_some(s, room, &drained);
        if ((act & ZMQ_POLLOUT) && n < room)
            n += send_some(s, room - n);
        zev__reports_deliver(s);
        done += n;
        if (s->flushing && zev__sendq_flush_done(s)) {
            zev__stream_finalize(s);
        } else if (drained && s->touches == s->drained_at && !(wants(s) & ZMQ_POLLOUT)) {
            /* DESIGN's rule: a recv that ended in EAGAIN with no sends
             * queued may end the pass; the ZMQ_EVENTS read would only
             * repeat what that recv's command processing just did. */
            *idle = true;
            break;
        } else if (n == 0 && s->blocked == was_blocked && fresh)
            break; /* ZMQ_EVENTS promised work libzmq did not give: retry next iteration */
        else if (limit && done >= limit)
            s->recv_hint = act & ZMQ_POLLIN;
    }
    if (zev__reports_owed(s))
        *idle = false; /* statuses added by on_send itself: the next pass reports them */
    s->in_pass = outer;
    return done;
}

void zev__stream_fired(zev_stream_t *s)
{
    s->blocked = false; /* a new edge: POLLOUT may be true again */
    if (s->on_recv)
        s->recv_hint = ZMQ_POLLIN; /* most edges bring a message: try recv first */
    mark_ready(s);
}

int zev__streams_all_ready(zev_loop_t *loop, size_t nfds)
{
    size_t n = 0;
    for (zev__list_t *p = loop->ready.next; p != &loop->ready && n <= nfds; p = p->next) {
        const zev_stream_t *s = zev__container_of(p, zev_stream_t, ready);
        if (s->err || s->blocked)
            return 0; /* unregistered, or waiting for its edge (which clears blocked) */
        n++;
    }
    return n == nfds;
}

/* Busy-polling a lone receiving stream through ZMQ_EVENTS instead of the
 * backend: an epoll_wait reporting its edge would be followed by libzmq's
 * own poll of the same mailbox fd inside zmq_msg_recv; the ZMQ_EVENTS read
 * is that poll, and leaves the message ready for the recv (two syscalls
 * fewer between a message's arrival and its callback). Reading ZMQ_EVENTS
 * consumes the edge, so only a stream that waits for nothing but POLLIN
 * qualifies: queuing a send later puts it on the ready-list anyway. */
zev_stream_t *zev__stream_spin_candidate(zev_loop_t *loop)
{
    zev__list_t *first = loop->streams.next;
    if (first == &loop->streams || first->next != &loop->streams)
        return NULL;
    zev_stream_t *s = zev__container_of(first, zev_stream_t, node);
    return !s->err && !s->qlen && !s->blocked && (wants(s) & ZMQ_POLLIN) ? s : NULL;
}

int zev__stream_spin_turn(zev_stream_t *s)
{
    int events = 0;
    size_t len = sizeof events;
    s->touches++;
    if (zmq_getsockopt(s->sock, ZMQ_EVENTS, &events, &len) == 0 && !(events & ZMQ_POLLIN))
        return 0;
    zev__stream_fired(s); /* recv first; an error is for the pass to find */
    return 1;
}

size_t zev__streams_process(zev_loop_t *loop)
{
    /* Only the streams ready when the phase began; those made ready during
     * it (and those out of budget) wait at the tail for the next iteration. */
    zev__list_t batch;
    size_t handled = 0;
    zev__list_init(&batch);
    if (zev__list_empty(&loop->ready))
        return 0;
    batch.next = loop->ready.next;
    batch.prev = loop->ready.prev;
    batch.next->prev = batch.prev->next = &batch;
    zev__list_init(&loop->ready);

    zev__list_t *node;
    while ((node = zev__list_pop_head(&batch))) {
        zev_stream_t *s = zev__container_of(node, zev_stream_t, ready);
        bool idle;
        handled +=
            stream_work(s, ZMQ_POLLIN | ZMQ_POLLOUT, s->batch ? s->batch : loop->batch, &idle);
        if (!idle)
            mark_ready(s);
    }
    return handled;
}

int zev_stream_flush(zev_stream_t *s, int flags, size_t limit)
{
    if (!zev__stream_usable(s))
        return -1;
    if (!flags || (flags & ~(ZEV_READ | ZEV_WRITE))) {
        errno = EINVAL;
        return -1;
    }
    if (s->err) {
        errno = s->err;
        return -1;
    }
    int mask = (flags & ZEV_WRITE) ? ZMQ_POLLOUT : 0;
    if ((flags & ZEV_READ) && !s->in_recv_cb) /* its frames are still borrowed */
        mask |= ZMQ_POLLIN;
    bool idle;
    size_t n = mask ? stream_work(s, mask, limit, &idle) : 0;
    if (n == 0 && s->err) { /* the socket turned out to be gone: say so */
        errno = s->err;
        return -1;
    }
    mark_ready(s); /* the socket was touched outside the stream's pass */
    return n > INT32_MAX ? INT32_MAX : (int)n;
}
