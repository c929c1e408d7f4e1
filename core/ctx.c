/*
 * Execution contexts: the stack switch under the fibers (see ctx.h).
 *
 * Design notes
 * - What a switch saves. Only what the ABI makes callee-saved, because the
 *   switch is an ordinary function call for the compiler: on x86-64 rbx,
 *   rbp, r12-r15, rsp, the MXCSR control bits and the x87 control word; on
 *   aarch64 x19-x28, fp, lr, sp, d8-d15 and FPCR. They go in a small
 *   record pushed on the suspended context's own stack (ctx_x86_64.S,
 *   ctx_aarch64.S); zev__ctx_t keeps only the record's address, so a
 *   context costs no heap memory and a switch touches two cache lines of
 *   stack. The FP control words are saved because a rounding mode is
 *   per-thread hardware state: without them, fesetround in one fiber would
 *   change the arithmetic of every other fiber and of the loop. The signal
 *   mask is not saved (zev never changes it per fiber), nor the TLS stack
 *   protector canary (one per thread, the same for every context).
 * - A new context is a forged record at the top of its stack whose return
 *   address is zev__ctx_trampoline, with self, entry and arg in callee-saved
 *   registers and the FP control words of the thread that made it. The
 *   trampoline calls zev__ctx_start with the stack 16-byte aligned at the
 *   call; zev__ctx_start never returns (a fiber ends in zev__ctx_exit).
 * - zev__ctx_jump hands a value to the resumed side: the context that
 *   switched to it. ASan needs it (below); no global "current" is kept.
 * - ucontext fallback (other architectures, or ZEV_FIBER_UCONTEXT): the
 *   ucontext_t of a suspended context lives in the frame of the
 *   zev__ctx_switch call that suspended it, and ctx->sp points at it; a new
 *   context's lives at the top of its stack. The switching-from context is
 *   passed in a thread-local. glibc's swapcontext also saves and restores
 *   the signal mask: one rt_sigprocmask system call per switch, about a
 *   hundred times the cost of the rest (perf/ctxswitch.c shows both).
 * - Sanitizers, in the order they must happen on every switch A -> B:
 *     1. tell the overflow handler B's stack (stack.h, zev__running_stack);
 *     2. ASan: __sanitizer_start_switch_fiber(&A->asan_fake, B's stack),
 *        which saves A's fake stack (detect_stack_use_after_return) and
 *        tells ASan where the stack is about to be; on the last switch out
 *        of a finished fiber the save pointer is NULL, which frees A's fake
 *        stack;
 *     3. TSan: __tsan_switch_to_fiber(B's fiber, 0) immediately before the
 *        jump; flags 0 makes the switch a happens-before edge (A's writes
 *        are visible to B, as they are on one thread);
 *     4. the jump;
 *     5. on B, before anything else (including B's first entry, in
 *        zev__ctx_start): ASan's __sanitizer_finish_switch_fiber(B's fake
 *        stack), which also reports A's stack bounds. A main context learns
 *        its own bounds that way: only ASan knows the thread's stack.
 *   These functions are built without ASan instrumentation so that nothing
 *   ASan sees runs on the new stack before step 5, and steps 1-5 are
 *   inlined into the function that jumps: TSan keeps a shadow call stack
 *   per fiber, and a helper called before the jump but returning after
 *   __tsan_switch_to_fiber would pop the new fiber's stack (it underflows
 *   and TSan crashes a few switches later).
 *   TSan's fibers are made in zev__ctx_make and destroyed in
 *   zev__ctx_destroy (never the running one); a main context borrows the
 *   thread's. ASan: zev__ctx_make clears the stack's shadow, because the
 *   frames of a fiber that ended in zev__ctx_exit never returned and their
 *   poisoned redzones would otherwise greet the stack's next fiber.
 *   valgrind: every made stack is registered (VALGRIND_STACK_REGISTER) so
 *   memcheck sees a stack switch, not a huge stack-pointer jump.
 */
#include "ctx.h"
#include "stack.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if !ZEV__CTX_ASM
#include <ucontext.h>
#endif
#ifdef ZEV__ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ZEV_NO_ASAN __attribute__((no_sanitize_address))
#else
#define ZEV_NO_ASAN
#endif
#ifdef ZEV__TSAN
#include <sanitizer/tsan_interface.h>
#endif
#ifdef ZEV_HAVE_VALGRIND
#include <valgrind/valgrind.h>
#endif

#define MIN_STACK 4096

/* ctx_<arch>.S */
#if ZEV__CTX_ASM
ZEV_INTERNAL void *zev__ctx_jump(void **save_sp, void *load_sp, void *ret);
ZEV_INTERNAL void zev__ctx_trampoline(void);
#endif
/* Called by the trampoline: the first code of every made context. */
ZEV_INTERNAL _Noreturn void zev__ctx_start(zev__ctx_t *prev, zev__ctx_t *self,
                                           void (*entry)(void *), void *arg);

/* Steps 1-3 of the design notes, on the side being suspended. fake_save is
 * NULL on the last switch out of a finished context. Always inlined: TSan
 * keeps a shadow call stack per fiber, so the function that calls
 * __tsan_switch_to_fiber must be the one that jumps (a helper's return
 * would be recorded on the new fiber's shadow stack). */
static inline __attribute__((always_inline)) ZEV_NO_ASAN void switch_begin(void **fake_save,
                                                                           const zev__ctx_t *to)
{
    zev__running_stack.lo = to->main ? NULL : (char *)to->stack_lo;
    zev__running_stack.size = to->stack_size;
#ifdef ZEV__ASAN
    __sanitizer_start_switch_fiber(fake_save, to->stack_lo, to->stack_size);
#else
    (void)fake_save;
#endif
#ifdef ZEV__TSAN
    __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
}

/* Step 5, the first thing on the resumed side: self is running again,
 * prev is the context that switched to it (suspended or exited, and still
 * valid memory either way). */
static inline __attribute__((always_inline)) ZEV_NO_ASAN void switch_done(zev__ctx_t *self,
                                                                          zev__ctx_t *prev)
{
#ifdef ZEV__ASAN
    const void *lo;
    size_t size;
    __sanitizer_finish_switch_fiber(self->asan_fake, &lo, &size);
    if (prev->main) {
        prev->stack_lo = (void *)(uintptr_t)lo;
        prev->stack_size = size;
    }
#else
    (void)self;
    (void)prev;
#endif
}

static _Noreturn void internal_bug(const char *msg)
{
    static const char head[] = "zev: internal error: ";
    (void)!write(STDERR_FILENO, head, sizeof head - 1);
    (void)!write(STDERR_FILENO, msg, strlen(msg));
    abort();
}

void zev__ctx_init_main(zev__ctx_t *ctx)
{
    memset(ctx, 0, sizeof *ctx);
    ctx->main = true;
#ifdef ZEV__TSAN
    ctx->tsan_fiber = __tsan_get_current_fiber();
#endif
}

ZEV_NO_ASAN _Noreturn void zev__ctx_start(zev__ctx_t *prev, zev__ctx_t *self, void (*entry)(void *),
                                          void *arg)
{
    switch_done(self, prev);
    entry(arg);
    internal_bug("a fiber context's entry function returned\n");
}

/* ------------------------------------------------------- hand-written switch */
#if ZEV__CTX_ASM

/* Forges the record zev__ctx_jump will pop (see the .S file for its
 * layout) below `top`; returns its address. */
static void *initial_record(char *top, zev__ctx_t *self, void (*entry)(void *), void *arg)
{
#if defined(__x86_64__)
    /* 64-byte record + 16 bytes of zeros above it. After the trampoline's
     * return address is popped rsp is top - 16: 16-byte aligned. */
    uint64_t *r = (uint64_t *)(void *)(top - 80);
    uint32_t mxcsr;
    uint16_t x87cw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(x87cw));
    memset(r, 0, 80);
    r[0] = mxcsr | (uint64_t)x87cw << 32;
    r[1] = (uintptr_t)self;  /* r12 */
    r[2] = (uintptr_t)entry; /* r13 */
    r[3] = (uintptr_t)arg;   /* r14 */
    r[7] = (uintptr_t)zev__ctx_trampoline;
#elif defined(__aarch64__)
    /* 176-byte record; once it is popped sp is top: 16-byte aligned. */
    uint64_t *r = (uint64_t *)(void *)(top - 176);
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    memset(r, 0, 176);
    r[8] = (uintptr_t)self;                 /* x19 */
    r[9] = (uintptr_t)entry;                /* x20 */
    r[10] = (uintptr_t)arg;                 /* x21 */
    r[19] = (uintptr_t)zev__ctx_trampoline; /* x30 */
    r[20] = fpcr;
#endif
    return r;
}

ZEV_NO_ASAN void zev__ctx_switch(zev__ctx_t *from, zev__ctx_t *to)
{
    void *to_sp = to->sp;
    switch_begin(&from->asan_fake, to);
    zev__ctx_t *prev = zev__ctx_jump(&from->sp, to_sp, from);
    switch_done(from, prev);
}

ZEV_NO_ASAN _Noreturn void zev__ctx_exit(zev__ctx_t *from, zev__ctx_t *to)
{
    void *to_sp = to->sp;
    switch_begin(NULL, to);
    zev__ctx_jump(&from->sp, to_sp, from);
    internal_bug("an exited fiber context was resumed\n");
}

/* ---------------------------------------------------------- ucontext fallback */
#else

/* A new context's start: its first ucontext_t, then what makecontext
 * cannot pass portably (it passes ints only). */
struct uc_start {
    ucontext_t uc;
    void (*entry)(void *);
    void *arg;
};

/* The context that switched to the one now resuming (see switch_done). */
static _Thread_local zev__ctx_t *uc_prev __attribute__((tls_model("initial-exec")));

static void uc_trampoline(unsigned self_hi, unsigned self_lo)
{
    zev__ctx_t *self = (zev__ctx_t *)(((uintptr_t)self_hi << 16 << 16) | self_lo);
    /* self->sp still points at its uc_start: self has not run yet. */
    struct uc_start *s = self->sp;
    zev__ctx_start(uc_prev, self, s->entry, s->arg);
}

static void *initial_record(char *top, zev__ctx_t *self, void (*entry)(void *), void *arg)
{
    struct uc_start *s = (struct uc_start *)(void *)((uintptr_t)(top - sizeof *s) & ~(uintptr_t)15);
    if (getcontext(&s->uc) != 0)
        return NULL;
    s->entry = entry;
    s->arg = arg;
    s->uc.uc_link = NULL;
    s->uc.uc_stack.ss_sp = self->stack_lo;
    s->uc.uc_stack.ss_size = (size_t)((char *)s - (char *)self->stack_lo);
    s->uc.uc_stack.ss_flags = 0;
    uintptr_t p = (uintptr_t)self;
    makecontext(&s->uc, (void (*)(void))uc_trampoline, 2, (unsigned)(p >> 16 >> 16),
                (unsigned)(p & 0xffffffffu));
    return &s->uc;
}

ZEV_NO_ASAN void zev__ctx_switch(zev__ctx_t *from, zev__ctx_t *to)
{
    ucontext_t here;
    /* ASan's swapcontext interceptor clears the shadow of the target's
     * uc_stack: this one has no stack of its own to clear. */
    here.uc_stack.ss_sp = NULL;
    here.uc_stack.ss_size = 0;
    here.uc_stack.ss_flags = 0;
    ucontext_t *target = to->sp;
    from->sp = &here;
    switch_begin(&from->asan_fake, to);
    uc_prev = from;
    if (swapcontext(&here, target) != 0)
        internal_bug("swapcontext failed\n");
    switch_done(from, uc_prev);
}

ZEV_NO_ASAN _Noreturn void zev__ctx_exit(zev__ctx_t *from, zev__ctx_t *to)
{
    switch_begin(NULL, to);
    uc_prev = from;
    setcontext(to->sp);
    internal_bug("setcontext failed\n");
}

#endif /* ZEV__CTX_ASM */

int zev__ctx_make(zev__ctx_t *ctx, void *stack_lo, size_t size, void (*entry)(void *arg), void *arg)
{
    if (!ctx || !stack_lo || !entry || size < MIN_STACK) {
        errno = EINVAL;
        return -1;
    }
    memset(ctx, 0, sizeof *ctx);
    ctx->stack_lo = stack_lo;
    ctx->stack_size = size;
#ifdef ZEV__ASAN
    __asan_unpoison_memory_region(stack_lo, size);
#endif
    char *top = (char *)((uintptr_t)stack_lo + size);
    ctx->sp = initial_record((char *)((uintptr_t)top & ~(uintptr_t)15), ctx, entry, arg);
    if (!ctx->sp)
        return -1;
#ifdef ZEV__TSAN
    ctx->tsan_fiber = __tsan_create_fiber(0);
#endif
#ifdef ZEV_HAVE_VALGRIND
    ctx->vg_stack = VALGRIND_STACK_REGISTER(stack_lo, top);
#endif
    return 0;
}

void zev__ctx_destroy(zev__ctx_t *ctx)
{
    if (!ctx || ctx->main)
        return;
#ifdef ZEV__TSAN
    if (ctx->tsan_fiber)
        __tsan_destroy_fiber(ctx->tsan_fiber);
#endif
#ifdef ZEV_HAVE_VALGRIND
    if (ctx->vg_stack)
        VALGRIND_STACK_DEREGISTER(ctx->vg_stack);
#endif
    ctx->tsan_fiber = NULL;
    ctx->vg_stack = 0;
}
