/*
 * post: cross-thread posts, the way a strategy thread hands orders to a
 * gateway's loop. How long from a post on a producer thread to its callback
 * on the loop thread, and how many posts per second one loop thread takes.
 *
 * Every row carries the same 16-byte message {send time (CLOCK_MONOTONIC ns),
 * producer, slot, sequence}, written into one of the producer's slots, each
 * with an atomic "in flight" flag that the consumer clears when the post ran.
 * A producer reuses a slot only then, as a strategy thread reuses its order
 * objects.
 *
 * Cases, each for 1, 2 and 4 producer threads posting to one consumer:
 *   latency     paced, every row in the same run: all rows' consumers wait
 *               at once, and time is cut in rounds of 3 x --gap-us (50 us).
 *               In each round every producer posts once, at a random moment
 *               of the round's first third, to the row whose turn it is; the
 *               rows take turns in a shuffled order. So a consumer is asleep
 *               when its posts come (it gets one round in five), the posts
 *               of several producers may meet in it, and whatever the shared
 *               machine does meanwhile hits every row alike. --pings posts
 *               per producer per row and run (quick 600, full 10,000), the
 *               first 10 not counted. Metrics over all producers' posts of a
 *               row in a run: p50_us, p99_us, max_us from the post (the clock
 *               read just before the post call) to the callback (the clock
 *               read first thing); medians over the runs. The producers
 *               have one core and the consumers the other: every wake-up
 *               crosses cores, as between threads on cores of their own.
 *   latency_one_core  the same with producers and consumers on one core: a
 *               post hands that core over to the consumer (which preempts
 *               the producer or runs when it sleeps). Unpinned, the
 *               scheduler picks one placement or the other for each wake-up.
 *   throughput  flat out, one row at a time (the rows interleaved run by
 *               run), producers and consumer on cores apart: each producer
 *               posts --count (quick 40,000, full 200,000) as fast as its
 *               ring of --ring slots (256) lets it. Metrics: msgs_per_s at
 *               the consumer from the first post run to the last;
 *               rx_cpu_ns, the consumer thread's CPU time per post;
 *               rx_sleeps, the times it went to sleep (voluntary context
 *               switches, Linux) per 1,000 posts;
 *               tx_allocs and rx_allocs, heap allocations per post on the
 *               producer threads and on the consumer thread.
 * Rows (impl=):
 *   eventfd           the floor, latency only: the producer fills its slot,
 *                     marks it in flight and writes 1 to the row's eventfd;
 *                     the consumer thread blocks in read() on it and takes
 *                     every slot marked in flight. The bare cross-thread
 *                     wake-up, a syscall on each side and no queue (so no
 *                     throughput row: it carries no messages).
 *   eventfd_epoll     the same, the consumer waiting in epoll_wait on the
 *                     eventfd and then reading it: what any epoll loop woken
 *                     through an eventfd pays, zev's included (latency only).
 *   zev_add_callback  zev_loop_add_callback(loop, fn, slot): zev mallocs the
 *                     queue node, the loop thread frees it.
 *   zev_post          zev_loop_post(loop, &slot->post, fn, slot): the node is
 *                     the slot's own zev_post_t, no allocation.
 *   zactor            CZMQ: an actor (zactor_new) whose pipe receives a frame
 *                     per post (zframe_new + zframe_send; the actor runs a
 *                     zpoller loop and zframe_recv, as CZMQ's own actors do).
 *                     A pipe is a PAIR socket, one thread's: producer 0 uses
 *                     the actor's pipe, each other producer a pipe of its own
 *                     from zsys_create_pipe (the same kind, the same HWM),
 *                     all polled by the actor.
 * zev rows run the default backend's loop with zev_loop_run in a thread of
 * their own, no busy-poll. Threads are pinned (see pin_init; with --no-pin
 * the scheduler places them, and the two latency cases are the same).
 * Ratios: p50_us of each row / eventfd, and of the zev rows / eventfd_epoll;
 * msgs_per_s zev_post / zev_add_callback, zev_post / zactor,
 * zev_add_callback / zactor.
 *
 * Allocations are counted as perf/alloc.c does: malloc, calloc, realloc and
 * the aligned variants are interposed for the whole process (one
 * thread-local add per call, in every row alike). Not in sanitizer builds,
 * which interpose malloc themselves: the alloc metrics are then missing.
 *
 *   post [--full] [--runs N] [--cases latency,latency_one_core,throughput]
 *        [--producers 1,2,4]
 *        [--impls eventfd,eventfd_epoll,zev_add_callback,zev_post,zactor]
 *        [--count N] [--pings N] [--gap-us N] [--ring N] [--no-pin]
 */
#include "common.h"

#include <zev.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#endif
#include <sys/resource.h>
#ifdef PERF_HAVE_CZMQ
#include <czmq.h>
#endif

/* ----------------------------------------------------------- interposition */

#ifdef PERF_COUNT_ALLOCS
#include "allocs.h" /* perf/allocs.c interposes malloc */

/* Starts counting the calling thread's allocations; count_stop returns how
 * many it made since. */
static long count_start(void)
{
    return perf_allocs_start();
}

static long count_stop(long since)
{
    return perf_allocs_stop(since);
}
#else
static long count_start(void)
{
    return 0;
}

static long count_stop(long since)
{
    (void)since;
    return -1;
}
#endif

/* ------------------------------------------------------------------ pinning */

/* Unless --no-pin: producers on the first CPU the process may use,
 * consumers on the second (latency_one_core: the first too). Unpinned, the
 * scheduler sometimes wakes the consumer on the producer's core, a wake-up
 * a few times cheaper than waking an idle core, and a row's median then
 * depends on how often that happened; pinned, each case has one kind. */
static int pin_cpu[2] = {-1, -1};

/* Called once, before any thread starts. */
static void pin_init(int on)
{
#ifdef __linux__
    cpu_set_t set;
    if (!on || sched_getaffinity(0, sizeof set, &set) < 0)
        return;
    for (int c = 0, k = 0; c < CPU_SETSIZE && k < 2; c++)
        if (CPU_ISSET(c, &set))
            pin_cpu[k++] = c;
    if (pin_cpu[1] < 0)
        pin_cpu[0] = -1;
#else
    (void)on;
#endif
}

/* Pins the calling thread: 0 producers' core, 1 consumers' core. */
static void pin_self(int which)
{
#ifdef __linux__
    if (pin_cpu[0] < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(pin_cpu[which], &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
    (void)which;
#endif
}

/* ------------------------------------------------------------------- shared */

enum { MAX_PRODUCERS = 16, WARMUP = 10 };

enum { I_EVENTFD, I_EVENTFD_EPOLL, I_ADD_CALLBACK, I_POST, I_ZACTOR, I__N };
static const char *const impls[I__N] = {"eventfd", "eventfd_epoll", "zev_add_callback", "zev_post",
                                        "zactor"};

/* What every row carries, by pointer (zev, eventfd) or by value (zactor). */
typedef struct post_msg {
    uint64_t t_send;
    uint16_t producer;
    uint16_t slot;
    uint32_t seq; /* per producer and row */
} post_msg_t;

struct bench;

/* One row's consumer: the thread that runs its posts, and what it saw. */
typedef struct cons {
    struct bench *b;
    int impl;
    long total; /* posts it runs in this run */
    atomic_long progress;
    /* the consumer thread only */
    long ran;
    uint64_t t_first, t_last, rx_cpu;
    long rx_sleeps; /* voluntary context switches, -1 if unknown */
    long rx_allocs;
    uint64_t *lat;
    size_t nlat;
    const char *why;
    /* the row's machinery */
    zev_loop_t *loop;
    int efd, ep;
    pthread_t th;
    int have_th;
#ifdef PERF_HAVE_CZMQ
    zactor_t *actor;
    zsock_t *backend[MAX_PRODUCERS]; /* the actor's ends of the extra pipes */
    sem_t done;
#endif
} cons_t;

typedef struct slot {
    post_msg_t msg;
    atomic_int inflight; /* set by the producer, cleared when the post ran */
    cons_t *c;
    zev_post_t post; /* zev_post's node */
} slot_t;

typedef struct producer {
    struct bench *b;
    int id;
    slot_t *slots; /* latency: one per row; throughput: the ring */
    uint32_t sent[I__N];
    pthread_t th;
    long allocs;
    int failed;
#ifdef PERF_HAVE_CZMQ
    zsock_t *pipe; /* zactor: this producer's end of a pipe to the actor */
#endif
} producer_t;

typedef struct bench {
    int latency, shared, producers, nslots, ncons;
    long rounds;          /* latency: rounds; throughput: posts per producer */
    uint64_t gap_ns, t0;  /* latency: round r starts at t0 + r * 3 * gap_ns */
    unsigned char *order; /* latency: the row (index in cons) of each round */
    atomic_int go, abort;
    cons_t cons[I__N];
    producer_t prod[MAX_PRODUCERS];
} bench_t;

/* The consumer's side of every row: record the post that ran at `now` and
 * give its slot back. Returns 1 when it was the consumer's last post. */
static int deliver(cons_t *c, const post_msg_t *m, slot_t *s, uint64_t now)
{
    if (c->lat && m->seq >= WARMUP)
        c->lat[c->nlat++] = now - m->t_send;
    if (c->ran == 0)
        c->t_first = now;
    c->ran++;
    atomic_store_explicit(&c->progress, c->ran, memory_order_relaxed);
    /* release: the slot (m may point into it) is read before the producer
     * may reuse it */
    atomic_store_explicit(&s->inflight, 0, memory_order_release);
    if (c->ran == c->total) {
        c->t_last = now;
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- producers */

static void sleep_until(uint64_t t)
{
    struct timespec ts = {(time_t)(t / 1000000000u), (long)(t % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static uint64_t xorshift(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void zev_ran(zev_loop_t *loop, void *arg)
{
    uint64_t now = perf_now_ns();
    slot_t *s = arg;
    if (!loop) { /* zev_loop_destroy after an aborted run */
        atomic_store_explicit(&s->inflight, 0, memory_order_release);
        return;
    }
    if (deliver(s->c, &s->msg, s, now))
        zev_loop_stop(loop);
}

static int post_one(cons_t *c, producer_t *p, slot_t *s)
{
    switch (c->impl) {
#ifdef __linux__
    case I_EVENTFD:
    case I_EVENTFD_EPOLL: {
        uint64_t one = 1;
        return write(c->efd, &one, sizeof one) == sizeof one ? 0 : -1;
    }
#endif
    case I_ADD_CALLBACK:
        while (zev_loop_add_callback(c->loop, zev_ran, s) < 0) {
            if (errno != ENOMEM)
                return -1;
            usleep(100);
        }
        return 0;
    case I_POST:
        return zev_loop_post(c->loop, &s->post, zev_ran, s);
#ifdef PERF_HAVE_CZMQ
    case I_ZACTOR: {
        zframe_t *f = zframe_new(&s->msg, sizeof s->msg);
        if (f && zframe_send(&f, p->pipe, 0) == 0)
            return 0;
        zframe_destroy(&f);
        return -1;
    }
#endif
    default:
        (void)p;
        return -1;
    }
}

static void *producer_main(void *arg)
{
    producer_t *p = arg;
    bench_t *b = p->b;
    uint64_t rng = 0x9e3779b97f4a7c15u * (uint64_t)(p->id + 1);
    pin_self(0);
#ifdef __linux__
    if (b->latency)
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* the pacing as asked */
#endif
    while (!atomic_load(&b->go))
        sched_yield();
    long since = count_start();
    for (long r = 0; r < b->rounds && !atomic_load_explicit(&b->abort, memory_order_relaxed); r++) {
        cons_t *c = &b->cons[b->latency ? b->order[r] : 0];
        slot_t *s = &p->slots[b->latency ? b->order[r] : r % b->nslots];
        if (b->latency)
            sleep_until(b->t0 + (uint64_t)r * 3 * b->gap_ns + xorshift(&rng) % b->gap_ns);
        while (atomic_load_explicit(&s->inflight, memory_order_acquire)) {
            if (atomic_load(&b->abort))
                goto out;
            sched_yield();
        }
        s->c = c;
        s->msg.seq = p->sent[c - b->cons]++;
        s->msg.t_send = perf_now_ns();
        /* before the post, whose callback may run before post_one returns;
         * release: the eventfd reader reads the slot once it sees the flag */
        atomic_store_explicit(&s->inflight, 1, memory_order_release);
        if (post_one(c, p, s) < 0) {
            p->failed = 1;
            break;
        }
    }
out:
    p->allocs = count_stop(since);
    return NULL;
}

/* ---------------------------------------------------------------- consumers */

/* How many times the calling thread went to sleep so far; -1 if unknown. */
static long thread_sleeps(void)
{
#ifdef RUSAGE_THREAD
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) == 0)
        return ru.ru_nvcsw;
#endif
    return -1;
}

#ifdef __linux__
/* eventfd: a blocking read(); eventfd_epoll: epoll_wait on the eventfd, then
 * the read, as an epoll loop woken through an eventfd does. */
static int consume_eventfd(cons_t *c)
{
    bench_t *b = c->b;
    int row = (int)(c - b->cons);
    while (c->ran < c->total) {
        struct epoll_event ev;
        if (c->ep >= 0 && epoll_wait(c->ep, &ev, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            c->why = "epoll_wait";
            return -1;
        }
        uint64_t v;
        ssize_t n = read(c->efd, &v, sizeof v);
        if (n != sizeof v) {
            if (n < 0 && errno == EINTR)
                continue;
            c->why = "read";
            return -1;
        }
        if (atomic_load(&b->abort))
            return -1;
        for (int i = 0; i < b->producers; i++) {
            slot_t *s = &b->prod[i].slots[row];
            if (atomic_load_explicit(&s->inflight, memory_order_acquire))
                deliver(c, &s->msg, s, perf_now_ns());
        }
    }
    return 0;
}
#endif

/* The thread of an eventfd or zev consumer. */
static void *cons_main(void *arg)
{
    cons_t *c = arg;
    pin_self(c->b->shared ? 0 : 1);
    uint64_t cpu0 = perf_thread_cpu_ns();
    long sleeps0 = thread_sleeps();
    long since = count_start();
    int rc = -1;
    if (c->loop) {
        if ((rc = zev_loop_run(c->loop)) < 0)
            c->why = "zev_loop_run";
#ifdef __linux__
    } else {
        rc = consume_eventfd(c);
#endif
    }
    c->rx_allocs = count_stop(since);
    c->rx_cpu = perf_thread_cpu_ns() - cpu0;
    c->rx_sleeps = sleeps0 < 0 ? -1 : thread_sleeps() - sleeps0;
    if (rc < 0)
        atomic_store(&c->b->abort, 1);
    return NULL;
}

#ifdef PERF_HAVE_CZMQ
static void actor_main(zsock_t *pipe, void *arg)
{
    cons_t *c = arg;
    bench_t *b = c->b;
    pin_self(b->shared ? 0 : 1);
    zpoller_t *poller = zpoller_new(pipe, NULL);
    for (int i = 1; poller && i < b->producers; i++)
        zpoller_add(poller, c->backend[i]);
    zsock_signal(pipe, 0);
    uint64_t cpu0 = perf_thread_cpu_ns();
    long sleeps0 = thread_sleeps();
    long since = count_start();
    while (poller && c->ran < c->total && !atomic_load(&b->abort)) {
        zsock_t *which = zpoller_wait(poller, 100); /* 100 ms: see the abort */
        if (!which) {
            if (zpoller_terminated(poller))
                break;
            continue;
        }
        zframe_t *f = zframe_recv(which);
        uint64_t now = perf_now_ns();
        if (!f || zframe_size(f) != sizeof(post_msg_t)) { /* $TERM */
            zframe_destroy(&f);
            break;
        }
        post_msg_t m;
        memcpy(&m, zframe_data(f), sizeof m);
        deliver(c, &m, &b->prod[m.producer].slots[m.slot], now);
        zframe_destroy(&f);
    }
    c->rx_allocs = count_stop(since);
    c->rx_cpu = perf_thread_cpu_ns() - cpu0;
    c->rx_sleeps = sleeps0 < 0 ? -1 : thread_sleeps() - sleeps0;
    if (c->ran < c->total)
        c->why = "actor";
    zpoller_destroy(&poller);
    sem_post(&c->done);
}
#endif

/* ------------------------------------------------------------------ one run */

static long watch_progress(void *arg, int *started)
{
    bench_t *b = arg;
    long n = 0;
    *started = atomic_load(&b->go);
    for (int i = 0; i < b->ncons; i++)
        n += atomic_load_explicit(&b->cons[i].progress, memory_order_relaxed);
    return n;
}

static void watch_fire(void *arg)
{
    bench_t *b = arg;
    atomic_store(&b->abort, 1);
    for (int i = 0; i < b->ncons; i++) {
        cons_t *c = &b->cons[i];
        if (c->loop)
            zev_loop_stop(c->loop);
#ifdef __linux__
        uint64_t one = 1;
        if (c->efd >= 0 && write(c->efd, &one, sizeof one) < 0)
            perror("post: watchdog");
#endif
    }
}

/* Makes the row's machinery and starts its consumer; 0 or -1. */
static int cons_start(cons_t *c)
{
    bench_t *b = c->b;
    if (c->impl == I_ADD_CALLBACK || c->impl == I_POST) {
        if (!(c->loop = zev_loop_new(NULL)))
            return -1;
    }
#ifdef __linux__
    if (c->impl == I_EVENTFD || c->impl == I_EVENTFD_EPOLL) {
        if ((c->efd = eventfd(0, EFD_CLOEXEC)) < 0)
            return -1;
        struct epoll_event ev = {.events = EPOLLIN};
        if (c->impl == I_EVENTFD_EPOLL && ((c->ep = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
                                           epoll_ctl(c->ep, EPOLL_CTL_ADD, c->efd, &ev) < 0))
            return -1;
    }
#endif
#ifdef PERF_HAVE_CZMQ
    if (c->impl == I_ZACTOR) {
        sem_init(&c->done, 0, 0);
        for (int i = 1; i < b->producers; i++)
            b->prod[i].pipe = zsys_create_pipe(&c->backend[i]);
        if (!(c->actor = zactor_new(actor_main, c)))
            return -1;
        b->prod[0].pipe = zactor_sock(c->actor);
        for (int i = 0; i < b->producers; i++)
            zsock_set_sndtimeo(b->prod[i].pipe, 5000); /* never reached: ring < HWM */
        return 0;
    }
#endif
    if (!c->loop && c->efd < 0)
        return -1;
    if (pthread_create(&c->th, NULL, cons_main, c) != 0)
        return -1;
    c->have_th = 1;
    (void)b;
    return 0;
}

/* Waits for the consumer to finish. */
static void cons_join(cons_t *c)
{
    if (c->have_th)
        pthread_join(c->th, NULL);
#ifdef PERF_HAVE_CZMQ
    if (c->actor)
        while (sem_wait(&c->done) < 0 && errno == EINTR)
            ;
#endif
}

/* Frees the row's machinery, also after a cons_start that failed. */
static void cons_free(cons_t *c)
{
    zev_loop_destroy(c->loop);
#ifdef __linux__
    if (c->efd >= 0)
        close(c->efd);
    if (c->ep >= 0)
        close(c->ep);
#endif
#ifdef PERF_HAVE_CZMQ
    if (c->impl == I_ZACTOR) {
        zactor_destroy(&c->actor);
        for (int i = 1; i < c->b->producers; i++) {
            zsock_destroy(&c->b->prod[i].pipe);
            zsock_destroy(&c->backend[i]);
        }
        sem_destroy(&c->done);
    }
#endif
}

/* Runs every consumer of b once; 0, or -1 with a reason in *why. */
static int run_once(bench_t *b, const char **why)
{
    int rc = 0, consumers = 0, producers = 0;
    *why = "setup";
    for (; consumers < b->ncons; consumers++)
        if (cons_start(&b->cons[consumers]) < 0) {
            rc = -1;
            break;
        }
    for (; rc == 0 && producers < b->producers; producers++)
        if (pthread_create(&b->prod[producers].th, NULL, producer_main, &b->prod[producers])) {
            *why = "pthread_create";
            rc = -1;
        }
    if (rc < 0)
        atomic_store(&b->abort, 1);
    perf_watchdog_t w;
    perf_watchdog_start(&w, watch_progress, watch_fire, b);
    b->t0 = perf_now_ns() + 1000000; /* 1 ms: every producer waiting */
    atomic_store(&b->go, 1);
    for (int i = 0; i < producers; i++) {
        pthread_join(b->prod[i].th, NULL);
        if (b->prod[i].failed) {
            *why = "post_failed";
            rc = -1;
        }
    }
    if (rc < 0)
        watch_fire(b); /* no more posts are coming: end the consumers */
    for (int i = 0; i < consumers; i++)
        cons_join(&b->cons[i]);
    perf_watchdog_stop(&w); /* before the loops it may stop are freed */
    for (int i = 0; i < consumers + (consumers < b->ncons); i++)
        cons_free(&b->cons[i]);
    for (int i = 0; rc == 0 && i < b->ncons; i++) {
        cons_t *c = &b->cons[i];
        if (atomic_load(&b->abort) || c->ran != c->total) {
            *why = atomic_load(&b->abort) ? (c->why ? c->why : "stuck") : "lost_posts";
            rc = -1;
        }
    }
    return rc;
}

/* A bench of the rows rows[0..n) for one run; free with bench_free.
 * latency: `per` posts per producer and row; throughput: one row, `per`
 * posts per producer through a ring of `ring` slots. */
static bench_t *bench_new(const int *rows, int n, int latency, int producers, long per, int ring,
                          uint64_t gap_ns, uint64_t *rng)
{
    bench_t *b = calloc(1, sizeof *b);
    if (!b)
        goto oom;
    b->latency = latency;
    b->producers = producers;
    b->ncons = n;
    b->nslots = latency ? n : ring;
    b->rounds = latency ? per * n : per;
    b->gap_ns = gap_ns ? gap_ns : 1;
    atomic_init(&b->go, 0);
    atomic_init(&b->abort, 0);
    if (latency) {
        /* each block of n rounds gives every row one turn, in a shuffled order */
        if (!(b->order = malloc((size_t)b->rounds)))
            goto oom;
        for (long r = 0; r < b->rounds; r += n) {
            for (int i = 0; i < n; i++)
                b->order[r + i] = (unsigned char)i;
            for (int i = n - 1; i > 0; i--) {
                int j = (int)(xorshift(rng) % (uint64_t)(i + 1));
                unsigned char t = b->order[r + i];
                b->order[r + i] = b->order[r + j];
                b->order[r + j] = t;
            }
        }
    }
    for (int i = 0; i < n; i++) {
        cons_t *c = &b->cons[i];
        c->b = b;
        c->impl = rows[i];
        c->total = per * producers;
        c->efd = c->ep = -1;
        atomic_init(&c->progress, 0);
        if (latency && !(c->lat = malloc((size_t)c->total * sizeof *c->lat)))
            goto oom;
    }
    size_t bytes = ((size_t)b->nslots * sizeof(slot_t) + 63) / 64 * 64;
    for (int i = 0; i < producers; i++) {
        producer_t *p = &b->prod[i];
        p->b = b;
        p->id = i;
        if (!(p->slots = aligned_alloc(64, bytes))) /* a slot per cache line */
            goto oom;
        memset(p->slots, 0, bytes);
        for (int k = 0; k < b->nslots; k++) {
            p->slots[k].msg.producer = (uint16_t)i;
            p->slots[k].msg.slot = (uint16_t)k;
            atomic_init(&p->slots[k].inflight, 0);
        }
    }
    return b;
oom:
    fprintf(stderr, "post: out of memory\n");
    exit(1);
}

static void bench_free(bench_t *b)
{
    for (int i = 0; i < b->producers; i++)
        free(b->prod[i].slots);
    for (int i = 0; i < b->ncons; i++)
        free(b->cons[i].lat);
    free(b->order);
    free(b);
}

/* ------------------------------------------------------------------- driver */

typedef struct opts {
    long count, pings;
    int ring;
    uint64_t gap_ns;
    int on[I__N];
} opts_t;

/* shared: the consumers on the producers' core instead of the other one */
static void latency_case(const perf_args_t *a, const opts_t *o, int shared, int producers,
                         uint64_t *rng)
{
    char keys[96];
    snprintf(keys, sizeof keys, "bench=post case=%s producers=%d",
             shared ? "latency_one_core" : "latency", producers);
    perf_series_t p50[I__N], p99[I__N], pmax[I__N];
    memset(p50, 0, sizeof p50);
    memset(p99, 0, sizeof p99);
    memset(pmax, 0, sizeof pmax);
    int rows[I__N], n = 0;
    for (int i = 0; i < I__N; i++)
        if (o->on[i])
            rows[n++] = i;
    if (!n)
        return;
    for (int run = 0; run < a->runs; run++) {
        bench_t *b = bench_new(rows, n, 1, producers, o->pings + WARMUP, 1, o->gap_ns, rng);
        b->shared = shared;
        const char *why;
        int rc = run_once(b, &why);
        for (int k = 0; k < n; k++) {
            cons_t *c = &b->cons[k];
            int i = c->impl;
            if (rc < 0 || c->nlat == 0) {
                printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, impls[i], run, why);
                perf_series_add(&p50[i], NAN);
                perf_series_add(&p99[i], NAN);
                perf_series_add(&pmax[i], NAN);
                continue;
            }
            perf_sort_u64(c->lat, c->nlat);
            double m50 = (double)perf_pct(c->lat, c->nlat, 50) / 1e3;
            double m99 = (double)perf_pct(c->lat, c->nlat, 99) / 1e3;
            double mx = (double)c->lat[c->nlat - 1] / 1e3;
            printf("RUN %s impl=%s run=%d samples=%zu p50_us=%.2f p99_us=%.2f max_us=%.1f\n", keys,
                   impls[i], run, c->nlat, m50, m99, mx);
            perf_series_add(&p50[i], m50);
            perf_series_add(&p99[i], m99);
            perf_series_add(&pmax[i], mx);
        }
        fflush(stdout);
        bench_free(b);
    }
    double med[I__N];
    for (int i = 0; i < I__N; i++) {
        med[i] = NAN;
        if (!o->on[i])
            continue;
        med[i] = perf_report(keys, impls[i], "p50_us", "us", &p50[i]);
        perf_report(keys, impls[i], "p99_us", "us", &p99[i]);
        perf_report(keys, impls[i], "max_us", "us", &pmax[i]);
    }
    for (int i = I_EVENTFD_EPOLL; i < I__N; i++)
        perf_ratio(keys, "p50_us", impls[i], med[i], impls[I_EVENTFD], med[I_EVENTFD]);
    for (int i = I_ADD_CALLBACK; i <= I_POST; i++)
        perf_ratio(keys, "p50_us", impls[i], med[i], impls[I_EVENTFD_EPOLL], med[I_EVENTFD_EPOLL]);
}

static void throughput_case(const perf_args_t *a, const opts_t *o, int producers, uint64_t *rng)
{
    char keys[96];
    snprintf(keys, sizeof keys, "bench=post case=throughput producers=%d", producers);
    perf_series_t rate[I__N], cpu[I__N], slp[I__N], txa[I__N], rxa[I__N];
    memset(rate, 0, sizeof rate);
    memset(cpu, 0, sizeof cpu);
    memset(slp, 0, sizeof slp);
    memset(txa, 0, sizeof txa);
    memset(rxa, 0, sizeof rxa);
    for (int run = 0; run < a->runs; run++) {
        for (int i = I_ADD_CALLBACK; i < I__N; i++) {
            if (!o->on[i])
                continue;
            bench_t *b = bench_new(&i, 1, 0, producers, o->count, o->ring, 0, rng);
            cons_t *c = &b->cons[0];
            const char *why;
            if (run_once(b, &why) < 0 || c->t_last <= c->t_first) {
                printf("RUNFAIL %s impl=%s run=%d reason=%s\n", keys, impls[i], run, why);
                perf_series_add(&rate[i], NAN);
            } else {
                double r = (double)(c->total - 1) * 1e9 / (double)(c->t_last - c->t_first);
                double ns = (double)c->rx_cpu / (double)c->total;
                double sl =
                    c->rx_sleeps < 0 ? NAN : (double)c->rx_sleeps * 1000.0 / (double)c->total;
                long tx = 0;
                for (int k = 0; k < producers; k++)
                    tx = b->prod[k].allocs < 0 || tx < 0 ? -1 : tx + b->prod[k].allocs;
                double ta = tx < 0 ? NAN : (double)tx / (double)c->total;
                double ra = c->rx_allocs < 0 ? NAN : (double)c->rx_allocs / (double)c->total;
                printf("RUN %s impl=%s run=%d count=%ld msgs_per_s=%.6g rx_cpu_ns=%.1f "
                       "rx_sleeps=%.3g",
                       keys, impls[i], run, o->count, r, ns, sl);
                if (!isnan(ta) && !isnan(ra))
                    printf(" tx_allocs=%.4g rx_allocs=%.4g", ta, ra);
                printf("\n");
                perf_series_add(&rate[i], r);
                perf_series_add(&cpu[i], ns);
                perf_series_add(&slp[i], sl);
                perf_series_add(&txa[i], ta);
                perf_series_add(&rxa[i], ra);
            }
            fflush(stdout);
            bench_free(b);
        }
    }
    double med[I__N];
    for (int i = 0; i < I__N; i++) {
        med[i] = NAN;
        if (i < I_ADD_CALLBACK || !o->on[i])
            continue;
        med[i] = perf_report(keys, impls[i], "msgs_per_s", "msg/s", &rate[i]);
        perf_report(keys, impls[i], "rx_cpu_ns", "ns/msg", &cpu[i]);
        perf_report(keys, impls[i], "rx_sleeps", "per_1000_msgs", &slp[i]);
#ifdef PERF_COUNT_ALLOCS
        perf_report(keys, impls[i], "tx_allocs", "allocs/msg", &txa[i]);
        perf_report(keys, impls[i], "rx_allocs", "allocs/msg", &rxa[i]);
#endif
    }
    perf_ratio(keys, "msgs_per_s", "zev_post", med[I_POST], "zev_add_callback",
               med[I_ADD_CALLBACK]);
    perf_ratio(keys, "msgs_per_s", "zev_post", med[I_POST], "zactor", med[I_ZACTOR]);
    perf_ratio(keys, "msgs_per_s", "zev_add_callback", med[I_ADD_CALLBACK], "zactor",
               med[I_ZACTOR]);
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 5, 10);
    perf_banner("post", &a);
    opts_t o;
    o.count = perf_opt_long(&a, "--count", a.full ? 200000 : 40000);
    o.pings = perf_opt_long(&a, "--pings", a.full ? 10000 : 600);
    o.ring = (int)perf_opt_long(&a, "--ring", 256);
    o.gap_ns = (uint64_t)perf_opt_long(&a, "--gap-us", 50) * 1000u;
    if (o.count < 2 || o.pings < 1 || o.ring < 1 || o.ring > 65536 || o.gap_ns == 0) {
        fprintf(stderr, "post: --count >= 2, --pings >= 1, --ring 1..65536, --gap-us >= 1\n");
        return 2;
    }
    const char *plist = perf_opt_str(&a, "--producers", "1,2,4");
    for (int i = 0; i < I__N; i++)
        o.on[i] = perf_selected(&a, "--impls", impls[i]);
#ifndef __linux__
    o.on[I_EVENTFD] = o.on[I_EVENTFD_EPOLL] = 0;
#endif
#ifndef PERF_HAVE_CZMQ
    if (o.on[I_ZACTOR])
        printf("INFO post: CZMQ not available, no zactor row\n");
    o.on[I_ZACTOR] = 0;
#endif
    pin_init(!perf_flag(&a, "--no-pin"));
    zev_loop_t *probe = zev_loop_new(NULL);
    printf("INFO post backend=%s count=%ld pings=%ld gap_us=%llu ring=%d producers_cpu=%d "
           "consumers_cpu=%d allocs=%s\n",
           probe ? zev_loop_backend(probe) : "none", o.count, o.pings,
           (unsigned long long)(o.gap_ns / 1000u), o.ring, pin_cpu[0], pin_cpu[1],
#ifdef PERF_COUNT_ALLOCS
           "counted"
#else
           "not_counted"
#endif
    );
    zev_loop_destroy(probe);
    uint64_t rng = 0x2545f4914f6cdd1du;
    static const char *const cases[] = {"latency", "latency_one_core", "throughput"};
    for (int c = 0; c < 3; c++) {
        if (!perf_selected(&a, "--cases", cases[c]))
            continue;
        for (const char *p = plist; *p;) {
            char *end;
            long n = strtol(p, &end, 10);
            if (end == p || n < 1 || n > MAX_PRODUCERS) {
                fprintf(stderr, "post: --producers takes numbers from 1 to %d\n", MAX_PRODUCERS);
                return 2;
            }
            if (c < 2)
                latency_case(&a, &o, c == 1, (int)n, &rng);
            else
                throughput_case(&a, &o, (int)n, &rng);
            p = *end == ',' ? end + 1 : end;
        }
    }
    return 0;
}
