/*
 * Context switch for x86-64 System V (ELF). See ctx.c's design notes.
 *
 * A suspended context is a 64-byte record at the top of its own stack; its
 * zev__ctx_t.sp points at the record:
 *
 *   sp+0   MXCSR (4 bytes)   control bits are callee-saved (status bits
 *   sp+4   x87 control word  are not, but restoring them is harmless)
 *   sp+8   r12               the callee-saved general registers
 *   sp+16  r13
 *   sp+24  r14
 *   sp+32  r15
 *   sp+40  rbx
 *   sp+48  rbp
 *   sp+56  return address    where the context resumes
 *
 * The caller-saved registers need no saving: zev__ctx_jump is an ordinary
 * call for the compiler, which already assumes they are clobbered. The
 * record's address is 16-byte aligned (the call left rsp at 8 mod 16, and
 * 56 bytes are pushed below the return address).
 */
#include "ctx.h"

#if ZEV__CTX_ASM && defined(__x86_64__)

/* With -fcf-protection: an IBT landing pad where the function may be
 * reached by an indirect call, and a property note saying the object is
 * IBT-compatible. It does not claim shadow-stack (SHSTK) compatibility:
 * the switch returns to a different call site than the one that called it,
 * so the linker must drop SHSTK from any binary that contains this. */
#if defined(__CET__) && (__CET__ & 1)
#define ZEV_ENDBR endbr64
#else
#define ZEV_ENDBR
#endif

    .text

/*
 * void *zev__ctx_jump(void **save_sp, void *load_sp, void *ret)
 *
 * Pushes the running context's record on its stack and stores its address
 * in *save_sp (rdi), then pops the record at load_sp (rsi) and returns into
 * that context, with ret (rdx) as the value of the zev__ctx_jump call that
 * suspended it (or, for a new context, in rax at zev__ctx_trampoline).
 */
    .globl  zev__ctx_jump
    .hidden zev__ctx_jump
    .type   zev__ctx_jump, @function
    .p2align 4
zev__ctx_jump:
    ZEV_ENDBR
    pushq   %rbp
    pushq   %rbx
    pushq   %r15
    pushq   %r14
    pushq   %r13
    pushq   %r12
    subq    $8, %rsp
    stmxcsr (%rsp)
    fnstcw  4(%rsp)

    movq    %rsp, (%rdi)        /* suspended */
    movq    %rsi, %rsp          /* now on the other context's stack */

    ldmxcsr (%rsp)
    fldcw   4(%rsp)
    addq    $8, %rsp
    popq    %r12
    popq    %r13
    popq    %r14
    popq    %r15
    popq    %rbx
    popq    %rbp
    movq    %rdx, %rax
    ret
    .size   zev__ctx_jump, .-zev__ctx_jump

/*
 * First code of a context made by zev__ctx_make, reached by the `ret` of
 * zev__ctx_jump. The initial record put self, entry and arg in r12, r13,
 * r14, zero in rbp (frame-pointer walks end here), and left rsp 16-byte
 * aligned, so the call below enters zev__ctx_start as the ABI wants.
 * rax holds the context that switched here. zev__ctx_start never returns.
 * The CFI marks the return address as undefined: unwinders stop here
 * instead of walking into whatever lies above the stack.
 */
    .globl  zev__ctx_trampoline
    .hidden zev__ctx_trampoline
    .type   zev__ctx_trampoline, @function
    .p2align 4
zev__ctx_trampoline:
    .cfi_startproc
    .cfi_undefined rip
    movq    %rax, %rdi          /* prev */
    movq    %r12, %rsi          /* self */
    movq    %r13, %rdx          /* entry */
    movq    %r14, %rcx          /* arg */
    call    zev__ctx_start
    ud2
    .cfi_endproc
    .size   zev__ctx_trampoline, .-zev__ctx_trampoline

#if defined(__CET__) && (__CET__ & 1)
    .pushsection .note.gnu.property, "a"
    .p2align 3
    .long   4                   /* name size */
    .long   16                  /* descriptor size */
    .long   5                   /* NT_GNU_PROPERTY_TYPE_0 */
    .asciz  "GNU"
    .long   0xc0000002          /* GNU_PROPERTY_X86_FEATURE_1_AND */
    .long   4
    .long   1                   /* IBT only */
    .p2align 3
    .popsection
#endif

#endif /* ZEV__CTX_ASM && __x86_64__ */

/* Non-executable stack (also when the file assembles to nothing). */
#if defined(__ELF__)
    .section .note.GNU-stack, "", %progbits
#endif
