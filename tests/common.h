/*
 * Shared test helpers. Every test program runs once per backend: ctest sets
 * ZEV_BACKEND, and test_loop_new() creates the loop on that backend (and
 * checks that it really got it).
 */
#ifndef ZEV_TEST_COMMON_H
#define ZEV_TEST_COMMON_H

#include <criterion/criterion.h>
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

#endif
