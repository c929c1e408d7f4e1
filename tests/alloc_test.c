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
    fprintf(stderr,
            "alloc: %-30s %4zu B  raw %.3f allocs/msg (%zu frees)  zev %.3f allocs/msg (%zu frees)  "
            "zev-raw %+ld allocs in %u msgs\n",
            what, sz, (double)raw.allocs / MEASURE, raw.frees, (double)zev.allocs / MEASURE,
            zev.frees, (long)zev.allocs - (long)raw.allocs, MEASURE);
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

static void tx_cb(zev_stream_t *s, int status, void *arg)
{
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
