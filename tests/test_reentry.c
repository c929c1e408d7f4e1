/*
 * Re-entrant use of the public API from inside zev's own callbacks, on the
 * same stream and loop: closing, flushing, sending and changing callbacks
 * from on_send, on_recv, on_frame_release, on_close, timers, queued
 * callbacks, io watchers and tracker completions. Each test asserts the
 * exact statuses, what a raw peer received, that on_close ran once, and
 * ends with the loop destroyed and the context terminated (ASan: no leak).
 */
#include "common.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define N 20

/* ------------------------------------------------------------ small helpers */

typedef struct {
    zev_stream_t *s;
    size_t statuses;   /* on_send calls */
    int status[4 * N]; /* their values, in order */
    size_t closes;     /* on_close calls */
    size_t statuses_at_close;
    size_t recvs;        /* on_recv calls */
    uint64_t seq[4 * N]; /* what on_recv saw */
    size_t recvs2;       /* a second on_recv / on_send */
    size_t frames;       /* on_frame_release calls */
    size_t frame_size;   /* sum of their sizes */
    int rc;              /* a return value seen inside a callback */
    int err;
    zev_frame_t *kept[N];
    size_t nkept;
    void *sock2; /* a socket for a stream made inside a callback */
    zev_stream_t *s2;
    size_t closes2;
} ctx_t;

static void count_close(zev_stream_t *s, void *arg)
{
    (void)s;
    ctx_t *c = arg;
    c->closes++;
    c->statuses_at_close = c->statuses;
}

static void record_status(ctx_t *c, int status)
{
    cr_assert_lt(c->statuses, 4 * N);
    c->status[c->statuses++] = status;
}

static uint64_t msg_seq(zev_msg_t *m)
{
    cr_assert_eq(zev_msg_parts(m), 1);
    cr_assert_eq(zev_msg_size(m, 0), sizeof(uint64_t));
    uint64_t v;
    memcpy(&v, zev_msg_data(m, 0), sizeof v);
    return v;
}

/* Non-blocking raw receive of every sequence number waiting on sock. */
static size_t raw_drain(void *sock, uint64_t *out, size_t max)
{
    size_t n = 0;
    uint64_t v;
    while (n < max && zmq_recv(sock, &v, sizeof v, ZMQ_DONTWAIT) == (int)sizeof v)
        out[n++] = v;
    return n;
}

/* A PUSH stream (p.b) whose PULL peer (p.a, raw) is connected with HWMs of
 * `hwm` on both sides: some of N sends go straight out, the rest queue. */
static test_pair_t push_pair(int hwm)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL);
    test_set_int(p.a, ZMQ_RCVHWM, hwm);
    test_set_int(p.b, ZMQ_SNDHWM, hwm);
    test_set_int(p.a, ZMQ_LINGER, 0);
    test_set_int(p.b, ZMQ_LINGER, 0);
    test_bind_connect(p.a, p.b, "inproc");
    return p;
}

static void send_seqs(zev_stream_t *s, uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i < to; i++)
        cr_assert_eq(zev_stream_send(s, &i, sizeof i, 0), 0, "send %llu: %s", (unsigned long long)i,
                     zmq_strerror(errno));
}

/* Zeros first (each a message the peer got, in order), then `tail`. */
static void check_statuses_then(const ctx_t *c, size_t total, size_t zeros, int tail)
{
    cr_assert_eq(c->statuses, total, "%zu statuses for %zu messages", c->statuses, total);
    for (size_t i = 0; i < total; i++)
        cr_assert_eq(c->status[i], i < zeros ? 0 : tail, "status %zu is %d", i, c->status[i]);
}

/* Tears the fixture down and, in ASan builds, checks nothing leaked. */
static void finish(test_pair_t *p)
{
    cr_assert_eq(test_pair_close(p), 0);
    test_expect_no_leaks();
}

/* ------------------------------------------------------- close from on_send */

static void close_on_first_status(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    if (c->statuses == 1) {
        c->rc = zev_stream_close(s, 0);
        c->err = errno;
    }
}

/* Closing while statuses are delivered: the rest of those owed still come
 * (0), the queued messages come ECANCELED, each exactly once, all before
 * on_close. */
Test(reentry_send, close_inside_on_send, .timeout = 30)
{
    test_pair_t p = push_pair(4);
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.b);
    cr_assert_eq(zev_stream_on_send(s, close_on_first_status, &c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    send_seqs(s, 0, N);
    cr_assert(zev_stream_sending(s), "some messages must queue behind the HWM");

    test_run_until_count(p.loop, &c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.rc, 0, "close inside on_send: %s", zmq_strerror(c.err));
    uint64_t got[N];
    size_t n = raw_drain(p.a, got, N);
    cr_assert(n > 0 && n < N, "peer got %zu", n);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(got[i], i);
    check_statuses_then(&c, N, n, ECANCELED);
    cr_assert_eq(c.closes, 1);
    cr_assert_eq(c.statuses_at_close, N, "on_close before the last status");
    finish(&p);
}

static void close_flush_on_first_status(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    if (c->statuses == 1) {
        c->rc = zev_stream_close(s, ZEV_CLOSE_FLUSH);
        c->err = errno;
        if (zev_stream_send(s, "x", 1, 0) == 0 || errno != EBADF)
            c->rc = -2; /* a closed stream takes nothing */
    }
}

typedef struct {
    void *sock;
    uint64_t got[4 * N];
    size_t n;
} drain_t;

static void drain_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    drain_t *d = arg;
    d->n += raw_drain(d->sock, d->got + d->n, 4 * N - d->n);
}

/* A flushing close from on_send hands every queued message over. */
Test(reentry_send, close_flush_inside_on_send, .timeout = 30)
{
    test_pair_t p = push_pair(4);
    test_set_int(p.b, ZMQ_LINGER, 5000);
    ctx_t c = {0};
    drain_t d = {.sock = p.a};
    zev_stream_t *s = test_stream_new(p.loop, p.b);
    cr_assert_eq(zev_stream_on_send(s, close_flush_on_first_status, &c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    send_seqs(s, 0, N);
    zev_timer_t *t = zev_timer_start(p.loop, 1000, 1000, drain_timer, &d);
    cr_assert_not_null(t);

    test_run_until_count(p.loop, &c.closes, 1, 5000);
    cr_assert_eq(c.rc, 0, "close(FLUSH) inside on_send: %d %s", c.rc, zmq_strerror(c.err));
    drain_timer(t, &d);
    cr_assert_eq(zev_timer_cancel(t), 0);
    cr_assert_eq(d.n, N, "peer got %zu", d.n);
    for (size_t i = 0; i < N; i++)
        cr_assert_eq(d.got[i], i);
    check_statuses_then(&c, N, N, 0);
    cr_assert_eq(c.statuses_at_close, N);
    finish(&p);
}

/* ------------------------------------------- changing on_send inside on_send */

static void second_on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    ctx_t *c = arg;
    c->recvs2++;
    record_status(c, status);
}

static void unset_on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    c->rc = zev_stream_on_send(s, NULL, NULL);
}

static void swap_on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    c->rc = zev_stream_on_send(s, second_on_send, c);
}

/* on_send(NULL) from on_send: no more statuses, also none for later sends. */
Test(reentry_send, on_send_null_inside_on_send, .timeout = 30)
{
    test_pair_t p = push_pair(4);
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.b);
    cr_assert_eq(zev_stream_on_send(s, unset_on_send, &c), 0);
    send_seqs(s, 0, N);
    drain_t d = {.sock = p.a};
    zev_timer_t *t = zev_timer_start(p.loop, 1000, 1000, drain_timer, &d);
    test_run_until_count(p.loop, &d.n, N, 5000);
    send_seqs(s, N, N + 3);
    test_run_until_count(p.loop, &d.n, N + 3, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(zev_timer_cancel(t), 0);
    cr_assert_eq(c.rc, 0);
    cr_assert_eq(c.statuses, 1, "%zu statuses after on_send(NULL)", c.statuses);
    for (size_t i = 0; i < N + 3; i++)
        cr_assert_eq(d.got[i], i);
    finish(&p);
}

/* A new on_send set from on_send gets the rest, in order, once each. */
Test(reentry_send, on_send_swapped_inside_on_send, .timeout = 30)
{
    test_pair_t p = push_pair(4);
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.b);
    cr_assert_eq(zev_stream_on_send(s, swap_on_send, &c), 0);
    send_seqs(s, 0, N);
    drain_t d = {.sock = p.a};
    zev_timer_t *t = zev_timer_start(p.loop, 1000, 1000, drain_timer, &d);
    test_run_until_count(p.loop, &c.statuses, N, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(zev_timer_cancel(t), 0);
    cr_assert_eq(c.rc, 0);
    check_statuses_then(&c, N, N, 0);
    cr_assert_eq(c.recvs2, N - 1);
    finish(&p);
}

/* on_send sets max_queue / batch and sends until the queue is full. */
static void settings_in_on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    if (c->statuses == 1) {
        cr_assert_eq(zev_stream_set_batch(s, 1), 0);
        cr_assert_eq(zev_stream_set_max_queue(s, 2), 0);
        zev_stream_stats_t st;
        cr_assert_eq(zev_stream_stats(s, &st), 0);
        uint64_t v = N;
        int rc = 0;
        /* the queue holds more than 2 already: each send is refused */
        rc = zev_stream_send(s, &v, sizeof v, 0);
        c->rc = st.queued_msgs >= 2 ? (rc == -1 && errno == EAGAIN) : rc == 0;
    }
}

Test(reentry_send, settings_inside_on_send, .timeout = 30)
{
    test_pair_t p = push_pair(4);
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.b);
    cr_assert_eq(zev_stream_on_send(s, settings_in_on_send, &c), 0);
    send_seqs(s, 0, N);
    drain_t d = {.sock = p.a};
    zev_timer_t *t = zev_timer_start(p.loop, 1000, 1000, drain_timer, &d);
    test_run_until_count(p.loop, &d.n, N, 5000);
    test_run_until_count(p.loop, &c.statuses, N, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(zev_timer_cancel(t), 0);
    cr_assert_eq(c.rc, 1);
    check_statuses_then(&c, N, N, 0);
    for (size_t i = 0; i < N; i++)
        cr_assert_eq(d.got[i], i);
    finish(&p);
}

/* ------------------------------------------------------------- from on_recv */

/* A PAIR stream on p.a with a raw PAIR peer on p.b. */
static test_pair_t pair_pair(void)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, "inproc");
    test_set_int(p.a, ZMQ_LINGER, 0);
    test_set_int(p.b, ZMQ_LINGER, 0);
    test_set_int(p.b, ZMQ_RCVTIMEO, 5000);
    return p;
}

static void echo_flush(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    uint64_t v = msg_seq(m);
    c->seq[c->recvs++] = v;
    v += 1000;
    cr_assert_eq(zev_stream_send(s, &v, sizeof v, 0), 0);
    int n = zev_stream_flush(s, ZEV_WRITE | ZEV_READ, 0);
    if (n < 0)
        c->rc = -1;
    /* the message is still ours after the nested pass */
    cr_assert_eq(msg_seq(m), v - 1000);
}

static void status_counter(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    record_status(arg, status);
}

/* flush(ZEV_WRITE|ZEV_READ) from on_recv: the reply goes out, its status
 * comes once, the message being handled stays valid, nothing recurses. */
Test(reentry_recv, flush_inside_on_recv, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, echo_flush, &c), 0);
    cr_assert_eq(zev_stream_on_send(s, status_counter, &c), 0);
    for (uint64_t i = 0; i < N; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &c.statuses, N, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.rc, 0);
    cr_assert_eq(c.recvs, N);
    check_statuses_then(&c, N, N, 0);
    for (uint64_t i = 0; i < N; i++) {
        cr_assert_eq(c.seq[i], i);
        uint64_t v = 0;
        cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
        cr_assert_eq(v, i + 1000);
    }
    finish(&p);
}

static void close_in_status(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    cr_assert_eq(zev_stream_close(s, 0), 0);
}

/* on_recv -> send + flush -> on_send closes the stream: on_recv sees no
 * more messages, the one in hand stays valid, on_close runs once. */
Test(reentry_recv, flush_in_on_recv_closes_in_on_send, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, echo_flush, &c), 0);
    cr_assert_eq(zev_stream_on_send(s, close_in_status, &c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    for (uint64_t i = 0; i < N; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.recvs, 1);
    cr_assert_eq(c.closes, 1);
    check_statuses_then(&c, 1, 1, 0);
    uint64_t v = 0;
    cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
    cr_assert_eq(v, 1000);
    finish(&p);
}

typedef struct {
    ctx_t c;
    int flags;
    uint64_t reply;
} closer_t;

static void reply_and_close(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    closer_t *k = arg;
    k->c.seq[k->c.recvs++] = msg_seq(m);
    if (k->reply)
        cr_assert_eq(zev_stream_send(s, &k->reply, sizeof k->reply, 0), 0);
    k->c.rc = zev_stream_close(s, k->flags);
    k->c.err = errno;
    cr_assert_eq(zev_stream_closed(s), 1);
    cr_assert_eq(msg_seq(m), k->c.seq[0]); /* still readable after close */
}

static void close_from_on_recv(int flags)
{
    test_pair_t p = pair_pair();
    closer_t k = {.flags = flags, .reply = (flags & ZEV_CLOSE_FLUSH) ? 77 : 0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, reply_and_close, &k), 0);
    cr_assert_eq(zev_stream_on_send(s, status_counter, &k.c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &k.c), 0);
    for (uint64_t i = 0; i < 5; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &k.c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(k.c.rc, 0, "close(%d) in on_recv: %s", flags, zmq_strerror(k.c.err));
    cr_assert_eq(k.c.recvs, 1, "on_recv ran %zu times", k.c.recvs);
    cr_assert_eq(k.c.seq[0], 0);
    cr_assert_eq(k.c.closes, 1);
    if (k.reply) {
        check_statuses_then(&k.c, 1, 1, 0);
        uint64_t v = 0;
        cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
        cr_assert_eq(v, 77);
    } else {
        cr_assert_eq(k.c.statuses, 0);
    }
    if (flags & ZEV_CLOSE_SOCKET)
        p.a = NULL; /* zev closed it */
    finish(&p);
}

Test(reentry_recv, close_inside_on_recv, .timeout = 30)
{
    close_from_on_recv(0);
}

Test(reentry_recv, close_socket_inside_on_recv, .timeout = 30)
{
    close_from_on_recv(ZEV_CLOSE_SOCKET);
}

Test(reentry_recv, close_flush_inside_on_recv, .timeout = 30)
{
    close_from_on_recv(ZEV_CLOSE_FLUSH | ZEV_CLOSE_SOCKET);
}

static void recv_second(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    ctx_t *c = arg;
    c->recvs2++;
    c->seq[c->recvs++] = msg_seq(m);
}

static void recv_unset(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    cr_assert_eq(zev_stream_on_recv(s, NULL, NULL), 0);
    cr_assert_eq(zev_stream_receiving(s), 0);
}

static void recv_swap(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    cr_assert_eq(zev_stream_on_recv(s, recv_second, c), 0);
}

/* on_recv(NULL) from on_recv stops at once; setting it again resumes with
 * the next message; a new fn set from on_recv gets the rest, in order. */
Test(reentry_recv, on_recv_changed_inside_on_recv, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, recv_unset, &c), 0);
    for (uint64_t i = 0; i < N; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &c.recvs, 1, 5000);
    test_spin(p.loop, 5, 1);
    cr_assert_eq(c.recvs, 1);
    cr_assert_eq(zev_stream_on_recv(s, recv_swap, &c), 0);
    test_run_until_count(p.loop, &c.recvs, N, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.recvs, N);
    cr_assert_eq(c.recvs2, N - 2);
    for (uint64_t i = 0; i < N; i++)
        cr_assert_eq(c.seq[i], i);
    finish(&p);
}

static void stop_in_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    zev_loop_stop(zev_stream_loop(s));
}

Test(reentry_recv, loop_stop_inside_on_recv, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, stop_in_recv, &c), 0);
    test_send_seq(p.b, 0);
    test_watchdog_t w;
    test_watchdog_start(&w, p.loop, 5000);
    cr_assert_eq(zev_loop_run(p.loop), 0);
    cr_assert_eq(test_watchdog_stop(&w), 0);
    cr_assert_eq(c.recvs, 1);
    finish(&p);
}

/* ------------------------------------------------------------------ frames */

static void frame_count(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    ctx_t *c = arg;
    c->frames++;
    c->frame_size += size;
}

static void keep_release(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    zev_frame_t *f = zev_msg_keep(m, 0);
    cr_assert_not_null(f);
    cr_assert_null(zev_msg_keep(m, 0)); /* twice: EINVAL */
    cr_assert_eq(zev_frame_release(f), 0);
    cr_assert_eq(zev_stream_set_max_frames(s, 1), 0);
    cr_assert_eq(zev_stream_set_batch(s, 2), 0);
}

/* keep + release inside on_recv under max_frames = 1: every message comes,
 * every frame is reported once with its size. */
Test(reentry_frames, keep_release_inside_on_recv, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_frame_release(s, frame_count, &c), 0);
    cr_assert_eq(zev_stream_on_recv(s, keep_release, &c), 0);
    for (uint64_t i = 0; i < N; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &c.frames, N, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.recvs, N);
    cr_assert_eq(c.frames, N);
    cr_assert_eq(c.frame_size, N * sizeof(uint64_t));
    for (uint64_t i = 0; i < N; i++)
        cr_assert_eq(c.seq[i], i);
    finish(&p);
}

static void keep_only(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    c->kept[c->nkept++] = zev_msg_keep(m, 0);
    cr_assert_not_null(c->kept[c->nkept - 1]);
}

static void close_in_frame_release(zev_stream_t *s, size_t size, void *arg)
{
    ctx_t *c = arg;
    c->frames++;
    c->frame_size += size;
    if (c->frames == 1) {
        c->rc = zev_stream_close(s, 0);
        cr_assert_eq(zev_stream_flush(s, ZEV_READ, 0), -1);
        cr_assert_eq(errno, EBADF);
    }
}

/* close from on_frame_release: frames released in the same drain are still
 * reported (the close callback has not run), later ones are not. */
Test(reentry_frames, close_inside_on_frame_release, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_frame_release(s, close_in_frame_release, &c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    cr_assert_eq(zev_stream_on_recv(s, keep_only, &c), 0);
    for (uint64_t i = 0; i < 4; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &c.recvs, 4, 5000);
    cr_assert_eq(zev_frame_release(c.kept[0]), 0);
    cr_assert_eq(zev_frame_release(c.kept[1]), 0);
    test_run_until_count(p.loop, &c.closes, 1, 5000);
    cr_assert_eq(c.rc, 0);
    cr_assert_eq(c.frames, 2);
    cr_assert_eq(zev_frame_release(c.kept[2]), 0);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.frames, 2, "on_frame_release after on_close");
    cr_assert_eq(c.closes, 1);
    cr_assert_eq(test_pair_close(&p), 0);
    /* a frame may outlive the loop */
    cr_assert_eq(*(const uint64_t *)zev_frame_data(c.kept[3]), 3);
    cr_assert_eq(zev_frame_release(c.kept[3]), 0);
    test_expect_no_leaks();
}

static void flush_in_frame_release(zev_stream_t *s, size_t size, void *arg)
{
    ctx_t *c = arg;
    (void)size;
    c->frames++;
    int n = zev_stream_flush(s, ZEV_READ | ZEV_WRITE, 0);
    if (n < 0)
        c->rc = -1;
}

static void keep_release_later(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    zev_frame_t *f = zev_msg_keep(m, 0);
    cr_assert_not_null(f);
    cr_assert_eq(zev_frame_release(f), 0);
}

/* flush from on_frame_release under max_frames = 1: receives the next
 * message (whose frame comes back the same way), in order. */
Test(reentry_frames, flush_inside_on_frame_release, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_frames(s, 1), 0);
    cr_assert_eq(zev_stream_on_frame_release(s, flush_in_frame_release, &c), 0);
    cr_assert_eq(zev_stream_on_recv(s, keep_release_later, &c), 0);
    for (uint64_t i = 0; i < N; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &c.frames, N, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.rc, 0);
    cr_assert_eq(c.recvs, N);
    cr_assert_eq(c.frames, N);
    for (uint64_t i = 0; i < N; i++)
        cr_assert_eq(c.seq[i], i);
    finish(&p);
}

/* -------------------------------------------- timers, callbacks, io watchers */

typedef struct {
    ctx_t c;
    zev_stream_t *s;
    size_t fired;
    int flags;
} timer_ctx_t;

static void timer_close(zev_timer_t *t, void *arg)
{
    timer_ctx_t *k = arg;
    k->fired++;
    cr_assert_eq(zev_timer_cancel(t), 0); /* a repeating timer: runs once */
    uint64_t v = 99;
    cr_assert_eq(zev_stream_send(k->s, &v, sizeof v, 0), 0);
    cr_assert_geq(zev_stream_flush(k->s, ZEV_READ | ZEV_WRITE, 0), 0);
    k->c.rc = zev_stream_close(k->s, k->flags);
}

static void recv_seq(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
}

/* A repeating timer that cancels itself, sends, flushes and closes: the
 * send goes out (flush) or is cancelled (close), once; the flush received
 * what was waiting; on_recv never runs after the close. */
static void timer_closes(int flags)
{
    test_pair_t p = pair_pair();
    timer_ctx_t k = {.flags = flags};
    k.s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(k.s, recv_seq, &k.c), 0);
    cr_assert_eq(zev_stream_on_send(k.s, status_counter, &k.c), 0);
    cr_assert_eq(zev_stream_on_close(k.s, count_close, &k.c), 0);
    test_spin(p.loop, 2, 1);
    for (uint64_t i = 0; i < 3; i++)
        test_send_seq(p.b, i);
    test_sleep_ms(20); /* let inproc deliver: the flush must find them */
    cr_assert_not_null(zev_timer_start(p.loop, 0, 1000, timer_close, &k));
    test_run_until_count(p.loop, &k.c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(k.c.rc, 0);
    cr_assert_eq(k.fired, 1);
    cr_assert_eq(k.c.closes, 1);
    cr_assert_eq(k.c.recvs, 3);
    for (uint64_t i = 0; i < 3; i++)
        cr_assert_eq(k.c.seq[i], i);
    check_statuses_then(&k.c, 1, 1, 0);
    uint64_t v = 0;
    cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
    cr_assert_eq(v, 99);
    finish(&p);
}

Test(reentry_loop, timer_flushes_and_closes, .timeout = 30)
{
    timer_closes(0);
}

Test(reentry_loop, timer_flushes_and_closes_flush, .timeout = 30)
{
    timer_closes(ZEV_CLOSE_FLUSH);
}

typedef struct {
    ctx_t c;
    zev_stream_t *s;
    size_t runs;
    size_t nested_runs;
} cb_ctx_t;

static void nested_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    cb_ctx_t *k = arg;
    k->nested_runs++;
}

static void cb_close(zev_loop_t *loop, void *arg)
{
    cb_ctx_t *k = arg;
    k->runs++;
    uint64_t v = 5;
    cr_assert_eq(zev_stream_send(k->s, &v, sizeof v, 0), 0);
    cr_assert_eq(zev_stream_close(k->s, ZEV_CLOSE_FLUSH), 0);
    cr_assert_eq(zev_stream_close(k->s, 0), -1);
    cr_assert_eq(errno, EBADF);
    cr_assert_eq(zev_loop_add_callback(loop, nested_cb, k), 0);
    cr_assert_eq(k->nested_runs, 0);
}

/* A queued callback sends and closes with flush, and queues another one:
 * that one runs in a later drain, the message goes out, on_close once. */
Test(reentry_loop, callback_sends_and_closes, .timeout = 30)
{
    test_pair_t p = pair_pair();
    cb_ctx_t k = {0};
    k.s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_send(k.s, status_counter, &k.c), 0);
    cr_assert_eq(zev_stream_on_close(k.s, count_close, &k.c), 0);
    cr_assert_eq(zev_loop_add_callback(p.loop, cb_close, &k), 0);
    cr_assert_eq(zev_loop_run_once(p.loop, 0), 1);
    cr_assert_eq(k.runs, 1);
    cr_assert_eq(k.nested_runs, 0);
    test_run_until_count(p.loop, &k.c.closes, 1, 5000);
    test_run_until_count(p.loop, &k.nested_runs, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(k.nested_runs, 1);
    check_statuses_then(&k.c, 1, 1, 0);
    uint64_t v = 0;
    cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
    cr_assert_eq(v, 5);
    finish(&p);
}

typedef struct {
    ctx_t c;
    zev_stream_t *s;
    zev_io_t *io;
    size_t calls;
} io_ctx_t;

static void io_close(zev_io_t *io, int fd, int events, void *arg)
{
    (void)fd;
    (void)events;
    io_ctx_t *k = arg;
    k->calls++;
    uint64_t v = 7;
    cr_assert_eq(zev_stream_send(k->s, &v, sizeof v, 0), 0);
    cr_assert_geq(zev_stream_flush(k->s, ZEV_WRITE, 0), 0);
    cr_assert_eq(zev_stream_close(k->s, ZEV_CLOSE_SOCKET), 0);
    cr_assert_eq(zev_io_stop(io), 0);
}

/* An io watcher flushes and closes the stream (and its socket) and stops
 * itself: the flush reported the message before the close. */
Test(reentry_loop, io_watcher_flushes_and_closes, .timeout = 30)
{
    test_pair_t p = pair_pair();
    io_ctx_t k = {0};
    int fds[2];
    test_pipe(fds);
    k.s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_send(k.s, status_counter, &k.c), 0);
    cr_assert_eq(zev_stream_on_close(k.s, count_close, &k.c), 0);
    k.io = zev_io_start(p.loop, fds[0], ZEV_READ, io_close, &k);
    cr_assert_not_null(k.io);
    cr_assert_eq(write(fds[1], "x", 1), 1);
    test_run_until_count(p.loop, &k.c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(k.calls, 1);
    check_statuses_then(&k.c, 1, 1, 0);
    uint64_t v = 0;
    cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
    cr_assert_eq(v, 7);
    p.a = NULL;
    close(fds[0]);
    close(fds[1]);
    finish(&p);
}

/* ---------------------------------------------------------------- trackers */

typedef struct {
    ctx_t c;
    zev_stream_t *s;
    size_t done;
    size_t freed;
    char buf[3][256];
    int step;
} zc_ctx_t;

static void zc_free(void *data, void *hint)
{
    (void)data;
    zc_ctx_t *k = hint;
    __atomic_fetch_add(&k->freed, 1, __ATOMIC_SEQ_CST);
}

static void zc_done(zev_tracker_t *t, void *arg)
{
    zc_ctx_t *k = arg;
    k->done++;
    cr_assert_eq(zev_tracker_done(t), 1);
    cr_assert_eq(zev_tracker_release(t), 0); /* inside its own callback */
    if (++k->step < 3) {
        zev_tracker_t *next = NULL;
        cr_assert_eq(zev_stream_send_zc(k->s, k->buf[k->step], sizeof k->buf[0], zc_free, k, &next),
                     0);
        cr_assert_eq(zev_tracker_on_done(next, zc_done, k), 0);
    } else {
        cr_assert_eq(zev_stream_close(k->s, 0), 0);
    }
}

/* Tracker completions that release their tracker, send the next zero-copy
 * message, and finally close the stream. */
Test(reentry_loop, tracker_on_done_sends_and_closes, .timeout = 30)
{
    test_pair_t p = pair_pair();
    zc_ctx_t k = {0};
    for (int i = 0; i < 3; i++)
        memset(k.buf[i], 'a' + i, sizeof k.buf[i]);
    k.s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_send(k.s, status_counter, &k.c), 0);
    cr_assert_eq(zev_stream_on_close(k.s, count_close, &k.c), 0);
    zev_tracker_t *t = NULL;
    cr_assert_eq(zev_stream_send_zc(k.s, k.buf[0], sizeof k.buf[0], zc_free, &k, &t), 0);
    cr_assert_eq(zev_tracker_on_done(t, zc_done, &k), 0);
    /* the peer takes each message, so libzmq lets go of its buffer */
    char in[256];
    for (int i = 0; i < 3; i++) {
        uint64_t end = test_ms() + 5000;
        int rc;
        while ((rc = zmq_recv(p.b, in, sizeof in, ZMQ_DONTWAIT)) < 0) {
            cr_assert(test_ms() < end, "message %d never came", i);
            zev_loop_run_once(p.loop, 1);
        }
        cr_assert_eq(rc, 256);
        cr_assert_eq(in[0], 'a' + i);
        cr_assert_eq(in[255], 'a' + i);
    }
    test_run_until_count(p.loop, &k.c.closes, 1, 5000);
    cr_assert_eq(k.done, 3);
    cr_assert_eq(__atomic_load_n(&k.freed, __ATOMIC_SEQ_CST), 3);
    check_statuses_then(&k.c, 3, 3, 0);
    cr_assert_eq(k.c.closes, 1);
    finish(&p);
}

/* ---------------------------------------------------------------- on_close */

static void close2(zev_stream_t *s, void *arg)
{
    (void)s;
    ctx_t *c = arg;
    c->closes2++;
}

static void new_stream_in_close(zev_stream_t *s, void *arg)
{
    ctx_t *c = arg;
    c->closes++;
    cr_assert_eq(zev_stream_close(s, 0), -1);
    cr_assert_eq(errno, EBADF);
    cr_assert_eq(zev_stream_send(s, "x", 1, 0), -1);
    cr_assert_eq(errno, EBADF);
    c->s2 = zev_stream_new(zev_stream_loop(s), c->sock2);
    c->err = errno;
    if (c->s2)
        cr_assert_eq(zev_stream_on_close(c->s2, close2, c), 0);
}

/* A close callback that opens a new stream (a reconnect), during an
 * iteration: the new stream works and closes normally. */
Test(reentry_close, new_stream_inside_on_close, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    c.sock2 = p.a;
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_close(s, new_stream_in_close, &c), 0);
    cr_assert_eq(zev_stream_close(s, 0), 0);
    test_run_until_count(p.loop, &c.closes, 1, 5000);
    cr_assert_not_null(c.s2, "zev_stream_new in on_close: %s", zmq_strerror(c.err));
    cr_assert_eq(zev_stream_on_recv(c.s2, recv_seq, &c), 0);
    test_send_seq(p.b, 42);
    test_run_until_count(p.loop, &c.recvs, 1, 5000);
    cr_assert_eq(c.seq[0], 42);
    cr_assert_eq(zev_stream_close(c.s2, 0), 0);
    test_run_until_count(p.loop, &c.closes2, 1, 5000);
    cr_assert_eq(c.closes, 1);
    finish(&p);
}

/* The same during zev_loop_destroy: a stream made by a close callback that
 * destroy runs would outlive the loop (it leaked, registered, its close
 * callback never ran), so zev_stream_new refuses it with EBUSY. */
Test(reentry_close, new_stream_inside_on_close_during_destroy, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    c.sock2 = p.a;
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_close(s, new_stream_in_close, &c), 0);
    test_spin(p.loop, 2, 1);
    zev_loop_destroy(p.loop);
    p.loop = NULL;
    cr_assert_eq(c.closes, 1);
    cr_assert_null(c.s2, "a stream made during destroy would outlive the loop");
    cr_assert_eq(c.err, EBUSY, "%s", zmq_strerror(c.err));
    cr_assert_eq(c.closes2, 0);
    finish(&p);
}

/* ------------------------------------------------- more nesting of passes */

static void close_in_status_then_ebadf(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    if (zev_stream_closed(s)) {
        /* statuses of a closed stream: nothing more is taken */
        cr_assert_eq(zev_stream_flush(s, ZEV_WRITE, 0), -1);
        cr_assert_eq(errno, EBADF);
        cr_assert_eq(zev_stream_on_send(s, NULL, NULL), -1);
        cr_assert_eq(errno, EBADF);
        cr_assert_eq(zev_stream_set_max_queue(s, 1), -1);
        cr_assert_eq(errno, EBADF);
        return;
    }
    cr_assert_eq(zev_stream_close(s, 0), 0);
}

/* A flush called by user code whose on_send closes the stream at the first
 * status: the flush reports the statuses owed when it began (the messages
 * that went straight out) and sends nothing more; the queued ones come
 * ECANCELED in the close phase, once each, before on_close. */
Test(reentry_send, user_flush_whose_on_send_closes, .timeout = 30)
{
    test_pair_t p = push_pair(4);
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.b);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    cr_assert_eq(zev_stream_on_send(s, close_in_status_then_ebadf, &c), 0);
    send_seqs(s, 0, N);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    size_t direct = N - st.queued_msgs;
    cr_assert(direct > 0 && direct < N, "%zu sent at once", direct);
    int rc = zev_stream_flush(s, ZEV_WRITE, 0);
    cr_assert_eq(rc, 0, "flush: %d %s", rc, zmq_strerror(errno));
    cr_assert_eq(zev_stream_closed(s), 1);
    cr_assert_eq(c.statuses, direct, "%zu statuses from the flush", c.statuses);
    test_run_until_count(p.loop, &c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    uint64_t got[N];
    size_t n = raw_drain(p.a, got, N);
    cr_assert_eq(n, direct);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(got[i], i);
    check_statuses_then(&c, N, direct, ECANCELED);
    cr_assert_eq(c.statuses_at_close, N);
    cr_assert_eq(c.closes, 1);
    finish(&p);
}

static void recv_close_second(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    if (c->recvs == 2)
        cr_assert_eq(zev_stream_close(s, 0), 0);
}

static void flush_read_in_status(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    ctx_t *c = arg;
    record_status(c, status);
    if (c->statuses == 1) {
        c->rc = zev_stream_flush(s, ZEV_READ, 0);
        c->err = errno;
    }
}

/* flush(ZEV_READ) from on_send, whose on_recv closes the stream: the
 * receive stops at the close; the statuses still owed come once each. */
Test(reentry_send, flush_read_inside_on_send_closes_in_on_recv, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    for (uint64_t i = 0; i < 5; i++)
        test_send_seq(p.b, i);
    test_sleep_ms(20); /* let inproc deliver: the nested flush must find them */
    cr_assert_eq(zev_stream_on_send(s, flush_read_in_status, &c), 0);
    cr_assert_eq(zev_stream_on_recv(s, recv_close_second, &c), 0);
    send_seqs(s, 100, 103);
    test_run_until_count(p.loop, &c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.rc, 2, "flush(ZEV_READ) in on_send: %d %s", c.rc, zmq_strerror(c.err));
    cr_assert_eq(c.recvs, 2);
    cr_assert_eq(c.seq[0], 0);
    cr_assert_eq(c.seq[1], 1);
    check_statuses_then(&c, 3, 3, 0);
    cr_assert_eq(c.closes, 1);
    for (uint64_t i = 100; i < 103; i++) {
        uint64_t v = 0;
        cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
        cr_assert_eq(v, i);
    }
    finish(&p);
}

typedef struct {
    ctx_t c;
    drain_t d;
} flushclose_t;

static void reply_all_and_close_flush(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    flushclose_t *k = arg;
    k->c.seq[k->c.recvs++] = msg_seq(m);
    send_seqs(s, 0, N);
    k->c.rc = zev_stream_close(s, ZEV_CLOSE_FLUSH);
    k->c.err = errno;
}

/* close(FLUSH) from on_recv with replies queued behind the HWM: with a
 * linger long enough every reply goes out (0 each); with a short one and a
 * peer that never reads, the linger timer cancels the rest (ECANCELED). */
static void close_flush_with_queue(int linger, bool peer_reads)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, 4);
    test_set_int(p.b, ZMQ_RCVHWM, 4);
    test_set_int(p.a, ZMQ_LINGER, linger);
    test_set_int(p.b, ZMQ_LINGER, 0);
    test_bind_connect(p.a, p.b, "inproc");
    flushclose_t k = {.d = {.sock = p.b}};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, reply_all_and_close_flush, &k), 0);
    cr_assert_eq(zev_stream_on_send(s, status_counter, &k.c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &k.c), 0);
    test_send_seq(p.b, 1);
    zev_timer_t *t = peer_reads ? zev_timer_start(p.loop, 1000, 1000, drain_timer, &k.d) : NULL;
    test_run_until_count(p.loop, &k.c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    if (t)
        cr_assert_eq(zev_timer_cancel(t), 0);
    k.d.n += raw_drain(p.b, k.d.got + k.d.n, 4 * N - k.d.n);
    cr_assert_eq(k.c.rc, 0, "close(FLUSH) in on_recv: %s", zmq_strerror(k.c.err));
    cr_assert_eq(k.c.recvs, 1);
    cr_assert_eq(k.c.closes, 1);
    if (peer_reads)
        cr_assert_eq(k.d.n, N, "peer got %zu", k.d.n);
    else
        cr_assert(k.d.n > 0 && k.d.n < N, "peer got %zu", k.d.n);
    for (size_t i = 0; i < k.d.n; i++)
        cr_assert_eq(k.d.got[i], i);
    check_statuses_then(&k.c, N, k.d.n, ECANCELED);
    cr_assert_eq(k.c.statuses_at_close, N);
    finish(&p);
}

Test(reentry_recv, close_flush_with_queue_inside_on_recv, .timeout = 30)
{
    close_flush_with_queue(5000, true);
}

Test(reentry_recv, close_flush_linger_runs_out_inside_on_recv, .timeout = 30)
{
    close_flush_with_queue(50, false);
}

static void zmq_close_in_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    cr_assert_eq(zmq_close(zev_stream_socket(s)), 0);
    cr_assert_eq(zev_stream_send(s, "x", 1, 0), -1);
    c->err = errno;
    c->rc = zev_stream_close(s, 0);
}

/* The socket zmq_closed under the stream from inside on_recv: the send
 * there says so (ENOTSOCK), the stream closes once, nothing else runs. */
Test(reentry_recv, socket_closed_under_stream_inside_on_recv, .timeout = 30)
{
    test_pair_t p = pair_pair();
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, zmq_close_in_recv, &c), 0);
    cr_assert_eq(zev_stream_on_send(s, status_counter, &c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    for (uint64_t i = 0; i < 3; i++)
        test_send_seq(p.b, i);
    test_run_until_count(p.loop, &c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.err, ENOTSOCK, "%s", zmq_strerror(c.err));
    cr_assert_eq(c.rc, 0);
    cr_assert_eq(c.recvs, 1);
    cr_assert_eq(c.statuses, 0);
    cr_assert_eq(c.closes, 1);
    p.a = NULL;
    finish(&p);
}

/* --------------------------------------- what must be refused in callbacks */

typedef struct {
    ctx_t c;
    zev_loop_t *loop;
    size_t checks;
} refuse_t;

static void expect_refused(refuse_t *k)
{
    cr_assert_eq(zev_loop_run_once(k->loop, 0), -1);
    cr_assert_eq(errno, EBUSY);
    cr_assert_eq(zev_loop_run(k->loop), -1);
    cr_assert_eq(errno, EBUSY);
    errno = 0;
    zev_loop_destroy(k->loop);
    cr_assert_eq(errno, EBUSY);
    k->checks++;
}

static void refuse_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    refuse_t *k = arg;
    k->c.seq[k->c.recvs++] = msg_seq(m);
    expect_refused(k);
    uint64_t v = 8;
    cr_assert_eq(zev_stream_send(s, &v, sizeof v, 0), 0);
}

static void refuse_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    refuse_t *k = arg;
    record_status(&k->c, status);
    expect_refused(k);
    cr_assert_eq(zev_stream_close(s, 0), 0);
}

static void refuse_close(zev_stream_t *s, void *arg)
{
    refuse_t *k = arg;
    count_close(s, &k->c);
    expect_refused(k);
}

/* Running or destroying the loop from on_recv, on_send or on_close is
 * refused (EBUSY) and the loop goes on: the reply still goes out. */
Test(reentry_loop, run_and_destroy_refused_inside_callbacks, .timeout = 30)
{
    test_pair_t p = pair_pair();
    refuse_t k = {.loop = p.loop};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, refuse_recv, &k), 0);
    cr_assert_eq(zev_stream_on_send(s, refuse_send, &k), 0);
    cr_assert_eq(zev_stream_on_close(s, refuse_close, &k), 0);
    test_send_seq(p.b, 3);
    test_run_until_count(p.loop, &k.c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(k.checks, 3);
    cr_assert_eq(k.c.recvs, 1);
    check_statuses_then(&k.c, 1, 1, 0);
    uint64_t v = 0;
    cr_assert_eq(zmq_recv(p.b, &v, sizeof v, 0), (int)sizeof v);
    cr_assert_eq(v, 8);
    finish(&p);
}

static void half_then_close_flush(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    ctx_t *c = arg;
    c->seq[c->recvs++] = msg_seq(m);
    cr_assert_eq(zev_stream_send(s, "part1", 5, ZMQ_SNDMORE), 0);
    c->rc = zev_stream_close(s, ZEV_CLOSE_FLUSH);
}

/* close(FLUSH) from on_recv while the callback's own multipart message is
 * unfinished: it can never be finished, so it is reported ECANCELED once
 * and the peer gets nothing of it. */
Test(reentry_recv, close_flush_with_unfinished_multipart_inside_on_recv, .timeout = 30)
{
    test_pair_t p = pair_pair();
    test_set_int(p.a, ZMQ_LINGER, 5000);
    test_set_int(p.b, ZMQ_RCVTIMEO, 100);
    ctx_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, half_then_close_flush, &c), 0);
    cr_assert_eq(zev_stream_on_send(s, status_counter, &c), 0);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    test_send_seq(p.b, 0);
    test_run_until_count(p.loop, &c.closes, 1, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(c.rc, 0);
    cr_assert_eq(c.recvs, 1);
    cr_assert_eq(c.closes, 1);
    check_statuses_then(&c, 1, 0, ECANCELED);
    char buf[16];
    cr_assert_eq(zmq_recv(p.b, buf, sizeof buf, 0), -1);
    cr_assert_eq(errno, EAGAIN);
    finish(&p);
}
