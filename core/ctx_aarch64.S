/*
 * Context switch for aarch64 AAPCS64 (ELF). See ctx.c's design notes.
 *
 * A suspended context is a 176-byte record at the top of its own stack; its
 * zev__ctx_t.sp points at the record:
 *
 *   sp+0    d8  d9           low halves of v8-v15: callee-saved
 *   sp+16   d10 d11
 *   sp+32   d12 d13
 *   sp+48   d14 d15
 *   sp+64   x19 x20          the callee-saved general registers
 *   sp+80   x21 x22
 *   sp+96   x23 x24
 *   sp+112  x25 x26
 *   sp+128  x27 x28
 *   sp+144  x29 (fp) x30 (lr: where the context resumes)
 *   sp+160  FPCR             rounding mode etc.: callee-saved
 *   sp+168  (padding: sp stays 16-byte aligned)
 *
 * The caller-saved registers need no saving: zev__ctx_jump is an ordinary
 * call for the compiler. FPSR (the sticky exception flags) is caller-saved
 * and left alone.
 */
#include "ctx.h"

#if ZEV__CTX_ASM && defined(__aarch64__)

/* With -mbranch-protection=bti: a landing pad for indirect calls (a veneer
 * may reach zev__ctx_jump through br x16/x17) and a property note saying
 * the object is BTI-compatible. The trampoline is reached by `ret`, which
 * BTI does not check. */
#if defined(__ARM_FEATURE_BTI_DEFAULT) && __ARM_FEATURE_BTI_DEFAULT
#define ZEV_BTI_C hint #34
#else
#define ZEV_BTI_C
#endif

    .text

/*
 * void *zev__ctx_jump(void **save_sp, void *load_sp, void *ret)
 *
 * Stores the running context's record on its stack and its address in
 * *save_sp (x0), then loads the record at load_sp (x1) and returns into
 * that context with ret (x2) as the value of the zev__ctx_jump call that
 * suspended it (or, for a new context, in x0 at zev__ctx_trampoline).
 */
    .globl  zev__ctx_jump
    .hidden zev__ctx_jump
    .type   zev__ctx_jump, %function
    .p2align 4
zev__ctx_jump:
    ZEV_BTI_C
    sub     sp, sp, #176
    stp     d8, d9, [sp, #0]
    stp     d10, d11, [sp, #16]
    stp     d12, d13, [sp, #32]
    stp     d14, d15, [sp, #48]
    stp     x19, x20, [sp, #64]
    stp     x21, x22, [sp, #80]
    stp     x23, x24, [sp, #96]
    stp     x25, x26, [sp, #112]
    stp     x27, x28, [sp, #128]
    stp     x29, x30, [sp, #144]
    mrs     x9, fpcr
    str     x9, [sp, #160]

    mov     x10, sp
    str     x10, [x0]           /* suspended */
    mov     sp, x1              /* now on the other context's stack */

    ldp     d8, d9, [sp, #0]
    ldp     d10, d11, [sp, #16]
    ldp     d12, d13, [sp, #32]
    ldp     d14, d15, [sp, #48]
    ldp     x19, x20, [sp, #64]
    ldp     x21, x22, [sp, #80]
    ldp     x23, x24, [sp, #96]
    ldp     x25, x26, [sp, #112]
    ldp     x27, x28, [sp, #128]
    ldp     x29, x30, [sp, #144]
    ldr     x10, [sp, #160]
    cmp     x9, x10             /* writing FPCR can stall the pipeline: */
    b.eq    1f                  /* skip it when both contexts agree */
    msr     fpcr, x10
1:
    add     sp, sp, #176
    mov     x0, x2
    ret
    .size   zev__ctx_jump, .-zev__ctx_jump

/*
 * First code of a context made by zev__ctx_make, reached by the `ret` of
 * zev__ctx_jump. The initial record put self, entry and arg in x19, x20,
 * x21, zero in x29 (frame-pointer walks end here), and left sp at the
 * 16-byte aligned top of the stack. x0 holds the context that switched
 * here. zev__ctx_start never returns. The CFI marks the return address as
 * undefined: unwinders stop here.
 */
    .globl  zev__ctx_trampoline
    .hidden zev__ctx_trampoline
    .type   zev__ctx_trampoline, %function
    .p2align 4
zev__ctx_trampoline:
    .cfi_startproc
    .cfi_undefined x30
    mov     x1, x19             /* self (x0 is prev) */
    mov     x2, x20             /* entry */
    mov     x3, x21             /* arg */
    bl      zev__ctx_start
    brk     #1
    .cfi_endproc
    .size   zev__ctx_trampoline, .-zev__ctx_trampoline

#if defined(__ARM_FEATURE_BTI_DEFAULT) && __ARM_FEATURE_BTI_DEFAULT
    .pushsection .note.gnu.property, "a"
    .p2align 3
    .long   4                   /* name size */
    .long   16                  /* descriptor size */
    .long   5                   /* NT_GNU_PROPERTY_TYPE_0 */
    .asciz  "GNU"
    .long   0xc0000000          /* GNU_PROPERTY_AARCH64_FEATURE_1_AND */
    .long   4
    .long   1                   /* BTI */
    .p2align 3
    .popsection
#endif

#endif /* ZEV__CTX_ASM && __aarch64__ */

/* Non-executable stack (also when the file assembles to nothing). */
#if defined(__ELF__)
    .section .note.GNU-stack, "", %progbits
#endif
