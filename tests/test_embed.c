/*
 * Embedding zev in a host loop through zev_loop_fd and zev_loop_timeout.
 *
 * The host blocks on zev_loop_fd and calls zev_loop_run_once(loop, 0) when
 * it is readable. Between those calls the host's own code may use zev: send
 * on a stream, create one, set on_recv, close one, raise max_frames. Each
 * of those can make work for the next iteration without any fd becoming
 * readable (a send consumes the ZMQ_FD edge of a message that just arrived;
 * a new stream's pending inproc message signals nothing). The fd must then
 * become readable anyway, or the host sleeps on a loop that has work: a
 * missed wakeup. Every test checks both halves of the contract: readable
 * while zev_loop_timeout says 0, and idle (not readable) once the work is
 * done.
 */
#include "common.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

TestSuite(embed, .timeout = 30);

typedef struct counts {
    int msgs;
    int closes;
    zev_frame_t *kept;
    char last[16];
} counts_t;

static void count_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    counts_t *c = arg;
    c->msgs++;
    size_t n = zev_msg_size(m, 0);
    n = n < sizeof c->last - 1 ? n : sizeof c->last - 1;
    memcpy(c->last, zev_msg_data(m, 0), n);
    c->last[n] = '\0';
}

static void keep_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    counts_t *c = arg;
    count_msg(s, m, arg);
    c->kept = zev_msg_keep(m, 0);
    cr_assert_not_null(c->kept);
}

static void count_close(zev_stream_t *s, void *arg)
{
    (void)s;
    ((counts_t *)arg)->closes++;
}

/* Runs iterations the way a host would (while the fd is readable or the
 * loop says it has work) until the loop is idle, then checks that both
 * agree. */
static void settle_at(zev_loop_t *loop, int fd, int line)
{
    for (int i = 0; i < 1000 && (zev_loop_timeout(loop) == 0 || test_readable(fd, 0)); i++)
        cr_assert_geq(zev_loop_run_once(loop, 0), 0, "run_once: %s", zmq_strerror(errno));
    cr_assert_neq(zev_loop_timeout(loop), 0, "line %d: the loop never became idle", line);
    cr_assert_eq(test_readable(fd, 0), 0, "line %d: zev_loop_fd readable while the loop is idle",
                 line);
}
#define settle(loop, fd) settle_at(loop, fd, __LINE__)

/* The contract after host code made work: the loop says so, and a host
 * blocked on the fd is woken. */
static void expect_woken(zev_loop_t *loop, int fd, const char *what)
{
    cr_assert_eq(zev_loop_timeout(loop), 0, "%s: zev_loop_timeout does not say 0", what);
    cr_assert(test_readable(fd, 1000),
              "%s: zev_loop_timeout says 0 but zev_loop_fd is not readable: missed wakeup",
              what);
}

static int embed_fd(zev_loop_t *loop)
{
    int fd = zev_loop_fd(loop);
    cr_assert_geq(fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    return fd;
}

/* A message arrives (its ZMQ_FD edge makes the fd readable); before the
 * host runs the loop, its own code sends on the stream, which makes libzmq
 * process the socket's commands and swallow the edge. */
static void host_send_after_edge(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, transport);
    int fd = embed_fd(p.loop);
    counts_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, count_msg, &c), 0);
    settle(p.loop, fd);

    cr_assert_eq(zmq_send(p.b, "ping", 4, 0), 4);
    cr_assert(test_readable(fd, 5000), "the message's edge did not make the fd readable");
    test_sleep_ms(5); /* let libzmq's command throttle pass: the send processes commands */
    cr_assert_eq(zev_stream_send(s, "host", 4, 0), 0);
    expect_woken(p.loop, fd, "send by host code after an edge");

    cr_assert_geq(zev_loop_run_once(p.loop, 0), 0);
    cr_assert_eq(c.msgs, 1);
    cr_assert_str_eq(c.last, "ping");
    char buf[8];
    cr_assert_eq(zmq_recv(p.b, buf, sizeof buf, 0), 4);
    cr_assert_eq(memcmp(buf, "host", 4), 0);
    settle(p.loop, fd);
    test_pair_close(&p);
}

Test(embed, host_send_after_edge_inproc)
{
    host_send_after_edge("inproc");
}

Test(embed, host_send_after_edge_tcp)
{
    host_send_after_edge("tcp");
}

/* A stream created by host code over a socket whose message already waits
 * (and whose commands were processed, so its ZMQ_FD is quiet). */
Test(embed, host_creates_stream_over_pending_message)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, "inproc");
    int fd = embed_fd(p.loop);
    settle(p.loop, fd);
    cr_assert_eq(zmq_send(p.b, "early", 5, 0), 5);
    int events = 0;
    size_t len = sizeof events;
    cr_assert_eq(zmq_getsockopt(p.a, ZMQ_EVENTS, &events, &len), 0);
    cr_assert(events & ZMQ_POLLIN, "the message is not there yet");

    counts_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, count_msg, &c), 0);
    expect_woken(p.loop, fd, "stream created over a pending message");
    cr_assert_geq(zev_loop_run_once(p.loop, 0), 0);
    cr_assert_eq(c.msgs, 1);
    cr_assert_str_eq(c.last, "early");
    settle(p.loop, fd);
    test_pair_close(&p);
}

/* on_recv set by host code after the loop already consumed the edge of a
 * message nobody wanted yet. */
Test(embed, host_sets_on_recv_over_pending_message)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, "inproc");
    int fd = embed_fd(p.loop);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    settle(p.loop, fd);
    cr_assert_eq(zmq_send(p.b, "waiting", 7, 0), 7);
    cr_assert(test_readable(fd, 5000));
    settle(p.loop, fd); /* reads ZMQ_EVENTS: not wanted, the edge is gone */

    counts_t c = {0};
    cr_assert_eq(zev_stream_on_recv(s, count_msg, &c), 0);
    expect_woken(p.loop, fd, "on_recv set by host code");
    cr_assert_geq(zev_loop_run_once(p.loop, 0), 0);
    cr_assert_eq(c.msgs, 1);
    cr_assert_str_eq(c.last, "waiting");
    settle(p.loop, fd);
    test_pair_close(&p);
}

/* A close by host code: its close callback is work for the next iteration. */
Test(embed, host_closes_stream)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, "inproc");
    int fd = embed_fd(p.loop);
    counts_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_close(s, count_close, &c), 0);
    settle(p.loop, fd);

    cr_assert_eq(zev_stream_close(s, 0), 0);
    expect_woken(p.loop, fd, "close by host code");
    cr_assert_eq(c.closes, 0, "the close callback runs from the loop");
    cr_assert_geq(zev_loop_run_once(p.loop, 0), 0);
    cr_assert_eq(c.closes, 1);
    settle(p.loop, fd);
    test_pair_close(&p);
}

/* Reading stopped at max_frames; host code raises the bound. */
Test(embed, host_raises_max_frames)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, "inproc");
    int fd = embed_fd(p.loop);
    counts_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_max_frames(s, 1), 0);
    cr_assert_eq(zev_stream_on_recv(s, keep_msg, &c), 0);
    cr_assert_eq(zmq_send(p.b, "one", 3, 0), 3);
    cr_assert_eq(zmq_send(p.b, "two", 3, 0), 3);
    for (int i = 0; i < 100 && c.msgs < 1; i++)
        cr_assert_geq(zev_loop_run_once(p.loop, 10), 0);
    cr_assert_eq(c.msgs, 1);
    zev_frame_t *first = c.kept;
    settle(p.loop, fd);
    cr_assert_eq(c.msgs, 1, "read past max_frames");

    cr_assert_eq(zev_stream_set_max_frames(s, 2), 0);
    expect_woken(p.loop, fd, "max_frames raised by host code");
    cr_assert_geq(zev_loop_run_once(p.loop, 0), 0);
    cr_assert_eq(c.msgs, 2);
    cr_assert_str_eq(c.last, "two");
    cr_assert_eq(zev_frame_release(first), 0);
    cr_assert_eq(zev_frame_release(c.kept), 0);
    settle(p.loop, fd);
    test_pair_close(&p);
}

/* A flush by host code handles what waits and leaves nothing behind. */
Test(embed, host_flush)
{
    test_pair_t p = test_pair_open(ZMQ_PAIR, ZMQ_PAIR, "inproc");
    int fd = embed_fd(p.loop);
    counts_t c = {0};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, count_msg, &c), 0);
    settle(p.loop, fd);
    cr_assert_eq(zmq_send(p.b, "f1", 2, 0), 2);
    cr_assert_eq(zmq_send(p.b, "f2", 2, 0), 2);
    cr_assert(test_readable(fd, 5000));
    cr_assert_eq(zev_stream_flush(s, ZEV_READ, 1), 1);
    cr_assert_eq(c.msgs, 1);
    expect_woken(p.loop, fd, "flush by host code that left a message");
    cr_assert_geq(zev_loop_run_once(p.loop, 0), 0);
    cr_assert_eq(c.msgs, 2);
    cr_assert_str_eq(c.last, "f2");
    settle(p.loop, fd);
    test_pair_close(&p);
}
