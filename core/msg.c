/*
 * Messages and frames: the receive ring and kept frames.
 *
 * Design notes
 * - Each stream receives into a ring of zmq_msg_t that grows only when a
 *   message has more parts than it holds; a slot is set up when first used
 *   (growing touches no memory in advance: a long message's page faults
 *   spread over the passes that receive it), and after an unusually long
 *   message the ring gives back what it grew beyond RING_KEEP slots. The
 *   recv callback borrows those frames. A slot's old content is freed by the
 *   next zmq_msg_recv into it (libzmq closes what a zmq_msg_t holds, as in
 *   a plain recv loop), and when the pass stops receiving the slots used
 *   are closed (zev__ring_recycle), so a large buffer is not held while the
 *   stream waits.
 * - zev_msg_keep moves a part (no copy) into a frame taken from a pool that
 *   belongs to the loop's hub; the pool grows by chunks during warm-up and
 *   recycles frames afterwards (the one freed longest ago first), so
 *   steady-state keeping allocates nothing. The part is moved bitwise and
 *   its slot becomes a bitwise copy of the hub's empty message (libzmq
 *   itself copies a small message so: an empty one holds nothing), so that
 *   keeping calls nothing, libzmq included. Handles carry the frame's
 *   generation (handle.h): a second release, or any use after release,
 *   fails with EINVAL from whatever thread, and never touches the frame's
 *   next owner. A frame whose generations are spent (2^19 reuses) is
 *   retired instead of recycled, so that no handle ever comes round again;
 *   a chunk replaces 64 retired frames, once in tens of millions kept.
 * - zev_frame_release may run on any thread: it closes the zmq_msg_t there
 *   (libzmq's reference counts are atomic) and sends the handle home
 *   through the hub's lock-free queue. On the loop thread the stream is
 *   told (on_frame_release, and reading resumes under max_frames) and the
 *   handle goes back to the pool. A release on the thread iterating the
 *   loop (zev__iterating: inside its callbacks) does that at once, without
 *   the queue and its wakeup, unless the stream has an on_frame_release:
 *   that one must not run inside zev_frame_release, so such a frame is
 *   queued (no wakeup needed: the loop does not wait while the queue holds
 *   anything) and returned by the next drain. A kept frame holds a reference on the hub,
 *   so a release after zev_loop_destroy is still safe: the handle then just
 *   returns to a pool that dies with the hub.
 * - zev_stream_send_frame forwards a kept frame without copying: libzmq gets
 *   a message referencing the frame's buffer whose free function brings the
 *   frame home exactly as a release would, so on_frame_release and
 *   max_frames count it until libzmq is done with it. It claims the frame
 *   (the same compare-and-swap as a release) before it reads it, on every
 *   path, the copy of a small frame included, and gives it back if the send
 *   takes nothing: a release racing it on a worker either wins or fails.
 */
#include "zev-internal.h"

#include <errno.h>
#include <stdlib.h>

#define CHUNK_FRAMES 64

struct zev__chunk {
    struct zev__chunk *next;
    zev_frame_t frames[CHUNK_FRAMES];
};

/* ------------------------------------------------------------ receive ring */

int zev__ring_reserve(zev_stream_t *s, size_t n)
{
    if (n <= s->ring_cap)
        return 0;
    size_t cap = zev__grown_cap(s->ring_cap, 4, n, sizeof *s->ring); /* the larger element */
    /* zmq_msg_t is moved bitwise, as libzmq's own queues move it. */
    zmq_msg_t *ring = cap ? realloc(s->ring, cap * sizeof *ring) : NULL;
    if (!ring) {
        errno = ENOMEM;
        return -1;
    }
    s->ring = ring;
    s->msg.parts = ring; /* before anything can fail: the old block is gone */
    for (size_t i = 0; i < s->ring_used; i++)
        s->at[i] = &ring[i]; /* parts received so far (none is kept yet) */
    zmq_msg_t **at = realloc(s->at, cap * sizeof *at);
    if (!at) {
        errno = ENOMEM;
        return -1;
    }
    s->at = at;
    s->msg.at = at;
    size_t *sizes = realloc(s->msg.sizes, cap * sizeof *sizes);
    if (!sizes) {
        errno = ENOMEM;
        return -1;
    }
    s->msg.sizes = sizes;
    s->ring_cap = cap; /* the new slots are set up as they are first used */
    return 0;
}

/* Gives back the ring's slots beyond RING_KEEP after an unusually long
 * message: one realloc per such message, which received thousands of parts
 * (a message of up to RING_KEEP parts never shrinks or grows it again). A
 * failed shrink keeps the larger ring; nothing is lost. */
#define RING_KEEP 1024u

static void ring_shrink(zev_stream_t *s)
{
    zmq_msg_t *ring = realloc(s->ring, RING_KEEP * sizeof *ring); /* none is in use */
    if (!ring)
        return;
    s->ring = s->msg.parts = ring;
    zmq_msg_t **at = realloc(s->at, RING_KEEP * sizeof *at); /* set at each receive */
    if (at)
        s->at = s->msg.at = at; /* else the larger one stays: only its head is used */
    size_t *sizes = realloc(s->msg.sizes, RING_KEEP * sizeof *sizes);
    if (sizes)
        s->msg.sizes = sizes; /* as kept */
    s->ring_cap = RING_KEEP;
}

/* Slot 0 is always set up (ring_used >= 1): a message's first part goes
 * there without a check (streamio.c's recv_message). */
static void ring_slot0(zev_stream_t *s)
{
    if (!s->ring_used) {
        zmq_msg_init(&s->ring[0]);
        s->ring_used = 1;
    }
}

int zev__ring_init(zev_stream_t *s)
{
    if (zev__ring_reserve(s, 4) < 0)
        return -1;
    ring_slot0(s);
    return 0;
}

void zev__ring_recycle(zev_stream_t *s)
{
    /* the first rx_parts slots hold a message still being received */
    for (size_t i = s->rx_parts; i < s->ring_used; i++)
        zmq_msg_close(&s->ring[i]); /* a kept part's slot is already empty */
    s->ring_used = s->rx_parts;
    s->msg.n = 0;
    if (s->ring_cap > RING_KEEP && s->rx_parts == 0 && !s->rx_dropping)
        ring_shrink(s);
    ring_slot0(s); /* empty: it holds no buffer while the stream waits */
}

void zev__ring_free(zev_stream_t *s)
{
    for (size_t i = 0; i < s->ring_used; i++)
        zmq_msg_close(&s->ring[i]);
    free(s->ring);
    free(s->at);
    free(s->msg.sizes);
    s->ring = NULL;
    s->at = NULL;
    s->msg.sizes = NULL;
    s->ring_cap = 0;
}

/* ------------------------------------------------------------- frame pool */

static void frame_returned(zev__qnode_t *n, zev_loop_t *loop);

static int pool_grow(zev__hub_t *hub)
{
    struct zev__chunk *c = malloc(sizeof *c);
    if (!c) {
        errno = ENOMEM;
        return -1;
    }
    c->next = hub->chunks;
    hub->chunks = c;
    for (size_t i = 0; i < CHUNK_FRAMES; i++) {
        zev_frame_t *f = &c->frames[i];
        f->next_free = i + 1 < CHUNK_FRAMES ? &c->frames[i + 1] : NULL;
        atomic_init(&f->handle, 0);
        f->gen = 0;
        f->qnode.run = frame_returned; /* for every use: set once */
        f->hub = hub;
    }
    hub->frame_free = &c->frames[0];
    hub->frame_free_tail = &c->frames[CHUNK_FRAMES - 1];
    return 0;
}

void zev__frame_pool_free(zev__hub_t *hub)
{
    while (hub->chunks) {
        struct zev__chunk *next = hub->chunks->next;
        free(hub->chunks);
        hub->chunks = next;
    }
    hub->frame_free = hub->frame_free_tail = NULL;
}

/* The stream stops counting the frame; true if it was at its max_frames
 * (reading resumes: the caller marks it ready). Loop thread. */
static inline __attribute__((always_inline)) bool frame_untrack(zev_frame_t *f, zev_stream_t *s)
{
    zev__list_remove(&f->node);
    bool was_full = s->max_frames && s->frames_out >= s->max_frames;
    s->frames_out--;
    return was_full;
}

/* Back to the pool (the loop thread, or the hub's last owner). */
static inline __attribute__((always_inline)) void frame_to_pool(zev_frame_t *f)
{
    f->stream = NULL;
    atomic_store_explicit(&f->handle, 0, memory_order_relaxed);
    if (zev__handle_retired(++f->gen))
        return; /* its generations are spent: it stays in its chunk unused */
    f->next_free = NULL;
    zev__hub_t *hub = f->hub;
    if (hub->frame_free_tail)
        hub->frame_free_tail->next_free = f;
    else
        hub->frame_free = f;
    hub->frame_free_tail = f;
}

/* Back on the loop thread (loop != NULL) or on the hub's last owner. */
static void frame_returned(zev__qnode_t *n, zev_loop_t *loop)
{
    zev_frame_t *f = (zev_frame_t *)n;
    zev_stream_t *s = loop ? f->stream : NULL;
    if (s) {
        bool was_full = frame_untrack(f, s);
        if (s->on_frame) {
            uint64_t t0 = zev__watch_begin(loop);
            s->on_frame(s, f->size, s->frame_arg);
            zev__watch_end(loop, t0, ZEV_SLOW_FRAME, s, NULL);
        }
        if (was_full)
            zev__stream_mark_ready(s); /* reading resumes */
    }
    frame_to_pool(f);
}

/* A stream going away leaves its frames kept, just no longer tracked. */
void zev__frames_detach(zev_stream_t *s)
{
    zev__list_t *node;
    while ((node = zev__list_pop_head(&s->kept_frames)))
        zev__container_of(node, zev_frame_t, node)->stream = NULL;
}

/* --------------------------------------------------------------- messages */

static int part_ok(const zev_msg_t *m, size_t i)
{
    if (!m || i >= m->n) {
        errno = EINVAL;
        return 0;
    }
    return 1;
}

size_t zev_msg_parts(const zev_msg_t *m)
{
    if (!m) {
        errno = EINVAL;
        return 0;
    }
    return m->n;
}

/* Whether part i was kept (zev_msg_keep): it lives in its frame now. */
static bool part_kept(const zev_msg_t *m, size_t i)
{
    return m->at[i] != &m->parts[i];
}

zmq_msg_t *zev_msg_frame(zev_msg_t *m, size_t i)
{
    if (!part_ok(m, i))
        return NULL;
    m->sizes[i] = SIZE_MAX; /* the caller may change it: ask libzmq from now on */
    return m->at[i];
}

const void *zev_msg_data(const zev_msg_t *m, size_t i)
{
    return part_ok(m, i) ? zmq_msg_data(m->at[i]) : NULL;
}

/* Part i's size: what the receive found (streamio.c's part_size), unless
 * the caller got the zmq_msg_t itself (zev_msg_frame, or the part was kept). */
static size_t size_of(const zev_msg_t *m, size_t i)
{
    size_t size = m->sizes[i];
    return size != SIZE_MAX ? size : zmq_msg_size(m->at[i]);
}

size_t zev_msg_size(const zev_msg_t *m, size_t i)
{
    return part_ok(m, i) ? size_of(m, i) : 0;
}

int zev_msg_more(const zev_msg_t *m, size_t i)
{
    return part_ok(m, i) && i + 1 < m->n;
}

/* zev_msg_keep once the frame is at hand (f, popped from the hub's pool)
 * and the part's size known: no call on this path. */
static inline __attribute__((always_inline)) zev_frame_t *
keep_in(zev_msg_t *m, size_t i, zev__hub_t *hub, zev_frame_t *f, size_t size)
{
    zev_stream_t *s = m->stream;
    f->stream = s;
    f->size = size;
    zev__msg_move(&f->msg, &m->parts[i], &hub->empty); /* the design notes */
    zev__list_push_tail(&s->kept_frames, &f->node);
    s->frames_out++;
    zev__hub_ref(hub);
    m->at[i] = &f->msg;
    m->sizes[i] = SIZE_MAX; /* the frame's owner may change it (zev_frame_msg) */
    uintptr_t handle = zev__handle_make(f, f->gen);
    /* release: a worker thread that gets the handle sees the frame whole */
    atomic_store_explicit(&f->handle, handle, memory_order_release);
    return (zev_frame_t *)handle;
}

static zev_frame_t *pool_pop(zev__hub_t *hub)
{
    zev_frame_t *f = hub->frame_free;
    hub->frame_free = f->next_free;
    if (!hub->frame_free)
        hub->frame_free_tail = NULL;
    return f;
}

/* zev_msg_keep when the pool must grow or libzmq be asked the size. */
static __attribute__((noinline)) zev_frame_t *keep_slow(zev_msg_t *m, size_t i)
{
    zev__hub_t *hub = m->stream->loop->hub;
    if (!hub->frame_free && pool_grow(hub) < 0)
        return NULL;
    size_t size = size_of(m, i);
    return keep_in(m, i, hub, pool_pop(hub), size);
}

static __attribute__((noinline)) zev_frame_t *keep_refused(void)
{
    errno = EINVAL;
    return NULL;
}

zev_frame_t *zev_msg_keep(zev_msg_t *m, size_t i)
{
    if (!part_ok(m, i) || part_kept(m, i))
        return keep_refused();
    zev__hub_t *hub = m->stream->loop->hub;
    size_t size = m->sizes[i];
    if (__builtin_expect(!hub->frame_free || size == SIZE_MAX, 0))
        return keep_slow(m, i);
    return keep_in(m, i, hub, pool_pop(hub), size);
}

/* ----------------------------------------------------------------- frames */

/* The frame a handle names, if the handle is still its owner's; NULL/EINVAL.
 * Any thread. */
static zev_frame_t *frame_of(const zev_frame_t *handle)
{
    zev_frame_t *f = handle ? zev__handle_obj(handle) : NULL;
    if (!f || atomic_load_explicit(&f->handle, memory_order_acquire) != (uintptr_t)handle) {
        errno = EINVAL;
        return NULL;
    }
    return f;
}

/* Takes the frame from the caller's handle: 1 for exactly one caller. */
static int claim(zev_frame_t *f, const zev_frame_t *handle, uintptr_t to)
{
    uintptr_t expect = (uintptr_t)handle;
    return atomic_compare_exchange_strong_explicit(&f->handle, &expect, to, memory_order_acq_rel,
                                                   memory_order_acquire);
}

/* The frame's buffer is done with: home to the loop, from any thread. */
static void frame_home(zev_frame_t *f)
{
    zev__hub_t *hub = f->hub;
    zmq_msg_close(&f->msg);
    zev__hub_push(hub, &f->qnode); /* f belongs to the loop from here on */
    zev__hub_wake(hub);
    zev__hub_unref(hub);
}

const void *zev_frame_data(const zev_frame_t *handle)
{
    zev_frame_t *f = frame_of(handle);
    return f ? zmq_msg_data(&f->msg) : NULL;
}

size_t zev_frame_size(const zev_frame_t *handle)
{
    zev_frame_t *f = frame_of(handle);
    return f ? f->size : 0;
}

zmq_msg_t *zev_frame_msg(zev_frame_t *handle)
{
    zev_frame_t *f = frame_of(handle);
    return f ? &f->msg : NULL;
}

/* frame_home on the thread iterating the frame's loop: the frame is
 * returned now, with no trip through the queue and no wakeup. Only
 * on_frame_release waits, since it must not run inside zev_frame_release:
 * a frame whose stream has one is queued (without a wakeup: the loop does
 * not wait while its queue holds anything) and returned by the next drain,
 * on_frame_release included. */
static void frame_home_here(zev_frame_t *f)
{
    zmq_msg_close(&f->msg);
    zev__hub_t *hub = f->hub; /* read after the call: only f is kept across it */
    zev_stream_t *s = f->stream;
    if (s && s->on_frame) {
        zev__hub_push(hub, &f->qnode);
    } else {
        if (s && frame_untrack(f, s))
            zev__stream_mark_ready(s); /* reading resumes */
        frame_to_pool(f);
    }
    zev__hub_unref(hub); /* never the last reference: the loop holds one */
}

int zev_frame_release(zev_frame_t *handle)
{
    zev_frame_t *f = handle ? zev__handle_obj(handle) : NULL;
    if (!f || !claim(f, handle, 0)) {
        errno = EINVAL;
        return -1;
    }
    zev_loop_t *here = zev__iterating;
    if (here && here->hub == f->hub)
        frame_home_here(f);
    else
        frame_home(f);
    return 0;
}

/* libzmq's free function for a forwarded frame: any thread, once. A send
 * that failed never had the frame (zev_stream_send_frame gives it back). */
static void frame_forwarded(void *data, void *hint)
{
    (void)data;
    zev_frame_t *f = hint;
    ZEV_HB_ACQUIRE(f); /* pairs with the release before zmq_msg_init_data */
    if (atomic_load_explicit(&f->handle, memory_order_acquire) == ZEV__FRAME_ZEVS)
        frame_home(f);
}

/* A send that took nothing gives the frame back to the caller's handle. */
static void give_back(zev_frame_t *f, const zev_frame_t *handle)
{
    atomic_store_explicit(&f->handle, (uintptr_t)handle, memory_order_release);
}

/* Sends the claimed frame's buffer by reference: libzmq's free function
 * (frame_forwarded) brings the frame home when libzmq is done with it. */
static int send_referenced(zev_stream_t *s, zev_frame_t *f, const zev_frame_t *handle, int flags)
{
    zmq_msg_t m;
    ZEV_HB_RELEASE(f);
    if (zmq_msg_init_data(&m, zmq_msg_data(&f->msg), f->size, frame_forwarded, f) < 0) {
        give_back(f, handle);
        return -1;
    }
    int rc = zev_stream_send_msg(s, &m, 1, flags);
    int err = errno;
    if (rc < 0)
        give_back(f, handle); /* first: the close below then finds the frame not zev's */
    zmq_msg_close(&m);        /* empty if the send took it */
    errno = err;
    return rc;
}

int zev_stream_send_frame(zev_stream_t *s, zev_frame_t *handle, int flags)
{
    zev_frame_t *f = handle ? zev__handle_obj(handle) : NULL;
    /* The claim comes first on every path: of this send and a release on
     * another thread, exactly one takes the frame. */
    if (!s || !f || !claim(f, handle, ZEV__FRAME_ZEVS)) {
        errno = EINVAL;
        return -1;
    }
    int saved = errno;
    if (f->size > ZEV_ZC_COPY_MAX) {
        if (send_referenced(s, f, handle, flags) < 0)
            return -1;
    } else { /* libzmq keeps it inline: copy it, and the frame goes home now */
        if (zev_stream_send(s, zmq_msg_data(&f->msg), f->size, flags) < 0) {
            int err = errno;
            give_back(f, handle);
            errno = err;
            return -1;
        }
        frame_home(f);
    }
    errno = saved;
    return 0;
}

/* ------------------------------------------------------- stream settings */

int zev_stream_on_frame_release(zev_stream_t *s, zev_frame_fn fn, void *arg)
{
    if (!zev__stream_usable(s))
        return -1;
    s->on_frame = fn;
    s->frame_arg = arg;
    return 0;
}

int zev_stream_set_max_frames(zev_stream_t *s, size_t n)
{
    if (!zev__stream_usable(s))
        return -1;
    s->max_frames = n;
    zev__stream_mark_ready(s); /* a higher bound may let reading resume */
    return 0;
}
