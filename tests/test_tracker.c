/*
 * Zero-copy sends and their trackers (issue #4): zev_stream_send_zc hands
 * libzmq the caller's buffer; libzmq calls the free function from its own
 * thread; zev turns that into a tracker completion on the loop thread.
 * Checked here: 100,000 sends over tcp (every free function exactly once,
 * every tracker exactly once, on the loop thread, after its free function),
 * sends still queued when the stream is closed (ECANCELED) or when the peer
 * never connects (buffers held by zev and by libzmq), a loop destroyed with
 * sends outstanding, the copy path for small buffers, and failed sends that
 * take nothing. Every test runs on the backend ctest names in
 * ZEV_TEST_BACKEND.
 *
 * Free functions are counted per buffer (the hint is the sequence number),
 * so "exactly once" is checked for each one, not only as a total.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

TestSuite(tracker, .timeout = 120);

/* ------------------------------------------------------------------ helpers */

static uint8_t ref[4096 + 256]; /* ref[k] == (uint8_t)k */

static void ref_init(void)
{
    for (size_t k = 0; k < sizeof ref; k++)
        ref[k] = (uint8_t)k;
}

static size_t size_64_4096(size_t seq)
{
    return 64 + (seq * 97u) % 4033u; /* 64 .. 4096 B: all above ZEV_ZC_COPY_MAX */
}

/* Buffer seq: a 4-byte header with seq (when it fits), then a window of ref. */
static void fill(uint8_t *buf, size_t len, size_t seq)
{
    uint32_t hdr = (uint32_t)seq;
    if (len >= 4) {
        memcpy(buf, &hdr, 4);
        memcpy(buf + 4, ref + (seq & 0xffu), len - 4);
    } else if (len) {
        memcpy(buf, ref + (seq & 0xffu), len);
    }
}

static bool content_ok(const uint8_t *buf, size_t len, size_t seq)
{
    uint32_t hdr;
    if (len >= 4) {
        memcpy(&hdr, buf, 4);
        return hdr == (uint32_t)seq && memcmp(buf + 4, ref + (seq & 0xffu), len - 4) == 0;
    }
    return len == 0 || memcmp(buf, ref + (seq & 0xffu), len) == 0;
}

/* A tcp port on 127.0.0.1 that refuses connections for the whole test: a
 * socket bound to it that never listens (so no one else can take it). */
static int dead_port(char *ep, size_t len)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t al = sizeof a;
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &al), 0);
    snprintf(ep, len, "tcp://127.0.0.1:%u", (unsigned)ntohs(a.sin_port));
    return fd;
}

/* Runs the loop until a callback calls zev_loop_stop; 0 if it did, 1 if the
 * watchdog (test_watchdog_t: a tracker completion that fails to wake the
 * loop shows as a hang) had to stop it after ms. */
static int run_loop(zev_loop_t *loop, int ms)
{
    test_watchdog_t w;
    test_watchdog_start(&w, loop, ms);
    cr_assert_eq(zev_loop_run(loop), 0, "zev_loop_run: %s", zmq_strerror(errno));
    return test_watchdog_stop(&w);
}

/* ------------------------------------------------------ tracked sending */

/* One test's bookkeeping; the free function reaches it through T (the
 * hint carries the sequence number). */
typedef struct {
    pthread_t loop_thread;
    zev_loop_t *loop;
    size_t n;
    size_t (*size)(size_t seq);
    atomic_uchar *freed;      /* per buffer: free function runs (any thread) */
    unsigned char *done_cb;   /* per tracker: on_done runs (loop thread) */
    zev_tracker_t **trk;
    atomic_size_t freed_total;
    atomic_size_t bad_free; /* unknown hint or wrong contents at free time */
    atomic_size_t bad_thread;
    volatile size_t done_total;
    size_t done_before_free, done_bad;
    volatile size_t received;
    size_t recv_bad;
    size_t status_ok, status_cancelled, status_other;
    volatile size_t reported;
    volatile int closed;
    /* the pump: sends from the loop thread while the queue takes them */
    zev_stream_t *tx;
    size_t next;   /* next seq to send */
    uint8_t *held; /* buffer of `next` after a refused send (still ours) */
    size_t eagain, eagain_bad;
    size_t stop_recv, stop_done; /* stop the loop when both are reached */
} tctx_t;

static tctx_t *T;

static void tctx_init(tctx_t *c, zev_loop_t *loop, size_t n, size_t (*size)(size_t))
{
    *c = (tctx_t){.loop_thread = pthread_self(), .loop = loop, .n = n, .size = size,
                  .stop_recv = SIZE_MAX, .stop_done = SIZE_MAX};
    c->freed = calloc(n, sizeof *c->freed);
    c->done_cb = calloc(n, 1);
    c->trk = calloc(n, sizeof *c->trk);
    cr_assert(c->freed && c->done_cb && c->trk);
    for (size_t i = 0; i < n; i++)
        atomic_init(&c->freed[i], 0);
    atomic_init(&c->freed_total, 0);
    atomic_init(&c->bad_free, 0);
    atomic_init(&c->bad_thread, 0);
    T = c;
}

static void tctx_free(tctx_t *c)
{
    free((void *)c->freed);
    free(c->done_cb);
    free(c->trk);
    free(c->held);
    T = NULL;
}

static void maybe_stop(tctx_t *c)
{
    if (c->received >= c->stop_recv && c->done_total >= c->stop_done)
        zev_loop_stop(c->loop);
}

/* libzmq calls this from its I/O thread (or zev on the loop thread for a
 * message it never sent, or for a copied small buffer). */
static void zc_free(void *data, void *hint)
{
    tctx_t *c = T;
    size_t seq = (size_t)(uintptr_t)hint - 1;
    if (!c)
        abort(); /* a free function after the test ended */
    if (seq >= c->n) {
        atomic_fetch_add(&c->bad_free, 1);
        return;
    }
    if (!content_ok(data, c->size(seq), seq))
        atomic_fetch_add(&c->bad_free, 1);
    free(data);
    atomic_fetch_add(&c->freed[seq], 1);
    atomic_fetch_add(&c->freed_total, 1);
}

static void zc_done(zev_tracker_t *t, void *arg)
{
    tctx_t *c = T;
    size_t seq = (size_t)(uintptr_t)arg;
    if (!pthread_equal(pthread_self(), c->loop_thread))
        atomic_fetch_add(&c->bad_thread, 1);
    if (atomic_load(&c->freed[seq]) != 1)
        c->done_before_free++;
    if (zev_tracker_done(t) != 1 || c->trk[seq] != t)
        c->done_bad++;
    c->done_cb[seq]++;
    c->done_total++;
    maybe_stop(c);
}

static uint8_t *new_buf(tctx_t *c, size_t seq)
{
    size_t len = c->size(seq);
    uint8_t *buf = malloc(len ? len : 1);
    cr_assert_not_null(buf);
    fill(buf, len, seq);
    return buf;
}

/* One zero-copy send of buffer seq with a tracker; 0 or -1 (errno). On
 * failure checks that nothing was taken. */
static int send_one(tctx_t *c, zev_stream_t *s, size_t seq, uint8_t *buf)
{
    zev_tracker_t *const sentinel = (zev_tracker_t *)&c->trk; /* any non-NULL */
    zev_tracker_t *t = sentinel;
    int rc = zev_stream_send_zc(s, buf, c->size(seq), zc_free, (void *)(uintptr_t)(seq + 1), &t);
    if (rc < 0) {
        int err = errno;
        if (t != sentinel || atomic_load(&c->freed[seq]) != 0)
            c->eagain_bad++;
        errno = err;
        return -1;
    }
    cr_assert_neq(t, sentinel);
    cr_assert_not_null(t);
    c->trk[seq] = t;
    cr_assert_eq(zev_tracker_on_done(t, zc_done, (void *)(uintptr_t)seq), 0);
    return 0;
}

/* Sends until the stream's queue refuses (EAGAIN) or everything is sent. A
 * refused buffer is still ours: it is sent again on the next pump. */
static void pump(tctx_t *c)
{
    while (c->next < c->n) {
        size_t seq = c->next;
        uint8_t *buf = c->held ? c->held : new_buf(c, seq);
        c->held = NULL;
        if (send_one(c, c->tx, seq, buf) < 0) {
            cr_assert_eq(errno, EAGAIN, "send_zc: %s", zmq_strerror(errno));
            /* Not taken: the buffer is intact and untouched by free_fn. */
            if (!content_ok(buf, c->size(seq), seq))
                c->eagain_bad++;
            c->held = buf;
            c->eagain++;
            return;
        }
        c->next++;
    }
}

static void on_send_count(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    tctx_t *c = arg;
    if (status == 0)
        c->status_ok++;
    else if (status == ECANCELED)
        c->status_cancelled++;
    else
        c->status_other++;
    c->reported++;
    /* Room again in the queue: the pump refills it from here. */
    if (c->tx == s && c->held && c->reported % 256 == 0)
        pump(c);
}

static void on_recv_check(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    tctx_t *c = arg;
    size_t seq = c->received;
    if (zev_msg_parts(m) != 1 || seq >= c->n || zev_msg_size(m, 0) != c->size(seq) ||
        !content_ok(zev_msg_data(m, 0), zev_msg_size(m, 0), seq))
        c->recv_bad++;
    c->received++;
    maybe_stop(c);
}

static void on_close_flag(zev_stream_t *s, void *arg)
{
    (void)s;
    ((tctx_t *)arg)->closed = 1;
}

/* Every free function ran exactly once; every tracker completed exactly
 * once with its callback, on the loop thread, after its free function. */
static void expect_all_once(tctx_t *c, size_t n, bool callbacks)
{
    size_t not_once = 0, cb_not_once = 0, not_done = 0;
    for (size_t i = 0; i < n; i++) {
        not_once += atomic_load(&c->freed[i]) != 1;
        cb_not_once += c->done_cb[i] != (callbacks ? 1 : 0);
        not_done += c->trk[i] && zev_tracker_done(c->trk[i]) != 1;
    }
    cr_expect_eq(not_once, 0, "%zu of %zu free functions did not run exactly once", not_once, n);
    cr_expect_eq(atomic_load(&c->freed_total), n);
    cr_expect_eq(cb_not_once, 0, "%zu of %zu tracker callbacks did not run %s", cb_not_once, n,
                 callbacks ? "exactly once" : "zero times");
    cr_expect_eq(not_done, 0, "%zu trackers not done", not_done);
    cr_expect_eq(atomic_load(&c->bad_free), 0, "free functions with bad hint or contents");
    cr_expect_eq(atomic_load(&c->bad_thread), 0, "tracker callbacks off the loop thread");
    cr_expect_eq(c->done_before_free, 0, "tracker completed before its free function ran");
    cr_expect_eq(c->done_bad, 0, "on_done saw zev_tracker_done != 1 or another tracker");
}

static void release_all(tctx_t *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (c->trk[i])
            cr_assert_eq(zev_tracker_release(c->trk[i]), 0);
}

/* ----------------------------------------------------------------- tests */

Test(tracker, tcp_100k_each_free_and_tracker_once_on_loop_thread)
{
    ref_init();
    const size_t n = 100000;
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "tcp");
    tctx_t c;
    tctx_init(&c, p.loop, n, size_64_4096);
    c.stop_recv = n;
    c.stop_done = n;

    zev_stream_t *rx = zev_stream_new(p.loop, p.a);
    zev_stream_t *tx = zev_stream_new(p.loop, p.b);
    cr_assert(rx && tx);
    c.tx = tx;
    cr_assert_eq(zev_stream_on_recv(rx, on_recv_check, &c), 0);
    cr_assert_eq(zev_stream_on_send(tx, on_send_count, &c), 0);

    pump(&c); /* fills the queue (1000 by default); on_send refills it */
    cr_assert_eq(run_loop(p.loop, 100000), 0,
                 "watchdog: sent %zu, received %zu, freed %zu, trackers done %zu of %zu", c.next,
                 (size_t)c.received, atomic_load(&c.freed_total), (size_t)c.done_total, n);

    cr_expect_eq(c.next, n);
    cr_expect_eq(c.received, n);
    cr_expect_eq(c.recv_bad, 0, "%zu messages with wrong contents", c.recv_bad);
    cr_expect_eq(c.status_ok, n);
    cr_expect_eq(c.status_cancelled + c.status_other, 0);
    cr_expect_gt(c.eagain, 0, "the queue bound was never reached");
    cr_expect_eq(c.eagain_bad, 0, "a refused send took the buffer or the tracker");
    expect_all_once(&c, n, true);
    release_all(&c, n);

    cr_assert_eq(test_pair_close(&p), 0);
    tctx_free(&c);
    test_expect_no_leaks();
}

static size_t size_small_mix(size_t seq)
{
    static const size_t sizes[] = {0, 1, ZEV_ZC_COPY_MAX, ZEV_ZC_COPY_MAX + 1, 64, 4096};
    return sizes[seq % 6];
}

static volatile size_t late_cb;
static void late_done(zev_tracker_t *t, void *arg)
{
    (void)t;
    (void)arg;
    late_cb++;
}

Test(tracker, small_buffers_copied_large_referenced)
{
    /* A bound PUSH with no peer yet: every message waits in zev's queue, so
     * a free function that ran before send_zc returned means a copy. */
    ref_init();
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, NULL); /* the PULL connects later */
    void *push = p.a, *pull = p.b;
    char ep[256];
    cr_assert_eq(zmq_bind(push, "tcp://127.0.0.1:*"), 0);
    test_last_endpoint(push, ep, sizeof ep);
    tctx_t c;
    tctx_init(&c, p.loop, 6, size_small_mix);
    zev_stream_t *tx = zev_stream_new(p.loop, push);
    cr_assert_not_null(tx);
    for (size_t seq = 0; seq < 6; seq++) {
        cr_assert_eq(send_one(&c, tx, seq, new_buf(&c, seq)), 0, "send_zc(%zu B): %s",
                     c.size(seq), zmq_strerror(errno));
        if (c.size(seq) <= ZEV_ZC_COPY_MAX)
            cr_expect_eq(atomic_load(&c.freed[seq]), 1, "%zu B: copied, freed before return",
                         c.size(seq));
        else
            cr_expect_eq(atomic_load(&c.freed[seq]), 0, "%zu B: referenced, not freed yet",
                         c.size(seq));
    }

    /* The peer arrives: everything is delivered with the right contents. */
    cr_assert_eq(zmq_connect(pull, ep), 0);
    zev_stream_t *rx = zev_stream_new(p.loop, pull);
    cr_assert_not_null(rx);
    cr_assert_eq(zev_stream_on_recv(rx, on_recv_check, &c), 0);
    c.stop_recv = 6;
    c.stop_done = 6;
    cr_assert_eq(run_loop(p.loop, 20000), 0, "watchdog: received %zu, trackers done %zu of 6",
                 (size_t)c.received, (size_t)c.done_total);
    cr_expect_eq(c.recv_bad, 0);
    expect_all_once(&c, 6, true);

    /* on_done on a tracker that completed already runs at once, here. */
    late_cb = 0;
    cr_assert_eq(zev_tracker_on_done(c.trk[0], late_done, NULL), 0);
    cr_expect_eq(late_cb, 1);
    release_all(&c, 6);

    cr_assert_eq(test_pair_close(&p), 0);
    tctx_free(&c);
    test_expect_no_leaks();
}

static size_t size_100_or_10(size_t seq)
{
    return seq % 2 ? 10 : 100;
}

Test(tracker, refused_send_takes_nothing)
{
    ref_init();
    test_pair_t p = test_pair_open(ZMQ_PUSH, TEST_NO_SOCKET, NULL);
    void *push = p.a;
    cr_assert_eq(zmq_bind(push, "tcp://127.0.0.1:*"), 0); /* no peer: all queued */
    tctx_t c;
    tctx_init(&c, p.loop, 6, size_100_or_10);
    zev_stream_t *tx = zev_stream_new(p.loop, push);
    cr_assert_not_null(tx);
    cr_assert_eq(zev_stream_set_max_queue(tx, 2), 0);
    cr_assert_eq(zev_stream_on_send(tx, on_send_count, &c), 0);
    cr_assert_eq(zev_stream_on_close(tx, on_close_flag, &c), 0);

    /* Taken: errno is left as it was, on both paths. */
    errno = ERANGE;
    cr_assert_eq(send_one(&c, tx, 0, new_buf(&c, 0)), 0); /* 100 B, referenced */
    cr_expect_eq(errno, ERANGE);
    cr_assert_eq(send_one(&c, tx, 1, new_buf(&c, 1)), 0); /* 10 B, copied */
    cr_expect_eq(errno, ERANGE);
    cr_expect_eq(atomic_load(&c.freed[1]), 1);

    /* Queue full: refused, for both paths; free_fn not run, *out untouched,
     * the buffers still ours (ASan would catch a free behind our back). */
    uint8_t *b2 = new_buf(&c, 2), *b3 = new_buf(&c, 3);
    errno = 0;
    cr_expect_eq(send_one(&c, tx, 2, b2), -1);
    cr_expect_eq(errno, EAGAIN);
    errno = 0;
    cr_expect_eq(send_one(&c, tx, 3, b3), -1);
    cr_expect_eq(errno, EAGAIN);
    cr_expect_eq(c.eagain_bad, 0, "a refused send ran free_fn or set the tracker");
    cr_expect(content_ok(b2, 100, 2) && content_ok(b3, 10, 3));
    memset(b2, 0xab, 100);
    memset(b3, 0xab, 10);
    free(b2);
    free(b3);

    /* Bad arguments: nothing taken either. */
    uint8_t *b4 = new_buf(&c, 4);
    zev_tracker_t *t = (zev_tracker_t *)&c;
    errno = 0;
    cr_expect_eq(zev_stream_send_zc(NULL, b4, 100, zc_free, (void *)5, &t), -1);
    cr_expect_eq(errno, EINVAL);
    errno = 0;
    cr_expect_eq(zev_stream_send_zc(tx, NULL, 100, zc_free, (void *)5, &t), -1);
    cr_expect_eq(errno, EINVAL);
    cr_expect_eq(t, (zev_tracker_t *)&c);
    cr_expect_eq(atomic_load(&c.freed[4]), 0);
    free(b4);

    /* Closing cancels the two queued sends: each free function once, each
     * tracker completes once on the loop thread. */
    cr_assert_eq(zev_stream_close(tx, 0), 0);
    c.stop_recv = 0;
    c.stop_done = 2;
    cr_assert_eq(run_loop(p.loop, 20000), 0, "watchdog: trackers done %zu of 2",
                 (size_t)c.done_total);
    cr_expect_eq(atomic_load(&c.freed_total), 2);
    expect_all_once(&c, 2, true);
    cr_expect_eq(c.status_cancelled, 2);
    cr_expect_eq(c.status_ok + c.status_other, 0);
    for (size_t i = 0; i < 100 && !c.closed; i++)
        zev_loop_run_once(p.loop, 10);
    cr_expect_eq(c.closed, 1);
    release_all(&c, 2);

    cr_assert_eq(test_pair_close(&p), 0);
    tctx_free(&c);
    test_expect_no_leaks();
}

Test(tracker, stream_closed_with_sends_queued_in_zev)
{
    /* A bound PUSH that no peer ever connects to: 5,000 sends wait in zev's
     * (unbounded) queue; half the trackers are released early. Closing the
     * stream: every send ECANCELED, every buffer freed once, every kept
     * tracker completes once on the loop thread, released ones call
     * nothing. */
    ref_init();
    const size_t n = 5000;
    test_pair_t p = test_pair_open(ZMQ_PUSH, TEST_NO_SOCKET, NULL);
    void *push = p.a;
    cr_assert_eq(zmq_bind(push, "tcp://127.0.0.1:*"), 0);
    tctx_t c;
    tctx_init(&c, p.loop, n, size_64_4096);
    zev_stream_t *tx = zev_stream_new(p.loop, push);
    cr_assert_not_null(tx);
    cr_assert_eq(zev_stream_set_max_queue(tx, 0), 0);
    cr_assert_eq(zev_stream_on_send(tx, on_send_count, &c), 0);
    cr_assert_eq(zev_stream_on_close(tx, on_close_flag, &c), 0);
    for (size_t seq = 0; seq < n; seq++)
        cr_assert_eq(send_one(&c, tx, seq, new_buf(&c, seq)), 0, "send %zu: %s", seq,
                     zmq_strerror(errno));
    for (int i = 0; i < 5; i++)
        zev_loop_run_once(p.loop, 0);
    cr_expect_eq(atomic_load(&c.freed_total), 0, "nothing can be sent, nothing freed");
    cr_expect_eq(c.done_total, 0);
    size_t done_early = 0;
    for (size_t seq = 0; seq < n; seq++)
        done_early += zev_tracker_done(c.trk[seq]) != 0;
    cr_expect_eq(done_early, 0, "trackers done before their buffers were released");
    for (size_t seq = 1; seq < n; seq += 2) {
        cr_assert_eq(zev_tracker_release(c.trk[seq]), 0);
        c.trk[seq] = NULL;
    }

    cr_assert_eq(zev_stream_close(tx, 0), 0);
    c.stop_recv = 0;
    c.stop_done = n / 2;
    cr_assert_eq(run_loop(p.loop, 30000), 0, "watchdog: trackers done %zu of %zu",
                 (size_t)c.done_total, n / 2);
    for (int i = 0; i < 100 && !c.closed; i++)
        zev_loop_run_once(p.loop, 10);
    cr_expect_eq(c.closed, 1);
    cr_expect_eq(c.status_cancelled, n, "on_send ECANCELED %zu of %zu", c.status_cancelled, n);
    cr_expect_eq(c.status_ok + c.status_other, 0);

    size_t not_once = 0, cb_wrong = 0;
    for (size_t i = 0; i < n; i++) {
        not_once += atomic_load(&c.freed[i]) != 1;
        cb_wrong += c.done_cb[i] != (i % 2 ? 0 : 1);
    }
    cr_expect_eq(not_once, 0, "%zu free functions did not run exactly once", not_once);
    cr_expect_eq(cb_wrong, 0, "%zu tracker callbacks wrong (released ones must not run)",
                 cb_wrong);
    cr_expect_eq(atomic_load(&c.bad_thread), 0);
    cr_expect_eq(c.done_before_free + c.done_bad, 0);
    release_all(&c, n);

    cr_assert_eq(test_pair_close(&p), 0);
    tctx_free(&c);
    test_expect_no_leaks();
}

Test(tracker, peer_never_connects_stream_closed_then_socket)
{
    /* A PUSH connecting to a port that refuses: libzmq takes the first
     * SNDHWM messages into its pipe (status 0), the rest wait in zev's queue.
     * Closing the stream cancels zev's part; closing the socket (linger 0)
     * makes libzmq drop its part from its own threads. Every free function
     * once, every tracker once, on the loop thread. */
    ref_init();
    const size_t n = 3000;
    char ep[64];
    int port_fd = dead_port(ep, sizeof ep);
    test_pair_t p = test_pair_open(TEST_NO_SOCKET, ZMQ_PUSH, NULL);
    void *push = p.b;
    cr_assert_eq(zmq_connect(push, ep), 0);
    tctx_t c;
    tctx_init(&c, p.loop, n, size_64_4096);
    zev_stream_t *tx = zev_stream_new(p.loop, push);
    cr_assert_not_null(tx);
    cr_assert_eq(zev_stream_set_max_queue(tx, 0), 0);
    cr_assert_eq(zev_stream_on_send(tx, on_send_count, &c), 0);
    cr_assert_eq(zev_stream_on_close(tx, on_close_flag, &c), 0);
    for (size_t seq = 0; seq < n; seq++)
        cr_assert_eq(send_one(&c, tx, seq, new_buf(&c, seq)), 0);
    for (int i = 0; i < 5; i++)
        zev_loop_run_once(p.loop, 0);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(tx, &st), 0);
    size_t in_zev = st.queued_msgs;
    cr_expect_gt(in_zev, 0);
    cr_expect_lt(in_zev, n, "libzmq should have taken up to its HWM");

    cr_assert_eq(zev_stream_close(tx, 0), 0);
    for (int i = 0; i < 100 && !c.closed; i++)
        zev_loop_run_once(p.loop, 10);
    cr_expect_eq(c.closed, 1);
    cr_expect_eq(c.status_cancelled, in_zev);
    cr_expect_eq(c.status_ok, n - in_zev);
    cr_expect_eq(atomic_load(&c.freed_total), in_zev, "libzmq still holds its messages");

    test_close(push); /* libzmq frees the rest from its reaper thread */
    p.b = NULL;       /* test_pair_close must not close it again */
    c.stop_recv = 0;
    c.stop_done = n;
    cr_assert_eq(run_loop(p.loop, 30000), 0, "watchdog: freed %zu, trackers done %zu of %zu",
                 atomic_load(&c.freed_total), (size_t)c.done_total, n);
    expect_all_once(&c, n, true);
    release_all(&c, n);

    cr_assert_eq(test_pair_close(&p), 0);
    close(port_fd);
    tctx_free(&c);
    test_expect_no_leaks();
}

Test(tracker, peer_never_connects_loop_destroyed)
{
    /* As above, but the loop is destroyed with everything outstanding: zev's
     * queued sends are cancelled by the destroy, libzmq's are dropped when
     * the socket closes afterwards. Every free function once; trackers
     * complete (done == 1) but call nothing once the loop is gone; no leak. */
    ref_init();
    const size_t n = 3000;
    char ep[64];
    int port_fd = dead_port(ep, sizeof ep);
    test_pair_t p = test_pair_open(TEST_NO_SOCKET, ZMQ_PUSH, NULL);
    void *push = p.b;
    cr_assert_eq(zmq_connect(push, ep), 0);
    tctx_t c;
    tctx_init(&c, p.loop, n, size_64_4096);
    zev_stream_t *tx = zev_stream_new(p.loop, push);
    cr_assert_not_null(tx);
    cr_assert_eq(zev_stream_set_max_queue(tx, 0), 0);
    cr_assert_eq(zev_stream_on_send(tx, on_send_count, &c), 0);
    for (size_t seq = 0; seq < n; seq++)
        cr_assert_eq(send_one(&c, tx, seq, new_buf(&c, seq)), 0);
    zev_loop_run_once(p.loop, 0);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(tx, &st), 0);
    size_t in_zev = st.queued_msgs;
    cr_expect_gt(in_zev, 0);

    zev_loop_destroy(p.loop);
    p.loop = NULL; /* test_pair_close must not destroy it again */
    cr_expect_eq(c.reported, n, "on_send: %zu of %zu reported by destroy", (size_t)c.reported, n);
    cr_expect_eq(c.status_cancelled, in_zev);
    cr_expect_eq(atomic_load(&c.freed_total), in_zev);

    cr_assert_eq(test_pair_close(&p), 0); /* waits for libzmq to drop everything */
    expect_all_once(&c, n, false);
    cr_expect_eq(c.done_total, 0, "tracker callbacks ran after zev_loop_destroy");
    release_all(&c, n);
    close(port_fd);
    tctx_free(&c);
    test_expect_no_leaks();
}

/* zev_tracker_done says 1 once the free function ran, from any thread,
 * also after zev_loop_destroy while an unrelated kept frame still holds
 * the loop's hub (its completion queue is then drained only when that
 * frame comes back). */
static atomic_int late_freed;

static void late_free(void *data, void *hint)
{
    (void)hint;
    free(data);
    atomic_store(&late_freed, 1);
}

static zev_frame_t *late_kept;

static void keep_first(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (*(int *)arg)++;
    late_kept = zev_msg_keep(m, 0);
    cr_assert_not_null(late_kept);
}

/* A free function that leaves errno changed, as a user's may (a free or a
 * log call inside it). */
static atomic_int errno_frees;

static void errno_free(void *data, void *hint)
{
    (void)data;
    (void)hint;
    atomic_fetch_add(&errno_frees, 1);
    errno = EIO;
}

static void release_done(zev_tracker_t *t, void *arg)
{
    (void)arg;
    zev_tracker_release(t);
}

Test(tracker, a_free_function_inside_the_call_leaves_errno_alone)
{
    /* A copied buffer (<= ZEV_ZC_COPY_MAX, zero-length included) is done
     * with before send_zc returns: its free function runs inside the call.
     * A call that succeeds still leaves errno as it found it. */
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    static char small[8] = "smallzc", big[100];
    const size_t lens[] = {sizeof small, 0, sizeof big};
    atomic_store(&errno_frees, 0);
    for (size_t i = 0; i < 3; i++) {
        for (int tracked = 0; tracked < 2; tracked++) {
            zev_tracker_t *t = NULL;
            errno = ERANGE;
            cr_assert_eq(zev_stream_send_zc(s, lens[i] == sizeof big ? big : small, lens[i],
                                            errno_free, NULL, tracked ? &t : NULL),
                         0, "send_zc(%zu B): %s", lens[i], zmq_strerror(errno));
            cr_expect_eq(errno, ERANGE, "%zu B, %s: errno %s after a send that succeeded",
                         lens[i], tracked ? "tracker out" : "no tracker", zmq_strerror(errno));
            if (t)
                cr_assert_eq(zev_tracker_on_done(t, release_done, NULL), 0);
        }
    }
    cr_expect_eq(atomic_load(&errno_frees), 4, "the copied buffers' free functions ran inside");
    for (int i = 0; i < 6; i++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        cr_assert_eq(zmq_msg_recv(&m, p.b, 0), (int)lens[i / 2]);
        zmq_msg_close(&m);
    }
    test_spin(p.loop, 5, 1);
    cr_expect_eq(atomic_load(&errno_frees), 6);
    cr_assert_eq(test_pair_close(&p), 0);
    test_expect_no_leaks();
}

Test(tracker, done_after_destroy_while_a_frame_is_kept)
{
    atomic_store(&late_freed, 0);
    char ep[64];
    int port_fd = dead_port(ep, sizeof ep);
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    int got = 0;
    zev_stream_t *rx = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(rx, keep_first, &got), 0);
    cr_assert_eq(zmq_send(p.b, "keep me", 7, 0), 7);
    test_run_until(p.loop, &got, 5000);

    void *push = test_socket(p.ctx, ZMQ_PUSH);
    cr_assert_eq(zmq_connect(push, ep), 0); /* a peer that never answers */
    zev_stream_t *tx = test_stream_new(p.loop, push);
    const size_t len = 4096;
    char *buf = malloc(len);
    cr_assert_not_null(buf);
    memset(buf, 'z', len);
    zev_tracker_t *t = NULL;
    cr_assert_eq(zev_stream_send_zc(tx, buf, len, late_free, NULL, &t), 0);
    cr_assert_not_null(t);
    zev_loop_run_once(p.loop, 0);
    cr_assert_eq(zev_tracker_done(t), 0);

    zev_loop_destroy(p.loop);
    p.loop = NULL;
    test_close(push); /* libzmq drops the message: the free function runs */
    for (uint64_t end = test_ms() + 5000; !atomic_load(&late_freed);) {
        cr_assert(test_ms() < end, "libzmq never freed the buffer");
        test_sleep_ms(1);
    }
    int done = 0;
    for (uint64_t end = test_ms() + 2000; !(done = zev_tracker_done(t)) && test_ms() < end;)
        test_sleep_ms(1);
    cr_assert_eq(done, 1, "the free function ran but zev_tracker_done still says 0");

    cr_assert_eq(zev_tracker_release(t), 0);
    cr_assert_eq(zev_frame_release(late_kept), 0);
    cr_assert_eq(test_pair_close(&p), 0);
    close(port_fd);
    test_expect_no_leaks();
}

/* zev_tracker_on_done on a tracker that already completed calls fn at once,
 * from host code here, outside any iteration: inside fn the loop's time is
 * the current time, not the cached time of the last iteration, so a timer
 * armed there is not due early (review finding 5). */
typedef struct hostdone {
    zev_loop_t *loop;
    zev_timer_t *timer;
    int calls;
    uint64_t now_in_cb, due;
} hostdone_t;

static void hostdone_fn(zev_tracker_t *t, void *arg)
{
    (void)t;
    hostdone_t *h = arg;
    h->calls++;
    h->now_in_cb = zev_now_ns(h->loop);
    cr_assert_eq(zev_timer_arm(h->timer, 20000, 0), 0);
    h->due = zev_timer_due(h->timer);
}

static void hostdone_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
}

Test(tracker, on_done_at_once_from_host_code_counts_from_now)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    static char buf[8] = "tracked";
    zev_tracker_t *t = NULL;
    cr_assert_eq(zev_stream_send_zc(s, buf, sizeof buf, NULL, NULL, &t), 0);
    cr_assert_not_null(t);
    for (uint64_t end = test_ms() + 5000; !zev_tracker_done(t);) /* small: copied at once */
        cr_assert(test_ms() < end, "the tracker never completed");
    test_spin(p.loop, 2, 0); /* its completion runs on the loop; the time is cached */
    test_sleep_ms(50);       /* the host does other things meanwhile */

    hostdone_t h = {.loop = p.loop};
    h.timer = zev_timer_new(p.loop, hostdone_timer, NULL);
    cr_assert_not_null(h.timer);
    uint64_t before = test_clock_ns();
    cr_assert_eq(zev_tracker_on_done(t, hostdone_fn, &h), 0);
    cr_assert_eq(h.calls, 1, "on_done of a completed tracker did not run at once");
    cr_expect_geq(h.now_in_cb, before, "zev_now_ns inside on_done is %.1f ms old",
                  (double)(before - h.now_in_cb) / 1e6);
    cr_expect_geq(h.due, before + 20000000u, "the 20 ms timer is due %.1f ms after the call",
                  ((double)h.due - (double)before) / 1e6);
    cr_assert_eq(zev_timer_free(h.timer), 0);
    cr_assert_eq(zev_tracker_release(t), 0);
    cr_assert_eq(test_pair_close(&p), 0);
}

/* Without a tracker out: the free function still runs exactly once (on
 * libzmq's thread, no trip to the loop); without a free function either, no
 * tracker is made and the bytes still arrive, small (copied) and large
 * (referenced). */
static atomic_int untracked_frees;

static void untracked_free(void *data, void *hint)
{
    (void)data;
    if (hint == (void *)&untracked_frees)
        atomic_fetch_add(&untracked_frees, 1);
}

Test(tracker, untracked_sends_free_once_and_deliver)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "tcp");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    static char big[100000];
    static char small[8] = "smallzc";
    memset(big, 'z', sizeof big);
    atomic_store(&untracked_frees, 0);
    cr_assert_eq(zev_stream_send_zc(s, big, sizeof big, untracked_free, &untracked_frees, NULL), 0);
    cr_assert_eq(zev_stream_send_zc(s, big, sizeof big, NULL, NULL, NULL), 0);
    cr_assert_eq(zev_stream_send_zc(s, small, sizeof small, NULL, NULL, NULL), 0);
    cr_assert_eq(zev_stream_send_zc(s, small, sizeof small, untracked_free, &untracked_frees, NULL),
                 0);
    const size_t sizes[4] = {sizeof big, sizeof big, sizeof small, sizeof small};
    int timeout = 5000;
    cr_assert_eq(zmq_setsockopt(p.b, ZMQ_RCVTIMEO, &timeout, sizeof timeout), 0);
    for (int i = 0; i < 4; i++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        for (uint64_t end = test_ms() + 5000; zmq_msg_recv(&m, p.b, ZMQ_DONTWAIT) < 0;) {
            cr_assert(test_ms() < end, "message %d never arrived", i);
            test_spin(p.loop, 1, 1);
        }
        cr_assert_eq(zmq_msg_size(&m), sizes[i], "message %d: %zu bytes", i, zmq_msg_size(&m));
        cr_assert_eq(memcmp(zmq_msg_data(&m), i < 2 ? big : small, sizes[i]), 0);
        zmq_msg_close(&m);
    }
    for (uint64_t end = test_ms() + 5000; atomic_load(&untracked_frees) < 2;)
        cr_assert(test_ms() < end, "a free function never ran");
    test_spin(p.loop, 3, 1);
    cr_assert_eq(atomic_load(&untracked_frees), 2);
    cr_assert_eq(test_pair_close(&p), 0);
    cr_assert_eq(atomic_load(&untracked_frees), 2);
}

/* ------------------------------------------------ delayed completions */

/* zev_stream_set_tracker_delay over inproc, where the receiver's
 * zmq_msg_close is what frees a buffer: the test decides when each
 * completion happens. */
typedef struct {
    atomic_uint_fast64_t freed_ns[2];
    uint64_t done_ns[2];
    int calls[2];
    zmq_msg_t held[2]; /* the received messages: closing one frees its buffer */
} delayed_t;

static delayed_t *D;

static void delayed_free(void *data, void *hint)
{
    (void)data;
    atomic_store(&D->freed_ns[(intptr_t)hint], test_clock_ns());
}

static void delayed_done(zev_tracker_t *t, void *arg)
{
    (void)t;
    intptr_t i = (intptr_t)arg;
    D->calls[i]++;
    D->done_ns[i] = test_clock_ns();
}

/* Closes D->held[i] 100 ms after it starts: a free while the loop sleeps. */
static void *close_later(void *arg)
{
    test_sleep_ms(100);
    zmq_msg_close(&D->held[(intptr_t)arg]);
    return NULL;
}

/* Runs the loop until D->calls[i] or 5 s pass: zev_loop_run_once blocking,
 * or, embedded (fd >= 0), as a host that blocks on zev_loop_fd alone. */
static void run_until_done(zev_loop_t *loop, int fd, int i)
{
    for (uint64_t end = test_ms() + 5000; !D->calls[i];) {
        cr_assert(test_ms() < end, "on_done of message %d never ran", i);
        if (fd >= 0)
            cr_assert(test_readable(fd, 5000), "the host was never woken for message %d", i);
        cr_assert_geq(zev_loop_run_once(loop, fd >= 0 ? 0 : 1000), 0);
    }
}

/* A delayed completion does not wake the sleeping loop: it runs when the
 * loop wakes by itself, at most the delay after it went to sleep (here 1 s,
 * so between 0.5 and 1 s; the buffer was freed 0.1 s in). The last delayed
 * completion out wakes the loop at once. Before the delay existed both ran
 * within microseconds of their free. Embedded, the host blocks on
 * zev_loop_fd only: the deadline must make the fd readable by itself. */
static void delayed_completion(bool embedded)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    int fd = embedded ? zev_loop_fd(p.loop) : -1;
    cr_assert(!embedded || fd >= 0, "zev_loop_fd: %s", zmq_strerror(errno));
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    static delayed_t d;
    memset(&d, 0, sizeof d);
    D = &d;
    static char bufs[2][100000];
    test_spin(p.loop, 2, 1);
    cr_assert_eq(zev_loop_timeout(p.loop), -1, "nothing out: no deadline");
    cr_assert_eq(zev_stream_set_tracker_delay(s, 1000000), 0);
    zev_tracker_t *t[2];
    for (intptr_t i = 0; i < 2; i++) {
        memset(bufs[i], 'a' + (int)i, sizeof bufs[i]);
        cr_assert_eq(zev_stream_send_zc(s, bufs[i], sizeof bufs[i], delayed_free, (void *)i, &t[i]),
                     0);
        cr_assert_eq(zev_tracker_on_done(t[i], delayed_done, (void *)i), 0);
    }
    for (int i = 0; i < 2; i++) { /* the receiver holds both buffers */
        zmq_msg_init(&d.held[i]);
        for (uint64_t end = test_ms() + 5000; zmq_msg_recv(&d.held[i], p.b, ZMQ_DONTWAIT) < 0;) {
            cr_assert(test_ms() < end, "message %d never arrived", i);
            test_spin(p.loop, 1, 1);
        }
        cr_assert_eq(zmq_msg_size(&d.held[i]), sizeof bufs[i]);
        cr_assert_eq(memcmp(zmq_msg_data(&d.held[i]), bufs[i], sizeof bufs[i]), 0);
    }
    test_spin(p.loop, 3, 1);
    int ms = zev_loop_timeout(p.loop);
    cr_assert(ms > 0 && ms <= 1000, "with delayed trackers out the loop wakes within the delay, "
                                    "zev_loop_timeout says %d ms", ms);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, close_later, (void *)0), 0);
    run_until_done(p.loop, fd, 0);
    pthread_join(th, NULL);
    double late0 = (double)(d.done_ns[0] - atomic_load(&d.freed_ns[0])) / 1e6;
    cr_assert_eq(d.calls[1], 0, "the tracker still out completed");
    cr_assert_geq(late0, 300.0, "on_done ran %.1f ms after the free: the loop was woken", late0);
    cr_assert_leq(late0, 3000.0, "on_done ran %.1f ms after the free: past the 1 s delay", late0);
    cr_assert(zev_tracker_done(t[1]) == 0);

    cr_assert_eq(pthread_create(&th, NULL, close_later, (void *)1), 0);
    run_until_done(p.loop, fd, 1);
    pthread_join(th, NULL);
    double late1 = (double)(d.done_ns[1] - atomic_load(&d.freed_ns[1])) / 1e6;
    cr_assert_lt(late1, 350.0, "the last one out ran %.1f ms after its free: it did not wake "
                               "the loop", late1);
    test_spin(p.loop, 2, 1);
    cr_assert_eq(d.calls[0] + d.calls[1], 2);
    cr_assert_eq(zev_loop_timeout(p.loop), -1, "nothing out any more: no deadline");
    for (int i = 0; i < 2; i++)
        cr_assert_eq(zev_tracker_release(t[i]), 0);
    cr_assert_eq(test_pair_close(&p), 0);
}

Test(tracker, delayed_completion_waits_for_the_loop_the_last_wakes_it)
{
    delayed_completion(false);
}

Test(tracker, delayed_completion_wakes_an_embedded_host_by_the_deadline)
{
    delayed_completion(true);
}

/* The count of delayed trackers out stays right through a refused send
 * (nothing taken, no completion), a send queued in zev and cancelled by the
 * close (its completion runs), and copied small buffers (never delayed). */
Test(tracker, delayed_trackers_refused_cancelled_and_copied_leave_no_deadline)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, TEST_NO_SOCKET, NULL);
    cr_assert_eq(zmq_bind(p.a, "inproc://delayed-nobody"), 0); /* no peer: EAGAIN */
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    static delayed_t d;
    memset(&d, 0, sizeof d);
    D = &d;
    cr_assert_eq(zev_stream_set_tracker_delay(s, 500000), 0);
    cr_assert_eq(zev_stream_set_max_queue(s, 2), 0);
    static char big[2][100000], small[8] = "small";
    zev_tracker_t *t0 = NULL, *t1 = NULL, *ts = NULL;
    cr_assert_eq(zev_stream_send_zc(s, small, sizeof small, NULL, NULL, &ts), 0);
    cr_assert_eq(zev_tracker_done(ts), 1, "a copied buffer completes at once");
    test_spin(p.loop, 2, 1);
    cr_assert_eq(zev_loop_timeout(p.loop), -1, "a copied send is never delayed");
    cr_assert_eq(zev_stream_send_zc(s, big[0], sizeof big[0], delayed_free, (void *)0, &t0), 0);
    cr_assert_eq(zev_tracker_on_done(t0, delayed_done, (void *)0), 0);
    errno = 0;
    cr_assert_eq(zev_stream_send_zc(s, big[1], sizeof big[1], delayed_free, (void *)1, &t1), -1);
    cr_assert_eq(errno, EAGAIN);
    cr_assert_null(t1, "a refused send gives no tracker");
    cr_assert_eq(atomic_load(&d.freed_ns[1]), 0, "a refused buffer stays the caller's");
    test_spin(p.loop, 2, 1);
    int ms = zev_loop_timeout(p.loop);
    cr_assert(ms > 0 && ms <= 500, "one delayed tracker out: zev_loop_timeout %d ms", ms);

    cr_assert_eq(zev_stream_close(s, 0), 0); /* the queued message: ECANCELED */
    for (uint64_t end = test_ms() + 5000; !d.calls[0];) {
        cr_assert(test_ms() < end, "the cancelled send's on_done never ran");
        cr_assert_geq(zev_loop_run_once(p.loop, 1000), 0);
    }
    cr_assert_neq(atomic_load(&d.freed_ns[0]), 0);
    test_spin(p.loop, 2, 1);
    cr_assert_eq(zev_loop_timeout(p.loop), -1, "nothing out any more: no deadline");

    cr_assert_eq(zev_tracker_release(t0), 0);
    cr_assert_eq(zev_tracker_release(ts), 0);
    cr_assert_eq(test_pair_close(&p), 0);
}

/* A short delay that is no longer out stops setting the pace: a tracker
 * with a 1 s delay stays out (no peer: it waits in the stream's queue)
 * while one with a 1 ms delay on another stream comes and goes; the loop
 * then waits for the 1 s one again, not waking every millisecond. Also
 * after the first stream's delay changes: a tracker keeps the delay it was
 * sent with. */
Test(tracker, delayed_short_delay_gone_stops_setting_the_pace)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    void *lonely = zmq_socket(p.ctx, ZMQ_PUSH);
    cr_assert_not_null(lonely);
    cr_assert_eq(zmq_bind(lonely, "inproc://delayed-pace-nobody"), 0);
    zev_stream_t *slow = test_stream_new(p.loop, lonely);
    zev_stream_t *fast = test_stream_new(p.loop, p.a);
    static delayed_t d;
    memset(&d, 0, sizeof d);
    D = &d;
    static char big[2][100000];
    zev_tracker_t *ts = NULL, *tf = NULL;
    cr_assert_eq(zev_stream_set_tracker_delay(slow, 1000000), 0);
    cr_assert_eq(zev_stream_send_zc(slow, big[0], sizeof big[0], delayed_free, (void *)0, &ts), 0);
    cr_assert_eq(zev_stream_set_tracker_delay(slow, 1000), 0); /* for later sends only */
    cr_assert_eq(zev_stream_set_tracker_delay(fast, 1000), 0);
    cr_assert_eq(zev_stream_send_zc(fast, big[1], sizeof big[1], delayed_free, (void *)1, &tf), 0);
    cr_assert_eq(zev_tracker_on_done(tf, delayed_done, (void *)1), 0);
    test_spin(p.loop, 2, 1);
    int ms = zev_loop_timeout(p.loop);
    cr_assert(ms >= 0 && ms <= 1, "a 1 ms tracker out: zev_loop_timeout %d ms", ms);

    zmq_msg_t m;
    zmq_msg_init(&m);
    for (uint64_t end = test_ms() + 5000; zmq_msg_recv(&m, p.b, ZMQ_DONTWAIT) < 0;) {
        cr_assert(test_ms() < end, "the fast stream's message never arrived");
        test_spin(p.loop, 1, 1);
    }
    zmq_msg_close(&m); /* frees its buffer: the 1 ms tracker completes */
    for (uint64_t end = test_ms() + 5000; !d.calls[1];) {
        cr_assert(test_ms() < end, "the 1 ms tracker's on_done never ran");
        cr_assert_geq(zev_loop_run_once(p.loop, 100), 0);
    }
    test_spin(p.loop, 2, 1);
    ms = zev_loop_timeout(p.loop);
    cr_assert(ms > 250 && ms <= 1000,
              "only the 1 s tracker is out, but zev_loop_timeout says %d ms", ms);
    zev_loop_stats_t st0, st1;
    cr_assert_eq(zev_loop_stats(p.loop, &st0), 0);
    cr_assert_geq(zev_loop_run_once(p.loop, 200), 0);
    cr_assert_eq(zev_loop_stats(p.loop, &st1), 0);
    cr_assert_eq(st1.iterations - st0.iterations, 1);

    cr_assert_eq(zev_stream_close(slow, 0), 0); /* cancelled: it completes */
    test_spin(p.loop, 3, 1);
    cr_assert_eq(zev_loop_timeout(p.loop), -1, "nothing out any more: no deadline");
    cr_assert_eq(zev_tracker_release(ts), 0);
    cr_assert_eq(zev_tracker_release(tf), 0);
    cr_assert_eq(zmq_close(lonely), 0);
    cr_assert_eq(test_pair_close(&p), 0);
}

/* Trackers released right after their send complete on the receiver's
 * thread and are reused by the loop for the next sends, delayed and not in
 * turn: the trampoline must not read a tracker once its completion is
 * pushed (TSan saw that read race the reuse; a misread flag left the count
 * of delayed trackers wrong: a deadline with nothing out, or none with one
 * out and its completion never announced). */
static atomic_long reuse_freed;

static void reuse_free(void *data, void *hint)
{
    (void)data;
    (void)hint;
    atomic_fetch_add(&reuse_freed, 1);
}

typedef struct {
    void *pull;
    long n;
} reuse_rx_t;

static void *reuse_receiver(void *arg)
{
    reuse_rx_t *r = arg;
    zmq_msg_t m;
    zmq_msg_init(&m);
    long got = 0;
    while (got < r->n)
        if (zmq_msg_recv(&m, r->pull, 0) >= 0) /* closes the previous one: its free runs here */
            got++;
        else if (errno != EINTR)
            break;
    zmq_msg_close(&m);
    return NULL;
}

Test(tracker, delayed_and_prompt_trackers_reused_across_threads_stay_counted)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, TEST_NO_SOCKET, NULL);
    cr_assert_eq(zmq_bind(p.a, "inproc://delayed-reuse"), 0);
    void *push[2];
    zev_stream_t *s[2];
    for (int i = 0; i < 2; i++) {
        push[i] = zmq_socket(p.ctx, ZMQ_PUSH);
        cr_assert_not_null(push[i]);
        cr_assert_eq(zmq_connect(push[i], "inproc://delayed-reuse"), 0);
        s[i] = test_stream_new(p.loop, push[i]);
    }
    cr_assert_eq(zev_stream_set_tracker_delay(s[0], 1000), 0); /* s[1] wakes at once */
    reuse_rx_t rx = {.pull = p.a, .n = getenv("ZEV_VALGRIND") ? 2000 : 100000};
    atomic_store(&reuse_freed, 0);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, reuse_receiver, &rx), 0);
    static char buf[4096];
    long sent = 0;
    for (uint64_t end = test_ms() + 60000; sent < rx.n;) {
        cr_assert(test_ms() < end, "stalled at %ld of %ld sent", sent, rx.n);
        int k = 0;
        while (k++ < 8 && sent < rx.n && sent - atomic_load(&reuse_freed) < 32) {
            zev_tracker_t *t;
            if (zev_stream_send_zc(s[sent & 1], buf, sizeof buf, reuse_free, NULL, &t) < 0)
                break;
            cr_assert_eq(zev_tracker_release(t), 0); /* the completion holds the last ref */
            sent++;
        }
        cr_assert_geq(zev_loop_run_once(p.loop, 0), 0);
    }
    pthread_join(th, NULL);
    for (uint64_t end = test_ms() + 5000; atomic_load(&reuse_freed) < rx.n;)
        cr_assert(test_ms() < end, "%ld of %ld buffers freed", atomic_load(&reuse_freed), rx.n);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(zev_loop_timeout(p.loop), -1,
                 "every delayed tracker finished, yet the loop keeps a deadline");
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(zev_stream_close(s[i], 0), 0);
        cr_assert_eq(zmq_close(push[i]), 0);
    }
    cr_assert_eq(test_pair_close(&p), 0);
}
