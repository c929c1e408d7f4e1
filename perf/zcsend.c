/*
 * zcsend: zero-copy send against copying send, PUSH -> PULL, large buffers
 * (64 KiB, 1 MiB), each zev sender next to the raw libzmq sender doing the
 * same work in the same run.
 *
 * Senders (impl=), all on the measuring thread:
 *   raw_copy  blocking zmq_send of the buffer (libzmq copies it)
 *   raw_zc    zmq_msg_init_data with a free function + blocking zmq_msg_send
 *   zev_copy  zev_stream_send (zev copies the buffer into a zmq_msg_t)
 *   zev_zc    zev_stream_send_zc with a tracker; each tracker is released by
 *             its on_done callback (loop thread), which counts completions
 *   zev_zc_delay  the same with zev_stream_set_tracker_delay(--delay-us,
 *             default 1000): completions share the loop's wakeups
 * The receiver is the same for every row: a raw blocking zmq_msg_recv loop on
 * its own thread that counts messages and touches the first byte. The rate is
 * measured there, first message to last; the sender's thread CPU time
 * (CLOCK_THREAD_CPUTIME_ID, from before the first send until the sender is
 * done: everything handed to libzmq and, for the zc rows, every buffer back)
 * gives tx_cpu_ns per message; tx_sleeps is how often per message that
 * thread went to sleep (voluntary context switches), and tx_iters (zev rows)
 * how many loop iterations it ran per message (zev_loop_stats).
 *
 * Buffers: a pool of `3 * hwm + 4` preallocated, pre-touched buffers. The copy
 * rows use them round-robin (so no row measures malloc of its source). The zc
 * rows take a buffer from a free list and get it back from the free function
 * (any thread: libzmq's I/O thread over tcp/ipc, the receiver over inproc)
 * through a lock-free stack; raw_zc waits on a condition variable when the
 * list is empty, zev_zc waits for the next tracker completion (it arrives
 * after the free function ran, so the buffer is back by then). Every free
 * function and, for zev_zc, every tracker completion is counted: a run where
 * one is missing fails.
 * HWM (ZMQ_SNDHWM on PUSH, ZMQ_RCVHWM on PULL) and zev's max_queue are all
 * `hwm` messages, by default 4 MiB / size (at least 8), so that at most a few
 * MiB are queued and the pool never limits the zc rows before the HWM does.
 * zev senders keep at most `hwm` messages in the stream's queue (its
 * max_queue: a send past it fails with EAGAIN and takes nothing) and top it
 * up from on_send (the queue has room again), and from on_done when the
 * last top-up ran out of buffers (a completion says one is back).
 *
 *   zcsend [--full] [--runs N] [--transports inproc,tcp[,ipc]] [--sizes 65536,1048576]
 *          [--impls raw_copy,raw_zc,zev_copy,zev_zc,zev_zc_delay] [--count N] [--hwm N]
 *          [--delay-us N] [--backend NAME]
 * Per transport and size, `runs` rounds, each running every sender once
 * (interleaved); prints RUN, RESULT (median, min, max) and RATIO lines.
 * ipc is off by default (pass --transports inproc,ipc,tcp).
 *
 * A run that makes no progress for 5 s (10 s before the first message) is
 * aborted by a watchdog (zmq_ctx_shutdown, zev_loop_stop) and reported as
 * failed instead of hanging.
 */
#include "common.h"

#include <zev.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <unistd.h>

enum { S_RAW_COPY, S_RAW_ZC, S_ZEV_COPY, S_ZEV_ZC, S_ZEV_ZC_DELAY, S__N };
static const char *const impl_names[S__N] = {"raw_copy", "raw_zc", "zev_copy", "zev_zc",
                                             "zev_zc_delay"};
static long delay_us; /* zev_zc_delay's zev_stream_set_tracker_delay */
/* The sender thread's voluntary context switches per message, per row: how
 * often it went to sleep (to wait for a completion, or for room), a count
 * that explains its CPU time and hardly moves with the machine's load. */
static perf_series_t sleeps[S__N];
static perf_series_t iters[S__N]; /* zev rows: loop iterations per message */

static long thread_sleeps(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_THREAD, &ru) == 0 ? ru.ru_nvcsw : 0;
}

static const char *backend_name; /* --backend, NULL = zev's default */

/* ------------------------------------------------------------- buffer pool */

typedef struct pool pool_t;
typedef struct slot {
    pool_t *pool;
    unsigned char *buf;
    struct slot *next;
} slot_t;

struct pool {
    size_t n, size;
    slot_t *slots;
    _Atomic(slot_t *) returned; /* pushed by free functions, any thread */
    slot_t *free;               /* the sender's private list */
    atomic_long freed;          /* free functions run in this run */
    atomic_int waiting;         /* raw_zc sender sleeps on cond */
    atomic_int *abort;
    pthread_mutex_t mu;
    pthread_cond_t cond;
};

static int pool_init(pool_t *p, size_t n, size_t size)
{
    memset(p, 0, sizeof *p);
    p->n = n;
    p->size = size;
    p->slots = calloc(n, sizeof *p->slots);
    if (!p->slots)
        return -1;
    for (size_t i = 0; i < n; i++) {
        p->slots[i].pool = p;
        p->slots[i].buf = malloc(size);
        if (!p->slots[i].buf)
            return -1;
        perf_fill(p->slots[i].buf, size);
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cond, NULL);
    return 0;
}

static void pool_fini(pool_t *p)
{
    for (size_t i = 0; p->slots && i < p->n; i++)
        free(p->slots[i].buf);
    free(p->slots);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cond);
}

/* Before a run: every buffer on the private list, counters at zero. */
static void pool_reset(pool_t *p, atomic_int *abort)
{
    p->free = NULL;
    for (size_t i = p->n; i-- > 0;) {
        p->slots[i].next = p->free;
        p->free = &p->slots[i];
    }
    atomic_store(&p->returned, NULL);
    atomic_store(&p->freed, 0);
    atomic_store(&p->waiting, 0);
    p->abort = abort;
}

/* The zero-copy free function (libzmq's or zev's): any thread. */
static void on_free(void *data, void *hint)
{
    (void)data;
    slot_t *s = hint;
    pool_t *p = s->pool;
    slot_t *old = atomic_load_explicit(&p->returned, memory_order_relaxed);
    do
        s->next = old;
    while (!atomic_compare_exchange_weak_explicit(&p->returned, &old, s, memory_order_release,
                                                  memory_order_relaxed));
    atomic_fetch_add(&p->freed, 1);
    if (atomic_load(&p->waiting)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_signal(&p->cond);
        pthread_mutex_unlock(&p->mu);
    }
}

/* Sender thread only. NULL if no buffer is free right now. */
static slot_t *pool_get(pool_t *p)
{
    if (!p->free)
        p->free = atomic_exchange_explicit(&p->returned, NULL, memory_order_acquire);
    slot_t *s = p->free;
    if (s)
        p->free = s->next;
    return s;
}

/* Blocks until cond() holds or the run is aborted; returns 0 or -1. */
static int pool_wait(pool_t *p, int (*cond)(pool_t *, long), long arg)
{
    if (cond(p, arg))
        return 0;
    atomic_store(&p->waiting, 1);
    pthread_mutex_lock(&p->mu);
    while (!cond(p, arg) && !atomic_load(p->abort)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&p->cond, &p->mu, &ts);
    }
    pthread_mutex_unlock(&p->mu);
    atomic_store(&p->waiting, 0);
    return cond(p, arg) ? 0 : -1;
}

static int has_free(pool_t *p, long unused)
{
    (void)unused;
    return p->free || atomic_load(&p->returned);
}

static int freed_reached(pool_t *p, long n)
{
    return atomic_load(&p->freed) >= n;
}

/* ---------------------------------------------------------------- receiver */

typedef struct rx {
    void *pull;
    long count;
    long got;
    atomic_long progress; /* read by the watchdog */
    uint64_t sum;
    uint64_t t_first, t_last;
    int rc;
} rx_t;

static void *rx_main(void *arg)
{
    rx_t *rx = arg;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    rx->rc = -1;
    while (rx->got < rx->count) {
        if (zmq_msg_recv(&msg, rx->pull, 0) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        const unsigned char *d = zmq_msg_data(&msg);
        if (zmq_msg_size(&msg) > 0)
            rx->sum += d[0];
        long g = ++rx->got;
        atomic_store_explicit(&rx->progress, g, memory_order_relaxed);
        if (g == 1)
            rx->t_first = perf_now_ns();
        if (g == rx->count) {
            rx->t_last = perf_now_ns();
            rx->rc = 0;
        }
    }
    zmq_msg_close(&msg); /* inproc zc: runs the last free function */
    return NULL;
}

/* ---------------------------------------------------------------- watchdog */

/* What the watchdog of a run needs: progress is anything received, freed
 * or completed; a stuck run is aborted through the context and the loop. */
typedef struct stall {
    void *ctx;
    rx_t *rx;
    pool_t *pool;
    atomic_long *completions;
    _Atomic(zev_loop_t *) loop;
    atomic_int abort;
} stall_t;

static long run_progress(void *arg, int *started)
{
    stall_t *st = arg;
    long got = atomic_load_explicit(&st->rx->progress, memory_order_relaxed);
    *started = got > 0;
    return got + atomic_load(&st->pool->freed) + atomic_load(st->completions);
}

static void run_abort(void *arg)
{
    stall_t *st = arg;
    atomic_store(&st->abort, 1);
    zev_loop_t *loop = atomic_load(&st->loop);
    if (loop)
        zev_loop_stop(loop);
    zmq_ctx_shutdown(st->ctx);
}

/* ------------------------------------------------------------------ senders */

static int raw_send(int impl, void *push, pool_t *p, long count)
{
    for (long i = 0; i < count; i++) {
        if (impl == S_RAW_COPY) {
            if (zmq_send(push, p->slots[(size_t)i % p->n].buf, p->size, 0) < 0)
                return -1;
            continue;
        }
        slot_t *s = pool_get(p);
        if (!s) {
            if (pool_wait(p, has_free, 0) < 0)
                return -1;
            s = pool_get(p);
        }
        zmq_msg_t m;
        if (zmq_msg_init_data(&m, s->buf, p->size, on_free, s) < 0)
            return -1;
        if (zmq_msg_send(&m, push, 0) < 0) {
            zmq_msg_close(&m); /* runs on_free */
            return -1;
        }
    }
    /* Every buffer back: what a zero-copy sender must know before reuse. */
    if (impl == S_RAW_ZC && pool_wait(p, freed_reached, count) < 0)
        return -1;
    return 0;
}

typedef struct tref {
    struct zsend *zs;
    zev_tracker_t *t; /* until its on_done released it */
} tref_t;

typedef struct zsend {
    int zc;
    zev_loop_t *loop;
    zev_stream_t *s;
    pool_t *pool;
    long count, sent, handed;
    atomic_long completions;
    int in_pump, failed;
    int starved; /* the last pump stopped for want of a buffer */
    tref_t *trefs;
} zsend_t;

static void zs_check_done(zsend_t *zs)
{
    if (zs->failed ||
        (zs->zc ? atomic_load_explicit(&zs->completions, memory_order_relaxed) == zs->count
                : zs->handed == zs->count))
        zev_loop_stop(zs->loop);
}

static void on_done(zev_tracker_t *t, void *arg);

/* Sends until the stream queue holds max_queue messages, the pool is empty
 * (zc) or everything is sent. */
static void pump(zsend_t *zs)
{
    if (zs->in_pump)
        return;
    zs->in_pump = 1;
    while (zs->sent < zs->count && !zs->failed) {
        pool_t *p = zs->pool;
        if (!zs->zc) {
            if (zev_stream_send(zs->s, p->slots[(size_t)zs->sent % p->n].buf, p->size, 0) < 0) {
                zs->failed = errno != EAGAIN; /* EAGAIN: max_queue, on_send tops it up */
                break;
            }
            zs->sent++;
            continue;
        }
        slot_t *b = pool_get(p);
        if (!b) {
            zs->starved = 1; /* the next on_done brings buffers back */
            break;
        }
        zs->starved = 0;
        tref_t *r = &zs->trefs[zs->sent];
        if (zev_stream_send_zc(zs->s, b->buf, p->size, on_free, b, &r->t) < 0) {
            zs->failed = errno != EAGAIN; /* EAGAIN: nothing taken, the buffer is ours */
            b->next = p->free;
            p->free = b;
            break;
        }
        zs->sent++;
        zev_tracker_on_done(r->t, on_done, r);
    }
    zs->in_pump = 0;
    zs_check_done(zs);
}

static void on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    zsend_t *zs = arg;
    if (status != 0) {
        fprintf(stderr, "zcsend: on_send status %s\n", zmq_strerror(status));
        zs->failed = 1;
    }
    zs->handed++;
    pump(zs);
}

static void on_done(zev_tracker_t *t, void *arg)
{
    tref_t *r = arg;
    zsend_t *zs = r->zs;
    zev_tracker_release(t);
    r->t = NULL;
    atomic_fetch_add_explicit(&zs->completions, 1, memory_order_relaxed);
    if (zs->starved) /* else the queue's room, not buffers, is what it waits for: on_send */
        pump(zs);
    else
        zs_check_done(zs);
}

/* ---------------------------------------------------------------------- run */

typedef perf_sample_t sample_t;

static sample_t run_once(int impl, const char *transport, pool_t *pool, long count, int hwm)
{
    sample_t out = {0, NAN, NAN, "setup"};
    void *ctx = zmq_ctx_new();
    void *pull = zmq_socket(ctx, ZMQ_PULL);
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    zmq_setsockopt(pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    /* Set now: after the watchdog's zmq_ctx_shutdown setsockopt fails with
     * ETERM, and an infinite linger would hang zmq_ctx_term. The sockets are
     * closed only once the receiver has counted everything (or gave up). */
    int zero = 0;
    zmq_setsockopt(push, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(pull, ZMQ_LINGER, &zero, sizeof zero);
    char ep[256];
    if (perf_bind(pull, transport, "zcsend", ep, sizeof ep) < 0 || zmq_connect(push, ep) < 0) {
        zmq_close(push);
        zmq_close(pull);
        zmq_ctx_term(ctx);
        out.why = "bind";
        return out;
    }

    rx_t rx = {.pull = pull, .count = count};
    atomic_init(&rx.progress, 0);
    zsend_t zs = {.zc = impl == S_ZEV_ZC || impl == S_ZEV_ZC_DELAY, .pool = pool, .count = count};
    atomic_init(&zs.completions, 0);
    stall_t st = {.ctx = ctx, .rx = &rx, .pool = pool, .completions = &zs.completions};
    atomic_init(&st.loop, NULL);
    atomic_init(&st.abort, 0);
    pool_reset(pool, &st.abort);

    int rc = -1;
    if (impl == S_ZEV_COPY || zs.zc) {
        zev_loop_opts_t o = {.backend = backend_name};
        zs.loop = zev_loop_new(&o);
        zs.s = zs.loop ? zev_stream_new(zs.loop, push) : NULL;
        if (zs.zc) {
            zs.trefs = calloc((size_t)count, sizeof *zs.trefs);
            for (long i = 0; zs.trefs && i < count; i++)
                zs.trefs[i].zs = &zs;
        }
        if (!zs.s || (zs.zc && !zs.trefs)) {
            out.why = "zev_setup";
            goto teardown;
        }
        zev_stream_set_max_queue(zs.s, (size_t)hwm);
        if (impl == S_ZEV_ZC_DELAY)
            zev_stream_set_tracker_delay(zs.s, (uint64_t)delay_us);
        zev_stream_on_send(zs.s, on_send, &zs);
        atomic_store(&st.loop, zs.loop);
    }

    pthread_t rth;
    pthread_create(&rth, NULL, rx_main, &rx);
    perf_watchdog_t w;
    perf_watchdog_start(&w, run_progress, run_abort, &st);

    uint64_t cpu0 = perf_thread_cpu_ns();
    long sleeps0 = thread_sleeps();
    if (zs.loop) {
        pump(&zs);
        rc = zev_loop_run(zs.loop);
        if (zs.failed || atomic_load(&st.abort))
            rc = -1;
        else if (zs.zc && atomic_load(&zs.completions) != count)
            rc = -1;
        else if (!zs.zc && zs.handed != count)
            rc = -1;
    } else
        rc = raw_send(impl, push, pool, count);
    uint64_t cpu1 = perf_thread_cpu_ns();
    long sleeps1 = thread_sleeps();

    pthread_join(rth, NULL);
    /* The zc buffers of the last messages may come back after the receiver
     * counted them (inproc: at its final zmq_msg_close): all must return. */
    if (rc == 0 && (impl == S_RAW_ZC || zs.zc) &&
        pool_wait(pool, freed_reached, count) < 0)
        rc = -1;
    perf_watchdog_stop(&w);

    if (atomic_load(&st.abort)) {
        out.why = "stalled";
        fprintf(stderr, "zcsend: %s stalled: received %ld, freed %ld, completed %ld of %ld\n",
                impl_names[impl], rx.got, atomic_load(&pool->freed), atomic_load(&zs.completions),
                count);
    } else if (rc != 0 || rx.rc != 0)
        out.why = "error";
    else if ((impl == S_RAW_ZC || zs.zc) && atomic_load(&pool->freed) != count)
        out.why = "free_count";
    else if (count > 1 && rx.t_last > rx.t_first) {
        out.ok = 1;
        out.why = NULL;
        out.msgs_per_s = (double)(count - 1) * 1e9 / (double)(rx.t_last - rx.t_first);
        out.cpu_ns = (double)(cpu1 - cpu0) / (double)count;
        perf_series_add(&sleeps[impl], (double)(sleeps1 - sleeps0) / (double)count);
        zev_loop_stats_t ls;
        if (zs.loop && zev_loop_stats(zs.loop, &ls) == 0)
            perf_series_add(&iters[impl], (double)ls.iterations / (double)count);
    }

teardown:
    if (zs.s)
        zev_stream_close(zs.s, 0);
    zev_loop_destroy(zs.loop);
    zmq_close(push);
    zmq_close(pull);
    zmq_ctx_term(ctx); /* every zc buffer libzmq held is freed by now */
    if (zs.trefs) {
        for (long i = 0; i < count; i++)
            if (zs.trefs[i].t)
                zev_tracker_release(zs.trefs[i].t); /* aborted run only */
        free(zs.trefs);
    }
    perf_unlink_ep(ep);
    return out;
}

/* -------------------------------------------------------------------- main */

static long default_count(size_t size, int full)
{
    long n = size <= 65536 ? 1500 : 120;
    return full ? n * 10 : n;
}

/* The case perf_rate_rows runs the rows of. */
typedef struct row {
    const char *transport;
    pool_t *pool;
    long count;
    int hwm;
} row_t;

static sample_t run_row(int impl, void *arg)
{
    const row_t *r = arg;
    return run_once(impl, r->transport, r->pool, r->count, r->hwm);
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    backend_name = perf_opt_str(&a, "--backend", NULL);
    const char *tlist = perf_opt_str(&a, "--transports", "inproc,tcp");
    delay_us = perf_opt_long(&a, "--delay-us", 1000);
    perf_banner("zcsend", &a);
    static const char *const transports[] = {"inproc", "ipc", "tcp"};
    static const size_t sizes[] = {65536, 1048576};
    int fails = 0;
    for (size_t z = 0; z < 2; z++) {
        char sz[32];
        snprintf(sz, sizeof sz, "%zu", sizes[z]);
        if (!perf_selected(&a, "--sizes", sz))
            continue;
        long dh = (long)((4u << 20) / sizes[z]);
        int hwm = (int)perf_opt_long(&a, "--hwm", dh < 8 ? 8 : dh);
        pool_t pool;
        if (pool_init(&pool, (size_t)hwm * 3 + 4, sizes[z]) < 0) {
            fprintf(stderr, "zcsend: out of memory for the pool\n");
            return 1;
        }
        long count = perf_opt_long(&a, "--count", default_count(sizes[z], a.full));
        printf("INFO zcsend size=%zu count=%ld hwm=%d pool=%zu buffers (%.1f MiB)\n", sizes[z],
               count, hwm, pool.n, (double)pool.n * (double)sizes[z] / 1048576.0);
        for (size_t t = 0; t < 3; t++) {
            if (!perf_in_list(tlist, transports[t]))
                continue;
            char keys[128];
            snprintf(keys, sizeof keys, "bench=zcsend transport=%s size=%zu", transports[t],
                     sizes[z]);
            int on[S__N];
            for (int i = 0; i < S__N; i++)
                on[i] = perf_selected(&a, "--impls", impl_names[i]);
            row_t row = {transports[t], &pool, count, hwm};
            double med[S__N], cmed[S__N], smed[S__N];
            memset(sleeps, 0, sizeof sleeps);
            memset(iters, 0, sizeof iters);
            fails += perf_rate_rows(keys, "tx_cpu_ns", S__N, impl_names, on, a.runs, count, run_row,
                                    &row, med, cmed);
            for (int i = 0; i < S__N; i++)
                smed[i] = on[i] ? perf_report(keys, impl_names[i], "tx_sleeps", "per_msg", &sleeps[i])
                                : NAN;
            for (int i = 0; i < S__N; i++)
                if (on[i] && (i == S_ZEV_COPY || i == S_ZEV_ZC || i == S_ZEV_ZC_DELAY))
                    perf_report(keys, impl_names[i], "tx_iters", "per_msg", &iters[i]);
            static const int pairs[][2] = {{S_ZEV_ZC, S_RAW_ZC},
                                           {S_ZEV_ZC_DELAY, S_RAW_ZC},
                                           {S_ZEV_ZC, S_ZEV_COPY},
                                           {S_ZEV_COPY, S_RAW_COPY},
                                           {S_RAW_ZC, S_RAW_COPY}};
            for (size_t k = 0; k < sizeof pairs / sizeof pairs[0]; k++) {
                int n = pairs[k][0], d = pairs[k][1];
                perf_ratio(keys, "msgs_per_s", impl_names[n], med[n], impl_names[d], med[d]);
                perf_ratio(keys, "tx_cpu_ns", impl_names[n], cmed[n], impl_names[d], cmed[d]);
                perf_delta(keys, "tx_sleeps", impl_names[n], smed[n], impl_names[d], smed[d]);
            }
        }
        pool_fini(&pool);
    }
    return fails ? 1 : 0;
}
