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
 * - on_send statuses are run-length encoded (status, count): a firehose of
 *   successful sends costs one counter, and delivery keeps send order.
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

/* Records the status of one message; zev__report_reserve made the room. */
void zev__report_add(zev_stream_t *s, int status)
{
    if (!s->on_send)
        return;
    if (zev__reports_owed(s) && s->rep[s->rep_len - 1].status == status)
        s->rep[s->rep_len - 1].count++;
    else
        s->rep[s->rep_len++] = (zev__report_t){status, 1};
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
        if (--r->count == 0)
            s->rep_head++;
        if (s->on_send)
            s->on_send(s, status, s->send_arg); /* may add reports: r is stale now */
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
    zev__msg_move(&p->msg, msg);
    p->more = more;
    if (s->open != OPEN_QUEUED) /* its first queued part counts the message */
        s->qmsgs++;
    s->open = more ? OPEN_QUEUED : OPEN_NONE;
}

void zev__sendq_pop(zev_stream_t *s)
{
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
        zev__sendq_pop(s);
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

/* With ZEV_CLOSE_FLUSH: done when only a message the user never finished
 * (it can no longer be finished) is left. */
int zev__sendq_flush_done(const zev_stream_t *s)
{
    return s->qmsgs == (s->open == OPEN_QUEUED ? 1u : 0u);
}
