/*
 * Injected faults (issue 14), each on every backend, on real libzmq sockets:
 *
 * - a tcp peer killed with SIGKILL mid-stream and restarted (a child process):
 *   the loop keeps running, libzmq reconnects, traffic resumes, and what was
 *   reported sent and what arrived add up (one gap at the kill, no
 *   duplicate, nothing out of order, the tail after the restart whole);
 * - zmq_ctx_shutdown while the loop runs with queued sends, zero-copy sends
 *   with trackers and kept frames outstanding: every queued message gets a
 *   status (ETERM / ECANCELED), every tracker completes, every kept frame is
 *   released and reported once, a stream of another context keeps working;
 * - a signal storm (a thread signals the loop thread at >= 10 kHz, handler
 *   installed without SA_RESTART; a real-time signal, so they queue instead
 *   of merging and each one interrupts) during waits and sends: nothing
 *   lost, no error, EINTR never reaches the caller;
 * - descriptor exhaustion (RLIMIT_NOFILE lowered, in a child process):
 *   zev_loop_new, zev_stream_new, zev_io_start and zev_loop_fd fail with
 *   EMFILE or succeed, leave nothing half made, and work once fds are free.
 *
 * Allocation failure at every allocation site is tests/alloc_faults.c (it
 * needs the interposing allocator, plain builds only).
 */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

/* ------------------------------------------- tcp peer killed and restarted */

/* The child: a PULL connected to ep (its own context: it shares nothing with
 * the parent's libzmq), writing every sequence number it receives to fd. */
static void peer_main(const char *ep, int fd)
{
    void *ctx = zmq_ctx_new();
    void *pull = ctx ? zmq_socket(ctx, ZMQ_PULL) : NULL;
    if (!pull || zmq_connect(pull, ep) != 0)
        _exit(3);
    for (;;) {
        uint64_t seq;
        int n = zmq_recv(pull, &seq, sizeof seq, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (int)sizeof seq)
            _exit(4);
        const char *p = (const char *)&seq;
        size_t left = sizeof seq;
        while (left) {
            ssize_t w = write(fd, p, left);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                _exit(5);
            p += w;
            left -= (size_t)w;
        }
    }
}

typedef struct killed {
    zev_loop_t *loop;
    zev_stream_t *push;
    uint64_t given;      /* messages given to the stream */
    size_t reported;     /* on_send statuses */
    size_t reported_ok;  /* ... of them 0 */
    uint64_t next_seq;   /* on_send numbers must come in order */
    int bad_status;      /* the first non-zero status */
    uint64_t arrived[2]; /* count per child */
    uint64_t first[2];   /* first and last seq per child */
    uint64_t last[2];
    int gaps[2];     /* holes inside a child's own run */
    int child;       /* which child is running (0 or 1) */
    uint64_t max_ok; /* highest seq reported 0 */
    int arrived_unreported;
    char partial[8];
    size_t partial_len;
} killed_t;

static void killed_on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    killed_t *k = arg;
    cr_assert_eq(seq, k->next_seq, "on_send out of order: %lu after %lu", (unsigned long)seq,
                 (unsigned long)k->next_seq - 1);
    k->next_seq++;
    k->reported++;
    if (status == 0) {
        k->reported_ok++;
        k->max_ok = seq;
    } else if (!k->bad_status) {
        k->bad_status = status;
    }
}

static void killed_on_pipe(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    (void)events;
    killed_t *k = arg;
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0)
        return;
    for (ssize_t i = 0; i < n; i++) {
        k->partial[k->partial_len++] = buf[i];
        if (k->partial_len < 8)
            continue;
        k->partial_len = 0;
        uint64_t seq;
        memcpy(&seq, k->partial, 8);
        int c = k->child;
        if (seq > k->max_ok)
            k->arrived_unreported++;
        if (k->arrived[c] == 0)
            k->first[c] = seq;
        else if (seq != k->last[c] + 1)
            k->gaps[c]++;
        k->last[c] = seq;
        k->arrived[c]++;
    }
}

/* The peer runs in a fresh process: the test program re-executed with
 * ZEV_FAULTS_PEER set, caught by this constructor before Criterion's main.
 * (A forked child of a process with libzmq's threads, and ASan's, could
 * inherit a lock held at the fork and hang.) */
__attribute__((constructor)) static void peer_entry(void)
{
    const char *ep = getenv("ZEV_FAULTS_PEER");
    const char *fd = getenv("ZEV_FAULTS_PEER_FD");
    if (ep && fd)
        peer_main(ep, atoi(fd)); /* never returns */
}

static pid_t spawn_peer(const char *ep, int fd)
{
    /* Everything the child needs is made before the fork: between fork and
     * exec only async-signal-safe calls. */
    static char env_ep[300], env_fd[64], exe[4096];
    snprintf(env_ep, sizeof env_ep, "ZEV_FAULTS_PEER=%s", ep);
    snprintf(env_fd, sizeof env_fd, "ZEV_FAULTS_PEER_FD=%d", fd);
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    cr_assert_gt(n, 0);
    exe[n] = 0;
    char *argv[] = {exe, NULL};
    char *envp[] = {env_ep, env_fd, NULL};
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        /* Dies with the test process, whatever happens to the test. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(6);
        execve(exe, argv, envp);
        _exit(7);
    }
    return pid;
}

/* Keeps up to `window` messages in flight between the given count and the
 * reported count; stops giving at `limit`. */
static void killed_pump(killed_t *k, uint64_t limit, uint64_t window)
{
    while (k->given < limit && k->given - k->reported < window) {
        uint64_t seq = k->given + 1;
        errno = 0;
        int rc = zev_stream_send(k->push, &seq, sizeof seq, 0);
        if (rc != 0) {
            cr_assert_eq(errno, EAGAIN, "send: %s", zmq_strerror(errno));
            break;
        }
        cr_assert_eq(zev_stream_send_seq(k->push), seq);
        k->given++;
    }
}

static void killed_run_until(killed_t *k, const uint64_t *count, uint64_t target, uint64_t limit)
{
    uint64_t end = test_ms() + 20000;
    while (*count < target) {
        cr_assert(test_ms() < end, "watchdog: %lu of %lu (given %lu, reported %zu)",
                  (unsigned long)*count, (unsigned long)target, (unsigned long)k->given,
                  k->reported);
        killed_pump(k, limit, 256);
        errno = 0;
        cr_assert_geq(zev_loop_run_once(k->loop, 5), 0, "run_once: %s", zmq_strerror(errno));
    }
}

Test(faults, tcp_peer_killed_and_restarted, .timeout = 120)
{
    void *ctx = test_ctx_new();
    zev_loop_t *loop = test_loop_new();
    void *push = test_socket(ctx, ZMQ_PUSH);
    test_set_int(push, ZMQ_SNDHWM, 64);
    char ep[256];
    test_bind_ep(push, "tcp", ep, sizeof ep);

    killed_t k = {.loop = loop, .next_seq = 1};
    k.push = test_stream_new(loop, push);
    cr_assert_eq(zev_stream_set_max_queue(k.push, 0), 0);
    cr_assert_eq(zev_stream_on_send(k.push, killed_on_send, &k), 0);
    int p[2];
    test_pipe(p);
    cr_assert_eq(fcntl(p[0], F_SETFL, O_NONBLOCK), 0);
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, killed_on_pipe, &k);
    cr_assert_not_null(io);

    pid_t pid = spawn_peer(ep, p[1]);
    killed_run_until(&k, &k.arrived[0], 2000, UINT64_MAX);
    cr_assert_eq(kill(pid, SIGKILL), 0);
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "child status %#x", st);
    /* Drain what the first child wrote before it died, then keep sending
     * with no peer for a while: libzmq refuses, the stream queues. */
    test_spin(loop, 20, 5);
    uint64_t before_restart = k.given;
    for (int i = 0; i < 50; i++) {
        killed_pump(&k, UINT64_MAX, 768); /* > the 256 that may be unreported */
        cr_assert_geq(zev_loop_run_once(loop, 2), 0);
    }
    cr_assert_gt(k.given, before_restart, "the stream took no message while the peer was down");
    k.child = 1;
    pid = spawn_peer(ep, p[1]);
    /* Traffic resumes: the second child gets a run of messages, then a
     * tail: every message given after the restart reaches it. */
    uint64_t limit = k.given + 3000;
    killed_run_until(&k, &k.last[1], limit, limit);
    cr_assert_eq(kill(pid, SIGKILL), 0);
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    killed_run_until(&k, (const uint64_t *)&k.reported, limit, limit);

    cr_assert_eq(k.bad_status, 0, "a PUSH send reported %s", zmq_strerror(k.bad_status));
    cr_assert_eq(k.reported, k.given, "statuses %zu for %lu messages", k.reported,
                 (unsigned long)k.given);
    cr_assert_eq(k.arrived_unreported, 0, "a message arrived before it was reported sent");
    cr_assert_eq(k.first[0], 1);
    cr_assert_eq(k.gaps[0], 0, "first child: holes in its run");
    cr_assert_eq(k.gaps[1], 0, "second child: holes in its run");
    cr_assert_gt(k.first[1], k.last[0], "duplicate or reordered across the restart");
    cr_assert_eq(k.last[1], k.given, "the tail after the restart did not all arrive");
    uint64_t lost = k.first[1] - k.last[0] - 1;
    cr_log_info("[%s] given %lu, first child got 1..%lu, second %lu..%lu: %lu lost at the kill",
                test_backend(), (unsigned long)k.given, (unsigned long)k.last[0],
                (unsigned long)k.first[1], (unsigned long)k.last[1], (unsigned long)lost);

    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
    test_close(push);
    cr_assert_eq(zmq_ctx_term(ctx), 0);
    test_expect_no_leaks();
}

/* -------------------------------------- context shut down with work queued */

typedef struct shut {
    size_t status[4]; /* 0, ETERM, ECANCELED, other */
    size_t recv_b;
    size_t frames_reported;
    atomic_int freed; /* zero-copy buffers freed */
    size_t trackers_done;
    zev_frame_t *kept[64];
    size_t nkept;
    int closed;
} shut_t;

static void shut_on_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    shut_t *t = arg;
    t->status[status == 0 ? 0 : status == ETERM ? 1 : status == ECANCELED ? 2 : 3]++;
}

static void shut_keep(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    shut_t *t = arg;
    cr_assert_lt(t->nkept, 64);
    zev_frame_t *f = zev_msg_keep(m, 0);
    cr_assert_not_null(f);
    t->kept[t->nkept++] = f;
}

static void shut_frame(zev_stream_t *s, size_t size, void *arg)
{
    (void)s;
    cr_assert_eq(size, 100);
    ((shut_t *)arg)->frames_reported++;
}

static void shut_recv_b(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    shut_t *t = arg;
    uint64_t seq;
    cr_assert_eq(zev_msg_size(m, 0), sizeof seq);
    memcpy(&seq, zev_msg_data(m, 0), sizeof seq);
    cr_assert_eq(seq, t->recv_b, "other context: %lu after %zu", (unsigned long)seq, t->recv_b);
    t->recv_b++;
}

static void shut_free(void *data, void *hint)
{
    free(data);
    atomic_fetch_add(&((shut_t *)hint)->freed, 1);
}

static void shut_tracker(zev_tracker_t *tr, void *arg)
{
    ((shut_t *)arg)->trackers_done++;
    zev_tracker_release(tr);
}

static void shut_closed(zev_stream_t *s, void *arg)
{
    (void)s;
    ((shut_t *)arg)->closed++;
}

static void *release_frames(void *arg)
{
    shut_t *t = arg;
    for (size_t i = 0; i < t->nkept; i++)
        if (zev_frame_release(t->kept[i]) != 0)
            return (void *)1;
    return NULL;
}

Test(faults, ctx_shutdown_with_work_outstanding, .timeout = 60)
{
    zev_loop_t *loop = test_loop_new();
    shut_t t = {0};
    /* Context A: a PUSH whose peer (a PULL that reads nothing) is full, so
     * sends queue in the stream; a PULL stream whose frames are kept. */
    void *a = test_ctx_new();
    void *push = test_socket(a, ZMQ_PUSH);
    void *sink = test_socket(a, ZMQ_PULL);
    test_set_int(push, ZMQ_SNDHWM, 4);
    test_set_int(sink, ZMQ_RCVHWM, 4);
    test_bind_connect(sink, push, "inproc"); /* inproc: the HWMs bound it, no kernel buffer */
    void *pull = test_socket(a, ZMQ_PULL);
    void *feeder = test_socket(a, ZMQ_PUSH);
    test_bind_connect(pull, feeder, "inproc");
    zev_stream_t *sp = test_stream_new(loop, push);
    zev_stream_t *sk = test_stream_new(loop, pull);
    cr_assert_eq(zev_stream_on_send(sp, shut_on_send, &t), 0);
    cr_assert_eq(zev_stream_on_close(sp, shut_closed, &t), 0);
    cr_assert_eq(zev_stream_on_close(sk, shut_closed, &t), 0);
    cr_assert_eq(zev_stream_set_max_queue(sp, 0), 0);
    cr_assert_eq(zev_stream_on_recv(sk, shut_keep, &t), 0);
    cr_assert_eq(zev_stream_on_frame_release(sk, shut_frame, &t), 0);

    /* Context B: a pair that must keep working throughout. */
    void *b = test_ctx_new();
    void *bpush = test_socket(b, ZMQ_PUSH);
    void *bpull = test_socket(b, ZMQ_PULL);
    test_bind_connect(bpull, bpush, "tcp");
    zev_stream_t *bs = test_stream_new(loop, bpush);
    zev_stream_t *br = test_stream_new(loop, bpull);
    cr_assert_eq(zev_stream_on_recv(br, shut_recv_b, &t), 0);

    char chunk[100];
    memset(chunk, 'k', sizeof chunk);
    for (int i = 0; i < 32; i++)
        cr_assert_eq(zmq_send(feeder, chunk, sizeof chunk, 0), (int)sizeof chunk);
    size_t given = 0, zc = 0;
    zev_tracker_t *trackers[16];
    for (int i = 0; i < 200; i++) {
        char m[64];
        memset(m, i, sizeof m);
        cr_assert_eq(zev_stream_send(sp, m, sizeof m, 0), 0);
        given++;
    }
    for (int i = 0; i < 16; i++) {
        void *buf = malloc(4096);
        memset(buf, i, 4096);
        cr_assert_eq(zev_stream_send_zc(sp, buf, 4096, shut_free, &t, &trackers[i]), 0);
        cr_assert_eq(zev_tracker_on_done(trackers[i], shut_tracker, &t), 0);
        given++;
        zc++;
    }
    uint64_t bseq = 0;
    for (int i = 0; i < 100; i++, bseq++)
        cr_assert_eq(zev_stream_send(bs, &bseq, sizeof bseq, 0), 0);
    uint64_t end = test_ms() + 10000;
    while (t.nkept < 32 || t.recv_b < 100) {
        cr_assert(test_ms() < end, "watchdog: kept %zu, b %zu", t.nkept, t.recv_b);
        cr_assert_geq(zev_loop_run_once(loop, 5), 0);
    }
    cr_assert_eq(zev_stream_sending(sp), 1, "nothing queued: the test tests nothing");

    /* The context goes away under the running loop. */
    cr_assert_eq(zmq_ctx_shutdown(a), 0);
    end = test_ms() + 10000;
    while (t.status[0] + t.status[1] + t.status[2] + t.status[3] < given) {
        cr_assert(test_ms() < end, "watchdog: %zu of %zu statuses after the shutdown",
                  t.status[0] + t.status[1] + t.status[2] + t.status[3], given);
        cr_assert_geq(zev_loop_run_once(loop, 5), 0, "run_once: %s", zmq_strerror(errno));
        /* Context B keeps flowing meanwhile. */
        errno = 0;
        cr_assert_eq(zev_stream_send(bs, &bseq, sizeof bseq, 0), 0, "b: %s", zmq_strerror(errno));
        bseq++;
    }
    cr_assert_eq(t.status[3], 0, "an unexpected status");
    cr_assert_gt(t.status[1] + t.status[2], 0, "no message was reported ETERM/ECANCELED");
    cr_log_info("[%s] after zmq_ctx_shutdown: %zu sent, %zu ETERM, %zu ECANCELED", test_backend(),
                t.status[0], t.status[1], t.status[2]);
    /* The streams of context A now refuse new work with ETERM (or are
     * closed: EBADF); none takes the message. */
    errno = 0;
    cr_assert_eq(zev_stream_send(sp, "x", 1, 0), -1);
    cr_assert(errno == ETERM || errno == EBADF, "errno %s", zmq_strerror(errno));

    /* Kept frames go back from another thread, after the shutdown. */
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, release_frames, &t), 0);
    void *res;
    cr_assert_eq(pthread_join(th, &res), 0);
    cr_assert_null(res);
    end = test_ms() + 10000;
    while (t.frames_reported < t.nkept || t.recv_b < bseq) {
        cr_assert(test_ms() < end, "watchdog: frames %zu of %zu, b %zu of %lu", t.frames_reported,
                  t.nkept, t.recv_b, (unsigned long)bseq);
        cr_assert_geq(zev_loop_run_once(loop, 5), 0);
    }
    /* Close A's streams (a stream may have closed itself on ETERM). */
    if (!zev_stream_closed(sp))
        cr_assert_eq(zev_stream_close(sp, 0), 0);
    if (!zev_stream_closed(sk))
        cr_assert_eq(zev_stream_close(sk, 0), 0);
    test_run_until(loop, &t.closed, 5000);
    while (t.closed < 2)
        cr_assert_geq(zev_loop_run_once(loop, 5), 0);
    test_close(push);
    test_close(sink);
    test_close(pull);
    test_close(feeder);
    cr_assert_eq(zmq_ctx_term(a), 0);
    /* Every zero-copy buffer freed, every tracker completed, once. */
    end = test_ms() + 5000;
    while (t.trackers_done < zc) {
        cr_assert(test_ms() < end, "watchdog: trackers %zu of %zu", t.trackers_done, zc);
        cr_assert_geq(zev_loop_run_once(loop, 5), 0);
    }
    cr_assert_eq(atomic_load(&t.freed), (int)zc);
    cr_assert_eq(t.trackers_done, zc);
    cr_assert_eq(t.frames_reported, t.nkept);
    /* B still works after A is gone. */
    size_t want = t.recv_b + 10;
    for (int i = 0; i < 10; i++, bseq++)
        cr_assert_eq(zev_stream_send(bs, &bseq, sizeof bseq, 0), 0);
    test_run_until_count(loop, &t.recv_b, want, 5000);

    zev_loop_destroy(loop);
    test_close(bpush);
    test_close(bpull);
    cr_assert_eq(zmq_ctx_term(b), 0);
    test_expect_no_leaks();
}

/* ------------------------------------------------------------ signal storm */

static atomic_ulong storm_handled;

static void storm_handler(int sig)
{
    (void)sig;
    atomic_fetch_add_explicit(&storm_handled, 1, memory_order_relaxed);
}

typedef struct storm {
    pthread_t target;
    atomic_int stop;
    unsigned long sent;
} storm_t;

static void *storm_main(void *arg)
{
    storm_t *s = arg;
    while (!atomic_load(&s->stop)) {
        /* Bursts: ~20 signals, then a short pause (a spinning sender would
         * starve the loop thread on a 2-core machine). */
        for (int i = 0; i < 20; i++) {
            if (pthread_kill(s->target, SIGRTMIN) == 0)
                s->sent++;
        }
        struct timespec ts = {0, 500000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

typedef struct storm_rx {
    uint64_t next;
    size_t ok;
    int bad_status;
    int ticks;
} storm_rx_t;

static void storm_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    storm_rx_t *r = arg;
    uint64_t seq;
    cr_assert_eq(zev_msg_size(m, 0), sizeof seq);
    memcpy(&seq, zev_msg_data(m, 0), sizeof seq);
    cr_assert_eq(seq, r->next, "got %lu, expected %lu", (unsigned long)seq, (unsigned long)r->next);
    r->next++;
}

static void storm_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    storm_rx_t *r = arg;
    if (status == 0)
        r->ok++;
    else if (!r->bad_status)
        r->bad_status = status;
}

static void storm_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    ((storm_rx_t *)arg)->ticks++;
}

Test(faults, signal_storm, .timeout = 120)
{
    struct sigaction sa = {.sa_handler = storm_handler}, old;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: every blocking call sees EINTR */
    cr_assert_eq(sigaction(SIGRTMIN, &sa, &old), 0);

    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "tcp");
    test_set_int(p.b, ZMQ_SNDHWM, 100);
    zev_stream_t *rx = test_stream_new(p.loop, p.a);
    zev_stream_t *tx = test_stream_new(p.loop, p.b);
    storm_rx_t r = {0};
    cr_assert_eq(zev_stream_on_recv(rx, storm_recv, &r), 0);
    cr_assert_eq(zev_stream_on_send(tx, storm_send, &r), 0);
    cr_assert_eq(zev_stream_set_max_queue(tx, 0), 0);
    zev_timer_t *tick = zev_timer_start(p.loop, 1000, 1000, storm_tick, &r);
    cr_assert_not_null(tick);

    storm_t s = {.target = pthread_self()};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, storm_main, &s), 0);
    uint64_t t0 = test_ms();
    uint64_t given = 0;
    uint64_t end = t0 + 60000;
    /* Two seconds of rounds: a burst of sends, the loop until they all
     * arrived, then blocking waits with nothing to do but the timer: the
     * storm hits the sends, the dispatch and the wait. */
    while (test_ms() - t0 < 2000) {
        for (int i = 0; i < 200; i++) {
            errno = 0;
            int rc = zev_stream_send(tx, &given, sizeof given, 0);
            cr_assert_eq(rc, 0, "send: %s", zmq_strerror(errno));
            given++;
        }
        while (r.next < given) {
            if (test_ms() >= end) {
                /* A flush finds what the loop did not: messages waiting
                 * here mean a wakeup (a ZMQ_FD edge) was lost to EINTR. */
                size_t before = (size_t)r.next, ok_before = r.ok;
                zev_stream_stats_t st;
                cr_assert_eq(zev_stream_stats(tx, &st), 0);
                int sent = zev_stream_flush(tx, ZEV_WRITE, 0);
                test_sleep_ms(100);
                int got = zev_stream_flush(rx, ZEV_READ, 0);
                cr_assert_fail("watchdog: %lu of %lu received, %zu statuses 0, %zu queued in "
                               "the sender, %lu signals; flushing the sender then handed %d "
                               "(%zu more statuses 0), the receiver then got %d",
                               (unsigned long)before, (unsigned long)given, ok_before,
                               (size_t)st.queued_msgs, atomic_load(&storm_handled), sent,
                               r.ok - ok_before, got);
            }
            errno = 0;
            int rc = zev_loop_run_once(p.loop, 20);
            cr_assert_geq(rc, 0, "run_once: %s", zmq_strerror(errno));
        }
        for (int i = 0; i < 2; i++) {
            errno = 0;
            cr_assert_geq(zev_loop_run_once(p.loop, 2), 0, "idle run_once: %s",
                          zmq_strerror(errno));
        }
    }
    const uint64_t total = given;
    atomic_store(&s.stop, 1);
    cr_assert_eq(pthread_join(th, NULL), 0);
    uint64_t ms = test_ms() - t0;
    test_spin(p.loop, 5, 1);

    cr_assert_eq(r.bad_status, 0, "on_send reported %s", zmq_strerror(r.bad_status));
    cr_assert_eq(r.ok, total);
    cr_assert_eq(r.next, total);
    cr_assert_gt(r.ticks, 0);
    unsigned long handled = atomic_load(&storm_handled);
    cr_assert_gt(handled, 1000, "the storm delivered only %lu signals", handled);
    cr_assert_leq(handled, s.sent);
    cr_log_info("[%s] signal storm: %lu signals sent, %lu handled in %lu ms (%.1f kHz), %lu "
                "messages",
                test_backend(), s.sent, handled, (unsigned long)ms,
                ms ? (double)s.sent / (double)ms : 0.0, (unsigned long)total);
    cr_assert_eq(zev_timer_cancel(tick), 0);
    cr_assert_eq(test_pair_close(&p), 0);
    cr_assert_eq(sigaction(SIGRTMIN, &old, NULL), 0);
    test_expect_no_leaks();
}

/* ---------------------------------------------------- descriptor exhaustion */

/* Checks in the child: a message on stderr and a distinct exit status. */
#define CHILD_CHECK(cond, ...)                                                                     \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "line %d: ", __LINE__);                                                \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            _exit(1);                                                                              \
        }                                                                                          \
    } while (0)

static size_t emfile_recv;

static void emfile_on_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (void)arg;
    emfile_recv++;
}

static void emfile_on_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    (void)fd;
    (void)events;
    (*(int *)arg)++;
}

static void emfile_child(void)
{
    const char *be = test_backend();
    zev_loop_opts_t opts = {.backend = be};
    void *ctx = zmq_ctx_new();
    CHILD_CHECK(ctx, "zmq_ctx_new");
    void *pull = zmq_socket(ctx, ZMQ_PULL);
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    CHILD_CHECK(pull && push, "sockets");
    CHILD_CHECK(zmq_bind(pull, "inproc://emfile") == 0, "bind");
    CHILD_CHECK(zmq_connect(push, "inproc://emfile") == 0, "connect");
    zev_loop_t *loop = zev_loop_new(&opts);
    CHILD_CHECK(loop, "first loop: %s", strerror(errno));
    int watched[2];
    CHILD_CHECK(pipe(watched) == 0, "pipe");

    /* Lower the limit, then take every descriptor left. */
    struct rlimit rl = {128, 128};
    CHILD_CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0, "setrlimit: %s", strerror(errno));
    int hog[128];
    int nhog = 0;
    for (;;) {
        int fd = dup(0);
        if (fd < 0) {
            CHILD_CHECK(errno == EMFILE, "dup: %s", strerror(errno));
            break;
        }
        CHILD_CHECK(nhog < 128, "more than 128 descriptors");
        hog[nhog++] = fd;
    }
    CHILD_CHECK(nhog > 0, "no descriptor to take: lower the limit");

    /* Each call fails with EMFILE or succeeds, never half. */
    errno = 0;
    zev_loop_t *l2 = zev_loop_new(&opts);
    CHILD_CHECK(!l2 && errno == EMFILE, "zev_loop_new without fds: %p, %s", (void *)l2,
                strerror(errno));
    errno = 0;
    zev_stream_t *s = zev_stream_new(loop, pull);
    int stream_failed = !s;
    CHILD_CHECK(s || errno == EMFILE, "zev_stream_new without fds: %s", strerror(errno));
    int fired = 0;
    errno = 0;
    zev_io_t *io = zev_io_start(loop, watched[0], ZEV_READ, emfile_on_io, &fired);
    CHILD_CHECK(io || errno == EMFILE, "zev_io_start without fds: %s", strerror(errno));
    errno = 0;
    int lfd = zev_loop_fd(loop);
    CHILD_CHECK(lfd >= 0 || errno == EMFILE, "zev_loop_fd without fds: %d, %s", lfd,
                strerror(errno));
    errno = 0;
    int rc = zev_loop_run_once(loop, 0);
    CHILD_CHECK(rc >= 0, "run_once without fds: %s", strerror(errno));
    fprintf(stderr, "EMFILE: loop_new failed; stream_new %s, io_start %s, loop_fd %s\n",
            s ? "ok" : "EMFILE", io ? "ok" : "EMFILE", lfd >= 0 ? "ok" : "EMFILE");

    /* Descriptors come back: everything works, nothing left half made
     * (a half-registered stream or watcher would say EEXIST now). */
    while (nhog > 0)
        close(hog[--nhog]);
    l2 = zev_loop_new(&opts);
    CHILD_CHECK(l2, "zev_loop_new after: %s", strerror(errno));
    CHILD_CHECK(zev_loop_destroy(l2) == 0, "destroy");
    if (stream_failed) {
        s = zev_stream_new(loop, pull);
        CHILD_CHECK(s, "zev_stream_new after: %s", strerror(errno));
    }
    if (!io) {
        io = zev_io_start(loop, watched[0], ZEV_READ, emfile_on_io, &fired);
        CHILD_CHECK(io, "zev_io_start after: %s", strerror(errno));
    }
    if (lfd < 0) {
        lfd = zev_loop_fd(loop);
        CHILD_CHECK(lfd >= 0, "zev_loop_fd after: %s", strerror(errno));
    }
    CHILD_CHECK(zev_stream_on_recv(s, emfile_on_recv, NULL) == 0, "on_recv");
    for (uint64_t i = 0; i < 10; i++)
        CHILD_CHECK(zmq_send(push, &i, sizeof i, 0) == (int)sizeof i, "zmq_send");
    CHILD_CHECK(write(watched[1], "x", 1) == 1, "write");
    uint64_t end = test_ms() + 5000;
    while (emfile_recv < 10 || !fired) {
        CHILD_CHECK(test_ms() < end, "watchdog: %zu received, io %d", emfile_recv, fired);
        CHILD_CHECK(zev_loop_run_once(loop, 10) >= 0, "run_once: %s", strerror(errno));
    }
    CHILD_CHECK(zev_io_stop(io) == 0, "io_stop");
    zev_loop_destroy(loop);
    test_close(push);
    test_close(pull);
    CHILD_CHECK(zmq_ctx_term(ctx) == 0, "ctx_term");
    close(watched[0]);
    close(watched[1]);
}

Test(faults, descriptor_exhaustion, .timeout = 60)
{
    if (getenv("ZEV_VALGRIND")) /* tests/run valgrind */
        cr_skip_test("valgrind refuses to lower RLIMIT_NOFILE (it keeps descriptors above it)");
    test_child_t r;
    test_run_child(emfile_child, &r);
    cr_assert(WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0, "child status %#x: %s", r.status,
              r.err);
    cr_assert(strstr(r.err, "EMFILE: loop_new failed"), "child said: %s", r.err);
    cr_log_info("[%s] %s", test_backend(), r.err);
}
