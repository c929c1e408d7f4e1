/*
 * collector: a telemetry collector that never copies a payload.
 *
 * Agents (threads here, processes in real life) PUSH frames of 1 to 64 KiB
 * to the collector's PULL. For each frame the collector's loop
 *   1. keeps the payload out of the receive ring (zev_msg_keep: no copy);
 *   2. forwards it to the archive (a PUSH) with zev_stream_send_zc, which
 *      lets libzmq send straight from the kept frame, with a tracker;
 *   3. once libzmq is done with the buffer (the free function, on libzmq's
 *      I/O thread), hands the frame to a pool of workers, which check and
 *      "parse" it and give it back to zev with zev_frame_release.
 * zev_stream_set_max_frames bounds the frames out at once: the workers are
 * slower than the agents, so reading stops at the bound, libzmq's
 * high-water marks push back on the agents, and reading resumes as workers
 * release frames. Memory stays bounded however fast the agents send.
 *
 * Every frame carries its checksum; the workers and the archive check the
 * bytes they see against it, and the collector counts, per frame, that it
 * was received, processed and released exactly once. Prints:
 *   collector backend=epoll frames=4000 received=4000 processed=4000 released=4000
 *       release_callbacks=4000 not_once=0 bad=0
 *   backpressure max_frames=32 peak_kept=32 stops=1210
 *   forwarder forwarded=4000 send_errors=0 trackers_done=4000 archived=4000 archive_bad=0
 *       checksum_sent=... checksum_archived=...
 * (each on one line).
 *
 * Run: ./collector [frames-per-agent]     (default 2000, two agents)
 *      ZEV_BACKEND=poll ./collector       (any backend zev was built with)
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zev.h>

#define AGENTS 2
#define WORKERS 2
#define MAX_FRAMES 32 /* kept frames out at once: forwarding or with a worker */
#define WORK_US 500   /* what a worker spends "parsing" a frame: slower than the agents, even
                       * under TSan (at 200 µs a TSan build once never reached the bound) */
#define MIN_SIZE 1024 /* payload sizes: 1 KiB .. 64 KiB */
#define MAX_SIZE 65536

/* Every message is [header][payload]; an agent's last one is [header] with
 * size 0: end of its stream. */
typedef struct header {
    uint32_t agent, seq, size;
    uint32_t pad;
    uint64_t checksum; /* of the payload */
} header_t;

/* ------------------------------------------------------------ the payloads */

/* FNV-1a: what every stage checks the payload's bytes against. */
static uint64_t checksum(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 14695981039346656037u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211u;
    return h;
}

static size_t payload_size(uint32_t agent, uint32_t seq)
{
    uint32_t x = (agent * 2654435761u) ^ (seq * 40503u);
    return MIN_SIZE + (x % (MAX_SIZE - MIN_SIZE + 1));
}

static void payload_fill(unsigned char *p, size_t len, uint32_t agent, uint32_t seq)
{
    uint64_t x = ((uint64_t)agent << 32 | seq) * 0x9e3779b97f4a7c15u + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64 */
        p[i] = (unsigned char)x;
    }
}

static void sleep_us(unsigned us)
{
    struct timespec ts = {0, (long)us * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* ------------------------------------------------------------------ agents */

typedef struct agent {
    uint32_t id, frames;
    void *ctx;
    const char *endpoint;
    pthread_t thread;
    uint64_t checksum_sum; /* of everything it sent */
    int err;
} agent_t;

static void *agent_main(void *arg)
{
    agent_t *a = arg;
    void *push = zmq_socket(a->ctx, ZMQ_PUSH);
    if (!push || zmq_connect(push, a->endpoint) < 0) {
        a->err = errno;
        return NULL;
    }
    for (uint32_t seq = 0; seq <= a->frames; seq++) {
        header_t h = {.agent = a->id, .seq = seq};
        if (seq == a->frames) { /* end of stream */
            zmq_send(push, &h, sizeof h, 0);
            break;
        }
        zmq_msg_t payload;
        h.size = (uint32_t)payload_size(a->id, seq);
        zmq_msg_init_size(&payload, h.size);
        payload_fill(zmq_msg_data(&payload), h.size, a->id, seq);
        h.checksum = checksum(zmq_msg_data(&payload), h.size);
        a->checksum_sum += h.checksum;
        /* Blocks while the collector is at max_frames: that is the push-back. */
        if (zmq_send(push, &h, sizeof h, ZMQ_SNDMORE) < 0 || zmq_msg_send(&payload, push, 0) < 0) {
            a->err = errno;
            zmq_msg_close(&payload);
            break;
        }
    }
    zmq_close(push); /* default linger: what is queued still goes out */
    return NULL;
}

/* ----------------------------------------------------------------- archive */

typedef struct archive {
    void *ctx;
    char endpoint[256];
    pthread_t thread;
    uint64_t archived, bad, checksum_sum;
    int ends, err;
} archive_t;

/* The downstream service: plain blocking libzmq on its own thread. */
static void *archive_main(void *arg)
{
    archive_t *ar = arg;
    void *pull = zmq_socket(ar->ctx, ZMQ_PULL);
    if (!pull || zmq_connect(pull, ar->endpoint) < 0) {
        ar->err = errno;
        return NULL;
    }
    while (ar->ends < AGENTS) {
        header_t h;
        zmq_msg_t payload;
        zmq_msg_init(&payload);
        if (zmq_recv(pull, &h, sizeof h, 0) != (int)sizeof h) {
            ar->err = errno ? errno : EPROTO;
            break;
        }
        if (h.size == 0) {
            ar->ends++;
            continue;
        }
        if (zmq_msg_recv(&payload, pull, 0) < 0) {
            ar->err = errno;
            break;
        }
        uint64_t sum = checksum(zmq_msg_data(&payload), zmq_msg_size(&payload));
        ar->bad += zmq_msg_size(&payload) != h.size || sum != h.checksum;
        ar->checksum_sum += sum;
        ar->archived++;
        zmq_msg_close(&payload);
    }
    zmq_close(pull);
    return NULL;
}

/* -------------------------------------------------------------- collector */

typedef struct collector collector_t;

/* A kept frame on its way: forwarded, then with a worker, then released. */
typedef struct item {
    struct item *next;
    collector_t *c;
    header_t h;
    zev_frame_t *frame;
} item_t;

struct collector {
    zev_loop_t *loop;
    zev_stream_t *in, *archive;
    uint32_t frames; /* per agent */
    int ends;
    /* Loop thread only. */
    uint64_t received, release_callbacks, stops, peak_kept;
    uint64_t taken, reported, send_errors; /* messages to the archive, their statuses */
    uint64_t forwarded, trackers_done;     /* zero-copy payloads, their trackers */
    /* Per frame (agent * frames + seq), from whichever thread did it. */
    atomic_uchar *seen, *processed, *released;
    atomic_ulong bad;
    /* The worker pool's queue. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    item_t *head, **tail;
    bool closing;
};

static void give_to_workers(collector_t *c, item_t *it)
{
    pthread_mutex_lock(&c->mu);
    it->next = NULL;
    *c->tail = it;
    c->tail = &it->next;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static void *worker_main(void *arg)
{
    collector_t *c = arg;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        while (!c->head && !c->closing)
            pthread_cond_wait(&c->cv, &c->mu);
        item_t *it = c->head;
        if (it && !(c->head = it->next))
            c->tail = &c->head;
        pthread_mutex_unlock(&c->mu);
        if (!it)
            return NULL; /* closing, and nothing left */

        size_t i = (size_t)it->h.agent * c->frames + it->h.seq;
        if (zev_frame_size(it->frame) != it->h.size ||
            checksum(zev_frame_data(it->frame), it->h.size) != it->h.checksum)
            atomic_fetch_add(&c->bad, 1);
        sleep_us(WORK_US);
        atomic_fetch_add(&c->processed[i], 1);
        if (zev_frame_release(it->frame) == 0) /* from this thread: zev takes it back */
            atomic_fetch_add(&c->released[i], 1);
        free(it);
    }
}

/* Done once every agent has ended and every frame is back, every tracker
 * has completed and every message to the archive has its on_send status
 * (so the ends went out too). Asked wherever the last of these may come:
 * a tracker completes after libzmq's free function, which may be after the
 * worker released the frame. */
static void maybe_done(collector_t *c)
{
    if (c->ends == AGENTS && c->release_callbacks == c->received &&
        c->trackers_done == c->forwarded && c->reported == c->taken)
        zev_loop_stop(c->loop);
}

/* libzmq's free function for a forwarded payload: libzmq's I/O thread, once
 * the bytes are on their way. The frame is still kept: on to the workers. */
static void forwarded(void *data, void *hint)
{
    (void)data;
    item_t *it = hint;
    give_to_workers(it->c, it);
}

static void tracker_done(zev_tracker_t *t, void *arg)
{
    collector_t *c = arg;
    c->trackers_done++;
    zev_tracker_release(t);
    maybe_done(c);
}

static void on_frame(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    collector_t *c = arg;
    header_t h;
    if (zev_msg_size(msg, 0) != sizeof h)
        return;
    memcpy(&h, zev_msg_data(msg, 0), sizeof h);
    if (h.size == 0) { /* an agent is done: pass the end on, after its frames */
        c->taken += zev_stream_send(c->archive, &h, sizeof h, 0) == 0;
        c->ends++;
        maybe_done(c);
        return;
    }
    if (zev_msg_parts(msg) != 2 || h.agent >= AGENTS || h.seq >= c->frames)
        return;

    item_t *it = malloc(sizeof *it);
    zev_frame_t *f = it ? zev_msg_keep(msg, 1) : NULL; /* the payload, not copied */
    if (!f) {
        free(it);
        return;
    }
    *it = (item_t){.c = c, .h = h, .frame = f};
    atomic_fetch_add(&c->seen[(size_t)h.agent * c->frames + h.seq], 1);
    c->received++;

    zev_stream_stats_t st;
    zev_stream_stats(s, &st);
    if (st.frames_kept > c->peak_kept)
        c->peak_kept = st.frames_kept;
    if (st.frames_kept >= MAX_FRAMES)
        c->stops++; /* at the bound: the stream reads no more until a release */

    /* [header][payload]: the header copied, the payload referenced. The
     * cast: zev_frame_data is const, and libzmq only reads the buffer. */
    void *data = (void *)zev_frame_data(f);
    zev_tracker_t *t;
    if (zev_stream_send(c->archive, &h, sizeof h, ZMQ_SNDMORE) < 0 ||
        zev_stream_send_zc(c->archive, data, zev_frame_size(f), forwarded, it, &t) < 0) {
        /* Not here (the queue holds 1000 messages, at most MAX_FRAMES are
         * out), but a payload zev refused is still ours: process it anyway. */
        c->send_errors++;
        give_to_workers(c, it);
        return;
    }
    c->taken++;
    c->forwarded++;
    zev_tracker_on_done(t, tracker_done, c);
}

/* One status per message to the archive, in order: 0 once libzmq has it. */
static void on_sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    collector_t *c = arg;
    c->reported++;
    c->send_errors += status != 0;
    maybe_done(c);
}

/* The loop thread, once per kept frame released (here: by a worker). */
static void on_release(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    (void)size;
    collector_t *c = arg;
    c->release_callbacks++;
    maybe_done(c);
}

static void *bind_any(void *ctx, int type, char *endpoint, size_t len)
{
    void *sock = zmq_socket(ctx, type);
    if (!sock || zmq_bind(sock, "tcp://127.0.0.1:*") < 0 ||
        zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, endpoint, &len) < 0) {
        fprintf(stderr, "collector: bind: %s\n", zmq_strerror(errno));
        exit(1);
    }
    return sock;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 2000;
    collector_t c = {.frames = n > 0 && n < 1000000 ? (uint32_t)n : 2000};
    size_t total = (size_t)AGENTS * c.frames;
    c.seen = calloc(total, 1);
    c.processed = calloc(total, 1);
    c.released = calloc(total, 1);
    c.tail = &c.head;
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);

    void *ctx = zmq_ctx_new();
    char in_ep[256], out_ep[256];
    void *pull = bind_any(ctx, ZMQ_PULL, in_ep, sizeof in_ep);
    void *push = bind_any(ctx, ZMQ_PUSH, out_ep, sizeof out_ep);
    c.loop = zev_loop_new(NULL);
    if (!c.loop || !c.seen || !c.processed || !c.released) {
        fprintf(stderr, "collector: %s\n", zmq_strerror(errno));
        return 1;
    }
    c.in = zev_stream_new(c.loop, pull);
    c.archive = zev_stream_new(c.loop, push);
    zev_stream_set_max_frames(c.in, MAX_FRAMES);
    zev_stream_on_frame_release(c.in, on_release, &c);
    zev_stream_on_recv(c.in, on_frame, &c);
    zev_stream_on_send(c.archive, on_sent, &c);

    pthread_t workers[WORKERS];
    for (int i = 0; i < WORKERS; i++)
        pthread_create(&workers[i], NULL, worker_main, &c);
    archive_t ar = {.ctx = ctx};
    snprintf(ar.endpoint, sizeof ar.endpoint, "%s", out_ep);
    pthread_create(&ar.thread, NULL, archive_main, &ar);
    agent_t agents[AGENTS];
    for (uint32_t i = 0; i < AGENTS; i++) {
        agents[i] = (agent_t){.id = i, .frames = c.frames, .ctx = ctx, .endpoint = in_ep};
        pthread_create(&agents[i].thread, NULL, agent_main, &agents[i]);
    }

    zev_loop_run(c.loop); /* until every frame is released and tracked */

    uint64_t sent_sum = 0;
    for (int i = 0; i < AGENTS; i++) {
        pthread_join(agents[i].thread, NULL);
        sent_sum += agents[i].checksum_sum;
    }
    pthread_join(ar.thread, NULL);
    pthread_mutex_lock(&c.mu);
    c.closing = true;
    pthread_cond_broadcast(&c.cv);
    pthread_mutex_unlock(&c.mu);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(workers[i], NULL);

    size_t processed = 0, released = 0, not_once = 0;
    for (size_t i = 0; i < total; i++) {
        processed += c.processed[i];
        released += c.released[i];
        not_once += c.seen[i] != 1 || c.processed[i] != 1 || c.released[i] != 1;
    }
    printf("collector backend=%s frames=%zu received=%llu processed=%zu released=%zu "
           "release_callbacks=%llu not_once=%zu bad=%lu\n",
           zev_loop_backend(c.loop), total, (unsigned long long)c.received, processed, released,
           (unsigned long long)c.release_callbacks, not_once, atomic_load(&c.bad));
    printf("backpressure max_frames=%d peak_kept=%llu stops=%llu\n", MAX_FRAMES,
           (unsigned long long)c.peak_kept, (unsigned long long)c.stops);
    printf("forwarder forwarded=%llu send_errors=%llu trackers_done=%llu archived=%llu "
           "archive_bad=%llu checksum_sent=%llx checksum_archived=%llx\n",
           (unsigned long long)c.forwarded, (unsigned long long)c.send_errors,
           (unsigned long long)c.trackers_done, (unsigned long long)ar.archived,
           (unsigned long long)ar.bad, (unsigned long long)sent_sum,
           (unsigned long long)ar.checksum_sum);

    zev_loop_destroy(c.loop);
    zmq_close(pull);
    zmq_close(push);
    zmq_ctx_term(ctx);
    free(c.seen);
    free(c.processed);
    free(c.released);
    pthread_mutex_destroy(&c.mu);
    pthread_cond_destroy(&c.cv);
    return 0;
}
