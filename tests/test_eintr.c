/*
 * EINTR inside libzmq, after it took the ZMQ_FD edge (the signal storm's rare
 * stall, faults::signal_storm), on every backend and transport.
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
 */
#include "common.h"

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

static int (*real_poll)(struct pollfd *, nfds_t, int);
static _Atomic(pthread_t) inject_on; /* the loop thread */
static atomic_int inject_every; /* 0: off */
static atomic_ulong inject_seen, injected;

__attribute__((constructor)) static void find_real_poll(void)
{
    void *fn = dlsym(RTLD_NEXT, "poll");
    memcpy(&real_poll, &fn, sizeof fn); /* POSIX: a data pointer to a function */
}

static int from_libzmq(const void *ret)
{
    Dl_info info;
    return dladdr(ret, &info) && info.dli_fname && strstr(info.dli_fname, "libzmq");
}

int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    int rc = real_poll(fds, n, timeout);
    int every = atomic_load(&inject_every);
    if (rc == 0 && every && n == 1 && timeout == 0 && pthread_equal(pthread_self(), atomic_load(&inject_on)) &&
        from_libzmq(__builtin_return_address(0)) &&
        atomic_fetch_add(&inject_seen, 1) % (unsigned long)every == (unsigned long)every - 1) {
        atomic_fetch_add(&injected, 1);
        errno = EINTR;
        return -1;
    }
    return rc;
}

static void inject(int every)
{
    atomic_store(&inject_on, pthread_self());
    atomic_store(&inject_seen, 0);
    atomic_store(&injected, 0);
    atomic_store(&inject_every, every);
}

#define MSGS 20000
#define HWM 50

TestSuite(eintr, .timeout = 120);

/* ------------------------------------------------ POLLIN: the loop receives */

typedef struct peer {
    void *ctx;
    char ep[256];
    int type;
    int failed; /* errno of a failed call */
    atomic_int finish; /* the test has counted: the PUSH may go */
} peer_t;

/* A raw PUSH on its own thread sending MSGS sequence numbers, blocking. */
static void *push_main(void *arg)
{
    peer_t *p = arg;
    void *push = zmq_socket(p->ctx, ZMQ_PUSH);
    int hwm = HWM, linger = 0;
    zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(push, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(push, p->ep) != 0)
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

    inject(every);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, push_main, &peer), 0);
    uint64_t end = test_ms() + 20000;
    while (r.next < MSGS && test_ms() < end) {
        errno = 0;
        cr_assert_geq(zev_loop_run_once(p.loop, 50), 0, "run_once: %s", zmq_strerror(errno));
    }
    unsigned long hits = atomic_load(&injected);
    inject(0);
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

/* A raw PULL on its own thread receiving MSGS messages, blocking. */
typedef struct sink {
    void *ctx;
    char ep[256];
    atomic_ulong got;
    int disorder;
} sink_t;

static void *pull_main(void *arg)
{
    sink_t *k = arg;
    void *pull = zmq_socket(k->ctx, ZMQ_PULL);
    int hwm = HWM, linger = 0;
    zmq_setsockopt(pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(pull, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(pull, k->ep) != 0) {
        zmq_close(pull);
        return NULL;
    }
    uint64_t seq;
    while (atomic_load(&k->got) < MSGS) {
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

static void loop_sends(const char *transport, int every)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, TEST_NO_SOCKET, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, HWM);
    sink_t k = {.ctx = p.ctx};
    test_bind_ep(p.a, transport, k.ep, sizeof k.ep);
    zev_stream_t *tx = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_queue(tx, 0), 0);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, pull_main, &k), 0);
    inject(every);
    for (uint64_t seq = 0; seq < MSGS; seq++)
        cr_assert_eq(zev_stream_send(tx, &seq, sizeof seq, 0), 0, "send: %s",
                     zmq_strerror(errno));
    uint64_t end = test_ms() + 20000;
    while (atomic_load(&k.got) < MSGS && test_ms() < end) {
        errno = 0;
        cr_assert_geq(zev_loop_run_once(p.loop, 50), 0, "run_once: %s", zmq_strerror(errno));
    }
    unsigned long hits = atomic_load(&injected);
    inject(0);
    unsigned long got = atomic_load(&k.got);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(tx, &st), 0);
    int more = got < MSGS ? zev_stream_flush(tx, ZEV_WRITE, 0) : 0;
    zmq_ctx_shutdown(p.ctx); /* a sink still waiting gets ETERM */
    cr_assert_eq(pthread_join(th, NULL), 0);

    cr_expect_eq(got, MSGS,
                 "[%s %s, EINTR every %d] the loop stalled: %lu of %d delivered in 20 s, %zu "
                 "still queued in the stream, %lu EINTRs injected; a flush then handed %d",
                 test_backend(), transport, every, got, MSGS, (size_t)st.queued_msgs, hits, more);
    cr_expect_eq(k.disorder, 0);
    cr_expect_gt(hits, 0, "no EINTR was injected: the test tested nothing");
    cr_log_info("[%s %s] loop sends, EINTR every %d: %lu injected", test_backend(), transport,
                every, hits);
    test_pair_close(&p);
}

Test(eintr, loop_sends_inproc)
{
    loop_sends("inproc", 3);
}

Test(eintr, loop_sends_ipc)
{
    loop_sends("ipc", 3);
}

Test(eintr, loop_sends_tcp)
{
    loop_sends("tcp", 3);
}
