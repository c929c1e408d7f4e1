/*
 * ctxswitch: the cost of the fiber foundation (core/ctx.c, core/stack.c),
 * below any scheduler. Wall clock, single thread, no syscalls in the timed
 * loops except where the row is about them.
 *
 * bench=ctxswitch op=switch   main <-> one fiber ping-pong: ns per switch
 *                             (one direction). impl=zev_asm or zev_ucontext
 *                             (whichever this build compiled: ctx.h,
 *                             ZEV__CTX_ASM); baseline impl=raw_swapcontext,
 *                             glibc's makecontext/swapcontext with nothing
 *                             else (what the ucontext fallback pays at least:
 *                             swapcontext makes an rt_sigprocmask syscall).
 * bench=ctxswitch op=yield    two fibers taking turns through a scheduler
 *                             context: ns per yield, i.e. fiber -> scheduler
 *                             -> next fiber, two switches (the shape the
 *                             loop's fiber_yield will have, minus its queue).
 * bench=ctxswitch op=spawn    pooled stack + ctx_make + first switch in +
 *                             ctx_exit + destroy + stack back to the pool:
 *                             ns per fiber that does nothing.
 * bench=ctxswitch op=stack    zev__stack_get + zev__stack_put of a 64 KiB
 *                             stack: impl=pool (reused) and impl=mmap (pool
 *                             limit 0: mmap + mprotect + munmap every time).
 *
 * ctxswitch [--full] [--runs N] [--count N]   (count: round trips per run)
 */
#include "common.h"

#include "ctx.h"
#include "stack.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

static zev__ctx_t sched;
static zev__ctx_t fib[2];
static zev__stack_t fib_stack[2];
static volatile int stop;
static zev__stack_pool_t pool;

/* Switches back to the scheduler until told to stop, then exits. */
static void bounce(void *arg)
{
    zev__ctx_t *self = arg;
    while (!stop)
        zev__ctx_switch(self, &sched);
    zev__ctx_exit(self, &sched);
}

static void make_fibers(int n)
{
    stop = 0;
    for (int i = 0; i < n; i++) {
        if (zev__stack_get(&pool, 0, &fib_stack[i]) != 0 ||
            zev__ctx_make(&fib[i], fib_stack[i].lo, fib_stack[i].size, bounce, &fib[i]) != 0) {
            perror("ctxswitch: fiber");
            exit(1);
        }
    }
}

static void end_fibers(int n)
{
    stop = 1;
    for (int i = 0; i < n; i++) {
        zev__ctx_switch(&sched, &fib[i]);
        zev__ctx_destroy(&fib[i]);
        zev__stack_put(&pool, &fib_stack[i]);
    }
}

static double run_switch(long n)
{
    make_fibers(1);
    zev__ctx_switch(&sched, &fib[0]); /* first entry out of the timing */
    uint64_t t0 = perf_now_ns();
    for (long i = 0; i < n; i++)
        zev__ctx_switch(&sched, &fib[0]);
    uint64_t t1 = perf_now_ns();
    end_fibers(1);
    return (double)(t1 - t0) / (2.0 * (double)n);
}

static double run_yield(long n)
{
    make_fibers(2);
    zev__ctx_switch(&sched, &fib[0]);
    zev__ctx_switch(&sched, &fib[1]);
    uint64_t t0 = perf_now_ns();
    for (long i = 0; i < n; i++) {
        zev__ctx_switch(&sched, &fib[0]);
        zev__ctx_switch(&sched, &fib[1]);
    }
    uint64_t t1 = perf_now_ns();
    end_fibers(2);
    return (double)(t1 - t0) / (2.0 * (double)n);
}

static zev__ctx_t spawned;

static void exit_at_once(void *arg)
{
    (void)arg;
    zev__ctx_exit(&spawned, &sched);
}

static double run_spawn(long n)
{
    zev__stack_t st;
    uint64_t t0 = perf_now_ns();
    for (long i = 0; i < n; i++) {
        if (zev__stack_get(&pool, 0, &st) != 0 ||
            zev__ctx_make(&spawned, st.lo, st.size, exit_at_once, NULL) != 0)
            return NAN;
        zev__ctx_switch(&sched, &spawned);
        zev__ctx_destroy(&spawned);
        zev__stack_put(&pool, &st);
    }
    return (double)(perf_now_ns() - t0) / (double)n;
}

static double run_stack(long n, size_t max_idle)
{
    zev__stack_pool_t p;
    zev__stack_pool_init(&p);
    p.max_idle = max_idle;
    zev__stack_t st;
    uint64_t t0 = perf_now_ns();
    for (long i = 0; i < n; i++) {
        if (zev__stack_get(&p, 0, &st) != 0)
            return NAN;
        zev__stack_put(&p, &st);
    }
    uint64_t t1 = perf_now_ns();
    zev__stack_pool_fini(&p);
    return (double)(t1 - t0) / (double)n;
}

/* The baseline: glibc's ucontext, nothing else. */
static ucontext_t raw_main, raw_fiber;

static void raw_bounce(void)
{
    while (!stop)
        swapcontext(&raw_fiber, &raw_main);
}

static double run_raw(long n)
{
    static char stack[64 * 1024] __attribute__((aligned(16)));
    stop = 0;
    getcontext(&raw_fiber);
    raw_fiber.uc_stack.ss_sp = stack;
    raw_fiber.uc_stack.ss_size = sizeof stack;
    raw_fiber.uc_link = &raw_main;
    makecontext(&raw_fiber, raw_bounce, 0);
    swapcontext(&raw_main, &raw_fiber);
    uint64_t t0 = perf_now_ns();
    for (long i = 0; i < n; i++)
        swapcontext(&raw_main, &raw_fiber);
    uint64_t t1 = perf_now_ns();
    stop = 1;
    swapcontext(&raw_main, &raw_fiber); /* returns through uc_link */
    return (double)(t1 - t0) / (2.0 * (double)n);
}

int main(int argc, char **argv)
{
    perf_args_t a;
    perf_args_init(&a, argc, argv, 7, 21);
    long n = perf_opt_long(&a, "--count", a.full ? 10000000 : 2000000);
    long n_slow = n / 20; /* rows with a syscall per operation */
    perf_banner("ctxswitch", &a);
    zev__stack_pool_init(&pool);
    zev__ctx_init_main(&sched);
    const char *impl = ZEV__CTX_ASM ? "zev_asm" : "zev_ucontext";
    long n_zev = ZEV__CTX_ASM ? n : n_slow;

    perf_series_t sw = {0}, raw = {0}, yield = {0}, spawn = {0}, pooled = {0}, mapped = {0};
    run_switch(n_zev / 10); /* warm up: stacks mapped, caches and predictors trained */
    for (int r = 0; r < a.runs; r++) {
        double v[6] = {run_switch(n_zev),
                       run_raw(n_slow),
                       run_yield(n_zev),
                       run_spawn(n_zev / 4),
                       run_stack(n, ZEV__STACK_POOL_MAX_IDLE),
                       run_stack(n_slow, 0)};
        printf("RUN bench=ctxswitch impl=%s run=%d switch_ns=%.2f raw_swapcontext_ns=%.2f "
               "yield_ns=%.2f spawn_ns=%.2f stack_pool_ns=%.2f stack_mmap_ns=%.2f\n",
               impl, r, v[0], v[1], v[2], v[3], v[4], v[5]);
        perf_series_add(&sw, v[0]);
        perf_series_add(&raw, v[1]);
        perf_series_add(&yield, v[2]);
        perf_series_add(&spawn, v[3]);
        perf_series_add(&pooled, v[4]);
        perf_series_add(&mapped, v[5]);
    }
    double msw = perf_report("bench=ctxswitch op=switch", impl, "ns_per_switch", "ns", &sw);
    double mraw =
        perf_report("bench=ctxswitch op=switch", "raw_swapcontext", "ns_per_switch", "ns", &raw);
    perf_ratio("bench=ctxswitch op=switch", "ns_per_switch", impl, msw, "raw_swapcontext", mraw);
    perf_report("bench=ctxswitch op=yield", impl, "ns_per_yield", "ns", &yield);
    perf_report("bench=ctxswitch op=spawn", impl, "ns_per_spawn", "ns", &spawn);
    double mp = perf_report("bench=ctxswitch op=stack", "pool", "ns_per_get_put", "ns", &pooled);
    double mm = perf_report("bench=ctxswitch op=stack", "mmap", "ns_per_get_put", "ns", &mapped);
    perf_ratio("bench=ctxswitch op=stack", "ns_per_get_put", "pool", mp, "mmap", mm);
    zev__ctx_destroy(&sched);
    zev__stack_pool_fini(&pool);
    return 0;
}
