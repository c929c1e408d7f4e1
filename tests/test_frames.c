/*
 * Zero-copy receive (issue #4): kept frames that outlive the recv callback
 * and are released from worker threads, the frame-release callback on the
 * loop thread, max_frames backpressure, the receive ring that is recycled
 * and only grows, and frames released after their stream is closed and
 * after zev_loop_destroy. Every test runs on the backend ctest names in
 * ZEV_TEST_BACKEND.
 *
 * Message contents: every part is a window of one reference buffer chosen by
 * (sequence number, part index), so any thread verifies a part with one
 * memcmp and no shared state.
 *
 * A note for ThreadSanitizer: libzmq is not instrumented, so TSan cannot see
 * that a message written by a raw libzmq sender thread happens-before its
 * receipt on the loop thread. The sender publishes its sequence number with
 * a release store before sending and the receiver reads it with an acquire
 * load: that makes the edge libzmq really provides visible to TSan (and it
 * checks the sender did send it first).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "common.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

TestSuite(frames, .timeout = 120);

#define MIB ((size_t)1 << 20)
#define MAX_PARTS 8

/* ------------------------------------------------------------------ helpers */

/* ref[k] == (uint8_t)k: part (seq, i) of size n is ref[base .. base + n). */
static uint8_t ref[MIB + 256];

static void ref_init(void)
{
    for (size_t k = 0; k < sizeof ref; k++)
        ref[k] = (uint8_t)k;
}

static unsigned pat_base(uint32_t seq, unsigned part)
{
    return (seq * 131u + part * 17u) & 0xffu;
}

static bool part_ok(const void *data, size_t size, uint32_t seq, unsigned part)
{
    return size == 0 || (data && memcmp(data, ref + pat_base(seq, part), size) == 0);
}

static void sleep_us(unsigned us)
{
    struct timespec ts = {0, (long)us * 1000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* 3 parts, 0 B to 1 MiB: mostly small (around libzmq's 33-byte inline
 * limit, up to 4 KiB), every 100th message a 64 KiB middle part, every
 * 1000th a 1 MiB last part. */
static size_t mixed_size(uint32_t seq, unsigned part)
{
    static const size_t tab[16] = {0, 1, 8, 33, 34, 64, 100, 256, 0, 512, 1024, 2048, 4096, 16, 200, 40};
    if (part == 2 && seq % 1000 == 500)
        return MIB;
    if (part == 1 && seq % 100 == 37)
        return 65536;
    return tab[(seq * 7u + part * 5u) & 15u];
}

typedef size_t (*size_fn)(uint32_t seq, unsigned part);

/* ------------------------------------------------------ raw libzmq sender */

typedef struct {
    void *ctx;
    char ep[256];
    uint32_t n;
    unsigned parts;
    size_fn size;
    _Atomic uint32_t published; /* seq + 1 of the last message written */
    int err;
} sender_t;

static void *sender_main(void *arg)
{
    sender_t *sd = arg;
    void *push = zmq_socket(sd->ctx, ZMQ_PUSH);
    if (!push) {
        sd->err = errno;
        return NULL;
    }
    if (zmq_connect(push, sd->ep) < 0) {
        sd->err = errno;
        zmq_close(push);
        return NULL;
    }
    for (uint32_t seq = 0; seq < sd->n && !sd->err; seq++) {
        for (unsigned i = 0; i < sd->parts; i++) {
            size_t sz = sd->size(seq, i);
            zmq_msg_t m;
            if (zmq_msg_init_size(&m, sz) < 0) {
                sd->err = errno;
                break;
            }
            if (sz)
                memcpy(zmq_msg_data(&m), ref + pat_base(seq, i), sz);
            bool last = i + 1 == sd->parts;
            if (last)
                atomic_store_explicit(&sd->published, seq + 1, memory_order_release);
            if (zmq_msg_send(&m, push, last ? 0 : ZMQ_SNDMORE) < 0) {
                sd->err = errno;
                zmq_msg_close(&m);
                break;
            }
        }
    }
    zmq_close(push); /* default linger: what is queued is still delivered */
    return NULL;
}

/* --------------------------------------------- worker queue (mutex+condvar) */

typedef struct {
    uint32_t seq;
    zev_frame_t *f[MAX_PARTS];
} item_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    item_t *items; /* one slot per message: never wraps */
    size_t head, tail;
    bool stop;
    bool gate; /* workers start only once the gate is open */
    unsigned parts;
    size_fn size;
    unsigned hold_us; /* each worker holds a message's frames this long */
    atomic_size_t *inflight;
    atomic_size_t verified, bad, release_fail;
} wq_t;

static void *worker_main(void *arg)
{
    wq_t *q = arg;
    for (;;) {
        pthread_mutex_lock(&q->mu);
        while (!q->stop && (!q->gate || q->head == q->tail))
            pthread_cond_wait(&q->cv, &q->mu);
        if (q->head == q->tail) {
            pthread_mutex_unlock(&q->mu);
            return NULL;
        }
        item_t it = q->items[q->head++];
        pthread_mutex_unlock(&q->mu);
        if (q->hold_us)
            sleep_us(q->hold_us);
        for (unsigned i = 0; i < q->parts; i++) {
            size_t sz = q->size(it.seq, i);
            if (zev_frame_size(it.f[i]) != sz || !part_ok(zev_frame_data(it.f[i]), sz, it.seq, i) ||
                zmq_msg_size(zev_frame_msg(it.f[i])) != sz)
                atomic_fetch_add(&q->bad, 1);
        }
        atomic_fetch_sub(q->inflight, q->parts);
        for (unsigned i = 0; i < q->parts; i++)
            if (zev_frame_release(it.f[i]) != 0)
                atomic_fetch_add(&q->release_fail, 1);
        atomic_fetch_add(&q->verified, q->parts);
    }
}

/* ------------------------------------------------ kept frames, the harness */

typedef struct {
    pthread_t loop_thread;
    sender_t *sd;
    wq_t *wq;
    uint32_t n;
    unsigned parts;
    size_fn size;
    size_t max_frames;
    volatile size_t received; /* loop thread only */
    volatile size_t released; /* loop thread only */
    size_t bad_msg, unpublished, read_at_bound;
    size_t max_kept; /* zev_stream_stats frames_kept, highest seen */
    size_t max_inflight;
    uint64_t bytes_kept, bytes_released;
    bool keep_twice_einval, keep_oob_einval, keep_checked;
    atomic_size_t inflight; /* kept by the test, not yet handed to release */
    atomic_size_t bad_thread;
} kctx_t;

static void kept_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    kctx_t *c = arg;
    uint32_t seq = (uint32_t)c->received;
    if (atomic_load_explicit(&c->sd->published, memory_order_acquire) <= seq)
        c->unpublished++;
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    if (c->max_frames && st.frames_kept >= c->max_frames)
        c->read_at_bound++; /* the stream should have stopped reading */
    cr_assert_eq(zev_msg_parts(m), c->parts, "message %u has %zu parts", seq, zev_msg_parts(m));

    item_t it = {.seq = seq};
    for (unsigned i = 0; i < c->parts; i++) {
        size_t sz = c->size(seq, i);
        if (zev_msg_size(m, i) != sz || zev_msg_more(m, i) != (i + 1 < c->parts))
            c->bad_msg++;
        zev_frame_t *f = zev_msg_keep(m, i);
        cr_assert_not_null(f, "zev_msg_keep(%u, %u): %s", seq, i, zmq_strerror(errno));
        if (zev_frame_size(f) != sz)
            c->bad_msg++;
        /* Part i now lives in the frame; the message still shows it. */
        if (zev_msg_size(m, i) != sz || zev_msg_data(m, i) != zev_frame_data(f))
            c->bad_msg++;
        c->bytes_kept += sz;
        it.f[i] = f;
    }
    if (!c->keep_checked) {
        c->keep_checked = true;
        errno = 0;
        c->keep_twice_einval = zev_msg_keep(m, 0) == NULL && errno == EINVAL;
        errno = 0;
        c->keep_oob_einval = zev_msg_keep(m, c->parts) == NULL && errno == EINVAL;
    }
    size_t now = atomic_fetch_add(&c->inflight, c->parts) + c->parts;
    if (now > c->max_inflight)
        c->max_inflight = now;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    if (st.frames_kept > c->max_kept)
        c->max_kept = st.frames_kept;

    pthread_mutex_lock(&c->wq->mu);
    c->wq->items[c->wq->tail++] = it;
    if (!c->max_frames || st.frames_kept >= c->max_frames)
        c->wq->gate = true;
    pthread_cond_broadcast(&c->wq->cv);
    pthread_mutex_unlock(&c->wq->mu);
    c->received++;
}

static void kept_released(zev_stream_t *s, size_t size, void *arg)
{
    kctx_t *c = arg;
    if (!pthread_equal(pthread_self(), c->loop_thread))
        atomic_fetch_add(&c->bad_thread, 1);
    c->bytes_released += size;
    if (++c->released == (size_t)c->n * c->parts)
        zev_loop_stop(zev_stream_loop(s));
}

/* n messages of 3 parts from a raw PUSH thread over inproc, every part kept
 * and handed to two workers that verify and release it. */
static void run_kept(uint32_t n, size_t max_frames, unsigned hold_us, int timeout_ms)
{
    ref_init();
    const unsigned parts = 3;
    test_pair_t p = test_pair_open(ZMQ_PULL, TEST_NO_SOCKET, NULL); /* the sender is a thread */
    void *pull = p.a;

    sender_t sd = {.ctx = p.ctx, .n = n, .parts = parts, .size = mixed_size};
    atomic_init(&sd.published, 0);
    test_endpoint(sd.ep, sizeof sd.ep, "inproc");
    cr_assert_eq(zmq_bind(pull, sd.ep), 0, "bind: %s", zmq_strerror(errno));

    kctx_t c = {.loop_thread = pthread_self(), .sd = &sd, .n = n, .parts = parts,
                .size = mixed_size, .max_frames = max_frames};
    atomic_init(&c.inflight, 0);
    atomic_init(&c.bad_thread, 0);
    wq_t wq = {.parts = parts, .size = mixed_size, .hold_us = hold_us, .inflight = &c.inflight};
    pthread_mutex_init(&wq.mu, NULL);
    pthread_cond_init(&wq.cv, NULL);
    atomic_init(&wq.verified, 0);
    atomic_init(&wq.bad, 0);
    atomic_init(&wq.release_fail, 0);
    wq.items = calloc(n, sizeof *wq.items);
    cr_assert_not_null(wq.items);
    c.wq = &wq;

    zev_stream_t *s = zev_stream_new(p.loop, pull);
    cr_assert_not_null(s, "zev_stream_new: %s", zmq_strerror(errno));
    cr_assert_eq(zev_stream_on_frame_release(s, kept_released, &c), 0);
    if (max_frames)
        cr_assert_eq(zev_stream_set_max_frames(s, max_frames), 0);
    cr_assert_eq(zev_stream_on_recv(s, kept_recv, &c), 0);

    pthread_t workers[2], sender;
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&workers[i], NULL, worker_main, &wq), 0);
    cr_assert_eq(pthread_create(&sender, NULL, sender_main, &sd), 0);

    test_watchdog_t wd;
    test_watchdog_start(&wd, p.loop, timeout_ms);
    cr_assert_eq(zev_loop_run(p.loop), 0, "zev_loop_run: %s", zmq_strerror(errno));
    cr_assert_not(test_watchdog_stop(&wd),
                  "watchdog after %d ms: %zu of %u messages received, %zu of %zu frames "
                  "released back to the loop, %zu not yet handed to release",
                  timeout_ms, (size_t)c.received, n, (size_t)c.released, (size_t)n * parts,
                  atomic_load(&c.inflight));

    pthread_join(sender, NULL);
    pthread_mutex_lock(&wq.mu);
    wq.stop = true;
    pthread_cond_broadcast(&wq.cv);
    pthread_mutex_unlock(&wq.mu);
    for (int i = 0; i < 2; i++)
        pthread_join(workers[i], NULL);

    uint64_t bytes = 0;
    for (uint32_t seq = 0; seq < n; seq++)
        for (unsigned i = 0; i < parts; i++)
            bytes += mixed_size(seq, i);

    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    cr_expect_eq(sd.err, 0, "sender: %s", zmq_strerror(sd.err));
    cr_expect_eq(c.received, n);
    cr_expect_eq(c.released, (size_t)n * parts, "frame-release callback ran %zu times",
                 (size_t)c.released);
    cr_expect_eq(atomic_load(&wq.verified), (size_t)n * parts);
    cr_expect_eq(atomic_load(&wq.bad), 0, "%zu frames with wrong contents", atomic_load(&wq.bad));
    cr_expect_eq(atomic_load(&wq.release_fail), 0);
    cr_expect_eq(c.bad_msg, 0, "%zu borrowed parts with wrong size/more", c.bad_msg);
    cr_expect_eq(c.unpublished, 0, "a message arrived before it was sent");
    cr_expect_eq(atomic_load(&c.bad_thread), 0, "frame-release callback off the loop thread");
    cr_expect_eq(c.bytes_kept, bytes);
    cr_expect_eq(c.bytes_released, bytes);
    cr_expect_eq(st.frames_kept, 0);
    cr_expect(c.keep_twice_einval, "zev_msg_keep twice on one part: want NULL/EINVAL");
    cr_expect(c.keep_oob_einval, "zev_msg_keep(m, parts): want NULL/EINVAL");
    if (max_frames) {
        /* A message's parts are kept as one: the bound is checked before a
         * message is read, so one message may pass it by parts - 1. */
        cr_expect_leq(c.max_kept, max_frames + parts - 1, "frames_kept reached %zu", c.max_kept);
        cr_expect_leq(c.max_inflight, max_frames + parts - 1, "in flight reached %zu",
                      c.max_inflight);
        cr_expect_geq(c.max_kept, max_frames, "the bound was never reached");
        cr_expect_eq(c.read_at_bound, 0, "%zu messages read at the bound", c.read_at_bound);
    }

    cr_assert_eq(zev_stream_close(s, 0), 0);
    cr_assert_eq(test_pair_close(&p), 0);
    free(wq.items);
    pthread_mutex_destroy(&wq.mu);
    pthread_cond_destroy(&wq.cv);
    test_expect_no_leaks();
}

Test(frames, kept_100k_multipart_two_workers)
{
    run_kept(100000, 0, 0, 60000);
}

Test(frames, max_frames_bounds_frames_in_flight)
{
    /* Workers start only once the bound is reached, then hold each message
     * for 50 µs: the stream must stop at 16 (+ one message) and resume. */
    run_kept(20000, 16, 50, 60000);
}

/* ------------------------------------------------------ the receive ring */

typedef struct {
    volatile size_t received;
    size_t ring_expect; /* 0: do not check */
    size_t (*nparts)(uint32_t seq);
    zmq_msg_t *slot[MAX_PARTS];
    size_t bad, ring_bad, slot_moved, max_ring, keep_every;
    size_t kept;
    zev_loop_t *loop;
} rctx_t;

static size_t ring_part_size(uint32_t seq, unsigned part)
{
    return (seq + part) % 5 == 0 ? 1000 + part : 10 + part * 9; /* both sides of 33 B */
}

static void ring_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    rctx_t *c = arg;
    uint32_t seq = (uint32_t)c->received;
    size_t np = zev_msg_parts(m);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    if (st.ring_size > c->max_ring)
        c->max_ring = st.ring_size;
    if (c->ring_expect && st.ring_size != c->ring_expect)
        c->ring_bad++;
    if (np != c->nparts(seq) || np > MAX_PARTS) {
        c->bad++;
        c->received++;
        return;
    }
    zev_frame_t *kept = NULL;
    for (unsigned i = 0; i < np; i++) {
        size_t sz = ring_part_size(seq, i);
        if (zev_msg_size(m, i) != sz || !part_ok(zev_msg_data(m, i), sz, seq, i) ||
            zev_msg_more(m, i) != (i + 1 < np))
            c->bad++;
        /* Borrowed frames live in the ring: the same slot every time. */
        zmq_msg_t *fr = zev_msg_frame(m, i);
        if (c->ring_expect) {
            if (!c->slot[i])
                c->slot[i] = fr;
            else if (c->slot[i] != fr)
                c->slot_moved++;
        }
    }
    /* Keeping one part takes it out of the ring; the ring does not grow. */
    if (c->keep_every && seq % c->keep_every == 0) {
        unsigned i = seq % np;
        kept = zev_msg_keep(m, i);
        cr_assert_not_null(kept);
        if (!part_ok(zev_frame_data(kept), ring_part_size(seq, i), seq, i))
            c->bad++;
        cr_assert_eq(zev_frame_release(kept), 0);
        c->kept++;
    }
    c->received++;
}

/* Sends count messages from a raw PUSH on this thread, in batches, and runs
 * the loop until they are received. */
static void ring_phase(zev_loop_t *loop, void *push, rctx_t *c, uint32_t count)
{
    uint32_t first = (uint32_t)c->received, end = first + count;
    for (uint32_t seq = first; seq < end;) {
        uint32_t batch_end = seq + 100 < end ? seq + 100 : end;
        for (; seq < batch_end; seq++) {
            size_t np = c->nparts(seq);
            for (unsigned i = 0; i < np; i++) {
                int rc = zmq_send(push, ref + pat_base(seq, i), ring_part_size(seq, i),
                                  ZMQ_DONTWAIT | (i + 1 < np ? ZMQ_SNDMORE : 0));
                cr_assert_geq(rc, 0, "zmq_send: %s", zmq_strerror(errno));
            }
        }
        /* 1 ms waits: the iteration that takes the last message then waits
         * in the backend, and a 10 ms wait per batch would add up. */
        uint64_t end_ms = test_ms() + 10000;
        while (c->received < batch_end) {
            cr_assert_lt(test_ms(), end_ms, "watchdog: %zu of %u received", (size_t)c->received,
                         batch_end);
            cr_assert_geq(zev_loop_run_once(loop, 1), 0);
        }
    }
}

static size_t ring_cap_now; /* parts per message follow the ring size */
static size_t parts_up_to_ring(uint32_t seq)
{
    return 1 + seq % ring_cap_now;
}

static size_t one_more_than_ring(uint32_t seq)
{
    (void)seq;
    return ring_cap_now + 1;
}

Test(frames, ring_recycled_grows_once_never_shrinks)
{
    ref_init();
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL); /* HWMs first */
    void *pull = p.a, *push = p.b;
    /* A non-blocking sender sees the reader's progress only when it gets
     * round to processing commands: no HWM, so batches never hit EAGAIN. */
    int hwm = 0;
    zmq_setsockopt(pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    test_bind_connect(pull, push, "inproc");
    zev_stream_t *s = zev_stream_new(p.loop, pull);
    cr_assert_not_null(s);

    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    size_t r1 = st.ring_size;
    cr_assert_geq(r1, 1);
    cr_assert_lt(r1, MAX_PARTS, "test assumes a small initial ring (%zu)", r1);

    rctx_t c = {.ring_expect = r1, .nparts = parts_up_to_ring, .keep_every = 97, .loop = p.loop};
    ring_cap_now = r1;
    cr_assert_eq(zev_stream_on_recv(s, ring_recv, &c), 0);

    /* 10,000 messages of 1..ring parts: the ring never changes. */
    ring_phase(p.loop, push, &c, 10000);
    cr_expect_eq(c.bad, 0);
    cr_expect_eq(c.ring_bad, 0, "ring size changed in %zu callbacks", c.ring_bad);
    cr_expect_eq(c.slot_moved, 0, "borrowed frames moved in %zu callbacks", c.slot_moved);
    cr_expect_eq(c.max_ring, r1);
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    cr_expect_eq(st.ring_size, r1);

    /* One message with more parts than the ring: it grows, once. */
    c.ring_expect = 0;
    c.nparts = one_more_than_ring;
    ring_phase(p.loop, push, &c, 1);
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    size_t r2 = st.ring_size;
    cr_expect_gt(r2, r1);
    cr_assert_leq(r2 + 1, MAX_PARTS + 1);
    ring_phase(p.loop, push, &c, 1); /* the same size again: no second growth */
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    cr_expect_eq(st.ring_size, r2, "ring grew twice for the same message size");
    cr_expect_eq(c.bad, 0);

    /* 10,000 more of 1..r1+1 parts, most of them small: fixed, no shrink. */
    memset(c.slot, 0, sizeof c.slot);
    c.ring_expect = r2;
    c.max_ring = 0;
    c.nparts = parts_up_to_ring;
    ring_cap_now = r1 + 1;
    ring_phase(p.loop, push, &c, 10000);
    ring_cap_now = 1; /* and 1,000 single-part messages */
    ring_phase(p.loop, push, &c, 1000);
    cr_expect_eq(c.bad, 0);
    cr_expect_eq(c.ring_bad, 0, "ring size changed in %zu callbacks", c.ring_bad);
    cr_expect_eq(c.slot_moved, 0);
    cr_expect_eq(c.max_ring, r2);
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    cr_expect_eq(st.ring_size, r2);
    cr_expect_gt(c.kept, 200);
    cr_expect_eq(c.received, 21002);

    /* Kept-and-released frames all came back to the loop. */
    size_t spins = 0;
    while (zev_stream_stats(s, &st) == 0 && st.frames_kept && spins++ < 1000)
        zev_loop_run_once(p.loop, 10);
    cr_expect_eq(st.frames_kept, 0);

    cr_assert_eq(test_pair_close(&p), 0);
    test_expect_no_leaks();
}

/* ------------------------------- frames outliving their stream and loop */

typedef struct {
    pthread_t loop_thread;
    zev_frame_t *f[4096];
    volatile size_t nkept;
    volatile size_t released_cb;
    volatile int closed;
    size_t bad;
    atomic_size_t bad_thread;
} octx_t;

/* A zeroed octx_t for the calling (loop) thread; the test frees it. */
static octx_t *octx_new(void)
{
    octx_t *c = calloc(1, sizeof *c);
    cr_assert_not_null(c);
    c->loop_thread = pthread_self();
    atomic_init(&c->bad_thread, 0);
    return c;
}

static atomic_size_t ffn_freed;

/* libzmq's free function for the sender's buffers: counts what libzmq
 * really let go of. */
static void count_free(void *data, void *hint)
{
    (void)hint;
    free(data);
    atomic_fetch_add(&ffn_freed, 1);
}

static void keep_all(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    octx_t *c = arg;
    for (size_t i = 0; i < zev_msg_parts(m); i++) {
        cr_assert_lt(c->nkept, 4096);
        zev_frame_t *f = zev_msg_keep(m, i);
        cr_assert_not_null(f);
        c->f[c->nkept++] = f;
    }
}

static void count_release(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    octx_t *c = arg;
    if (!pthread_equal(pthread_self(), c->loop_thread))
        atomic_fetch_add(&c->bad_thread, 1);
    c->released_cb++;
}

/* s keeps every frame it receives in c; c counts the frame-release callbacks. */
static void octx_watch(zev_stream_t *s, octx_t *c)
{
    cr_assert_eq(zev_stream_on_recv(s, keep_all, c), 0);
    cr_assert_eq(zev_stream_on_frame_release(s, count_release, c), 0);
}

static void on_close_flag(zev_stream_t *s, void *arg)
{
    (void)s;
    *(volatile int *)arg = 1;
}

/* Sends n two-part messages (big + small) whose buffers libzmq frees with
 * count_free, so the test sees when every reference is gone. */
static void send_tracked(void *push, uint32_t first, uint32_t n, size_t big)
{
    for (uint32_t seq = first; seq < first + n; seq++) {
        size_t sizes[2] = {big, 100};
        for (unsigned i = 0; i < 2; i++) {
            void *buf = malloc(sizes[i]);
            cr_assert_not_null(buf);
            memcpy(buf, ref + pat_base(seq, i), sizes[i]);
            zmq_msg_t m;
            cr_assert_eq(zmq_msg_init_data(&m, buf, sizes[i], count_free, NULL), 0);
            cr_assert_geq(zmq_msg_send(&m, push, ZMQ_DONTWAIT | (i == 0 ? ZMQ_SNDMORE : 0)), 0,
                          "send: %s", zmq_strerror(errno));
        }
    }
}

typedef struct {
    zev_frame_t **f;
    size_t n;
    unsigned pause_every; /* sleep 20 µs every so many releases (0: never) */
    size_t fail;
} rel_job_t;

static void *release_main(void *arg)
{
    rel_job_t *j = arg;
    for (size_t i = 0; i < j->n; i++) {
        if (zev_frame_release(j->f[i]) != 0)
            j->fail++;
        if (j->pause_every && i % j->pause_every == 0)
            sleep_us(20);
    }
    return NULL;
}

static void mark_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    *(volatile int *)arg = 1;
}

/* Runs the loop until everything queued to it before this call was handled:
 * the hub's queue is FIFO, so a marker callback queued now runs after it. */
static void loop_settle(zev_loop_t *loop)
{
    volatile int mark = 0;
    cr_assert_eq(zev_loop_add_callback(loop, mark_cb, (void *)&mark), 0);
    test_run_until(loop, &mark, 10000);
}

Test(frames, released_after_close_and_after_destroy)
{
    ref_init();
    atomic_store(&ffn_freed, 0);
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    void *pull = p.a, *push = p.b;
    zev_stream_t *s = zev_stream_new(p.loop, pull);
    cr_assert_not_null(s);
    octx_t *c = octx_new();
    octx_watch(s, c);
    cr_assert_eq(zev_stream_on_close(s, on_close_flag, (void *)&c->closed), 0);

    send_tracked(push, 0, 8, MIB);
    test_run_until_count(p.loop, &c->nkept, 16, 10000);
    cr_expect_eq(atomic_load(&ffn_freed), 0, "kept frames must hold libzmq's buffers");
    for (size_t i = 0; i < 16; i++)
        cr_expect(part_ok(zev_frame_data(c->f[i]), zev_frame_size(c->f[i]), (uint32_t)(i / 2),
                          (unsigned)(i % 2)),
                  "frame %zu", i);

    /* Two released while the stream is open: the callback runs for them. */
    cr_assert_eq(zev_frame_release(c->f[0]), 0);
    cr_assert_eq(zev_frame_release(c->f[1]), 0);
    errno = 0;
    cr_expect_eq(zev_frame_release(c->f[1]), -1, "second release of one handle");
    cr_expect_eq(errno, EINVAL);
    cr_expect_eq(atomic_load(&ffn_freed), 2);
    test_run_until_count(p.loop, &c->released_cb, 2, 10000);

    /* Stream closed: four released from another thread; the buffers are
     * freed, the callback no longer runs. */
    cr_assert_eq(zev_stream_close(s, 0), 0);
    test_run_until(p.loop, &c->closed, 10000);
    rel_job_t j1 = {.f = &c->f[2], .n = 4};
    pthread_t t1;
    cr_assert_eq(pthread_create(&t1, NULL, release_main, &j1), 0);
    pthread_join(t1, NULL);
    cr_expect_eq(j1.fail, 0);
    cr_expect_eq(atomic_load(&ffn_freed), 6);
    loop_settle(p.loop);
    cr_expect_eq(c->released_cb, 2, "frame-release callback ran after the close callback");

    /* Loop destroyed: the last ten released from two threads afterwards. */
    zev_loop_destroy(p.loop);
    p.loop = NULL; /* test_pair_close must not destroy it again */
    cr_expect_eq(atomic_load(&ffn_freed), 6);
    rel_job_t j2 = {.f = &c->f[6], .n = 5}, j3 = {.f = &c->f[11], .n = 5};
    pthread_t t2, t3;
    cr_assert_eq(pthread_create(&t2, NULL, release_main, &j2), 0);
    cr_assert_eq(pthread_create(&t3, NULL, release_main, &j3), 0);
    pthread_join(t2, NULL);
    pthread_join(t3, NULL);
    cr_expect_eq(j2.fail + j3.fail, 0);
    cr_expect_eq(atomic_load(&ffn_freed), 16, "libzmq's buffers: %zu of 16 freed",
                 atomic_load(&ffn_freed));
    cr_expect_eq(c->released_cb, 2);
    cr_expect_eq(atomic_load(&c->bad_thread), 0);

    cr_assert_eq(test_pair_close(&p), 0);
    free(c);
    test_expect_no_leaks();
}

Test(frames, released_after_destroy_with_stream_open)
{
    ref_init();
    atomic_store(&ffn_freed, 0);
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    void *pull = p.a, *push = p.b;
    zev_stream_t *s = zev_stream_new(p.loop, pull);
    cr_assert_not_null(s);
    octx_t *c = octx_new();
    octx_watch(s, c);
    cr_assert_eq(zev_stream_on_close(s, on_close_flag, (void *)&c->closed), 0);

    send_tracked(push, 0, 50, 4096);
    test_run_until_count(p.loop, &c->nkept, 100, 10000);

    /* The stream is still open: destroy closes it (close callback once) and
     * the frames stay the application's. */
    zev_loop_destroy(p.loop);
    cr_expect_eq(c->closed, 1);
    cr_expect_eq(atomic_load(&ffn_freed), 0);
    for (size_t i = 0; i < 100; i++)
        cr_expect(part_ok(zev_frame_data(c->f[i]), zev_frame_size(c->f[i]), (uint32_t)(i / 2),
                          (unsigned)(i % 2)),
                  "frame %zu after destroy", i);
    /* Freed sockets and context first: the frames hold their own refs. */
    test_close(push);
    test_close(pull);
    rel_job_t j1 = {.f = &c->f[0], .n = 50}, j2 = {.f = &c->f[50], .n = 50};
    pthread_t t1, t2;
    cr_assert_eq(pthread_create(&t1, NULL, release_main, &j1), 0);
    cr_assert_eq(pthread_create(&t2, NULL, release_main, &j2), 0);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    cr_expect_eq(j1.fail + j2.fail, 0);
    cr_expect_eq(atomic_load(&ffn_freed), 100);
    cr_expect_eq(c->released_cb, 0);
    cr_assert_eq(zmq_ctx_term(p.ctx), 0);
    free(c);
    test_expect_no_leaks();
}

Test(frames, released_while_loop_is_destroyed)
{
    /* Two threads release 2,000 frames while the loop thread closes the
     * stream and destroys the loop: every buffer freed once, no race. */
    ref_init();
    atomic_store(&ffn_freed, 0);
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL); /* HWMs first */
    void *pull = p.a, *push = p.b;
    int hwm = 0;
    zmq_setsockopt(pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    test_bind_connect(pull, push, "inproc");
    zev_stream_t *s = zev_stream_new(p.loop, pull);
    cr_assert_not_null(s);
    octx_t *c = octx_new();
    octx_watch(s, c);

    send_tracked(push, 0, 1000, 64);
    test_run_until_count(p.loop, &c->nkept, 2000, 10000);

    rel_job_t j1 = {.f = &c->f[0], .n = 1000, .pause_every = 50};
    rel_job_t j2 = {.f = &c->f[1000], .n = 1000, .pause_every = 50};
    pthread_t t1, t2;
    cr_assert_eq(pthread_create(&t1, NULL, release_main, &j1), 0);
    cr_assert_eq(pthread_create(&t2, NULL, release_main, &j2), 0);
    for (int i = 0; i < 20; i++)
        zev_loop_run_once(p.loop, 0);
    zev_loop_destroy(p.loop);
    p.loop = NULL; /* test_pair_close must not destroy it again */
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    cr_expect_eq(j1.fail + j2.fail, 0);
    cr_expect_eq(atomic_load(&ffn_freed), 2000);
    cr_expect_leq(c->released_cb, 2000);
    cr_expect_eq(atomic_load(&c->bad_thread), 0);

    cr_assert_eq(test_pair_close(&p), 0);
    free(c);
    test_expect_no_leaks();
}

Test(frames, max_frames_stops_reading_and_resumes)
{
    /* Single-part messages on one thread: the bound is exact. */
    ref_init();
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    void *pull = p.a, *push = p.b;
    zev_stream_t *s = zev_stream_new(p.loop, pull);
    cr_assert_not_null(s);
    octx_t *c = octx_new();
    cr_assert_eq(zev_stream_set_max_frames(s, 4), 0);
    octx_watch(s, c);
    for (uint32_t seq = 0; seq < 20; seq++)
        cr_assert_eq(zmq_send(push, ref + pat_base(seq, 0), 100, ZMQ_DONTWAIT), 100);
    zev_stream_stats_t st;

    /* At the bound the stream stops reading; the rest waits in libzmq. */
    test_run_until_count(p.loop, &c->nkept, 4, 10000);
    for (int i = 0; i < 20; i++)
        zev_loop_run_once(p.loop, i < 10 ? 0 : 2);
    cr_expect_eq(c->nkept, 4, "read past max_frames=4");
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    cr_expect_eq(st.frames_kept, 4);

    /* A higher bound lets it read on, up to the new bound. */
    cr_assert_eq(zev_stream_set_max_frames(s, 10), 0);
    test_run_until_count(p.loop, &c->nkept, 10, 10000);
    for (int i = 0; i < 20; i++)
        zev_loop_run_once(p.loop, i < 10 ? 0 : 2);
    cr_expect_eq(c->nkept, 10);
    for (size_t i = 0; i < 8; i++)
        cr_expect(part_ok(zev_frame_data(c->f[i]), zev_frame_size(c->f[i]), (uint32_t)i, 0),
                  "frame %zu", i);

    /* Frames coming back (loop thread, then another thread) resume it. */
    for (int i = 0; i < 3; i++)
        cr_assert_eq(zev_frame_release(c->f[i]), 0);
    test_run_until_count(p.loop, &c->nkept, 13, 10000);
    for (int i = 0; i < 20; i++)
        zev_loop_run_once(p.loop, i < 10 ? 0 : 2);
    cr_expect_eq(c->nkept, 13);
    cr_expect_eq(c->released_cb, 3);
    rel_job_t j = {.f = &c->f[3], .n = 5};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, release_main, &j), 0);
    pthread_join(t, NULL);
    test_run_until_count(p.loop, &c->nkept, 18, 10000);
    cr_expect_eq(c->released_cb, 8);

    /* 0 = unbounded: the rest. */
    cr_assert_eq(zev_stream_set_max_frames(s, 0), 0);
    test_run_until_count(p.loop, &c->nkept, 20, 10000);
    for (size_t i = 8; i < 20; i++)
        cr_expect(part_ok(zev_frame_data(c->f[i]), zev_frame_size(c->f[i]), (uint32_t)i, 0),
                  "frame %zu", i);
    for (size_t i = 8; i < 20; i++)
        cr_assert_eq(zev_frame_release(c->f[i]), 0);
    test_run_until_count(p.loop, &c->released_cb, 20, 10000);
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    cr_expect_eq(st.frames_kept, 0);
    cr_expect_eq(atomic_load(&c->bad_thread), 0);

    cr_assert_eq(test_pair_close(&p), 0);
    free(c);
    test_expect_no_leaks();
}

/* ------------------------------------------ stale handles, forwarding */

/* Keeps the next message's first part; the handle lands in *out. */
typedef struct keep1 {
    zev_frame_t *out[512];
    size_t n;
    size_t released; /* on_frame_release calls */
} keep1_t;

static void keep_one(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    keep1_t *k = arg;
    cr_assert_lt(k->n, 512);
    k->out[k->n] = zev_msg_keep(m, 0);
    cr_assert_not_null(k->out[k->n]);
    k->n++;
}

static void count_released(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    ((keep1_t *)arg)->released++;
}

/* A frame released twice, after its slot went to a new frame: the second
 * release (and every other call with the old handle) fails with EINVAL, and
 * the new owner's frame stays intact and releasable once. */
Test(frames, stale_handle_never_touches_the_next_owner)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    keep1_t k = {0};
    cr_assert_eq(zev_stream_on_recv(s, keep_one, &k), 0);
    cr_assert_eq(zev_stream_on_frame_release(s, count_released, &k), 0);

    cr_assert_eq(zmq_send(p.b, "old frame", 9, 0), 9);
    test_run_until_count(p.loop, &k.n, 1, 5000);
    zev_frame_t *stale = k.out[0];
    cr_assert_eq(zev_frame_release(stale), 0);
    test_run_until_count(p.loop, &k.released, 1, 5000);

    /* Cycle the pool until the old slot is in use again, with many kept. */
    enum { KEEP = 400 };
    for (int i = 0; i < KEEP; i++) {
        char buf[16];
        int len = snprintf(buf, sizeof buf, "frame %03d", i);
        cr_assert_eq(zmq_send(p.b, buf, (size_t)len, 0), len);
    }
    test_run_until_count(p.loop, &k.n, 1 + KEEP, 5000);
    for (size_t i = 1; i < k.n; i++)
        cr_assert_neq(k.out[i], stale, "a new frame got the stale handle's value");

    errno = 0;
    cr_assert_eq(zev_frame_release(stale), -1, "second release of a reused slot");
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_null(zev_frame_data(stale));
    cr_assert_eq(errno, EINVAL);
    cr_assert_null(zev_frame_msg(stale));
    cr_assert_eq(zev_frame_size(stale), 0);
    for (size_t i = 1; i < k.n; i++) {
        char want[16];
        snprintf(want, sizeof want, "frame %03zu", i - 1);
        cr_assert_eq(zev_frame_size(k.out[i]), 9);
        cr_assert_eq(memcmp(zev_frame_data(k.out[i]), want, 9), 0, "frame %zu was touched", i);
        cr_assert_eq(zev_frame_release(k.out[i]), 0);
    }
    test_run_until_count(p.loop, &k.released, 1 + KEEP, 5000);
    cr_assert_eq(k.released, 1 + KEEP, "%zu releases reported", k.released);
    test_pair_close(&p);
}

/* Two threads releasing the same handle at once: exactly one wins. */
typedef struct racer {
    zev_frame_t *f;
    atomic_int *go;
    int rc;
} racer_t;

static void *race_release(void *arg)
{
    racer_t *r = arg;
    while (!atomic_load(r->go))
        ;
    r->rc = zev_frame_release(r->f);
    return NULL;
}

Test(frames, racing_releases_one_wins)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    keep1_t k = {0};
    cr_assert_eq(zev_stream_on_recv(s, keep_one, &k), 0);
    cr_assert_eq(zev_stream_on_frame_release(s, count_released, &k), 0);
    enum { ROUNDS = 200 };
    for (int i = 0; i < ROUNDS; i++)
        cr_assert_eq(zmq_send(p.b, "x", 1, 0), 1);
    test_run_until_count(p.loop, &k.n, ROUNDS, 5000);
    for (int i = 0; i < ROUNDS; i++) {
        atomic_int go = 0;
        racer_t r[2] = {{k.out[i], &go, 9}, {k.out[i], &go, 9}};
        pthread_t th[2];
        for (int j = 0; j < 2; j++)
            cr_assert_eq(pthread_create(&th[j], NULL, race_release, &r[j]), 0);
        atomic_store(&go, 1);
        for (int j = 0; j < 2; j++)
            pthread_join(th[j], NULL);
        cr_assert((r[0].rc == 0) != (r[1].rc == 0), "round %d: releases returned %d and %d", i,
                  r[0].rc, r[1].rc);
    }
    test_run_until_count(p.loop, &k.released, ROUNDS, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(k.released, ROUNDS, "%zu releases for %d frames", k.released, ROUNDS);
    test_pair_close(&p);
}

/* zev_stream_send_frame forwards a kept frame without copying; the frame is
 * released (on_frame_release, max_frames) only when libzmq is done with it.
 * Here the egress peer never connects: the forwarded frame stays counted
 * until the egress stream is closed, which cancels it. */
typedef struct fwd {
    zev_frame_t *kept;
    size_t got, released;
    int statuses[4];
    size_t nstatus;
} fwd_t;

static void fwd_keep(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    fwd_t *f = arg;
    f->kept = zev_msg_keep(m, 0);
    cr_assert_not_null(f->kept);
    f->got++;
}

static void fwd_released(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    ((fwd_t *)arg)->released++;
}

static void fwd_status(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    fwd_t *f = arg;
    cr_assert_eq(seq, f->nstatus + 1);
    if (f->nstatus < 4)
        f->statuses[f->nstatus] = status;
    f->nstatus++;
}

static void forward_run(size_t size)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    void *out = test_socket(p.ctx, ZMQ_PUSH);
    char ep[64];
    test_endpoint(ep, sizeof ep, "inproc");
    cr_assert_eq(zmq_connect(out, ep), 0); /* nobody binds it yet */
    zev_stream_t *in = test_stream_new(p.loop, p.a);
    zev_stream_t *eg = test_stream_new(p.loop, out);
    fwd_t f = {0};
    cr_assert_eq(zev_stream_on_recv(in, fwd_keep, &f), 0);
    cr_assert_eq(zev_stream_on_frame_release(in, fwd_released, &f), 0);
    cr_assert_eq(zev_stream_on_send(eg, fwd_status, &f), 0);

    char *payload = malloc(size);
    cr_assert_not_null(payload);
    for (size_t i = 0; i < size; i++)
        payload[i] = (char)(i * 7 + 3);
    cr_assert_eq(zmq_send(p.b, payload, size, 0), (int)size);
    test_run_until_count(p.loop, &f.got, 1, 5000);
    zev_frame_t *h = f.kept;
    cr_assert_eq(zev_stream_send_frame(eg, h, 0), 0, "send_frame: %s", zmq_strerror(errno));
    errno = 0;
    cr_assert_eq(zev_frame_release(h), -1, "the forwarded frame's handle still works");
    cr_assert_eq(errno, EINVAL);
    test_spin(p.loop, 5, 1);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(in, &st), 0);
    if (size > ZEV_ZC_COPY_MAX) {
        cr_assert_eq(f.released, 0, "released before libzmq was done with it");
        cr_assert_eq(st.frames_kept, 1);
    } else {
        cr_assert_eq(f.released, 1, "a small frame is copied and released at once");
        cr_assert_eq(st.frames_kept, 0);
    }

    /* The peer arrives: the frame goes out byte for byte. */
    void *sink = test_socket(p.ctx, ZMQ_PULL);
    test_set_int(sink, ZMQ_RCVTIMEO, 5000);
    cr_assert_eq(zmq_bind(sink, ep), 0);
    test_run_until_count(p.loop, &f.nstatus, 1, 5000);
    cr_assert_eq(f.statuses[0], 0);
    char *got = malloc(size + 1);
    cr_assert_not_null(got);
    for (int i = 0; i < 1000 && zmq_recv(sink, got, size + 1, ZMQ_DONTWAIT) < 0; i++)
        test_spin(p.loop, 1, 5);
    cr_assert_eq(memcmp(got, payload, size), 0, "forwarded bytes differ");
    test_run_until_count(p.loop, &f.released, 1, 5000);
    cr_assert_eq(zev_stream_stats(in, &st), 0);
    cr_assert_eq(st.frames_kept, 0);

    /* Refused (queue full): nothing taken, the frame stays the caller's. */
    cr_assert_eq(zmq_send(p.b, payload, size, 0), (int)size);
    test_run_until_count(p.loop, &f.got, 2, 5000);
    cr_assert_eq(zev_stream_set_max_queue(eg, 1), 0);
    test_close(sink);
    cr_assert_eq(zev_stream_send(eg, "fill", 4, 0), 0);
    int rc = zev_stream_send_frame(eg, f.kept, 0);
    if (rc < 0) { /* queue full (a small frame is copied: it may fit libzmq's pipe) */
        cr_assert_eq(errno, EAGAIN);
        cr_assert_eq(zev_frame_size(f.kept), size, "a refused frame is still the caller's");
        cr_assert_eq(zev_frame_release(f.kept), 0);
    }
    /* Closing the stream cancels what zev queued; what libzmq took (into
     * the pipe of the peer that just left) it lets go of when the socket
     * closes: the frame comes home then, not before. */
    cr_assert_eq(zev_stream_close(eg, 0), 0);
    test_close(out);
    test_run_until_count(p.loop, &f.released, 2, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(f.released, 2, "%zu releases for 2 frames", f.released);
    zev_loop_destroy(p.loop);
    p.loop = NULL;
    free(got);
    free(payload);
    test_pair_close(&p);
}

Test(frames, send_frame_forwards_without_copy_64k)
{
    forward_run(65536);
}

Test(frames, send_frame_small_is_copied)
{
    forward_run(16);
}

/* zev_stream_send_frame on the loop thread while a worker releases the same
 * frame: exactly one of the two takes it, whatever the frame's size. A small
 * frame (copied, not referenced) used to be sent and then released without
 * a claim, so both calls succeeded: the copy read a buffer the worker had
 * freed, or libzmq aborted on the double close (review finding 2). */
typedef struct sfrace {
    zev_frame_t *kept;
    size_t got, released;
    zev_frame_t *_Atomic handoff;
    atomic_int go, done, quit, rc;
} sfrace_t;

static void sfrace_keep(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    sfrace_t *r = arg;
    r->kept = zev_msg_keep(m, 0);
    cr_assert_not_null(r->kept);
    r->got++;
}

static void sfrace_released(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    ((sfrace_t *)arg)->released++;
}

static void *sfrace_worker(void *arg)
{
    sfrace_t *r = arg;
    for (;;) {
        while (!atomic_load(&r->go))
            if (atomic_load(&r->quit))
                return NULL;
        atomic_store(&r->go, 0);
        atomic_store(&r->rc, zev_frame_release(atomic_load(&r->handoff)));
        atomic_store(&r->done, 1);
    }
}

static void send_frame_race_run(size_t size)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    void *out = test_socket(p.ctx, ZMQ_PUSH), *sink = test_socket(p.ctx, ZMQ_PULL);
    test_set_int(out, ZMQ_SNDHWM, 0);
    test_set_int(sink, ZMQ_RCVHWM, 0);
    test_bind_connect(sink, out, "inproc");
    zev_stream_t *in = test_stream_new(p.loop, p.a);
    zev_stream_t *eg = test_stream_new(p.loop, out);
    sfrace_t r = {0};
    cr_assert_eq(zev_stream_on_recv(in, sfrace_keep, &r), 0);
    cr_assert_eq(zev_stream_on_frame_release(in, sfrace_released, &r), 0);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, sfrace_worker, &r), 0);

    enum { ROUNDS = 2000 };
    char payload[64], got[65];
    size_t sent = 0, released = 0;
    for (uint32_t i = 0; i < ROUNDS; i++) {
        memset(payload, 'a' + (int)(i % 26), size);
        memcpy(payload, &i, sizeof i);
        cr_assert_eq(zmq_send(p.b, payload, size, 0), (int)size);
        test_run_until_count(p.loop, &r.got, i + 1, 5000);
        zev_frame_t *f = r.kept;
        atomic_store(&r.handoff, f);
        atomic_store(&r.done, 0);
        atomic_store(&r.go, 1); /* the worker releases it ... */
        for (volatile unsigned k = 0; k < (i % 8) * 40; k = k + 1)
            ; /* (a head start for the worker, some rounds) */
        errno = 0;
        int rc = zev_stream_send_frame(eg, f, 0); /* ... while the loop forwards it */
        int err = errno;
        while (!atomic_load(&r.done))
            ;
        int wrc = atomic_load(&r.rc);
        cr_assert((rc == 0) != (wrc == 0),
                  "round %u (%zu B): send_frame returned %d, the release %d: exactly one "
                  "may take the frame", i, size, rc, wrc);
        if (rc == 0) {
            sent++;
            int n = -1;
            for (uint64_t end = test_ms() + 5000; n < 0;) {
                cr_assert(test_ms() < end, "round %u: the forwarded frame never arrived", i);
                test_spin(p.loop, 1, 0);
                n = zmq_recv(sink, got, sizeof got, ZMQ_DONTWAIT);
            }
            cr_assert_eq(n, (int)size);
            cr_assert_eq(memcmp(got, payload, size), 0, "round %u: forwarded bytes differ", i);
        } else {
            cr_assert_eq(err, EINVAL, "round %u: send_frame lost the race with %s", i,
                         zmq_strerror(err));
            released++;
        }
    }
    atomic_store(&r.quit, 1);
    pthread_join(th, NULL);
    test_run_until_count(p.loop, &r.released, ROUNDS, 5000);
    test_spin(p.loop, 3, 1);
    cr_assert_eq(r.released, ROUNDS, "%zu frames came home for %d kept", r.released, ROUNDS);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(in, &st), 0);
    cr_assert_eq(st.frames_kept, 0);
    cr_assert_eq(zmq_recv(sink, got, sizeof got, ZMQ_DONTWAIT), -1, "a frame was sent twice");
    cr_log_info("%zu B: send_frame won %zu rounds, the release %zu", size, sent, released);
    zev_loop_destroy(p.loop);
    p.loop = NULL;
    test_close(out);
    test_close(sink);
    test_pair_close(&p);
}

Test(frames, send_frame_races_release_small_one_wins)
{
    send_frame_race_run(16);
}

Test(frames, send_frame_races_release_large_one_wins)
{
    send_frame_race_run(64);
}

/* A stale frame handle never names a later frame, however often its slot is
 * reused. With 63 frames of a pool chunk held (by workers, say), every new
 * kept frame takes the one slot left, so a handle kept from its first use
 * met the slot's generation again after 32,768 messages, and a duplicate
 * release freed another owner's frame (review finding 1). A slot whose
 * generations are spent is now retired; 600,000 messages (more than its
 * 524,288 generations) never bring the stale handle back. One message per
 * iteration (batch 1), each fed from the callback, so each release is home
 * before the next keep. */
typedef struct cycle {
    void *push;
    zev_frame_t *held[63];
    size_t nheld;
    zev_frame_t *stale, *last;
    size_t got, target, aliased_at;
    size_t released;
} cycle_t;

static void cycle_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    cycle_t *c = arg;
    zev_frame_t *f = zev_msg_keep(m, 0);
    cr_assert_not_null(f, "keep: %s", zmq_strerror(errno));
    c->got++;
    if (c->nheld < 63) {
        c->held[c->nheld++] = f;
    } else if (!c->stale) {
        c->stale = f;
        cr_assert_eq(zev_frame_release(f), 0);
    } else {
        if (f == c->stale && !c->aliased_at)
            c->aliased_at = c->got;
        if (c->got < c->target)
            cr_assert_eq(zev_frame_release(f), 0); /* home before the next keep */
        else
            c->last = f; /* the last one stays kept */
    }
    if (c->got < c->target) {
        uint64_t v = c->got;
        cr_assert_eq(zmq_send(c->push, &v, sizeof v, 0), (int)sizeof v);
    }
}

static void cycle_released(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    ((cycle_t *)arg)->released++;
}

Test(frames, stale_handle_never_returns_however_often_the_slot_is_reused)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_batch(s, 1), 0);
    static cycle_t c;
    c = (cycle_t){.push = p.b, .target = 600000};
    cr_assert_eq(zev_stream_on_recv(s, cycle_recv, &c), 0);
    cr_assert_eq(zev_stream_on_frame_release(s, cycle_released, &c), 0);
    uint64_t v = 0;
    cr_assert_eq(zmq_send(p.b, &v, sizeof v, 0), (int)sizeof v);
    uint64_t end = test_ms() + 100000;
    while (c.got < c.target && !c.aliased_at) {
        cr_assert(test_ms() < end, "watchdog: %zu of %zu messages", c.got, c.target);
        cr_assert_geq(zev_loop_run_once(p.loop, 100), 0);
    }
    cr_assert_eq(c.aliased_at, 0, "message %zu got the stale handle's value", c.aliased_at);
    cr_assert_not_null(c.last);

    errno = 0;
    cr_assert_eq(zev_frame_release(c.stale), -1, "a duplicate release of the first frame");
    cr_assert_eq(errno, EINVAL);
    cr_assert_null(zev_frame_data(c.stale));
    cr_assert_eq(zev_frame_size(c.last), sizeof v, "the live frame was touched");
    memcpy(&v, zev_frame_data(c.last), sizeof v);
    cr_assert_eq(v, c.target - 1);
    cr_assert_eq(zev_frame_release(c.last), 0, "the owner's release: %s", zmq_strerror(errno));
    for (size_t i = 0; i < c.nheld; i++) {
        memcpy(&v, zev_frame_data(c.held[i]), sizeof v);
        cr_assert_eq(v, i, "held frame %zu was touched", i);
        cr_assert_eq(zev_frame_release(c.held[i]), 0);
    }
    test_run_until_count(p.loop, &c.released, c.target, 5000);
    cr_assert_eq(c.released, c.target);
    test_pair_close(&p);
}

/* zev_msg_size answers from what zmq_msg_recv returned, until the callback
 * takes a part's zmq_msg_t (zev_msg_frame) and may change it: from then on
 * it asks libzmq. A kept part's size is the size it was kept with. */
typedef struct sizes_ctx {
    size_t done;
    int bad;
} sizes_ctx_t;

static void sizes_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    sizes_ctx_t *c = arg;
    if (zev_msg_parts(m) != 3 || zev_msg_size(m, 0) != 5 || zev_msg_size(m, 1) != 1000 ||
        zev_msg_size(m, 2) != 0)
        c->bad++;
    zmq_msg_t *f = zev_msg_frame(m, 1);
    zmq_msg_t empty;
    zmq_msg_init(&empty);
    zmq_msg_move(f, &empty); /* the part is now empty */
    if (zev_msg_size(m, 1) != 0 || zev_msg_data(m, 1) == NULL)
        c->bad++;
    zmq_msg_init_size(&empty, 7);
    zmq_msg_move(f, &empty); /* and now 7 bytes */
    if (zev_msg_size(m, 1) != 7)
        c->bad++;
    zev_frame_t *k = zev_msg_keep(m, 0);
    if (!k || zev_frame_size(k) != 5 || zev_msg_size(m, 0) != 5)
        c->bad++;
    zev_frame_t *k1 = zev_msg_keep(m, 1);
    if (!k1 || zev_frame_size(k1) != 7)
        c->bad++;
    if (k)
        zev_frame_release(k);
    if (k1)
        zev_frame_release(k1);
    c->done++;
}

Test(frames, sizes_from_recv_until_the_frame_is_handed_out)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = zev_stream_new(p.loop, p.a);
    cr_assert_not_null(s);
    sizes_ctx_t c = {0};
    cr_assert_eq(zev_stream_on_recv(s, sizes_recv, &c), 0);
    static char big[1000];
    int round = 0;
    while (round++ < 3) {
        cr_assert_eq(zmq_send(p.b, "hello", 5, ZMQ_SNDMORE), 5);
        cr_assert_eq(zmq_send(p.b, big, sizeof big, ZMQ_SNDMORE), (int)sizeof big);
        cr_assert_eq(zmq_send(p.b, "", 0, 0), 0);
    }
    test_run_until_count(p.loop, &c.done, 3, 5000);
    cr_expect_eq(c.done, 3);
    cr_expect_eq(c.bad, 0, "%d wrong sizes", c.bad);
    cr_assert_eq(test_pair_close(&p), 0);
}
