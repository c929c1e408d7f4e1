/*
 * Streams: one libzmq socket on a loop (PyZMQ's ZMQStream for C), and here
 * its lifetime: creation, the setters and getters, closing and failure.
 * What a stream does with its socket (the ZMQ_FD readiness pass, recv,
 * send, flush) is in streamio.c; its send queue and on_send reports are in
 * sendq.c.
 *
 * Design notes
 * - A new stream is registered for ZEV_READ on its ZMQ_FD and put on the
 *   ready-list at once: messages pending before registration signal
 *   nothing (inproc signals nothing until its command queue is drained).
 * - Closing is deferred as in libuv: zev_stream_close unregisters at once
 *   (or after the flush with ZEV_CLOSE_FLUSH) and the close phase at the end
 *   of the iteration delivers the last on_send statuses, runs the close
 *   callback once and frees the stream. So a stream may be closed from
 *   inside any callback, its own included, and stays valid until its close
 *   callback has returned.
 * - zev__stream_finalize is the one way from open to closing, idempotent:
 *   what is still queued is reported ECANCELED, the timers stop and the
 *   stream moves from loop->streams to loop->closing_streams. A flushing
 *   close reaches it when its queue drains (the pass), when ZMQ_LINGER runs
 *   out (linger timer), when the socket fails, or when the loop is destroyed.
 * - A socket that is gone (ENOTSOCK: zmq_closed under us; ETERM: its
 *   context terminated) fails the stream once, in zev__stream_fail: it is
 *   unregistered, its queue reported with that errno, and later sends and
 *   flushes answer that errno. The stream stays open until the user closes
 *   it; after ENOTSOCK zev never calls zmq_close on the socket.
 * - ZEV_CLOSE_FLUSH | ZEV_CLOSE_SOCKET waits one ZMQ_LINGER in all: zev
 *   hands libzmq what it can until the linger's end, then sets the socket's
 *   ZMQ_LINGER to what is left of it before zmq_close, so libzmq's own
 *   linger for what it still holds does not start the wait over.
 */
#include "zev-internal.h"

#include <errno.h>
#include <stdlib.h>

/* ------------------------------------------------------- closing and failure */

/* ---------------------------------------------------------- the stream timer */

/* Whichever of the stream's deadlines came. */
static void stream_timer_fire(zev_timer_t *t, void *arg)
{
    (void)t;
    zev_stream_t *s = arg;
    uint64_t now = s->loop->now_ns;
    if (s->linger_end_ns && now >= s->linger_end_ns) {
        zev__stream_finalize(s); /* what is still queued is ECANCELED */
        return;
    }
    if (s->backoff_until && now >= s->backoff_until) {
        s->backoff_until = 0;
        s->blocked = false;
    }
    s->changes++;              /* the pass looks afresh: the head may be overdue */
    zev__stream_mark_ready(s); /* the pass tries, drops what is overdue, re-arms */
    zev__stream_timer_update(s);
}

int zev__stream_timer_need(zev_stream_t *s)
{
    if (!s->timer)
        s->timer = zev__timer_new(s->loop, stream_timer_fire, s);
    return s->timer ? 0 : -1;
}

void zev__stream_timer_update(zev_stream_t *s)
{
    if (!s->timer)
        return;
    uint64_t at = zev__sendq_deadline(s);
    if (s->backoff_until && s->backoff_until < at)
        at = s->backoff_until;
    if (s->linger_end_ns && s->linger_end_ns < at)
        at = s->linger_end_ns;
    if (at == UINT64_MAX)
        zev__timer_disarm(s->timer);
    else if (!s->timer->armed || s->timer->deadline_ns != at)
        zev__timer_arm_at(s->timer, at);
}

static void stop_timers(zev_stream_t *s)
{
    zev__timer_free(s->timer);
    s->timer = NULL;
}

static void unregister(zev_stream_t *s)
{
    zev__unregister(s->loop, s->fd);
    s->loop->nstreams--;
}

/* zmq_close for ZEV_CLOSE_SOCKET, with whatever is left of the flush's
 * linger as the socket's own (so the two do not add up). Not in a forked
 * child: the socket belongs to the parent's libzmq. */
static void close_socket(zev_stream_t *s)
{
    if (s->loop->forked)
        return;
    if (s->linger_end_ns) {
        uint64_t now = zev__clock_ns();
        int left = now >= s->linger_end_ns ? 0 : (int)((s->linger_end_ns - now) / 1000000u);
        zmq_setsockopt(s->sock, ZMQ_LINGER, &left, sizeof left);
    }
    zmq_close(s->sock);
}

/* Unregisters and hands the stream to the close phase. Idempotent. */
void zev__stream_finalize(zev_stream_t *s)
{
    if (s->finalized)
        return;
    s->finalized = true;
    zev__sendq_cancel(s, ECANCELED);
    zev__stream_rx_abandon(s); /* never leave half a message in the socket */
    if (!s->err)
        unregister(s);
    zev__list_remove(&s->ready);
    stop_timers(s);
    if (s->close_socket && s->err != ENOTSOCK)
        close_socket(s);
    zev__list_remove(&s->node);
    zev__list_push_tail(&s->loop->closing_streams, &s->node);
    zev__stream_wake_all(s, EBADF); /* fibers waiting on it: closed */
    zev__loop_changed(s->loop);     /* its close callback is due */
}

/* The socket is gone (closed under us, or its context terminated), or it
 * cannot be sent on safely any more (streamio.c's part_refused). */
void zev__stream_fail(zev_stream_t *s, int err)
{
    if (s->err || s->finalized)
        return;
    s->err = err;
    zev__sendq_cancel(s, err);
    unregister(s);
    zev__list_remove(&s->ready);
    stop_timers(s);
    zev__stream_wake_all(s, err); /* fibers waiting on it: the socket is gone */
    if (s->flushing)
        zev__stream_finalize(s);
    else
        zev__stream_mark_ready(s); /* to deliver the statuses just recorded */
}

/* ------------------------------------------------------------ new and close */

zev_stream_t *zev_stream_new(zev_loop_t *loop, void *sock)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop || !sock) {
        errno = EINVAL;
        return NULL;
    }
    if (loop->destroying) { /* a close callback run by zev_loop_destroy */
        errno = EBUSY;
        return NULL;
    }
    int fd, type, saved = errno;
    size_t len = sizeof fd;
    if (zmq_getsockopt(sock, ZMQ_FD, &fd, &len) < 0)
        return NULL;
    len = sizeof type;
    if (zmq_getsockopt(sock, ZMQ_TYPE, &type, &len) < 0)
        return NULL;
    zev_stream_t *s = calloc(1, sizeof *s);
    if (!s) {
        errno = ENOMEM;
        return NULL;
    }
    s->kind = ZEV__H_STREAM;
    s->loop = loop;
    s->sock = sock;
    s->fd = fd;
    s->max_queue = 1000;
    s->max_parts = ZEV_MAX_PARTS_DEFAULT;
    s->type = type;
    s->lb_socket = type == ZMQ_PUSH || type == ZMQ_DEALER;
    s->routed = type == ZMQ_ROUTER || type == ZMQ_STREAM;
    s->changes = 1; /* libzmq has said nothing yet: the first pass asks */
    s->msg.stream = s;
    zev__list_init(&s->node);
    zev__list_init(&s->ready);
    zev__list_init(&s->kept_frames);
    zev__list_init(&s->recv_waiters);
    zev__list_init(&s->send_waiters);
    zev__list_init(&s->poll_in);
    zev__list_init(&s->poll_out);
    /* The fd number held by another socket's stream: that socket's mailbox
     * was closed (zmq_close under its stream) and the number reused by
     * this one. The old stream fails without its socket being touched. */
    zev__kind_t *held = zev__fdmap_get(&loop->fds, fd);
    if (held && *held == ZEV__H_STREAM && ((zev_stream_t *)held)->sock != sock)
        zev__stream_fail((zev_stream_t *)held, ENOTSOCK);
    if (zev__ring_init(s) < 0 || zev__register(loop, fd, ZEV_READ, s) < 0) {
        int err = errno;
        zev__ring_free(s);
        free(s);
        errno = err;
        return NULL;
    }
    loop->nstreams++;
    zev__list_push_tail(&loop->streams, &s->node);
    zev__stream_mark_ready(s); /* messages pending before registration signal nothing */
    errno = saved;
    return s;
}

int zev_stream_close(zev_stream_t *s, int flags)
{
    if (!zev__stream_usable(s))
        return -1;
    if (flags & ~(ZEV_CLOSE_SOCKET | ZEV_CLOSE_FLUSH)) {
        errno = EINVAL;
        return -1;
    }
    int saved = errno;
    if ((flags & ZEV_CLOSE_FLUSH) && !s->err && !zev__sendq_flush_done(s)) {
        int linger = 0;
        size_t len = sizeof linger;
        if (zmq_getsockopt(s->sock, ZMQ_LINGER, &linger, &len) == 0 && linger != 0) {
            if (linger > 0) { /* without its timer the flush could outlive ZMQ_LINGER */
                if (zev__stream_timer_need(s) < 0)
                    return -1; /* ENOMEM; the stream stays open */
                s->linger_end_ns = zev__sat_add(zev__now(s->loop), (uint64_t)linger * 1000000u);
                zev__stream_timer_update(s);
            }
            s->closed = true;
            s->close_socket = flags & ZEV_CLOSE_SOCKET;
            s->flushing = true;
            zev__stream_wake_all(s, EBADF); /* closed for fibers now, flushing or not */
            zev__stream_mark_ready(s);
            errno = saved;
            return 0;
        }
    }
    s->closed = true;
    s->close_socket = flags & ZEV_CLOSE_SOCKET;
    zev__stream_finalize(s);
    errno = saved;
    return 0;
}

void zev__stream_free(zev_stream_t *s)
{
    zev__frames_detach(s);
    zev__ring_free(s);
    free(s->q);
    free(s->rep);
    zev__sendq_timed_out_free(s);
    free(s);
}

/* The close phase. A stream a fiber is still inside a call on (woken, not
 * yet resumed) stays allocated until that call returns (fiber.c frees it). */
void zev__streams_reap(zev_loop_t *loop)
{
    zev__list_t *node;
    while ((node = zev__list_pop_head(&loop->closing_streams))) {
        zev_stream_t *s = zev__container_of(node, zev_stream_t, node);
        zev__reports_deliver(s);
        if (s->on_close) {
            uint64_t t0 = zev__watch_begin(loop);
            s->on_close(s, s->close_arg);
            zev__watch_end(loop, t0, ZEV_SLOW_CLOSE, s, NULL);
        }
        s->reaped = true;
        if (!s->fiber_refs)
            zev__stream_free(s);
    }
}

void zev__streams_close_all(zev_loop_t *loop)
{
    while (!zev__list_empty(&loop->streams)) {
        zev_stream_t *s = zev__container_of(loop->streams.next, zev_stream_t, node);
        s->closed = true;
        zev__stream_finalize(s); /* moves it to closing_streams */
    }
}

/* --------------------------------------------------------- setters, getters */

int zev_stream_on_recv(zev_stream_t *s, zev_recv_fn fn, void *arg)
{
    if (!zev__stream_usable(s))
        return -1;
    if (fn && (!zev__list_empty(&s->recv_waiters) || s->handed_in || s->ring_lent ||
               !zev__list_empty(&s->poll_in))) {
        errno = EBUSY; /* fibers receive from it (or forward from its ring) */
        return -1;
    }
    s->on_recv = fn;
    s->recv_arg = arg;
    if (fn)
        zev__stream_mark_ready(s); /* messages may already wait in libzmq */
    return 0;
}

int zev_stream_on_send(zev_stream_t *s, zev_send_fn fn, void *arg)
{
    if (!zev__stream_usable(s))
        return -1;
    zev_send_fn was = s->on_send;
    s->on_send = fn;
    if (zev__report_reserve(s, 0) < 0) { /* room for the messages already given */
        s->on_send = was;
        return -1;
    }
    s->send_arg = arg;
    return 0;
}

int zev_stream_on_close(zev_stream_t *s, zev_close_fn fn, void *arg)
{
    if (!zev__stream_usable(s))
        return -1;
    s->on_close = fn;
    s->close_arg = arg;
    return 0;
}

int zev_stream_set_max_queue(zev_stream_t *s, size_t n)
{
    if (!zev__stream_usable(s))
        return -1;
    s->max_queue = n;
    return 0;
}

/* zmq_connect and its kind on the stream's socket: libzmq processes the
 * socket's commands first (swallowing an edge zev has not seen), and an
 * inproc connect or bind attaches its pipe on the spot, signalling nothing.
 * So the stream re-reads the socket's state in its next pass. An EINTR
 * from that first step did nothing else: the call is made again
 * (zev__eintr_again), so the caller never sees it. */
static int socket_call(zev_stream_t *s, int (*fn)(void *, const char *), const char *endpoint)
{
    if (!zev__stream_usable(s))
        return -1;
    if (s->err) {
        errno = s->err;
        return -1;
    }
    if (!endpoint) {
        errno = EINVAL;
        return -1;
    }
    int saved = errno, rc;
    unsigned tries = 0;
    do
        rc = fn(s->sock, endpoint);
    while (rc < 0 && zev__eintr_again(&tries));
    if (rc == 0)
        errno = saved; /* libzmq leaves EAGAIN behind on success */
    s->changes++;
    zev__stream_mark_ready(s);
    return rc;
}

int zev_stream_connect(zev_stream_t *s, const char *endpoint)
{
    return socket_call(s, zmq_connect, endpoint);
}

int zev_stream_bind(zev_stream_t *s, const char *endpoint)
{
    return socket_call(s, zmq_bind, endpoint);
}

int zev_stream_disconnect(zev_stream_t *s, const char *endpoint)
{
    return socket_call(s, zmq_disconnect, endpoint);
}

int zev_stream_unbind(zev_stream_t *s, const char *endpoint)
{
    return socket_call(s, zmq_unbind, endpoint);
}

int zev_stream_set_send_timeout(zev_stream_t *s, uint64_t timeout_us)
{
    if (!zev__stream_usable(s))
        return -1;
    if (timeout_us && zev__stream_timer_need(s) < 0)
        return -1;
    s->send_timeout_ns = zev__us_to_ns(timeout_us);
    zev__stream_timer_update(s); /* messages already queued count from when they were */
    return 0;
}

int zev_stream_set_tracker_delay(zev_stream_t *s, uint64_t delay_us)
{
    if (!zev__stream_usable(s))
        return -1;
    s->tracker_delay_ns = zev__us_to_ns(delay_us); /* for the sends from now on */
    return 0;
}

uint64_t zev_stream_send_seq(const zev_stream_t *s)
{
    if (!s) {
        errno = EINVAL;
        return 0;
    }
    return s->seq_given;
}

int zev_stream_set_batch(zev_stream_t *s, unsigned n)
{
    if (!zev__stream_usable(s))
        return -1;
    s->batch = n;
    return 0;
}

/* The predicates' answer for NULL: 0, with EINVAL. */
static int null_stream(void)
{
    errno = EINVAL;
    return 0;
}

int zev_stream_sending(const zev_stream_t *s)
{
    return s ? s->qlen || s->open == OPEN_QUEUED : null_stream();
}

int zev_stream_receiving(const zev_stream_t *s)
{
    return s ? !s->closed && s->on_recv : null_stream();
}

int zev_stream_closed(const zev_stream_t *s)
{
    return s ? s->closed : null_stream();
}

void *zev_stream_socket(const zev_stream_t *s)
{
    if (!s) {
        errno = EINVAL;
        return NULL;
    }
    return s->sock;
}

zev_loop_t *zev_stream_loop(const zev_stream_t *s)
{
    if (!s) {
        errno = EINVAL;
        return NULL;
    }
    return s->loop;
}

int zev_stream_stats(const zev_stream_t *s, zev_stream_stats_t *out)
{
    if (s)
        ZEV__LOOP_THREAD(s->loop);
    if (!s || !out) {
        errno = EINVAL;
        return -1;
    }
    *out = s->stats;
    out->ring_size = s->ring_cap;
    out->frames_kept = s->frames_out;
    out->queued_msgs = s->qmsgs;
    out->queued_parts = s->qlen;
    return 0;
}

int zev_stream_set_max_parts(zev_stream_t *s, size_t n)
{
    if (!zev__stream_usable(s))
        return -1;
    s->max_parts = n;
    zev__stream_rx_bound(s); /* a message being received is judged by the new bound */
    return 0;
}
