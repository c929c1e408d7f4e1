/*
 * A stream's send queue and its on_send reports.
 *
 * Design notes
 * - The queue is a ring of zmq_msg_t parts (power-of-two capacity, grown by
 *   doubling, never per message). `qmsgs` counts messages that have parts in
 *   it, each counted at its first queued part and uncounted at its last, so
 *   the bound (max_queue) is checked in messages; `open` remembers whether
 *   the user is still building a multipart message and which path (direct
 *   or queued) its first part took.
 * - Messages are numbered from 1 in the order their first part is given
 *   (seq_given); statuses become known in that same order (a message can
 *   only complete after the ones before it), so the n-th status known is
 *   message n's, and seq_settled counts them whether or not on_send keeps
 *   them. on_send statuses are run-length encoded (status, first seq,
 *   count): a firehose of successful sends costs one counter, and delivery
 *   keeps send order and hands on_send each message's number.
 * - Send deadlines (zev_stream_set_send_timeout), the stream's ZMQ_SNDTIMEO:
 *   a message libzmq takes is always sent, late or not; one it refuses is
 *   dropped, ETIMEDOUT, once it has been at the head of the queue for the
 *   timeout, as a blocking send would give up after ZMQ_SNDTIMEO. A peer
 *   that merely catches up slowly therefore loses nothing. A peer that
 *   stopped reading would hold everyone behind it for a timeout per
 *   message, so its destination is remembered once a message to it timed
 *   out, and its next messages, once they have waited the timeout in the
 *   queue, fail at once when refused. The destination is a ROUTER's peer
 *   (the message's first frame, hashed; up to TIMED_OUT_MAX of them, in a
 *   hash set grown only when a destination times out) and, for other socket
 *   types, the socket: an EAGAIN there is the whole socket's. A message to
 *   it that libzmq takes forgets it, whether it went straight from a send
 *   call or from the queue (streamio.c's sock_send_first, which reads the
 *   destination before libzmq empties the frame). Only the head's deadline
 *   matters at any time, so the stream's one timer waits for it.
 * - Every message given to zev gets exactly one status: 0 when handed to
 *   libzmq, the errno libzmq gave, or ECANCELED / ENOTSOCK / ETERM from
 *   zev__sendq_cancel when it never went out. The room for that status is
 *   reserved when the message is given (zev__report_reserve), so running
 *   out of memory later cannot lose it.
 */
#include "zev-internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ on_send reports */

/* Grows the status array to `need` entries (zev__report_reserve). */
int zev__report_grow(zev_stream_t *s, size_t need)
{
    size_t cap = zev__grown_cap(s->rep_cap, 8, need, sizeof *s->rep);
    zev__report_t *rep = cap ? realloc(s->rep, cap * sizeof *rep) : NULL;
    if (!rep) {
        errno = ENOMEM;
        return -1;
    }
    s->rep = rep;
    s->rep_cap = cap;
    return 0;
}

/* Records the status of the next message; zev__report_reserve made the
 * room. */
void zev__report_add(zev_stream_t *s, int status)
{
    uint64_t seq = ++s->seq_settled;
    s->settled_status = status;
    if (status == 0)
        s->stats.msgs_out++;
    else if (status == ETIMEDOUT)
        s->stats.timed_out++;
    else if (status == ECANCELED)
        s->stats.cancelled++;
    else
        s->stats.failed++;
    if (!s->on_send)
        return;
    if (zev__reports_owed(s)) {
        zev__report_t *last = &s->rep[s->rep_len - 1];
        if (last->status == status && last->seq + last->count == seq) {
            last->count++;
            return;
        }
    }
    s->rep[s->rep_len++] = (zev__report_t){status, seq, 1};
}

/* Delivers the statuses owed when it was called, no more: an on_send that
 * sends again adds statuses that wait for the stream's next pass (STYLE:
 * every drain is bounded; otherwise a callback that sends on each success
 * runs until libzmq says EAGAIN, and timers and other streams wait). Not
 * re-entered: a zev_stream_flush from inside on_send leaves its statuses to
 * the delivery already running or to the next pass, so the order holds. */
void zev__reports_deliver(zev_stream_t *s)
{
    size_t end = s->rep_len;
    if (s->rep_head == end || s->delivering)
        return;
    s->delivering = true;
    size_t last = s->rep[end - 1].count; /* later merges into it wait */
    while (s->rep_head < end) {
        zev__report_t *r = &s->rep[s->rep_head];
        if (s->rep_head == end - 1 && last-- == 0)
            break;
        int status = r->status;
        uint64_t seq = r->seq++;
        if (--r->count == 0)
            s->rep_head++;
        s->loop->reported++;
        if (s->on_send) {
            uint64_t t0 = zev__watch_begin(s->loop);
            s->on_send(s, seq, status, s->send_arg); /* may add reports: r is stale now */
            zev__watch_end(s->loop, t0, ZEV_SLOW_SEND, s, NULL);
        }
    }
    s->delivering = false;
    size_t left = s->rep_len - s->rep_head;
    if (s->rep_head)
        memmove(s->rep, s->rep + s->rep_head, left * sizeof *s->rep);
    s->rep_head = 0;
    s->rep_len = left;
}

/* ---------------------------------------------------------------- send queue */

int zev__sendq_reserve(zev_stream_t *s, size_t n)
{
    if (n <= s->qcap - s->qlen)
        return 0;
    size_t cap = n > SIZE_MAX - s->qlen ? 0 : zev__grown_cap(s->qcap, 16, s->qlen + n, sizeof *s->q);
    zev__sendpart_t *q = cap ? malloc(cap * sizeof *q) : NULL;
    if (!q) {
        errno = ENOMEM;
        return -1;
    }
    /* zmq_msg_t is moved bitwise here, as libzmq's own pipes move it. */
    for (size_t i = 0; i < s->qlen; i++)
        memcpy(&q[i], zev__sendq_at(s, i), sizeof *q);
    free(s->q);
    s->q = q;
    s->qcap = cap;
    s->qhead = 0;
    return 0;
}

/* Moves msg into the queue (space must be reserved). */
void zev__sendq_push(zev_stream_t *s, zmq_msg_t *msg, bool more)
{
    zev__sendpart_t *p = zev__sendq_at(s, s->qlen++);
    zev__msg_move(&p->msg, msg, &s->loop->hub->empty);
    p->more = more;
    if (s->open != OPEN_QUEUED) { /* its first queued part counts the message */
        s->qmsgs++;
        if (s->qmsgs > s->stats.queue_peak)
            s->stats.queue_peak = s->qmsgs;
        p->queued_ns = zev__now(s->loop);
        if (s->qlen == 1)
            zev__sendq_new_head(s);
    }
    s->open = more ? OPEN_QUEUED : OPEN_NONE;
}

void zev__sendq_pop(zev_stream_t *s, bool taken)
{
    if (!taken) /* libzmq leaves a part it took empty: nothing to close */
        zmq_msg_close(&zev__sendq_at(s, 0)->msg);
    s->qhead = (s->qhead + 1) & (s->qcap - 1);
    s->qlen--;
}

/* Drops what is left of the head message, unreported. */
void zev__sendq_drop_rest(zev_stream_t *s)
{
    bool more = true;
    while (s->qlen && more) {
        more = zev__sendq_at(s, 0)->more;
        zev__sendq_pop(s, false);
    }
    if (more) /* its last part has not been given yet */
        s->open = OPEN_DISCARD;
    s->qmsgs--;
}

/* Drops what is left of the head message and reports it once with status. */
void zev__sendq_drop_head(zev_stream_t *s, int status)
{
    zev__sendq_drop_rest(s);
    zev__report_add(s, status);
}

/* Every message given and not yet handed over gets status, once. */
void zev__sendq_cancel(zev_stream_t *s, int status)
{
    while (s->qlen)
        zev__sendq_drop_head(s, status);
    if (s->open == OPEN_QUEUED) /* its queued parts were all sent */
        s->qmsgs--;
    if (s->open == OPEN_QUEUED || s->open == OPEN_DIRECT)
        zev__report_add(s, status);
    s->open = OPEN_NONE;
    s->qmsgs = 0;
    s->broken = 0;
}

/* The destination of the message whose first part is `first` (see the
 * design notes); never 0. */
static uint64_t destination(const zev_stream_t *s, const zmq_msg_t *first)
{
    if (!s->routed)
        return 1;
    const unsigned char *p = zmq_msg_data((zmq_msg_t *)first);
    size_t n = zmq_msg_size((zmq_msg_t *)first);
    uint64_t h = 14695981039346656037u; /* FNV-1a */
    for (size_t i = 0; i < n && i < 256; i++)
        h = (h ^ p[i]) * 1099511628211u;
    return h | 1;
}

static uint64_t head_destination(const zev_stream_t *s)
{
    return destination(s, &zev__sendq_at((zev_stream_t *)s, 0)->msg);
}

/* ------------------------------------------------ timed-out destinations */

/* A set of destination hashes (never 0: 0 marks an empty slot) with linear
 * probing, kept at most half full, and deletion by backward shift, so no
 * tombstones pile up. It is allocated when the first destination times out
 * and grows (doubling) only when a new one does, never per message. Bounded
 * at TIMED_OUT_MAX destinations: a ROUTER whose peers time out and leave
 * for good (they are forgotten only when a message to them is taken) must
 * not grow it without end. At the bound, or if growing fails, a new
 * destination evicts one found by a hand that sweeps the table. */
#define TIMED_OUT_MAX 4096

static size_t home_slot(uint64_t dest, size_t cap)
{
    uint64_t h = dest * 0x9e3779b97f4a7c15u; /* the hash's high bits, mixed down */
    return (size_t)(h ^ (h >> 32)) & (cap - 1);
}

/* The slot holding dest, or SIZE_MAX. */
static size_t timed_out_find(const zev_stream_t *s, uint64_t dest)
{
    if (!s->ntimed_out)
        return SIZE_MAX;
    size_t mask = s->timed_out_cap - 1;
    for (size_t i = home_slot(dest, s->timed_out_cap);; i = (i + 1) & mask) {
        if (s->timed_out[i] == dest)
            return i;
        if (!s->timed_out[i])
            return SIZE_MAX;
    }
}

/* Empties slot i, moving later entries of its probe run back so that every
 * entry stays reachable from its home slot. */
static void timed_out_remove_at(zev_stream_t *s, size_t i)
{
    size_t mask = s->timed_out_cap - 1;
    for (size_t j = (i + 1) & mask; s->timed_out[j]; j = (j + 1) & mask) {
        size_t home = home_slot(s->timed_out[j], s->timed_out_cap);
        /* j's entry may fill the hole at i unless its home lies in (i, j] */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            s->timed_out[i] = s->timed_out[j];
            i = j;
        }
    }
    s->timed_out[i] = 0;
    s->ntimed_out--;
}

static void timed_out_put(zev_stream_t *s, uint64_t dest)
{
    size_t mask = s->timed_out_cap - 1, i = home_slot(dest, s->timed_out_cap);
    while (s->timed_out[i])
        i = (i + 1) & mask;
    s->timed_out[i] = dest;
    s->ntimed_out++;
}

/* Room for one more destination, growing the table when that keeps it
 * within the bound; 0, or -1 when it could not grow. */
static int timed_out_grow(zev_stream_t *s)
{
    if (2 * (s->ntimed_out + 1) <= s->timed_out_cap)
        return 0;
    size_t cap = s->timed_out_cap ? 2 * s->timed_out_cap : 16;
    if (cap > 2 * TIMED_OUT_MAX)
        return -1;
    uint64_t *old = s->timed_out;
    size_t old_cap = s->timed_out_cap;
    s->timed_out = calloc(cap, sizeof *s->timed_out);
    if (!s->timed_out) {
        s->timed_out = old;
        return -1;
    }
    s->timed_out_cap = cap;
    s->ntimed_out = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i])
            timed_out_put(s, old[i]);
    free(old);
    return 0;
}

static void timed_out_add(zev_stream_t *s, uint64_t dest)
{
    if (timed_out_find(s, dest) != SIZE_MAX)
        return;
    if (timed_out_grow(s) < 0) {
        if (!s->ntimed_out)
            return; /* no table and no memory for one: not remembered */
        size_t mask = s->timed_out_cap - 1;
        while (!s->timed_out[s->timed_out_hand & mask])
            s->timed_out_hand++;
        timed_out_remove_at(s, s->timed_out_hand++ & mask);
    }
    timed_out_put(s, dest);
}

void zev__sendq_timed_out_free(zev_stream_t *s)
{
    free(s->timed_out);
    s->timed_out = NULL;
    s->timed_out_cap = s->ntimed_out = 0;
}

uint64_t zev__sendq_deadline(const zev_stream_t *s)
{
    /* A head message libzmq already holds parts of can only go on. */
    if (!s->send_timeout_ns || !s->qlen || s->out_more)
        return UINT64_MAX;
    uint64_t queued = zev__sendq_at((zev_stream_t *)s, 0)->queued_ns;
    if (s->ntimed_out && timed_out_find(s, head_destination(s)) != SIZE_MAX)
        return zev__sat_add(queued, s->send_timeout_ns);
    return zev__sat_add(s->head_since_ns > queued ? s->head_since_ns : queued, s->send_timeout_ns);
}

void zev__sendq_time_out_head(zev_stream_t *s)
{
    timed_out_add(s, head_destination(s));
    zev__sendq_drop_head(s, ETIMEDOUT);
}

uint64_t zev__sendq_timed_out_dest(const zev_stream_t *s, const zmq_msg_t *first)
{
    uint64_t dest = destination(s, first);
    return timed_out_find(s, dest) != SIZE_MAX ? dest : 0;
}

void zev__sendq_forget(zev_stream_t *s, uint64_t dest)
{
    size_t i = timed_out_find(s, dest);
    if (i != SIZE_MAX)
        timed_out_remove_at(s, i);
}

/* With ZEV_CLOSE_FLUSH: done when only a message the user never finished
 * (it can no longer be finished) is left. */
int zev__sendq_flush_done(const zev_stream_t *s)
{
    return s->qmsgs == (s->open == OPEN_QUEUED ? 1u : 0u);
}
