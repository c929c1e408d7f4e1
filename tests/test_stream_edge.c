/*
 * Streams under edge-triggered stress: the ZMQ_FD invariant of docs/design.md's
 * "Loop iteration" section, checked with real libzmq sockets.
 *
 *   - edge torture: a DEALER stream echoing from inside its own recv
 *     callback while a peer thread blasts 1,000,000 messages (inproc, tcp);
 *   - sends from outside a stream's own pass: another stream's callback, a
 *     timer, user code between zev_loop_run_once calls; as stress (exact
 *     counts, in order, watchdog) and as a deterministic case where the send
 *     consumes the ZMQ_FD edge of a message waiting for an idle stream;
 *   - fairness: batch 8, a firehose with an endless backlog and a quiet
 *     stream: the quiet message waits behind at most 2 * batch - 1 firehose
 *     messages (counted, never timed);
 *   - ZMQ_FD signalled while ZMQ_EVENTS is 0 (SUB receiving only
 *     filtered-out traffic): no hang, no spin;
 *   - ROUTER_MANDATORY with a full peer pipe: POLLOUT may be reported while
 *     the head message gets EAGAIN; no spin (process CPU time over one
 *     second), everything goes out in order once the peer drains;
 *     EHOSTUNREACH for an unknown identity;
 *   - REQ sending before the reply: EFSM waits in the queue like EAGAIN;
 *   - every socket type registers and receives on inproc, ipc and tcp.
 *
 * Peer threads never call Criterion assertions: they record what they saw
 * in their own struct, which the test thread checks after pthread_join, and
 * they tell the loop they are done through zev_loop_add_callback.
 *
 * ThreadSanitizer: libzmq is not instrumented, so TSan reports its internal
 * allocations (pipe chunks allocated by one thread, freed by another) as
 * races; run with suppressions "called_from_lib:libzmq.so.5" and
 * "called_from_lib:libstdc++.so.6". Nothing in this file's own shared state
 * needs them: peer results are read after pthread_join.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "common.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The counts are the same in every build. Measured here (2 shared cores):
 * the 1,000,000-message torture takes about 1 s in the plain build, 1-2 s
 * under ASan+UBSan and 1-1.5 s under TSan (libzmq, which does most of the
 * work, is not instrumented), well inside its 10 s watchdog, so no
 * sanitizer needs a smaller count. */
#define TORTURE_N 1000000u
#define RELAY_N 50000u /* B's pipe holds 4+4 messages: ~10 us per message over tcp */
#define ECHO_N 50000u

#define WATCHDOG_MS 10000

/* ------------------------------------------------------------- helpers */

static uint64_t get_u64(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static void set_flag_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    *(volatile int *)arg = 1;
}

static uint64_t cpu_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Runs iterations until one ends with no pending work (run_once returns 0);
 * a stream that stays on the ready-list forever (a spin) trips the watchdog.
 * Returns the iterations it took. */
static int run_until_idle(zev_loop_t *loop, int timeout_ms)
{
    uint64_t end = test_ms() + (uint64_t)timeout_ms;
    for (int iters = 1;; iters++) {
        cr_assert(test_ms() < end, "watchdog: the loop never went idle in %d ms (spinning?)",
                  timeout_ms);
        int rc = zev_loop_run_once(loop, 1);
        cr_assert_geq(rc, 0, "run_once: %s", zmq_strerror(errno));
        if (rc == 0)
            return iters;
    }
}

/* Like test_run_until, with an absolute deadline shared by several phases. */
static void run_until_flag_by(zev_loop_t *loop, const volatile int *flag, uint64_t deadline,
                              const char *what)
{
    while (!*flag) {
        cr_assert(test_ms() < deadline, "watchdog: %s", what);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0, "run_once: %s", zmq_strerror(errno));
    }
}

static void run_until_count_by(zev_loop_t *loop, const volatile size_t *count, size_t target,
                               uint64_t deadline, const char *what)
{
    while (*count < target) {
        cr_assert(test_ms() < deadline, "watchdog: %s: %zu of %zu", what, *count, target);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0, "run_once: %s", zmq_strerror(errno));
    }
}

static int part_is(zev_msg_t *m, size_t i, const char *s, size_t len)
{
    return zev_msg_size(m, i) == len && memcmp(zev_msg_data(m, i), s, len) == 0;
}

/* A peer thread's failure record (checked on the test thread after join). */
typedef struct peer_err {
    int err;
    const char *where;
} peer_err_t;

static void peer_fail(peer_err_t *pe, const char *where)
{
    if (!pe->err) {
        pe->err = errno ? errno : EIO;
        pe->where = where;
    }
}

static void assert_peer_ok(const peer_err_t *pe)
{
    cr_assert_eq(pe->err, 0, "peer thread failed at %s: %s", pe->where ? pe->where : "?",
                 zmq_strerror(pe->err));
}

/* ============================================================ edge torture */

/* Peer: a raw DEALER that blasts n sequence numbers and reads the echoes,
 * never blocking on one direction while the other has work. */
typedef struct blaster {
    void *ctx;
    char ep[256];
    size_t n;
    int hwm;
    zev_loop_t *loop;
    volatile int done; /* set on the loop thread */
    size_t sent, echoed, bad;
    peer_err_t pe;
} blaster_t;

static void *blaster_main(void *arg)
{
    blaster_t *b = arg;
    void *s = zmq_socket(b->ctx, ZMQ_DEALER);
    if (!s) {
        peer_fail(&b->pe, "zmq_socket");
        goto out;
    }
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_SNDHWM, &b->hwm, sizeof b->hwm);
    zmq_setsockopt(s, ZMQ_RCVHWM, &b->hwm, sizeof b->hwm);
    if (zmq_connect(s, b->ep) < 0) {
        peer_fail(&b->pe, "zmq_connect");
        goto close;
    }
    uint64_t deadline = test_ms() + 60000; /* the peer never outlives a failed test */
    while (b->echoed < b->n) {
        int progress = 0;
        for (int k = 0; k < 256 && b->sent < b->n; k++) {
            uint64_t v = b->sent;
            if (zmq_send(s, &v, sizeof v, ZMQ_DONTWAIT) < 0) {
                if (errno == EAGAIN)
                    break;
                peer_fail(&b->pe, "zmq_send");
                goto close;
            }
            b->sent++;
            progress = 1;
        }
        for (int k = 0; k < 256; k++) {
            uint64_t v = 0;
            int rc = zmq_recv(s, &v, sizeof v, ZMQ_DONTWAIT);
            if (rc < 0) {
                if (errno == EAGAIN)
                    break;
                peer_fail(&b->pe, "zmq_recv");
                goto close;
            }
            if (rc != (int)sizeof v || v != b->echoed)
                b->bad++;
            b->echoed++;
            progress = 1;
        }
        if (!progress) {
            if (test_ms() > deadline) {
                errno = ETIMEDOUT;
                peer_fail(&b->pe, "deadline");
                goto close;
            }
            zmq_pollitem_t it = {s, 0, (short)(ZMQ_POLLIN | (b->sent < b->n ? ZMQ_POLLOUT : 0)),
                                 0};
            if (zmq_poll(&it, 1, 100) < 0 && errno != EINTR) {
                peer_fail(&b->pe, "zmq_poll");
                goto close;
            }
        }
    }
close:
    if (s)
        zmq_close(s);
out:
    zev_loop_add_callback(b->loop, set_flag_cb, (void *)&b->done);
    return NULL;
}

/* The stream side: echo every message from inside the recv callback; pause
 * receiving while the send queue is long, resume from on_send. */
typedef struct echoer {
    zev_stream_t *s;
    size_t recvd, bad, send_fail, reported, report_bad, pauses, max_queued;
    int paused;
    int last_errno;
} echoer_t;

#define ECHO_PAUSE_AT 500
#define ECHO_RESUME_AT 100

static size_t queued(const zev_stream_t *s)
{
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    return st.queued_msgs;
}

static void echo_recv(zev_stream_t *s, zev_msg_t *m, void *arg);

static void echo_sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    echoer_t *e = arg;
    e->reported++;
    if (status != 0)
        e->report_bad++;
    if (e->paused && queued(s) <= ECHO_RESUME_AT) {
        e->paused = 0;
        cr_assert_eq(zev_stream_on_recv(s, echo_recv, e), 0);
    }
}

static void echo_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    echoer_t *e = arg;
    if (zev_msg_parts(m) != 1 || zev_msg_size(m, 0) != sizeof(uint64_t) ||
        get_u64(zev_msg_data(m, 0)) != e->recvd)
        e->bad++;
    e->recvd++;
    if (zev_stream_send(s, zev_msg_data(m, 0), zev_msg_size(m, 0), 0) != 0) {
        e->send_fail++;
        e->last_errno = errno;
    }
    size_t q = queued(s);
    if (q > e->max_queued)
        e->max_queued = q;
    if (!e->paused && q >= ECHO_PAUSE_AT) {
        e->paused = 1;
        e->pauses++;
        cr_assert_eq(zev_stream_on_recv(s, NULL, NULL), 0);
    }
}

static void torture(const char *transport)
{
    const size_t n = TORTURE_N;
    test_pair_t p = test_pair_open(ZMQ_DEALER, TEST_NO_SOCKET, NULL); /* the peer is a thread */
    void *sock = p.a;
    /* Small HWMs: the pipes fill constantly, so the stream's own queue, the
     * POLLOUT edges and the pause/resume path are all exercised. */
    test_set_int(sock, ZMQ_SNDHWM, 300);
    test_set_int(sock, ZMQ_RCVHWM, 300);
    blaster_t b = {.ctx = p.ctx, .n = n, .hwm = 300, .loop = p.loop};
    test_bind_ep(sock, transport, b.ep, sizeof b.ep);

    zev_stream_t *s = zev_stream_new(p.loop, sock);
    cr_assert_not_null(s, "zev_stream_new: %s", zmq_strerror(errno));
    echoer_t e = {.s = s};
    cr_assert_eq(zev_stream_on_recv(s, echo_recv, &e), 0);
    cr_assert_eq(zev_stream_on_send(s, echo_sent, &e), 0);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, blaster_main, &b), 0);
    uint64_t deadline = test_ms() + WATCHDOG_MS;
    run_until_count_by(p.loop, &e.recvd, n, deadline, "stream received");
    run_until_flag_by(p.loop, &b.done, deadline, "peer did not get every echo");
    run_until_count_by(p.loop, &e.reported, n, deadline, "on_send reports");
    pthread_join(th, NULL);

    cr_log_info("torture %s: %zu messages, send queue peak %zu, %zu pauses", transport, n,
                e.max_queued, e.pauses);
    assert_peer_ok(&b.pe);
    cr_assert_eq(e.recvd, n, "stream received %zu of %zu", e.recvd, n);
    cr_assert_eq(e.bad, 0, "%zu messages out of order or malformed at the stream", e.bad);
    cr_assert_eq(e.send_fail, 0, "%zu echo sends failed (last: %s)", e.send_fail,
                 zmq_strerror(e.last_errno));
    cr_assert_eq(b.sent, n);
    cr_assert_eq(b.echoed, n, "peer got %zu of %zu echoes", b.echoed, n);
    cr_assert_eq(b.bad, 0, "%zu echoes out of order or malformed at the peer", b.bad);
    cr_assert_eq(e.reported, n, "on_send ran %zu times for %zu sends", e.reported, n);
    cr_assert_eq(e.report_bad, 0);
    cr_assert_eq(zev_stream_sending(s), 0);

    test_pair_close(&p);
}

Test(stream_edge, torture_inproc, .timeout = 60)
{
    torture("inproc");
}

Test(stream_edge, torture_tcp, .timeout = 60)
{
    torture("tcp");
}

/* ===================================================== cross-stream sends */

/* Peer for the relay: feeds stream A through a PUSH and reads what stream B
 * forwards through a PULL with a tiny RCVHWM, checking the order. */
typedef struct relay_peer {
    void *ctx;
    char a_ep[256], b_ep[256];
    size_t n;
    zev_loop_t *loop;
    volatile int done;
    size_t sent, got, bad;
    peer_err_t pe;
} relay_peer_t;

static void *relay_peer_main(void *arg)
{
    relay_peer_t *p = arg;
    int zero = 0, four = 4;
    void *src = zmq_socket(p->ctx, ZMQ_PUSH);
    void *sink = zmq_socket(p->ctx, ZMQ_PULL);
    if (!src || !sink) {
        peer_fail(&p->pe, "zmq_socket");
        goto close;
    }
    zmq_setsockopt(src, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sink, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sink, ZMQ_RCVHWM, &four, sizeof four);
    if (zmq_connect(src, p->a_ep) < 0 || zmq_connect(sink, p->b_ep) < 0) {
        peer_fail(&p->pe, "zmq_connect");
        goto close;
    }
    uint64_t deadline = test_ms() + 60000;
    while (p->got < p->n) {
        int progress = 0;
        for (int k = 0; k < 128 && p->sent < p->n; k++) {
            uint64_t v = p->sent;
            if (zmq_send(src, &v, sizeof v, ZMQ_DONTWAIT) < 0) {
                if (errno == EAGAIN)
                    break;
                peer_fail(&p->pe, "zmq_send");
                goto close;
            }
            p->sent++;
            progress = 1;
        }
        for (int k = 0; k < 128; k++) {
            uint64_t v = 0;
            int rc = zmq_recv(sink, &v, sizeof v, ZMQ_DONTWAIT);
            if (rc < 0) {
                if (errno == EAGAIN)
                    break;
                peer_fail(&p->pe, "zmq_recv");
                goto close;
            }
            if (rc != (int)sizeof v || v != p->got)
                p->bad++;
            p->got++;
            progress = 1;
        }
        if (!progress) {
            if (test_ms() > deadline) {
                errno = ETIMEDOUT;
                peer_fail(&p->pe, "deadline");
                goto close;
            }
            zmq_pollitem_t it[2] = {
                {src, 0, (short)(p->sent < p->n ? ZMQ_POLLOUT : 0), 0},
                {sink, 0, ZMQ_POLLIN, 0},
            };
            if (zmq_poll(it, 2, 100) < 0 && errno != EINTR) {
                peer_fail(&p->pe, "zmq_poll");
                goto close;
            }
        }
    }
close:
    if (src)
        zmq_close(src);
    if (sink)
        zmq_close(sink);
    zev_loop_add_callback(p->loop, set_flag_cb, (void *)&p->done);
    return NULL;
}

typedef struct relay {
    zev_stream_t *a, *b;
    size_t recvd, bad, send_fail, reported, report_bad, pauses;
    int paused;
    int last_errno;
} relay_t;

#define RELAY_PAUSE_AT 256
#define RELAY_RESUME_AT 32

static void relay_recv(zev_stream_t *a, zev_msg_t *m, void *arg);

/* B's on_send: resume A once B's queue is short again. */
static void relay_sent(zev_stream_t *b, uint64_t seq, int status, void *arg)
{
    (void)seq;
    relay_t *r = arg;
    r->reported++;
    if (status != 0)
        r->report_bad++;
    if (r->paused && queued(b) <= RELAY_RESUME_AT) {
        r->paused = 0;
        cr_assert_eq(zev_stream_on_recv(r->a, relay_recv, r), 0);
    }
}

/* A's on_recv: forward on B (a send from outside B's own pass). */
static void relay_recv(zev_stream_t *a, zev_msg_t *m, void *arg)
{
    relay_t *r = arg;
    if (zev_msg_parts(m) != 1 || zev_msg_size(m, 0) != sizeof(uint64_t) ||
        get_u64(zev_msg_data(m, 0)) != r->recvd)
        r->bad++;
    r->recvd++;
    if (zev_stream_send(r->b, zev_msg_data(m, 0), zev_msg_size(m, 0), 0) != 0) {
        r->send_fail++;
        r->last_errno = errno;
    }
    if (!r->paused && queued(r->b) >= RELAY_PAUSE_AT) {
        r->paused = 1;
        r->pauses++;
        cr_assert_eq(zev_stream_on_recv(a, NULL, NULL), 0);
    }
}

static void relay(const char *transport)
{
    const size_t n = RELAY_N;
    test_pair_t pair = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL); /* both bound, for the peer */
    void *pull = pair.a, *push = pair.b;
    test_set_int(push, ZMQ_SNDHWM, 4); /* B's pipe is tiny: its queue is used all the time */
    relay_peer_t p = {.ctx = pair.ctx, .n = n, .loop = pair.loop};
    test_bind_ep(pull, transport, p.a_ep, sizeof p.a_ep);
    test_bind_ep(push, transport, p.b_ep, sizeof p.b_ep);

    relay_t r = {0};
    r.a = zev_stream_new(pair.loop, pull);
    r.b = zev_stream_new(pair.loop, push);
    cr_assert(r.a && r.b, "zev_stream_new: %s", zmq_strerror(errno));
    cr_assert_eq(zev_stream_on_recv(r.a, relay_recv, &r), 0);
    cr_assert_eq(zev_stream_on_send(r.b, relay_sent, &r), 0);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, relay_peer_main, &p), 0);
    uint64_t deadline = test_ms() + WATCHDOG_MS;
    run_until_count_by(pair.loop, &r.recvd, n, deadline, "A received");
    run_until_flag_by(pair.loop, &p.done, deadline, "B's peer did not receive everything");
    run_until_count_by(pair.loop, &r.reported, n, deadline, "B's on_send reports");
    pthread_join(th, NULL);

    assert_peer_ok(&p.pe);
    cr_assert_eq(r.recvd, n);
    cr_assert_eq(r.bad, 0, "%zu messages out of order at A", r.bad);
    cr_assert_eq(r.send_fail, 0, "%zu sends on B failed (last: %s)", r.send_fail,
                 zmq_strerror(r.last_errno));
    cr_assert_eq(p.got, n, "B's peer got %zu of %zu", p.got, n);
    cr_assert_eq(p.bad, 0, "%zu messages out of order at B's peer", p.bad);
    cr_assert_eq(r.reported, n);
    cr_assert_eq(r.report_bad, 0);

    test_pair_close(&pair);
}

Test(stream_edge, cross_stream_send_inproc, .timeout = 60)
{
    relay("inproc");
}

Test(stream_edge, cross_stream_send_tcp, .timeout = 60)
{
    relay("tcp");
}

/* Peer: a raw DEALER that echoes n messages with blocking calls. */
typedef struct echo_peer {
    void *ctx;
    char ep[256];
    size_t n;
    int hwm;
    size_t echoed;
    peer_err_t pe;
} echo_peer_t;

static void *echo_peer_main(void *arg)
{
    echo_peer_t *p = arg;
    int zero = 0, tmo = 20000;
    void *s = zmq_socket(p->ctx, ZMQ_DEALER);
    if (!s) {
        peer_fail(&p->pe, "zmq_socket");
        return NULL;
    }
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_SNDHWM, &p->hwm, sizeof p->hwm);
    zmq_setsockopt(s, ZMQ_RCVHWM, &p->hwm, sizeof p->hwm);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &tmo, sizeof tmo);
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &tmo, sizeof tmo);
    if (zmq_connect(s, p->ep) < 0) {
        peer_fail(&p->pe, "zmq_connect");
        goto close;
    }
    zmq_msg_t m;
    zmq_msg_init(&m);
    while (p->echoed < p->n) {
        if (zmq_msg_recv(&m, s, 0) < 0) {
            peer_fail(&p->pe, "zmq_msg_recv");
            break;
        }
        if (zmq_msg_send(&m, s, 0) < 0) {
            peer_fail(&p->pe, "zmq_msg_send");
            break;
        }
        p->echoed++;
    }
    zmq_msg_close(&m);
close:
    zmq_close(s);
    return NULL;
}

/* The stream side of the echo tests: sends come from a timer or user code,
 * replies are counted in order by on_recv. */
typedef struct pinger {
    zev_stream_t *s;
    zev_timer_t *timer;
    size_t n, sent, got, bad, send_fail, reported, report_bad, ticks;
    int last_errno;
} pinger_t;

static void ping_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    pinger_t *p = arg;
    if (zev_msg_parts(m) != 1 || zev_msg_size(m, 0) != sizeof(uint64_t) ||
        get_u64(zev_msg_data(m, 0)) != p->got)
        p->bad++;
    p->got++;
}

static void ping_sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    pinger_t *p = arg;
    p->reported++;
    if (status != 0)
        p->report_bad++;
}

/* Sends up to `burst` messages; stops at EAGAIN (the queue is full). */
static void ping_burst(pinger_t *p, size_t burst)
{
    for (size_t k = 0; k < burst && p->sent < p->n; k++) {
        uint64_t v = p->sent;
        if (zev_stream_send(p->s, &v, sizeof v, 0) < 0) {
            if (errno != EAGAIN) {
                p->send_fail++;
                p->last_errno = errno;
            }
            return;
        }
        p->sent++;
    }
}

static void ping_tick(zev_timer_t *t, void *arg)
{
    pinger_t *p = arg;
    p->ticks++;
    ping_burst(p, 300);
    if (p->sent == p->n) {
        zev_timer_cancel(t);
        p->timer = NULL;
    }
}

typedef enum { FROM_TIMER, FROM_USER } ping_mode_t;

static void ping_echo(const char *transport, ping_mode_t mode)
{
    const size_t n = ECHO_N;
    test_pair_t pair = test_pair_open(ZMQ_DEALER, TEST_NO_SOCKET, NULL); /* the peer is a thread */
    void *sock = pair.a;
    test_set_int(sock, ZMQ_SNDHWM, 8);
    test_set_int(sock, ZMQ_RCVHWM, 8);
    echo_peer_t peer = {.ctx = pair.ctx, .n = n, .hwm = 8};
    test_bind_ep(sock, transport, peer.ep, sizeof peer.ep);

    pinger_t p = {.n = n};
    p.s = zev_stream_new(pair.loop, sock);
    cr_assert_not_null(p.s);
    cr_assert_eq(zev_stream_on_recv(p.s, ping_recv, &p), 0);
    cr_assert_eq(zev_stream_on_send(p.s, ping_sent, &p), 0);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, echo_peer_main, &peer), 0);
    uint64_t deadline = test_ms() + WATCHDOG_MS;
    if (mode == FROM_TIMER) {
        p.timer = zev_timer_start(pair.loop, 200, 200, ping_tick, &p);
        cr_assert_not_null(p.timer);
    } else {
        /* User code between iterations. A wait that the stream should not
         * need (a lost wakeup) costs 100 ms each time and trips the watchdog. */
        while (p.sent < n) {
            cr_assert(test_ms() < deadline, "watchdog: user sends stuck at %zu of %zu (got %zu)",
                      p.sent, n, p.got);
            ping_burst(&p, 300);
            cr_assert_geq(zev_loop_run_once(pair.loop, 100), 0);
        }
    }
    run_until_count_by(pair.loop, &p.got, n, deadline, "echoes received");
    run_until_count_by(pair.loop, &p.reported, n, deadline, "on_send reports");
    pthread_join(th, NULL);

    assert_peer_ok(&peer.pe);
    cr_assert_eq(p.send_fail, 0, "%zu sends failed (last: %s)", p.send_fail,
                 zmq_strerror(p.last_errno));
    cr_assert_eq(p.sent, n);
    cr_assert_eq(peer.echoed, n);
    cr_assert_eq(p.got, n, "got %zu of %zu echoes", p.got, n);
    cr_assert_eq(p.bad, 0, "%zu echoes out of order", p.bad);
    cr_assert_eq(p.reported, n, "on_send ran %zu times for %zu sends", p.reported, n);
    cr_assert_eq(p.report_bad, 0);
    cr_assert_null(p.timer);

    test_pair_close(&pair);
}

Test(stream_edge, timer_send_inproc, .timeout = 60)
{
    ping_echo("inproc", FROM_TIMER);
}

Test(stream_edge, timer_send_tcp, .timeout = 60)
{
    ping_echo("tcp", FROM_TIMER);
}

Test(stream_edge, user_send_between_iterations_inproc, .timeout = 60)
{
    ping_echo("inproc", FROM_USER);
}

Test(stream_edge, user_send_between_iterations_tcp, .timeout = 60)
{
    ping_echo("tcp", FROM_USER);
}

/* The deterministic form of the three cases above. The stream is idle (off
 * the ready-list, ZMQ_EVENTS said nothing); a message for it arrives and its
 * ZMQ_FD becomes readable; before the loop polls, a send from outside the
 * stream's pass (user code, a timer, another stream's callback) goes straight
 * to libzmq, which processes the socket's commands and so resets ZMQ_FD. The
 * stream must still be served (docs/design.md: such a send re-reads ZMQ_EVENTS or
 * puts the stream on the ready-list); otherwise the message waits forever. */
typedef enum { OUTSIDE_USER, OUTSIDE_TIMER, OUTSIDE_OTHER_STREAM } outside_t;

typedef struct edge_case {
    zev_stream_t *x;
    void *x_peer;
    int x_fd;
    size_t x_got, bad, outside_sends;
} edge_case_t;

static void wait_fd_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc;
    do
        rc = poll(&p, 1, 2000);
    while (rc < 0 && errno == EINTR);
    cr_assert_eq(rc, 1, "ZMQ_FD never became readable for the incoming message");
}

/* The peer's message lands (ZMQ_FD readable), then a direct send on x. */
static void outside_send(edge_case_t *e)
{
    cr_assert_eq(zev_stream_sending(e->x), 0, "the queue must be empty: a direct send");
    cr_assert_eq(zmq_send(e->x_peer, "to-x", 4, 0), 4);
    wait_fd_readable(e->x_fd);
    cr_assert_eq(zev_stream_send(e->x, "from-outside", 12, 0), 0, "send: %s",
                 zmq_strerror(errno));
    e->outside_sends++;
}

static void edge_x_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    edge_case_t *e = arg;
    if (zev_msg_parts(m) != 1 || !part_is(m, 0, "to-x", 4))
        e->bad++;
    e->x_got++;
}

static void edge_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    outside_send(arg);
}

static void edge_a_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    outside_send(arg);
}

static void edge_consumed_by_outside_send(const char *transport, outside_t mode)
{
    const size_t rounds = 20;
    void *ctx = zmq_ctx_new();
    zev_loop_t *loop = test_loop_new();
    void *x = test_socket(ctx, ZMQ_DEALER);
    edge_case_t e = {.x_peer = test_socket(ctx, ZMQ_DEALER)};
    test_set_int(e.x_peer, ZMQ_RCVTIMEO, 5000);
    test_bind_connect(x, e.x_peer, transport);
    size_t len = sizeof e.x_fd;
    cr_assert_eq(zmq_getsockopt(x, ZMQ_FD, &e.x_fd, &len), 0);
    e.x = zev_stream_new(loop, x);
    cr_assert_not_null(e.x);
    cr_assert_eq(zev_stream_on_recv(e.x, edge_x_recv, &e), 0);

    void *a = NULL, *a_peer = NULL;
    if (mode == OUTSIDE_OTHER_STREAM) {
        a = test_socket(ctx, ZMQ_PULL);
        a_peer = test_socket(ctx, ZMQ_PUSH);
        test_bind_connect(a, a_peer, transport);
        zev_stream_t *sa = zev_stream_new(loop, a);
        cr_assert_not_null(sa);
        cr_assert_eq(zev_stream_on_recv(sa, edge_a_recv, &e), 0);
    }

    for (size_t r = 0; r < rounds; r++) {
        run_until_idle(loop, 2000); /* x is off the ready-list */
        switch (mode) {
        case OUTSIDE_USER:
            outside_send(&e);
            break;
        case OUTSIDE_TIMER:
            cr_assert_not_null(zev_timer_start(loop, 0, 0, edge_timer, &e));
            break;
        case OUTSIDE_OTHER_STREAM:
            cr_assert_eq(zmq_send(a_peer, "go", 2, 0), 2);
            break;
        }
        uint64_t deadline = test_ms() + 3000;
        run_until_count_by(loop, &e.x_got, r + 1, deadline,
                           "message for an idle stream whose edge an outside send consumed");
        char buf[16];
        cr_assert_eq(zmq_recv(e.x_peer, buf, sizeof buf, 0), 12, "the outside send: %s",
                     zmq_strerror(errno));
        cr_assert_eq(memcmp(buf, "from-outside", 12), 0);
    }
    cr_assert_eq(e.outside_sends, rounds);
    cr_assert_eq(e.x_got, rounds);
    cr_assert_eq(e.bad, 0);

    zev_loop_destroy(loop);
    test_close(x);
    test_close(e.x_peer);
    if (a) {
        test_close(a);
        test_close(a_peer);
    }
    zmq_ctx_term(ctx);
}

Test(stream_edge, outside_send_consumes_edge_user_inproc, .timeout = 30)
{
    edge_consumed_by_outside_send("inproc", OUTSIDE_USER);
}

Test(stream_edge, outside_send_consumes_edge_user_tcp, .timeout = 30)
{
    edge_consumed_by_outside_send("tcp", OUTSIDE_USER);
}

Test(stream_edge, outside_send_consumes_edge_timer_inproc, .timeout = 30)
{
    edge_consumed_by_outside_send("inproc", OUTSIDE_TIMER);
}

Test(stream_edge, outside_send_consumes_edge_timer_tcp, .timeout = 30)
{
    edge_consumed_by_outside_send("tcp", OUTSIDE_TIMER);
}

Test(stream_edge, outside_send_consumes_edge_other_stream_inproc, .timeout = 30)
{
    edge_consumed_by_outside_send("inproc", OUTSIDE_OTHER_STREAM);
}

Test(stream_edge, outside_send_consumes_edge_other_stream_tcp, .timeout = 30)
{
    edge_consumed_by_outside_send("tcp", OUTSIDE_OTHER_STREAM);
}

/* ================================================================ fairness */

#define FAIR_BATCH 8u
#define FAIR_BACKLOG 100000
#define FAIR_ROUNDS 40
#define FAIR_SEQ_MAX 100000

typedef struct fair {
    void *fire_push, *quiet_push;
    char seq[FAIR_SEQ_MAX]; /* 'F' firehose callback, 'Q' quiet callback, 's' quiet sent */
    size_t seq_len;
    size_t fire, quiet, next_trigger, errors;
    int pending;
} fair_t;

static void fair_log(fair_t *f, char c)
{
    cr_assert_lt(f->seq_len, FAIR_SEQ_MAX, "sequence log overflow");
    f->seq[f->seq_len++] = c;
}

static void fire_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    fair_t *f = arg;
    fair_log(f, 'F');
    f->fire++;
    /* Keep the backlog endless: one in for every one out. */
    if (zmq_send(f->fire_push, "f", 1, ZMQ_DONTWAIT) != 1)
        f->errors++;
    if (!f->pending && f->quiet < FAIR_ROUNDS && f->fire >= f->next_trigger) {
        if (zmq_send(f->quiet_push, "q", 1, ZMQ_DONTWAIT) != 1)
            f->errors++;
        fair_log(f, 's');
        f->pending = 1;
    }
}

static void quiet_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    fair_t *f = arg;
    fair_log(f, 'Q');
    if (zev_msg_parts(m) != 1 || zev_msg_size(m, 0) != 1 || *(const char *)zev_msg_data(m, 0) != 'q')
        f->errors++;
    f->quiet++;
    f->pending = 0;
    /* Vary where in the firehose's batch the next quiet message lands. */
    f->next_trigger = f->fire + 20 + f->quiet * 3;
}

Test(stream_edge, fairness_quiet_stream_not_starved, .timeout = 60)
{
    void *ctx = zmq_ctx_new();
    zev_loop_t *loop = test_loop_new_opts(FAIR_BATCH, 0);
    fair_t *f = calloc(1, sizeof *f);
    cr_assert_not_null(f);

    void *fire_pull = test_socket(ctx, ZMQ_PULL);
    void *quiet_pull = test_socket(ctx, ZMQ_PULL);
    f->fire_push = test_socket(ctx, ZMQ_PUSH);
    f->quiet_push = test_socket(ctx, ZMQ_PUSH);
    test_set_int(fire_pull, ZMQ_RCVHWM, 2 * FAIR_BACKLOG);
    test_set_int(f->fire_push, ZMQ_SNDHWM, 2 * FAIR_BACKLOG);
    test_bind_connect(fire_pull, f->fire_push, "inproc");
    test_bind_connect(quiet_pull, f->quiet_push, "inproc");
    for (int i = 0; i < FAIR_BACKLOG; i++)
        cr_assert_eq(zmq_send(f->fire_push, "f", 1, ZMQ_DONTWAIT), 1, "prefill %d: %s", i,
                     zmq_strerror(errno));

    zev_stream_t *fire = zev_stream_new(loop, fire_pull);
    zev_stream_t *quiet = zev_stream_new(loop, quiet_pull);
    cr_assert(fire && quiet);
    f->next_trigger = 50;
    cr_assert_eq(zev_stream_on_recv(fire, fire_recv, f), 0);
    cr_assert_eq(zev_stream_on_recv(quiet, quiet_recv, f), 0);

    test_run_until_count(loop, &f->quiet, FAIR_ROUNDS, WATCHDOG_MS);
    cr_assert_eq(f->errors, 0);

    /* Check the recorded sequence: after each 's', at most 2*batch-1 'F'
     * before the 'Q'; and the firehose never ran dry. */
    size_t rounds = 0, worst = 0;
    for (size_t i = 0; i < f->seq_len; i++) {
        if (f->seq[i] != 's')
            continue;
        size_t fires = 0, j = i + 1;
        while (j < f->seq_len && f->seq[j] != 'Q')
            fires += f->seq[j++] == 'F';
        cr_assert_lt(j, f->seq_len, "quiet message %zu never handled", rounds);
        cr_assert_leq(fires, 2 * FAIR_BATCH - 1,
                      "round %zu: quiet message waited behind %zu firehose messages (batch %u)",
                      rounds, fires, FAIR_BATCH);
        if (fires > worst)
            worst = fires;
        rounds++;
    }
    cr_assert_eq(rounds, FAIR_ROUNDS);
    cr_log_info("fairness: worst wait %zu firehose messages (bound %u)", worst,
                2 * FAIR_BATCH - 1);
    int events = 0;
    size_t elen = sizeof events;
    cr_assert_eq(zmq_getsockopt(fire_pull, ZMQ_EVENTS, &events, &elen), 0);
    cr_assert(events & ZMQ_POLLIN, "the firehose ran dry: the test proved nothing");

    zev_loop_destroy(loop);
    test_close(fire_pull);
    test_close(quiet_pull);
    test_close(f->fire_push);
    test_close(f->quiet_push);
    zmq_ctx_term(ctx);
    free(f);
}

/* ============================================= ZMQ_FD set, ZMQ_EVENTS == 0 */

typedef struct filtered {
    size_t a, bad;
    int round_bad;
} filtered_t;

static void filtered_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    filtered_t *t = arg;
    char want[32];
    snprintf(want, sizeof want, "A%zu", t->a);
    if (zev_msg_parts(m) != 1 || zev_msg_size(m, 0) != strlen(want) ||
        memcmp(zev_msg_data(m, 0), want, strlen(want)) != 0)
        t->bad++;
    t->a++;
}

/* The XPUB in manual mode subscribes the SUB's pipe to everything, so all
 * the "B" traffic crosses the pipe and is dropped by the SUB's own filter
 * inside ZMQ_EVENTS / zmq_recv: the fd fires, ZMQ_EVENTS says 0. */
static void events_zero(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_XPUB, ZMQ_SUB, NULL); /* options first */
    void *pub = p.a, *sub = p.b;
    test_set_int(pub, ZMQ_XPUB_MANUAL, 1);
    test_set_int(pub, ZMQ_SNDHWM, 0); /* nothing may be dropped at the HWM, "A" least of all */
    test_set_int(pub, ZMQ_RCVTIMEO, 5000);
    test_set_int(sub, ZMQ_RCVHWM, 0);
    cr_assert_eq(zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "A", 1), 0);
    test_bind_connect(pub, sub, transport);

    filtered_t t = {0};
    zev_stream_t *s = zev_stream_new(p.loop, sub);
    cr_assert_not_null(s);
    cr_assert_eq(zev_stream_on_recv(s, filtered_recv, &t), 0);

    char buf[16];
    int rc = zmq_recv(pub, buf, sizeof buf, 0);
    cr_assert_eq(rc, 2, "subscription at the XPUB: %d (%s)", rc, zmq_strerror(errno));
    cr_assert(buf[0] == 1 && buf[1] == 'A');
    cr_assert_eq(zmq_setsockopt(pub, ZMQ_SUBSCRIBE, "", 0), 0); /* this pipe gets everything */

    const size_t rounds = 5;
    for (size_t r = 0; r < rounds; r++) {
        for (int k = 0; k < 10000; k++) {
            char b[32];
            int len = snprintf(b, sizeof b, "B%zu-%d", r, k);
            cr_assert_eq(zmq_send(pub, b, (size_t)len, 0), len);
        }
        int iters = run_until_idle(p.loop, 2000);
        if (strcmp(transport, "inproc") == 0) /* everything was there at once */
            cr_assert_leq(iters, 10, "%d iterations to go idle after filtered-out traffic",
                          iters);
        cr_assert_eq(t.a, r, "a filtered-out message was delivered");
        char a[32];
        int len = snprintf(a, sizeof a, "A%zu", r);
        cr_assert_eq(zmq_send(pub, a, (size_t)len, 0), len);
        test_run_until_count(p.loop, &t.a, r + 1, 5000);
        run_until_idle(p.loop, 2000);
    }
    cr_assert_eq(t.a, rounds);
    cr_assert_eq(t.bad, 0, "%zu wrong messages delivered", t.bad);

    test_pair_close(&p);
}

Test(stream_edge, events_zero_inproc, .timeout = 30)
{
    events_zero("inproc");
}

Test(stream_edge, events_zero_tcp, .timeout = 30)
{
    events_zero("tcp");
}

/* ========================================== ROUTER_MANDATORY, a full pipe */

#define RM_MSGS 100
#define RM_MAX_REPORTS 256

typedef struct rmand {
    size_t hellos;
    int status[RM_MAX_REPORTS];
    size_t reported;
} rmand_t;

static void rm_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rmand_t *r = arg;
    cr_assert_eq(zev_msg_parts(m), 2);
    cr_assert_eq(zev_msg_size(m, 1), 5);
    cr_assert_eq(memcmp(zev_msg_data(m, 1), "hello", 5), 0);
    r->hellos++;
}

static void rm_sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    rmand_t *r = arg;
    cr_assert_lt(r->reported, RM_MAX_REPORTS);
    r->status[r->reported++] = status;
}

static void rm_send(zev_stream_t *s, const char *id, uint32_t v)
{
    cr_assert_eq(zev_stream_send(s, id, strlen(id), ZMQ_SNDMORE), 0, "send id %s: %s", id,
                 zmq_strerror(errno));
    cr_assert_eq(zev_stream_send(s, &v, sizeof v, 0), 0, "send body: %s", zmq_strerror(errno));
}

static void router_mandatory_blocked(int second_peer)
{
    void *ctx = zmq_ctx_new();
    zev_loop_t *loop = test_loop_new();
    void *router = test_socket(ctx, ZMQ_ROUTER);
    void *d = test_socket(ctx, ZMQ_DEALER);
    void *e = second_peer ? test_socket(ctx, ZMQ_DEALER) : NULL;
    test_set_int(router, ZMQ_ROUTER_MANDATORY, 1);
    test_set_int(router, ZMQ_SNDHWM, 2);
    test_set_int(d, ZMQ_RCVHWM, 2);
    cr_assert_eq(zmq_setsockopt(d, ZMQ_ROUTING_ID, "D", 1), 0);
    char ep[256];
    test_bind_ep(router, "inproc", ep, sizeof ep);
    cr_assert_eq(zmq_connect(d, ep), 0);
    if (e) {
        cr_assert_eq(zmq_setsockopt(e, ZMQ_ROUTING_ID, "E", 1), 0);
        cr_assert_eq(zmq_connect(e, ep), 0);
    }

    rmand_t r = {0};
    zev_stream_t *s = zev_stream_new(loop, router);
    cr_assert_not_null(s);
    cr_assert_eq(zev_stream_on_recv(s, rm_recv, &r), 0);
    cr_assert_eq(zev_stream_on_send(s, rm_sent, &r), 0);

    /* The router learns the identities from the peers' first messages. */
    cr_assert_eq(zmq_send(d, "hello", 5, 0), 5);
    if (e)
        cr_assert_eq(zmq_send(e, "hello", 5, 0), 5);
    test_run_until_count(loop, &r.hellos, e ? 2 : 1, 5000);

    /* D never reads: its pipe fills after a few messages, the rest queue.
     * Behind them: a message to an unknown identity, more for D, and (with
     * E) one for E, whose pipe has room: POLLOUT stays true while the head
     * message (for D) gets EAGAIN. One blocked peer holds the queue (FIFO). */
    uint32_t v = 0;
    for (; v < RM_MSGS / 2; v++)
        rm_send(s, "D", v);
    rm_send(s, "Z", 0xdead);
    for (; v < RM_MSGS; v++)
        rm_send(s, "D", v);
    if (e)
        rm_send(s, "E", 0xe);
    const size_t total = RM_MSGS + 1 + (e ? 1 : 0);
    cr_assert_eq(zev_stream_sending(s), 1);
    size_t direct = total - queued(s);
    cr_assert_lt(direct, 10, "%zu messages went through a pipe of HWM 2+2", direct);

    /* One second in that state: the loop must sleep, not spin. */
    uint64_t cpu0 = cpu_ms(), t0 = test_ms();
    size_t iterations = 0;
    while (test_ms() - t0 < 1000) {
        cr_assert_geq(zev_loop_run_once(loop, 50), 0);
        iterations++;
    }
    uint64_t cpu = cpu_ms() - cpu0;
    cr_log_info("router_mandatory(%s peers): %llu ms CPU over 1 s, %zu iterations",
                e ? "2" : "1", (unsigned long long)cpu, iterations);
    cr_assert_lt(cpu, 300, "the blocked ROUTER stream spun: %llu ms CPU in 1 s, %zu iterations",
                 (unsigned long long)cpu, iterations);
    cr_assert_eq(r.reported, direct, "on_send reported %zu, %zu went out", r.reported, direct);
    for (size_t i = 0; i < r.reported; i++)
        cr_assert_eq(r.status[i], 0);
    cr_assert_eq(queued(s), total - direct, "a queued message was dropped while blocked");
    if (e) {
        char b[8];
        cr_assert_eq(zmq_recv(e, b, sizeof b, ZMQ_DONTWAIT), -1, "E's message overtook D's");
        cr_assert_eq(errno, EAGAIN);
    }

    /* D drains: every message goes out, in order. */
    uint32_t next = 0;
    uint64_t deadline = test_ms() + 5000;
    while (next < RM_MSGS) {
        cr_assert(test_ms() < deadline, "watchdog: D got %u of %u", next, RM_MSGS);
        uint32_t got;
        int rc;
        while ((rc = zmq_recv(d, &got, sizeof got, ZMQ_DONTWAIT)) >= 0) {
            cr_assert_eq(rc, (int)sizeof got);
            cr_assert_eq(got, next, "D got %u, expected %u", got, next);
            next++;
        }
        cr_assert_eq(errno, EAGAIN);
        cr_assert_geq(zev_loop_run_once(loop, 1), 0);
    }
    test_run_until_count(loop, &r.reported, total, 5000);
    cr_assert_eq(r.reported, total);
    for (size_t i = 0; i < total; i++) {
        int want = i == RM_MSGS / 2 ? EHOSTUNREACH : 0;
        cr_assert_eq(r.status[i], want, "on_send #%zu: %s, expected %s", i,
                     zmq_strerror(r.status[i]), zmq_strerror(want));
    }
    if (e) {
        uint32_t got = 0;
        test_set_int(e, ZMQ_RCVTIMEO, 5000);
        cr_assert_eq(zmq_recv(e, &got, sizeof got, 0), (int)sizeof got);
        cr_assert_eq(got, 0xe);
    }
    cr_assert_eq(zev_stream_sending(s), 0);

    /* With the queue empty, a message to an unknown identity is refused at
     * once, as zev.h documents ("another errno libzmq gave at once"): -1 /
     * EHOSTUNREACH, nothing taken, hence nothing reported by on_send. */
    errno = 0;
    cr_assert_eq(zev_stream_send(s, "nobody", 6, ZMQ_SNDMORE), -1);
    cr_assert_eq(errno, EHOSTUNREACH, "errno %d (%s)", errno, zmq_strerror(errno));
    cr_assert_eq(zev_stream_sending(s), 0);
    for (int i = 0; i < 5; i++)
        zev_loop_run_once(loop, 0);
    cr_assert_eq(r.reported, total, "a refused send was reported by on_send");
    /* ... and the stream is still usable. */
    rm_send(s, "D", 4242);
    test_run_until_count(loop, &r.reported, total + 1, 5000);
    cr_assert_eq(r.status[total], 0);
    uint32_t got = 0;
    test_set_int(d, ZMQ_RCVTIMEO, 5000);
    cr_assert_eq(zmq_recv(d, &got, sizeof got, 0), (int)sizeof got);
    cr_assert_eq(got, 4242);

    zev_loop_destroy(loop);
    test_close(router);
    test_close(d);
    if (e)
        test_close(e);
    zmq_ctx_term(ctx);
}

Test(stream_edge, router_mandatory_full_pipe_no_spin, .timeout = 30)
{
    router_mandatory_blocked(0);
}

Test(stream_edge, router_mandatory_full_pipe_pollout_no_spin, .timeout = 30)
{
    router_mandatory_blocked(1);
}

/* ====================================================== REQ sends twice */

#define REQ_N 100

typedef struct reqst {
    size_t got, bad, reported, report_bad;
} reqst_t;

static void req_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    reqst_t *q = arg;
    char want[32];
    int len = snprintf(want, sizeof want, "rep-%zu", q->got);
    if (zev_msg_parts(m) != 1 || zev_msg_size(m, 0) != (size_t)len ||
        memcmp(zev_msg_data(m, 0), want, (size_t)len) != 0)
        q->bad++;
    q->got++;
}

static void req_sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    reqst_t *q = arg;
    q->reported++;
    if (status)
        q->report_bad++;
}

static void req_queue(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_REP, ZMQ_REQ, transport);
    void *rep = p.a, *req = p.b;

    reqst_t q = {0};
    zev_stream_t *s = zev_stream_new(p.loop, req);
    cr_assert_not_null(s);
    cr_assert_eq(zev_stream_on_recv(s, req_recv, &q), 0);
    cr_assert_eq(zev_stream_on_send(s, req_sent, &q), 0);

    /* All at once: the first goes out, the rest get EFSM from libzmq and
     * wait in the queue; the send calls all succeed. */
    for (int i = 0; i < REQ_N; i++) {
        char b[32];
        int len = snprintf(b, sizeof b, "req-%d", i);
        cr_assert_eq(zev_stream_send(s, b, (size_t)len, 0), 0, "send %d: %s", i,
                     zmq_strerror(errno));
    }
    cr_assert_eq(queued(s), REQ_N - 1);

    /* A raw REP answers each request; the next request goes out only after
     * the stream received the previous reply. */
    size_t served = 0;
    uint64_t deadline = test_ms() + 10000;
    while (q.got < REQ_N) {
        cr_assert(test_ms() < deadline, "watchdog: %zu of %d replies", q.got, REQ_N);
        char b[32];
        int rc = zmq_recv(rep, b, sizeof b, ZMQ_DONTWAIT);
        if (rc >= 0) {
            char want[32];
            int len = snprintf(want, sizeof want, "req-%zu", served);
            cr_assert_eq(rc, len);
            cr_assert_eq(memcmp(b, want, (size_t)len), 0, "REP got %.*s, expected %s", rc, b,
                         want);
            cr_assert_eq(q.got, served, "request %zu arrived before reply %zu", served,
                         served - 1);
            len = snprintf(b, sizeof b, "rep-%zu", served);
            cr_assert_eq(zmq_send(rep, b, (size_t)len, 0), len);
            served++;
        } else {
            cr_assert_eq(errno, EAGAIN);
        }
        cr_assert_geq(zev_loop_run_once(p.loop, 1), 0);
    }
    test_run_until_count(p.loop, &q.reported, REQ_N, 5000);
    cr_assert_eq(served, REQ_N);
    cr_assert_eq(q.got, REQ_N);
    cr_assert_eq(q.bad, 0);
    cr_assert_eq(q.reported, REQ_N);
    cr_assert_eq(q.report_bad, 0, "EFSM reached on_send: it must be treated like EAGAIN");
    cr_assert_eq(zev_stream_sending(s), 0);

    test_pair_close(&p);
}

Test(stream_edge, req_second_send_waits_for_reply_inproc, .timeout = 30)
{
    req_queue("inproc");
}

Test(stream_edge, req_second_send_waits_for_reply_tcp, .timeout = 30)
{
    req_queue("tcp");
}

/* ============================================ all socket types, transports */

typedef struct pair_case {
    const char *name;
    int ta, tb;        /* a connects and speaks first; b binds */
    const char *first; /* a's message (b's expected) */
    size_t first_len;
    const char *reply; /* b's answer (a's expected), NULL: none */
} pair_case_t;

static const pair_case_t pair_cases[] = {
    {"PAIR", ZMQ_PAIR, ZMQ_PAIR, "ping", 4, "pong"},
    {"PUSH/PULL", ZMQ_PUSH, ZMQ_PULL, "ping", 4, NULL},
    {"PUB/SUB", ZMQ_PUB, ZMQ_SUB, "t-ping", 6, NULL},
    {"XSUB/XPUB", ZMQ_XSUB, ZMQ_XPUB, "\001t", 2, "t-pong"},
    {"REQ/REP", ZMQ_REQ, ZMQ_REP, "ping", 4, "pong"},
    {"DEALER/ROUTER", ZMQ_DEALER, ZMQ_ROUTER, "ping", 4, "pong"},
};

typedef struct pair_run {
    const pair_case_t *c;
    zev_stream_t *a, *b;
    size_t a_got, b_got, bad;
    int a_errno, b_errno;
    char detail[128];
} pair_run_t;

static void pair_bad(pair_run_t *r, const char *what)
{
    if (!r->bad)
        snprintf(r->detail, sizeof r->detail, "%s", what);
    r->bad++;
}

static void pair_b_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    pair_run_t *r = arg;
    const pair_case_t *c = r->c;
    r->b_got++;
    size_t body = c->tb == ZMQ_ROUTER ? 1 : 0; /* ROUTER: [identity, body] */
    if (zev_msg_parts(m) != body + 1 || !part_is(m, body, c->first, c->first_len)) {
        pair_bad(r, "b received a wrong message");
        return;
    }
    if (!c->reply || r->b_got > 1)
        return;
    if (body && zev_stream_send(s, zev_msg_data(m, 0), zev_msg_size(m, 0), ZMQ_SNDMORE) < 0)
        r->b_errno = errno;
    if (zev_stream_send(s, c->reply, strlen(c->reply), 0) < 0)
        r->b_errno = errno;
}

static void pair_a_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    pair_run_t *r = arg;
    r->a_got++;
    if (zev_msg_parts(m) != 1 || !r->c->reply ||
        !part_is(m, 0, r->c->reply, strlen(r->c->reply)))
        pair_bad(r, "a received a wrong message");
}

/* PUB/SUB: the subscription takes a while to reach the publisher (slow
 * joiner), so a timer publishes until the subscriber has something; every
 * other message is off-topic and must be filtered out. */
static void pub_tick(zev_timer_t *t, void *arg)
{
    pair_run_t *r = arg;
    if (r->b_got) {
        zev_timer_cancel(t);
        return;
    }
    if (zev_stream_send(r->a, "x-nope", 6, 0) < 0 ||
        zev_stream_send(r->a, r->c->first, r->c->first_len, 0) < 0)
        r->a_errno = errno;
}

static void pair_run(const pair_case_t *c, const char *transport)
{
    test_pair_t p = test_pair_open(c->tb, c->ta, NULL); /* the fixture's a binds: here b */
    void *a = p.b, *b = p.a;
    if (c->tb == ZMQ_SUB)
        cr_assert_eq(zmq_setsockopt(b, ZMQ_SUBSCRIBE, "t", 1), 0);
    test_bind_connect(b, a, transport);

    pair_run_t r = {.c = c};
    r.a = zev_stream_new(p.loop, a);
    r.b = zev_stream_new(p.loop, b);
    cr_assert(r.a && r.b, "%s over %s: zev_stream_new: %s", c->name, transport,
              zmq_strerror(errno));
    cr_assert_eq(zev_stream_on_recv(r.b, pair_b_recv, &r), 0);
    if (c->reply)
        cr_assert_eq(zev_stream_on_recv(r.a, pair_a_recv, &r), 0);

    zev_timer_t *t = NULL;
    if (c->ta == ZMQ_PUB) {
        t = zev_timer_start(p.loop, 0, 2000, pub_tick, &r);
        cr_assert_not_null(t);
    } else {
        cr_assert_eq(zev_stream_send(r.a, c->first, c->first_len, 0), 0, "%s over %s: send: %s",
                     c->name, transport, zmq_strerror(errno));
    }
    uint64_t deadline = test_ms() + 5000;
    run_until_count_by(p.loop, &r.b_got, 1, deadline, c->name);
    if (c->reply)
        run_until_count_by(p.loop, &r.a_got, 1, deadline, c->name);
    run_until_idle(p.loop, 2000);

    cr_assert_eq(r.bad, 0, "%s over %s: %s", c->name, transport, r.detail);
    cr_assert_eq(r.a_errno, 0, "%s over %s: a: %s", c->name, transport, zmq_strerror(r.a_errno));
    cr_assert_eq(r.b_errno, 0, "%s over %s: b: %s", c->name, transport, zmq_strerror(r.b_errno));
    if (c->ta != ZMQ_PUB)
        cr_assert_eq(r.b_got, 1, "%s over %s: b got %zu", c->name, transport, r.b_got);
    cr_assert_eq(r.a_got, c->reply ? 1u : 0u, "%s over %s: a got %zu", c->name, transport,
                 r.a_got);
    cr_assert_eq(zev_stream_sending(r.a), 0);
    cr_assert_eq(zev_stream_sending(r.b), 0);

    test_pair_close(&p);
}

Test(stream_edge, all_socket_types_all_transports, .timeout = 60)
{
    static const char *const transports[] = {"inproc", "ipc", "tcp"};
    for (size_t i = 0; i < sizeof pair_cases / sizeof pair_cases[0]; i++)
        for (size_t j = 0; j < 3; j++)
            pair_run(&pair_cases[i], transports[j]);
}
