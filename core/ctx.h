/*
 * Execution contexts for fibers: switching stacks and what must be told to
 * the sanitizers on each switch. No scheduling here (see docs/design.md,
 * "Fibers"); stacks come from core/stack.h. Internal, loop thread only.
 *
 * A context is either a thread's own ("main") context, made with
 * zev__ctx_init_main, or one made on a caller-provided stack with
 * zev__ctx_make. Exactly one context runs on a thread at a time; a switch
 * suspends the running one (`from`) and resumes another (`to`) where it was
 * suspended, or at its entry function the first time.
 *
 * Rules every caller must keep (nothing checks them in release builds):
 * - A context runs on the thread that made it (init_main: the calling
 *   thread; make: the thread that first switches to it) and only there:
 *   the compiler may cache addresses of thread-local variables (errno)
 *   across a switch, and the sanitizers' fiber state is per thread.
 * - `from` is the context running now; `to` is suspended (made and never
 *   run, or switched away from), never the running one, never finished.
 * - A context's entry function must never return: a fiber ends with
 *   zev__ctx_exit. Returning is an internal bug; it is reported on stderr
 *   and aborts (the one abort of this module: there is no caller to return
 *   an error to).
 * - The x87 and SSE control words (x86-64) or FPCR (aarch64) are part of a
 *   context: a rounding mode set in one context stays there. A new context
 *   starts with those of the thread that called zev__ctx_make.
 *
 * Switching costs about one function call plus the saved registers (see
 * perf/ctxswitch.c). The ucontext fallback (architectures other than
 * x86-64 and aarch64 ELF, or -DZEV_FIBER_UCONTEXT=ON) is much slower:
 * glibc's swapcontext makes an rt_sigprocmask system call on every switch
 * to save and restore the signal mask, which zev never changes per fiber.
 */
#ifndef ZEV_CTX_H
#define ZEV_CTX_H

/* ZEV__CTX_ASM: 1 when the hand-written switch (ctx_x86_64.S,
 * ctx_aarch64.S) is used, 0 for the ucontext fallback. Also read by the .S
 * files, which assemble to nothing when it is 0 or not their architecture. */
#if !defined(ZEV_FIBER_UCONTEXT) && defined(__ELF__) && !defined(__ILP32__) &&                     \
    (defined(__x86_64__) || defined(__aarch64__))
#define ZEV__CTX_ASM 1
#else
#define ZEV__CTX_ASM 0
#endif

#ifndef __ASSEMBLER__

#include <stdbool.h>
#include <stddef.h>

#ifndef ZEV_INTERNAL
#define ZEV_INTERNAL __attribute__((visibility("hidden")))
#endif

/* Which sanitizer this translation unit is built with (clang spells it
 * __has_feature, gcc defines the macros). */
#if defined(__SANITIZE_ADDRESS__)
#define ZEV__ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ZEV__ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define ZEV__TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ZEV__TSAN 1
#endif
#endif

/* One context. The caller owns the memory (embed it; nothing here is on the
 * heap) and must not touch the fields. The layout is the same in every
 * build, sanitizers or not. */
typedef struct zev__ctx {
    void *sp;          /* suspended: where its registers are saved (on its own stack) */
    void *stack_lo;    /* lowest byte of its stack (main: as ASan reported it, or NULL) */
    size_t stack_size; /* bytes from stack_lo up */
    void *asan_fake;   /* ASan: its fake stack while it is suspended */
    void *tsan_fiber;  /* TSan: its fiber (main: the thread's, not owned) */
    unsigned vg_stack; /* valgrind: its stack registration, 0 if none */
    bool main;         /* made by zev__ctx_init_main */
} zev__ctx_t;

/* Makes ctx stand for the calling thread's running context, so that it can
 * be switched away from (and back to). Cannot fail. Release it with
 * zev__ctx_destroy (a no-op today) or simply forget it. */
ZEV_INTERNAL void zev__ctx_init_main(zev__ctx_t *ctx);

/* Makes a context that, when first switched to, calls entry(arg) on the
 * stack [stack_lo, stack_lo + size). The stack stays the caller's: it must
 * outlive the context (until zev__ctx_exit has switched away from it) and
 * is not freed by zev__ctx_destroy. The initial register record goes at its
 * top (80 bytes on x86-64, 176 on aarch64; the ucontext fallback puts a
 * ucontext_t there, about 1 KiB on x86-64). Under ASan the stack's shadow is cleared, so a stack
 * reused from a finished fiber starts clean; under valgrind the stack is registered. Returns 0, or
 * -1 with EINVAL (NULL ctx, stack or entry, or a stack below 4 KiB) or the error of getcontext
 * (fallback only). Allocates nothing, except TSan's fiber state in TSan builds. */
ZEV_INTERNAL int zev__ctx_make(zev__ctx_t *ctx, void *stack_lo, size_t size,
                               void (*entry)(void *arg), void *arg);

/* Suspends the running context, saving it into `from`, and resumes `to`.
 * Returns when some other context switches back to `from`. Both must be
 * the caller's thread's (see the rules above). Also tells the stack
 * overflow handler which fiber stack is running (core/stack.h), and ASan,
 * TSan what they need to know; the first thing after the switch, on the
 * resumed side, is ASan's __sanitizer_finish_switch_fiber (done here and in
 * the entry trampoline, before any user code). */
ZEV_INTERNAL void zev__ctx_switch(zev__ctx_t *from, zev__ctx_t *to);

/* The last switch out of a finished fiber: like zev__ctx_switch, but `from`
 * is never resumed, ASan drops its fake stack, and from's stack may be
 * reused or unmapped as soon as `to` runs. `from` itself (the struct) must
 * stay valid until `to` resumes, which reads it once; then `to` should
 * zev__ctx_destroy it. Must be called on from's own stack. */
ZEV_INTERNAL _Noreturn void zev__ctx_exit(zev__ctx_t *from, zev__ctx_t *to);

/* Releases what the sanitizers hold for a context (TSan's fiber, valgrind's
 * stack registration): call it from another context once the context has
 * exited, or for one that was made and never run. A suspended context that
 * has not exited must not be destroyed (its stack frames were never
 * unwound: ASan's fake frames would leak). On a main context: no-op. The
 * struct may then be reused or freed. */
ZEV_INTERNAL void zev__ctx_destroy(zev__ctx_t *ctx);

#endif /* __ASSEMBLER__ */
#endif /* ZEV_CTX_H */
