/*
 * Generation-tagged handles for pooled objects (timers, kept frames).
 *
 * A pooled object's memory goes to its next owner, so a pointer kept past
 * the end of its use (a timer cancelled after it fired, a frame released
 * twice) would reach that owner, and ASan could not see it: nothing was
 * freed. The handle zev hands out is therefore the object's address with
 * the object's generation in the top bits. On 64-bit platforms whose user
 * space lies below 2^48 (x86-64, AArch64; checked for each object) bit 63
 * marks a tagged handle and bits 48..62 carry 15 bits of generation. The
 * object remembers the handle it gave out (0 while it is free): a call with
 * any other value fails with EINVAL and touches nothing.
 *
 * A stale handle is taken for the new owner's only if the slot was reused a
 * multiple of 32,768 times in between; the pools reuse the slot freed
 * longest ago (FIFO), so that takes 32,768 x the pool's size reuses. Where
 * no bits are spare (32-bit; an address above 2^48; memory-tagging runtimes
 * that use the top byte themselves) the handle is the bare address: a slot
 * that is free is still detected, one that was reused is not.
 */
#ifndef ZEV_HANDLE_H
#define ZEV_HANDLE_H

#include <stdint.h>

#if UINTPTR_MAX == UINT64_MAX && !defined(__ANDROID__) && !defined(__SANITIZE_HWADDRESS__)
#if defined(__has_feature)
#if !__has_feature(hwaddress_sanitizer)
#define ZEV__HANDLE_TAGS 1
#endif
#else
#define ZEV__HANDLE_TAGS 1
#endif
#endif

#ifdef ZEV__HANDLE_TAGS
#define ZEV__HANDLE_MARK ((uintptr_t)1 << 63)
#define ZEV__HANDLE_ADDR (((uintptr_t)1 << 48) - 1)

/* The handle for obj in its generation gen. */
static inline uintptr_t zev__handle_make(const void *obj, uint32_t gen)
{
    uintptr_t addr = (uintptr_t)obj;
    if (addr & ~ZEV__HANDLE_ADDR)
        return addr; /* no spare bits here: the bare address */
    return ZEV__HANDLE_MARK | ((uintptr_t)(gen & 0x7fffu) << 48) | addr;
}

/* The object a handle names (valid or stale: the caller compares). */
static inline void *zev__handle_obj(const void *h)
{
    uintptr_t v = (uintptr_t)h;
    return (void *)((v & ZEV__HANDLE_MARK) ? (v & ZEV__HANDLE_ADDR) : v);
}
#else
static inline uintptr_t zev__handle_make(const void *obj, uint32_t gen)
{
    (void)gen;
    return (uintptr_t)obj;
}

static inline void *zev__handle_obj(const void *h)
{
    return (void *)(uintptr_t)h;
}
#endif

#endif /* ZEV_HANDLE_H */
