/*
 * Fibers: what an outside review of 80a6b0f broke, one test per finding
 * (each failed on that commit; the finding's number is in the test's
 * comment). Every test runs on the backend under test.
 */
#include "common.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

TestSuite(fiber_review, .timeout = 60);

#define FOREVER (-1)

static zev_loop_t *loop_batch(unsigned batch)
{
    return test_loop_new_opts(batch, 0);
}

/* A PAIR pair over inproc on a loop made by the caller. */
typedef struct pair {
    void *ctx, *a, *b;
} pair_t;

static pair_t pair_open(int hwm)
{
    pair_t p = {.ctx = test_ctx_new()};
    p.a = test_socket(p.ctx, ZMQ_PAIR);
    p.b = test_socket(p.ctx, ZMQ_PAIR);
    if (hwm >= 0) {
        test_set_int(p.a, ZMQ_SNDHWM, hwm);
        test_set_int(p.b, ZMQ_RCVHWM, hwm);
    }
    test_bind_connect(p.a, p.b, "inproc");
    return p;
}

static void pair_close(pair_t *p)
{
    test_close(p->a);
    test_close(p->b);
    zmq_ctx_term(p->ctx);
}

/* Every whole message the peer has now, parts joined with '+', messages
 * with ' | ' (e.g. "cb1+cb2 | F"). */
static void peer_messages(void *sock, char *out, size_t cap)
{
    size_t n = 0;
    out[0] = '\0';
    char buf[32];
    int k;
    while ((k = zmq_recv(sock, buf, sizeof buf - 1, ZMQ_DONTWAIT)) >= 0) {
        buf[k < (int)sizeof buf - 1 ? k : (int)sizeof buf - 1] = '\0';
        int more = 0;
        size_t len = sizeof more;
        zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len);
        n += (size_t)snprintf(out + n, cap - n, "%s%s", buf, more ? "+" : " | ");
        cr_assert_lt(n, cap);
    }
}

/* ---------------------------------------------------------------- 1 */

typedef struct closing {
    zev_stream_t *s;
    int rc, err, sent_rc, sent_err;
} closing_t;

static void recv_twice(void *arg)
{
    closing_t *c = arg;
    zev_msg_t *m;
    cr_assert_eq(zev_fiber_recv(c->s, &m, FOREVER), 0); /* the batch (1) is spent */
    c->rc = zev_fiber_recv(c->s, &m, FOREVER);          /* yields first */
    c->err = errno;
}

static void send_twice(void *arg)
{
    closing_t *c = arg;
    cr_assert_eq(zev_fiber_send(c->s, "x", 1, 0, FOREVER), 0);
    c->sent_rc = zev_fiber_send(c->s, "y", 1, 0, FOREVER);
    c->sent_err = errno;
}

static void closer(void *arg)
{
    zev_stream_close(((closing_t *)arg)->s, 0);
}

/* 1: a fiber yielding in its call (its batch spent) while another fiber
 * closes the stream: EBADF, and no use of the freed stream (ASan). */
Test(fiber_review, a_call_that_yields_holds_the_stream)
{
    pair_t p = pair_open(-1);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(zmq_send(p.b, "m", 1, 0), 1);
    zev_loop_t *loop = loop_batch(1);
    closing_t c = {.s = test_stream_new(loop, p.a), .rc = 99, .sent_rc = 99};
    cr_assert_not_null(zev_fiber_spawn(loop, recv_twice, &c, NULL));
    cr_assert_not_null(zev_fiber_spawn(loop, closer, &c, NULL));
    test_spin(loop, 5, 0);
    cr_assert_eq(c.rc, -1);
    cr_assert_eq(c.err, EBADF, "errno %d", c.err);

    closing_t d = {.s = test_stream_new(loop, p.b), .rc = 99, .sent_rc = 99};
    cr_assert_not_null(zev_fiber_spawn(loop, send_twice, &d, NULL));
    cr_assert_not_null(zev_fiber_spawn(loop, closer, &d, NULL));
    test_spin(loop, 5, 0);
    cr_assert_eq(d.sent_rc, -1);
    cr_assert_eq(d.sent_err, EBADF, "errno %d", d.sent_err);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
    test_expect_no_leaks();
}

/* ---------------------------------------------------------------- 2, 3 */

typedef struct behind {
    zev_stream_t *s;
    int rc;
    int refilled;
    int mode; /* 2: on_send refills the queue; 3: on_send opens a multipart message */
} behind_t;

static void send_f(void *arg)
{
    behind_t *b = arg;
    b->rc = zev_fiber_send(b->s, "F", 1, 0, FOREVER);
}

static void on_send_refill(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)status;
    behind_t *b = arg;
    if (b->refilled || zev_stream_sending(s))
        return;
    b->refilled = 1; /* the queue just drained: the fiber was handed its turn */
    if (b->mode == 2) {
        for (int i = 0; i < 50; i++)
            cr_assert_eq(zev_stream_send(s, "cb", 2, 0), 0);
    } else {
        cr_assert_eq(zev_stream_send(s, "cb1", 3, ZMQ_SNDMORE), 0);
    }
}

static void handed_then_preempted(int mode)
{
    pair_t p = pair_open(2);
    zev_loop_t *loop = test_loop_new();
    int pre = 0;
    while (zmq_send(p.a, "fill", 4, ZMQ_DONTWAIT) == 4)
        pre++;
    behind_t b = {.s = test_stream_new(loop, p.a), .rc = 99, .mode = mode};
    cr_assert_eq(zev_stream_on_send(b.s, on_send_refill, &b), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(zev_stream_send(b.s, "q", 1, 0), 0);
    cr_assert_not_null(zev_fiber_spawn(loop, send_f, &b, NULL));
    test_spin(loop, 5, 0);
    cr_assert_eq(b.rc, 99, "the fiber did not wait behind the queue");
    char buf[16], got[4096];
    size_t total = 0;
    got[0] = '\0';
    int iterations = 0;
    uint64_t t0 = test_ms();
    while (test_ms() - t0 < 300) { /* the peer reads everything, for a while */
        char chunk[1024];
        peer_messages(p.b, chunk, sizeof chunk);
        size_t k = strlen(chunk);
        if (total + k < sizeof got) {
            memcpy(got + total, chunk, k + 1);
            total += k;
        }
        zev_loop_run_once(loop, 10);
        iterations++;
    }
    (void)buf;
    if (mode == 3) {
        cr_assert_eq(b.rc, 99, "the fiber sent inside the callback's open message");
        cr_assert_lt(iterations, 1000, "%d iterations in 300 ms: a busy loop", iterations);
        cr_assert_eq(zev_stream_send(b.s, "cb2", 3, 0), 0); /* the callback's message ends */
        test_spin(loop, 5, 1);
        char chunk[1024];
        peer_messages(p.b, chunk, sizeof chunk);
        strncat(got, chunk, sizeof got - strlen(got) - 1);
        cr_assert(strstr(got, "cb1+cb2 | F | "), "the peer got: %s", got);
    }
    cr_assert_eq(b.rc, 0, "the fiber's send: %d (the stream is idle and writable)", b.rc);
    cr_assert(strstr(got, "F | "), "F never arrived: %s", got);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
    (void)pre;
}

/* 2: the fiber handed POLLOUT finds the queue refilled by on_send before it
 * ran: it gives its turn back instead of waiting with it for ever. */
Test(fiber_review, a_handed_sender_preempted_by_the_queue_is_not_stranded)
{
    handed_then_preempted(2);
}

/* 3: on_send opens a multipart message (straight to libzmq) before the
 * handed fiber runs: the fiber's message waits for its end instead of
 * being glued into it, without a busy loop. */
Test(fiber_review, a_fiber_message_is_never_glued_into_a_callbacks)
{
    handed_then_preempted(3);
}

/* ---------------------------------------------------------------- 4 */

typedef struct builder {
    zev_stream_t *s;
    int after_cancel_rc, after_cancel_err;
    int other_rc;
    int status[8];
    int nstatus;
} builder_t;

static void build_and_sleep(void *arg)
{
    builder_t *b = arg;
    cr_assert_eq(zev_fiber_send(b->s, "a1", 2, ZMQ_SNDMORE, FOREVER), 0);
    zev_fiber_sleep(10000000); /* cancelled here */
    b->after_cancel_rc = zev_fiber_send(b->s, "a2", 2, 0, FOREVER);
    b->after_cancel_err = errno;
}

static void send_other(void *arg)
{
    builder_t *b = arg;
    b->other_rc = zev_fiber_send(b->s, "c", 1, 0, 300000);
}

static void record_status(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    builder_t *b = arg;
    if (b->nstatus < 8)
        b->status[b->nstatus++] = status;
}

/* 4: a fiber cancelled in the middle of its multipart message: when it
 * returns, the message is ended (an empty last part, reported ECANCELED),
 * so callbacks and other fibers send again and nothing is glued onto it,
 * not even by a new fiber at the same address. */
Test(fiber_review, a_builder_that_ends_mid_message_does_not_wedge_the_stream)
{
    pair_t p = pair_open(-1);
    zev_loop_t *loop = test_loop_new();
    builder_t b = {.s = test_stream_new(loop, p.a), .other_rc = 99};
    cr_assert_eq(zev_stream_on_send(b.s, record_status, &b), 0);
    zev_fiber_t *a = zev_fiber_spawn(loop, build_and_sleep, &b, NULL);
    cr_assert_not_null(a);
    cr_assert_eq(zev_fiber_detach(a), 0);
    test_spin(loop, 3, 0);
    cr_assert_eq(zev_fiber_cancel(a), 0);
    test_spin(loop, 3, 0); /* it returns and is freed */
    cr_assert_eq(b.after_cancel_rc, -1);
    cr_assert_eq(b.after_cancel_err, ECANCELED);
    cr_assert_eq(zev_stream_send(b.s, "cb", 2, 0), 0, "a callback's send: %s", strerror(errno));
    cr_assert_not_null(zev_fiber_spawn(loop, send_other, &b, NULL)); /* maybe at a's address */
    for (int i = 0; i < 20 && b.other_rc == 99; i++)
        zev_loop_run_once(loop, 10);
    cr_assert_eq(b.other_rc, 0);
    char got[256];
    test_sleep_ms(5);
    peer_messages(p.b, got, sizeof got);
    cr_assert_str_eq(got, "a1+ | cb | c | ");
    test_spin(loop, 2, 0);
    cr_assert_eq(b.nstatus, 3);
    cr_assert_eq(b.status[0], ECANCELED, "the ended message: %d", b.status[0]);
    cr_assert_eq(b.status[1], 0);
    cr_assert_eq(b.status[2], 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

/* ---------------------------------------------------------------- 5 */

typedef struct pollers {
    zev_stream_t *s;
    short events;
    int rc[2];
    short revents[2];
    int recv_rc;
} pollers_t;

typedef struct poller_arg {
    pollers_t *p;
    int i;
} poller_arg_t;

static void poll_one(void *arg)
{
    poller_arg_t *pa = arg;
    zev_fiber_pollitem_t it = {.stream = pa->p->s, .events = pa->p->events};
    pa->p->rc[pa->i] = zev_fiber_poll(&it, 1, 2000000);
    pa->p->revents[pa->i] = it.revents;
}

static void recv_now(void *arg)
{
    pollers_t *p = arg;
    zev_msg_t *m;
    zev_fiber_yield(); /* the pollers wait first */
    p->recv_rc = zev_fiber_recv(p->s, &m, 0);
}

/* 5: two fibers polling one stream both see it ready (no livelock), and a
 * receive with timeout 0 beside them takes the message that is there. */
Test(fiber_review, pollers_of_one_stream_all_see_it_ready)
{
    for (int w = 0; w < 2; w++) {
        pair_t p = pair_open(-1);
        zev_loop_t *loop = test_loop_new();
        pollers_t ps = {.s = test_stream_new(loop, p.a),
                        .events = w ? ZEV_WRITE : ZEV_READ,
                        .rc = {99, 99},
                        .recv_rc = 99};
        poller_arg_t pa[2] = {{&ps, 0}, {&ps, 1}};
        for (int i = 0; i < 2; i++)
            cr_assert_not_null(zev_fiber_spawn(loop, poll_one, &pa[i], NULL));
        test_spin(loop, 3, 0);
        if (!w)
            cr_assert_eq(zmq_send(p.b, "m", 1, 0), 1);
        for (int i = 0; i < 50 && (ps.rc[0] == 99 || ps.rc[1] == 99); i++)
            zev_loop_run_once(loop, 10);
        for (int i = 0; i < 2; i++) {
            cr_assert_eq(ps.rc[i], 1, "poller %d (%s): %d", i, w ? "WRITE" : "READ", ps.rc[i]);
            cr_assert_eq(ps.revents[i], ps.events);
        }
        if (!w) { /* a poller waits again; a receive beside it gets the message */
            pa[0].i = 0;
            ps.rc[0] = 99;
            cr_assert_not_null(zev_fiber_spawn(loop, poll_one, &pa[0], NULL));
            cr_assert_not_null(zev_fiber_spawn(loop, recv_now, &ps, NULL));
            test_spin(loop, 4, 0);
            cr_assert_eq(ps.recv_rc, 0, "recv(timeout 0) beside a poller: %d", ps.recv_rc);
        }
        cr_assert_eq(zev_loop_destroy(loop), 0);
        pair_close(&p);
    }
}

/* ---------------------------------------------------------------- 6 */

typedef struct twice {
    zev_loop_t *loop;
    zev_stream_t *s;
    zev_tracker_t *t;
    int calls;
    int done;
} twice_t;

static char zc_buf[4096];

static void count_done(zev_tracker_t *t, void *arg)
{
    (void)t;
    ((twice_t *)arg)->calls++;
}

static void on_done_twice(void *arg)
{
    twice_t *w = arg;
    if (zev_stream_send_zc(w->s, zc_buf, sizeof zc_buf, NULL, NULL, &w->t) < 0)
        return;
    while (!zev_tracker_done(w->t))
        zev_fiber_sleep(100);
    zev_tracker_on_done(w->t, count_done, w);
    zev_tracker_on_done(w->t, count_done, w);
    for (int i = 0; i < 3; i++)
        zev_fiber_yield();
    w->done = 1;
}

/* 6: zev_tracker_on_done twice from a fiber on a completed tracker: two
 * calls, as outside fibers, and no corrupted queue (ASan). */
Test(fiber_review, on_done_twice_from_a_fiber)
{
    pair_t p = pair_open(-1);
    zev_loop_t *loop = test_loop_new();
    twice_t w = {.loop = loop, .s = test_stream_new(loop, p.a)};
    cr_assert_not_null(zev_fiber_spawn(loop, on_done_twice, &w, NULL));
    char buf[4096];
    for (int i = 0; i < 200 && !w.done; i++) {
        zmq_recv(p.b, buf, sizeof buf, ZMQ_DONTWAIT);
        zev_loop_run_once(loop, 10);
    }
    cr_assert_eq(w.done, 1);
    cr_assert_eq(w.calls, 2);
    zev_tracker_release(w.t);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
    test_expect_no_leaks();
}

/* ---------------------------------------------------------------- 7 */

typedef struct busy {
    zev_stream_t *s;
    zev_fiber_t *child;
    int pipe[2];
    int done;
    int ticks;
} busy_t;

static void tick(zev_timer_t *t, void *arg)
{
    (void)t;
    ((busy_t *)arg)->ticks++;
}

static void sleepy_child(void *arg)
{
    (void)arg;
    zev_fiber_sleep(2000);
}

static void busy_loops(void *arg)
{
    busy_t *b = arg;
    zev_fiber_pollitem_t it = {.stream = b->s, .events = ZEV_READ};
    while (zev_fiber_poll(&it, 1, 0) == 0) /* the message comes from a timer */
        ;
    while (zev_fiber_join(b->child, 0) < 0 && errno == ETIMEDOUT)
        ;
    for (int i = 0; i < 100000; i++) /* ready at once, every time */
        zev_fiber_wait_fd(b->pipe[1], ZEV_WRITE, 0);
    b->done = 1;
}

static void send_from_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    cr_assert_eq(zmq_send(arg, "m", 1, 0), 1);
}

/* 7: poll, join and wait_fd that do not wait count against the batch: the
 * loop goes on (timers fire), so busy-waiting on them terminates. */
Test(fiber_review, calls_that_do_not_wait_let_the_loop_run)
{
    pair_t p = pair_open(-1);
    zev_loop_t *loop = test_loop_new();
    busy_t b = {.s = test_stream_new(loop, p.a)};
    test_pipe(b.pipe);
    b.child = zev_fiber_spawn(loop, sleepy_child, NULL, NULL);
    cr_assert_not_null(b.child);
    cr_assert_not_null(zev_fiber_spawn(loop, busy_loops, &b, NULL));
    cr_assert_not_null(zev_timer_start(loop, 2000, 0, send_from_timer, p.b));
    cr_assert_not_null(zev_timer_start(loop, 0, 100, tick, &b));
    test_run_until(loop, &b.done, 20000);
    cr_assert_gt(b.ticks, 10, "a 100 us timer ran %d times beside 100,000 ready wait_fd calls",
                 b.ticks);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    close(b.pipe[0]);
    close(b.pipe[1]);
    pair_close(&p);
}

/* ---------------------------------------------------------------- 8 */

typedef struct flushing {
    zev_stream_t *s;
    int recv_rc, recv_err, poll_rc;
} flushing_t;

static void recv_forever(void *arg)
{
    flushing_t *f = arg;
    zev_msg_t *m;
    f->recv_rc = zev_fiber_recv(f->s, &m, FOREVER);
    f->recv_err = errno;
}

static void poll_forever(void *arg)
{
    flushing_t *f = arg;
    zev_fiber_pollitem_t it = {.stream = f->s, .events = ZEV_READ};
    f->poll_rc = zev_fiber_poll(&it, 1, FOREVER);
}

/* 8: a flushing close (linger -1, a message the peer never takes) wakes the
 * fibers waiting on the stream at once with EBADF, not when the flush
 * ends (never, here). */
Test(fiber_review, a_flushing_close_wakes_waiting_fibers_at_once)
{
    pair_t p = pair_open(1);
    test_set_int(p.a, ZMQ_LINGER, -1);
    zev_loop_t *loop = test_loop_new();
    flushing_t f = {.s = test_stream_new(loop, p.a), .recv_rc = 99, .poll_rc = 99};
    while (zmq_send(p.a, "fill", 4, ZMQ_DONTWAIT) == 4)
        ;
    cr_assert_eq(zev_stream_send(f.s, "queued", 6, 0), 0); /* waits in the queue */
    cr_assert_not_null(zev_fiber_spawn(loop, recv_forever, &f, NULL));
    cr_assert_not_null(zev_fiber_spawn(loop, poll_forever, &f, NULL));
    test_spin(loop, 3, 0);
    cr_assert_eq(zev_stream_close(f.s, ZEV_CLOSE_FLUSH), 0);
    test_spin(loop, 3, 0);
    cr_assert_eq(f.recv_rc, -1);
    cr_assert_eq(f.recv_err, EBADF);
    cr_assert_eq(f.poll_rc, 1);
    test_set_int(p.a, ZMQ_LINGER, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

/* ---------------------------------------------------------------- 9 */

typedef struct fdwait {
    int pipe[2];
    int woke;
} fdwait_t;

static void wait_pipe(void *arg)
{
    fdwait_t *w = arg;
    if (zev_fiber_wait_fd(w->pipe[0], ZEV_READ, FOREVER) == ZEV_READ)
        w->woke = 1;
}

static void firehose_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (*(size_t *)arg)++;
}

/* 9: a fiber waiting for an fd beside a stream that always has work (a
 * backlog beyond one batch, so the loop never needs to block) is woken as
 * soon as the fd is ready: the backend is polled for fiber fds too. */
Test(fiber_review, a_fiber_fd_wait_is_not_starved_by_a_busy_stream)
{
    pair_t p = {.ctx = test_ctx_new()};
    p.a = test_socket(p.ctx, ZMQ_PAIR);
    p.b = test_socket(p.ctx, ZMQ_PAIR);
    test_set_int(p.a, ZMQ_RCVHWM, 0); /* b -> a unbounded: the backlog fits */
    test_set_int(p.b, ZMQ_SNDHWM, 0);
    test_bind_connect(p.a, p.b, "inproc");
    zev_loop_t *loop = test_loop_new();
    size_t got = 0;
    zev_stream_t *s = test_stream_new(loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, firehose_recv, &got), 0);
    for (int i = 0; i < 200000; i++)
        cr_assert_eq(zmq_send(p.b, "f", 1, 0), 1);
    fdwait_t w = {0};
    test_pipe(w.pipe);
    cr_assert_not_null(zev_fiber_spawn(loop, wait_pipe, &w, NULL));
    test_spin(loop, 3, 0);
    cr_assert_eq(write(w.pipe[1], "x", 1), 1);
    int iterations = 0;
    while (!w.woke && iterations < 50) {
        zev_loop_run_once(loop, 0);
        iterations++;
    }
    cr_assert_eq(w.woke, 1, "not woken in %d iterations (%zu messages meanwhile)", iterations, got);
    cr_assert_lt(got, 200000, "the backlog ran out first: the test proves nothing");
    cr_assert_eq(zev_loop_destroy(loop), 0);
    close(w.pipe[0]);
    close(w.pipe[1]);
    pair_close(&p);
}

/* ---------------------------------------------------------------- 10 */

typedef struct kept {
    zev_stream_t *s;
    zev_fiber_t *child;
    int pipe[2];
    int bad;
    char which[128];
    int done;
} kept_t;

#define EXPECT_ERRNO_KEPT(k, expr, name)                                                           \
    do {                                                                                           \
        errno = 4242;                                                                              \
        int rc_ = (expr);                                                                          \
        if (rc_ < 0 || errno != 4242) {                                                            \
            (k)->bad++;                                                                            \
            strncat((k)->which, name " ", sizeof(k)->which - strlen((k)->which) - 1);              \
        }                                                                                          \
    } while (0)

static void errno_child(void *arg)
{
    (void)arg;
    zev_fiber_sleep(1000);
}

static void errno_calls(void *arg)
{
    kept_t *k = arg;
    zev_msg_t *m;
    zev_fiber_pollitem_t it = {.stream = k->s, .events = ZEV_READ};
    EXPECT_ERRNO_KEPT(k, zev_fiber_sleep(100), "sleep");
    EXPECT_ERRNO_KEPT(k, zev_fiber_yield(), "yield");
    EXPECT_ERRNO_KEPT(k, zev_fiber_recv(k->s, &m, FOREVER), "recv(waited)");
    EXPECT_ERRNO_KEPT(k, zev_fiber_poll(&it, 1, FOREVER), "poll(waited)");
    EXPECT_ERRNO_KEPT(k, zev_fiber_recv(k->s, &m, 0), "recv(at once)");
    EXPECT_ERRNO_KEPT(k, zev_fiber_wait_fd(k->pipe[0], ZEV_READ, FOREVER), "wait_fd(waited)");
    EXPECT_ERRNO_KEPT(k, zev_fiber_send(k->s, "x", 1, 0, FOREVER), "send");
    EXPECT_ERRNO_KEPT(k, zev_fiber_join(k->child, FOREVER), "join(waited)");
    k->done = 1;
}

static void send_two(zev_timer_t *t, void *arg)
{
    (void)t;
    cr_assert_eq(zmq_send(arg, "1", 1, 0), 1);
    test_sleep_ms(1);
    cr_assert_eq(zmq_send(arg, "2", 1, 0), 1);
    cr_assert_eq(zmq_send(arg, "3", 1, 0), 1);
}

static void write_pipe(zev_timer_t *t, void *arg)
{
    (void)t;
    cr_assert_eq(write(((kept_t *)arg)->pipe[1], "x", 1), 1);
}

/* 10: a call that succeeds leaves errno as the fiber had it, also when it
 * waited (the loop and its own first try set EAGAIN meanwhile). */
Test(fiber_review, successful_calls_leave_errno_alone)
{
    pair_t p = pair_open(-1);
    zev_loop_t *loop = test_loop_new();
    kept_t k = {.s = test_stream_new(loop, p.a)};
    test_pipe(k.pipe);
    k.child = zev_fiber_spawn(loop, errno_child, NULL, NULL);
    cr_assert_not_null(k.child);
    cr_assert_not_null(zev_fiber_spawn(loop, errno_calls, &k, NULL));
    cr_assert_not_null(zev_timer_start(loop, 3000, 0, send_two, p.b));
    cr_assert_not_null(zev_timer_start(loop, 8000, 0, write_pipe, &k));
    test_run_until(loop, &k.done, 10000);
    cr_assert_eq(k.bad, 0, "errno changed by: %s", k.which);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    close(k.pipe[0]);
    close(k.pipe[1]);
    pair_close(&p);
}

/* ---------------------------------------------------------------- 11 */

static void big_frame(void *arg)
{
    (void)arg;
    volatile char big[70 * 1024]; /* one frame larger than a page: past a one-page guard */
    __asm__ volatile("" : : "r"(big) : "memory"); /* the whole array exists (clang) */
    big[0] = 1;
    big[sizeof big - 1] = 2;
}

static void child_big_frame(void)
{
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop || !zev_fiber_spawn(loop, big_frame, NULL, NULL))
        _exit(3);
    zev_loop_run_once(loop, 0);
    _exit(5); /* survived: it wrote into whatever lay below its stack */
}

/* 11: a frame larger than a page lands in the (64 KiB) guard, not in the
 * stack mapped below: a reported death, never silent corruption. */
Test(fiber_review, a_big_frame_hits_the_guard, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_big_frame, &r);
    if (test_asan()) {
        cr_assert(!(WIFEXITED(r.status) && WEXITSTATUS(r.status) == 5), "survived:\n%s", r.err);
    } else {
        cr_assert(test_died_of_segv(r.status), "status %#x; stderr:\n%s", r.status, r.err);
        cr_assert(strstr(r.err, "zev: fiber stack overflow"), "stderr:\n%s", r.err);
    }
}

/* ---------------------------------------------------------------- 12 */

static int chain_left, chain_ran;

static void chain_link(void *arg)
{
    zev_loop_t *loop = arg;
    chain_ran++;
    if (--chain_left > 0)
        zev_fiber_detach(zev_fiber_spawn(loop, chain_link, loop, NULL));
}

/* 12: a fiber spawned during the fiber phase runs in the next iteration:
 * a chain of fibers each spawning the next cannot hold one iteration. */
Test(fiber_review, a_spawn_chain_runs_one_link_per_iteration)
{
    zev_loop_t *loop = test_loop_new();
    chain_left = 1000;
    chain_ran = 0;
    cr_assert_eq(zev_fiber_detach(zev_fiber_spawn(loop, chain_link, loop, NULL)), 0);
    zev_loop_run_once(loop, 0);
    cr_assert_eq(chain_ran, 1, "one iteration ran %d fibers of the chain", chain_ran);
    zev_loop_run_once(loop, 0);
    cr_assert_eq(chain_ran, 2);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    test_expect_no_leaks();
}

/* ---------------------------------------------------------------- 13 */

typedef struct mpstatus {
    zev_stream_t *s;
    char ep[128];
    int last_rc, last_err;
    int status;
    int done;
} mpstatus_t;

static void mp_on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    ((mpstatus_t *)arg)->status = status;
}

static void mp_builder(void *arg)
{
    mpstatus_t *m = arg;
    cr_assert_eq(zev_fiber_send(m->s, "p1", 2, ZMQ_SNDMORE, FOREVER), 0);
    cr_assert_eq(zev_stream_disconnect(m->s, m->ep), 0); /* the pipe goes mid-message */
    m->last_rc = zev_fiber_send(m->s, "p2", 2, 0, FOREVER);
    m->last_err = errno;
    m->done = 1;
}

/* 13: a multipart message built over several calls: the last call's
 * result is the status on_send reports for it. */
Test(fiber_review, the_last_parts_call_agrees_with_on_send)
{
    void *ctx = test_ctx_new();
    void *a = test_socket(ctx, ZMQ_DEALER), *b = test_socket(ctx, ZMQ_DEALER);
    mpstatus_t m = {.status = 99};
    test_bind_ep(b, "inproc", m.ep, sizeof m.ep);
    cr_assert_eq(zmq_connect(a, m.ep), 0);
    zev_loop_t *loop = test_loop_new();
    m.s = test_stream_new(loop, a);
    cr_assert_eq(zev_stream_on_send(m.s, mp_on_send, &m), 0);
    cr_assert_not_null(zev_fiber_spawn(loop, mp_builder, &m, NULL));
    test_run_until(loop, &m.done, 5000);
    test_spin(loop, 3, 1);
    cr_assert_neq(m.status, 99, "no status");
    if (m.status == 0)
        cr_assert_eq(m.last_rc, 0);
    else
        cr_assert(m.last_rc == -1 && m.last_err == m.status, "call %d/%d, on_send %d", m.last_rc,
                  m.last_err, m.status);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    test_close(a);
    test_close(b);
    zmq_ctx_term(ctx);
}

/* ---------------------------------------------------------------- 14, 15, 16 */

typedef struct misc {
    zev_stream_t *s;
    int rc;
    int kept;
    zev_frame_t *frames[16];
    int done;
} misc_t;

static void wait_recv(void *arg)
{
    misc_t *m = arg;
    zev_msg_t *msg;
    m->rc = zev_fiber_recv(m->s, &msg, 300000);
}

static void ignore(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (void)arg;
}

/* 14: on_recv cannot be set while fibers receive from the stream. */
Test(fiber_review, on_recv_is_refused_while_fibers_wait)
{
    pair_t p = pair_open(-1);
    zev_loop_t *loop = test_loop_new();
    misc_t m = {.s = test_stream_new(loop, p.a), .rc = 99};
    cr_assert_not_null(zev_fiber_spawn(loop, wait_recv, &m, NULL));
    test_spin(loop, 2, 0);
    errno = 0;
    cr_assert_eq(zev_stream_on_recv(m.s, ignore, NULL), -1);
    cr_assert_eq(errno, EBUSY);
    cr_assert_eq(zmq_send(p.b, "m", 1, 0), 1);
    for (int i = 0; i < 50 && m.rc == 99; i++)
        zev_loop_run_once(loop, 10);
    cr_assert_eq(m.rc, 0, "the waiting fiber got %d", m.rc);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

static void keep_all(void *arg)
{
    misc_t *m = arg;
    while (m->kept < 10) {
        zev_msg_t *msg;
        if (zev_fiber_recv(m->s, &msg, 200000) < 0)
            break;
        m->frames[m->kept++] = zev_msg_keep(msg, 0);
    }
    m->done = 1;
}

/* 15: max_frames holds fibers back too: a fiber keeping every frame gets
 * no more than the bound until frames are released. */
Test(fiber_review, max_frames_applies_to_fibers)
{
    pair_t p = pair_open(-1);
    zev_loop_t *loop = test_loop_new();
    misc_t m = {.s = test_stream_new(loop, p.a)};
    cr_assert_eq(zev_stream_set_max_frames(m.s, 2), 0);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(zmq_send(p.b, "0123456789012345678901234567890123456789", 40, 0), 40);
    cr_assert_not_null(zev_fiber_spawn(loop, keep_all, &m, NULL));
    test_run_until(loop, &m.done, 5000);
    cr_assert_eq(m.kept, 2, "a fiber kept %d frames past max_frames 2", m.kept);
    for (int i = 0; i < m.kept; i++)
        zev_frame_release(m.frames[i]);
    test_spin(loop, 2, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

static void builder_polls(void *arg)
{
    misc_t *m = arg;
    cr_assert_eq(zev_fiber_send(m->s, "p1", 2, ZMQ_SNDMORE, FOREVER), 0);
    zev_fiber_pollitem_t it = {.stream = m->s, .events = ZEV_WRITE};
    uint64_t t0 = test_clock_ns();
    m->rc = zev_fiber_poll(&it, 1, 300000);
    m->kept = (int)((test_clock_ns() - t0) / 1000000);
    cr_assert_eq(zev_fiber_send(m->s, "p2", 2, 0, 0), 0);
    m->done = 1;
}

/* 16: the fiber building a message polls its stream for ZEV_WRITE: its
 * next part goes at once, so the poll says so at once. */
Test(fiber_review, a_builder_polling_for_write_is_ready)
{
    pair_t p = pair_open(-1);
    zev_loop_t *loop = test_loop_new();
    misc_t m = {.s = test_stream_new(loop, p.a), .rc = 99};
    cr_assert_not_null(zev_fiber_spawn(loop, builder_polls, &m, NULL));
    test_run_until(loop, &m.done, 5000);
    cr_assert_eq(m.rc, 1);
    cr_assert_lt(m.kept, 100, "poll took %d ms", m.kept);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

/* ---------------------------------------------------------------- 17 */

static zev_loop_t *moved;
static int moved_steps;

static void stepper(void *arg)
{
    (void)arg;
    while (zev_fiber_sleep(100) == 0)
        moved_steps++;
}

static void *run_some(void *arg)
{
    (void)arg;
    for (int i = 0; i < 100; i++)
        zev_loop_run_once(moved, 1);
    return NULL;
}

/* 17: a loop with fibers moved from one thread to another between runs:
 * its fibers go on (under TSan too: the scheduler's context is taken
 * afresh on each thread). */
Test(fiber_review, fibers_follow_their_loop_to_another_thread)
{
    moved = test_loop_new();
    moved_steps = 0;
    cr_assert_not_null(zev_fiber_spawn(moved, stepper, NULL, NULL));
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, run_some, NULL), 0);
    pthread_join(t, NULL);
    int first = moved_steps;
    cr_assert_eq(pthread_create(&t, NULL, run_some, NULL), 0);
    pthread_join(t, NULL);
    cr_assert_gt(first, 10);
    cr_assert_gt(moved_steps - first, 10);
    cr_assert_eq(zev_loop_destroy(moved), 0);
}

static __attribute__((noinline)) int recurse(int n)
{
    volatile char pad[512];
    pad[0] = (char)n;
    return n ? recurse(n - 1) + pad[0] : 0;
}

static void overflow_fiber(void *arg)
{
    (void)arg;
    recurse(1000000);
}

static void *run_once_thread(void *arg)
{
    zev_loop_run_once(arg, 0);
    return NULL;
}

static void child_overflow_elsewhere(void)
{
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop || !zev_fiber_spawn(loop, overflow_fiber, NULL, NULL))
        _exit(3);
    pthread_t t; /* the fiber runs on a thread that never got a stack */
    pthread_create(&t, NULL, run_once_thread, loop);
    pthread_join(t, NULL);
    _exit(5);
}

/* 17: an overflow on a thread other than the one that spawned the fiber is
 * reported as well (that thread gets its alternate signal stack when it
 * runs fibers). */
Test(fiber_review, an_overflow_on_another_thread_is_reported, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_overflow_elsewhere, &r);
    if (test_asan()) {
        cr_assert(strstr(r.err, "stack-overflow"), "stderr:\n%s", r.err);
    } else {
        cr_assert(test_died_of_segv(r.status), "status %#x; stderr:\n%s", r.status, r.err);
        cr_assert(strstr(r.err, "zev: fiber stack overflow"), "stderr:\n%s", r.err);
    }
}

/* ---------------------------------------------------------------- 18 */

typedef struct nested {
    zev_loop_t *inner;
    zev_fiber_t *self_before, *self_after;
    int inner_ran;
    int sleep_rc;
    int done;
} nested_t;

static void inner_fiber(void *arg)
{
    ((nested_t *)arg)->inner_ran = 1;
}

static void outer_fiber(void *arg)
{
    nested_t *n = arg;
    n->self_before = zev_fiber_self();
    cr_assert_not_null(zev_fiber_spawn(n->inner, inner_fiber, n, NULL));
    zev_loop_run_once(n->inner, 0);
    n->self_after = zev_fiber_self();
    n->sleep_rc = zev_fiber_sleep(10);
    n->done = 1;
}

/* 18: a fiber of one loop runs an iteration of another loop with fibers:
 * afterwards it is still itself (zev_fiber_self, its blocking calls). */
Test(fiber_review, a_fiber_running_another_loop_stays_itself)
{
    zev_loop_t *outer = test_loop_new();
    nested_t n = {.inner = test_loop_new(), .sleep_rc = 99};
    zev_fiber_t *f = zev_fiber_spawn(outer, outer_fiber, &n, NULL);
    cr_assert_not_null(f);
    test_run_until(outer, &n.done, 5000);
    cr_assert_eq(n.inner_ran, 1);
    cr_assert_eq(n.self_before, f);
    cr_assert_eq(n.self_after, f);
    cr_assert_eq(n.sleep_rc, 0);
    cr_assert_eq(zev_loop_destroy(n.inner), 0);
    cr_assert_eq(zev_loop_destroy(outer), 0);
}

/* ============================================================
 * Review of 019092d (fibers): one test per finding, each failed on that
 * commit.
 * ============================================================ */

/* A message of n parts, part k holding (tag, k). */
static void send_tagged(void *sock, unsigned tag, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        unsigned buf[2] = {tag, (unsigned)k};
        cr_assert_eq(zmq_send(sock, buf, sizeof buf, k + 1 < n ? ZMQ_SNDMORE : 0), (int)sizeof buf);
    }
}

/* The tag of a whole, well-formed message of send_tagged, else -1. */
static long tagged_tag(zev_msg_t *m, size_t *nparts)
{
    size_t n = zev_msg_parts(m);
    *nparts = n;
    unsigned tag = 0;
    for (size_t k = 0; k < n; k++) {
        if (zev_msg_size(m, k) != 2 * sizeof(unsigned))
            return -1;
        unsigned v[2];
        memcpy(v, zev_msg_data(m, k), sizeof v);
        if (k == 0)
            tag = v[0];
        if (v[0] != tag || v[1] != k)
            return -1;
    }
    return tag;
}

typedef struct hook_detach {
    int detached, detach_rc;
} hook_detach_t;

static void slow_body(void *arg)
{
    (void)arg;
    test_sleep_ms(3); /* slow, then returns */
}

static void detaching_hook(zev_loop_t *l, const zev_slow_t *slow, void *arg)
{
    (void)l;
    hook_detach_t *h = arg;
    if (slow->kind == ZEV_SLOW_FIBER && !h->detached) {
        h->detached = 1;
        h->detach_rc = zev_fiber_detach((zev_fiber_t *)slow->what);
    }
}

/* r2-a: the slow hook detaches the fiber it reports, which has just
 * returned: the fiber is freed once, after the hook (was a heap
 * use-after-free and double free in resume). */
Test(fiber_review, slow_hook_detaches_the_fiber_that_returned)
{
    zev_loop_t *loop = test_loop_new();
    hook_detach_t h = {0};
    cr_assert_eq(zev_loop_on_slow(loop, 1000, detaching_hook, &h), 0);
    cr_assert_not_null(zev_fiber_spawn(loop, slow_body, NULL, NULL));
    test_spin(loop, 3, 0);
    cr_assert_eq(h.detached, 1);
    cr_assert_eq(h.detach_rc, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
}

typedef struct zero_recv {
    zev_loop_t *loop;
    zev_stream_t *s;
    int rc0, err0, rc;
    uint64_t iters0;
    long tag;
    size_t n;
    int done;
} zero_recv_t;

static void zero_then_wait(void *arg)
{
    zero_recv_t *z = arg;
    zev_loop_stats_t a, b;
    zev_loop_stats(z->loop, &a);
    zev_msg_t *m;
    z->rc0 = zev_fiber_recv(z->s, &m, 0);
    z->err0 = errno;
    zev_loop_stats(z->loop, &b);
    z->iters0 = b.iterations - a.iterations;
    z->rc = zev_fiber_recv(z->s, &m, 2000000); /* the rest, and the message whole */
    if (z->rc == 0)
        z->tag = tagged_tag(m, &z->n);
    z->done = 1;
}

/* r2-b: timeout 0 ("do not wait") on a message longer than one pass
 * (60,000 parts): EAGAIN without suspending the fiber; the parts taken
 * stay for the next call, which gets the message whole (it suspended the
 * fiber over 14 iterations and then returned the message). */
Test(fiber_review, recv_timeout_zero_does_not_wait_for_a_long_message)
{
    pair_t p = pair_open(0);
    send_tagged(p.b, 5, 60000);
    zev_loop_t *loop = test_loop_new();
    zero_recv_t z = {.loop = loop, .s = test_stream_new(loop, p.a), .rc0 = 99, .rc = 99};
    cr_assert_not_null(zev_fiber_spawn(loop, zero_then_wait, &z, NULL));
    test_run_until(loop, &z.done, 10000);
    cr_assert_eq(z.rc0, -1);
    cr_assert_eq(z.err0, EAGAIN, "errno %d", z.err0);
    cr_assert_eq(z.iters0, 0, "suspended over %llu iterations", (unsigned long long)z.iters0);
    cr_assert_eq(z.rc, 0);
    cr_assert_eq(z.tag, 5);
    cr_assert_eq(z.n, 60000);
    zev_stream_close(z.s, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

typedef struct timed_recv {
    zev_stream_t *s;
    int rc, err;
    uint64_t took_ms;
    int done;
} timed_recv_t;

static void recv_20ms(void *arg)
{
    timed_recv_t *t = arg;
    zev_msg_t *m;
    uint64_t t0 = test_ms();
    t->rc = zev_fiber_recv(t->s, &m, 20000);
    t->err = errno;
    t->took_ms = test_ms() - t0;
    t->done = 1;
}

static void slow_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
    test_sleep_ms(1); /* the rest of the loop takes its time */
}

/* r2-b: a 20 ms recv while oversized messages (over max_parts, dropped)
 * keep the stream busy for seconds: EAGAIN after about 20 ms (it returned
 * only once all of them were dropped). */
Test(fiber_review, recv_timeout_bounds_the_call_while_messages_are_dropped)
{
    pair_t p = pair_open(0);
    for (unsigned i = 0; i < 400; i++)
        send_tagged(p.b, 7, 100);
    zev_loop_t *loop = loop_batch(1); /* 64 parts a pass: 625 passes */
    timed_recv_t t = {.s = test_stream_new(loop, p.a), .rc = 99};
    cr_assert_eq(zev_stream_set_max_parts(t.s, 10), 0);
    zev_timer_t *tick = zev_timer_new(loop, slow_tick, NULL);
    cr_assert_not_null(tick);
    cr_assert_eq(zev_timer_arm(tick, 1, 1), 0);
    cr_assert_not_null(zev_fiber_spawn(loop, recv_20ms, &t, NULL));
    test_run_until(loop, &t.done, 10000);
    cr_assert_eq(t.rc, -1);
    cr_assert_eq(t.err, EAGAIN, "errno %d", t.err);
    cr_assert_lt(t.took_ms, 300, "took %llu ms", (unsigned long long)t.took_ms);
    zev_timer_free(tick);
    zev_stream_close(t.s, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

typedef struct long_fifo {
    zev_stream_t *s;
    long tag[2];
    size_t n[2];
    int done;
} long_fifo_t;

static zev_loop_t *long_fifo_loop;

static void long_receiver(long_fifo_t *l, int who)
{
    zev_msg_t *m;
    if (zev_fiber_recv(l->s, &m, FOREVER) == 0)
        l->tag[who] = tagged_tag(m, &l->n[who]);
    l->done++;
}

static void receiver_a(void *arg)
{
    long_receiver(arg, 0);
}

static void receiver_b(void *arg)
{
    long_receiver(arg, 1);
}

static void spawn_b(zev_timer_t *t, void *arg)
{
    (void)t;
    cr_assert_not_null(zev_fiber_spawn(long_fifo_loop, receiver_b, arg, NULL));
}

/* r2-c: fiber A began receiving message 1 (10,000 parts, taken over several
 * passes); fiber B calls recv while A is between pieces. FIFO, one message
 * each: A gets message 1, B message 2 (B took the rest of message 1). */
Test(fiber_review, the_fiber_that_began_a_long_message_gets_it)
{
    pair_t p = pair_open(0);
    send_tagged(p.b, 1, 10000);
    send_tagged(p.b, 2, 5);
    zev_loop_t *loop = test_loop_new();
    long_fifo_t l = {.s = test_stream_new(loop, p.a), .tag = {-9, -9}};
    long_fifo_loop = loop;
    cr_assert_not_null(zev_fiber_spawn(loop, receiver_a, &l, NULL));
    zev_loop_run_once(loop, 0); /* A takes the first piece, yields */
    /* B comes while A is mid-message */
    cr_assert_not_null(zev_timer_start(loop, 0, 0, spawn_b, &l));
    uint64_t end = test_ms() + 10000;
    while (l.done < 2 && test_ms() < end)
        zev_loop_run_once(loop, 10);
    cr_assert_eq(l.done, 2);
    cr_assert_eq(l.tag[0], 1, "A got %ld", l.tag[0]);
    cr_assert_eq(l.n[0], 10000);
    cr_assert_eq(l.tag[1], 2, "B got %ld", l.tag[1]);
    cr_assert_eq(l.n[1], 5);
    zev_stream_close(l.s, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
}

typedef struct mixed {
    zev_stream_t *s;
    size_t n;
    long tags[8];
    size_t parts[8];
    int done;
} mixed_t;

static void recv_mixed(void *arg)
{
    mixed_t *x = arg;
    zev_msg_t *m;
    for (size_t i = 0; i < x->n; i++) {
        if (zev_fiber_recv(x->s, &m, FOREVER) != 0)
            break;
        x->tags[i] = tagged_tag(m, &x->parts[i]);
    }
    x->done = 1;
}

/* The receive fast path (the same fiber on the same stream again) over
 * messages of every length: a long one that grows the ring past its kept
 * size, then shorter ones whose slots it overwrites (the longer message's
 * rest closed, ASan's leak check), each whole. */
Test(fiber_review, recv_again_over_long_and_short_messages)
{
    pair_t p = pair_open(0);
    static const size_t lens[] = {3, 3000, 1, 10, 2, 1500, 1, 4};
    mixed_t x = {.n = sizeof lens / sizeof lens[0]};
    for (size_t i = 0; i < x.n; i++)
        send_tagged(p.b, (unsigned)i + 1, lens[i]);
    zev_loop_t *loop = test_loop_new();
    x.s = test_stream_new(loop, p.a);
    cr_assert_not_null(zev_fiber_spawn(loop, recv_mixed, &x, NULL));
    test_run_until(loop, &x.done, 10000);
    for (size_t i = 0; i < x.n; i++) {
        cr_assert_eq(x.tags[i], (long)i + 1, "message %zu: tag %ld", i, x.tags[i]);
        cr_assert_eq(x.parts[i], lens[i], "message %zu: %zu parts", i, x.parts[i]);
    }
    zev_stream_close(x.s, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&p);
    test_expect_no_leaks();
}

/* r3 (review of the merged core): a fiber forwarding the message it just
 * received with zev_fiber_send_msg, its parts straight from the ring
 * (zev_msg_frame), to another stream or back on the same one. The call
 * used to return the borrowed message at its start, closing the parts it
 * was about to send (libzmq: "Assertion failed: check ()"). */
typedef struct forward {
    zev_stream_t *in, *out;
    int n, sent, done;
} forward_t;

static void forward_fiber(void *arg)
{
    forward_t *fw = arg;
    zev_msg_t *m;
    for (int i = 0; i < fw->n; i++) {
        if (zev_fiber_recv(fw->in, &m, FOREVER) != 0)
            break;
        if (zev_fiber_send_msg(fw->out, zev_msg_frame(m, 0), zev_msg_parts(m), 0, FOREVER) != 0)
            break;
        fw->sent++;
    }
    fw->done = 1;
}

static void forward_and_check(bool same_stream)
{
    enum { N = 100, PARTS = 3 };
    pair_t in = pair_open(0), out = pair_open(0);
    for (unsigned i = 0; i < N; i++)
        send_tagged(in.b, i + 1, PARTS);
    zev_loop_t *loop = test_loop_new();
    forward_t fw = {.in = test_stream_new(loop, in.a), .n = N};
    fw.out = same_stream ? fw.in : test_stream_new(loop, out.a);
    cr_assert_not_null(zev_fiber_spawn(loop, forward_fiber, &fw, NULL));
    test_run_until(loop, &fw.done, 10000);
    cr_assert_eq(fw.sent, N);
    void *peer = same_stream ? in.b : out.b;
    test_set_int(peer, ZMQ_RCVTIMEO, 5000);
    for (unsigned i = 0; i < N; i++)
        for (unsigned k = 0; k < PARTS; k++) {
            unsigned v[2] = {0, 0};
            cr_assert_eq(zmq_recv(peer, v, sizeof v, 0), (int)sizeof v, "message %u part %u", i, k);
            cr_assert(v[0] == i + 1 && v[1] == k, "message %u part %u: got %u/%u", i, k, v[0], v[1]);
        }
    zev_stream_close(fw.in, 0);
    if (!same_stream)
        zev_stream_close(fw.out, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&in);
    pair_close(&out);
    test_expect_no_leaks();
}

Test(fiber_review, send_msg_forwards_the_received_parts_to_another_stream)
{
    forward_and_check(false);
}

Test(fiber_review, send_msg_forwards_the_received_parts_back_on_the_same_stream)
{
    forward_and_check(true);
}

/* r4 (review of the receive-path merge): while a fiber forwarding its
 * received parts waits for room on the other stream, another fiber
 * receives from the first one. Its receive went into the ring the parts
 * being forwarded lie in: the forwarding fiber then sent empty parts (the
 * peer got a 0-byte message, its own message was lost, and its send said
 * 0). The ring is now lent until the forwarding call returns: the second
 * receive waits for it and then gets the next message whole. */
typedef struct lent {
    zev_stream_t *in, *out;
    void *out_peer;
    int fwd_rc, b_rc, b_done, a_done;
    long b_tag;
    size_t b_parts;
} lent_t;

static void lent_forwarder(void *arg)
{
    lent_t *l = arg;
    zev_msg_t *m;
    l->fwd_rc = zev_fiber_recv(l->in, &m, FOREVER);
    if (l->fwd_rc == 0) /* the other stream is full: this waits */
        l->fwd_rc = zev_fiber_send_msg(l->out, zev_msg_frame(m, 0), zev_msg_parts(m), 0, FOREVER);
    l->a_done = 1;
}

static void lent_receiver(void *arg)
{
    lent_t *l = arg;
    zev_msg_t *m;
    zev_fiber_sleep(20000); /* the forwarder waits in its send by now */
    l->b_rc = zev_fiber_recv(l->in, &m, 5000000);
    if (l->b_rc == 0)
        l->b_tag = tagged_tag(m, &l->b_parts);
    l->b_done = 1;
}

static void lent_drain_peer(zev_timer_t *t, void *arg)
{
    (void)t;
    lent_t *l = arg;
    char buf[64];
    while (zmq_recv(l->out_peer, buf, sizeof buf, ZMQ_DONTWAIT) >= 0)
        ; /* the filler: room for the forwarded message */
}

Test(fiber_review, a_receive_waits_while_another_fiber_forwards_from_the_ring)
{
    enum { PARTS = 3 };
    pair_t in = pair_open(0), out = pair_open(1);
    send_tagged(in.b, 1, PARTS);
    send_tagged(in.b, 2, PARTS);
    int fill = 0;
    while (zmq_send(out.a, "filler", 6, ZMQ_DONTWAIT) == 6)
        fill++;
    cr_assert_gt(fill, 0);
    zev_loop_t *loop = test_loop_new();
    lent_t l = {.in = test_stream_new(loop, in.a), .out_peer = out.b};
    l.out = test_stream_new(loop, out.a);
    cr_assert_not_null(zev_fiber_spawn(loop, lent_forwarder, &l, NULL));
    cr_assert_not_null(zev_fiber_spawn(loop, lent_receiver, &l, NULL));
    zev_timer_t *drain = zev_timer_start(loop, 100000, 0, lent_drain_peer, &l);
    cr_assert_not_null(drain);
    test_run_until(loop, &l.b_done, 10000);
    test_run_until(loop, &l.a_done, 10000);
    cr_assert_eq(l.fwd_rc, 0);
    cr_assert_eq(l.b_rc, 0);
    cr_assert_eq(l.b_tag, 2, "the second receive got message %ld", l.b_tag);
    cr_assert_eq(l.b_parts, PARTS);
    test_set_int(out.b, ZMQ_RCVTIMEO, 5000);
    for (unsigned k = 0; k < PARTS; k++) {
        unsigned v[2] = {0, 0};
        int n = zmq_recv(out.b, v, sizeof v, 0);
        cr_assert_eq(n, (int)sizeof v, "forwarded part %u: %d bytes", k, n);
        cr_assert(v[0] == 1 && v[1] == k, "forwarded part %u: got %u/%u", k, v[0], v[1]);
    }
    zev_stream_close(l.in, 0);
    zev_stream_close(l.out, 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    pair_close(&in);
    pair_close(&out);
    test_expect_no_leaks();
}
