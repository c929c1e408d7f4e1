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

#endif
