/*
 * Zero heap allocations per message (issue #4), measured with the counting
 * allocator in tests/alloc_count.c, which sees every malloc of the process:
 * zev's, libzmq's and the test's.
 *
 * Each scenario is run twice in the same way, once as a raw libzmq loop and
 * once through zev, with the same message sizes (64 B and 1 KiB, both above
 * libzmq's 33-byte inline limit, so libzmq itself allocates once per
 * message), the same socket types and the same batch pattern:
 *   - borrowed receive: raw zmq_msg_recv into one zmq_msg_t vs a zev stream
 *     whose callback reads the borrowed frame;
 *   - kept-frame receive + release: raw zmq_msg_recv into a batch of held
 *     zmq_msg_t closed after the batch vs zev_msg_keep + zev_frame_release;
 *   - queued send of moved zmq_msg_t: raw zmq_msg_send (retried after
 *     draining the peer on EAGAIN) vs zev_stream_send_msg into a stream
 *     whose queue takes what libzmq's HWM refuses.
 * Sender and receiver run on this one thread over inproc, in batches, so the
 * work is deterministic; counting covers only the measured phase, after a
 * warm-up (the ring, the frame pool, the send queue and libzmq's pipe chunks
 * reach their steady size). The check: zev's count <= raw's count over the
 * whole phase (margin 0), i.e. zev adds no allocation per message.
 *
 * The same allocator also makes realloc fail, for the out-of-memory test of
 * on_send statuses at the end (every message given gets its status even when
 * memory runs out after it was given).
 *
 * Not built with sanitizers (they own malloc): see tests/alloc.cmake.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "common.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc_count.h"

TestSuite(alloc, .timeout = 60);

#define WARM 5000u
#define MEASURE 20000u
#define BATCH 100u
#define SPIN_LIMIT 1000000u

typedef struct {
    size_t allocs, frees;
} counts_t;

static uint8_t payload[1024];

static void report(const char *what, size_t sz, counts_t raw, counts_t zev)
{
    fprintf(
        stderr,
        "alloc: %-30s %4zu B  raw %.3f allocs/msg (%zu frees)  zev %.3f allocs/msg (%zu frees)  "
        "zev-raw %+ld allocs in %u msgs\n",
        what, sz, (double)raw.allocs / MEASURE, raw.frees, (double)zev.allocs / MEASURE, zev.frees,
        (long)zev.allocs - (long)raw.allocs, MEASURE);
}

static void *sock(void *ctx, int type, int hwm)
{
    void *s = zmq_socket(ctx, type);
    cr_assert_not_null(s);
    cr_assert_eq(zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm), 0);
    cr_assert_eq(zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm), 0);
    return s;
}

/* Raw sender: n messages of sz bytes (zmq_send: one libzmq allocation each
 * above 33 bytes). HWM 0 on both ends: never refused. */
static size_t send_batch(void *push, size_t n, size_t sz)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (zmq_send(push, payload, sz, 0) != (int)sz)
            bad++;
    return bad;
}

/* ------------------------------------------------------------- receiving */

typedef struct {
    size_t sz;
    bool keep;
    volatile size_t received;
    size_t bad;
    unsigned sum;
    zev_frame_t *frames[BATCH];
    size_t nframes;
} rx_t;

static void rx_cb(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *r = arg;
    if (zev_msg_parts(m) != 1 || zev_msg_size(m, 0) != r->sz)
        r->bad++;
    else
        r->sum += ((const uint8_t *)zev_msg_data(m, 0))[r->sz - 1];
    if (r->keep) {
        zev_frame_t *f = r->nframes < BATCH ? zev_msg_keep(m, 0) : NULL;
        if (f)
            r->frames[r->nframes++] = f;
        else
            r->bad++;
    }
    r->received++;
}

/* Raw: n messages in batches, received into one zmq_msg_t (borrowed-like)
 * or into a batch of held zmq_msg_t closed after the batch (kept-like). */
static size_t raw_recv(void *push, void *pull, size_t n, size_t sz, bool keep)
{
    static zmq_msg_t held[BATCH];
    zmq_msg_t one;
    zmq_msg_init(&one);
    size_t bad = 0;
    for (size_t done = 0; done < n; done += BATCH) {
        bad += send_batch(push, BATCH, sz);
        for (size_t i = 0; i < BATCH; i++) {
            zmq_msg_t *m = keep ? &held[i] : &one;
            if (keep)
                zmq_msg_init(m);
            if (zmq_msg_recv(m, pull, 0) != (int)sz)
                bad++;
        }
        if (keep)
            for (size_t i = 0; i < BATCH; i++)
                zmq_msg_close(&held[i]);
    }
    zmq_msg_close(&one);
    return bad;
}

static size_t zev_recv(zev_loop_t *loop, zev_stream_t *s, rx_t *r, void *push, size_t n)
{
    size_t bad = 0;
    for (size_t done = 0; done < n; done += BATCH) {
        bad += send_batch(push, BATCH, r->sz);
        size_t target = r->received + BATCH;
        for (size_t spins = 0; r->received < target && spins < SPIN_LIMIT; spins++)
            zev_loop_run_once(loop, 0);
        if (r->received != target)
            return bad + 1;
        if (r->keep) {
            for (size_t i = 0; i < r->nframes; i++)
                if (zev_frame_release(r->frames[i]) != 0)
                    bad++;
            r->nframes = 0;
            zev_stream_stats_t st = {.frames_kept = 1};
            for (size_t spins = 0; st.frames_kept && spins < SPIN_LIMIT; spins++) {
                zev_loop_run_once(loop, 0);
                zev_stream_stats(s, &st);
            }
            if (st.frames_kept)
                bad++;
        }
    }
    return bad;
}

static counts_t measure_raw_recv(size_t sz, bool keep)
{
    void *ctx = zmq_ctx_new();
    void *pull = sock(ctx, ZMQ_PULL, 0), *push = sock(ctx, ZMQ_PUSH, 0);
    test_bind_connect(pull, push, "inproc");
    cr_assert_eq(raw_recv(push, pull, WARM, sz, keep), 0);
    alloc_count_start();
    size_t bad = raw_recv(push, pull, MEASURE, sz, keep);
    alloc_count_stop();
    counts_t c = {alloc_count_allocs(), alloc_count_frees()};
    cr_assert_eq(bad, 0, "raw receive went wrong");
    test_close(push);
    test_close(pull);
    zmq_ctx_term(ctx);
    return c;
}

static counts_t measure_zev_recv(size_t sz, bool keep)
{
    void *ctx = zmq_ctx_new();
    void *pull = sock(ctx, ZMQ_PULL, 0), *push = sock(ctx, ZMQ_PUSH, 0);
    test_bind_connect(pull, push, "inproc");
    zev_loop_t *loop = test_loop_new();
    zev_stream_t *s = zev_stream_new(loop, pull);
    cr_assert_not_null(s);
    rx_t r = {.sz = sz, .keep = keep};
    cr_assert_eq(zev_stream_on_recv(s, rx_cb, &r), 0);
    cr_assert_eq(zev_recv(loop, s, &r, push, WARM), 0);
    cr_assert_eq(r.bad, 0);
    alloc_count_start();
    size_t bad = zev_recv(loop, s, &r, push, MEASURE);
    alloc_count_stop();
    counts_t c = {alloc_count_allocs(), alloc_count_frees()};
    cr_assert_eq(bad + r.bad, 0, "zev receive went wrong");
    cr_assert_eq(r.received, WARM + MEASURE);
    zev_loop_destroy(loop);
    test_close(push);
    test_close(pull);
    zmq_ctx_term(ctx);
    return c;
}

/* --------------------------------------------------------------- sending */

/* Receives everything the PULL has now; returns the count. */
static size_t drain(void *pull, zmq_msg_t *m, size_t sz, size_t *bad)
{
    size_t n = 0;
    while (zmq_msg_recv(m, pull, ZMQ_DONTWAIT) >= 0) {
        if (zmq_msg_size(m) != sz)
            (*bad)++;
        n++;
    }
    return n;
}

/* The pipe holds 2 x hwm messages and a batch is bigger: part of every
 * batch waits (raw: the sender retries after draining; zev: in the stream's
 * queue). */
#define SEND_HWM 40

static size_t raw_send(void *push, void *pull, size_t n, size_t sz)
{
    zmq_msg_t in;
    zmq_msg_init(&in);
    size_t bad = 0, got = 0, spins = 0;
    for (size_t done = 0; done < n; done += BATCH) {
        for (size_t i = 0; i < BATCH; i++) {
            zmq_msg_t m;
            zmq_msg_init_size(&m, sz);
            memcpy(zmq_msg_data(&m), payload, sz);
            while (zmq_msg_send(&m, push, ZMQ_DONTWAIT) < 0 && spins++ < SPIN_LIMIT) {
                if (errno != EAGAIN)
                    bad++;
                got += drain(pull, &in, sz, &bad);
                int ev;
                size_t len = sizeof ev; /* as zmq_poll would: let the sender see the room */
                zmq_getsockopt(push, ZMQ_EVENTS, &ev, &len);
            }
        }
        while (got < done + BATCH && spins++ < SPIN_LIMIT) {
            got += drain(pull, &in, sz, &bad);
            int ev;
            size_t len = sizeof ev;
            zmq_getsockopt(pull, ZMQ_EVENTS, &ev, &len);
        }
    }
    zmq_msg_close(&in);
    return bad + (got != n);
}

typedef struct {
    size_t ok, other;
} tx_t;

static void tx_cb(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    tx_t *t = arg;
    if (status == 0)
        t->ok++;
    else
        t->other++;
}

static size_t zev_send(zev_loop_t *loop, zev_stream_t *s, void *pull, size_t n, size_t sz,
                       size_t *queued_max)
{
    zmq_msg_t in;
    zmq_msg_init(&in);
    size_t bad = 0, got = 0, spins = 0;
    for (size_t done = 0; done < n; done += BATCH) {
        for (size_t i = 0; i < BATCH; i++) {
            zmq_msg_t m;
            zmq_msg_init_size(&m, sz);
            memcpy(zmq_msg_data(&m), payload, sz);
            if (zev_stream_send_msg(s, &m, 1, 0) != 0) {
                bad++;
                zmq_msg_close(&m);
            }
        }
        zev_stream_stats_t st;
        zev_stream_stats(s, &st);
        if (st.queued_msgs > *queued_max)
            *queued_max = st.queued_msgs;
        while (got < done + BATCH && spins++ < SPIN_LIMIT) {
            got += drain(pull, &in, sz, &bad);
            zev_loop_run_once(loop, 0);
        }
    }
    zmq_msg_close(&in);
    return bad + (got != n);
}

static counts_t measure_raw_send(size_t sz)
{
    void *ctx = zmq_ctx_new();
    void *pull = sock(ctx, ZMQ_PULL, SEND_HWM), *push = sock(ctx, ZMQ_PUSH, SEND_HWM);
    test_bind_connect(pull, push, "inproc");
    cr_assert_eq(raw_send(push, pull, WARM, sz), 0);
    alloc_count_start();
    size_t bad = raw_send(push, pull, MEASURE, sz);
    alloc_count_stop();
    counts_t c = {alloc_count_allocs(), alloc_count_frees()};
    cr_assert_eq(bad, 0, "raw send went wrong");
    test_close(push);
    test_close(pull);
    zmq_ctx_term(ctx);
    return c;
}

static counts_t measure_zev_send(size_t sz)
{
    void *ctx = zmq_ctx_new();
    void *pull = sock(ctx, ZMQ_PULL, SEND_HWM), *push = sock(ctx, ZMQ_PUSH, SEND_HWM);
    test_bind_connect(pull, push, "inproc");
    zev_loop_t *loop = test_loop_new();
    zev_stream_t *s = zev_stream_new(loop, push);
    cr_assert_not_null(s);
    tx_t t = {0};
    cr_assert_eq(zev_stream_on_send(s, tx_cb, &t), 0);
    size_t queued_max = 0;
    cr_assert_eq(zev_send(loop, s, pull, WARM, sz, &queued_max), 0);
    queued_max = 0;
    alloc_count_start();
    size_t bad = zev_send(loop, s, pull, MEASURE, sz, &queued_max);
    alloc_count_stop();
    counts_t c = {alloc_count_allocs(), alloc_count_frees()};
    cr_assert_eq(bad, 0, "zev send went wrong");
    cr_assert_gt(queued_max, 0, "no message waited in the stream's queue");
    cr_assert_eq(t.ok, WARM + MEASURE);
    cr_assert_eq(t.other, 0);
    zev_loop_destroy(loop);
    test_close(push);
    test_close(pull);
    zmq_ctx_term(ctx);
    return c;
}

/* ----------------------------------------------------------------- tests */

static void noop_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    (void)arg;
}

Test(alloc, counter_sees_libzmq_and_zev)
{
    /* The shim must see the process's allocations, not only this file's. */
    cr_assert(alloc_count_interposed());
    void *ctx = zmq_ctx_new();
    zev_loop_t *loop = test_loop_new();
    alloc_count_start();
    zmq_msg_t m;
    zmq_msg_init_size(&m, 1000); /* libzmq: one malloc */
    zmq_msg_close(&m);
    alloc_count_stop();
    cr_expect_geq(alloc_count_allocs(), 1, "libzmq's malloc not seen");
    cr_expect_geq(alloc_count_frees(), 1, "libzmq's free not seen");
    alloc_count_start();
    cr_assert_eq(zev_loop_add_callback(loop, noop_cb, NULL), 0); /* zev: one node */
    alloc_count_stop();
    cr_expect_eq(alloc_count_allocs(), 1, "zev's malloc not seen");
    zev_loop_run_once(loop, 0);
    zev_loop_destroy(loop);
    zmq_ctx_term(ctx);
}

static void check_recv(size_t sz, bool keep)
{
    memset(payload, 0x5a, sizeof payload);
    counts_t raw = measure_raw_recv(sz, keep);
    counts_t zev = measure_zev_recv(sz, keep);
    report(keep ? "kept-frame receive + release" : "borrowed receive", sz, raw, zev);
    cr_expect_geq(raw.allocs, MEASURE, "libzmq allocates once per %zu B message", sz);
    cr_expect_leq(zev.allocs, raw.allocs,
                  "%s, %zu B: zev %zu allocations vs raw libzmq %zu over %u messages",
                  keep ? "kept frames" : "borrowed", sz, zev.allocs, raw.allocs, MEASURE);
}

Test(alloc, borrowed_receive_64)
{
    check_recv(64, false);
}

Test(alloc, borrowed_receive_1k)
{
    check_recv(1024, false);
}

Test(alloc, kept_receive_64)
{
    check_recv(64, true);
}

Test(alloc, kept_receive_1k)
{
    check_recv(1024, true);
}

static void check_send(size_t sz)
{
    memset(payload, 0xa5, sizeof payload);
    counts_t raw = measure_raw_send(sz);
    counts_t zev = measure_zev_send(sz);
    report("queued send of moved zmq_msg_t", sz, raw, zev);
    cr_expect_geq(raw.allocs, MEASURE, "libzmq allocates once per %zu B message", sz);
    cr_expect_leq(zev.allocs, raw.allocs,
                  "send_msg, %zu B: zev %zu allocations vs raw libzmq %zu over %u messages", sz,
                  zev.allocs, raw.allocs, MEASURE);
}

Test(alloc, queued_send_msg_64)
{
    check_send(64);
}

Test(alloc, queued_send_msg_1k)
{
    check_send(1024);
}

/* ------------------------------------------- on_send under out-of-memory */

#define OOM_FILL 20u   /* messages the ROUTER -> DEALER pipe takes (HWM 10 + 10) */
#define OOM_QUEUED 40u /* alternating: to the DEALER (sent later), to nobody */

typedef struct {
    size_t n;
    int status[4 * (OOM_FILL + OOM_QUEUED)];
} statuses_t;

static void record_status(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    statuses_t *st = arg;
    if (st->n < sizeof st->status / sizeof st->status[0])
        st->status[st->n] = status;
    st->n++;
}

/* Gives one ROUTER message to the stream: identity, then an 8-byte seq. */
static int router_send(zev_stream_t *s, const char *peer, uint64_t seq)
{
    if (zev_stream_send(s, peer, strlen(peer), ZMQ_SNDMORE) < 0)
        return -1;
    return zev_stream_send(s, &seq, sizeof seq, 0);
}

/* Receives what the DEALER has; returns how many messages were not the
 * next 8-byte sequence number. Asserts nothing: it runs while realloc fails,
 * and Criterion's assertion reports allocate. */
static size_t dealer_drain(void *dealer, size_t *got)
{
    size_t bad = 0;
    zmq_msg_t m;
    zmq_msg_init(&m);
    while (zmq_msg_recv(&m, dealer, ZMQ_DONTWAIT) >= 0) {
        uint64_t v = UINT64_MAX;
        if (zmq_msg_size(&m) == sizeof v)
            memcpy(&v, zmq_msg_data(&m), sizeof v);
        bad += v != *got;
        (*got)++;
    }
    zmq_msg_close(&m);
    return bad;
}

/*
 * on_send statuses need memory (an entry per run of equal statuses), and a
 * status must never be lost to a failed allocation after its message was
 * accepted: zev reserves the room when the message is given. Here a
 * ROUTER_MANDATORY stream queues 40 messages alternating between a
 * connected DEALER whose pipe is full and an identity nobody has; when the
 * DEALER drains, one pass sends the first kind (status 0) and fails the
 * second (EHOSTUNREACH), 40 runs of statuses, while every realloc on this
 * thread fails. Every status must arrive, in order; then a message the
 * stream cannot reserve a status for is refused with ENOMEM, not taken.
 */
Test(alloc, on_send_status_survives_out_of_memory)
{
    void *ctx = test_ctx_new();
    zev_loop_t *loop = test_loop_new();
    void *router = test_socket(ctx, ZMQ_ROUTER), *dealer = test_socket(ctx, ZMQ_DEALER);
    test_set_int(router, ZMQ_ROUTER_MANDATORY, 1);
    test_set_int(router, ZMQ_SNDHWM, OOM_FILL / 2);
    test_set_int(dealer, ZMQ_RCVHWM, OOM_FILL / 2);
    cr_assert_eq(zmq_setsockopt(dealer, ZMQ_ROUTING_ID, "P", 1), 0);
    test_bind_connect(router, dealer, "inproc");
    zev_stream_t *s = test_stream_new(loop, router);
    statuses_t st = {0};
    cr_assert_eq(zev_stream_on_send(s, record_status, &st), 0);

    /* Fill the DEALER's pipe with direct sends (the first may race the
     * ROUTER learning the peer: EHOSTUNREACH, not accepted). */
    uint64_t seq = 0;
    uint64_t end = test_ms() + 5000;
    while (!zev_stream_sending(s)) {
        if (router_send(s, "P", seq) == 0)
            seq++;
        else
            cr_assert_eq(errno, EHOSTUNREACH, "errno %d", errno);
        cr_assert(test_ms() < end, "the DEALER's pipe never filled");
    }
    size_t accepted = seq; /* the last one is queued */
    for (unsigned i = 0; i < OOM_QUEUED; i++) {
        bool to_peer = i % 2 == 0;
        cr_assert_eq(router_send(s, to_peer ? "P" : "nobody", to_peer ? seq : UINT64_MAX), 0);
        seq += to_peer;
        accepted++;
    }
    test_spin(loop, 2, 1); /* the pipe is still full: nothing moves */

    alloc_count_fail_realloc(1);
    size_t got = 0, bad = 0;
    end = test_ms() + 10000;
    while (got < seq && test_ms() < end) { /* the stream's passes send the rest */
        bad += dealer_drain(dealer, &got);
        zev_loop_run_once(loop, 0);
    }
    for (int i = 0; i < 3; i++)
        zev_loop_run_once(loop, 1);
    alloc_count_fail_realloc(0); /* before asserting: Criterion's reports allocate */
    cr_assert_eq(got, seq, "only %zu of %lu messages arrived", got, (unsigned long)seq);
    cr_assert_eq(bad, 0, "messages out of order");
    cr_assert_eq(st.n, accepted, "%zu statuses for %zu messages given", st.n, accepted);
    size_t fails = 0;
    for (size_t i = 0; i < st.n; i++) {
        size_t q = i - (accepted - OOM_QUEUED); /* index among the alternating ones */
        int want = i >= accepted - OOM_QUEUED && q % 2 ? EHOSTUNREACH : 0;
        cr_assert_eq(st.status[i], want, "status %zu is %d, expected %d", i, st.status[i], want);
        fails += st.status[i] != 0;
    }
    cr_assert_eq(fails, OOM_QUEUED / 2);

    /* Queue messages until the room for their statuses would have to grow
     * (realloc still fails): that send is refused and takes nothing. */
    size_t before = st.n;
    alloc_count_fail_realloc(1);
    while (seq < 100000 && router_send(s, "P", seq) == 0)
        seq++;
    int err = errno;
    alloc_count_fail_realloc(0);
    cr_assert_eq(err, ENOMEM, "errno %d after %lu messages", err, (unsigned long)seq);
    cr_assert_eq(router_send(s, "P", seq++), 0, "room again once memory is back");
    end = test_ms() + 10000;
    while (got < seq && test_ms() < end) {
        bad += dealer_drain(dealer, &got);
        zev_loop_run_once(loop, 0);
    }
    cr_assert_eq(got, seq, "after ENOMEM: %zu of %lu messages arrived", got, (unsigned long)seq);
    cr_assert_eq(bad, 0, "after ENOMEM: messages out of order");
    test_spin(loop, 3, 1);
    cr_assert_eq(st.n - before, seq - (accepted - OOM_QUEUED / 2), "one status per message");

    zev_loop_destroy(loop);
    test_close(dealer);
    test_close(router);
    zmq_ctx_term(ctx);
}

/* ------------------------------------ the receive ring under out-of-memory */

typedef struct {
    size_t msgs, parts_bad;
    size_t parts[4];
} ring_rx_t;

static void ring_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    ring_rx_t *rx = arg;
    size_t n = zev_msg_parts(m);
    if (rx->msgs < 4)
        rx->parts[rx->msgs] = n;
    for (size_t i = 0; i < n; i++) { /* part i of message k holds k * 100 + i */
        uint32_t v = UINT32_MAX;
        if (zev_msg_size(m, i) == sizeof v)
            memcpy(&v, zev_msg_data(m, i), sizeof v);
        rx->parts_bad += v != rx->msgs * 100 + i;
    }
    rx->msgs++;
}

static void send_parts(void *sock, uint32_t k, uint32_t nparts)
{
    for (uint32_t i = 0; i < nparts; i++) {
        uint32_t v = k * 100 + i;
        cr_assert_eq(zmq_send(sock, &v, sizeof v, i + 1 < nparts ? ZMQ_SNDMORE : 0), sizeof v);
    }
}

/*
 * A message with more parts than the stream's receive ring holds makes the
 * ring grow; when it cannot (realloc fails on the loop thread), the parts
 * already received must wait in the ring and the message be completed once
 * memory is back: leaving its tail in libzmq would deliver that tail as a
 * message of its own. Nothing is delivered while the ring cannot grow.
 */
Test(alloc, ring_growth_out_of_memory_keeps_the_message_whole)
{
    void *ctx = test_ctx_new();
    zev_loop_t *loop = test_loop_new();
    void *pull = test_socket(ctx, ZMQ_PULL), *push = test_socket(ctx, ZMQ_PUSH);
    test_bind_connect(pull, push, "inproc");
    zev_stream_t *s = test_stream_new(loop, pull);
    ring_rx_t rx = {0};
    cr_assert_eq(zev_stream_on_recv(s, ring_recv, &rx), 0);
    send_parts(push, 0, 3);  /* fits the ring as it is */
    send_parts(push, 1, 10); /* needs it to grow */
    send_parts(push, 2, 1);

    alloc_count_fail_realloc(1);
    for (int i = 0; i < 20; i++)
        zev_loop_run_once(loop, 1);
    size_t during = rx.msgs;
    alloc_count_fail_realloc(0); /* before asserting: Criterion's reports allocate */
    cr_assert_eq(during, 1, "%zu messages delivered while the ring could not grow", during);

    uint64_t end = test_ms() + 5000;
    while (rx.msgs < 3 && test_ms() < end)
        zev_loop_run_once(loop, 1);
    test_spin(loop, 3, 1);
    cr_assert_eq(rx.msgs, 3, "%zu messages", rx.msgs);
    cr_assert_eq(rx.parts[0], 3);
    cr_assert_eq(rx.parts[1], 10, "the long message arrived in %zu parts", rx.parts[1]);
    cr_assert_eq(rx.parts[2], 1);
    cr_assert_eq(rx.parts_bad, 0, "parts out of place");

    zev_loop_destroy(loop);
    test_close(push);
    test_close(pull);
    zmq_ctx_term(ctx);
}

/*
 * Setting on_send reserves room for the statuses of the messages already
 * waiting; when that fails the call says ENOMEM and the stream keeps no
 * callback, and a later call succeeds and reports them.
 */
Test(alloc, on_send_set_out_of_memory_is_refused)
{
    void *ctx = test_ctx_new();
    zev_loop_t *loop = test_loop_new();
    void *push = test_socket(ctx, ZMQ_PUSH);
    char ep[256];
    test_bind_ep(push, "inproc", ep, sizeof ep);
    zev_stream_t *s = test_stream_new(loop, push);
    for (uint64_t i = 0; i < 3; i++) /* no peer yet: all queued */
        cr_assert_eq(zev_stream_send(s, &i, sizeof i, 0), 0);
    cr_assert_eq(zev_stream_sending(s), 1);

    statuses_t st = {0};
    alloc_count_fail_realloc(1);
    int rc = zev_stream_on_send(s, record_status, &st);
    int err = errno;
    alloc_count_fail_realloc(0);
    cr_assert_eq(rc, -1);
    cr_assert_eq(err, ENOMEM);

    cr_assert_eq(zev_stream_on_send(s, record_status, &st), 0);
    void *pull = test_socket(ctx, ZMQ_PULL);
    cr_assert_eq(zmq_connect(pull, ep), 0);
    test_run_until_count(loop, &st.n, 3, 5000);
    test_spin(loop, 3, 1);
    cr_assert_eq(st.n, 3);
    for (size_t i = 0; i < 3; i++)
        cr_assert_eq(st.status[i], 0);

    zev_loop_destroy(loop);
    test_close(pull);
    test_close(push);
    zmq_ctx_term(ctx);
}

/* ------------------------------------------- a gateway's per-request work */

/* Issue 11: a per-request timeout and a cross-thread post cost no
 * allocation in steady state. A gateway arms an owned timer when a request
 * comes and disarms it when the reply does (or lets it fire); a strategy
 * thread posts each answer with a zev_post_t inside its own order. Both
 * loops run here on one thread: what is counted is zev's own work. */
static void noop_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    (*(size_t *)arg)++;
}

typedef struct order {
    zev_post_t post;
    size_t *ran;
} order_t;

static void order_done(zev_loop_t *loop, void *arg)
{
    (void)loop;
    order_t *o = arg;
    (*o->ran)++;
}

Test(alloc, owned_timeouts_and_posts_allocate_nothing)
{
    cr_assert(alloc_count_interposed(), "the counting allocator is not interposed");
    zev_loop_t *loop = test_loop_new();
    enum { REQ = 64 };
    size_t fired = 0, ran = 0;
    zev_timer_t *timeout[REQ];
    order_t order[REQ];
    for (int i = 0; i < REQ; i++) {
        timeout[i] = zev_timer_new(loop, noop_timer, &fired);
        cr_assert_not_null(timeout[i]);
        order[i].ran = &ran;
    }
    /* warm-up, then the measured phase: the same work */
    for (int phase = 0; phase < 2; phase++) {
        if (phase == 1)
            alloc_count_start();
        for (unsigned round = 0; round < 200; round++) {
            for (int i = 0; i < REQ; i++) {
                cr_assert_eq(zev_timer_arm(timeout[i], i % 4 ? 1000000 : 0, 0), 0);
                cr_assert_eq(zev_loop_post(loop, &order[i].post, order_done, &order[i]), 0);
            }
            cr_assert_geq(zev_loop_run_once(loop, 0), 0); /* posts run, due timeouts fire */
            for (int i = 0; i < REQ; i++)
                cr_assert_eq(zev_timer_disarm(timeout[i]), 0); /* the replies came */
            /* loop-owned one-shots come from the same pool */
            zev_timer_t *t = zev_timer_start(loop, 1000000, 0, noop_timer, &fired);
            cr_assert_not_null(t);
            cr_assert_eq(zev_timer_cancel(t), 0);
        }
        if (phase == 1)
            alloc_count_stop();
    }
    size_t allocs = alloc_count_allocs();
    fprintf(stderr, "alloc: %u arm/disarm + %u posts: %zu allocations\n", 200u * REQ, 200u * REQ,
            allocs);
    cr_assert_eq(ran, 2u * 200u * REQ);
    cr_assert_gt(fired, 0);
    cr_assert_eq(allocs, 0, "%zu allocations for %u timeouts and posts", allocs, 200u * REQ);
    for (int i = 0; i < REQ; i++)
        cr_assert_eq(zev_timer_free(timeout[i]), 0);
    zev_loop_destroy(loop);
}

/* ------------------------------------------------------------- fibers */

/* A fiber relaying messages (zev_fiber_recv from a PULL, zev_fiber_send of a
 * copy to a PUSH) against the same relay in raw libzmq (zmq_msg_recv into
 * one zmq_msg_t, zmq_send): zev adds no allocation per message, and none
 * per blocking call (the fiber waits for each batch: the wait, its owned
 * timer for the timeout, and its wake allocate nothing). */
typedef struct relay {
    zev_stream_t *in, *out;
    size_t sz;
    size_t relayed;
    size_t bad;
} relay_t;

static void relay_fiber(void *arg)
{
    relay_t *r = arg;
    for (;;) {
        zev_msg_t *m;
        if (zev_fiber_recv(r->in, &m, 1000000) < 0)
            break; /* cancelled at destroy */
        if (zev_msg_size(m, 0) != r->sz ||
            zev_fiber_send(r->out, zev_msg_data(m, 0), r->sz, 0, -1) < 0)
            r->bad++;
        r->relayed++;
    }
}

static size_t sink_drain(void *sink, size_t n, size_t sz)
{
    zmq_msg_t m;
    zmq_msg_init(&m);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (zmq_msg_recv(&m, sink, 0) != (int)sz)
            bad++;
    zmq_msg_close(&m);
    return bad;
}

static size_t raw_relay(void *push, void *pull, void *out, void *sink, size_t n, size_t sz)
{
    zmq_msg_t one;
    zmq_msg_init(&one);
    size_t bad = 0;
    for (size_t done = 0; done < n; done += BATCH) {
        bad += send_batch(push, BATCH, sz);
        for (size_t i = 0; i < BATCH; i++)
            if (zmq_msg_recv(&one, pull, 0) != (int)sz ||
                zmq_send(out, zmq_msg_data(&one), sz, 0) != (int)sz)
                bad++;
        bad += sink_drain(sink, BATCH, sz);
    }
    zmq_msg_close(&one);
    return bad;
}

static size_t fiber_relay(zev_loop_t *loop, relay_t *r, void *push, void *sink, size_t n)
{
    size_t bad = 0;
    for (size_t done = 0; done < n; done += BATCH) {
        bad += send_batch(push, BATCH, r->sz);
        size_t target = r->relayed + BATCH;
        for (size_t spins = 0; r->relayed < target && spins < SPIN_LIMIT; spins++)
            zev_loop_run_once(loop, 0);
        if (r->relayed != target)
            return bad + 1;
        bad += sink_drain(sink, BATCH, r->sz);
    }
    return bad;
}

typedef struct relay_sockets {
    void *ctx, *push, *pull, *out, *sink;
} relay_sockets_t;

static relay_sockets_t relay_open(void)
{
    relay_sockets_t k = {.ctx = zmq_ctx_new()};
    k.pull = sock(k.ctx, ZMQ_PULL, 0);
    k.push = sock(k.ctx, ZMQ_PUSH, 0);
    k.out = sock(k.ctx, ZMQ_PUSH, 0);
    k.sink = sock(k.ctx, ZMQ_PULL, 0);
    test_bind_connect(k.pull, k.push, "inproc");
    test_bind_connect(k.sink, k.out, "inproc");
    return k;
}

static void relay_close(relay_sockets_t *k)
{
    test_close(k->push);
    test_close(k->pull);
    test_close(k->out);
    test_close(k->sink);
    zmq_ctx_term(k->ctx);
}

Test(alloc, fiber_relay_allocates_nothing_per_message)
{
    const size_t sz = 64;
    memset(payload, 0x3c, sizeof payload);
    relay_sockets_t k = relay_open();
    cr_assert_eq(raw_relay(k.push, k.pull, k.out, k.sink, WARM, sz), 0);
    alloc_count_start();
    size_t bad = raw_relay(k.push, k.pull, k.out, k.sink, MEASURE, sz);
    alloc_count_stop();
    counts_t raw = {alloc_count_allocs(), alloc_count_frees()};
    cr_assert_eq(bad, 0, "raw relay went wrong");
    relay_close(&k);

    k = relay_open();
    zev_loop_t *loop = test_loop_new();
    relay_t r = {.in = zev_stream_new(loop, k.pull), .out = zev_stream_new(loop, k.out), .sz = sz};
    cr_assert(r.in && r.out);
    cr_assert_not_null(zev_fiber_spawn(loop, relay_fiber, &r, NULL));
    cr_assert_eq(fiber_relay(loop, &r, k.push, k.sink, WARM), 0);
    alloc_count_start();
    bad = fiber_relay(loop, &r, k.push, k.sink, MEASURE);
    alloc_count_stop();
    counts_t zev = {alloc_count_allocs(), alloc_count_frees()};
    cr_assert_eq(bad + r.bad, 0, "fiber relay went wrong");
    cr_assert_eq(r.relayed, WARM + MEASURE);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    relay_close(&k);
    report("fiber recv + send relay", sz, raw, zev);
    cr_expect_geq(raw.allocs, MEASURE, "libzmq allocates once per %zu B message", sz);
    cr_expect_leq(zev.allocs, raw.allocs,
                  "fiber relay: zev %zu allocations vs raw libzmq %zu over %u messages", zev.allocs,
                  raw.allocs, MEASURE);
}
