/*
 * Generation-tagged handles for pooled objects (timers, kept frames).
 *
 * A pooled object's memory goes to its next owner, so a pointer kept past
 * the end of its use (a timer cancelled after it fired, a frame released
 * twice) would reach that owner, and ASan could not see it: nothing was
 * freed. The handle zev hands out is therefore the object's address with
 * the object's generation in the bits the address leaves unused. On 64-bit
 * platforms whose user space lies below 2^48 (x86-64, AArch64; checked for
 * each object) bit 63 marks a tagged handle and bits 48..62 carry the
 * generation's high 15 bits; pooled objects are 16-byte aligned, so bits
 * 0..3 carry its low 4 bits: ZEV__HANDLE_GENS = 2^19 generations. The
 * object remembers the handle it gave out (0 while it is free): a call with
 * any other value fails with EINVAL and touches nothing.
 *
 * A slot's generations must never come round again while its pool lives,
 * or a handle kept from one use of the slot would name a later one. How
 * often a slot is reused is not up to the pool: with every slot but one
 * held (a worker keeping frames, a timeout per client), that one is reused
 * by every new object, whatever the order of the free list. So a slot whose
 * generations are spent is retired (zev__handle_retired): it never leaves
 * the pool again, and the pool takes another (a new chunk when none is
 * free). The cost is the slot's memory, 80 to 150 bytes, held until the
 * pool is freed with its loop, once per 2^19 = 524,288 reuses of one slot:
 * at most about 300 bytes per million objects pooled, amortised, and never
 * an allocation on the path of a single message or timer.
 *
 * Where no bits are spare (32-bit; an address above 2^48 or not 16-byte
 * aligned; memory-tagging runtimes that use the top byte themselves) the
 * handle is the bare address: a slot that is free is still detected, one
 * that was reused is not, and retiring slots would buy nothing.
 */
#ifndef ZEV_HANDLE_H
#define ZEV_HANDLE_H

#include <stdbool.h>
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

/* The alignment pooled objects declare (_Alignas): the handle's low bits. */
#define ZEV__HANDLE_ALIGN 16

#ifdef ZEV__HANDLE_TAGS
#define ZEV__HANDLE_MARK ((uintptr_t)1 << 63)
#define ZEV__HANDLE_ADDR (((uintptr_t)1 << 48) - 1)
#define ZEV__HANDLE_LOW ((uintptr_t)ZEV__HANDLE_ALIGN - 1) /* 4 bits */
#define ZEV__HANDLE_GENS ((uint32_t)1 << 19)               /* 15 high + 4 low */

/* The handle for obj in its generation gen (< ZEV__HANDLE_GENS). */
static inline uintptr_t zev__handle_make(const void *obj, uint32_t gen)
{
    uintptr_t addr = (uintptr_t)obj;
    if ((addr & ~ZEV__HANDLE_ADDR) || (addr & ZEV__HANDLE_LOW))
        return addr; /* no spare bits here: the bare address */
    return ZEV__HANDLE_MARK | ((uintptr_t)(gen >> 4 & 0x7fffu) << 48) | addr |
           (gen & ZEV__HANDLE_LOW);
}

/* The object a handle names (valid or stale: the caller compares). */
static inline void *zev__handle_obj(const void *h)
{
    uintptr_t v = (uintptr_t)h;
    return (void *)((v & ZEV__HANDLE_MARK) ? (v & ZEV__HANDLE_ADDR & ~ZEV__HANDLE_LOW) : v);
}

/* A slot whose next generation is gen must not be handed out again: its
 * handles would repeat. The pools keep such a slot and take another. */
static inline bool zev__handle_retired(uint32_t gen)
{
    return gen >= ZEV__HANDLE_GENS;
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

static inline bool zev__handle_retired(uint32_t gen)
{
    (void)gen;
    return false;
}
#endif

#endif /* ZEV_HANDLE_H */
