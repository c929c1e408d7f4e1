/*
 * A stream's I/O: the ZMQ_FD readiness pass, receiving, sending and flush.
 * This is the per-message path, kept in one file so the compiler can inline
 * it; the stream's lifetime (new, close, failure, setters) is in stream.c,
 * its send queue and on_send reports in sendq.c.
 *
 * Design notes
 * - ZMQ_FD is edge-triggered, and any zmq_send, zmq_recv or ZMQ_EVENTS read
 *   on the socket can consume its edge. The invariant (docs/design.md, "Loop
 *   iteration") is checked in one predicate, may_leave_ready_list(): a
 *   stream leaves the ready-list only when libzmq's last word on the socket
 *   is still current and offers nothing the stream wants. Four fields carry
 *   it:
 *     changes  counts everything that may have changed the socket's state
 *              since libzmq last spoke: zev's own sends, recvs and ZMQ_EVENTS
 *              reads (each goes through sock_send / sock_recv / sock_events,
 *              the only three places that call libzmq on the socket) and
 *              edges (zev__stream_fired);
 *     told     what libzmq last said: a ZMQ_EVENTS read, or a recv that
 *              found nothing (libzmq processed every pending command for it,
 *              unthrottled: for POLLIN that is the same read, and saves a
 *              getpid + poll per wakeup; it says nothing about POLLOUT);
 *     told_at  `changes` right after it said so: current iff equal;
 *     hint     an edge came (or a batch ran out while receiving): try recv
 *              first and ask libzmq only when needed. A hint can cost a
 *              syscall, never an edge: it never makes told current.
 *   DESIGN's rules, line by line:
 *     "leaves the ready-list only right after ZMQ_EVENTS reported nothing
 *      it wants"                       -> may_leave_ready_list()
 *     "after a send or recv in its own pass, either stays on the ready-list
 *      or re-reads ZMQ_EVENTS"         -> every sock_* call bumps changes,
 *                                         so told is stale until a re-read
 *     "a send from outside its own pass, a recv that ended in EAGAIN while
 *      sends are queued, every change of interest: re-read or put on the
 *      ready-list"                     -> hand_part's mark_ready; a drained
 *                                         recv leaves POLLOUT unknown; the
 *                                         setters call mark_ready; so do a
 *                                         fiber's recv and ZMQ_EVENTS reads
 *                                         (the *_now functions)
 *     "messages pending before the stream existed are found at
 *      registration"                   -> zev_stream_new marks it ready with
 *                                         told never current
 *   Out of budget a stream simply stays on the ready-list (tail), so the
 *   next iteration serves it without waiting for an edge that is gone.
 * - Fibers (fiber.c) wait on a stream as on_recv and the queue do: a fiber
 *   waiting to receive makes the stream want POLLIN, one waiting to send
 *   POLLOUT, and where the pass would receive or send it hands the stream
 *   to the first such fiber instead (handed_in / handed_out), which then
 *   receives or sends on its own stack, outside the pass. Until it has, the
 *   stream does not want that event again, so one message cannot wake the
 *   whole line.
 * - mark_ready is a list insert, not a syscall; the pass re-reads the state.
 *   Outside an iteration it also tells an embedding host (zev__loop_changed).
 * - Sends go straight to libzmq while the queue is empty; once libzmq says
 *   EAGAIN (HWM, or EFSM: REQ/REP state) the message and all after it wait
 *   in the stream's FIFO of parts, so order is kept. A multipart message
 *   follows the path its first part took. The queue is bounded in messages.
 * - After libzmq took a message's first part, a later part can only fail
 *   with EINTR (retried: nothing was taken), ENOTSOCK/ETERM (the socket is
 *   gone: the stream fails), or EAGAIN: the peer's pipe died mid-message and
 *   libzmq (>= 4.3.1) dropped the parts it had. part_refused() handles that
 *   one case for both paths: the refused part is never retried (it would
 *   start a new message and deliver the old one's tail on its own), and the
 *   message is reported EPIPE once. A load-balancing socket (PUSH, DEALER)
 *   drops the rest of such a message itself as it comes, and must be given
 *   it to leave that state (else it eats the next message); other types keep
 *   no such state and get nothing more of it, except REQ, whose own state
 *   (waiting for the reply to a request that never left) cannot be reset
 *   from outside: its stream fails with EPIPE. Parts after the first never
 *   wait in the queue behind POLLOUT once libzmq holds the message's start
 *   (they never block on HWM): by then a new peer could have attached, and
 *   a PAIR would take them as a message of their own. libzmq's remaining
 *   check before a part, a valid zmq_msg_t, holds for every message zev
 *   hands it; should any other error come anyway, the message could be
 *   neither finished nor taken back, and the stream fails with that errno
 *   rather than let the next message be glued onto it.
 * - on_send statuses are recorded run-length encoded and delivered from the
 *   loop (the pass, flush, or the close phase), never inside a send call.
 * - POLLOUT with EAGAIN on the head message (ROUTER_MANDATORY, one peer's
 *   pipe full) sets `blocked`: POLLOUT stops counting as work until the next
 *   ZMQ_FD edge or a back-off (doubling up to BACKOFF_MAX), because a
 *   ZMQ_EVENTS read right after the EAGAIN may have swallowed the edge that
 *   says there is room again. One blocked peer holds the messages behind it,
 *   for at most the stream's send timeout when one is set (the stream's
 *   ZMQ_SNDTIMEO, sendq.c): when the head's deadline comes it gets a try
 *   whatever ZMQ_EVENTS says, and is dropped, ETIMEDOUT, only if libzmq
 *   still refuses it. The back-off, the send deadline and a flushing close's
 *   linger share the stream's one timer (stream.c), re-armed at the end of
 *   every pass.
 * - Errors that mean the socket is gone (ENOTSOCK, ETERM) go to
 *   zev__stream_fail; a pass that finds the flush of a closing stream done
 *   hands it to zev__stream_finalize (both in stream.c).
 */
#include "zev-internal.h"

#include <errno.h>
#include <limits.h>
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
void zev__stream_mark_ready(zev_stream_t *s)
{
    if (!s->finalized && (!s->err || zev__reports_owed(s)) && !zev__list_linked(&s->ready)) {
        zev__list_push_tail(&s->loop->ready, &s->ready);
        zev__loop_changed(s->loop);
    }
}
#define mark_ready zev__stream_mark_ready

/* ---------------------------------------------- the socket, and what it said */

/* The events the stream acts on now. */
static int frames_allow(const zev_stream_t *s)
{
    return !s->max_frames || s->frames_out < s->max_frames;
}

/* Fibers waiting to receive or send want what on_recv and the queue want,
 * until the one woken for it has acted (handed_in / handed_out); a fiber's
 * first part waits until no message is open (a callback's, or another
 * fiber's: that one's builder goes on without waiting). Pollers want the
 * event as long as they wait. */
static bool fibers_read(const zev_stream_t *s)
{
    return (!zev__list_empty(&s->recv_waiters) && !s->handed_in && !s->ring_lent) ||
           !zev__list_empty(&s->poll_in);
}

static bool fibers_write(const zev_stream_t *s)
{
    return s->open == OPEN_NONE &&
           ((!zev__list_empty(&s->send_waiters) && !s->handed_out) ||
            !zev__list_empty(&s->poll_out));
}

static int wants(const zev_stream_t *s)
{
    int w = 0;
    if ((s->on_recv || fibers_read(s)) && !s->closed && frames_allow(s))
        w |= ZMQ_POLLIN;
    if ((s->qlen || fibers_write(s)) && !s->blocked)
        w |= ZMQ_POLLOUT;
    return w;
}

zev_fiber_t *zev__stream_builder(const zev_stream_t *s)
{
    return s->open != OPEN_NONE ? s->open_fiber : NULL;
}

/* libzmq's last word is current: nothing since could have consumed an edge. */
static bool told_is_current(const zev_stream_t *s)
{
    return s->told_at == s->changes;
}

/* The invariant. */
static bool may_leave_ready_list(const zev_stream_t *s)
{
    return told_is_current(s) && !(s->told & wants(s));
}

/* ZMQ_EVENTS: the events, or -1 with errno. An EINTR is asked again at
 * once (zev__eintr_again): libzmq may have taken the ZMQ_FD edge and run
 * the socket's commands before a signal interrupted its last look at the
 * mailbox (a zero-timeout poll), so no edge would announce what they
 * changed. */
static int sock_events(zev_stream_t *s)
{
    int events, rc;
    size_t len = sizeof events;
    unsigned tries = 0;
    s->changes++;
    do
        rc = zmq_getsockopt(s->sock, ZMQ_EVENTS, &events, &len);
    while (rc < 0 && zev__eintr_again(&tries));
    if (rc < 0)
        return -1;
    s->told = events;
    s->told_at = s->changes;
    return events;
}

/* One part to libzmq without blocking: 0, or the errno (EINTR took
 * nothing and is retried here: zev__eintr_again). */
static int sock_send(zev_stream_t *s, zmq_msg_t *msg, bool more)
{
    unsigned tries = 0;
    for (;;) {
        s->changes++;
        size_t size = zmq_msg_size(msg); /* the return stops at INT_MAX */
        int n = zmq_msg_send(msg, s->sock, ZMQ_DONTWAIT | (more ? ZMQ_SNDMORE : 0));
        if (n >= 0) {
            s->out_more = more;
            s->stats.bytes_out += size;
            return 0;
        }
        if (!zev__eintr_again(&tries))
            return errno;
    }
}

/* sock_send for the first part of a message, on either path (direct or
 * from the queue): a destination remembered as timed out (sendq.c) is
 * forgotten once libzmq takes a message for it. The destination is read
 * first: libzmq empties the part it takes. */
static int sock_send_first(zev_stream_t *s, zmq_msg_t *msg, bool more)
{
    uint64_t timed_out = zev__sendq_timed_out(s, msg);
    int err = sock_send(s, msg, more);
    if (!err && timed_out)
        zev__sendq_forget(s, timed_out);
    return err;
}

/* One part from libzmq without blocking: as zmq_msg_recv. A recv that
 * found nothing is libzmq's word on POLLIN (none), not on POLLOUT: that one
 * is left "maybe", so a stream with sends queued still asks. */
static int sock_recv(zev_stream_t *s, zmq_msg_t *msg)
{
    s->changes++;
    int rc = zmq_msg_recv(msg, s->sock, ZMQ_DONTWAIT);
    if (rc < 0 && errno == EAGAIN) {
        s->told = ZMQ_POLLOUT;
        s->told_at = s->changes;
    }
    return rc;
}

/* ----------------------------------------------------------- POLLOUT back-off */

/* The stream's timer ends the back-off (stream.c) if no edge does first. */
static void set_blocked(zev_stream_t *s)
{
    s->blocked = true;
    if (s->backoff_until)
        return;
    if (zev__stream_timer_need(s) < 0) {
        s->blocked = false; /* no timer would end the wait: keep trying rather than stall */
        return;
    }
    s->backoff_ns = s->backoff_ns ? s->backoff_ns * 2 : BACKOFF_MIN_NS;
    if (s->backoff_ns > BACKOFF_MAX_NS)
        s->backoff_ns = BACKOFF_MAX_NS;
    s->backoff_until = zev__sat_add(s->loop->now_ns, s->backoff_ns);
}

/* ------------------------------------------------------------------- sending */

/* The last part of the message being handed to libzmq went (or was
 * dropped): its one status. */
static void message_done(zev_stream_t *s)
{
    zev__report_add(s, s->broken);
    s->broken = 0;
}

/* A part after the first was refused with err (see the design notes).
 * Returns true when the rest of the message still goes to libzmq (a
 * load-balancing socket drops it there), false when zev must drop it. The
 * caller closes the refused part. */
static bool part_refused(zev_stream_t *s, int err, bool more)
{
    if (err != EAGAIN || s->type == ZMQ_REQ) {
        /* reports the message, and all queued, with the errno */
        zev__stream_fail(s, err == EAGAIN ? EPIPE : err);
        return false;
    }
    s->broken = EPIPE;
    if (s->lb_socket && more)
        return true; /* the rest are continuations libzmq drops */
    s->out_more = false; /* libzmq holds nothing of it any more */
    message_done(s);
    return !more;
}

static size_t send_some(zev_stream_t *s, size_t room);

/* Hands one part to libzmq now, or queues it (may_queue; a fiber's send
 * never queues: EAGAIN instead, nothing taken). Returns 0 when the part was taken (sent,
 * queued, or dropped with its broken message) and msg left empty (libzmq
 * re-initialises a part it took; nothing to close), -1 with errno when it
 * was not, which only happens at the first part of a message. The caller
 * reserved queue space. */
static int hand_part(zev_stream_t *s, zmq_msg_t *msg, bool more, bool may_queue)
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
        int err = first ? sock_send_first(s, msg, more) : sock_send(s, msg, more);
        if (!s->in_pass)
            mark_ready(s); /* the send may have consumed the ZMQ_FD edge */
        if (!err) {
            s->open = more ? OPEN_DIRECT : OPEN_NONE;
            if (!more)
                message_done(s);
            return 0;
        }
        if (first && !would_block(err)) {
            if (socket_gone(err))
                zev__stream_fail(s, err);
            errno = err;
            return -1;
        }
        if (first && !may_queue) {
            errno = EAGAIN; /* the caller waits (zev__stream_send_now) */
            return -1;
        }
        if (!first) {
            zmq_msg_close(msg);
            zmq_msg_init(msg);
            bool rest_to_libzmq = part_refused(s, err, more);
            s->open = !more ? OPEN_NONE : rest_to_libzmq ? OPEN_DIRECT : OPEN_DISCARD;
            if (s->err) /* failed: the message was reported with the queue */
                s->open = more ? OPEN_DISCARD : OPEN_NONE;
            return 0;
        }
    } else if (!may_queue || (first && zev__stream_queue_full(s))) {
        errno = EAGAIN;
        return -1;
    }
    zev__sendq_push(s, msg, more);
    mark_ready(s);
    if (!first && s->out_more)
        send_some(s, 1); /* libzmq holds this message's start: the rest goes now */
    return 0;
}

/* hand_part, numbering each message whose first part was taken. A part
 * that was taken leaves errno as it was (libzmq's EAGAIN before queuing is
 * not the caller's business). */
static int give_part(zev_stream_t *s, zmq_msg_t *msg, bool more, bool may_queue)
{
    bool first = s->open == OPEN_NONE;
    int saved = errno;
    int rc = hand_part(s, msg, more, may_queue);
    if (rc == 0) {
        errno = saved;
        if (first)
            s->seq_given++;
    }
    return rc;
}

static int send_part(zev_stream_t *s, zmq_msg_t *msg, bool more)
{
    zev_fiber_t *builder = zev__stream_builder(s);
    if (builder && builder != zev__fiber_current()) {
        errno = EBUSY; /* a fiber is building a multipart message on it */
        return -1;
    }
    return give_part(s, msg, more, true);
}

void zev__stream_end_message(zev_stream_t *s, int status)
{
    if (s->open == OPEN_NONE)
        return;
    if (s->open == OPEN_DIRECT && !s->broken)
        s->broken = status; /* message_done reports it so */
    zmq_msg_t empty;
    zmq_msg_init(&empty);
    if (s->open != OPEN_QUEUED || zev__sendq_reserve(s, 1) == 0)
        (void)hand_part(s, &empty, false, true);
    zmq_msg_close(&empty);
}

int zev__stream_send_now(zev_stream_t *s, zmq_msg_t *msg, bool more, bool pollout_told)
{
    bool first = s->open == OPEN_NONE;
    if (give_part(s, msg, more, false) == 0)
        return 0;
    /* As in send_some: refused right after ZMQ_EVENTS said POLLOUT (one
     * ROUTER_MANDATORY peer full), POLLOUT cannot be trusted until an edge
     * or the back-off; plain EAGAIN (HWM) leaves the next edge to tell. */
    if (first && errno == EAGAIN && pollout_told)
        set_blocked(s);
    return errno;
}

int zev__stream_readable_now(zev_stream_t *s)
{
    if (!frames_allow(s))
        return 0; /* its receives wait for kept frames to be released */
    int events = sock_events(s);
    mark_ready(s);
    return events >= 0 && (events & ZMQ_POLLIN);
}

int zev__stream_writable_now(zev_stream_t *s)
{
    if (s->qlen || s->blocked || s->open != OPEN_NONE)
        return 0;
    int events = sock_events(s);
    mark_ready(s);
    return events >= 0 && (events & ZMQ_POLLOUT);
}

/* Checks the state and the flags shared by the send functions. */
static int send_allowed_in(const zev_stream_t *s, int flags, const char *fn)
{
    if (!zev__stream_usable_in(s, fn))
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
#define send_allowed(s, flags) send_allowed_in((s), (flags), __func__)

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
    if (rc < 0)
        zmq_msg_close(&msg); /* a part that was taken is left empty */
    return rc;
}

int zev__stream_send_one(zev_stream_t *s, zmq_msg_t *msg)
{
    if (zev__sendq_reserve(s, 1) < 0)
        return -1;
    return send_part(s, msg, false);
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

/* The head message waited its send timeout: its last try is now. */
static bool head_overdue(zev_stream_t *s)
{
    return zev__sendq_deadline(s) <= s->loop->now_ns;
}

/* Sends queued parts while libzmq takes them; returns messages handled
 * (sent, failed, or refused past their send deadline). */
static size_t send_some(zev_stream_t *s, size_t room)
{
    size_t n = 0;
    while (s->qlen && n < room && !s->err) {
        /* A message the closed user can never finish stays out of libzmq. */
        if (s->closed && s->open == OPEN_QUEUED && s->qmsgs == 1)
            break;
        zev__sendpart_t *p = zev__sendq_at(s, 0);
        bool more = p->more, first = !s->out_more;
        int err = first ? sock_send_first(s, &p->msg, more) : sock_send(s, &p->msg, more);
        if (err && first) {
            if (would_block(err) && head_overdue(s)) {
                zev__sendq_time_out_head(s); /* waited its time, still refused */
                zev__sendq_new_head(s);
                n++;
                continue;
            }
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
            zev__sendq_new_head(s);
            n++;
            continue;
        }
        if (err && !part_refused(s, err, more)) {
            if (!s->err) /* zev drops the rest of it: reported already */
                zev__sendq_drop_rest(s);
            zev__sendq_new_head(s);
            n++;
            continue;
        }
        zev__sendq_pop(s, !err); /* sent, or refused and the rest still goes */
        if (!more) {
            s->qmsgs--;
            s->backoff_ns = 0;
            if (!err)
                message_done(s);
            zev__sendq_new_head(s);
            n++;
        }
    }
    return n;
}

/* ----------------------------------------------------------------- receiving */

/* Whether more parts follow: zmq_msg_more, without its wrapper call. */
static int part_more(const zmq_msg_t *part)
{
    return zmq_msg_get(part, ZMQ_MORE);
}

/* What recv_message did, and how many parts it took from libzmq (returned
 * together, in two registers: the common path keeps no count in memory). */
enum rx { RX_ERR = -1, RX_NONE, RX_GOT, RX_MORE, RX_DROPPED };
struct rx_done {
    enum rx rc;
    size_t parts;
};

static struct rx_done rx_done(enum rx rc, size_t parts)
{
    return (struct rx_done){rc, parts};
}

/* Receives (the rest of) one whole message into the ring, taking at most
 * `allowance` parts (>= 1), and says how many it took:
 *   RX_GOT      a whole message is in s->msg;
 *   RX_NONE     nothing there (libzmq's EAGAIN at a message's start);
 *   RX_MORE     the allowance ran out inside a message: the parts so far
 *               stay in the ring (rx_parts; or, while dropping, none) and
 *               the next call goes on from there, so a long message is
 *               received over several passes and still delivered whole;
 *   RX_DROPPED  a message longer than max_parts was drained from libzmq,
 *               its parts closed as they came, and dropped whole;
 *   RX_ERR      errno; parts so far stay (rx_parts): when the ring cannot
 *               grow (ENOMEM), leaving the rest in libzmq would make its
 *               tail look like a new message.
 * libzmq hands over a multipart message whole, so once its first part came
 * the rest is there: only the allowance or an error stops in the middle. */
/* Gives up a message whose first `held` parts are in the ring (none,
 * while dropping already): they are emptied, and drop_rest drains the
 * rest from libzmq. */
static void start_dropping(zev_stream_t *s, size_t held)
{
    for (size_t k = 0; k < held; k++) {
        zmq_msg_close(&s->ring[k]);
        zmq_msg_init(&s->ring[k]);
    }
    s->rx_parts = 0;
    s->rx_bytes = 0;
    s->rx_dropping = true;
}

/* A REP socket that received a request waits for its reply, and refuses
 * every later recv with EFSM: a request zev dropped (over max_parts, or cut
 * by a close) is answered with one empty part so the socket goes on with
 * the next request. The only message zev ever sends on its own. */
static void answer_dropped_request(zev_stream_t *s)
{
    if (s->type != ZMQ_REP)
        return;
    s->changes++;
    unsigned tries = 0;
    while (zmq_send(s->sock, NULL, 0, ZMQ_DONTWAIT) < 0 && zev__eintr_again(&tries))
        continue;
}

/* Drains the rest of a message given up (rx_dropping) through slot 0,
 * closing each part as it comes, at most `allowance` parts: RX_DROPPED at
 * its last part, RX_MORE, or RX_ERR. Off the per-message path. */
static __attribute__((noinline)) struct rx_done drop_rest(zev_stream_t *s, size_t allowance)
{
    s->at[0] = &s->ring[0];
    size_t got = 0;
    unsigned tries = 0;
    while (got < allowance) {
        if (sock_recv(s, &s->ring[0]) < 0) {
            if (zev__eintr_again(&tries))
                continue;
            return rx_done(RX_ERR, got); /* the rest of a message is there once its start is */
        }
        got++;
        bool more = part_more(&s->ring[0]);
        zmq_msg_close(&s->ring[0]);
        zmq_msg_init(&s->ring[0]);
        if (!more) {
            s->rx_dropping = false;
            answer_dropped_request(s);
            return rx_done(RX_DROPPED, got);
        }
    }
    return rx_done(RX_MORE, got);
}

/* A part's size from zmq_msg_recv's return n, which stops at INT_MAX: for
 * the byte counter and for zev_msg_size and zev_msg_keep (msg.c). */
static size_t part_size(zmq_msg_t *part, int n)
{
    return n < INT_MAX ? (size_t)n : zmq_msg_size(part);
}

/* A message goes on past max_parts after its i-th part: close the parts
 * so far, and drain the rest of it (drop_rest). */
static __attribute__((noinline)) struct rx_done start_drop(zev_stream_t *s, size_t i,
                                                           size_t allowance)
{
    start_dropping(s, i);
    return drop_rest(s, allowance);
}

/* recv_message past the common case: a message from its part rx_parts on
 * (0: a first part that recv_message did not take), into the ring, growing
 * it as needed. */
static __attribute__((noinline)) struct rx_done recv_parts(zev_stream_t *s, size_t allowance)
{
    size_t i = s->rx_parts, got = 0;
    unsigned tries = 0;
    uint64_t bytes = s->rx_bytes;
    s->rx_parts = 0;
    enum rx rc;
    for (;;) {
        if (got == allowance) {
            rc = RX_MORE;
            break;
        }
        if (i == s->ring_cap && zev__ring_reserve(s, i + 1) < 0) {
            rc = RX_ERR;
            break;
        }
        if (i == s->ring_used) { /* first use since the last recycle */
            zmq_msg_init(&s->ring[i]);
            s->ring_used++;
        }
        s->at[i] = &s->ring[i];
        int n = sock_recv(s, &s->ring[i]);
        if (n < 0) {
            if (zev__eintr_again(&tries))
                continue;
            rc = i == 0 && errno == EAGAIN ? RX_NONE : RX_ERR;
            break;
        }
        got++;
        bytes += s->msg.sizes[i] = part_size(&s->ring[i], n);
        if (!part_more(&s->ring[i++])) {
            rc = RX_GOT;
            break;
        }
        if (s->max_parts && i >= s->max_parts) { /* another part comes: too long */
            struct rx_done d = start_drop(s, i, allowance - got);
            return rx_done(d.rc, got + d.parts);
        }
    }
    if (rc == RX_GOT) { /* the caller counts it in stats.msgs_in */
        s->msg.n = i;
        s->stats.bytes_in += bytes;
        s->rx_bytes = 0;
    } else if (rc != RX_NONE) {
        s->rx_parts = i;
        s->rx_bytes = bytes;
    }
    return rx_done(rc, got);
}

/* The first part (of `size` bytes) of a message of several came into slot
 * 0: recv_parts goes on with the rest, unless max_parts is 1. The count
 * includes the first part. */
static __attribute__((noinline)) struct rx_done recv_after_first(zev_stream_t *s, size_t size,
                                                                 size_t allowance)
{
    struct rx_done d;
    if (s->max_parts == 1) { /* another part comes: too long */
        d = start_drop(s, 1, allowance);
    } else {
        s->rx_parts = 1;
        s->rx_bytes = size;
        d = recv_parts(s, allowance);
    }
    return rx_done(d.rc, d.parts + 1);
}

/* The per-message path (inlined into both callers). The common case is a
 * message's first part into slot 0 (always set up: msg.c), and a whole message
 * when it has one part; anything else goes on in recv_parts (or drop_rest)
 * from where the message stands. */
static inline __attribute__((always_inline)) struct rx_done recv_message(zev_stream_t *s,
                                                                         size_t allowance)
{
    if (__builtin_expect(s->rx_dropping, 0))
        return drop_rest(s, allowance);
    if (__builtin_expect(s->rx_parts, 0))
        return recv_parts(s, allowance);
    s->at[0] = &s->ring[0];
    int n = sock_recv(s, &s->ring[0]);
    if (__builtin_expect(n < 0, 0)) {
        if (errno == EINTR)
            return recv_parts(s, allowance); /* nothing taken: again, counted there */
        return rx_done(errno == EAGAIN ? RX_NONE : RX_ERR, 0);
    }
    size_t size = s->msg.sizes[0] = part_size(&s->ring[0], n);
    if (__builtin_expect(part_more(&s->ring[0]), 0))
        return recv_after_first(s, size, allowance - 1);
    s->msg.n = 1;
    s->stats.bytes_in += size;
    return rx_done(RX_GOT, 1);
}

/* A pass takes at most `room` messages and PARTS_PER_UNIT x room parts:
 * each PARTS_PER_UNIT parts of a long message count as one more message,
 * so one message of a million parts is received over many passes while
 * the rest of the loop runs, and delivered whole at the end. */
#define PARTS_PER_UNIT 64u

static size_t parts_allowance(size_t units)
{
    return units > SIZE_MAX / PARTS_PER_UNIT ? SIZE_MAX : units * PARTS_PER_UNIT;
}

/* What the pass receives for; on_recv may change any of it. */
static bool recv_wanted(const zev_stream_t *s)
{
    return s->on_recv && !s->closed && frames_allow(s);
}

/* Receives and dispatches messages worth up to `room` units; returns the
 * units used: messages taken (delivered or dropped), plus one for every
 * PARTS_PER_UNIT parts beyond one per message. Between the messages no
 * user code runs, so the ring counts as borrowed (in_recv) for the whole
 * pass; and a slow hook set inside on_recv times the next one. Not inlined
 * into stream_work: the per-message loop gets the registers to itself. */
static __attribute__((noinline)) size_t recv_some(zev_stream_t *s, size_t room)
{
    size_t msgs = 0, parts_left = parts_allowance(room);
    s->in_recv = true;
    while (msgs < room && parts_left && recv_wanted(s)) {
        struct rx_done d = recv_message(s, parts_left);
        parts_left -= d.parts;
        if (__builtin_expect(d.rc == RX_GOT, 1)) {
            msgs++;
            s->stats.msgs_in++;
            if (__builtin_expect(!s->loop->watching, 1)) {
                s->on_recv(s, &s->msg, s->recv_arg);
            } else {
                uint64_t t0 = zev__clock_ns();
                s->on_recv(s, &s->msg, s->recv_arg);
                zev__watched(s->loop, t0, ZEV_SLOW_RECV, s, NULL);
            }
        } else if (d.rc == RX_DROPPED) {
            msgs++;
            s->stats.dropped_oversized++;
        } else {
            if (d.rc == RX_ERR && socket_gone(errno)) {
                s->in_recv = false;
                zev__stream_fail(s, errno);
            }
            break; /* RX_NONE, an error, or RX_MORE: out of allowance */
        }
    }
    s->in_recv = false;
    zev__ring_recycle(s); /* nothing borrowed is held while the stream waits */
    size_t parts = parts_allowance(room) - parts_left;
    size_t extra = parts > msgs ? (parts - msgs) / PARTS_PER_UNIT : 0;
    return msgs + extra > room ? room : msgs + extra;
}

/* zev__stream_recv_now past the common case: rc is not RX_GOT. */
static __attribute__((noinline)) int recv_now_rest(zev_stream_t *s, enum rx rc)
{
    int err = errno;
    if (rc == RX_DROPPED)
        s->stats.dropped_oversized++;
    if (rc == RX_ERR && socket_gone(err))
        zev__stream_fail(s, err);
    mark_ready(s); /* the socket was touched outside the stream's pass */
    errno = err;
    return rc == RX_NONE ? 0 : rc == RX_ERR ? -1 : 2;
}

int zev__stream_recv_now(zev_stream_t *s, size_t units)
{
    if (!frames_allow(s))
        return 0; /* max_frames: it waits until kept frames are released */
    enum rx rc = recv_message(s, parts_allowance(units)).rc;
    if (__builtin_expect(rc != RX_GOT, 0))
        return recv_now_rest(s, rc);
    s->stats.msgs_in++;
    mark_ready(s); /* the socket was touched outside the stream's pass */
    return 1;
}

void zev__stream_rx_bound(zev_stream_t *s)
{
    if (s->max_parts && s->rx_parts >= s->max_parts) { /* and another part comes */
        start_dropping(s, s->rx_parts);
        mark_ready(s); /* the rest is drained by the next pass or fiber call */
    }
}

void zev__stream_rx_abandon(zev_stream_t *s)
{
    if (!s->rx_parts && !s->rx_dropping)
        return;
    /* nothing left in libzmq for anyone; or a forked child's destroy, which
     * must not touch the parent's socket (its mailbox fd is shared) */
    if (s->err || s->close_socket || s->loop->forked) {
        s->rx_parts = 0;
        s->rx_dropping = false;
        return;
    }
    start_dropping(s, s->rx_parts);
    if (drop_rest(s, SIZE_MAX).rc == RX_ERR)
        s->rx_dropping = false; /* the socket failed: nothing more to drain */
}

/* ------------------------------------------------------------- the one pass */

/* A stream with nothing more to do here: closed for good or failed. */
static bool finished(const zev_stream_t *s)
{
    return s->finalized || s->err;
}

/* Handles up to `limit` messages (0 = no limit) of the kinds in `mask`
 * (ZMQ_POLLIN / ZMQ_POLLOUT). Sets *idle when the stream may leave the
 * ready-list (may_leave_ready_list, or finished). */
static size_t stream_work(zev_stream_t *s, int mask, size_t limit, bool *idle)
{
    bool outer = s->in_pass;
    size_t done = 0;
    *idle = false;
    s->in_pass = true;
    zev__reports_deliver(s);
    for (;;) {
        if (finished(s)) {
            *idle = true;
            break;
        }
        if (limit && done >= limit)
            break; /* out of budget: stays on the ready-list */
        if (may_leave_ready_list(s)) {
            *idle = true;
            break;
        }
        int ready = s->hint;
        s->hint = 0;
        if (!ready && (ready = sock_events(s)) < 0) {
            if (socket_gone(errno))
                zev__stream_fail(s, errno);
            *idle = true; /* the socket is gone, or closed under the stream */
            break;
        }
        int act = ready & wants(s) & mask;
        if ((mask & ZMQ_POLLOUT) && head_overdue(s))
            act |= ZMQ_POLLOUT; /* its last try, whatever ZMQ_EVENTS or a back-off says */
        if (!act) {
            if (!told_is_current(s))
                continue; /* the hint was wrong: ask libzmq */
            *idle = may_leave_ready_list(s);
            break; /* nothing to do in this mask */
        }
        const int wanted = wants(s);
        size_t room = limit ? limit - done : SIZE_MAX, n = 0;
        if ((act & ZMQ_POLLIN) && s->on_recv) {
            n += recv_some(s, room);
        } else if (act & ZMQ_POLLIN) { /* fibers receive on their own stacks */
            zev__stream_wake_pollers(s, ZMQ_POLLIN);
            if (!s->handed_in)
                zev__stream_wake_waiter(s, ZMQ_POLLIN);
        }
        if ((act & ZMQ_POLLOUT) && n < room)
            n += send_some(s, room - n);
        if ((act & ZMQ_POLLOUT) && !s->qlen && fibers_write(s)) { /* a fiber sends */
            zev__stream_wake_pollers(s, ZMQ_POLLOUT);
            if (!s->handed_out)
                zev__stream_wake_waiter(s, ZMQ_POLLOUT);
        }
        zev__reports_deliver(s);
        done += n;
        if (s->flushing && zev__sendq_flush_done(s))
            zev__stream_finalize(s);
        else if (n == 0 && wants(s) == wanted && !may_leave_ready_list(s))
            break; /* libzmq promised work it did not give: retry next iteration */
        else if (limit && done >= limit && (act & ZMQ_POLLIN))
            s->hint = ZMQ_POLLIN; /* likely more to read: recv first next time */
    }
    if (zev__reports_owed(s))
        *idle = false; /* statuses added by on_send itself: the next pass reports them */
    zev__stream_timer_update(s);
    s->in_pass = outer;
    return done;
}

void zev__stream_fired(zev_stream_t *s)
{
    if (s->loop->watching && !s->fired_ns)
        s->fired_ns = s->loop->now_ns; /* the wait's end: lag counts from here */
    s->changes++;       /* an edge: what libzmq said before is stale */
    s->blocked = false; /* POLLOUT may be true again */
    s->backoff_until = 0;
    if (s->on_recv)
        s->hint = ZMQ_POLLIN; /* most edges bring a message: try recv first */
    mark_ready(s);
}

int zev__streams_all_ready(zev_loop_t *loop)
{
    size_t n = 0;
    for (zev__list_t *p = loop->ready.next; p != &loop->ready && n <= loop->nstreams;
         p = p->next) {
        const zev_stream_t *s = zev__container_of(p, zev_stream_t, ready);
        if (s->err || s->blocked)
            return 0; /* unregistered, or waiting for its edge (which clears blocked) */
        n++;
    }
    return n == loop->nstreams;
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
    int events = sock_events(s);
    if (events >= 0 && !(events & ZMQ_POLLIN))
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
    size_t n = 0;
    while ((node = zev__list_pop_head(&batch))) {
        zev_stream_t *s = zev__container_of(node, zev_stream_t, ready);
        n++;
        if (s->fired_ns) {
            if (loop->watching)
                zev__lag(loop, s->fired_ns, zev__clock_ns());
            s->fired_ns = 0;
        }
        bool idle;
        handled +=
            stream_work(s, ZMQ_POLLIN | ZMQ_POLLOUT, s->batch ? s->batch : loop->batch, &idle);
        if (!idle)
            mark_ready(s);
    }
    loop->stats.stream_passes += n;
    if (n > loop->stats.ready_peak)
        loop->stats.ready_peak = n;
    return handled;
}

int zev_stream_flush(zev_stream_t *s, int flags, size_t limit)
{
    if (!zev__stream_usable(s))
        return -1;
    if (zev__fiber_current()) {
        errno = EBUSY; /* it would run callbacks on the fiber's stack */
        return -1;
    }
    if (!flags || (flags & ~(ZEV_READ | ZEV_WRITE))) {
        errno = EINVAL;
        return -1;
    }
    if (s->err) {
        errno = s->err;
        return -1;
    }
    int mask = (flags & ZEV_WRITE) ? ZMQ_POLLOUT : 0;
    if ((flags & ZEV_READ) && !s->in_recv) /* its frames are still borrowed */
        mask |= ZMQ_POLLIN;
    s->changes++; /* "look now": an edge may wait undispatched in the backend */
    int saved = errno;
    bool idle;
    zev_loop_t *loop = s->loop;
    /* messages, not the pass's units (a long message takes several) */
    const uint64_t before = s->stats.msgs_in + s->stats.dropped_oversized + s->stats.msgs_out;
    zev__callbacks_enter(loop); /* on_recv and on_send run from here */
    if (mask)
        stream_work(s, mask, limit, &idle);
    mark_ready(s); /* the socket was touched outside the stream's pass */
    zev__callbacks_leave(loop);
    uint64_t n = s->stats.msgs_in + s->stats.dropped_oversized + s->stats.msgs_out - before;
    if (n == 0 && s->err) { /* the socket turned out to be gone: say so */
        errno = s->err;
        return -1;
    }
    errno = saved;
    return n > INT32_MAX ? INT32_MAX : (int)n;
}
