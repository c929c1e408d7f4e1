/*
 * EINTR inside libzmq (the signal storm's rare stall, faults::signal_storm),
 * on every backend and transport.
 *
 * libzmq's ZMQ_EVENTS (and its send and recv) first processes the socket's
 * pending commands: it reads the mailbox's eventfd, which is ZMQ_FD, so the
 * edge is gone, and runs each command (activate_read, activate_write). It
 * then polls the mailbox once more with a zero timeout to see whether more
 * came. A signal pending during that poll makes it fail with EINTR, and
 * ZMQ_EVENTS returns -1/EINTR although it consumed the edge and changed the
 * socket's state. A stream that took that EINTR for "nothing happened" and
 * went back to waiting on ZMQ_FD would wait for an edge that never comes.
 *
 * Real signals hit that window about once in tens of thousands of calls, so
 * this program makes it certain: it interposes poll() and fails every
 * `every`-th zero-timeout, one-descriptor poll that libzmq makes on the
 * loop thread and that finds nothing ready, with EINTR (the kernel returns
 * EINTR from poll only then: when no descriptor is ready and a signal is
 * pending). libzmq, its sockets and transports are real.
 *
 * - loop_sends_*: five rounds of 20,000 messages, each with its own
 *   policy (inject_mode): EINTR inside ZMQ_EVENTS only (zmq_getsockopt is
 *   interposed too, to know), anywhere, or right after a look that found
 *   the signal. The sending stream asks ZMQ_EVENTS after HWM refusals; a
 *   stall there is what the signal storm met. Which round stalls without
 *   the fix varies with the timing; that one does, nearly always.
 * - loop_receives_*: every such poll, which on a receiving stream means
 *   inside zmq_msg_recv (the pass receives first and a dry receive ends
 *   it: it hardly asks ZMQ_EVENTS): EINTR there is retried, nothing lost.
 * - connect_and_bind_never_say_eintr: the same for zev_stream_connect and
 *   its kind, which libzmq begins with a look at the mailbox.
 * - forked_child_does_not_spin, a_child_loop_on_the_parents_socket_...:
 *   in a forked child libzmq says EINTR for ever on the parent's sockets;
 *   retrying must not spin there, whoever made the loop.
 */
#include "common.h"

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int (*real_poll)(struct pollfd *, nfds_t, int);
static int (*real_getsockopt)(void *, int, void *, size_t *);
static _Atomic(pthread_t) inject_on; /* the loop thread */
/* Which looks at the mailbox fail with EINTR (libzmq's zero-timeout polls
 * on the loop thread):
 *   INJ_ANY         every `every`-th that finds nothing;
 *   INJ_EVENTS      the same, inside ZMQ_EVENTS only;
 *   INJ_AFTER_SIGNAL inside ZMQ_EVENTS, every look that follows one that
 *                   found the signal (the edge is gone, the commands ran). */
enum { INJ_OFF, INJ_ANY, INJ_EVENTS, INJ_AFTER_SIGNAL };
static const char *const inj_names[] = {"off", "any", "events", "after_signal"};
static atomic_int inject_mode, inject_every;
static atomic_ulong inject_seen, injected;
static _Thread_local int in_events; /* inside ZMQ_EVENTS: 1, 2 after a look found the signal */

__attribute__((constructor)) static void find_real_calls(void)
{
    void *fn = dlsym(RTLD_NEXT, "poll");
    memcpy(&real_poll, &fn, sizeof fn); /* POSIX: a data pointer to a function */
    fn = dlsym(RTLD_NEXT, "zmq_getsockopt");
    memcpy(&real_getsockopt, &fn, sizeof fn);
}

static int from_libzmq(const void *ret)
{
    Dl_info info;
    return dladdr(ret, &info) && info.dli_fname && strstr(info.dli_fname, "libzmq");
}

int zmq_getsockopt(void *sock, int option, void *value, size_t *len)
{
    in_events = option == ZMQ_EVENTS;
    int rc = real_getsockopt(sock, option, value, len);
    in_events = 0;
    return rc;
}

int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    int rc = real_poll(fds, n, timeout);
    int mode = atomic_load(&inject_mode);
    if (mode == INJ_OFF || n != 1 || timeout != 0 ||
        !pthread_equal(pthread_self(), atomic_load(&inject_on)) ||
        !from_libzmq(__builtin_return_address(0)))
        return rc;
    bool hit = false;
    if (mode == INJ_AFTER_SIGNAL) {
        hit = in_events == 2 && rc == 0;
        in_events = in_events && rc > 0 ? 2 : in_events == 2 ? 1 : in_events;
    } else if (rc == 0 && (mode == INJ_ANY || in_events)) {
        unsigned long every = (unsigned long)atomic_load(&inject_every);
        hit = atomic_fetch_add(&inject_seen, 1) % every == every - 1;
    }
    if (!hit)
        return rc;
    atomic_fetch_add(&injected, 1);
    errno = EINTR;
    return -1;
}

static void inject(int mode, int every)
{
    atomic_store(&inject_mode, INJ_OFF);
    atomic_store(&inject_on, pthread_self());
    atomic_store(&inject_seen, 0);
    atomic_store(&injected, 0);
    atomic_store(&inject_every, every > 0 ? every : 1);
    atomic_store(&inject_mode, mode);
}

#define MSGS 20000
#define HWM 50

TestSuite(eintr, .timeout = 120);

/* ------------------------------------------------ POLLIN: the loop receives */

typedef struct peer {
    void *ctx;
    char ep[256];
    int failed; /* errno of a failed call */
    atomic_int finish; /* the test has counted: the PUSH may go */
} peer_t;

/* A raw PUSH or PULL for a thread of its own: its HWM (send or receive),
 * linger 0, connected to ep. NULL with errno if the connect failed. */
static void *peer_socket(void *ctx, int type, const char *ep)
{
    void *sock = zmq_socket(ctx, type);
    int hwm = HWM, linger = 0;
    zmq_setsockopt(sock, type == ZMQ_PUSH ? ZMQ_SNDHWM : ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(sock, ep) != 0) {
        int err = errno;
        zmq_close(sock);
        errno = err;
        return NULL;
    }
    return sock;
}

/* A raw PUSH on its own thread sending MSGS sequence numbers, blocking. */
static void *push_main(void *arg)
{
    peer_t *p = arg;
    void *push = peer_socket(p->ctx, ZMQ_PUSH, p->ep);
    if (!push)
        p->failed = errno;
    for (uint64_t seq = 0; seq < MSGS && !p->failed; seq++)
        while (zmq_send(push, &seq, sizeof seq, 0) != (int)sizeof seq)
            if (errno != EINTR) {
                p->failed = errno; /* ETERM at the context's end: the test fails on counts */
                break;
            }
    /* Closed with linger 0 only once the test has counted: a close now
     * would drop what libzmq still holds on its way. */
    while (!atomic_load(&p->finish))
        test_sleep_ms(1);
    if (push)
        zmq_close(push);
    return NULL;
}

typedef struct rx {
    uint64_t next;
    int disorder;
} rx_t;

static void on_seq(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    rx_t *r = arg;
    uint64_t seq;
    if (zev_msg_size(m, 0) != sizeof seq) {
        r->disorder++;
        return;
    }
    memcpy(&seq, zev_msg_data(m, 0), sizeof seq);
    if (seq != r->next)
        r->disorder++;
    r->next = seq + 1;
}

static void loop_receives(const char *transport, int every)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, TEST_NO_SOCKET, NULL);
    test_set_int(p.a, ZMQ_RCVHWM, HWM);
    peer_t peer = {.ctx = p.ctx};
    test_bind_ep(p.a, transport, peer.ep, sizeof peer.ep);
    zev_stream_t *rx = test_stream_new(p.loop, p.a);
    rx_t r = {0};
    cr_assert_eq(zev_stream_on_recv(rx, on_seq, &r), 0);

    inject(INJ_ANY, every);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, push_main, &peer), 0);
    uint64_t end = test_ms() + 20000;
    while (r.next < MSGS && test_ms() < end) {
        errno = 0;
        cr_assert_geq(zev_loop_run_once(p.loop, 50), 0, "run_once: %s", zmq_strerror(errno));
    }
    unsigned long hits = atomic_load(&injected);
    inject(INJ_OFF, 0);
    uint64_t got = r.next;
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(rx, &st), 0);
    int more = got < MSGS ? zev_stream_flush(rx, ZEV_READ, 0) : 0;
    atomic_store(&peer.finish, 1);
    zmq_ctx_shutdown(p.ctx); /* a stalled sender's blocking send returns ETERM */
    cr_assert_eq(pthread_join(th, NULL), 0);

    cr_expect_eq(got, MSGS,
                 "[%s %s, EINTR every %d] the loop stalled: %lu of %d received in 20 s, "
                 "%lu EINTRs injected; a flush then received %d more",
                 test_backend(), transport, every, (unsigned long)got, MSGS, hits, more);
    cr_expect_eq(r.disorder, 0);
    cr_expect_gt(hits, 0, "no EINTR was injected: the test tested nothing");
    cr_log_info("[%s %s] loop receives, EINTR every %d: %lu injected, %lu msgs", test_backend(),
                transport, every, hits, (unsigned long)st.msgs_in);
    test_pair_close(&p);
}

Test(eintr, loop_receives_inproc)
{
    loop_receives("inproc", 3);
}

Test(eintr, loop_receives_ipc)
{
    loop_receives("ipc", 3);
}

Test(eintr, loop_receives_tcp)
{
    loop_receives("tcp", 3);
}

/* ------------------------------------------------- POLLOUT: the loop sends */

/* The rounds of loop_sends: each policy in turn, MSGS messages each. */
static const int send_rounds[][2] = {{INJ_EVENTS, 2}, {INJ_EVENTS, 3}, {INJ_ANY, 2},
                                     {INJ_ANY, 3},    {INJ_AFTER_SIGNAL, 1}};
#define ROUNDS (sizeof send_rounds / sizeof send_rounds[0])

/* A raw PULL on its own thread receiving ROUNDS x MSGS messages, blocking. */
typedef struct sink {
    void *ctx;
    char ep[256];
    atomic_ulong got;
    int disorder;
} sink_t;

static void *pull_main(void *arg)
{
    sink_t *k = arg;
    void *pull = peer_socket(k->ctx, ZMQ_PULL, k->ep);
    if (!pull)
        return NULL; /* the test fails on the count */
    uint64_t seq;
    while (atomic_load(&k->got) < ROUNDS * MSGS) {
        int n = zmq_recv(pull, &seq, sizeof seq, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break; /* ETERM */
        if (n != (int)sizeof seq || seq != atomic_load(&k->got))
            k->disorder++;
        atomic_fetch_add(&k->got, 1);
    }
    zmq_close(pull);
    return NULL;
}

/* Without the retry, a round stalls (which one varies with the timing):
 * the stream took ZMQ_EVENTS's EINTR for "nothing changed" and waits for
 * an edge that libzmq already took. */
static void loop_sends(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, TEST_NO_SOCKET, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, HWM);
    sink_t k = {.ctx = p.ctx};
    test_bind_ep(p.a, transport, k.ep, sizeof k.ep);
    zev_stream_t *tx = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_queue(tx, 0), 0);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, pull_main, &k), 0);
    uint64_t seq = 0;
    unsigned long got = 0, hits[ROUNDS] = {0};
    size_t round = 0;
    for (; round < ROUNDS; round++) {
        inject(send_rounds[round][0], send_rounds[round][1]);
        for (size_t i = 0; i < MSGS; i++, seq++)
            cr_assert_eq(zev_stream_send(tx, &seq, sizeof seq, 0), 0, "send: %s",
                         zmq_strerror(errno));
        uint64_t end = test_ms() + 20000;
        while (atomic_load(&k.got) < seq && test_ms() < end) {
            errno = 0;
            cr_assert_geq(zev_loop_run_once(p.loop, 50), 0, "run_once: %s", zmq_strerror(errno));
        }
        hits[round] = atomic_load(&injected);
        inject(INJ_OFF, 0);
        got = atomic_load(&k.got);
        if (got < seq)
            break; /* stalled */
    }
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(tx, &st), 0);
    int more = got < seq ? zev_stream_flush(tx, ZEV_WRITE, 0) : 0;
    zmq_ctx_shutdown(p.ctx); /* a sink still waiting gets ETERM */
    cr_assert_eq(pthread_join(th, NULL), 0);

    cr_expect_eq(round, ROUNDS,
                 "[%s %s, EINTR %s every %d] the loop stalled: %lu of %lu delivered in 20 s, "
                 "%zu still queued in the stream, %lu EINTRs injected; a flush then handed %d",
                 test_backend(), transport, inj_names[send_rounds[round % ROUNDS][0]],
                 send_rounds[round % ROUNDS][1], got, (unsigned long)seq, (size_t)st.queued_msgs,
                 hits[round % ROUNDS], more);
    cr_expect_eq(k.disorder, 0);
    for (size_t r = 0; r < round; r++)
        cr_expect_gt(hits[r], 0, "round %zu (%s): no EINTR was injected", r,
                     inj_names[send_rounds[r][0]]);
    cr_log_info("[%s %s] loop sends: EINTRs injected %lu (events/2) %lu (events/3) %lu (any/2) "
                "%lu (any/3) %lu (after a signal)",
                test_backend(), transport, hits[0], hits[1], hits[2], hits[3], hits[4]);
    test_pair_close(&p);
}

Test(eintr, loop_sends_inproc)
{
    loop_sends("inproc");
}

Test(eintr, loop_sends_ipc)
{
    loop_sends("ipc");
}

Test(eintr, loop_sends_tcp)
{
    loop_sends("tcp");
}

/* ------------------------------------------- connect, bind and their undoing */

/* libzmq's zmq_connect, zmq_bind, zmq_disconnect and zmq_unbind look at the
 * socket's mailbox first and return that look's EINTR having done nothing
 * else: zev makes the call again, and its caller never sees EINTR. */
Test(eintr, connect_and_bind_never_say_eintr)
{
    test_pair_t p = test_pair_open(ZMQ_DEALER, TEST_NO_SOCKET, NULL);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    inject(INJ_ANY, 2);
    int failed = 0, calls = 0;
    for (int i = 0; i < 100; i++) {
        char ep[64];
        snprintf(ep, sizeof ep, "inproc://eintr-%d", i);
        int rc[4];
        rc[0] = zev_stream_bind(s, ep);
        rc[1] = zev_stream_unbind(s, ep);
        rc[2] = zev_stream_connect(s, "tcp://127.0.0.1:1"); /* asynchronous: never refused */
        rc[3] = zev_stream_disconnect(s, "tcp://127.0.0.1:1");
        for (int k = 0; k < 4; k++, calls++)
            if (rc[k] != 0 && !failed++)
                cr_log_error("call %d of round %d: %s", k, i, zmq_strerror(errno));
    }
    unsigned long hits = atomic_load(&injected);
    inject(INJ_OFF, 0);
    cr_expect_eq(failed, 0, "%d of %d calls failed", failed, calls);
    cr_expect_gt(hits, 0, "no EINTR was injected: the test tested nothing");
    cr_assert_eq(test_pair_close(&p), 0);
}

/* ------------------------------------------------------------ forked child */

/* In a forked child libzmq's signaler fails every wait with EINTR (it
 * checks its pid), so ZMQ_EVENTS says EINTR for ever there. zev forbids
 * using the loop in a child (only zev_loop_destroy), but a child that does
 * anyway must get its call back, not spin in the retry. */
/* Runs fn in a forked child, which arms alarm(5) first: it must return,
 * not spin on libzmq's EINTR until SIGALRM. */
static void expect_child_returns(void (*fn)(void))
{
    test_child_t r;
    test_run_child(fn, &r);
    cr_expect(!(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGALRM),
              "the child spun on libzmq's EINTR until SIGALRM");
    cr_expect(WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0, "child status %d: %s", r.status,
              r.err);
}

static zev_loop_t *fork_loop;
static zev_stream_t *fork_stream;

static void child_runs_the_loop(void)
{
    alarm(5); /* a spin dies of SIGALRM */
    (void)zev_stream_send(fork_stream, "x", 1, 0); /* asks ZMQ_EVENTS after libzmq's refusal */
    (void)zev_loop_run_once(fork_loop, 0);
    (void)zev_loop_run_once(fork_loop, 0);
    (void)zev_stream_connect(fork_stream, "inproc://eintr-fork"); /* retried on EINTR too */
    alarm(0);
}

static void on_any(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (void)arg;
}

/* The same with a loop made in the child around the parent's socket (a
 * daemon that forks after making its sockets, then starts its loop): the
 * loop's pid is the child's, libzmq's signaler still the parent's. */
static void *parent_socket;

static void child_makes_a_loop(void)
{
    alarm(5);
    zev_loop_t *loop = zev_loop_new(NULL);
    zev_stream_t *s = loop ? zev_stream_new(loop, parent_socket) : NULL;
    if (s) {
        (void)zev_stream_connect(s, "inproc://eintr-child");
        (void)zev_stream_send(s, "x", 1, 0);
        (void)zev_loop_run_once(loop, 0);
    }
    alarm(0);
    /* no destroy: it would close what is the parent's */
}

Test(eintr, a_child_loop_on_the_parents_socket_does_not_spin)
{
    test_pair_t p = test_pair_open(ZMQ_DEALER, ZMQ_DEALER, "inproc");
    parent_socket = p.a;
    expect_child_returns(child_makes_a_loop);
    cr_assert_eq(test_pair_close(&p), 0);
}

Test(eintr, forked_child_does_not_spin)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, "inproc");
    fork_loop = p.loop;
    fork_stream = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(fork_stream, on_any, NULL), 0);
    cr_assert_eq(zev_stream_set_max_queue(fork_stream, 0), 0);
    test_spin(p.loop, 3, 1);
    expect_child_returns(child_runs_the_loop);
    cr_assert_eq(test_pair_close(&p), 0);
}
