/*
 * Soak (issue 14): mixed traffic for a given time, one loop per thread,
 * with end-to-end checks; exits 1 on any loss, duplicate, reordering,
 * corruption, missing report or growth.
 *
 *   soak [--backend epoll|poll|kqueue] [--seconds N] [--quiet]
 *
 * Two loops, each on its own thread ("client" C and "server" S), one
 * context:
 * - PUSH (C) -> PULL (S) over tcp 127.0.0.1: copies and zero-copy sends
 *   (every 8th with a tracker); S keeps every 4th frame and a worker thread
 *   checks and releases it (zev_frame_release from another thread);
 * - DEALER (C) -> ROUTER (S) over ipc: requests, S answers each with
 *   zev_stream_send_msg (identity + the request), C checks every reply;
 * - XPUB (S) -> SUB (C) over inproc, with ZMQ_XPUB_NODROP: at the HWM
 *   libzmq refuses instead of dropping and zev queues, so nothing may be
 *   lost (gaps, what a PUB would drop, are counted separately and must be
 *   0); S publishes once the subscription has arrived (on_recv of the
 *   XPUB stream);
 * - a fiber on C sends (zev_fiber_send) to a fiber on S receiving
 *   (zev_fiber_recv) over inproc PUSH/PULL;
 * - timers: a repeating timer drives C's sends, an owned timer is re-armed
 *   on every tick; the main thread posts callbacks to both loops
 *   (zev_loop_add_callback and zev_loop_post), checked in FIFO order.
 * Every message carries a sequence number, a length derived from it,
 * contents derived from it and an FNV-1a checksum; each receiver checks
 * all four and the order.
 *
 * Every second the main thread samples RSS (/proc/self/statm) and open
 * descriptors (/proc/self/fd). After the warm-up (a fifth of the run, at
 * least 10 s; runs last at least 20 s) the descriptor count must not change, and RSS must be flat:
 * the mean of the last tenth of the samples (at least 3) may exceed the
 * mean of the first tenth after the warm-up by at most 1 MiB (single
 * samples swing by about that much with malloc's arenas; a leak shows as
 * a trend). At the end the senders stop, everything in flight is drained
 * and the books must balance: sent == received on every pattern, every
 * on_send status 0, every tracker completed, every zero-copy buffer freed,
 * every kept frame released and reported, every callback and post run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <dirent.h>
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

static int failed;
static int quiet;

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "soak: FAIL: " __VA_ARGS__);                                               \
        fprintf(stderr, "\n");                                                                     \
        failed = 1;                                                                                \
    } while (0)

#define MUST(cond)                                                                                 \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "soak: %s:%d: %s failed: %s\n", __FILE__, __LINE__, #cond,             \
                    zmq_strerror(errno));                                                          \
            exit(2);                                                                               \
        }                                                                                          \
    } while (0)

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* --------------------------------------------------------------- payload */

enum { HDR = 16, MAXBODY = 240 };

static size_t body_len(uint64_t seq)
{
    return 8 + (size_t)(seq * 7919u % MAXBODY);
}

static uint32_t fnv(const uint8_t *p, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

/* Writes message seq into buf (at least HDR + MAXBODY + 8 bytes); returns
 * its size. */
static size_t make_msg(uint8_t *buf, uint64_t seq)
{
    size_t n = body_len(seq);
    uint8_t *body = buf + HDR;
    for (size_t i = 0; i < n; i++)
        body[i] = (uint8_t)(seq * 31u + i);
    uint32_t len = (uint32_t)n, sum = fnv(body, n);
    memcpy(buf, &seq, 8);
    memcpy(buf + 8, &len, 4);
    memcpy(buf + 12, &sum, 4);
    return HDR + n;
}

/* Checks a message; returns its seq, or UINT64_MAX if it is corrupt. */
static uint64_t check_msg(const uint8_t *buf, size_t size)
{
    if (size < HDR)
        return UINT64_MAX;
    uint64_t seq;
    uint32_t len, sum;
    memcpy(&seq, buf, 8);
    memcpy(&len, buf + 8, 4);
    memcpy(&sum, buf + 12, 4);
    if (len != body_len(seq) || size != HDR + len || fnv(buf + HDR, len) != sum)
        return UINT64_MAX;
    for (size_t i = 0; i < len; i++)
        if (buf[HDR + i] != (uint8_t)(seq * 31u + i))
            return UINT64_MAX;
    return seq;
}

/* ----------------------------------------------------------------- state */

typedef struct counter {
    atomic_ulong sent;     /* given to a send call (taken) */
    atomic_ulong ok;       /* on_send status 0 */
    atomic_ulong bad;      /* on_send status != 0 */
    atomic_ulong received; /* in order and intact */
    atomic_ulong corrupt;
    atomic_ulong reorder; /* unexpected seq (duplicate, reordered) */
    atomic_ulong gaps;    /* PUB/SUB: skipped seqs */
    uint64_t next_rx;     /* the receiver's expected seq */
} counter_t;

enum { P_PUSH, P_REQ, P_REP, P_PUB, P_FIBER, NPAT };
static const char *pat_name[NPAT] = {"push/pull", "dealer->router", "router->dealer", "pub/sub",
                                     "fiber"};
static counter_t pat[NPAT];

static atomic_int sending = 1; /* C's senders run while set */
static atomic_ulong zc_given, zc_freed, trackers_made, trackers_done;
static atomic_ulong frames_kept, frames_released, frames_reported, frames_corrupt;
static atomic_ulong cb_posted[2], cb_ran[2], cb_order_errors;
static atomic_ulong ticks, rearms;

typedef struct side {
    zev_loop_t *loop;
    pthread_t th;
    int idx;
} side_t;

static side_t C = {.idx = 0}, S = {.idx = 1};
static zev_stream_t *c_push, *c_dealer, *c_sub, *c_fpush;
static zev_stream_t *s_pull, *s_router, *s_pub, *s_fpull;
static zev_timer_t *c_watch;

/* ------------------------------------------------- worker: kept frames */

enum { KQ = 4096 };
static zev_frame_t *kq[KQ];
static size_t kq_head, kq_tail;
static pthread_mutex_t kq_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t kq_cv = PTHREAD_COND_INITIALIZER;
static int kq_stop;

static void *worker_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&kq_mu);
    for (;;) {
        while (kq_head == kq_tail && !kq_stop)
            pthread_cond_wait(&kq_cv, &kq_mu);
        if (kq_head == kq_tail && kq_stop)
            break;
        zev_frame_t *f = kq[kq_tail++ % KQ];
        pthread_mutex_unlock(&kq_mu);
        if (check_msg(zev_frame_data(f), zev_frame_size(f)) == UINT64_MAX)
            atomic_fetch_add(&frames_corrupt, 1);
        if (zev_frame_release(f) != 0)
            atomic_fetch_add(&frames_corrupt, 1);
        atomic_fetch_add(&frames_released, 1);
        pthread_mutex_lock(&kq_mu);
    }
    pthread_mutex_unlock(&kq_mu);
    return NULL;
}

/* ------------------------------------------------------------- receivers */

static void rx_check(counter_t *c, const void *data, size_t size, int gaps_ok)
{
    uint64_t seq = check_msg(data, size);
    if (seq == UINT64_MAX) {
        atomic_fetch_add(&c->corrupt, 1);
        return;
    }
    if (seq != c->next_rx) {
        if (gaps_ok && seq > c->next_rx)
            atomic_fetch_add(&c->gaps, seq - c->next_rx);
        else
            atomic_fetch_add(&c->reorder, 1);
    }
    c->next_rx = seq + 1;
    atomic_fetch_add(&c->received, 1);
}

static void s_pull_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)arg;
    rx_check(&pat[P_PUSH], zev_msg_data(m, 0), zev_msg_size(m, 0), 0);
    if (atomic_load(&pat[P_PUSH].received) % 4 == 0) {
        pthread_mutex_lock(&kq_mu);
        int room = kq_head - kq_tail < KQ;
        pthread_mutex_unlock(&kq_mu);
        if (!room)
            return;
        zev_frame_t *f = zev_msg_keep(m, 0);
        if (!f)
            return; /* the pool is empty: max_frames holds the stream back */
        atomic_fetch_add(&frames_kept, 1);
        pthread_mutex_lock(&kq_mu);
        kq[kq_head++ % KQ] = f;
        pthread_cond_signal(&kq_cv);
        pthread_mutex_unlock(&kq_mu);
    }
}

static void s_frame(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    (void)arg;
    atomic_fetch_add(&frames_reported, 1);
}

/* ROUTER: answers each request with [identity][request]. */
static void s_router_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)arg;
    if (zev_msg_parts(m) != 2) {
        atomic_fetch_add(&pat[P_REQ].corrupt, 1);
        return;
    }
    rx_check(&pat[P_REQ], zev_msg_data(m, 1), zev_msg_size(m, 1), 0);
    zmq_msg_t parts[2];
    for (int i = 0; i < 2; i++) {
        zmq_msg_init_size(&parts[i], zev_msg_size(m, (size_t)i));
        memcpy(zmq_msg_data(&parts[i]), zev_msg_data(m, (size_t)i), zev_msg_size(m, (size_t)i));
    }
    if (zev_stream_send_msg(s, parts, 2, 0) == 0)
        atomic_fetch_add(&pat[P_REP].sent, 1);
    else
        FAIL("router reply: %s", zmq_strerror(errno));
    zmq_msg_close(&parts[0]);
    zmq_msg_close(&parts[1]);
}

static void c_dealer_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)arg;
    rx_check(&pat[P_REP], zev_msg_data(m, 0), zev_msg_size(m, 0), 0);
}

static void c_sub_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)arg;
    rx_check(&pat[P_PUB], zev_msg_data(m, 0), zev_msg_size(m, 0), 1);
}

static void on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    counter_t *c = arg;
    if (status == 0)
        atomic_fetch_add(&c->ok, 1);
    else
        atomic_fetch_add(&c->bad, 1);
}

/* --------------------------------------------------------------- senders */

static void zc_free(void *data, void *hint)
{
    (void)hint;
    free(data);
    atomic_fetch_add(&zc_freed, 1);
}

static void tracker_done(zev_tracker_t *t, void *arg)
{
    (void)arg;
    atomic_fetch_add(&trackers_done, 1);
    zev_tracker_release(t);
}

/* Sends while fewer than `window` messages of the pattern await a status
 * (or, with `done` not NULL, while fewer than `window` await what `done`
 * counts: the replies of requests). */
static void pump(zev_stream_t *s, counter_t *c, unsigned burst, unsigned window, int zc,
                 atomic_ulong *done)
{
    uint8_t buf[HDR + MAXBODY + 8];
    for (unsigned i = 0; i < burst; i++) {
        unsigned long sent = atomic_load(&c->sent);
        if (sent - atomic_load(&c->ok) - atomic_load(&c->bad) >= window)
            return;
        if (done && sent - atomic_load(done) >= window)
            return;
        size_t n = make_msg(buf, sent);
        int rc;
        if (zc && sent % 2) {
            uint8_t *z = malloc(n);
            MUST(z);
            memcpy(z, buf, n);
            zev_tracker_t *t = NULL;
            int track = sent % 8 == 1;
            rc = zev_stream_send_zc(s, z, n, zc_free, NULL, track ? &t : NULL);
            if (rc == 0) {
                atomic_fetch_add(&zc_given, 1);
                if (track) {
                    atomic_fetch_add(&trackers_made, 1);
                    MUST(zev_tracker_on_done(t, tracker_done, NULL) == 0);
                }
            } else {
                free(z);
            }
        } else {
            rc = zev_stream_send(s, buf, n, 0);
        }
        if (rc != 0) {
            if (errno != EAGAIN)
                FAIL("send: %s", zmq_strerror(errno));
            return;
        }
        atomic_fetch_add(&c->sent, 1);
    }
}

static void c_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
    atomic_fetch_add(&ticks, 1);
    /* The owned watchdog timer is re-armed on every tick: it must never
     * fire while ticks come. */
    if (zev_timer_arm(c_watch, 2000000, 0) == 0)
        atomic_fetch_add(&rearms, 1);
    if (!atomic_load(&sending))
        return;
    pump(c_push, &pat[P_PUSH], 40, 400, 1, NULL);
    pump(c_dealer, &pat[P_REQ], 20, 64, 0, &pat[P_REP].received);
}

static void c_watch_fired(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
    FAIL("the tick timer stopped for 2 s");
}

static int subscribed; /* S: the SUB's subscription arrived */

static void s_pub_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)arg;
    if (zev_msg_size(m, 0) >= 1 && ((const uint8_t *)zev_msg_data(m, 0))[0] == 1)
        subscribed = 1;
}

static void s_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
    if (!atomic_load(&sending) || !subscribed)
        return;
    pump(s_pub, &pat[P_PUB], 20, 200, 0, NULL);
}

static void fiber_sender(void *arg)
{
    (void)arg;
    uint8_t buf[HDR + MAXBODY + 8];
    while (atomic_load(&sending)) {
        unsigned long seq = atomic_load(&pat[P_FIBER].sent);
        size_t n = make_msg(buf, seq);
        int rc = zev_fiber_send(c_fpush, buf, n, 0, 100000);
        if (rc == 0)
            atomic_fetch_add(&pat[P_FIBER].sent, 1);
        else if (errno == ECANCELED)
            return;
        else if (errno != EAGAIN)
            FAIL("fiber send: %s", zmq_strerror(errno));
        if (seq % 16 == 0 && zev_fiber_sleep(1000) != 0)
            return;
    }
}

static void fiber_receiver(void *arg)
{
    (void)arg;
    for (;;) {
        zev_msg_t *m;
        int rc = zev_fiber_recv(s_fpull, &m, 100000);
        if (rc == 0)
            rx_check(&pat[P_FIBER], zev_msg_data(m, 0), zev_msg_size(m, 0), 0);
        else if (errno == ECANCELED || errno == EBADF)
            return;
        else if (errno != EAGAIN)
            FAIL("fiber recv: %s", zmq_strerror(errno));
    }
}

/* ------------------------------------------------- cross-thread callbacks */

typedef struct post_item {
    zev_post_t post;
    int side;
    unsigned long n;
    atomic_int busy;
} post_item_t;

static unsigned long cb_next[2];

static void cb_run(zev_loop_t *loop, void *arg)
{
    (void)loop;
    uintptr_t v = (uintptr_t)arg;
    int side = (int)(v & 1);
    unsigned long n = (unsigned long)(v >> 1);
    if (n != cb_next[side])
        atomic_fetch_add(&cb_order_errors, 1);
    cb_next[side] = n + 1;
    atomic_fetch_add(&cb_ran[side], 1);
}

static void post_run(zev_loop_t *loop, void *arg)
{
    post_item_t *p = arg;
    if (loop) /* NULL: run by destroy */
        cb_run(loop, (void *)(uintptr_t)((p->n << 1) | (unsigned long)p->side));
    atomic_store(&p->busy, 0);
}

static void stop_cb(zev_loop_t *loop, void *arg)
{
    (void)arg;
    zev_loop_stop(loop);
}

static void *loop_main(void *arg)
{
    side_t *sd = arg;
    if (zev_loop_run(sd->loop) != 0)
        FAIL("zev_loop_run: %s", zmq_strerror(errno));
    return NULL;
}

/* ------------------------------------------------------------- sampling */

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, rss = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
            rss = 0;
        fclose(f);
    }
    return rss * (sysconf(_SC_PAGESIZE) / 1024);
}

static int open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    if (!d)
        return -1;
    while (readdir(d))
        n++;
    closedir(d);
    return n - 3; /* ., .. and the DIR's own */
}

static unsigned long total_moved(void)
{
    unsigned long n = 0;
    for (int i = 0; i < NPAT; i++)
        n += atomic_load(&pat[i].received);
    return n;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    const char *backend = getenv("ZEV_BACKEND");
    long seconds = 60;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--backend") && i + 1 < argc)
            backend = argv[++i];
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atol(argv[++i]);
        else if (!strcmp(argv[i], "--quiet"))
            quiet = 1;
        else {
            fprintf(stderr, "usage: soak [--backend NAME] [--seconds N] [--quiet]\n");
            return 2;
        }
    }
    if (seconds < 20)
        seconds = 20; /* the warm-up, then at least 10 samples */
    zev_loop_opts_t opts = {.backend = backend};
    void *ctx = zmq_ctx_new();
    MUST(ctx);
    C.loop = zev_loop_new(&opts);
    S.loop = zev_loop_new(&opts);
    MUST(C.loop && S.loop);
    backend = zev_loop_backend(C.loop);

    char ep[256];
    size_t len;
    /* PUSH -> PULL, tcp */
    void *push = zmq_socket(ctx, ZMQ_PUSH), *pull = zmq_socket(ctx, ZMQ_PULL);
    MUST(push && pull);
    MUST(zmq_bind(pull, "tcp://127.0.0.1:*") == 0);
    len = sizeof ep;
    MUST(zmq_getsockopt(pull, ZMQ_LAST_ENDPOINT, ep, &len) == 0);
    MUST(zmq_connect(push, ep) == 0);
    /* DEALER -> ROUTER, ipc */
    void *dealer = zmq_socket(ctx, ZMQ_DEALER), *router = zmq_socket(ctx, ZMQ_ROUTER);
    MUST(dealer && router);
    /* A ROUTER drops what a full peer pipe cannot take; mandatory, it says
     * EAGAIN and the stream queues instead. */
    MUST(zmq_setsockopt(router, ZMQ_ROUTER_MANDATORY, &(int){1}, sizeof(int)) == 0);
    snprintf(ep, sizeof ep, "ipc:///tmp/zev-soak-%d.sock", (int)getpid());
    MUST(zmq_bind(router, ep) == 0);
    MUST(zmq_connect(dealer, ep) == 0);
    /* PUB -> SUB, inproc, no drop */
    void *pub = zmq_socket(ctx, ZMQ_XPUB), *sub = zmq_socket(ctx, ZMQ_SUB);
    MUST(pub && sub);
    int one = 1, hwm = 100;
    MUST(zmq_setsockopt(pub, ZMQ_XPUB_NODROP, &one, sizeof one) == 0);
    MUST(zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof hwm) == 0);
    MUST(zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0) == 0);
    MUST(zmq_bind(pub, "inproc://soak-pub") == 0);
    MUST(zmq_connect(sub, "inproc://soak-pub") == 0);
    /* fiber PUSH -> PULL, inproc */
    void *fpush = zmq_socket(ctx, ZMQ_PUSH), *fpull = zmq_socket(ctx, ZMQ_PULL);
    MUST(fpush && fpull);
    MUST(zmq_bind(fpull, "inproc://soak-fiber") == 0);
    MUST(zmq_connect(fpush, "inproc://soak-fiber") == 0);

    MUST(c_push = zev_stream_new(C.loop, push));
    MUST(c_dealer = zev_stream_new(C.loop, dealer));
    MUST(c_sub = zev_stream_new(C.loop, sub));
    MUST(c_fpush = zev_stream_new(C.loop, fpush));
    MUST(s_pull = zev_stream_new(S.loop, pull));
    MUST(s_router = zev_stream_new(S.loop, router));
    MUST(s_pub = zev_stream_new(S.loop, pub));
    MUST(s_fpull = zev_stream_new(S.loop, fpull));
    MUST(zev_stream_on_send(c_push, on_send, &pat[P_PUSH]) == 0);
    MUST(zev_stream_on_send(c_dealer, on_send, &pat[P_REQ]) == 0);
    MUST(zev_stream_on_send(s_router, on_send, &pat[P_REP]) == 0);
    MUST(zev_stream_on_send(s_pub, on_send, &pat[P_PUB]) == 0);
    MUST(zev_stream_on_send(c_fpush, on_send, &pat[P_FIBER]) == 0);
    MUST(zev_stream_on_recv(s_pull, s_pull_recv, NULL) == 0);
    MUST(zev_stream_on_frame_release(s_pull, s_frame, NULL) == 0);
    MUST(zev_stream_set_max_frames(s_pull, 512) == 0);
    MUST(zev_stream_on_recv(s_router, s_router_recv, NULL) == 0);
    MUST(zev_stream_set_max_queue(s_router, 0) == 0);
    MUST(zev_stream_on_recv(c_dealer, c_dealer_recv, NULL) == 0);
    MUST(zev_stream_on_recv(c_sub, c_sub_recv, NULL) == 0);
    MUST(zev_stream_on_recv(s_pub, s_pub_recv, NULL) == 0);

    MUST(zev_timer_start(C.loop, 1000, 1000, c_tick, NULL));
    MUST(zev_timer_start(S.loop, 1000, 1000, s_tick, NULL));
    MUST(c_watch = zev_timer_new(C.loop, c_watch_fired, NULL));
    MUST(zev_timer_arm(c_watch, 2000000, 0) == 0);
    zev_fiber_t *fs = zev_fiber_spawn(C.loop, fiber_sender, NULL, NULL);
    zev_fiber_t *fr = zev_fiber_spawn(S.loop, fiber_receiver, NULL, NULL);
    MUST(fs && fr);

    pthread_t worker;
    MUST(pthread_create(&worker, NULL, worker_main, NULL) == 0);
    MUST(pthread_create(&C.th, NULL, loop_main, &C) == 0);
    MUST(pthread_create(&S.th, NULL, loop_main, &S) == 0);

    enum { NPOSTS = 8 };
    static post_item_t posts[2][NPOSTS];
    unsigned long next_cb[2] = {0, 0};
    uint64_t t0 = now_ms();
    long warm = seconds / 5 < 10 ? 10 : seconds / 5; /* malloc's arenas settle in ~10 s */
    long rss0 = 0, rss_max = 0, rss_first = rss_kib();
    long *rss_s = calloc((size_t)seconds + 2, sizeof *rss_s);
    size_t nrss = 0;
    MUST(rss_s);
    int fds0 = -1, fds_min = 1 << 30, fds_max = 0;
    uint64_t next_sample = t0 + 1000;
    long sec = 0;
    while (now_ms() - t0 < (uint64_t)seconds * 1000u && !failed) {
        /* Cross-thread callbacks, ~100/s per loop, alternating allocation
         * (add_callback) and caller-owned posts; one sequence per loop. */
        for (int sd = 0; sd < 2; sd++) {
            zev_loop_t *l = sd ? S.loop : C.loop;
            unsigned long n = next_cb[sd];
            if (n % 2 == 0) {
                if (zev_loop_add_callback(l, cb_run,
                                          (void *)(uintptr_t)((n << 1) | (unsigned)sd)) == 0) {
                    next_cb[sd]++;
                    atomic_fetch_add(&cb_posted[sd], 1);
                }
            } else {
                post_item_t *p = &posts[sd][(n / 2) % NPOSTS];
                if (!atomic_load(&p->busy)) {
                    atomic_store(&p->busy, 1);
                    p->side = sd;
                    p->n = n;
                    MUST(zev_loop_post(l, &p->post, post_run, p) == 0);
                    next_cb[sd]++;
                    atomic_fetch_add(&cb_posted[sd], 1);
                }
            }
        }
        usleep(10000);
        if (now_ms() >= next_sample) {
            next_sample += 1000;
            sec++;
            long rss = rss_kib();
            int fds = open_fds();
            if (sec == warm) {
                rss0 = rss;
                fds0 = fds;
            }
            if (sec >= warm) {
                if (nrss < (size_t)seconds + 2)
                    rss_s[nrss++] = rss;
                if (rss > rss_max)
                    rss_max = rss;
                if (fds < fds_min)
                    fds_min = fds;
                if (fds > fds_max)
                    fds_max = fds;
            }
            if (!quiet)
                printf("soak[%s] %4lds  moved %10lu  rss %6ld KiB  fds %3d  kept %lu  zc %lu\n",
                       backend, sec, total_moved(), rss, fds, atomic_load(&frames_kept),
                       atomic_load(&zc_given));
            fflush(stdout);
        }
    }

    /* Drain: senders stop; wait until every status and message came. */
    atomic_store(&sending, 0);
    uint64_t end = now_ms() + 30000;
    for (;;) {
        int done = 1;
        for (int i = 0; i < NPAT; i++) {
            counter_t *c = &pat[i];
            if (atomic_load(&c->ok) + atomic_load(&c->bad) < atomic_load(&c->sent) ||
                atomic_load(&c->received) + atomic_load(&c->gaps) < atomic_load(&c->sent))
                done = 0;
        }
        if (atomic_load(&cb_ran[0]) < atomic_load(&cb_posted[0]) ||
            atomic_load(&cb_ran[1]) < atomic_load(&cb_posted[1]) ||
            atomic_load(&trackers_done) < atomic_load(&trackers_made) ||
            atomic_load(&frames_reported) < atomic_load(&frames_kept))
            done = 0;
        if (done)
            break;
        if (now_ms() > end) {
            FAIL("drain: still waiting after 30 s");
            break;
        }
        usleep(10000);
    }
    uint64_t ms = now_ms() - t0;
    MUST(zev_loop_add_callback(C.loop, stop_cb, NULL) == 0);
    MUST(zev_loop_add_callback(S.loop, stop_cb, NULL) == 0);
    pthread_join(C.th, NULL);
    pthread_join(S.th, NULL);
    pthread_mutex_lock(&kq_mu);
    kq_stop = 1;
    pthread_cond_broadcast(&kq_cv);
    pthread_mutex_unlock(&kq_mu);
    pthread_join(worker, NULL);
    zev_loop_destroy(C.loop);
    zev_loop_destroy(S.loop);
    void *socks[] = {push, pull, dealer, router, pub, sub, fpush, fpull};
    for (size_t i = 0; i < sizeof socks / sizeof socks[0]; i++) {
        int zero = 0;
        zmq_setsockopt(socks[i], ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(socks[i]);
    }
    zmq_ctx_term(ctx);
    unlink(ep + 6);

    /* The books. */
    for (int i = 0; i < NPAT; i++) {
        counter_t *c = &pat[i];
        unsigned long sent = atomic_load(&c->sent), rx = atomic_load(&c->received);
        printf("soak[%s] %-15s sent %10lu  received %10lu  lost %lu  statuses ok %lu bad %lu  "
               "corrupt %lu  reordered/dup %lu  pub/sub gaps %lu\n",
               backend, pat_name[i], sent, rx, sent - rx, atomic_load(&c->ok), atomic_load(&c->bad),
               atomic_load(&c->corrupt), atomic_load(&c->reorder), atomic_load(&c->gaps));
        if (sent == 0)
            FAIL("%s: nothing sent", pat_name[i]);
        if (rx != sent)
            FAIL("%s: %lu sent, %lu received", pat_name[i], sent, rx);
        if (atomic_load(&c->ok) != sent || atomic_load(&c->bad))
            FAIL("%s: statuses %lu ok, %lu bad for %lu sent", pat_name[i], atomic_load(&c->ok),
                 atomic_load(&c->bad), sent);
        if (atomic_load(&c->corrupt) || atomic_load(&c->reorder) || atomic_load(&c->gaps))
            FAIL("%s: corrupt, reordered or missing messages", pat_name[i]);
    }
    if (atomic_load(&zc_freed) != atomic_load(&zc_given))
        FAIL("zero-copy: %lu given, %lu freed", atomic_load(&zc_given), atomic_load(&zc_freed));
    if (atomic_load(&trackers_done) != atomic_load(&trackers_made))
        FAIL("trackers: %lu made, %lu done", atomic_load(&trackers_made),
             atomic_load(&trackers_done));
    if (atomic_load(&frames_released) != atomic_load(&frames_kept) ||
        atomic_load(&frames_reported) != atomic_load(&frames_kept) || atomic_load(&frames_corrupt))
        FAIL("frames: %lu kept, %lu released, %lu reported, %lu corrupt", atomic_load(&frames_kept),
             atomic_load(&frames_released), atomic_load(&frames_reported),
             atomic_load(&frames_corrupt));
    for (int sd = 0; sd < 2; sd++)
        if (atomic_load(&cb_ran[sd]) != atomic_load(&cb_posted[sd]))
            FAIL("callbacks to loop %d: %lu posted, %lu ran", sd, atomic_load(&cb_posted[sd]),
                 atomic_load(&cb_ran[sd]));
    if (atomic_load(&cb_order_errors))
        FAIL("callbacks out of order: %lu", atomic_load(&cb_order_errors));
    size_t k = nrss / 10 < 3 ? 3 : nrss / 10;
    if (k > nrss)
        k = nrss;
    long early = 0, late = 0;
    for (size_t i = 0; i < k; i++) {
        early += rss_s[i];
        late += rss_s[nrss - k + i];
    }
    early = k ? early / (long)k : 0;
    late = k ? late / (long)k : 0;
    long growth = late - early;
    free(rss_s);
    printf("soak[%s] %.1f s, %lu messages, %lu zero-copy (%lu tracked), %lu frames kept, %lu "
           "callbacks, %lu ticks; RSS start %ld KiB, after warm-up (%ld s) %ld KiB, max %ld KiB; "
           "mean of first/last %zu samples %ld/%ld KiB (growth %ld KiB); fds %d..%d\n",
           backend, (double)ms / 1000.0, total_moved(), atomic_load(&zc_given),
           atomic_load(&trackers_made), atomic_load(&frames_kept),
           atomic_load(&cb_ran[0]) + atomic_load(&cb_ran[1]), atomic_load(&ticks), rss_first, warm,
           rss0, rss_max, k, early, late, growth, fds_min, fds_max);
    /* ZEV_SOAK_NO_RSS: for sanitizer builds, whose quarantine grows RSS
     * (tests/run soak is a plain build). */
    if (growth > 1024 && !getenv("ZEV_SOAK_NO_RSS"))
        FAIL("RSS grew by %ld KiB after the warm-up (limit 1024)", growth);
    if (fds_min != fds0 || fds_max != fds0)
        FAIL("open descriptors changed after the warm-up: %d..%d (at warm-up %d)", fds_min, fds_max,
             fds0);
    printf("soak[%s] %s\n", backend, failed ? "FAILED" : "OK");
    return failed ? 1 : 0;
}
