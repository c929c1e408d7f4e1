#include "common.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char *test_backend(void)
{
    const char *be = getenv("ZEV_TEST_BACKEND");
    return be && *be ? be : "epoll";
}

zev_loop_t *test_loop_new_opts(unsigned batch, unsigned spin_us)
{
    zev_loop_opts_t opts = {.backend = test_backend(), .batch = batch, .spin_us = spin_us};
    zev_loop_t *loop = zev_loop_new(&opts);
    cr_assert_not_null(loop, "zev_loop_new(%s): %s", opts.backend, zmq_strerror(errno));
    cr_assert_str_eq(zev_loop_backend(loop), opts.backend);
    return loop;
}

zev_loop_t *test_loop_new(void)
{
    return test_loop_new_opts(0, 0);
}

uint64_t test_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void test_run_until(zev_loop_t *loop, const volatile int *flag, int timeout_ms)
{
    uint64_t end = test_ms() + (uint64_t)timeout_ms;
    while (!*flag) {
        cr_assert(test_ms() < end, "watchdog: condition not reached in %d ms", timeout_ms);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0, "run_once: %s", zmq_strerror(errno));
    }
}

void test_run_until_count(zev_loop_t *loop, const volatile size_t *count, size_t target,
                          int timeout_ms)
{
    uint64_t end = test_ms() + (uint64_t)timeout_ms;
    while (*count < target) {
        cr_assert(test_ms() < end, "watchdog: %zu of %zu in %d ms", *count, target, timeout_ms);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0, "run_once: %s", zmq_strerror(errno));
    }
}

void test_endpoint(char *buf, size_t len, const char *transport)
{
    static int n;
    if (strcmp(transport, "inproc") == 0)
        snprintf(buf, len, "inproc://zev-test-%d-%d", (int)getpid(), n++);
    else if (strcmp(transport, "ipc") == 0)
        snprintf(buf, len, "ipc:///tmp/zev-test-%d-%d.sock", (int)getpid(), n++);
    else
        snprintf(buf, len, "tcp://127.0.0.1:*");
}

void test_last_endpoint(void *sock, char *buf, size_t len)
{
    cr_assert_eq(zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, buf, &len), 0);
}

void test_bind_connect(void *bind_sock, void *conn_sock, const char *transport)
{
    char ep[256];
    test_endpoint(ep, sizeof ep, transport);
    cr_assert_eq(zmq_bind(bind_sock, ep), 0, "bind %s: %s", ep, zmq_strerror(errno));
    test_last_endpoint(bind_sock, ep, sizeof ep);
    cr_assert_eq(zmq_connect(conn_sock, ep), 0, "connect %s: %s", ep, zmq_strerror(errno));
}

void test_close(void *sock)
{
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(sock);
}

/* ------------------------------------------------ shared by several tests */

void *test_ctx_new(void)
{
    void *ctx = zmq_ctx_new();
    cr_assert_not_null(ctx);
    return ctx;
}

void *test_socket(void *ctx, int type)
{
    void *s = zmq_socket(ctx, type);
    cr_assert_not_null(s, "zmq_socket(%d): %s", type, zmq_strerror(errno));
    return s;
}

zev_stream_t *test_stream_new(zev_loop_t *loop, void *sock)
{
    zev_stream_t *s = zev_stream_new(loop, sock);
    cr_assert_not_null(s, "zev_stream_new: %s", zmq_strerror(errno));
    return s;
}

void test_set_int(void *sock, int opt, int v)
{
    cr_assert_eq(zmq_setsockopt(sock, opt, &v, sizeof v), 0, "setsockopt %d: %s", opt,
                 zmq_strerror(errno));
}

void test_bind_ep(void *sock, const char *transport, char *ep, size_t len)
{
    test_endpoint(ep, len, transport);
    cr_assert_eq(zmq_bind(sock, ep), 0, "bind %s: %s", ep, zmq_strerror(errno));
    test_last_endpoint(sock, ep, len);
}

void test_spin(zev_loop_t *loop, int iterations, int ms)
{
    for (int i = 0; i < iterations; i++)
        cr_assert_geq(zev_loop_run_once(loop, ms), 0, "run_once: %s", zmq_strerror(errno));
}

void test_send_seq(void *sock, uint64_t seq)
{
    cr_assert_eq(zmq_send(sock, &seq, sizeof seq, 0), (int)sizeof seq, "zmq_send: %s",
                 zmq_strerror(errno));
}

test_pair_t test_pair_open_opts(int type_a, int type_b, const char *transport, unsigned batch,
                                unsigned spin_us)
{
    test_pair_t p = {.ctx = test_ctx_new()};
    p.loop = test_loop_new_opts(batch, spin_us);
    if (type_a != TEST_NO_SOCKET)
        p.a = test_socket(p.ctx, type_a);
    if (type_b != TEST_NO_SOCKET)
        p.b = test_socket(p.ctx, type_b);
    if (transport) {
        cr_assert(p.a && p.b, "test_pair_open: %s needs two sockets", transport);
        test_bind_connect(p.a, p.b, transport);
    }
    return p;
}

test_pair_t test_pair_open(int type_a, int type_b, const char *transport)
{
    return test_pair_open_opts(type_a, type_b, transport, 0, 0);
}

int test_pair_close(test_pair_t *p)
{
    if (p->loop)
        zev_loop_destroy(p->loop);
    if (p->b)
        test_close(p->b);
    if (p->a)
        test_close(p->a);
    int rc = zmq_ctx_term(p->ctx);
    *p = (test_pair_t){0};
    return rc;
}

uint64_t test_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void test_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

void test_pipe(int p[2])
{
    cr_assert_eq(pipe(p), 0, "pipe: %s", strerror(errno));
}

int test_readable(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc;
    do
        rc = poll(&p, 1, timeout_ms);
    while (rc < 0 && errno == EINTR);
    cr_assert_geq(rc, 0, "poll: %s", strerror(errno));
    return rc > 0 && (p.revents & POLLIN);
}

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_TSAN 1
#endif
#endif

int test_asan(void)
{
#ifdef TEST_ASAN
    return 1;
#else
    return 0;
#endif
}

int test_tsan(void)
{
#ifdef TEST_TSAN
    return 1;
#else
    return 0;
#endif
}

void test_run_child(void (*fn)(void), test_child_t *r)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        close(p[0]);
        dup2(p[1], STDERR_FILENO);
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none);
        fn();
        _exit(0);
    }
    close(p[1]);
    size_t len = 0;
    for (;;) {
        char buf[4096];
        ssize_t n = read(p[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        size_t room = sizeof r->err - 1 - len;
        size_t take = (size_t)n < room ? (size_t)n : room;
        memcpy(r->err + len, buf, take);
        len += take;
    }
    r->err[len] = '\0';
    close(p[0]);
    while (waitpid(pid, &r->status, 0) < 0)
        cr_assert_eq(errno, EINTR);
}

int test_died_of_segv(int status)
{
    return WIFSIGNALED(status) && (WTERMSIG(status) == SIGSEGV || WTERMSIG(status) == SIGBUS);
}

#ifdef TEST_ASAN
#include <sanitizer/lsan_interface.h>
void test_expect_no_leaks(void)
{
    cr_expect_eq(__lsan_do_recoverable_leak_check(), 0, "LeakSanitizer: leaks (see above)");
}
#else
void test_expect_no_leaks(void)
{
}
#endif

static void watchdog_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    (void)fd;
    (void)events;
    test_watchdog_t *w = arg;
    w->fired = 1;
    zev_loop_stop(w->loop);
}

static void *watchdog_main(void *arg)
{
    test_watchdog_t *w = arg;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += w->ms / 1000;
    until.tv_nsec += (long)(w->ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&w->mu);
    int rc = 0;
    while (!w->cancelled && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&w->cv, &w->mu, &until);
    bool fire = !w->cancelled;
    pthread_mutex_unlock(&w->mu);
    if (fire) {
        char b = 'w';
        (void)!write(w->fds[1], &b, 1);
    }
    return NULL;
}

void test_watchdog_start(test_watchdog_t *w, zev_loop_t *loop, int ms)
{
    *w = (test_watchdog_t){.loop = loop, .ms = ms};
    cr_assert_eq(pipe(w->fds), 0);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->io = zev_io_start(loop, w->fds[0], ZEV_READ, watchdog_io, w);
    cr_assert_not_null(w->io, "zev_io_start: %s", zmq_strerror(errno));
    cr_assert_eq(pthread_create(&w->thread, NULL, watchdog_main, w), 0);
}

int test_watchdog_stop(test_watchdog_t *w)
{
    pthread_mutex_lock(&w->mu);
    w->cancelled = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    zev_io_stop(w->io);
    close(w->fds[0]);
    close(w->fds[1]);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    return w->fired;
}
