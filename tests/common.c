#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
