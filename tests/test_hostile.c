/*
 * Hostile peers (issue 16): what one message can cost. A message longer
 * than the stream's max_parts is dropped whole and counted, and the next one
 * arrives intact; a long message that is allowed is received over several
 * passes while timers, other streams and fibers keep running, and is still
 * delivered whole and in order; the receive ring goes back to its usual
 * size afterwards. Plus the stream counters (zev_stream_stats). Every test
 * runs on the backend under test.
 */
#include "common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

TestSuite(hostile, .timeout = 120);

/* Sends one message of n parts; part i holds i (4 bytes) when numbered,
 * else it is empty. */
static void send_parts(void *sock, size_t n, bool numbered)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)i;
        int flags = i + 1 < n ? ZMQ_SNDMORE : 0;
        int rc = numbered ? zmq_send(sock, &v, sizeof v, flags) : zmq_send(sock, NULL, 0, flags);
        cr_assert_geq(rc, 0, "part %zu: %s", i, zmq_strerror(errno));
    }
}

typedef struct got {
    size_t msgs;
    size_t parts[8];    /* parts of each message, in order */
    size_t bad_order;   /* numbered parts out of place */
    int timer_at[8];    /* timer firings when each message came */
    size_t other_at[8]; /* the other stream's messages when each came */
    int *timer_count;
    size_t *other_count;
    bool numbered;
} got_t;

static void on_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    got_t *g = arg;
    size_t n = zev_msg_parts(m);
    if (g->msgs < 8) {
        g->parts[g->msgs] = n;
        g->timer_at[g->msgs] = g->timer_count ? *g->timer_count : 0;
        g->other_at[g->msgs] = g->other_count ? *g->other_count : 0;
    }
    if (g->numbered)
        for (size_t i = 0; i < n; i++) {
            uint32_t v;
            if (zev_msg_size(m, i) != sizeof v) {
                g->bad_order++;
                continue;
            }
            memcpy(&v, zev_msg_data(m, i), sizeof v);
            g->bad_order += v != (uint32_t)i;
        }
    g->msgs++;
}

static void count_other(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (*(size_t *)arg)++;
}

static void tick(zev_timer_t *t, void *arg)
{
    (void)t;
    (*(int *)arg)++;
}

static zev_stream_stats_t stats_of(zev_stream_t *s)
{
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    return st;
}

/* Runs until g->msgs reaches n (run_once(0) steps, each one iteration). */
static int run_until_msgs(zev_loop_t *loop, got_t *g, size_t n)
{
    int iterations = 0;
    uint64_t t0 = test_ms();
    while (g->msgs < n) {
        cr_assert_lt(test_ms() - t0, 60000, "stuck at %zu of %zu messages", g->msgs, n);
        zev_loop_run_once(loop, 10);
        iterations++;
    }
    return iterations;
}

/* ------------------------------------------------------------- max_parts */

static void oversized_on(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, transport);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_parts(s, 10), 0);
    got_t g = {.numbered = true};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    send_parts(p.b, 11, true); /* one too many */
    send_parts(p.b, 3, true);
    send_parts(p.b, 10, true); /* exactly the bound */
    send_parts(p.b, 5000, true);
    send_parts(p.b, 1, true);
    run_until_msgs(p.loop, &g, 3);
    test_spin(p.loop, 3, 10);
    cr_assert_eq(g.msgs, 3, "%zu messages delivered", g.msgs);
    cr_assert_eq(g.parts[0], 3);
    cr_assert_eq(g.parts[1], 10);
    cr_assert_eq(g.parts[2], 1);
    cr_assert_eq(g.bad_order, 0, "parts out of place: a dropped message leaked into the next");
    zev_stream_stats_t st = stats_of(s);
    cr_assert_eq(st.dropped_oversized, 2);
    cr_assert_eq(st.msgs_in, 3);
    test_pair_close(&p);
}

Test(hostile, a_message_over_max_parts_is_dropped_whole_inproc)
{
    oversized_on("inproc");
}

Test(hostile, a_message_over_max_parts_is_dropped_whole_tcp)
{
    oversized_on("tcp");
}

/* The default bound stops a message of more than 64 Ki parts (a few
 * hundred kilobytes on the wire) without holding its parts. */
Test(hostile, the_default_bound_drops_a_huge_message)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "tcp");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    got_t g = {0};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    send_parts(p.b, ZEV_MAX_PARTS_DEFAULT + 1, false);
    send_parts(p.b, 2, false);
    run_until_msgs(p.loop, &g, 1);
    cr_assert_eq(g.parts[0], 2);
    zev_stream_stats_t st = stats_of(s);
    cr_assert_eq(st.dropped_oversized, 1);
    cr_assert_leq(st.ring_size, 1024, "the ring kept %zu slots", st.ring_size);
    test_pair_close(&p);
}

Test(hostile, max_parts_refuses_bad_calls)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    errno = 0;
    cr_assert_eq(zev_stream_set_max_parts(NULL, 1), -1);
    cr_assert_eq(errno, EINVAL);
    cr_assert_eq(zev_stream_close(s, 0), 0);
    errno = 0;
    cr_assert_eq(zev_stream_set_max_parts(s, 1), -1);
    cr_assert_eq(errno, EBADF);
    test_pair_close(&p);
}

/* ------------------------------------------ long messages, the loop goes on */

/* 200,000 numbered parts, allowed (max_parts 0): received over many passes
 * while a timer and another stream are served in each, delivered whole and
 * in order; the ring is back to its usual size afterwards. */
Test(hostile, a_long_message_spans_passes_and_is_delivered_whole)
{
    enum { PARTS = 200000 };
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL);
    test_set_int(p.a, ZMQ_RCVHWM, 0);
    test_set_int(p.b, ZMQ_SNDHWM, 0);
    test_bind_connect(p.a, p.b, "inproc");
    void *pull2 = test_socket(p.ctx, ZMQ_PULL), *push2 = test_socket(p.ctx, ZMQ_PUSH);
    test_set_int(pull2, ZMQ_RCVHWM, 0);
    test_set_int(push2, ZMQ_SNDHWM, 0);
    test_bind_connect(pull2, push2, "inproc");

    int ticks = 0;
    size_t others = 0;
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_parts(s, 0), 0);
    got_t g = {.numbered = true, .timer_count = &ticks, .other_count = &others};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    send_parts(p.b, 1, true); /* a normal message first: the ring's usual size */
    run_until_msgs(p.loop, &g, 1);
    size_t usual = stats_of(s).ring_size;

    zev_stream_t *o = test_stream_new(p.loop, pull2);
    cr_assert_eq(zev_stream_on_recv(o, count_other, &others), 0);
    for (int i = 0; i < 20000; i++)
        cr_assert_eq(zmq_send(push2, "o", 1, 0), 1);
    cr_assert_not_null(zev_timer_start(p.loop, 0, 1, tick, &ticks));
    send_parts(p.b, PARTS, true);
    send_parts(p.b, 2, true);
    int iterations = run_until_msgs(p.loop, &g, 3);

    cr_assert_eq(g.parts[1], PARTS, "the long message came in %zu parts", g.parts[1]);
    cr_assert_eq(g.parts[2], 2);
    cr_assert_eq(g.bad_order, 0, "parts out of place");
    /* 200,000 parts at 64 x 64 per pass: about 49 passes */
    cr_assert_geq(iterations, 40, "received in %d iterations: the message held the loop",
                  iterations);
    cr_assert_geq(g.timer_at[1], 20, "the timer fired %d times meanwhile", g.timer_at[1]);
    cr_assert_geq(g.other_at[1], 20 * 64, "the other stream got %zu messages meanwhile",
                  g.other_at[1]);
    zev_stream_stats_t st = stats_of(s);
    cr_assert_leq(st.ring_size, 1024, "the ring kept %zu slots", st.ring_size);
    cr_assert_geq(st.ring_size, usual);
    cr_assert_eq(st.dropped_oversized, 0);
    cr_assert_eq(zev_loop_destroy(p.loop), 0);
    p.loop = NULL;
    test_close(pull2);
    test_close(push2);
    test_pair_close(&p);
}

/* Dropping spans passes too: a message over the bound but longer than a
 * pass's allowance is drained over several passes and the next one is
 * intact. */
Test(hostile, dropping_a_long_message_spans_passes)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL);
    test_set_int(p.a, ZMQ_RCVHWM, 0);
    test_set_int(p.b, ZMQ_SNDHWM, 0);
    test_bind_connect(p.a, p.b, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_parts(s, 10000), 0);
    int ticks = 0;
    got_t g = {.numbered = true, .timer_count = &ticks};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    cr_assert_not_null(zev_timer_start(p.loop, 0, 1, tick, &ticks));
    send_parts(p.b, 100000, true);
    send_parts(p.b, 7, true);
    int iterations = run_until_msgs(p.loop, &g, 1);
    cr_assert_eq(g.parts[0], 7);
    cr_assert_eq(g.bad_order, 0);
    cr_assert_geq(iterations, 20, "dropped in %d iterations", iterations);
    cr_assert_geq(g.timer_at[0], 10);
    cr_assert_eq(stats_of(s).dropped_oversized, 1);
    test_pair_close(&p);
}

/* Fibers: the same rules through zev_fiber_recv. */
typedef struct fgot {
    zev_stream_t *s;
    size_t parts[3];
    int n;
    int done;
    int err;
} fgot_t;

static void fiber_receiver(void *arg)
{
    fgot_t *f = arg;
    while (f->n < 2) {
        zev_msg_t *m;
        if (zev_fiber_recv(f->s, &m, 5000000) < 0) {
            f->err = errno;
            break;
        }
        f->parts[f->n++] = zev_msg_parts(m);
    }
    f->done = 1;
}

Test(hostile, a_fiber_gets_long_messages_whole_and_never_an_oversized_one)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL);
    test_set_int(p.a, ZMQ_RCVHWM, 0);
    test_set_int(p.b, ZMQ_SNDHWM, 0);
    test_bind_connect(p.a, p.b, "inproc");
    fgot_t f = {.s = test_stream_new(p.loop, p.a)};
    cr_assert_eq(zev_stream_set_max_parts(f.s, 50000), 0);
    send_parts(p.b, 60000, false); /* dropped */
    send_parts(p.b, 40000, false); /* delivered, over several calls' worth */
    send_parts(p.b, 3, false);
    cr_assert_not_null(zev_fiber_spawn(p.loop, fiber_receiver, &f, NULL));
    test_run_until(p.loop, &f.done, 60000);
    cr_assert_eq(f.err, 0, "zev_fiber_recv: %s", strerror(f.err));
    cr_assert_eq(f.parts[0], 40000);
    cr_assert_eq(f.parts[1], 3);
    zev_stream_stats_t st = stats_of(f.s);
    cr_assert_eq(st.dropped_oversized, 1);
    test_spin(p.loop, 2, 0);
    cr_assert_leq(stats_of(f.s).ring_size, 1024);
    test_pair_close(&p);
}

/* --------------------------------------------------------------- counters */

typedef struct sent {
    int statuses[8];
    int n;
} sent_t;

static void on_sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    sent_t *st = arg;
    if (st->n < 8)
        st->statuses[st->n] = status;
    st->n++;
}

Test(hostile, stream_counters_count_what_happened)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, 1);
    test_set_int(p.b, ZMQ_RCVHWM, 1);
    test_bind_connect(p.a, p.b, "inproc");
    zev_stream_t *out = test_stream_new(p.loop, p.a);
    sent_t st = {0};
    cr_assert_eq(zev_stream_on_send(out, on_sent, &st), 0);
    /* five messages: what the pipe takes goes, the rest waits in the queue */
    cr_assert_eq(zev_stream_send(out, "abc", 3, ZMQ_SNDMORE), 0);
    cr_assert_eq(zev_stream_send(out, "de", 2, 0), 0);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(zev_stream_send(out, "xyzw", 4, 0), 0);
    test_spin(p.loop, 2, 0);
    zev_stream_stats_t a = stats_of(out);
    size_t taken = (size_t)a.msgs_out; /* what the pipe took; nobody reads */
    cr_assert_geq(taken, 1);
    cr_assert_eq(taken + a.queued_msgs, 5);
    cr_assert_eq(a.queue_peak, a.queued_msgs, "queue_peak %zu, %zu queued", a.queue_peak,
                 a.queued_msgs);
    cr_assert_eq(a.bytes_out, 5 + 4 * (taken - 1), "bytes_out %llu for %zu messages",
                 (unsigned long long)a.bytes_out, taken);
    cr_assert_eq(zev_stream_close(out, 0), 0);
    zev_stream_stats_t b = stats_of(out); /* valid until its close callback ran */
    cr_assert_eq(b.cancelled, 5 - taken, "cancelled %llu", (unsigned long long)b.cancelled);
    cr_assert_eq(b.msgs_out + b.cancelled + b.timed_out + b.failed, 5);

    /* receiving: messages and bytes in */
    zev_stream_t *in = test_stream_new(p.loop, p.b);
    got_t g = {0};
    cr_assert_eq(zev_stream_on_recv(in, on_msg, &g), 0);
    run_until_msgs(p.loop, &g, taken);
    zev_stream_stats_t c = stats_of(in);
    cr_assert_eq(c.msgs_in, taken);
    cr_assert_eq(c.bytes_in, a.bytes_out);
    test_pair_close(&p);
}

/* ------------------------------------ the outside review of 3573bc5/20f4bc3 */

/* Reads what the socket holds now without zev: the parts of its next
 * message, each numbered part's value checked against its index. */
static size_t raw_next_message(void *sock, size_t *bad_order)
{
    test_set_int(sock, ZMQ_RCVTIMEO, 5000);
    size_t n = 0;
    int more = 1;
    while (more) {
        uint32_t v;
        int rc = zmq_recv(sock, &v, sizeof v, 0);
        cr_assert_eq(rc, (int)sizeof v, "part %zu: %d (%s)", n, rc, zmq_strerror(errno));
        *bad_order += v != (uint32_t)n;
        size_t len = sizeof more;
        cr_assert_eq(zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len), 0);
        n++;
    }
    return n;
}

/* A stream closed (its socket kept) while a long message is half taken,
 * or half dropped: zev drains the rest, so the socket's next reader starts
 * at the next message, not at the tail of the cut one. */
static void close_mid_message(size_t max_parts)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    send_parts(p.b, 200, true);
    send_parts(p.b, 3, true);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_batch(s, 1), 0); /* a pass takes 64 parts */
    cr_assert_eq(zev_stream_set_max_parts(s, max_parts), 0);
    got_t g = {.numbered = true};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    zev_loop_run_once(p.loop, 0);
    cr_assert_eq(g.msgs, 0, "the first message came whole in one pass: nothing tested");
    cr_assert_eq(zev_stream_close(s, 0), 0);
    test_spin(p.loop, 2, 0);
    size_t bad = 0;
    cr_assert_eq(raw_next_message(p.a, &bad), 3, "the socket was left inside the cut message");
    cr_assert_eq(bad, 0);
    test_pair_close(&p);
}

Test(hostile, a_close_mid_message_leaves_the_socket_at_a_message_boundary)
{
    close_mid_message(0);
}

Test(hostile, a_close_mid_drop_leaves_the_socket_at_a_message_boundary)
{
    close_mid_message(10);
}

/* REP must answer a request before it can receive the next: a request
 * dropped over max_parts is answered with one empty part, and the server
 * goes on serving. */
Test(hostile, a_rep_stream_answers_a_dropped_request_and_goes_on)
{
    test_pair_t p = test_pair_open(ZMQ_REP, ZMQ_REQ, "tcp");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_parts(s, 10), 0);
    got_t g = {.numbered = true};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    send_parts(p.b, 11, true);
    test_set_int(p.b, ZMQ_RCVTIMEO, 0);
    char buf[8];
    int rc = -1;
    uint64_t t0 = test_ms();
    while (rc < 0 && test_ms() - t0 < 5000) {
        zev_loop_run_once(p.loop, 10);
        rc = zmq_recv(p.b, buf, sizeof buf, 0);
    }
    cr_assert_eq(rc, 0, "the dropped request got no empty reply (%s)", zmq_strerror(errno));
    cr_assert_eq(stats_of(s).dropped_oversized, 1);
    send_parts(p.b, 2, true); /* the next request is served */
    run_until_msgs(p.loop, &g, 1);
    cr_assert_eq(g.parts[0], 2);
    cr_assert_eq(g.bad_order, 0);
    test_pair_close(&p);
}

/* max_parts lowered while a message is being received: the message is
 * judged by the new bound, so it is dropped whole. */
Test(hostile, a_bound_lowered_mid_message_drops_it)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    send_parts(p.b, 65, true);
    send_parts(p.b, 1, true);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_batch(s, 1), 0);
    cr_assert_eq(zev_stream_set_max_parts(s, 0), 0);
    got_t g = {.numbered = true};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    zev_loop_run_once(p.loop, 0); /* 64 of the 65 parts */
    cr_assert_eq(g.msgs, 0);
    cr_assert_eq(zev_stream_set_max_parts(s, 10), 0);
    run_until_msgs(p.loop, &g, 1);
    test_spin(p.loop, 3, 0);
    cr_assert_eq(g.msgs, 1);
    cr_assert_eq(g.parts[0], 1, "the 65-part message came through a bound of 10");
    cr_assert_eq(stats_of(s).dropped_oversized, 1);
    test_pair_close(&p);
}

/* zev_stream_flush returns messages, not the pass's units: a message of
 * 1,000 parts takes several calls with limit 1 and counts once. */
Test(hostile, flush_counts_messages_not_units)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    send_parts(p.b, 1000, true);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    got_t g = {.numbered = true};
    cr_assert_eq(zev_stream_on_recv(s, on_msg, &g), 0);
    int total = 0, calls = 0;
    while (g.msgs == 0) {
        cr_assert_lt(calls, 1000);
        int n = zev_stream_flush(s, ZEV_READ, 1);
        cr_assert_geq(n, 0);
        cr_assert_eq(n, (int)g.msgs - total, "flush said %d with %zu delivered", n, g.msgs);
        total += n;
        calls++;
    }
    cr_assert_eq(total, 1);
    cr_assert_gt(calls, 1, "the message came in one call: nothing tested");
    cr_assert_eq(g.parts[0], 1000);
    cr_assert_eq(g.bad_order, 0);
    test_pair_close(&p);
}

/* Byte counters take a part's size, not libzmq's int return (which stops
 * at INT_MAX): one 3 GiB part (untouched, never paged in) over inproc. */
static void unmap_big(void *data, void *hint)
{
    munmap(data, (size_t)hint);
}

static void count_bytes(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    *(uint64_t *)arg += zev_msg_size(m, 0);
}

Test(hostile, byte_counters_go_past_int_max)
{
    const size_t big = (size_t)3 << 30;
    void *data = mmap(NULL, big, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    cr_assert_neq(data, MAP_FAILED);
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *in = test_stream_new(p.loop, p.a);
    zev_stream_t *out = test_stream_new(p.loop, p.b);
    uint64_t seen = 0;
    cr_assert_eq(zev_stream_on_recv(in, count_bytes, &seen), 0);
    cr_assert_eq(zev_stream_send_zc(out, data, big, unmap_big, (void *)big, NULL), 0);
    uint64_t t0 = test_ms();
    while (!seen && test_ms() - t0 < 5000)
        zev_loop_run_once(p.loop, 10);
    cr_assert_eq(seen, big);
    cr_assert_eq(stats_of(out).bytes_out, big);
    cr_assert_eq(stats_of(in).bytes_in, big);
    test_pair_close(&p);
}
