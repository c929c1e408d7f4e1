/*
 * Shared test helpers. Every test program runs once per backend: ctest sets
 * ZEV_BACKEND, and test_loop_new() creates the loop on that backend (and
 * checks that it really got it).
 */
#ifndef ZEV_TEST_COMMON_H
#define ZEV_TEST_COMMON_H

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <zev.h>
#include <zmq.h>

/* The backend under test ("epoll" when run outside ctest). */
const char *test_backend(void);

/* A loop on the backend under test; asserts on failure. */
zev_loop_t *test_loop_new(void);
zev_loop_t *test_loop_new_opts(unsigned batch, unsigned spin_us);

/* Runs iterations until *flag becomes non-zero; fails the test after
 * timeout_ms (a watchdog, not a measurement). */
void test_run_until(zev_loop_t *loop, const volatile int *flag, int timeout_ms);

/* Same, for a counter reaching a target. */
void test_run_until_count(zev_loop_t *loop, const volatile size_t *count, size_t target,
                          int timeout_ms);

/* Monotonic ms, for watchdogs only. */
uint64_t test_ms(void);

/* A unique endpoint per call for "inproc", "ipc" or "tcp" (tcp binds
 * 127.0.0.1 on an ephemeral port: pass the bound socket to get the port). */
void test_endpoint(char *buf, size_t len, const char *transport);
/* After zmq_bind(sock, "tcp://127.0.0.1:*"), the real endpoint to connect. */
void test_last_endpoint(void *sock, char *buf, size_t len);

/* Binds `bind_sock` on transport and connects `conn_sock` to it. */
void test_bind_connect(void *bind_sock, void *conn_sock, const char *transport);

/* Closes a socket with linger 0. */
void test_close(void *sock);

/* ------------------------------------------------------------------------
 * The fixture most stream tests share: a context, a loop on the backend
 * under test and two sockets, `a` bound and `b` connected to it.
 *
 *     test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
 *     zev_stream_t *s = test_stream_new(p.loop, p.a);
 *     ...
 *     test_pair_close(&p);
 */
typedef struct test_pair {
    void *ctx;
    zev_loop_t *loop;
    void *a; /* bound */
    void *b; /* connected to a */
} test_pair_t;

/* A socket type for test_pair_open that makes no socket (the field stays
 * NULL): for tests with one socket, or whose peer comes later. */
#define TEST_NO_SOCKET (-1)

/* Creates the context, the loop (test_loop_new), a socket of type_a and one
 * of type_b, then binds a and connects b on transport ("inproc", "ipc" or
 * "tcp"). With transport NULL the sockets are made but not joined, so the
 * test can set options first (HWMs apply only to pipes made afterwards) and
 * then join them itself, e.g. with test_bind_connect(p.a, p.b, transport).
 * Asserts on failure. */
test_pair_t test_pair_open(int type_a, int type_b, const char *transport);

/* The same on a loop made by test_loop_new_opts(batch, spin_us). */
test_pair_t test_pair_open_opts(int type_a, int type_b, const char *transport, unsigned batch,
                                unsigned spin_us);

/* Tears the fixture down in the order the tests rely on: destroys the loop
 * (which closes the streams still open on it), then closes b and a with
 * linger 0, then terminates the context. Returns zmq_ctx_term's result for
 * the tests that assert on it. A field the test has already released itself
 * (a socket it closed, a loop it destroyed) must be set to NULL first: it is
 * skipped. Every field is NULL afterwards. A test that makes more sockets
 * on p->ctx must close them after the loop is destroyed and before the
 * context is terminated, so it writes its tear-down out instead. */
int test_pair_close(test_pair_t *p);

/* ------------------------------------------------------------------------
 * Helpers shared by several test programs (each used to carry its own copy).
 */

/* zmq_ctx_new / zmq_socket / zev_stream_new that assert on failure. */
void *test_ctx_new(void);
void *test_socket(void *ctx, int type);
zev_stream_t *test_stream_new(zev_loop_t *loop, void *sock);

/* zmq_setsockopt of an int option; asserts on failure. */
void test_set_int(void *sock, int opt, int v);

/* Binds sock on a fresh endpoint of transport; writes the endpoint a peer
 * must connect to in ep. */
void test_bind_ep(void *sock, const char *transport, char *ep, size_t len);

/* Runs `iterations` iterations (each waiting up to ms), with no expectation
 * beyond run_once not failing. */
void test_spin(zev_loop_t *loop, int iterations, int ms);

/* Blocking raw send of a sequence number (8 bytes). */
void test_send_seq(void *sock, uint64_t seq);

/* Monotonic ns (for ordering checks and watchdogs, not speed assertions). */
uint64_t test_clock_ns(void);

/* nanosleep for ms, resumed after EINTR. */
void test_sleep_ms(int ms);

/* pipe(p); asserts on failure. */
void test_pipe(int p[2]);

/* Blocks in poll() on fd for at most timeout_ms (0: just looks) and
 * returns 1 if it is readable: what a host loop embedding zev sees of
 * zev_loop_fd. Retries EINTR; asserts on other poll errors. */
int test_readable(int fd, int timeout_ms);

/* Criterion counts a test whose child process ends with a LeakSanitizer
 * report as passing (it only warns), so ASan builds check for leaks inside
 * the test, after everything was released and the context terminated.
 * Does nothing in other builds. */
void test_expect_no_leaks(void);

/* Death tests: runs fn in a forked child with its stderr captured (the
 * first TEST_CHILD_ERR - 1 bytes, NUL-terminated) and no core dump; fn's
 * return is exit status 0. */
#define TEST_CHILD_ERR 16384
typedef struct test_child {
    int status; /* waitpid's */
    char err[TEST_CHILD_ERR];
} test_child_t;
void test_run_child(void (*fn)(void), test_child_t *r);

/* Whether a child's status says it died of SIGSEGV or SIGBUS. */
int test_died_of_segv(int status);

/* Whether this build runs under AddressSanitizer or ThreadSanitizer. */
int test_asan(void);
int test_tsan(void);

/* A watchdog for tests that run the loop with zev_loop_run, which blocks
 * until something wakes it: a lost wakeup then shows as a hang, not merely
 * as slowness hidden by a polling timeout. After ms the watchdog wakes the
 * loop through its own pipe and an io watcher (not through zev_loop_stop's
 * wakeup, which may be what is broken) and stops it, so the test fails with
 * a message. */
typedef struct test_watchdog {
    zev_loop_t *loop;
    int fds[2];
    zev_io_t *io;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool cancelled;
    int ms;
    volatile int fired; /* loop thread */
} test_watchdog_t;

void test_watchdog_start(test_watchdog_t *w, zev_loop_t *loop, int ms);
/* Returns 1 if the watchdog had to stop the loop. */
int test_watchdog_stop(test_watchdog_t *w);

#endif
