/*
 * The allocation counter of perf/allocs.h: glibc's allocators are
 * interposed here and forward to their __libc_* entry points, counting
 * while the calling thread asked for it.
 */
#include "allocs.h"

#include <errno.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static _Thread_local int counting;
static _Thread_local long allocs;

long perf_allocs_start(void)
{
    counting = 1;
    return allocs;
}

long perf_allocs_stop(long since)
{
    counting = 0;
    return allocs - since;
}

void *malloc(size_t n)
{
    allocs += counting;
    return __libc_malloc(n);
}

void *calloc(size_t a, size_t b)
{
    allocs += counting;
    return __libc_calloc(a, b);
}

void *realloc(void *p, size_t n)
{
    allocs += counting;
    return __libc_realloc(p, n);
}

void free(void *p)
{
    __libc_free(p);
}

void *memalign(size_t align, size_t n)
{
    allocs += counting;
    return __libc_memalign(align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
    allocs += counting;
    return __libc_memalign(align, n);
}

int posix_memalign(void **out, size_t align, size_t n)
{
    allocs += counting;
    void *p = __libc_memalign(align, n);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}
