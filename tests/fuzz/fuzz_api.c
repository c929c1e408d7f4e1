/*
 * libFuzzer harness for zev's public API (issue 14).
 *
 * Each input is decoded into a sequence of public calls on a fresh loop (its
 * backend chosen by the first byte: epoll, poll or kqueue through the shim)
 * with real libzmq sockets (PUSH -> PULL pairs over inproc and tcp
 * 127.0.0.1, one shared context): streams made and closed (with and without
 * ZEV_CLOSE_FLUSH / ZEV_CLOSE_SOCKET), every send flavour (send, multipart
 * with ZMQ_SNDMORE, send_msg, send_zc with and without a tracker,
 * send_frame of a kept frame, a fiber's send), flush, the setters (batch,
 * max_queue, max_frames, max_parts, send timeout, on_recv on/off), timers
 * (fire-and-forget start/cancel, owned new/arm/disarm/free, also from
 * inside callbacks: timer and on_send callbacks run an op of the input
 * themselves), io watchers, add_callback and post, run_once, stop, kept
 * frames released on the loop thread or from a helper thread, trackers,
 * fibers (spawn, recv, send, sleep, yield, cancel, detach, join), and at the
 * end destroy.
 *
 * Invariants, checked as it goes and at the end (a violation aborts, which
 * libFuzzer reports as a crash with the input):
 * - no call returns -1 (or NULL) without errno (errno is zeroed before each);
 * - every stream's on_send statuses come once each, numbered 1, 2, 3, ... in
 *   order, and their number is the stream's final zev_stream_send_seq: every
 *   message a send call took gets exactly one status (a plain send call
 *   that succeeded always takes a number; a fiber send may or may not);
 * - every message that arrives was given by a send call that succeeded (or
 *   a fiber send), on its own pair, and arrives once;
 * - every zero-copy buffer given is freed once (and never one refused);
 *   every tracker completes once, its callback runs at most once;
 * - every kept frame is released once; its stream reports releases at
 *   most as often as frames were kept, and reports each one it released
 *   directly while it is open; every post runs once; every close callback
 *   runs once;
 * - no leak: LeakSanitizer, after every input.
 *
 * Build: cmake -DZEV_FUZZ=ON -DCMAKE_C_COMPILER=clang; run: tests/run fuzz.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zev.h>
#include <zmq.h>

#define NPAIR 3
#define NTIMER 6
#define NFIBER 4
#define NPOST 4
#define MAXID 4096
#define MAXKEPT 64
#define MAXTRACK 64
#define MAXACCT 32
#define MAXOPS 160

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_api: invariant broken at line %d: %s: ", __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* errno must be set whenever a call fails. */
#define ERRNO_OK(failed, what) CHECK(!(failed) || errno != 0, "%s failed without errno", what)

/* ------------------------------------------------------------- the input */

static const uint8_t *in_data;
static size_t in_len, in_pos;

static unsigned byte(void)
{
    return in_pos < in_len ? in_data[in_pos++] : 0;
}

static int more(void)
{
    return in_pos < in_len;
}

/* ---------------------------------------------------------------- state */

typedef struct acct {
    int used;
    int pair;
    int is_tx;
    uint64_t given;         /* plain send calls that took a message */
    uint64_t fiber_ok;      /* fiber sends that succeeded */
    uint64_t fiber_tries;   /* fiber sends made (some take a number and fail) */
    uint64_t statuses;      /* on_send reports */
    uint64_t final_seq;     /* zev_stream_send_seq in the close callback */
    int closed_cb;          /* close callbacks */
    size_t kept;            /* frames kept from this stream */
    size_t reported;        /* on_frame_release reports */
    atomic_size_t released; /* frames released directly (any thread) */
    int open;
    zev_stream_t *s;
} acct_t;

typedef struct pairslot {
    void *tx, *rx;           /* sockets, NULL when gone (handed to zev or never made) */
    zev_stream_t *stx, *srx; /* NULL: no stream or closed */
    acct_t *atx, *arx;
    char ep[128];
    int tcp;
    int mid; /* tx is in the middle of a multipart message (plain sends) */
} pairslot_t;

typedef struct timerslot {
    zev_timer_t *t;
    int owned;
    int repeat;
} timerslot_t;

typedef struct fiberslot {
    zev_fiber_t *f;
    int alive;    /* fn has not returned */
    int detached; /* the handle is stale once it returns */
    int joining;  /* another fiber joins it */
    int kind;
    int target; /* pair, or the fiber to join */
    unsigned n;
} fiberslot_t;

typedef struct keptslot {
    zev_frame_t *f;
    acct_t *a;
} keptslot_t;

typedef struct trackslot {
    zev_tracker_t *t;
    int cb;
    int released;
} trackslot_t;

static void *ctx;
static zev_loop_t *loop;
static pairslot_t pairs[NPAIR];
static timerslot_t timers[NTIMER];
static fiberslot_t fibers[NFIBER];
static keptslot_t kept[MAXKEPT];
static size_t nkept;
static trackslot_t tracks[MAXTRACK];
static size_t ntracks;
static acct_t accts[MAXACCT];
static zev_post_t posts[NPOST];
static int post_queued[NPOST];
static int posts_made, posts_ran;
static int callbacks_ran;
static int io_fds[2] = {-1, -1};
static zev_io_t *io;
static int in_callback;
static uint64_t next_id;
static uint8_t id_state[MAXID]; /* 0 none, 1 given, 2 fiber attempt, +4 received */
static int8_t id_pair[MAXID];
static atomic_int zc_freed;
static int zc_given;

/* A helper thread releasing kept frames. */
static pthread_t helper;
static pthread_mutex_t helper_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t helper_cv = PTHREAD_COND_INITIALIZER;
static keptslot_t helper_q[MAXKEPT];
static size_t helper_n;
static int helper_busy;

static void *helper_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&helper_mu);
    for (;;) {
        while (!helper_n)
            pthread_cond_wait(&helper_cv, &helper_mu);
        keptslot_t k = helper_q[--helper_n];
        helper_busy = 1;
        pthread_mutex_unlock(&helper_mu);
        errno = 0;
        int rc = zev_frame_release(k.f);
        CHECK(rc == 0, "helper: zev_frame_release: %s", strerror(errno));
        atomic_fetch_add(&k.a->released, 1);
        pthread_mutex_lock(&helper_mu);
        helper_busy = 0;
        pthread_cond_broadcast(&helper_cv);
    }
    return NULL;
}

static void helper_release(keptslot_t k)
{
    pthread_mutex_lock(&helper_mu);
    helper_q[helper_n++] = k;
    pthread_cond_broadcast(&helper_cv);
    pthread_mutex_unlock(&helper_mu);
}

static void helper_drain(void)
{
    pthread_mutex_lock(&helper_mu);
    while (helper_n || helper_busy)
        pthread_cond_wait(&helper_cv, &helper_mu);
    pthread_mutex_unlock(&helper_mu);
}

static acct_t *acct_new(int pair, int is_tx)
{
    for (int i = 0; i < MAXACCT; i++) {
        if (!accts[i].used) {
            memset(&accts[i], 0, sizeof accts[i]);
            accts[i].used = 1;
            accts[i].pair = pair;
            accts[i].is_tx = is_tx;
            accts[i].open = 1;
            return &accts[i];
        }
    }
    return NULL;
}

/* ------------------------------------------------------------- callbacks */

static void run_op(int depth);

static void on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)status;
    acct_t *a = arg;
    CHECK(seq == a->statuses + 1, "on_send: status for %lu after %lu", (unsigned long)seq,
          (unsigned long)a->statuses);
    a->statuses++;
    if (more() && (byte() & 7) == 0) {
        in_callback++;
        run_op(1);
        in_callback--;
    }
}

static void note_received(acct_t *a, const void *data, size_t size)
{
    CHECK(size >= 8, "a message whose first part has %zu bytes", size);
    uint64_t id;
    memcpy(&id, data, sizeof id);
    CHECK(id < MAXID, "unknown id %lu", (unsigned long)id);
    CHECK(!(id_state[id] & 4), "message %lu received twice", (unsigned long)id);
    CHECK(id_pair[id] == a->pair, "message %lu of pair %d arrived on pair %d", (unsigned long)id,
          id_pair[id], a->pair);
    id_state[id] |= 4;
}

static void on_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    acct_t *a = arg;
    CHECK(zev_msg_parts(m) >= 1, "empty message");
    note_received(a, zev_msg_data(m, 0), zev_msg_size(m, 0));
    unsigned b = byte();
    if ((b & 3) == 1 && nkept < MAXKEPT) {
        size_t part = zev_msg_parts(m) - 1;
        errno = 0;
        zev_frame_t *f = zev_msg_keep(m, part);
        ERRNO_OK(!f, "zev_msg_keep");
        if (f) {
            kept[nkept++] = (keptslot_t){f, a};
            a->kept++;
        }
    } else if ((b & 15) == 2) {
        errno = 0;
        int rc = zev_stream_close(s, (b >> 4) & 3);
        ERRNO_OK(rc < 0, "zev_stream_close from on_recv");
        if (rc == 0) {
            pairslot_t *p = &pairs[a->pair];
            a->open = 0;
            if (p->srx == s) {
                p->srx = NULL;
                if ((b >> 4) & ZEV_CLOSE_SOCKET)
                    p->rx = NULL;
            }
        }
    }
}

static void on_close(zev_stream_t *s, void *arg)
{
    acct_t *a = arg;
    a->closed_cb++;
    CHECK(a->closed_cb == 1, "close callback ran %d times", a->closed_cb);
    a->final_seq = zev_stream_send_seq(s);
    a->open = 0;
    a->s = NULL;
    pairslot_t *p = &pairs[a->pair];
    if (p->stx == s)
        p->stx = NULL;
    if (p->srx == s)
        p->srx = NULL;
}

static void on_frame(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    acct_t *a = arg;
    a->reported++;
    CHECK(a->reported <= a->kept, "%zu releases reported for %zu kept frames", a->reported,
          a->kept);
}

static void zc_free(void *data, void *hint)
{
    (void)hint;
    free(data);
    atomic_fetch_add(&zc_freed, 1);
}

static void on_tracker(zev_tracker_t *t, void *arg)
{
    trackslot_t *ts = arg;
    CHECK(ts->t == t, "tracker callback with another tracker");
    CHECK(!ts->released, "tracker callback after zev_tracker_release");
    ts->cb++;
    CHECK(ts->cb == 1, "tracker callback ran %d times", ts->cb);
    CHECK(zev_tracker_done(t) == 1, "tracker callback before done");
}

static void on_timer(zev_timer_t *t, void *arg)
{
    timerslot_t *ts = arg;
    CHECK(ts->t == t, "timer callback with another timer");
    if (!ts->owned && !ts->repeat)
        ts->t = NULL; /* a fire-and-forget one-shot ends after its callback */
    if (more() && (byte() & 3) == 0) {
        in_callback++;
        run_op(1);
        in_callback--;
    }
}

static void on_io(zev_io_t *w, int fd, int events, void *arg)
{
    (void)w;
    (void)arg;
    if (events & ZEV_READ) {
        char buf[64];
        while (read(fd, buf, sizeof buf) > 0)
            ;
    }
}

static void on_cb(zev_loop_t *l, void *arg)
{
    (void)l;
    (void)arg;
    callbacks_ran++;
}

static void on_post(zev_loop_t *l, void *arg)
{
    (void)l;
    int i = (int)(intptr_t)arg;
    CHECK(post_queued[i], "post %d ran but was not queued", i);
    post_queued[i] = 0;
    posts_ran++;
}

/* ---------------------------------------------------------------- fibers */

static void fiber_main(void *arg)
{
    fiberslot_t *fs = arg;
    for (unsigned i = 0; i < fs->n; i++) {
        pairslot_t *p = &pairs[fs->target % NPAIR];
        int rc = 0;
        errno = 0;
        switch (fs->kind) {
        case 0: {
            zev_msg_t *m;
            zev_stream_t *s = p->srx;
            if (!s)
                rc = zev_fiber_sleep(200);
            else {
                rc = zev_fiber_recv(s, &m, 1000);
                ERRNO_OK(rc < 0, "zev_fiber_recv");
                if (rc == 0) {
                    acct_t *a = p->arx;
                    note_received(a, zev_msg_data(m, 0), zev_msg_size(m, 0));
                }
            }
            break;
        }
        case 1: {
            zev_stream_t *s = p->stx;
            acct_t *a = p->atx;
            if (!s || p->mid || next_id >= MAXID) {
                rc = zev_fiber_yield();
                break;
            }
            uint64_t id = next_id++;
            id_state[id] = 2;
            id_pair[id] = (int8_t)(p - pairs);
            a->fiber_tries++;
            rc = zev_fiber_send(s, &id, sizeof id, 0, 2000);
            ERRNO_OK(rc < 0, "zev_fiber_send");
            if (rc == 0)
                a->fiber_ok++;
            break;
        }
        case 2:
            rc = zev_fiber_sleep(100 + (i % 3) * 300);
            break;
        case 3: {
            fiberslot_t *t = &fibers[fs->target % NFIBER];
            if (t == fs || !t->f || t->detached || t->joining) {
                rc = zev_fiber_yield();
                break;
            }
            t->joining = 1;
            zev_fiber_t *tf = t->f;
            rc = zev_fiber_join(tf, 3000);
            ERRNO_OK(rc < 0, "zev_fiber_join");
            if (rc == 0 && t->f == tf) {
                t->f = NULL; /* freed */
            }
            t->joining = 0;
            break;
        }
        default:
            rc = zev_fiber_yield();
        }
        ERRNO_OK(rc < 0, "fiber call");
        if (rc < 0 && errno == ECANCELED)
            break;
    }
    fs->alive = 0;
    if (fs->detached)
        fs->f = NULL; /* freed as it returns */
}

/* -------------------------------------------------------------- the ops */

static unsigned long endpoints; /* never reused: a closed socket may still be bound */

static void pair_make(int i)
{
    pairslot_t *p = &pairs[i];
    int linger = (byte() & 1) ? 0 : 20;
    if (!p->rx) {
        p->rx = zmq_socket(ctx, ZMQ_PULL);
        CHECK(p->rx, "zmq_socket");
        zmq_setsockopt(p->rx, ZMQ_LINGER, &linger, sizeof linger);
        int hwm = 1 + (int)(byte() % 8);
        zmq_setsockopt(p->rx, ZMQ_RCVHWM, &hwm, sizeof hwm);
        if (p->tcp)
            strcpy(p->ep, "tcp://127.0.0.1:*");
        else
            snprintf(p->ep, sizeof p->ep, "inproc://fuzz-%d-%lu", i, ++endpoints);
        CHECK(zmq_bind(p->rx, p->ep) == 0, "bind %s: %s", p->ep, zmq_strerror(errno));
        size_t len = sizeof p->ep;
        zmq_getsockopt(p->rx, ZMQ_LAST_ENDPOINT, p->ep, &len);
        if (p->tx && p->stx) /* the old peer connects to the new endpoint too */
            zev_stream_connect(p->stx, p->ep);
        else if (p->tx)
            zmq_connect(p->tx, p->ep);
    }
    if (!p->tx) {
        p->tx = zmq_socket(ctx, ZMQ_PUSH);
        CHECK(p->tx, "zmq_socket");
        zmq_setsockopt(p->tx, ZMQ_LINGER, &linger, sizeof linger);
        int hwm = 1 + (int)(byte() % 8);
        zmq_setsockopt(p->tx, ZMQ_SNDHWM, &hwm, sizeof hwm);
        CHECK(zmq_connect(p->tx, p->ep) == 0, "connect %s", p->ep);
    }
}

static void stream_make(int i, int tx)
{
    pairslot_t *p = &pairs[i];
    if (in_callback)
        return; /* a socket is made on the main path only */
    if (!(tx ? p->tx : p->rx))
        pair_make(i);
    if (tx ? p->stx : p->srx)
        return;
    acct_t *a = acct_new(i, tx);
    if (!a)
        return;
    errno = 0;
    zev_stream_t *s = zev_stream_new(loop, tx ? p->tx : p->rx);
    ERRNO_OK(!s, "zev_stream_new");
    if (!s) {
        a->used = 0;
        return;
    }
    a->s = s;
    CHECK(zev_stream_on_close(s, on_close, a) == 0, "on_close");
    CHECK(zev_stream_on_frame_release(s, on_frame, a) == 0, "on_frame_release");
    if (tx) {
        CHECK(zev_stream_on_send(s, on_send, a) == 0, "on_send");
        p->stx = s;
        p->atx = a;
        p->mid = 0;
    } else {
        if (byte() & 1)
            CHECK(zev_stream_on_recv(s, on_recv, a) == 0, "on_recv");
        p->srx = s;
        p->arx = a;
    }
}

static void stream_close(int i, int tx, unsigned flags)
{
    pairslot_t *p = &pairs[i];
    zev_stream_t *s = tx ? p->stx : p->srx;
    if (!s)
        return;
    flags &= ZEV_CLOSE_SOCKET | ZEV_CLOSE_FLUSH;
    errno = 0;
    int rc = zev_stream_close(s, (int)flags);
    ERRNO_OK(rc < 0, "zev_stream_close");
    CHECK(rc == 0, "zev_stream_close of an open stream: %s", strerror(errno));
    (tx ? p->atx : p->arx)->open = 0;
    if (tx) {
        p->stx = NULL;
        p->mid = 0;
        if (flags & ZEV_CLOSE_SOCKET)
            p->tx = NULL;
    } else {
        p->srx = NULL;
        if (flags & ZEV_CLOSE_SOCKET)
            p->rx = NULL;
    }
}

static uint64_t take_id(int pair)
{
    if (next_id >= MAXID)
        return UINT64_MAX;
    uint64_t id = next_id++;
    id_pair[id] = (int8_t)pair;
    return id;
}

/* One message (a new id in its first part) by one of the send flavours. */
static void send_one(int i, unsigned how)
{
    pairslot_t *p = &pairs[i];
    zev_stream_t *s = p->stx;
    acct_t *a = p->atx;
    if (!s)
        return;
    int rc;
    if (p->mid) { /* end the open message first */
        errno = 0;
        rc = zev_stream_send(s, "", 0, 0);
        ERRNO_OK(rc < 0, "zev_stream_send (end)");
        if (rc == 0)
            p->mid = 0;
        return;
    }
    uint64_t id = take_id(i);
    if (id == UINT64_MAX)
        return;
    size_t len = 8 + byte() % 3 * 40; /* 8, 48 or 88 bytes: inline and not */
    char buf[96] = {0};
    memcpy(buf, &id, sizeof id);
    errno = 0;
    switch (how % 6) {
    case 0:
        rc = zev_stream_send(s, buf, len, (byte() & 1) ? ZMQ_DONTWAIT : 0);
        ERRNO_OK(rc < 0, "zev_stream_send");
        break;
    case 1: { /* send_msg, one to three parts */
        zmq_msg_t parts[3];
        size_t n = 1 + byte() % 3;
        for (size_t k = 0; k < n; k++) {
            zmq_msg_init_size(&parts[k], k ? k * 30 : len);
            if (!k)
                memcpy(zmq_msg_data(&parts[k]), buf, len);
        }
        rc = zev_stream_send_msg(s, parts, n, 0);
        ERRNO_OK(rc < 0, "zev_stream_send_msg");
        for (size_t k = 0; k < n; k++)
            zmq_msg_close(&parts[k]); /* empty after a move; ours after a failure */
        break;
    }
    case 2:
    case 3: { /* send_zc, with a tracker or without */
        size_t zlen = (how % 6) == 2 ? 16 : 64 + byte();
        char *z = malloc(zlen);
        CHECK(z, "malloc");
        memset(z, 0x5a, zlen);
        memcpy(z, &id, sizeof id);
        zev_tracker_t *t = NULL;
        int want = (byte() & 1) && ntracks < MAXTRACK;
        rc = zev_stream_send_zc(s, z, zlen, zc_free, NULL, want ? &t : NULL);
        ERRNO_OK(rc < 0, "zev_stream_send_zc");
        if (rc < 0) {
            free(z);
            break;
        }
        zc_given++;
        if (want) {
            CHECK(t, "no tracker");
            trackslot_t *ts = &tracks[ntracks++];
            *ts = (trackslot_t){.t = t};
            if (byte() & 1) {
                errno = 0;
                int r2 = zev_tracker_on_done(t, on_tracker, ts);
                ERRNO_OK(r2 < 0, "zev_tracker_on_done");
            }
        }
        break;
    }
    case 4: { /* multipart: the id, then more parts, maybe a kept frame */
        rc = zev_stream_send(s, buf, len, ZMQ_SNDMORE);
        ERRNO_OK(rc < 0, "zev_stream_send (SNDMORE)");
        if (rc < 0)
            break;
        p->mid = 1;
        a->given++;
        id_state[id] = 1;
        int r2;
        errno = 0;
        if (nkept && (byte() & 1)) {
            size_t k = byte() % nkept;
            r2 = zev_stream_send_frame(s, kept[k].f, 0);
            ERRNO_OK(r2 < 0, "zev_stream_send_frame");
            if (r2 == 0)
                kept[k] = kept[--nkept]; /* zev's now */
        } else {
            r2 = zev_stream_send(s, "tail", 4, 0);
            ERRNO_OK(r2 < 0, "zev_stream_send (tail)");
        }
        if (r2 == 0)
            p->mid = 0;
        return;
    }
    default: /* a kept frame alone cannot carry a fresh id: a plain copy */
        rc = zev_stream_send(s, buf, len, 0);
        ERRNO_OK(rc < 0, "zev_stream_send");
    }
    if (rc == 0) {
        a->given++;
        id_state[id] = 1;
    }
}

static void timer_op(unsigned b)
{
    timerslot_t *ts = &timers[(b >> 3) % NTIMER];
    uint64_t delay = byte() % 4 * 500;
    errno = 0;
    switch (b & 7) {
    case 0:
    case 1:
        if (ts->t)
            break;
        ts->owned = 0;
        ts->repeat = b & 1;
        ts->t = zev_timer_start(loop, delay, ts->repeat ? 700 : 0, on_timer, ts);
        ERRNO_OK(!ts->t, "zev_timer_start");
        break;
    case 2:
        if (ts->t && !ts->owned) {
            int rc = zev_timer_cancel(ts->t);
            ERRNO_OK(rc < 0, "zev_timer_cancel");
            CHECK(rc == 0, "zev_timer_cancel: %s", strerror(errno));
            ts->t = NULL;
        }
        break;
    case 3:
        if (ts->t)
            break;
        ts->owned = 1;
        ts->repeat = 0;
        ts->t = zev_timer_new(loop, on_timer, ts);
        ERRNO_OK(!ts->t, "zev_timer_new");
        break;
    case 4:
    case 5:
        if (ts->t && ts->owned) {
            int rc = zev_timer_arm(ts->t, delay, (b & 1) ? 600 : 0);
            ERRNO_OK(rc < 0, "zev_timer_arm");
        }
        break;
    case 6:
        if (ts->t && ts->owned) {
            int rc = zev_timer_disarm(ts->t);
            ERRNO_OK(rc < 0, "zev_timer_disarm");
        }
        break;
    default:
        if (ts->t && ts->owned) {
            int rc = zev_timer_free(ts->t);
            ERRNO_OK(rc < 0, "zev_timer_free");
            CHECK(rc == 0, "zev_timer_free: %s", strerror(errno));
            ts->t = NULL;
        }
    }
}

static void fiber_op(unsigned b)
{
    fiberslot_t *fs = &fibers[(b >> 3) % NFIBER];
    errno = 0;
    switch (b & 3) {
    case 0:
        if (fs->f)
            break;
        *fs = (fiberslot_t){
            .alive = 1, .kind = (int)(byte() % 4), .target = (int)byte(), .n = 1 + byte() % 16};
        fs->f = zev_fiber_spawn(loop, fiber_main, fs, NULL);
        ERRNO_OK(!fs->f, "zev_fiber_spawn");
        if (!fs->f)
            fs->alive = 0;
        break;
    case 1:
        if (fs->f && (!fs->detached || fs->alive)) {
            int rc = zev_fiber_cancel(fs->f);
            ERRNO_OK(rc < 0, "zev_fiber_cancel");
        }
        break;
    case 2:
        if (fs->f && !fs->detached && !fs->joining) {
            int rc = zev_fiber_detach(fs->f);
            ERRNO_OK(rc < 0, "zev_fiber_detach");
            if (rc == 0) {
                fs->detached = 1;
                if (!fs->alive)
                    fs->f = NULL; /* freed at once */
            }
        }
        break;
    default:
        break;
    }
}

static void run_op(int depth)
{
    unsigned op = byte();
    unsigned b = byte();
    int i = (int)(b % NPAIR);
    errno = 0;
    switch (op % 24) {
    case 0:
        stream_make(i, 1);
        break;
    case 1:
        stream_make(i, 0);
        break;
    case 2:
    case 3:
    case 4:
        send_one(i, b >> 2);
        break;
    case 5:
        stream_close(i, (b >> 2) & 1, b >> 3);
        break;
    case 6: {
        zev_stream_t *s = (b & 4) ? pairs[i].stx : pairs[i].srx;
        if (s) {
            int rc = zev_stream_flush(s, 1 + (int)((b >> 3) % 3), byte() % 4);
            ERRNO_OK(rc < 0, "zev_stream_flush");
        }
        break;
    }
    case 7: { /* setters */
        zev_stream_t *s = (b & 4) ? pairs[i].stx : pairs[i].srx;
        if (!s)
            break;
        unsigned v = byte();
        int rc;
        switch ((b >> 3) % 6) {
        case 0:
            rc = zev_stream_set_batch(s, v % 5);
            break;
        case 1:
            rc = zev_stream_set_max_queue(s, v % 6);
            break;
        case 2:
            rc = zev_stream_set_max_frames(s, v % 5);
            break;
        case 3:
            rc = zev_stream_set_max_parts(s, v % 4);
            break;
        case 4:
            rc = zev_stream_set_send_timeout(s, (uint64_t)(v % 4) * 700);
            break;
        default:
            rc = zev_stream_on_recv(s, (v & 1) ? on_recv : NULL,
                                    (b & 4) ? pairs[i].atx : pairs[i].arx);
        }
        ERRNO_OK(rc < 0, "a setter");
        break;
    }
    case 8:
    case 9:
        timer_op(byte());
        break;
    case 10: {
        if (io_fds[0] < 0)
            break;
        unsigned c = b % 4;
        if (c == 0 && !io) {
            io = zev_io_start(loop, io_fds[0], ZEV_READ, on_io, NULL);
            ERRNO_OK(!io, "zev_io_start");
        } else if (c == 1 && io) {
            int rc = zev_io_stop(io);
            ERRNO_OK(rc < 0, "zev_io_stop");
            io = NULL;
        } else if (c == 2 && io) {
            int rc = zev_io_update(io, (int)(byte() % 3));
            ERRNO_OK(rc < 0, "zev_io_update");
        } else {
            ssize_t w = write(io_fds[1], "x", 1);
            (void)w;
        }
        break;
    }
    case 11: {
        int rc = zev_loop_add_callback(loop, on_cb, NULL);
        ERRNO_OK(rc < 0, "zev_loop_add_callback");
        break;
    }
    case 12: {
        int k = (int)(b % NPOST);
        if (post_queued[k])
            break;
        post_queued[k] = 1;
        int rc = zev_loop_post(loop, &posts[k], on_post, (void *)(intptr_t)k);
        ERRNO_OK(rc < 0, "zev_loop_post");
        CHECK(rc == 0, "zev_loop_post: %s", strerror(errno));
        posts_made++;
        break;
    }
    case 13:
    case 14:
    case 15: {
        int rc = zev_loop_run_once(loop, (b & 7) == 0 ? 1 : 0);
        ERRNO_OK(rc < 0, "zev_loop_run_once");
        CHECK(rc >= 0 || (in_callback && errno == EBUSY), "run_once: %s", strerror(errno));
        break;
    }
    case 16:
        zev_loop_stop(loop);
        break;
    case 17: { /* a kept frame released here or by the helper thread */
        if (!nkept)
            break;
        size_t k = b % nkept;
        keptslot_t ks = kept[k];
        kept[k] = kept[--nkept];
        if (byte() & 1) {
            helper_release(ks);
        } else {
            int rc = zev_frame_release(ks.f);
            ERRNO_OK(rc < 0, "zev_frame_release");
            CHECK(rc == 0, "zev_frame_release: %s", strerror(errno));
            atomic_fetch_add(&ks.a->released, 1);
        }
        break;
    }
    case 18: { /* tracker released early */
        if (!ntracks)
            break;
        trackslot_t *ts = &tracks[b % ntracks];
        if (!ts->released) {
            int rc = zev_tracker_release(ts->t);
            ERRNO_OK(rc < 0, "zev_tracker_release");
            ts->released = 1;
        }
        break;
    }
    case 19:
    case 20:
        fiber_op(byte());
        break;
    case 21: {
        if (depth == 0)
            break; /* outside callbacks it would end the input: the end does it */
        int rc = zev_loop_destroy(loop); /* inside callbacks: refused */
        CHECK(rc == -1 && errno == EBUSY, "zev_loop_destroy from a callback: %d %s", rc,
              strerror(errno));
        break;
    }
    default:
        send_one(i, byte());
    }
}

/* ---------------------------------------------------------- the harness */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ctx = zmq_ctx_new();
    if (!ctx)
        abort();
    zmq_ctx_set(ctx, ZMQ_BLOCKY, 0);
    if (pthread_create(&helper, NULL, helper_main, NULL) != 0)
        abort();
    return 0;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *backends[] = {"epoll", "poll", "kqueue"};
    in_data = data;
    in_len = size;
    in_pos = 0;
    memset(pairs, 0, sizeof pairs);
    memset(timers, 0, sizeof timers);
    memset(fibers, 0, sizeof fibers);
    memset(accts, 0, sizeof accts);
    memset(id_state, 0, sizeof id_state);
    memset(post_queued, 0, sizeof post_queued);
    nkept = ntracks = 0;
    posts_made = posts_ran = callbacks_ran = 0;
    next_id = 0;
    zc_given = 0;
    atomic_store(&zc_freed, 0);
    io = NULL;
    in_callback = 0;

    unsigned first = byte();
    zev_loop_opts_t opts = {.backend = backends[first % 3], .batch = (first >> 2) % 4};
    errno = 0;
    loop = zev_loop_new(&opts);
    if (!loop) {
        CHECK(errno == ENOTSUP, "zev_loop_new: %s", strerror(errno));
        return 0;
    }
    unsigned tcp = byte();
    for (int i = 0; i < NPAIR; i++)
        pairs[i].tcp = (tcp >> i) & 1;
    CHECK(pipe2(io_fds, O_NONBLOCK) == 0, "pipe");

    int ops = 0;
    while (more() && ops++ < MAXOPS)
        run_op(0);

    /* The end: kept frames go back (some from the helper), the loop runs
     * until each open stream reported what was released directly, every
     * stream is closed, the loop destroyed. */
    while (nkept) {
        keptslot_t ks = kept[--nkept];
        if (nkept & 1)
            helper_release(ks);
        else {
            CHECK(zev_frame_release(ks.f) == 0, "zev_frame_release");
            atomic_fetch_add(&ks.a->released, 1);
        }
    }
    helper_drain();
    uint64_t end = now_ms() + 3000;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < MAXACCT; i++)
            if (accts[i].used && accts[i].open &&
                accts[i].reported < atomic_load(&accts[i].released))
                pending = 1;
        if (!pending)
            break;
        CHECK(now_ms() < end, "a released frame was never reported");
        zev_loop_run_once(loop, 1);
    }
    for (int i = 0; i < NPAIR; i++) {
        stream_close(i, 1, byte());
        stream_close(i, 0, byte());
    }
    for (int k = 0; k < 4; k++)
        zev_loop_run_once(loop, 0);
    /* Fibers still running are cancelled by destroy's close of everything
     * and freed by it. */
    errno = 0;
    CHECK(zev_loop_destroy(loop) == 0, "zev_loop_destroy: %s", strerror(errno));
    loop = NULL;
    io = NULL;
    close(io_fds[0]);
    close(io_fds[1]);
    io_fds[0] = io_fds[1] = -1;

    CHECK(posts_ran == posts_made, "%d posts made, %d ran", posts_made, posts_ran);
    for (int i = 0; i < MAXACCT; i++) {
        acct_t *a = &accts[i];
        if (!a->used)
            continue;
        CHECK(a->closed_cb == 1, "stream %d: close callback ran %d times", i, a->closed_cb);
        CHECK(a->statuses == a->final_seq, "stream %d: %lu statuses for %lu messages", i,
              (unsigned long)a->statuses, (unsigned long)a->final_seq);
        CHECK(a->final_seq >= a->given + a->fiber_ok && a->final_seq <= a->given + a->fiber_tries,
              "stream %d: %lu numbered, %lu plain sends + %lu/%lu fiber sends", i,
              (unsigned long)a->final_seq, (unsigned long)a->given, (unsigned long)a->fiber_ok,
              (unsigned long)a->fiber_tries);
        CHECK(a->reported <= a->kept, "stream %d: %zu reports for %zu frames", i, a->reported,
              a->kept);
    }
    for (uint64_t id = 0; id < next_id; id++) {
        if (id_state[id] & 4)
            CHECK((id_state[id] & 3) != 0, "message %lu arrived but its send failed",
                  (unsigned long)id);
    }
    for (int i = 0; i < NPAIR; i++) {
        void *socks[2] = {pairs[i].tx, pairs[i].rx};
        for (int k = 0; k < 2; k++) {
            if (socks[k]) {
                int zero = 0;
                zmq_setsockopt(socks[k], ZMQ_LINGER, &zero, sizeof zero);
                zmq_close(socks[k]);
            }
        }
    }
    /* libzmq lets go of zero-copy buffers from its own threads. */
    end = now_ms() + 5000;
    while (atomic_load(&zc_freed) < zc_given) {
        CHECK(now_ms() < end, "%d of %d zero-copy buffers freed", atomic_load(&zc_freed), zc_given);
        usleep(200);
    }
    usleep(1000);
    CHECK(atomic_load(&zc_freed) == zc_given, "%d zero-copy buffers freed for %d given",
          atomic_load(&zc_freed), zc_given);
    for (size_t k = 0; k < ntracks; k++) {
        trackslot_t *ts = &tracks[k];
        CHECK(ts->cb <= 1, "tracker callback ran %d times", ts->cb);
        if (!ts->released) {
            CHECK(zev_tracker_done(ts->t) == 1, "tracker %zu never completed", k);
            CHECK(zev_tracker_release(ts->t) == 0, "zev_tracker_release");
        }
    }
    return 0;
}
