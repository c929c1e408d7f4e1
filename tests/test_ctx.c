/*
 * core/ctx.c and core/stack.c: context switches and fiber stacks, below
 * the loop. Backend-independent: built by zev_unit_test, run once.
 *
 * Death tests fork a child that dies; its stderr comes back through a pipe.
 * Non-ASan builds expect zev's own overflow line and death by SIGSEGV
 * (or SIGBUS); ASan builds expect ASan's report, as ASan owns SIGSEGV there.
 */
#include "ctx.h"
#include "stack.h"

#include "common.h"
#include <errno.h>
#include <fenv.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef ZEV_HAVE_VALGRIND
#include <valgrind/valgrind.h>
#define ON_VALGRIND() RUNNING_ON_VALGRIND
/* Before a deliberate fault: memcheck would count it as an error. */
#define EXPECTED_FAULT() VALGRIND_DISABLE_ERROR_REPORTING
#else
#define ON_VALGRIND() 0
#define EXPECTED_FAULT() ((void)0)
#endif

#define KiB ((size_t)1024)

/* ------------------------------------------------------------------ helpers */

/* A fiber made on a pool stack, for tests. */
typedef struct fiber {
    zev__ctx_t ctx;
    zev__stack_t stack;
} fiber_t;

static void fiber_make(fiber_t *f, zev__stack_pool_t *pool, size_t size, void (*fn)(void *),
                       void *arg)
{
    cr_assert_eq(zev__stack_get(pool, size, &f->stack), 0, "stack_get: %s", strerror(errno));
    cr_assert_eq(zev__ctx_make(&f->ctx, f->stack.lo, f->stack.size, fn, arg), 0, "ctx_make: %s",
                 strerror(errno));
}

/* After the fiber has exited (or never ran). */
static void fiber_free(fiber_t *f, zev__stack_pool_t *pool)
{
    zev__ctx_destroy(&f->ctx);
    zev__stack_put(pool, &f->stack);
}

/* Lines of /proc/self/maps (one per VMA). */
static int vma_count(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    cr_assert_not_null(f);
    int n = 0, c;
    while ((c = getc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

/* The permissions ("rw-p", "---p") of the mapping holding addr, or "". */
static void vma_perms(const void *addr, char perms[5])
{
    FILE *f = fopen("/proc/self/maps", "r");
    cr_assert_not_null(f);
    unsigned long lo, hi;
    char p[5];
    perms[0] = '\0';
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx %4s", &lo, &hi, p) == 3 && (uintptr_t)addr >= lo &&
            (uintptr_t)addr < hi) {
            memcpy(perms, p, 5);
            break;
        }
    }
    fclose(f);
}

/* -------------------------------------------------------- switching, order */

static zev__ctx_t pp_main;
static fiber_t pp_fiber;
static int pp_log[16], pp_n;
static long pp_value; /* passed both ways */

static void pp_entry(void *arg)
{
    cr_assert_eq(arg, &pp_value);
    pp_log[pp_n++] = 1;
    cr_assert_eq(pp_value, 100);
    pp_value = 200;
    zev__ctx_switch(&pp_fiber.ctx, &pp_main);
    pp_log[pp_n++] = 3;
    cr_assert_eq(pp_value, 300);
    pp_value = 400;
    zev__ctx_exit(&pp_fiber.ctx, &pp_main);
}

Test(ctx, ping_pong_with_main, .timeout = 30)
{
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    zev__ctx_init_main(&pp_main);
    fiber_make(&pp_fiber, &pool, 0, pp_entry, &pp_value);

    pp_value = 100;
    pp_log[pp_n++] = 0;
    zev__ctx_switch(&pp_main, &pp_fiber.ctx); /* runs pp_entry up to its switch */
    pp_log[pp_n++] = 2;
    cr_assert_eq(pp_value, 200);
    pp_value = 300;
    zev__ctx_switch(&pp_main, &pp_fiber.ctx); /* runs it to its exit */
    pp_log[pp_n++] = 4;
    cr_assert_eq(pp_value, 400);

    cr_assert_eq(pp_n, 5);
    for (int i = 0; i < pp_n; i++)
        cr_assert_eq(pp_log[i], i, "step %d ran as %d", i, pp_log[i]);
    fiber_free(&pp_fiber, &pool);
    zev__ctx_destroy(&pp_main);
    zev__stack_pool_fini(&pool);
    cr_assert_eq(pool.mapped, 0);
}

/* Fibers pass a token around a ring directly, fiber to fiber, ROUNDS
 * times; the last one goes back to main. */
#define RING 8
#define ROUNDS 1000
static zev__ctx_t ring_main;
static fiber_t ring[RING];
static long ring_token;
static int ring_order[RING * 4];
static int ring_n;

static void ring_entry(void *arg)
{
    int me = (int)(intptr_t)arg;
    for (int round = 0; round < ROUNDS; round++) {
        cr_assert_eq(ring_token, (long)round * RING + me, "fiber %d, round %d: token %ld", me,
                     round, ring_token);
        if (ring_n < RING * 4)
            ring_order[ring_n++] = me;
        ring_token++;
        zev__ctx_t *next = me + 1 < RING ? &ring[me + 1].ctx : &ring[0].ctx;
        if (me + 1 == RING && round + 1 == ROUNDS)
            break;
        zev__ctx_switch(&ring[me].ctx, next);
    }
    /* Each fiber ends in turn: the last one first (above), then main
     * resumes the others one by one, each leaving to main. */
    zev__ctx_exit(&ring[me].ctx, &ring_main);
}

Test(ctx, ring_of_fibers, .timeout = 30)
{
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    zev__ctx_init_main(&ring_main);
    for (int i = 0; i < RING; i++)
        fiber_make(&ring[i], &pool, 0, ring_entry, (void *)(intptr_t)i);
    zev__ctx_switch(&ring_main, &ring[0].ctx);
    cr_assert_eq(ring_token, (long)RING * ROUNDS);
    for (int i = 0; i < RING * 4; i++)
        cr_assert_eq(ring_order[i], i % RING);
    /* Fibers 0..RING-2 are suspended in their switch of the last round:
     * resuming each one ends it. */
    fiber_free(&ring[RING - 1], &pool);
    for (int i = 0; i < RING - 1; i++) {
        zev__ctx_switch(&ring_main, &ring[i].ctx);
        fiber_free(&ring[i], &pool);
    }
    zev__stack_pool_fini(&pool);
    cr_assert_eq(pool.mapped, 0);
}

/* --------------------------------------------------- callee-saved registers */

/* Clobbers every callee-saved register this file may use (the frame
 * pointer excepted: sanitizer builds reserve it). Inline, so the values
 * stay clobbered at the switch that follows in the same function. */
static inline void clobber_callee_saved(void)
{
#if defined(__x86_64__)
    __asm__ volatile("movq $-1, %%rbx\n\t"
                     "movq $-2, %%r12\n\t"
                     "movq $-3, %%r13\n\t"
                     "movq $-4, %%r14\n\t"
                     "movq $-5, %%r15\n\t" ::
                         : "rbx", "r12", "r13", "r14", "r15");
#elif defined(__aarch64__)
    __asm__ volatile(
        "mov x19, #-1\n\tmov x20, #-2\n\tmov x21, #-3\n\tmov x22, #-4\n\t"
        "mov x23, #-5\n\tmov x24, #-6\n\tmov x25, #-7\n\tmov x26, #-8\n\t"
        "mov x27, #-9\n\tmov x28, #-10\n\t"
        "fmov d8, #-1.5\n\tfmov d9, #-1.5\n\tfmov d10, #-1.5\n\tfmov d11, #-1.5\n\t"
        "fmov d12, #-1.5\n\tfmov d13, #-1.5\n\tfmov d14, #-1.5\n\tfmov d15, #-1.5\n\t" ::
            : "x19", "x20", "x21", "x22", "x23", "x24", "x25", "x26", "x27", "x28", "d8", "d9",
              "d10", "d11", "d12", "d13", "d14", "d15");
#endif
}

#define MIX_ROUNDS 200
static zev__ctx_t cs_main;
static fiber_t cs_a, cs_b;
static volatile uint64_t cs_seed = 0x9e3779b97f4a7c15u;
static volatile int cs_switch; /* 0: the reference run, without switches */
static volatile int cs_done;
static uint64_t cs_result;
static double cs_dresult;

/* Keeps 12 integers and 4 doubles live across every switch: more than the
 * callee-saved registers, so the compiler uses them all (file built -O2). */
static __attribute__((noinline)) void mix(zev__ctx_t *self, zev__ctx_t *other)
{
    uint64_t s = cs_seed;
    uint64_t a = s * 3, b = s ^ 0x55, c = s + 7, d = s * 5, e = s >> 3, f = s << 2;
    uint64_t g = ~s, h = s * 11, i = s ^ 0xabcdef, j = s + 99, k = s * 13, l = s - 1;
    double x = (double)(s & 0xffff), y = 1.5, z = -2.25, w = (double)(s >> 48);
    for (int r = 0; r < MIX_ROUNDS; r++) {
        if (cs_switch)
            zev__ctx_switch(self, other);
        a = a * 31 + b;
        b ^= c >> 1;
        c += d;
        d = d * 7 + e;
        e ^= f;
        f += g;
        g = g * 3 + h;
        h ^= i << 1;
        i += j;
        j = j * 5 + k;
        k ^= l;
        l += a;
        x = x * 1.000001 + y;
        y = y * 0.999 + z;
        z = z * 1.0001 - w;
        w = w * 0.5 + x * 1e-9;
    }
    cs_result = a ^ b ^ c ^ d ^ e ^ f ^ g ^ h ^ i ^ j ^ k ^ l;
    cs_dresult = x + y + z + w;
}

static void cs_a_entry(void *arg)
{
    (void)arg;
    mix(&cs_a.ctx, &cs_b.ctx);
    zev__ctx_exit(&cs_a.ctx, &cs_main);
}

static void cs_b_entry(void *arg)
{
    (void)arg;
    while (!cs_done) {
        clobber_callee_saved();
        zev__ctx_switch(&cs_b.ctx, &cs_a.ctx);
    }
    zev__ctx_exit(&cs_b.ctx, &cs_main);
}

Test(ctx, callee_saved_registers_survive, .timeout = 30)
{
    cs_switch = 0;
    mix(NULL, NULL);
    uint64_t want = cs_result;
    double dwant = cs_dresult;

    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    zev__ctx_init_main(&cs_main);
    fiber_make(&cs_a, &pool, 0, cs_a_entry, NULL);
    fiber_make(&cs_b, &pool, 0, cs_b_entry, NULL);
    cs_switch = 1;
    cs_result = 0;
    zev__ctx_switch(&cs_main, &cs_a.ctx);
    cr_assert_eq(cs_result, want, "integers: %llx, want %llx", (unsigned long long)cs_result,
                 (unsigned long long)want);
    cr_assert(cs_dresult == dwant, "doubles: %a, want %a", cs_dresult, dwant);
    cs_done = 1;
    zev__ctx_switch(&cs_main, &cs_b.ctx); /* b ends */
    fiber_free(&cs_a, &pool);
    fiber_free(&cs_b, &pool);
    zev__stack_pool_fini(&pool);
}

/* ------------------------------------------------------ floating-point state */

/* The rounding mode as each unit sees it: x86-64 MXCSR and x87 control word
 * separately (fegetround reads only one of them), FPCR on aarch64. */
typedef struct fpmode {
    unsigned sse, x87;
} fpmode_t;

static fpmode_t fp_mode(void)
{
    fpmode_t m = {0, 0};
#if defined(__x86_64__)
    uint32_t mxcsr;
    uint16_t cw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(cw));
    m.sse = (mxcsr >> 13) & 3;
    m.x87 = (cw >> 10) & 3;
#else
    m.sse = m.x87 = (unsigned)fegetround();
#endif
    return m;
}

static zev__ctx_t fp_main;
static fiber_t fp_a, fp_b;
static fpmode_t fp_nearest, fp_zero, fp_up;
static volatile float fp_one = -1.0f, fp_three = 3.0f; /* -1/3 rounds differently up */
static float fp_third_nearest, fp_third_up;
static int fp_arith; /* the arithmetic follows the rounding mode */

static void expect_mode(fpmode_t want, const char *who)
{
    fpmode_t m = fp_mode();
    cr_assert_eq(m.sse, want.sse, "%s: SSE/FPCR rounding %u, want %u", who, m.sse, want.sse);
    cr_assert_eq(m.x87, want.x87, "%s: x87 rounding %u, want %u", who, m.x87, want.x87);
}

static void fp_a_entry(void *arg)
{
    (void)arg;
    expect_mode(fp_nearest, "a, first run");
    cr_assert_eq(fesetround(FE_TOWARDZERO), 0);
    zev__ctx_switch(&fp_a.ctx, &fp_main);
    expect_mode(fp_zero, "a, resumed"); /* its own mode came back */
    fesetround(FE_TONEAREST);
    zev__ctx_exit(&fp_a.ctx, &fp_main);
}

static void fp_b_entry(void *arg)
{
    (void)arg;
    expect_mode(fp_nearest, "b, first run");
    cr_assert_eq(fesetround(FE_UPWARD), 0);
    cr_assert(!fp_arith || fp_one / fp_three == fp_third_up, "b computes rounding up");
    zev__ctx_switch(&fp_b.ctx, &fp_a.ctx);
    zev__ctx_exit(&fp_b.ctx, &fp_main);
}

Test(ctx, fp_control_words_are_per_context, .timeout = 30)
{
    /* The modes as this build reads them. */
    cr_assert_eq(fesetround(FE_TOWARDZERO), 0);
    fp_zero = fp_mode();
    cr_assert_eq(fesetround(FE_UPWARD), 0);
    fp_up = fp_mode();
    fp_third_up = fp_one / fp_three;
    cr_assert_eq(fesetround(FE_TONEAREST), 0);
    fp_nearest = fp_mode();
    fp_third_nearest = fp_one / fp_three;
    /* valgrind keeps the control words but computes SSE arithmetic in
     * round-to-nearest whatever they say: there, check the words only. */
    fp_arith = !ON_VALGRIND();
    if (fp_arith)
        cr_assert_neq(fp_third_up, fp_third_nearest);

    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    zev__ctx_init_main(&fp_main);
    fiber_make(&fp_a, &pool, 0, fp_a_entry, NULL);
    fiber_make(&fp_b, &pool, 0, fp_b_entry, NULL);

    zev__ctx_switch(&fp_main, &fp_a.ctx); /* a sets toward-zero */
    expect_mode(fp_nearest, "main after a");
    cr_assert(!fp_arith || fp_one / fp_three == fp_third_nearest, "main rounds to nearest");
    zev__ctx_switch(&fp_main, &fp_b.ctx); /* b sets upward, then resumes a, which exits */
    expect_mode(fp_nearest, "main after a and b");
    cr_assert(!fp_arith || fp_one / fp_three == fp_third_nearest, "main rounds to nearest");
    zev__ctx_switch(&fp_main, &fp_b.ctx); /* b ends */
    expect_mode(fp_nearest, "main at the end");
    fiber_free(&fp_a, &pool);
    fiber_free(&fp_b, &pool);
    zev__stack_pool_fini(&pool);
}

/* ------------------------------------------------------------- stack depth */

static zev__ctx_t deep_main;
static fiber_t deep_fiber;
static char *deep_lowest;
static size_t deep_depth;

/* Recurses, 256 bytes and more per frame, until its frame is within 4 KiB
 * of the stack's bottom. */
static __attribute__((noinline)) size_t dive(const char *lo, size_t depth)
{
    volatile char pad[256];
    char *fp = __builtin_frame_address(0);
    pad[0] = (char)depth;
    if (fp < deep_lowest)
        deep_lowest = fp;
    if ((size_t)(fp - lo) <= 4 * KiB)
        return depth;
    size_t d = dive(lo, depth + 1);
    pad[1] = (char)d;
    return d + (size_t)(pad[0] - (char)depth);
}

static void deep_entry(void *arg)
{
    (void)arg;
    deep_lowest = (char *)deep_fiber.stack.lo + deep_fiber.stack.size;
    deep_depth = dive(deep_fiber.stack.lo, 0);
    zev__ctx_exit(&deep_fiber.ctx, &deep_main);
}

Test(ctx, deep_call_chain_uses_most_of_64k, .timeout = 30)
{
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    zev__ctx_init_main(&deep_main);
    fiber_make(&deep_fiber, &pool, 64 * KiB, deep_entry, NULL);
    cr_assert_eq(deep_fiber.stack.size, 64 * KiB);
    zev__ctx_switch(&deep_main, &deep_fiber.ctx);
    size_t used = (size_t)((char *)deep_fiber.stack.lo + deep_fiber.stack.size - deep_lowest);
    cr_assert_geq(used, 60 * KiB, "used %zu bytes in %zu frames", used, deep_depth);
    cr_assert_gt(deep_depth, 10);
    fiber_free(&deep_fiber, &pool);
    zev__stack_pool_fini(&pool);
}

/* ---------------------------------------------------------------- the pool */

static zev__ctx_t spawn_main;
static fiber_t spawn_fiber;
static unsigned spawn_runs;

static void spawn_entry(void *arg)
{
    volatile char buf[3000]; /* redzones ASan must forget when the stack is reused */
    memset((char *)buf, (int)(intptr_t)arg, sizeof buf);
    zev__ctx_switch(&spawn_fiber.ctx, &spawn_main);
    spawn_runs += buf[(uintptr_t)arg % sizeof buf] == (char)(intptr_t)arg;
    zev__ctx_exit(&spawn_fiber.ctx, &spawn_main);
}

Test(stack, pool_hands_back_the_same_stacks, .timeout = 60)
{
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    zev__stack_t s[10], again[10];
    for (int i = 0; i < 10; i++) {
        cr_assert_eq(zev__stack_get(&pool, 0, &s[i]), 0);
        cr_assert_eq(s[i].size, ZEV__STACK_DEFAULT_SIZE);
        memset(s[i].lo, 0xa5, s[i].size); /* all of it is writable */
    }
    cr_assert_eq(pool.maps, 10);
    cr_assert_eq(pool.mapped, 10);
    for (int i = 0; i < 10; i++) {
        zev__stack_t copy = s[i];
        zev__stack_put(&pool, &copy);
        cr_assert_null(copy.lo);
    }
    cr_assert_eq(pool.idle_count, 10);
    for (int i = 0; i < 10; i++) {
        cr_assert_eq(zev__stack_get(&pool, 0, &again[i]), 0);
        cr_assert_eq(again[i].lo, s[9 - i].lo, "LIFO: the last one put comes back first");
    }
    cr_assert_eq(pool.maps, 10);
    cr_assert_eq(pool.reuses, 10);
    for (int i = 0; i < 10; i++)
        zev__stack_put(&pool, &again[i]);

    /* Steady-state spawn/exit: a fiber per cycle, no mmap. */
    zev__ctx_init_main(&spawn_main);
    for (unsigned i = 0; i < 2000; i++) {
        fiber_make(&spawn_fiber, &pool, 0, spawn_entry, (void *)(intptr_t)(i & 0x7f));
        zev__ctx_switch(&spawn_main, &spawn_fiber.ctx);
        zev__ctx_switch(&spawn_main, &spawn_fiber.ctx);
        fiber_free(&spawn_fiber, &pool);
    }
    cr_assert_eq(spawn_runs, 2000);
    cr_assert_eq(pool.maps, 10, "spawn/exit mapped new stacks: %zu", pool.maps);
    zev__stack_pool_fini(&pool);
    cr_assert_eq(pool.mapped, 0);
}

Test(stack, pool_limits_and_sizes, .timeout = 30)
{
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    size_t page = pool.page;
    pool.max_idle = 4;
    zev__stack_t s[10];
    for (int i = 0; i < 10; i++)
        cr_assert_eq(zev__stack_get(&pool, 0, &s[i]), 0);
    for (int i = 0; i < 10; i++)
        zev__stack_put(&pool, &s[i]);
    cr_assert_eq(pool.idle_count, 4);
    cr_assert_eq(pool.mapped, 4, "the stacks beyond max_idle are unmapped");

    pool.max_idle = 64;
    pool.max_idle_bytes = 5 * ZEV__STACK_DEFAULT_SIZE;
    for (int i = 0; i < 10; i++)
        cr_assert_eq(zev__stack_get(&pool, 0, &s[i]), 0);
    cr_assert_eq(pool.maps, 10 + 6);
    for (int i = 0; i < 10; i++)
        zev__stack_put(&pool, &s[i]);
    cr_assert_eq(pool.idle_count, 5);
    cr_assert_eq(pool.idle_bytes, 5 * ZEV__STACK_DEFAULT_SIZE);

    /* Sizes: rounded up to pages; only an exact size is reused. */
    zev__stack_t odd, big;
    size_t maps = pool.maps;
    cr_assert_eq(zev__stack_get(&pool, 100000, &odd), 0);
    cr_assert_eq(odd.size, (100000 + page - 1) / page * page);
    cr_assert_eq(zev__stack_get(&pool, 256 * KiB, &big), 0);
    cr_assert_eq(pool.maps, maps + 2);
    memset(odd.lo, 1, odd.size);
    memset(big.lo, 1, big.size);

    /* The page below is the guard, the stack itself read-write. */
    char perms[5];
    vma_perms((char *)big.lo - 1, perms);
    cr_assert_str_eq(perms, "---p");
    vma_perms(big.lo, perms);
    cr_assert_str_eq(perms, "rw-p");
    vma_perms((char *)big.lo + big.size - 1, perms);
    cr_assert_str_eq(perms, "rw-p");

    pool.max_idle_bytes += odd.size; /* room for odd, not for big */
    zev__stack_put(&pool, &odd);
    zev__stack_put(&pool, &big); /* over max_idle_bytes: unmapped */
    cr_assert_eq(pool.idle_count, 6);
    cr_assert_eq(zev__stack_get(&pool, 100000, &odd), 0);
    cr_assert_eq(pool.maps, maps + 2, "the odd size was kept and reused");
    zev__stack_put(&pool, &odd);
    zev__stack_pool_fini(&pool);
    cr_assert_eq(pool.mapped, 0);
    cr_assert_eq(pool.idle_count, 0);
}

Test(stack, impossible_sizes_fail_with_enomem, .timeout = 30)
{
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    int before = vma_count();
    static const size_t sizes[] = {SIZE_MAX, SIZE_MAX / 2 + 1, SIZE_MAX - 4095, (size_t)1 << 60,
                                   (size_t)1 << 47};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        zev__stack_t st = {NULL, 0};
        errno = 0;
        cr_assert_eq(zev__stack_get(&pool, sizes[i], &st), -1, "size %zx", sizes[i]);
        cr_assert_eq(errno, ENOMEM, "size %zx: %s", sizes[i], strerror(errno));
        cr_assert_null(st.lo);
    }
    cr_assert_eq(pool.mapped, 0);
    cr_assert_eq(pool.maps, 0);
    cr_assert_eq(vma_count(), before, "a failed get left a mapping behind");
    zev__stack_pool_fini(&pool);
}

/* vm.max_map_count: each stack is 2 VMAs; past the limit stack_get fails
 * with ENOMEM, it does not crash. Plain builds only: a sanitizer runtime
 * that cannot map its own memory at that point dies. */
Test(stack, vma_exhaustion_fails_with_enomem, .timeout = 120)
{
#if defined(ZEV__ASAN) || defined(ZEV__TSAN)
    cr_skip_test("sanitizer runtimes need mappings of their own");
#else
    if (ON_VALGRIND())
        cr_skip_test("valgrind's address space manager has its own limits");
    /* past the machine's limit, whatever it was set to (perf/run raises it
     * for 100,000 fibers) */
    long limit = 0;
    FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
    if (!f || fscanf(f, "%ld", &limit) != 1)
        limit = 65530;
    if (f)
        fclose(f);
    if (limit > 1000000)
        cr_skip_test("vm.max_map_count is %ld: too many stacks to reach it", limit);
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    size_t cap = (size_t)limit / 2 + 10000;
    zev__stack_t *st = malloc(cap * sizeof *st); /* before the VMAs run out */
    cr_assert_not_null(st);
    size_t n = 0;
    int err = 0;
    while (n < cap) {
        if (zev__stack_get(&pool, 4096, &st[n]) != 0) {
            err = errno;
            break;
        }
        n++;
    }
    size_t mapped = pool.mapped;
    for (size_t i = 0; i < n; i++)
        zev__stack_put(&pool, &st[i]);
    zev__stack_pool_fini(&pool);
    free(st);
    cr_assert_lt(n, cap, "no failure after %zu stacks", n);
    cr_assert_eq(err, ENOMEM, "failed with %s", strerror(err));
    cr_assert_eq(mapped, n);
    cr_assert_gt(n, 1000);
    cr_assert_eq(pool.mapped, 0);
#endif
}

static void never_run(void *arg)
{
    (void)arg;
    abort();
}

Test(ctx, make_rejects_bad_arguments, .timeout = 10)
{
    zev__ctx_t c;
    static char small[1024];
    errno = 0;
    cr_assert_eq(zev__ctx_make(&c, small, sizeof small, never_run, NULL), -1);
    cr_assert_eq(errno, EINVAL);
    cr_assert_eq(zev__ctx_make(&c, NULL, 65536, never_run, NULL), -1);
    cr_assert_eq(zev__ctx_make(&c, small, 65536, NULL, NULL), -1);
    cr_assert_eq(zev__ctx_make(NULL, small, 65536, never_run, NULL), -1);
}

/* ------------------------------------------------------------ two threads */

typedef struct thread_fibers {
    zev__ctx_t main;
    fiber_t f;
    long count;
} thread_fibers_t;

static void thread_fiber_entry(void *arg)
{
    thread_fibers_t *t = arg;
    for (int i = 0; i < 20000; i++) {
        t->count++;
        zev__ctx_switch(&t->f.ctx, &t->main);
    }
    zev__ctx_exit(&t->f.ctx, &t->main);
}

static void *thread_run(void *arg)
{
    thread_fibers_t *t = arg;
    zev__stack_pool_t pool;
    zev__stack_pool_init(&pool);
    zev__ctx_init_main(&t->main);
    cr_assert_eq(zev__stack_get(&pool, 0, &t->f.stack), 0);
    cr_assert_eq(zev__ctx_make(&t->f.ctx, t->f.stack.lo, t->f.stack.size, thread_fiber_entry, t),
                 0);
    for (int i = 0; i <= 20000; i++)
        zev__ctx_switch(&t->main, &t->f.ctx);
    zev__ctx_destroy(&t->f.ctx);
    zev__stack_put(&pool, &t->f.stack);
    zev__stack_pool_fini(&pool);
    return NULL;
}

Test(ctx, fibers_on_two_threads, .timeout = 60)
{
    thread_fibers_t t[2];
    memset(t, 0, sizeof t);
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, thread_run, &t[i]), 0);
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(t[i].count, 20000);
    }
}

/* ------------------------------------------------- overflow and other faults */

static volatile int keep_diving = 1;

static __attribute__((noinline)) int overflow_dive(int depth)
{
    volatile char pad[200];
    pad[0] = (char)depth;
    int r = keep_diving ? overflow_dive(depth + 1) : 0;
    pad[1] = (char)r;
    return r + pad[0];
}

static zev__ctx_t child_main;
static fiber_t child_fiber, child_other;
static zev__stack_pool_t child_pool;

static void overflow_entry(void *arg)
{
    (void)arg;
    EXPECTED_FAULT();
    overflow_dive(0);
    zev__ctx_exit(&child_fiber.ctx, &child_main);
}

/* In the child: a fiber of 64 KiB that recurses forever. */
static void child_overflow(void)
{
    zev__stack_pool_init(&child_pool);
    zev__ctx_init_main(&child_main);
    if (zev__stack_get(&child_pool, 64 * KiB, &child_fiber.stack) != 0 ||
        zev__ctx_make(&child_fiber.ctx, child_fiber.stack.lo, child_fiber.stack.size,
                      overflow_entry, NULL) != 0)
        _exit(3);
    zev__ctx_switch(&child_main, &child_fiber.ctx);
    _exit(4);
}

static void expect_overflow_report(const test_child_t *r)
{
#ifdef ZEV__ASAN
    cr_assert(strstr(r->err, "AddressSanitizer") && strstr(r->err, "stack-overflow"),
              "no ASan stack-overflow report; stderr:\n%s", r->err);
    cr_assert(!(WIFEXITED(r->status) && WEXITSTATUS(r->status) == 0), "the child survived");
#else
    cr_assert(test_died_of_segv(r->status), "status %#x; stderr:\n%s", r->status, r->err);
    cr_assert(strstr(r->err, "zev: fiber stack overflow (stack 0x"), "stderr:\n%s", r->err);
    cr_assert(strstr(r->err, ", 65536 bytes); raise zev_fiber_opts_t.stack_size\n"), "stderr:\n%s",
              r->err);
#endif
}

Test(overflow, guard_page_fault_is_reported, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_overflow, &r);
    expect_overflow_report(&r);
}

/* A fault that is no overflow is not reported as one, and still kills.
 * Sanitizer builds: the default action of SIGSEGV is the sanitizer's report
 * (ASan's own handler; TSan's, once zev's handler restored SIG_DFL), which
 * may call a fault within 64 KiB above the stack pointer a stack-overflow:
 * its guess, not zev's. */
static void expect_plain_segv(const test_child_t *r)
{
    cr_assert(!strstr(r->err, "fiber stack overflow"), "misreported:\n%s", r->err);
#if defined(ZEV__ASAN) || defined(ZEV__TSAN)
    cr_assert(strstr(r->err, "Sanitizer"), "stderr:\n%s", r->err);
    cr_assert(!(WIFEXITED(r->status) && WEXITSTATUS(r->status) == 0), "the child survived");
#else
    cr_assert(test_died_of_segv(r->status), "status %#x; stderr:\n%s", r->status, r->err);
#endif
}

/* Near NULL, not NULL itself: UBSan would stop a NULL store before it faults. */
static int *volatile wild = (int *)16;

static void wild_write_entry(void *arg)
{
    (void)arg;
    EXPECTED_FAULT();
    *wild = 1;
    zev__ctx_exit(&child_fiber.ctx, &child_main);
}

/* Writes into the guard page of another, suspended fiber. */
static void foreign_guard_entry(void *arg)
{
    (void)arg;
    volatile char *guard = (char *)child_other.stack.lo - 8;
    EXPECTED_FAULT();
    *guard = 1;
    zev__ctx_exit(&child_fiber.ctx, &child_main);
}

static void child_fault_in_fiber(void (*entry)(void *))
{
    zev__stack_pool_init(&child_pool);
    zev__ctx_init_main(&child_main);
    if (zev__stack_get(&child_pool, 0, &child_other.stack) != 0 ||
        zev__stack_get(&child_pool, 0, &child_fiber.stack) != 0 ||
        zev__ctx_make(&child_fiber.ctx, child_fiber.stack.lo, child_fiber.stack.size, entry,
                      NULL) != 0)
        _exit(3);
    zev__ctx_switch(&child_main, &child_fiber.ctx);
    _exit(4);
}

static void child_wild_write(void)
{
    child_fault_in_fiber(wild_write_entry);
}

static void child_foreign_guard(void)
{
    child_fault_in_fiber(foreign_guard_entry);
}

static void child_wild_write_in_main(void)
{
    zev__stack_pool_init(&child_pool);
    if (zev__stack_get(&child_pool, 0, &child_fiber.stack) != 0) /* installs the handler */
        _exit(3);
    EXPECTED_FAULT();
    *wild = 1;
    _exit(4);
}

Test(overflow, wild_write_in_fiber_is_not_an_overflow, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_wild_write, &r);
    expect_plain_segv(&r);
}

Test(overflow, other_fibers_guard_page_is_not_an_overflow, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_foreign_guard, &r);
    expect_plain_segv(&r);
}

Test(overflow, wild_write_outside_fibers_is_not_an_overflow, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_wild_write_in_main, &r);
    expect_plain_segv(&r);
}

/* A handler the program installed before zev's still gets its faults. */
static void user_siginfo_handler(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    static const char msg[] = "user handler\n";
    (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(sig == SIGSEGV && si->si_addr == (void *)wild ? 42 : 41);
}

static void user_plain_handler(int sig)
{
    _exit(sig == SIGSEGV ? 43 : 41);
}

static void install_user_handler(int siginfo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    if (siginfo) {
        sa.sa_sigaction = user_siginfo_handler;
        sa.sa_flags = SA_SIGINFO;
    } else {
        sa.sa_handler = user_plain_handler;
    }
    if (sigaction(SIGSEGV, &sa, NULL) != 0)
        _exit(5);
}

static void child_user_siginfo(void)
{
    install_user_handler(1);
    child_wild_write();
}

static void child_user_plain(void)
{
    install_user_handler(0);
    child_wild_write();
}

static void child_user_overflow(void)
{
    install_user_handler(1);
    child_overflow();
}

Test(overflow, earlier_siginfo_handler_gets_other_faults, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_user_siginfo, &r);
    cr_assert(WIFEXITED(r.status) && WEXITSTATUS(r.status) == 42, "status %#x; stderr:\n%s",
              r.status, r.err);
    cr_assert(strstr(r.err, "user handler"));
}

Test(overflow, earlier_plain_handler_gets_other_faults, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_user_plain, &r);
    cr_assert(WIFEXITED(r.status) && WEXITSTATUS(r.status) == 43, "status %#x; stderr:\n%s",
              r.status, r.err);
}

/* An overflow is reported and kills even with a user handler behind zev's
 * (ASan builds: the user's handler replaced ASan's; without SA_ONSTACK it
 * cannot even run on the overflowed stack, so the kernel kills the child). */
Test(overflow, overflow_is_reported_before_a_user_handler, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_user_overflow, &r);
#ifdef ZEV__ASAN
    cr_assert(test_died_of_segv(r.status) || (WIFEXITED(r.status) && WEXITSTATUS(r.status) == 41),
              "status %#x; stderr:\n%s", r.status, r.err);
#else
    expect_overflow_report(&r);
#endif
}
