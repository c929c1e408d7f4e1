/*
 * A counting allocator for tests/alloc_test.c (issue #4: zero heap
 * allocations per message).
 *
 * Linked into the test executable (exported with -rdynamic), these
 * definitions of malloc & co. interpose the C library's for the whole
 * process, so libzmq's allocations (its operator new ends in malloc) are
 * counted as well as zev's and the test's own. Each forwards to the next
 * definition (the C library's, found with dlsym(RTLD_NEXT)); while counting
 * is on, every allocating call (malloc, calloc, realloc, the aligned
 * variants) adds one to a global atomic counter, every free of a non-NULL
 * pointer one to another. No LD_PRELOAD needed. For out-of-memory tests,
 * realloc can be made to fail on one thread (alloc_count_fail_realloc).
 *
 * dlsym itself may allocate before the real functions are known: those few
 * early calls are served from a static arena and never freed.
 *
 * A sanitizer runtime owns malloc too: this file is built only in plain
 * builds (tests/alloc.cmake).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <malloc.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "alloc_count.h"

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_memalign)(size_t, size_t);
static void *(*real_valloc)(size_t);
static void *(*real_pvalloc)(size_t);
static size_t (*real_usable_size)(void *);

static atomic_int counting;
static atomic_size_t n_allocs, n_frees;
static atomic_int resolved;

/* ------------------------------------------------------- bootstrap arena */

static alignas(max_align_t) char boot[16384];
static atomic_size_t boot_used;

static bool in_boot(const void *p)
{
    return (const char *)p >= boot && (const char *)p < boot + sizeof boot;
}

static void *boot_alloc(size_t n)
{
    n = (n + 15u) & ~(size_t)15u;
    size_t at = atomic_fetch_add(&boot_used, n);
    if (at + n > sizeof boot)
        return NULL;
    return boot + at;
}

/* dlsym returns an object pointer; ISO C has no cast to a function pointer,
 * so the bits are copied (POSIX guarantees they mean the function). */
#define RESOLVE(var, name)                                                                         \
    do {                                                                                           \
        void *sym_ = dlsym(RTLD_NEXT, name);                                                       \
        memcpy(&(var), &sym_, sizeof(var));                                                        \
    } while (0)

static void resolve(void)
{
    static atomic_flag busy = ATOMIC_FLAG_INIT;
    if (atomic_load(&resolved) || atomic_flag_test_and_set(&busy))
        return; /* done, or dlsym is running (its allocations use the arena) */
    RESOLVE(real_calloc, "calloc");
    RESOLVE(real_realloc, "realloc");
    RESOLVE(real_free, "free");
    RESOLVE(real_posix_memalign, "posix_memalign");
    RESOLVE(real_aligned_alloc, "aligned_alloc");
    RESOLVE(real_memalign, "memalign");
    RESOLVE(real_valloc, "valloc");
    RESOLVE(real_pvalloc, "pvalloc");
    RESOLVE(real_usable_size, "malloc_usable_size");
    RESOLVE(real_malloc, "malloc");
    atomic_store(&resolved, real_malloc && real_calloc && real_realloc && real_free);
}

static bool ready(void)
{
    if (!atomic_load_explicit(&resolved, memory_order_acquire))
        resolve();
    return atomic_load_explicit(&resolved, memory_order_acquire);
}

/* Fault injection (alloc_fault_*): per thread, counting the allocating
 * calls made while armed; the fail_at-th of them fails with ENOMEM. */
static _Thread_local bool fault_armed;
static _Thread_local size_t fault_seen, fault_at, fault_hit;

/* Whether an allocation made from caller is libzmq's (or its C++
 * runtime's): those are never failed, since libzmq cannot survive them (its
 * operator new throws std::bad_alloc, its alloc_assert aborts). Only the
 * allocations zev (and the C library on zev's behalf) makes are. */
static bool from_libzmq(void *caller)
{
    Dl_info di;
    if (!dladdr(caller, &di) || !di.dli_fname)
        return false;
    return strstr(di.dli_fname, "libzmq") || strstr(di.dli_fname, "libstdc++");
}

/* true: this allocating call, made from caller, must fail (errno ENOMEM). */
static bool fault_now(void *caller)
{
    if (!fault_armed)
        return false;
    fault_armed = false; /* dladdr must not count itself */
    bool skip = from_libzmq(caller);
    fault_armed = true;
    if (skip)
        return false;
    if (++fault_seen != fault_at)
        return false;
    fault_hit++;
    if (getenv("ALLOC_FAULT_BACKTRACE")) { /* where it failed, for debugging */
        fault_armed = false;
        void *frames[32];
        int n = backtrace(frames, 32);
        backtrace_symbols_fd(frames, n, 2);
        fault_armed = true;
    }
    errno = ENOMEM;
    return true;
}

static void count_alloc(void)
{
    if (atomic_load_explicit(&counting, memory_order_relaxed))
        atomic_fetch_add_explicit(&n_allocs, 1, memory_order_relaxed);
}

__attribute__((constructor)) static void alloc_count_init(void)
{
    resolve();
}

/* --------------------------------------------------------- the interface */

void *malloc(size_t n)
{
    if (!ready())
        return boot_alloc(n);
    if (fault_now(__builtin_return_address(0)))
        return NULL;
    count_alloc();
    return real_malloc(n);
}

void *calloc(size_t n, size_t m)
{
    if (!ready()) {
        if (m && n > SIZE_MAX / m)
            return NULL;
        return boot_alloc(n * m); /* static storage: already zero */
    }
    if (fault_now(__builtin_return_address(0)))
        return NULL;
    count_alloc();
    return real_calloc(n, m);
}

static _Thread_local bool fail_realloc_here;

void *realloc(void *p, size_t n)
{
    if (fail_realloc_here) {
        errno = ENOMEM;
        return NULL;
    }
    if (ready() && !in_boot(p) && fault_now(__builtin_return_address(0)))
        return NULL;
    if (!ready() || in_boot(p)) {
        void *q = ready() ? real_malloc(n) : boot_alloc(n);
        if (q && p) {
            size_t avail = (size_t)(boot + sizeof boot - (char *)p);
            memcpy(q, p, n < avail ? n : avail);
        }
        count_alloc();
        return q;
    }
    count_alloc();
    return real_realloc(p, n);
}

void free(void *p)
{
    if (!p || in_boot(p))
        return;
    if (atomic_load_explicit(&counting, memory_order_relaxed))
        atomic_fetch_add_explicit(&n_frees, 1, memory_order_relaxed);
    if (ready())
        real_free(p);
}

int posix_memalign(void **out, size_t align, size_t n)
{
    if (!ready() || !real_posix_memalign)
        return ENOMEM;
    if (fault_now(__builtin_return_address(0)))
        return ENOMEM;
    count_alloc();
    return real_posix_memalign(out, align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
    if (!ready() || !real_aligned_alloc)
        return NULL;
    if (fault_now(__builtin_return_address(0)))
        return NULL;
    count_alloc();
    return real_aligned_alloc(align, n);
}

void *memalign(size_t align, size_t n)
{
    if (!ready() || !real_memalign)
        return NULL;
    if (fault_now(__builtin_return_address(0)))
        return NULL;
    count_alloc();
    return real_memalign(align, n);
}

void *valloc(size_t n)
{
    if (!ready() || !real_valloc)
        return NULL;
    if (fault_now(__builtin_return_address(0)))
        return NULL;
    count_alloc();
    return real_valloc(n);
}

void *pvalloc(size_t n)
{
    if (!ready() || !real_pvalloc)
        return NULL;
    if (fault_now(__builtin_return_address(0)))
        return NULL;
    count_alloc();
    return real_pvalloc(n);
}

size_t malloc_usable_size(void *p)
{
    if (!p || in_boot(p) || !ready() || !real_usable_size)
        return 0;
    return real_usable_size(p);
}

/* ------------------------------------------------------------- counting */

void alloc_count_start(void)
{
    atomic_store(&n_allocs, 0);
    atomic_store(&n_frees, 0);
    atomic_store(&counting, 1);
}

void alloc_count_stop(void)
{
    atomic_store(&counting, 0);
}

size_t alloc_count_allocs(void)
{
    return atomic_load(&n_allocs);
}

size_t alloc_count_frees(void)
{
    return atomic_load(&n_frees);
}

/* 1 if this file's malloc is the one the process uses. */
int alloc_count_interposed(void)
{
    return ready();
}

void alloc_count_fail_realloc(int on)
{
    fail_realloc_here = on != 0;
}

void alloc_fault_start(size_t k)
{
    fault_seen = 0;
    fault_hit = 0;
    fault_at = k;
    fault_armed = false;
}

void alloc_fault_arm(int on)
{
    fault_armed = on != 0;
}

size_t alloc_fault_seen(void)
{
    return fault_seen;
}

size_t alloc_fault_hits(void)
{
    return fault_hit;
}
