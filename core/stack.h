/*
 * Fiber stacks: mmap'd, with an inaccessible guard below, pooled per owner
 * (the loop embeds one pool), and a SIGSEGV/SIGBUS handler that names an
 * overflow into a guard as what it is. Internal, loop thread only.
 *
 * Memory. A stack of size S (rounded up to whole pages; 0 means 64 KiB) is
 * one mapping of S + 64 KiB: the 64 KiB at the bottom are PROT_NONE. It
 * costs address space S + 64 KiB and resident memory only for the pages its fiber
 * touched (the kernel maps them on first touch): 100,000 sleeping fibers
 * that each touched 8 KiB fit in about 800 MiB. Each stack is 2 VMAs (the
 * guard and the rest); Linux allows vm.max_map_count VMAs per process
 * (65530 by default), so beyond about 32,000 live stacks (fewer, counting
 * the process's other mappings) the limit must be raised, e.g.
 * `sysctl vm.max_map_count=262144`. Until then zev__stack_get fails cleanly
 * with ENOMEM, like any other exhaustion; nothing crashes.
 *
 * Pool. zev__stack_put keeps a finished stack for the next zev__stack_get of
 * the same size instead of unmapping it, so steady-state spawn/exit makes no
 * mmap, mprotect or munmap call. It keeps at most max_idle stacks (64) and
 * max_idle_bytes of them (16 MiB); more are unmapped at once. Idle stacks
 * keep the pages they touched (no madvise): that caps the pool's resident
 * memory at max_idle_bytes while sparing every reuse a system call and the
 * page faults of refilling the pages, which is what the pool is for. The
 * free list lives in the idle stacks themselves; the pool allocates nothing.
 *
 * Overflow. Running past the bottom of a stack faults on its guard (64 KiB
 * of PROT_NONE, ZEV__STACK_GUARD: no memory, no extra mapping); the
 * process then dies of SIGSEGV, never by silent corruption of a neighbour
 * (except for a single frame larger than 64 KiB, which can step over the
 * guard: build fiber code with -fstack-clash-protection, which probes
 * every page of a large frame, to rule that out). The first zev__stack_get of the
 * process installs a SIGSEGV and SIGBUS handler (SA_ONSTACK); the first one
 * on each thread gives that thread an alternate signal stack (sigaltstack,
 * 64 KiB, unmapped at thread exit) if it has none, since the overflowing
 * stack has no room left to run a handler. A fault in the running fiber's
 * guard writes one
 * line to stderr,
 *   zev: fiber stack overflow (stack 0x...-0x..., 65536 bytes); raise zev_fiber_opts_t.stack_size
 * restores the default action and returns, so the faulting instruction
 * faults again and the process dies of the signal (core dump as usual).
 * Every other fault goes to the handler installed before zev's, as it was
 * installed (SA_SIGINFO or not, its mask, SA_RESETHAND, SIG_DFL, SIG_IGN).
 * A handler installed after zev's replaces it: overflows then reach that
 * handler (on the alternate stack only if it asked for SA_ONSTACK).
 * ASan builds install nothing: ASan owns SIGSEGV and reports stack-overflow
 * itself. If the handler or alternate stack cannot be set up (no memory),
 * stacks are still handed out: an overflow then kills the process with
 * SIGSEGV without the line.
 */
#ifndef ZEV_STACK_H
#define ZEV_STACK_H

#include <stddef.h>

#ifndef ZEV_INTERNAL
#define ZEV_INTERNAL __attribute__((visibility("hidden")))
#endif

#define ZEV__STACK_DEFAULT_SIZE ((size_t)64 * 1024)
#define ZEV__STACK_GUARD ((size_t)64 * 1024) /* below each stack, PROT_NONE */
#define ZEV__STACK_POOL_MAX_IDLE 64
#define ZEV__STACK_POOL_MAX_IDLE_BYTES ((size_t)16 * 1024 * 1024)

/* A stack handed out by zev__stack_get: [lo, lo + size) is read-write, the
 * ZEV__STACK_GUARD bytes below lo are the guard. Pass lo and size to
 * zev__ctx_make. */
typedef struct zev__stack {
    void *lo;
    size_t size;
} zev__stack_t;

/* A pool of idle stacks. Embed it; zero-initialisable state is set by
 * zev__stack_pool_init. One thread at a time (the loop's). */
typedef struct zev__stack_pool {
    struct zev__idle_stack *idle; /* LIFO: the most recently used first */
    size_t idle_count, idle_bytes;
    size_t max_idle, max_idle_bytes; /* limits; the owner may change them */
    size_t page;                     /* the system's page size */
    /* statistics (for tests and perf) */
    size_t mapped; /* stacks mapped now through this pool, idle or in use */
    size_t maps;   /* mmap calls made since init */
    size_t reuses; /* zev__stack_get calls served from idle stacks */
} zev__stack_pool_t;

/* Initialises an empty pool with the default limits. Cannot fail. */
ZEV_INTERNAL void zev__stack_pool_init(zev__stack_pool_t *pool);

/* Unmaps every idle stack. Stacks still handed out are not the pool's to
 * free: put them back first (or they stay mapped). The pool may then be
 * initialised again or freed. */
ZEV_INTERNAL void zev__stack_pool_fini(zev__stack_pool_t *pool);

/* Hands out a stack of `size` bytes (0: ZEV__STACK_DEFAULT_SIZE; rounded up
 * to whole pages): an idle one of exactly that size if the pool has one,
 * else a new mapping. Returns 0 and fills *st, or -1 with errno ENOMEM (the
 * size does not fit the address space, mmap or mprotect failed: out of
 * memory, RLIMIT_AS or vm.max_map_count); nothing is left mapped then. The
 * first call of the process installs the overflow handler, the first on a
 * thread its alternate signal stack (see above). A reused stack holds what
 * its previous fiber left in it. */
ZEV_INTERNAL int zev__stack_get(zev__stack_pool_t *pool, size_t size, zev__stack_t *st);

/* Gives a stack back: kept idle if the pool's limits allow, else unmapped.
 * Its fiber must have finished (zev__ctx_exit) or never run. *st is cleared. */
ZEV_INTERNAL void zev__stack_put(zev__stack_pool_t *pool, zev__stack_t *st);

/* Makes the calling thread ready to report an overflow (the handler, once
 * per process; an alternate signal stack, once per thread). zev__stack_get
 * calls it; so must a thread that runs fibers on stacks another thread got
 * (a loop moved to another thread). Cheap after the first call. */
ZEV_INTERNAL void zev__stack_thread_ready(void);

/* The running fiber's stack, for the overflow handler: lo is NULL while a
 * main context runs. zev__ctx_switch and zev__ctx_exit set it on every
 * switch (the fiber layer does nothing for it). Initial-exec TLS, so the
 * handler reads it with one load: no __tls_get_addr, no allocation, safe in
 * a signal handler. */
typedef struct zev__running_stack {
    char *lo;
    size_t size;
} zev__running_stack_t;
extern _Thread_local zev__running_stack_t zev__running_stack
    __attribute__((tls_model("initial-exec"), visibility("hidden")));

#endif /* ZEV_STACK_H */
