/*
 * Heap allocations made by the calling thread, counted by interposing
 * malloc, calloc, realloc and the aligned allocators for the whole program
 * (link perf/allocs.c into it; not in sanitizer builds, whose runtime
 * interposes them itself). Used by alloc.c (per message) and post.c (per
 * cross-thread post).
 */
#ifndef ZEV_PERF_ALLOCS_H
#define ZEV_PERF_ALLOCS_H

/* Starts counting this thread's allocations; returns the count so far. */
long perf_allocs_start(void);

/* Stops counting; returns the allocations made since `since` (a value of
 * perf_allocs_start on this thread). */
long perf_allocs_stop(long since);

#endif
