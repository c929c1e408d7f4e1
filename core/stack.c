/*
 * Fiber stacks: guarded mappings, the per-owner pool, the overflow report
 * (see stack.h for the contract).
 *
 * Design notes
 * - A stack is mapped PROT_NONE as a whole, then everything above the
 *   guard (ZEV__STACK_GUARD, 64 KiB) is made read-write: the guard is never
 *   charged as committed memory, and a failure of either call (ENOMEM, vm.max_map_count)
 *   leaves nothing behind (munmap of a whole mapping cannot fail for lack of
 *   VMAs: it splits none).
 * - The pool is a LIFO list threaded through the idle stacks themselves (a
 *   node at the top of each), so it never allocates and the stack handed
 *   out next is the one whose pages are most likely still in cache. A get
 *   takes the first idle stack of the exact size: with few sizes in use the
 *   head matches, and the list is bounded by max_idle anyway.
 * - The overflow handler runs on the faulting thread's alternate stack. It
 *   only reads the initial-exec thread-local zev__running_stack (written by
 *   the context switch, same thread, so no ordering question arises), the
 *   page size and the saved previous actions (both written once, before
 *   the handler is installed), and calls only async-signal-safe functions:
 *   write, sigaction, pthread_sigmask, raise. It never allocates.
 * - Emulating the previous action: returning from a handler re-executes
 *   the faulting instruction, so "let the default action happen" is
 *   "restore SIG_DFL and return" for a fault, and "restore SIG_DFL, raise,
 *   return" for a SIGSEGV sent with kill (si_code <= 0), which would not
 *   come back by itself. A fault under SIG_IGN cannot be ignored either:
 *   the kernel forces the default action, and so do we.
 * - ASan builds install neither handler nor alternate stack: ASan's own
 *   SIGSEGV handler reports stack-overflow, with a stack trace. ASan's
 *   shadow of a returned stack is cleared before the pool writes its node
 *   into it (the dead fiber's redzones are still poisoned).
 */
#include "stack.h"
#include "ctx.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef ZEV__ASAN
#include <sanitizer/asan_interface.h>
#endif

#ifndef MAP_STACK
#define MAP_STACK 0
#endif

#define ALTSTACK_SIZE ((size_t)64 * 1024)

_Thread_local zev__running_stack_t zev__running_stack __attribute__((tls_model("initial-exec")));

/* The guard below a stack: ZEV__STACK_GUARD bytes, whole pages. A single
 * frame larger than the guard could step over it into whatever is mapped
 * below; 64 KiB of PROT_NONE costs no memory and no extra mapping. */
static size_t guard_bytes(size_t page)
{
    return (ZEV__STACK_GUARD + page - 1) & ~(page - 1);
}

/* What the pool keeps at the top of an idle stack. */
struct zev__idle_stack {
    struct zev__idle_stack *next;
    size_t size;
};

static struct zev__idle_stack *idle_node(void *lo, size_t size)
{
    return (struct zev__idle_stack *)(void *)((char *)lo + size - sizeof(struct zev__idle_stack));
}

static void *idle_lo(struct zev__idle_stack *n)
{
    return (char *)(n + 1) - n->size;
}

/* ------------------------------------------------------------ overflow report */
#ifndef ZEV__ASAN

static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static size_t handler_page;
static size_t handler_guard; /* guard_bytes(handler_page) */

static struct sigaction prev_segv, prev_bus; /* as installed before zev's */
static pthread_key_t altstack_key;
static bool altstack_key_made;
static size_t altstack_size;
static _Thread_local bool thread_ready __attribute__((tls_model("initial-exec")));

static void set_default(int sig)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

static char *put_hex(char *p, uintptr_t v)
{
    char tmp[2 * sizeof v];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    *p++ = '0';
    *p++ = 'x';
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_dec(char *p, size_t v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_str(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

static void report_overflow(zev__running_stack_t run)
{
    char buf[200];
    char *p = put_str(buf, "zev: fiber stack overflow (stack ");
    p = put_hex(p, (uintptr_t)run.lo);
    p = put_str(p, "-");
    p = put_hex(p, (uintptr_t)run.lo + run.size);
    p = put_str(p, ", ");
    p = put_dec(p, run.size);
    p = put_str(p, " bytes); raise zev_fiber_opts_t.stack_size\n");
    (void)!write(STDERR_FILENO, buf, (size_t)(p - buf));
}

/* Runs the action that was installed before zev's, as the kernel would. */
static void chain(int sig, siginfo_t *si, void *uc)
{
    const struct sigaction *prev = sig == SIGSEGV ? &prev_segv : &prev_bus;
    bool sent = si->si_code <= 0; /* kill/raise/sigqueue, not a fault */

    if (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler == SIG_IGN) {
        if (!sent)
            set_default(sig);
        return;
    }
    if (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler == SIG_DFL) {
        set_default(sig);
        if (sent)
            raise(sig); /* pending until this handler returns */
        return;
    }
    sigset_t old, unblock;
    pthread_sigmask(SIG_BLOCK, &prev->sa_mask, &old);
    if (prev->sa_flags & SA_NODEFER) {
        sigemptyset(&unblock);
        sigaddset(&unblock, sig);
        pthread_sigmask(SIG_UNBLOCK, &unblock, NULL);
    }
    if (prev->sa_flags & SA_RESETHAND)
        set_default(sig);
    if (prev->sa_flags & SA_SIGINFO)
        prev->sa_sigaction(sig, si, uc);
    else
        prev->sa_handler(sig);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void on_fault(int sig, siginfo_t *si, void *uc)
{
    int saved_errno = errno;
    zev__running_stack_t run = zev__running_stack;
    uintptr_t addr = (uintptr_t)si->si_addr, lo = (uintptr_t)run.lo;
    if (run.lo && si->si_code > 0 && addr < lo && addr >= lo - handler_guard) {
        report_overflow(run);
        set_default(sig); /* the instruction faults again, and kills */
    } else {
        chain(sig, si, uc);
    }
    errno = saved_errno;
}

static void altstack_free(void *mem)
{
    stack_t cur, off;
    if (sigaltstack(NULL, &cur) == 0 && cur.ss_sp == (char *)mem + handler_page &&
        !(cur.ss_flags & SS_ONSTACK)) {
        memset(&off, 0, sizeof off);
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, NULL);
    }
    munmap(mem, altstack_size + handler_page);
}

static void install(void)
{
    handler_page = (size_t)sysconf(_SC_PAGESIZE);
    handler_guard = guard_bytes(handler_page);
    altstack_size = ALTSTACK_SIZE;
    if ((size_t)SIGSTKSZ > altstack_size)
        altstack_size = ((size_t)SIGSTKSZ + handler_page - 1) & ~(handler_page - 1);
    altstack_key_made = pthread_key_create(&altstack_key, altstack_free) == 0;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    /* Each call saves the previous action and installs zev's at once. */
    sigaction(SIGSEGV, &sa, &prev_segv);
    sigaction(SIGBUS, &sa, &prev_bus);
}

/* The handler (once per process) and an alternate signal stack (once per
 * thread, unless the thread has one), before a stack is handed out. */
void zev__stack_thread_ready(void)
{
    if (thread_ready)
        return;
    thread_ready = true;
    pthread_once(&install_once, install);

    stack_t cur;
    if (sigaltstack(NULL, &cur) != 0 || !(cur.ss_flags & SS_DISABLE))
        return; /* the thread has its own */
    char *mem = mmap(NULL, altstack_size + handler_page, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (mem == MAP_FAILED)
        return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = mem + handler_page; /* guard page below, as for fibers */
    ss.ss_size = altstack_size;
    if (mprotect(ss.ss_sp, altstack_size, PROT_READ | PROT_WRITE) != 0 ||
        sigaltstack(&ss, NULL) != 0) {
        munmap(mem, altstack_size + handler_page);
        return;
    }
    if (altstack_key_made)
        pthread_setspecific(altstack_key, mem);
}

#else /* ZEV__ASAN: ASan owns SIGSEGV */

void zev__stack_thread_ready(void)
{
}

#endif

/* -------------------------------------------------------------------- pool */

void zev__stack_pool_init(zev__stack_pool_t *pool)
{
    memset(pool, 0, sizeof *pool);
    pool->max_idle = ZEV__STACK_POOL_MAX_IDLE;
    pool->max_idle_bytes = ZEV__STACK_POOL_MAX_IDLE_BYTES;
    pool->page = (size_t)sysconf(_SC_PAGESIZE);
}

static void unmap(zev__stack_pool_t *pool, void *lo, size_t size)
{
    size_t guard = guard_bytes(pool->page);
    munmap((char *)lo - guard, size + guard);
    pool->mapped--;
}

void zev__stack_pool_fini(zev__stack_pool_t *pool)
{
    while (pool->idle) {
        struct zev__idle_stack *n = pool->idle;
        pool->idle = n->next;
        unmap(pool, idle_lo(n), n->size);
    }
    pool->idle_count = 0;
    pool->idle_bytes = 0;
}

int zev__stack_get(zev__stack_pool_t *pool, size_t size, zev__stack_t *st)
{
    size_t page = pool->page;
    if (size == 0)
        size = ZEV__STACK_DEFAULT_SIZE;
    if (size > SIZE_MAX / 2) { /* no room for rounding and the guard */
        errno = ENOMEM;
        return -1;
    }
    size = (size + page - 1) & ~(page - 1);

    for (struct zev__idle_stack **pn = &pool->idle; *pn; pn = &(*pn)->next) {
        struct zev__idle_stack *n = *pn;
        if (n->size != size)
            continue;
        *pn = n->next;
        pool->idle_count--;
        pool->idle_bytes -= size;
        pool->reuses++;
        st->lo = idle_lo(n);
        st->size = size;
        zev__stack_thread_ready();
        return 0;
    }

    size_t guard = guard_bytes(page);
    if (size > SIZE_MAX - guard) {
        errno = ENOMEM;
        return -1;
    }
    char *base = mmap(NULL, size + guard, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (base == MAP_FAILED) {
        errno = ENOMEM;
        return -1;
    }
    if (mprotect(base + guard, size, PROT_READ | PROT_WRITE) != 0) {
        munmap(base, size + guard);
        errno = ENOMEM;
        return -1;
    }
    pool->maps++;
    pool->mapped++;
    st->lo = base + guard;
    st->size = size;
    zev__stack_thread_ready();
    return 0;
}

void zev__stack_put(zev__stack_pool_t *pool, zev__stack_t *st)
{
    if (!st->lo)
        return;
#ifdef ZEV__ASAN
    __asan_unpoison_memory_region(st->lo, st->size);
#endif
    if (pool->idle_count < pool->max_idle && pool->idle_bytes <= pool->max_idle_bytes &&
        st->size <= pool->max_idle_bytes - pool->idle_bytes) {
        struct zev__idle_stack *n = idle_node(st->lo, st->size);
        n->next = pool->idle;
        n->size = st->size;
        pool->idle = n;
        pool->idle_count++;
        pool->idle_bytes += st->size;
    } else {
        unmap(pool, st->lo, st->size);
    }
    st->lo = NULL;
    st->size = 0;
}
