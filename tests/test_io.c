/*
 * fd watchers (issue #2): readiness on pipes, socketpairs, eventfds and TCP
 * sockets; level-triggered semantics; update and stop from inside callbacks,
 * including stopping a different watcher whose event is already pending in
 * the same iteration; one watcher per fd (EEXIST); bad input; hang-ups.
 * Every test runs on the backend under test.
 */
#include "common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

TestSuite(io, .timeout = 20);

/* ------------------------------------------------------------------ helpers */

static void make_socketpair(int s[2])
{
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, s), 0, "socketpair: %s", strerror(errno));
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    cr_assert_geq(fl, 0);
    cr_assert_eq(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
}

static void write_all(int fd, const void *buf, size_t len)
{
    cr_assert_eq(write(fd, buf, len), (ssize_t)len, "write: %s", strerror(errno));
}

/* What a callback saw, generic. */
enum { MAX_CALLS = 32 };
typedef struct seen {
    zev_io_t *io;     /* the handle expected */
    int calls;
    int fd[MAX_CALLS];
    int events[MAX_CALLS];
    int wrong_io;
    int drain;        /* read everything on each call */
    size_t bytes;
    char data[256];
    int eof;          /* a read returned 0 */
} seen_t;

static void seen_io(zev_io_t *io, int fd, int events, void *arg)
{
    seen_t *s = arg;
    if (s->io && io != s->io)
        s->wrong_io++;
    if (s->calls < MAX_CALLS) {
        s->fd[s->calls] = fd;
        s->events[s->calls] = events;
    }
    s->calls++;
    if (s->drain && (events & ZEV_READ)) {
        char buf[256];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n > 0) {
            size_t room = sizeof s->data - s->bytes;
            memcpy(s->data + s->bytes, buf, (size_t)n < room ? (size_t)n : room);
            s->bytes += (size_t)n;
        } else if (n == 0) {
            s->eof = 1;
        }
    }
}

/* ------------------------------------------------------------- readiness */

Test(io, pipe_readable_with_fd_and_events)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);
    seen_t s = {.drain = 1};
    s.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &s);
    cr_assert_not_null(s.io, "zev_io_start: %s", zmq_strerror(errno));

    test_spin(loop, 3, 0);
    cr_assert_eq(s.calls, 0, "an empty pipe was reported readable");

    write_all(p[1], "abc", 3);
    test_run_until(loop, &s.calls, 5000);
    cr_assert_eq(s.wrong_io, 0);
    cr_assert_eq(s.fd[0], p[0]);
    cr_assert_eq(s.events[0], ZEV_READ);
    cr_assert_eq(s.bytes, 3);
    cr_assert_eq(memcmp(s.data, "abc", 3), 0);

    /* Drained: quiet again. */
    test_spin(loop, 3, 0);
    cr_assert_eq(s.calls, 1);

    cr_assert_eq(zev_io_stop(s.io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

/* Reads only from the `read_on`-th call on. */
typedef struct lazy {
    int calls;
    int read_on;
} lazy_t;

static void lazy_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    (void)events;
    lazy_t *l = arg;
    if (++l->calls >= l->read_on) {
        char buf[64];
        (void)!read(fd, buf, sizeof buf);
    }
}

Test(io, level_triggered_until_drained)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);
    lazy_t l = {.read_on = 4};
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, lazy_io, &l);
    cr_assert_not_null(io);
    write_all(p[1], "x", 1);

    /* Once per iteration while the byte stays unread. */
    for (int i = 1; i <= 3; i++) {
        cr_assert_geq(zev_loop_run_once(loop, 1000), 0);
        cr_assert_eq(l.calls, i, "iteration %d: %d calls (level-triggered: one per iteration)",
                     i, l.calls);
    }
    cr_assert_geq(zev_loop_run_once(loop, 1000), 0); /* 4th call reads it */
    cr_assert_eq(l.calls, 4);
    test_spin(loop, 5, 0);
    cr_assert_eq(l.calls, 4, "fired after the pipe was drained");

    /* New data: fires again. */
    l.read_on = 0;
    write_all(p[1], "y", 1);
    cr_assert_geq(zev_loop_run_once(loop, 1000), 0);
    cr_assert_eq(l.calls, 5);
    test_spin(loop, 3, 0);
    cr_assert_eq(l.calls, 5);

    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

Test(io, write_readiness_pipe_and_socketpair)
{
    zev_loop_t *loop = test_loop_new();

    /* An empty pipe's write end is writable. */
    int p[2];
    test_pipe(p);
    seen_t w = {0};
    w.io = zev_io_start(loop, p[1], ZEV_WRITE, seen_io, &w);
    cr_assert_not_null(w.io);
    test_run_until(loop, &w.calls, 5000);
    cr_assert_eq(w.fd[0], p[1]);
    cr_assert_eq(w.events[0], ZEV_WRITE);
    cr_assert_eq(zev_io_stop(w.io), 0);

    /* Full: not writable until the reader makes room. */
    set_nonblock(p[1]);
    set_nonblock(p[0]);
    char buf[4096];
    memset(buf, 'f', sizeof buf);
    size_t filled = 0;
    for (;;) {
        ssize_t n = write(p[1], buf, sizeof buf);
        if (n < 0) {
            cr_assert_eq(errno, EAGAIN);
            break;
        }
        filled += (size_t)n;
    }
    cr_assert_gt(filled, 0);
    seen_t full = {0};
    full.io = zev_io_start(loop, p[1], ZEV_WRITE, seen_io, &full);
    cr_assert_not_null(full.io);
    test_spin(loop, 3, 0);
    cr_assert_eq(full.calls, 0, "a full pipe was reported writable");
    while (read(p[0], buf, sizeof buf) > 0)
        ;
    test_run_until(loop, &full.calls, 5000);
    cr_assert_eq(full.events[0], ZEV_WRITE);
    cr_assert_eq(zev_io_stop(full.io), 0);
    close(p[0]);
    close(p[1]);

    /* socketpair: READ|WRITE reports only what holds. */
    int s[2];
    make_socketpair(s);
    seen_t rw = {.drain = 1};
    rw.io = zev_io_start(loop, s[0], ZEV_READ | ZEV_WRITE, seen_io, &rw);
    cr_assert_not_null(rw.io);
    test_run_until(loop, &rw.calls, 5000);
    cr_assert_eq(rw.events[0], ZEV_WRITE, "nothing to read yet: events %d", rw.events[0]);
    write_all(s[1], "hi", 2);
    int before = rw.calls;
    uint64_t end = test_ms() + 5000;
    while (rw.bytes < 2) {
        cr_assert_lt(test_ms(), end, "watchdog");
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    }
    cr_assert_gt(rw.calls, before);
    cr_assert_eq(rw.events[(rw.calls - 1) % MAX_CALLS] & ZEV_READ, ZEV_READ);
    cr_assert_eq(memcmp(rw.data, "hi", 2), 0);
    cr_assert_eq(zev_io_stop(rw.io), 0);
    close(s[0]);
    close(s[1]);
    zev_loop_destroy(loop);
}

typedef struct efd_ctx {
    int calls;
    uint64_t total;
} efd_ctx_t;

static void efd_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    efd_ctx_t *c = arg;
    cr_assert_eq(events, ZEV_READ);
    uint64_t v;
    if (read(fd, &v, sizeof v) == (ssize_t)sizeof v)
        c->total += v;
    c->calls++;
}

Test(io, eventfd)
{
    zev_loop_t *loop = test_loop_new();
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    cr_assert_geq(efd, 0, "eventfd: %s", strerror(errno));
    efd_ctx_t c = {0};
    zev_io_t *io = zev_io_start(loop, efd, ZEV_READ, efd_io, &c);
    cr_assert_not_null(io, "zev_io_start(eventfd): %s", zmq_strerror(errno));
    test_spin(loop, 3, 0);
    cr_assert_eq(c.calls, 0);

    uint64_t five = 5, seven = 7;
    write_all(efd, &five, sizeof five);
    write_all(efd, &seven, sizeof seven);
    test_run_until(loop, &c.calls, 5000);
    cr_assert_eq(c.total, 12);
    test_spin(loop, 3, 0);
    cr_assert_eq(c.calls, 1, "eventfd read to zero still reported readable");

    /* Writable as well, when asked. */
    seen_t w = {0};
    cr_assert_eq(zev_io_stop(io), 0);
    w.io = zev_io_start(loop, efd, ZEV_WRITE, seen_io, &w);
    cr_assert_not_null(w.io);
    test_run_until(loop, &w.calls, 5000);
    cr_assert_eq(w.events[0], ZEV_WRITE);
    cr_assert_eq(zev_io_stop(w.io), 0);
    close(efd);
    zev_loop_destroy(loop);
}

/* --------------------------------------------------------------- TCP pair */

enum { TCP_BYTES = 1 << 20 };

typedef struct tcp_ctx {
    zev_loop_t *loop;
    int lfd, cfd, afd;
    zev_io_t *lio, *cio, *aio;
    int connected;
    int connect_err;
    size_t sent, received;
    size_t corrupt;
    int server_eof;
    int reply_seen;
    int errors;
} tcp_ctx_t;

static unsigned char pattern(size_t i)
{
    return (unsigned char)((i * 7u + (i >> 9)) % 251u);
}

static void server_io(zev_io_t *io, int fd, int events, void *arg)
{
    tcp_ctx_t *c = arg;
    cr_assert_eq(io, c->aio);
    cr_assert(events & ZEV_READ);
    unsigned char buf[16384];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n > 0) {
            for (ssize_t k = 0; k < n; k++)
                if (buf[k] != pattern(c->received + (size_t)k))
                    c->corrupt++;
            c->received += (size_t)n;
            continue;
        }
        if (n == 0) {
            /* Client finished: answer and stop watching. */
            c->server_eof = 1;
            if (write(fd, "done", 4) != 4)
                c->errors++;
            zev_io_stop(io);
            c->aio = NULL;
        } else if (errno != EAGAIN) {
            c->errors++;
        }
        return;
    }
}

static void listen_io(zev_io_t *io, int fd, int events, void *arg)
{
    tcp_ctx_t *c = arg;
    cr_assert_eq(io, c->lio);
    cr_assert_eq(events, ZEV_READ);
    int a = accept(fd, NULL, NULL);
    if (a < 0) {
        c->errors++;
        return;
    }
    set_nonblock(a);
    c->afd = a;
    /* Watching the accepted socket from inside the listener's callback. */
    c->aio = zev_io_start(c->loop, a, ZEV_READ, server_io, c);
    cr_assert_not_null(c->aio);
    zev_io_stop(io);
    c->lio = NULL;
}

static void client_io(zev_io_t *io, int fd, int events, void *arg)
{
    tcp_ctx_t *c = arg;
    cr_assert_eq(io, c->cio);
    if (!c->connected) {
        cr_assert(events & ZEV_WRITE);
        socklen_t len = sizeof c->connect_err;
        cr_assert_eq(getsockopt(fd, SOL_SOCKET, SO_ERROR, &c->connect_err, &len), 0);
        c->connected = 1;
        if (c->connect_err) {
            zev_io_stop(io);
            c->cio = NULL;
            return;
        }
    }
    if (events & ZEV_WRITE) {
        unsigned char buf[16384];
        while (c->sent < TCP_BYTES) {
            size_t len = TCP_BYTES - c->sent < sizeof buf ? TCP_BYTES - c->sent : sizeof buf;
            for (size_t k = 0; k < len; k++)
                buf[k] = pattern(c->sent + k);
            ssize_t n = write(fd, buf, len);
            if (n < 0) {
                if (errno != EAGAIN)
                    c->errors++;
                return; /* wait for the next ZEV_WRITE */
            }
            c->sent += (size_t)n;
        }
        /* All out: half-close and wait for the server's answer. */
        cr_assert_eq(shutdown(fd, SHUT_WR), 0);
        cr_assert_eq(zev_io_update(io, ZEV_READ), 0);
        return;
    }
    if (events & ZEV_READ) {
        char buf[16];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 4 && memcmp(buf, "done", 4) == 0)
            c->reply_seen = 1;
        else if (n < 0 && errno == EAGAIN)
            return;
        else
            c->errors++;
        zev_io_stop(io);
        c->cio = NULL;
    }
}

Test(io, tcp_socket_pair_on_loopback)
{
    signal(SIGPIPE, SIG_IGN);
    zev_loop_t *loop = test_loop_new();
    tcp_ctx_t c = {.loop = loop, .afd = -1};

    c.lfd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(c.lfd, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(c.lfd, (struct sockaddr *)&addr, sizeof addr), 0, "bind: %s",
                 strerror(errno));
    cr_assert_eq(listen(c.lfd, 4), 0);
    socklen_t alen = sizeof addr;
    cr_assert_eq(getsockname(c.lfd, (struct sockaddr *)&addr, &alen), 0);
    set_nonblock(c.lfd);
    c.lio = zev_io_start(loop, c.lfd, ZEV_READ, listen_io, &c);
    cr_assert_not_null(c.lio);

    c.cfd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(c.cfd, 0);
    set_nonblock(c.cfd);
    int rc = connect(c.cfd, (struct sockaddr *)&addr, sizeof addr);
    cr_assert(rc == 0 || errno == EINPROGRESS, "connect: %s", strerror(errno));
    c.cio = zev_io_start(loop, c.cfd, ZEV_WRITE, client_io, &c);
    cr_assert_not_null(c.cio);

    test_run_until(loop, &c.reply_seen, 15000);
    cr_assert_eq(c.connect_err, 0, "connect failed: %s", strerror(c.connect_err));
    cr_assert_eq(c.errors, 0);
    cr_assert_eq(c.sent, TCP_BYTES);
    cr_assert_eq(c.received, TCP_BYTES, "server got %zu of %d bytes", c.received, TCP_BYTES);
    cr_assert_eq(c.corrupt, 0, "%zu bytes corrupted", c.corrupt);
    cr_assert(c.server_eof);
    cr_assert_null(c.lio);
    cr_assert_null(c.aio);
    cr_assert_null(c.cio);
    close(c.lfd);
    close(c.cfd);
    close(c.afd);
    zev_loop_destroy(loop);
}

/* ------------------------------------------------- update / stop inside */

typedef struct morph {
    int calls;
    int events[8];
    int update_rc[8];
} morph_t;

/* READ -> WRITE -> 0, each change made from inside the callback. */
static void morph_io(zev_io_t *io, int fd, int events, void *arg)
{
    morph_t *m = arg;
    int k = m->calls++;
    if (k >= 8)
        return;
    m->events[k] = events;
    if (k == 0) {
        char c;
        (void)!read(fd, &c, 1);
        m->update_rc[k] = zev_io_update(io, ZEV_WRITE);
    } else if (k == 1) {
        m->update_rc[k] = zev_io_update(io, 0);
    }
}

Test(io, update_inside_callback_read_write_none)
{
    zev_loop_t *loop = test_loop_new();
    int s[2];
    make_socketpair(s);
    morph_t m = {0};
    zev_io_t *io = zev_io_start(loop, s[0], ZEV_READ, morph_io, &m);
    cr_assert_not_null(io);
    test_spin(loop, 2, 0);
    cr_assert_eq(m.calls, 0);

    write_all(s[1], "r", 1);
    test_run_until(loop, &m.calls, 5000);
    cr_assert_eq(m.events[0], ZEV_READ);
    cr_assert_eq(m.update_rc[0], 0);
    /* Next: writable (a socketpair always is). */
    cr_assert_geq(zev_loop_run_once(loop, 1000), 0);
    cr_assert_eq(m.calls, 2);
    cr_assert_eq(m.events[1], ZEV_WRITE, "after update(WRITE): events %d", m.events[1]);
    cr_assert_eq(m.update_rc[1], 0);
    /* Watching nothing: silent although writable, and although readable. */
    write_all(s[1], "q", 1);
    test_spin(loop, 5, 0);
    cr_assert_eq(m.calls, 2, "a watcher updated to 0 still fired");

    /* Back to READ from outside: the pending byte is reported. */
    cr_assert_eq(zev_io_update(io, ZEV_READ), 0);
    cr_assert_geq(zev_loop_run_once(loop, 1000), 0);
    cr_assert_eq(m.calls, 3);
    cr_assert_eq(m.events[2], ZEV_READ);
    cr_assert_eq(zev_io_stop(io), 0);

    /* A hung-up fd watched for nothing does not spin or fire; asking for
     * READ later reports it. */
    int p[2];
    test_pipe(p);
    close(p[1]);
    seen_t h = {0};
    h.io = zev_io_start(loop, p[0], 0, seen_io, &h);
    cr_assert_not_null(h.io, "events 0: %s", zmq_strerror(errno));
    test_spin(loop, 5, 0);
    cr_assert_eq(h.calls, 0, "a watcher with no events fired");
    cr_assert_eq(zev_loop_timeout(loop), -1, "a silent hung-up fd made the loop busy");
    cr_assert_eq(zev_io_update(h.io, ZEV_READ), 0);
    test_run_until(loop, &h.calls, 5000);
    cr_assert_eq(h.events[0], ZEV_READ);
    cr_assert_eq(zev_io_stop(h.io), 0);
    close(p[0]);
    close(s[0]);
    close(s[1]);
    zev_loop_destroy(loop);
}

typedef struct selfstop {
    int calls;
    int stop_rc;
} selfstop_t;

static void selfstop_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)fd;
    (void)events;
    selfstop_t *s = arg;
    s->calls++;
    s->stop_rc = zev_io_stop(io); /* data left unread on purpose */
}

Test(io, stop_inside_own_callback)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);
    write_all(p[1], "z", 1);
    selfstop_t s = {.stop_rc = -2};
    cr_assert_not_null(zev_io_start(loop, p[0], ZEV_READ, selfstop_io, &s));
    test_run_until(loop, &s.calls, 5000);
    cr_assert_eq(s.stop_rc, 0);
    test_spin(loop, 5, 0);
    cr_assert_eq(s.calls, 1, "a watcher stopped in its own callback fired again");

    /* The fd is free again at once, and its unread byte is still there. */
    seen_t again = {.drain = 1};
    again.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &again);
    cr_assert_not_null(again.io, "fd not reusable after stop: %s", zmq_strerror(errno));
    test_run_until(loop, &again.calls, 5000);
    cr_assert_eq(again.bytes, 1);
    cr_assert_eq(zev_io_stop(again.io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

/* Two watchers, both with an event pending in the same iteration: whichever
 * callback runs first stops the other, which must then not fire. Variant
 * `reuse` also closes the stopped fd and watches a fresh pipe that likely
 * gets the same fd number, with data in it. */
typedef struct rival {
    zev_loop_t *loop;
    int fd[2], wfd[2];
    zev_io_t *io[2];
    int calls[2];
    int stop_rc;
    int reuse;
    int newp[2];
    seen_t fresh;
} rival_t;

static rival_t *rival_global;

static void rival_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)events;
    rival_t *r = rival_global;
    int me = (int)(intptr_t)arg;
    cr_assert_eq(io, r->io[me], "callback for a stopped watcher");
    cr_assert_eq(fd, r->fd[me]);
    r->calls[me]++;
    char c;
    (void)!read(fd, &c, 1);
    int other = !me;
    if (r->io[other]) {
        r->stop_rc = zev_io_stop(r->io[other]);
        r->io[other] = NULL;
        if (r->reuse) {
            close(r->fd[other]);
            close(r->wfd[other]);
            r->fd[other] = r->wfd[other] = -1;
            cr_assert_eq(pipe(r->newp), 0);
            cr_assert_eq(write(r->newp[1], "n", 1), 1);
            r->fresh.io = zev_io_start(r->loop, r->newp[0], ZEV_READ, seen_io, &r->fresh);
            cr_assert_not_null(r->fresh.io);
        }
    }
}

static void rival_round(zev_loop_t *loop, int reuse, int first)
{
    rival_t r = {.loop = loop, .reuse = reuse, .stop_rc = -2};
    r.fresh.drain = 1;
    r.newp[0] = r.newp[1] = -1;
    rival_global = &r;
    int a[2], b[2];
    test_pipe(a);
    test_pipe(b);
    r.fd[0] = a[0];
    r.wfd[0] = a[1];
    r.fd[1] = b[0];
    r.wfd[1] = b[1];
    /* Start order varies which one the backend reports first. */
    r.io[first] = zev_io_start(loop, r.fd[first], ZEV_READ, rival_io, (void *)(intptr_t)first);
    r.io[!first] = zev_io_start(loop, r.fd[!first], ZEV_READ, rival_io, (void *)(intptr_t)!first);
    cr_assert_not_null(r.io[0]);
    cr_assert_not_null(r.io[1]);
    write_all(r.wfd[0], "a", 1);
    write_all(r.wfd[1], "b", 1);

    /* Both are ready before the wait: one wait reports both. */
    cr_assert_geq(zev_loop_run_once(loop, 1000), 0);
    cr_assert_eq(r.calls[0] + r.calls[1], 1,
                 "both rivals fired (%d, %d): the stopped one's pending event was delivered",
                 r.calls[0], r.calls[1]);
    cr_assert_eq(r.stop_rc, 0);
    int winner = r.calls[0] ? 0 : 1;
    test_spin(loop, 3, 0);
    cr_assert_eq(r.calls[!winner], 0, "the stopped watcher fired later");
    cr_assert_eq(r.calls[winner], 1);
    if (reuse) {
        test_run_until(loop, &r.fresh.calls, 5000);
        cr_assert_eq(r.fresh.wrong_io, 0);
        cr_assert_eq(r.fresh.fd[0], r.newp[0]);
        cr_assert_eq(r.fresh.bytes, 1);
        cr_assert_eq(zev_io_stop(r.fresh.io), 0);
        close(r.newp[0]);
        close(r.newp[1]);
    }
    cr_assert_eq(zev_io_stop(r.io[winner]), 0);
    for (int i = 0; i < 2; i++) {
        if (r.fd[i] >= 0)
            close(r.fd[i]);
        if (r.wfd[i] >= 0)
            close(r.wfd[i]);
    }
}

Test(io, stop_other_watcher_with_pending_event)
{
    zev_loop_t *loop = test_loop_new();
    for (int round = 0; round < 20; round++)
        rival_round(loop, 0, round & 1);
    for (int round = 0; round < 20; round++)
        rival_round(loop, 1, round & 1);
    zev_loop_destroy(loop);
}

/* Stop and restart the same fd from inside its own callback. */
typedef struct restart {
    zev_loop_t *loop;
    zev_io_t *cur;
    int calls;
    int restart_ok;
} restart_t;

static void restart_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)events;
    restart_t *r = arg;
    cr_assert_eq(io, r->cur);
    r->calls++;
    if (r->calls == 1) {
        cr_assert_eq(zev_io_stop(io), 0);
        r->cur = zev_io_start(r->loop, fd, ZEV_READ, restart_io, r);
        r->restart_ok = r->cur != NULL;
    } else {
        char c;
        (void)!read(fd, &c, 1);
    }
}

Test(io, one_watcher_per_fd)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);
    seen_t a = {.drain = 1};
    a.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &a);
    cr_assert_not_null(a.io);

    static const int evs[] = {ZEV_READ, ZEV_WRITE, ZEV_READ | ZEV_WRITE, 0};
    seen_t b = {0};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++) {
        errno = 0;
        cr_assert_null(zev_io_start(loop, p[0], evs[i], seen_io, &b),
                       "second watcher on one fd (events %d)", evs[i]);
        cr_assert_eq(errno, EEXIST, "events %d: errno %d (%s)", evs[i], errno, strerror(errno));
    }
    /* The first is unaffected by the refused ones. */
    write_all(p[1], "1", 1);
    test_run_until(loop, &a.calls, 5000);
    cr_assert_eq(a.bytes, 1);
    cr_assert_eq(b.calls, 0);

    /* After stop the fd can be watched again. */
    cr_assert_eq(zev_io_stop(a.io), 0);
    seen_t c = {.drain = 1};
    c.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &c);
    cr_assert_not_null(c.io, "fd not watchable after stop: %s", zmq_strerror(errno));
    write_all(p[1], "2", 1);
    test_run_until(loop, &c.calls, 5000);
    cr_assert_eq(c.bytes, 1);
    cr_assert_eq(a.calls, 1);
    cr_assert_eq(zev_io_stop(c.io), 0);

    /* A watcher with no events still owns the fd. */
    seen_t d = {0};
    d.io = zev_io_start(loop, p[0], 0, seen_io, &d);
    cr_assert_not_null(d.io);
    errno = 0;
    cr_assert_null(zev_io_start(loop, p[0], ZEV_READ, seen_io, &b));
    cr_assert_eq(errno, EEXIST);
    cr_assert_eq(zev_io_stop(d.io), 0);

    /* Stop and start again on the same fd from inside its own callback. */
    restart_t r = {.loop = loop};
    r.cur = zev_io_start(loop, p[0], ZEV_READ, restart_io, &r);
    cr_assert_not_null(r.cur);
    write_all(p[1], "3", 1);
    uint64_t end = test_ms() + 5000;
    while (r.calls < 2) {
        cr_assert_lt(test_ms(), end, "watchdog: %d calls", r.calls);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    }
    cr_assert(r.restart_ok, "restart inside the callback failed");
    cr_assert_eq(zev_io_stop(r.cur), 0);

    /* Another loop may watch the same fd: the rule is per loop. */
    zev_loop_t *other = test_loop_new();
    seen_t x = {0}, y = {0};
    x.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &x);
    y.io = zev_io_start(other, p[0], ZEV_READ, seen_io, &y);
    cr_assert_not_null(x.io);
    cr_assert_not_null(y.io, "a second loop could not watch the fd: %s", zmq_strerror(errno));
    write_all(p[1], "4", 1);
    test_run_until(loop, &x.calls, 5000);
    test_run_until(other, &y.calls, 5000);
    cr_assert_eq(zev_io_stop(x.io), 0);
    cr_assert_eq(zev_io_stop(y.io), 0);
    zev_loop_destroy(other);

    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

Test(io, bad_fd_is_ebadf)
{
    zev_loop_t *loop = test_loop_new();
    seen_t s = {0};
    int p[2];
    test_pipe(p);
    int closed = p[0];
    close(p[0]);
    close(p[1]);
    const int bad[] = {-1, -42, closed, 1 << 20};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        errno = 0;
        cr_assert_null(zev_io_start(loop, bad[i], ZEV_READ, seen_io, &s), "fd %d accepted",
                       bad[i]);
        cr_assert_eq(errno, EBADF, "fd %d: errno %d (%s)", bad[i], errno, strerror(errno));
    }
    /* Nothing was left registered by the failures. */
    test_spin(loop, 2, 0);
    cr_assert_eq(s.calls, 0);
    cr_assert_eq(zev_loop_timeout(loop), -1);
    zev_loop_destroy(loop);
}

Test(io, bad_events_is_einval)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);
    seen_t s = {.drain = 1};
    const int bad[] = {4, 8, -1, 0x100, ZEV_READ | 4, ZEV_READ | ZEV_WRITE | 0x40};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        errno = 0;
        cr_assert_null(zev_io_start(loop, p[0], bad[i], seen_io, &s), "events %#x accepted",
                       bad[i]);
        cr_assert_eq(errno, EINVAL, "events %#x: errno %d", bad[i], errno);
    }
    /* The fd was not taken by a failed start. */
    s.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &s);
    cr_assert_not_null(s.io, "fd held by a failed start: %s", zmq_strerror(errno));
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        errno = 0;
        cr_assert_eq(zev_io_update(s.io, bad[i]), -1, "update to events %#x accepted", bad[i]);
        cr_assert_eq(errno, EINVAL);
    }
    /* The refused updates changed nothing. */
    write_all(p[1], "k", 1);
    test_run_until(loop, &s.calls, 5000);
    cr_assert_eq(s.events[0], ZEV_READ);
    cr_assert_eq(zev_io_stop(s.io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

/* -------------------------------------------------------------- hang-ups */

Test(io, hangup_reported_as_read)
{
    signal(SIGPIPE, SIG_IGN);
    zev_loop_t *loop = test_loop_new();

    /* Pipe: data, then the writer closes: the data, then EOF, both as READ. */
    int p[2];
    test_pipe(p);
    seen_t s = {.drain = 1};
    s.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &s);
    cr_assert_not_null(s.io);
    write_all(p[1], "last", 4);
    close(p[1]);
    test_run_until(loop, &s.eof, 5000);
    cr_assert_eq(s.bytes, 4);
    cr_assert_eq(memcmp(s.data, "last", 4), 0);
    for (int i = 0; i < s.calls && i < MAX_CALLS; i++)
        cr_assert_eq(s.events[i], ZEV_READ, "call %d: events %d (only READ was asked)", i,
                     s.events[i]);
    cr_assert_eq(zev_io_stop(s.io), 0);
    close(p[0]);

    /* Socketpair, peer closed with nothing sent. */
    int sp[2];
    make_socketpair(sp);
    seen_t h = {.drain = 1};
    h.io = zev_io_start(loop, sp[0], ZEV_READ, seen_io, &h);
    cr_assert_not_null(h.io);
    close(sp[1]);
    test_run_until(loop, &h.eof, 5000);
    cr_assert_eq(h.events[0], ZEV_READ);
    cr_assert_eq(zev_io_stop(h.io), 0);
    close(sp[0]);

    /* Write end of a pipe whose reader is gone: the WRITE watcher hears of
     * it (the write would fail with EPIPE). */
    test_pipe(p);
    close(p[0]);
    seen_t w = {0};
    w.io = zev_io_start(loop, p[1], ZEV_WRITE, seen_io, &w);
    cr_assert_not_null(w.io, "%s", zmq_strerror(errno));
    test_run_until(loop, &w.calls, 5000);
    cr_assert_eq(w.events[0], ZEV_WRITE);
    errno = 0;
    cr_assert_eq(write(p[1], "x", 1), -1);
    cr_assert_eq(errno, EPIPE);
    cr_assert_eq(zev_io_stop(w.io), 0);
    close(p[1]);
    zev_loop_destroy(loop);
}

/* An fd closed without zev_io_stop (a usage error, as in libuv) behaves the
 * same on every backend: the watcher goes silent (poll must not report
 * POLLNVAL to it forever), its number stays taken in zev (EEXIST) until
 * zev_io_stop, and after that the number can be watched again. */
Test(io, fd_closed_without_stop_goes_silent)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);
    seen_t a = {.drain = 1};
    a.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &a);
    cr_assert_not_null(a.io);
    write_all(p[1], "1", 1);
    for (uint64_t end = test_ms() + 2000; a.calls == 0 && test_ms() < end;)
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    cr_assert_eq(a.calls, 1);

    int old = p[0];
    close(p[0]);
    test_spin(loop, 5, 10);
    cr_assert_eq(a.calls, 1, "a closed fd's watcher fired %d more times", a.calls - 1);

    int q[2];
    test_pipe(q); /* the lowest free number: usually the one just closed */
    seen_t b = {.drain = 1};
    if (q[0] == old) {
        errno = 0;
        cr_assert_null(zev_io_start(loop, q[0], ZEV_READ, seen_io, &b));
        cr_assert_eq(errno, EEXIST, "errno %s", strerror(errno));
    }
    cr_assert_eq(zev_io_stop(a.io), 0);
    b.io = zev_io_start(loop, q[0], ZEV_READ, seen_io, &b);
    cr_assert_not_null(b.io, "zev_io_start after the stale watcher was stopped: %s",
                       strerror(errno));
    write_all(q[1], "2", 1);
    for (uint64_t end = test_ms() + 2000; b.calls == 0 && test_ms() < end;)
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    cr_assert_eq(b.calls, 1);
    cr_assert_eq(a.calls, 1);
    cr_assert_eq(zev_io_stop(b.io), 0);
    close(p[1]);
    close(q[0]);
    close(q[1]);
    zev_loop_destroy(loop);
}

/* epoll keeps a registration while the file lives on elsewhere (a dup, a
 * forked child), even after the watched fd number was closed: events keep
 * coming for it, also once the watcher is stopped and freed. They must
 * never reach the freed watcher (review finding 2: a use-after-free under
 * ASan). On poll and kqueue, which drop a closed number, nothing comes. */
Test(io, events_after_stop_never_reach_the_freed_watcher)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);
    seen_t a = {0};
    a.io = zev_io_start(loop, p[0], ZEV_READ, seen_io, &a);
    cr_assert_not_null(a.io);
    int keep = dup(p[0]); /* the file stays open under another number */
    cr_assert_geq(keep, 0);
    close(p[0]);
    write_all(p[1], "x", 1);
    test_spin(loop, 3, 0);
    cr_assert_eq(zev_io_stop(a.io), 0);
    int before = a.calls;
    test_spin(loop, 5, 0); /* ASan: nothing may touch the stopped watcher */
    cr_assert_eq(a.calls, before, "a stopped watcher was called");
    close(keep);
    close(p[1]);
    zev_loop_destroy(loop);
}
