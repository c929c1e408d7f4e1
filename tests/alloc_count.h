/*
 * The counting allocator of tests/alloc_count.c, used by tests/alloc_test.c
 * (plain builds only: tests/alloc.cmake).
 */
#ifndef ZEV_TEST_ALLOC_COUNT_H
#define ZEV_TEST_ALLOC_COUNT_H

#include <stddef.h>

/* Counting on / off (process-wide). */
void alloc_count_start(void);
void alloc_count_stop(void);
/* Allocating calls and frees of non-NULL pointers counted while on. */
size_t alloc_count_allocs(void);
size_t alloc_count_frees(void);
/* Non-zero when this allocator really interposes the C library's. */
int alloc_count_interposed(void);
/* While on, realloc fails with ENOMEM on the calling thread only (libzmq's
 * I/O threads are unaffected); counting is independent of it. */
void alloc_count_fail_realloc(int on);

/* Fault injection, per thread: alloc_fault_start(k) resets the calling
 * thread's count; from then on, the allocating calls (malloc, calloc,
 * realloc, the aligned variants) it makes while armed (alloc_fault_arm(1))
 * are counted, and the k-th fails with ENOMEM (k = 0: none fails, only
 * counted). Other threads (libzmq's I/O threads) are never affected, and
 * neither are allocations libzmq makes itself, on any thread (it aborts on
 * them): only zev's, and the C library's on zev's behalf. */
void alloc_fault_start(size_t k);
void alloc_fault_arm(int on);
/* Allocating calls counted since alloc_fault_start; failures injected. */
size_t alloc_fault_seen(void);
size_t alloc_fault_hits(void);

#endif
