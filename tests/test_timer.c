/*
 * Timers (issue #2): one-shot and repeating, cancel from inside its own and
 * another timer's callback, FIFO for equal deadlines, "started inside a
 * callback never runs in the same iteration", "started outside counts from
 * the current time", and 100,000 timers fired in deadline order / half of
 * them cancelled. Every test runs on the backend under test.
 */
#include "common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

TestSuite(timer, .timeout = 30);

/* Deterministic PRNG (xorshift64*), so a failure reproduces. */
static uint64_t rng_state = 0x9e3779b97f4a7c15u;
static uint64_t rng(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717u;
}

static void count_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    (*(volatile int *)arg)++;
}

/* A timer far enough after everything else in a test: once it fired, any
 * timer that was going to fire has. */
static void run_past(zev_loop_t *loop, uint64_t delay_us)
{
    int done = 0;
    cr_assert_not_null(zev_timer_start(loop, delay_us, 0, count_timer, &done));
    test_run_until(loop, &done, 10000);
}

/* ------------------------------------------------------------- basics */

typedef struct rec {
    zev_timer_t *self;  /* what zev_timer_start returned */
    zev_loop_t *loop;
    int calls;
    int wrong_handle;
    int cancel_at;      /* cancel itself on this call (1-based), 0 = never */
    int cancel_rc;
    uint64_t at[16];    /* clock at each call */
    uint64_t now[16];   /* zev_now_ns at each call */
} rec_t;

static void rec_timer(zev_timer_t *t, void *arg)
{
    rec_t *r = arg;
    if (t != r->self)
        r->wrong_handle++;
    if (r->calls < 16) {
        r->at[r->calls] = test_clock_ns();
        r->now[r->calls] = zev_now_ns(r->loop);
    }
    r->calls++;
    if (r->calls == r->cancel_at)
        r->cancel_rc = zev_timer_cancel(t);
}

Test(timer, oneshot_fires_once)
{
    zev_loop_t *loop = test_loop_new();
    rec_t r = {.loop = loop};
    uint64_t t0 = test_clock_ns();
    r.self = zev_timer_start(loop, 20000, 0, rec_timer, &r);
    cr_assert_not_null(r.self, "zev_timer_start: %s", zmq_strerror(errno));
    test_run_until(loop, &r.calls, 5000);
    cr_assert_eq(r.wrong_handle, 0, "callback got another handle");
    cr_assert_geq(r.at[0] - t0, 20000000u, "fired %llu ns after start, before its 20 ms",
                  (unsigned long long)(r.at[0] - t0));
    cr_assert_geq(r.now[0], t0 + 20000000u, "the iteration's time is before the deadline");

    run_past(loop, 60000);
    cr_assert_eq(r.calls, 1, "one-shot fired %d times", r.calls);
    cr_assert_eq(zev_loop_timeout(loop), -1, "a fired one-shot left something scheduled");

    /* Cancelling a one-shot inside its own callback is allowed and is the
     * end of it (no double free under ASan). */
    rec_t c = {.loop = loop, .cancel_at = 1, .cancel_rc = -2};
    c.self = zev_timer_start(loop, 0, 0, rec_timer, &c);
    cr_assert_not_null(c.self);
    test_run_until(loop, &c.calls, 5000);
    cr_assert_eq(c.cancel_rc, 0);
    run_past(loop, 10000);
    cr_assert_eq(c.calls, 1);

    /* Cancelled before it was due: never fires. */
    int never = 0;
    zev_timer_t *t = zev_timer_start(loop, 1000, 0, count_timer, &never);
    cr_assert_not_null(t);
    cr_assert_eq(zev_timer_cancel(t), 0);
    run_past(loop, 20000);
    cr_assert_eq(never, 0);
    zev_loop_destroy(loop);
}

Test(timer, repeating_fires_n_times_then_cancels_itself)
{
    zev_loop_t *loop = test_loop_new();
    enum { N = 5, REPEAT_US = 2000 };
    rec_t r = {.loop = loop, .cancel_at = N, .cancel_rc = -2};
    uint64_t t0 = test_clock_ns();
    r.self = zev_timer_start(loop, REPEAT_US, REPEAT_US, rec_timer, &r);
    cr_assert_not_null(r.self);
    test_run_until(loop, &r.calls, 5000);
    while (r.calls < N) {
        int before = r.calls;
        uint64_t end = test_ms() + 5000;
        while (r.calls == before) {
            cr_assert_lt(test_ms(), end, "watchdog: repeating timer stopped at %d", r.calls);
            cr_assert_geq(zev_loop_run_once(loop, 10), 0);
        }
    }
    cr_assert_eq(r.cancel_rc, 0, "cancel inside its own callback");
    cr_assert_eq(r.wrong_handle, 0);
    /* Never early: call k comes at least k periods after the start. */
    for (int k = 0; k < N; k++)
        cr_assert_geq(r.at[k] - t0, (uint64_t)(k + 1) * REPEAT_US * 1000u,
                      "call %d came early", k + 1);

    run_past(loop, 50000);
    cr_assert_eq(r.calls, N, "fired %d times after cancelling itself on call %d", r.calls, N);
    cr_assert_eq(zev_loop_timeout(loop), -1);

    /* A repeating timer cancelled from outside stops too. */
    int ticks = 0;
    zev_timer_t *t = zev_timer_start(loop, 1000, 1000, count_timer, &ticks);
    cr_assert_not_null(t);
    test_run_until(loop, &ticks, 5000);
    cr_assert_eq(zev_timer_cancel(t), 0);
    int seen = ticks;
    run_past(loop, 20000);
    cr_assert_eq(ticks, seen);
    zev_loop_destroy(loop);
}

/* ------------------------------------------------- cancel another timer */

typedef struct pair {
    zev_timer_t *victim;
    int calls;
    int cancel_rc;
} pair_t;

static void cancel_other(zev_timer_t *t, void *arg)
{
    (void)t;
    pair_t *p = arg;
    p->calls++;
    if (p->victim) {
        p->cancel_rc = zev_timer_cancel(p->victim);
        p->victim = NULL;
    }
}

/* Two timers that whichever runs first cancels the other. */
typedef struct duel {
    zev_timer_t *t[2];
    int calls[2];
    int cancel_rc;
} duel_t;

static duel_t *duel_global;

static void duel_timer(zev_timer_t *t, void *arg)
{
    duel_t *d = duel_global;
    int me = (int)(intptr_t)arg;
    cr_assert_eq(t, d->t[me]);
    d->calls[me]++;
    if (d->t[!me]) {
        d->cancel_rc = zev_timer_cancel(d->t[!me]);
        d->t[!me] = NULL;
    }
}

Test(timer, cancel_other_due_timer_inside_callback)
{
    zev_loop_t *loop = test_loop_new();

    /* Both due in the same iteration: the first cancels the second. */
    pair_t a = {0};
    int b_calls = 0;
    cr_assert_not_null(zev_timer_start(loop, 1000, 0, cancel_other, &a));
    a.victim = zev_timer_start(loop, 1000, 0, count_timer, &b_calls);
    cr_assert_not_null(a.victim);
    test_sleep_ms(10); /* both are due before the loop runs */
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(a.calls, 1, "the first due timer did not run");
    cr_assert_eq(a.cancel_rc, 0);
    cr_assert_eq(b_calls, 0, "a due timer cancelled by an earlier one in the same iteration fired");
    run_past(loop, 20000);
    cr_assert_eq(b_calls, 0);

    /* Same with a due repeating victim and equal deadlines (started inside
     * one callback would be equal; here FIFO order decides). */
    pair_t c = {0};
    int d_calls = 0;
    cr_assert_not_null(zev_timer_start(loop, 0, 0, cancel_other, &c));
    c.victim = zev_timer_start(loop, 0, 1000, count_timer, &d_calls);
    cr_assert_not_null(c.victim);
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(c.calls, 1);
    cr_assert_eq(c.cancel_rc, 0);
    cr_assert_eq(d_calls, 0, "a due repeating timer cancelled in the same iteration fired");
    run_past(loop, 20000);
    cr_assert_eq(d_calls, 0);

    /* Symmetric duel: whichever runs first cancels the other; exactly one
     * runs, and the survivor's cancel of a dead handle is never attempted. */
    duel_t duel = {0};
    duel_global = &duel;
    duel.t[0] = zev_timer_start(loop, 500, 0, duel_timer, (void *)(intptr_t)0);
    duel.t[1] = zev_timer_start(loop, 500, 0, duel_timer, (void *)(intptr_t)1);
    cr_assert_not_null(duel.t[0]);
    cr_assert_not_null(duel.t[1]);
    test_sleep_ms(5);
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    run_past(loop, 20000);
    cr_assert_eq(duel.calls[0] + duel.calls[1], 1, "calls %d + %d", duel.calls[0], duel.calls[1]);
    cr_assert_eq(duel.calls[0], 1, "FIFO: the first started runs first");
    cr_assert_eq(duel.cancel_rc, 0);

    /* A not-yet-due timer cancelled from another timer's callback. */
    pair_t e = {0};
    int f_calls = 0;
    e.victim = zev_timer_start(loop, 30000, 0, count_timer, &f_calls);
    cr_assert_not_null(e.victim);
    cr_assert_not_null(zev_timer_start(loop, 1000, 0, cancel_other, &e));
    test_run_until(loop, &e.calls, 5000);
    cr_assert_eq(e.cancel_rc, 0);
    run_past(loop, 60000);
    cr_assert_eq(f_calls, 0);
    cr_assert_eq(zev_loop_timeout(loop), -1, "a cancelled timer is still scheduled");
    zev_loop_destroy(loop);
}

/* ------------------------------------------------------------ FIFO order */

enum { FIFO_N = 100 };

typedef struct order {
    zev_loop_t *loop;
    int seen[FIFO_N];
    int n;
    uint64_t fired_now[FIFO_N];
} order_t;

static order_t *order_global;

static void order_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    order_t *o = order_global;
    o->fired_now[o->n] = zev_now_ns(o->loop);
    o->seen[o->n++] = (int)(intptr_t)arg;
}

static void start_fifo_timers(zev_loop_t *loop, void *arg)
{
    (void)arg;
    for (int i = 0; i < FIFO_N; i++)
        cr_assert_not_null(zev_timer_start(loop, 5000, 0, order_timer, (void *)(intptr_t)i));
}

static void check_fifo(const order_t *o, const char *how)
{
    cr_assert_eq(o->n, FIFO_N, "%s: %d of %d fired", how, o->n, FIFO_N);
    for (int i = 0; i < FIFO_N; i++)
        cr_assert_eq(o->seen[i], i, "%s: position %d ran timer %d", how, i, o->seen[i]);
}

Test(timer, fifo_for_equal_deadlines)
{
    zev_loop_t *loop = test_loop_new();
    order_t o = {.loop = loop};
    order_global = &o;

    /* Started inside one callback: the cached time is the same for all, so
     * the deadlines are exactly equal and only start order decides. */
    cr_assert_eq(zev_loop_add_callback(loop, start_fifo_timers, NULL), 0);
    uint64_t end = test_ms() + 5000;
    while (o.n < FIFO_N) {
        cr_assert_lt(test_ms(), end, "watchdog: %d of %d", o.n, FIFO_N);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    }
    check_fifo(&o, "started in a callback");
    /* All equal deadlines are due at once: one iteration ran them all. */
    for (int i = 1; i < FIFO_N; i++)
        cr_assert_eq(o.fired_now[i], o.fired_now[0], "equal deadlines split over iterations");

    /* Started from outside (each from the current time): same delay, so
     * start order again. */
    memset(&o, 0, sizeof o);
    o.loop = loop;
    start_fifo_timers(loop, NULL);
    end = test_ms() + 5000;
    while (o.n < FIFO_N) {
        cr_assert_lt(test_ms(), end, "watchdog: %d of %d", o.n, FIFO_N);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    }
    check_fifo(&o, "started outside");
    zev_loop_destroy(loop);
}

/* ------------------------------------- not in the same iteration / now */

typedef struct iter_ctx {
    zev_loop_t *loop;
    int iter;           /* current run_once call, 1-based */
    int a_iter, b_iter, c_iter;
    int chain_calls;
    int chain_max;
    int chain_per_iter_max;
    int chain_last_iter;
    int chain_in_iter;
} iter_ctx_t;

static void b_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    iter_ctx_t *c = arg;
    c->b_iter = c->iter;
}

static void c_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    iter_ctx_t *c = arg;
    c->c_iter = c->iter;
}

static void a_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    iter_ctx_t *c = arg;
    c->a_iter = c->iter;
    cr_assert_not_null(zev_timer_start(c->loop, 0, 0, b_timer, c));
}

/* A timer that starts a new zero-delay timer each time: one per iteration. */
static void chain_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    iter_ctx_t *c = arg;
    if (c->chain_last_iter == c->iter)
        c->chain_in_iter++;
    else
        c->chain_in_iter = 1;
    c->chain_last_iter = c->iter;
    if (c->chain_in_iter > c->chain_per_iter_max)
        c->chain_per_iter_max = c->chain_in_iter;
    if (++c->chain_calls < c->chain_max)
        cr_assert_not_null(zev_timer_start(c->loop, 0, 0, chain_timer, c));
}

static void start_in_cb(zev_loop_t *loop, void *arg)
{
    iter_ctx_t *c = arg;
    c->a_iter = c->iter;
    cr_assert_not_null(zev_timer_start(loop, 0, 0, b_timer, c));
}

Test(timer, started_inside_callback_not_in_same_iteration)
{
    zev_loop_t *loop = test_loop_new();
    iter_ctx_t c = {.loop = loop};

    /* A (due) starts B with delay 0; C was due already and still runs in
     * A's iteration, B not. */
    cr_assert_not_null(zev_timer_start(loop, 0, 0, a_timer, &c));
    cr_assert_not_null(zev_timer_start(loop, 0, 0, c_timer, &c));
    for (c.iter = 1; c.iter <= 5 && !c.b_iter; c.iter++)
        cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_gt(c.a_iter, 0);
    cr_assert_eq(c.c_iter, c.a_iter, "an already-due timer was pushed to a later iteration");
    cr_assert_gt(c.b_iter, c.a_iter, "timer started in a callback ran in the same iteration");
    cr_assert_eq(c.b_iter, c.a_iter + 1, "a due zero-delay timer waits for the next iteration only");

    /* A chain of zero-delay restarts: exactly one per iteration, never a
     * runaway loop inside one iteration. */
    c.chain_max = 50;
    c.iter = 0;
    c.chain_calls = 0;
    cr_assert_not_null(zev_timer_start(loop, 0, 0, chain_timer, &c));
    for (c.iter = 1; c.iter <= 100 && c.chain_calls < c.chain_max; c.iter++)
        cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(c.chain_calls, c.chain_max);
    cr_assert_eq(c.chain_per_iter_max, 1, "%d chained timers ran in one iteration",
                 c.chain_per_iter_max);
    cr_assert_eq(c.chain_last_iter, c.chain_max, "one per run_once call");

    /* Started from a queued callback (phase 2, after the timers phase):
     * runs in a later iteration as well. */
    c.a_iter = c.b_iter = 0;
    cr_assert_eq(zev_loop_add_callback(loop, start_in_cb, &c), 0);
    for (c.iter = 1; c.iter <= 5 && !c.b_iter; c.iter++)
        cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_gt(c.a_iter, 0);
    cr_assert_gt(c.b_iter, c.a_iter);
    zev_loop_destroy(loop);
}

Test(timer, started_outside_counts_from_current_time)
{
    zev_loop_t *loop = test_loop_new();
    cr_assert_eq(zev_loop_run_once(loop, 0), 0); /* cached time = now */
    /* Time passes without the loop running; then a timer is started. With
     * the (stale) cached time it would already be due. (The margins are
     * wider than 50 ms / 20 ms so a loaded machine cannot fake a pass or a
     * failure: 100 ms stale, 50 ms delay.) */
    test_sleep_ms(100);
    int fired = 0;
    uint64_t t0 = test_clock_ns();
    cr_assert_not_null(zev_timer_start(loop, 50000, 0, count_timer, &fired));
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(fired, 0, "timer counted from the stale cached time");
    test_run_until(loop, &fired, 5000);
    cr_assert_geq(test_clock_ns() - t0, 50000000u);
    cr_assert_geq(zev_now_ns(loop), t0 + 50000000u);
    zev_loop_destroy(loop);
}

/* ------------------------------------------------------- 100,000 timers */

enum { MANY = 100000, MAX_DELAY_US = 50000 };

typedef struct many {
    zev_loop_t *loop;
    uint64_t base;            /* cached time the timers were started at */
    uint32_t *delay_us;
    unsigned char *fired;     /* times each one fired */
    unsigned char *cancelled;
    zev_timer_t **handle;
    size_t count;             /* total fires */
    size_t twice;             /* fired more than once */
    size_t fired_cancelled;   /* a cancelled one fired */
    size_t out_of_order;      /* deadline (or FIFO tie) went backwards */
    size_t early;             /* fired with the loop's time before its deadline */
    uint64_t last_deadline;
    size_t last_index;
    int check_order;
} many_t;

static many_t *many_global;

static void many_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    many_t *m = many_global;
    size_t i = (size_t)(uintptr_t)arg;
    if (m->fired[i]++)
        m->twice++;
    if (m->cancelled && m->cancelled[i])
        m->fired_cancelled++;
    if (m->check_order) {
        uint64_t deadline = m->base + (uint64_t)m->delay_us[i] * 1000u;
        if (m->count > 0 && (deadline < m->last_deadline ||
                             (deadline == m->last_deadline && i < m->last_index)))
            m->out_of_order++;
        if (zev_now_ns(m->loop) < deadline)
            m->early++;
        m->last_deadline = deadline;
        m->last_index = i;
    }
    m->count++;
}

static void many_alloc(many_t *m, zev_loop_t *loop, int with_cancel)
{
    memset(m, 0, sizeof *m);
    m->loop = loop;
    m->delay_us = malloc(MANY * sizeof *m->delay_us);
    m->fired = calloc(MANY, 1);
    m->handle = malloc(MANY * sizeof *m->handle);
    m->cancelled = with_cancel ? calloc(MANY, 1) : NULL;
    cr_assert(m->delay_us && m->fired && m->handle && (!with_cancel || m->cancelled));
    for (size_t i = 0; i < MANY; i++)
        m->delay_us[i] = (uint32_t)(rng() % (MAX_DELAY_US + 1));
    many_global = m;
}

static void many_free(many_t *m)
{
    free(m->delay_us);
    free(m->fired);
    free(m->handle);
    free(m->cancelled);
}

static void start_many(zev_loop_t *loop, void *arg)
{
    many_t *m = arg;
    m->base = zev_now_ns(loop);
    for (size_t i = 0; i < MANY; i++) {
        m->handle[i] = zev_timer_start(loop, m->delay_us[i], 0, many_timer, (void *)(uintptr_t)i);
        cr_assert_not_null(m->handle[i], "timer %zu: %s", i, zmq_strerror(errno));
    }
}

Test(timer, hundred_thousand_fire_once_in_deadline_order)
{
    zev_loop_t *loop = test_loop_new();
    many_t m;
    many_alloc(&m, loop, 0);
    m.check_order = 1;
    /* Started inside one callback, so every deadline is exactly base +
     * delay and the order can be checked exactly, ties included (FIFO). */
    cr_assert_eq(zev_loop_add_callback(loop, start_many, &m), 0);
    test_run_until_count(loop, &m.count, MANY, 20000);
    run_past(loop, 20000);
    cr_assert_eq(m.count, MANY, "%zu fires for %d timers", m.count, MANY);
    cr_assert_eq(m.twice, 0, "%zu timers fired twice", m.twice);
    size_t bad = 0, first_bad = 0;
    for (size_t i = 0; i < MANY; i++)
        if (m.fired[i] != 1 && !bad++)
            first_bad = i;
    cr_assert_eq(bad, 0, "%zu timers did not fire exactly once (first: %zu fired %d times)", bad,
                 first_bad, m.fired[first_bad]);
    cr_assert_eq(m.out_of_order, 0, "%zu fires out of deadline/FIFO order", m.out_of_order);
    cr_assert_eq(m.early, 0, "%zu timers fired before their deadline", m.early);
    cr_assert_eq(zev_loop_timeout(loop), -1, "timers left behind");
    many_free(&m);
    zev_loop_destroy(loop);
}

typedef struct canceller {
    many_t *m;
    size_t *idx;   /* indices to cancel */
    size_t from, to;
    int calls;
    int errors;
} canceller_t;

static void cancel_many(zev_timer_t *t, void *arg)
{
    (void)t;
    canceller_t *c = arg;
    c->calls++;
    for (size_t k = c->from; k < c->to; k++) {
        size_t i = c->idx[k];
        if (c->m->fired[i]) {
            c->errors++; /* chosen to be cancelled but already ran */
            continue;
        }
        if (zev_timer_cancel(c->m->handle[i]) != 0)
            c->errors++;
        c->m->handle[i] = NULL;
    }
}

Test(timer, cancel_half_of_hundred_thousand)
{
    zev_loop_t *loop = test_loop_new();
    many_t m;
    many_alloc(&m, loop, 1);

    /* The canceller is started first with delay 0: it runs before any of
     * the others (earliest deadline), when many of them are already due. */
    size_t *idx = malloc(MANY * sizeof *idx);
    cr_assert_not_null(idx);
    for (size_t i = 0; i < MANY; i++)
        idx[i] = i;
    for (size_t i = MANY - 1; i > 0; i--) { /* Fisher-Yates */
        size_t j = (size_t)(rng() % (i + 1));
        size_t tmp = idx[i];
        idx[i] = idx[j];
        idx[j] = tmp;
    }
    const size_t half = MANY / 2, quarter = MANY / 4;
    for (size_t k = 0; k < half; k++)
        m.cancelled[idx[k]] = 1;
    canceller_t c = {.m = &m, .idx = idx, .from = quarter, .to = half};
    cr_assert_not_null(zev_timer_start(loop, 0, 0, cancel_many, &c));

    for (size_t i = 0; i < MANY; i++) {
        m.handle[i] = zev_timer_start(loop, m.delay_us[i], 0, many_timer, (void *)(uintptr_t)i);
        cr_assert_not_null(m.handle[i]);
    }
    /* A quarter cancelled from outside, in random order (removals from the
     * middle of the structure)... */
    for (size_t k = 0; k < quarter; k++) {
        cr_assert_eq(zev_timer_cancel(m.handle[idx[k]]), 0);
        m.handle[idx[k]] = NULL;
    }
    /* ...and a quarter from the canceller's callback, with some of them
     * already due in that same iteration. */
    test_sleep_ms(10);
    test_run_until_count(loop, &m.count, MANY - half, 20000);
    run_past(loop, 2 * MAX_DELAY_US);
    cr_assert_eq(c.calls, 1);
    cr_assert_eq(c.errors, 0, "%d cancels inside the callback failed or came too late",
                 c.errors);
    cr_assert_eq(m.fired_cancelled, 0, "%zu cancelled timers fired", m.fired_cancelled);
    cr_assert_eq(m.count, MANY - half, "%zu fires, want %zu", m.count, MANY - half);
    cr_assert_eq(m.twice, 0);
    size_t bad = 0, first_bad = 0;
    for (size_t i = 0; i < MANY; i++)
        if (m.fired[i] != (m.cancelled[i] ? 0 : 1) && !bad++)
            first_bad = i;
    cr_assert_eq(bad, 0, "%zu timers wrong (first: %zu, cancelled %d, fired %d times)", bad,
                 first_bad, m.cancelled[first_bad], m.fired[first_bad]);
    cr_assert_eq(zev_loop_timeout(loop), -1, "timers left behind");
    free(idx);
    many_free(&m);
    zev_loop_destroy(loop);
}

/* ------------------------------------------- overflow, grid, precision */

/* A delay of UINT64_MAX µs (a common way to say "never") and delays whose
 * ns count or deadline would wrap: the deadline saturates at the end of
 * time, it never fires, and nothing is scheduled. */
Test(timer, huge_delays_saturate)
{
    zev_loop_t *loop = test_loop_new();
    const uint64_t delays[] = {UINT64_MAX, UINT64_MAX / 1000 + 1, (uint64_t)1 << 60};
    zev_timer_t *t[3];
    int fired = 0;
    for (int i = 0; i < 3; i++) {
        t[i] = zev_timer_start(loop, delays[i], 0, count_timer, &fired);
        cr_assert_not_null(t[i], "zev_timer_start: %s", zmq_strerror(errno));
    }
    for (int i = 0; i < 3; i++)
        cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(fired, 0, "a timer meant as 'never' fired");
    cr_assert_eq(zev_loop_timeout(loop), -1, "zev_loop_timeout %d", zev_loop_timeout(loop));
    for (int i = 0; i < 3; i++)
        cr_assert_eq(zev_timer_cancel(t[i]), 0);
    zev_loop_destroy(loop);
}

/* A repeat whose ns count would wrap to 0 must not turn the timer into a
 * one-shot (freed after it fires: the cancel below would then be a
 * use-after-free). */
Test(timer, huge_repeat_stays_repeating)
{
    zev_loop_t *loop = test_loop_new();
    rec_t r = {.loop = loop};
    r.self = zev_timer_start(loop, 0, (uint64_t)1 << 61, rec_timer, &r);
    cr_assert_not_null(r.self);
    test_run_until(loop, &r.calls, 5000);
    test_spin(loop, 3, 0);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(zev_loop_timeout(loop), -1, "its next run is at the end of time");
    cr_assert_eq(zev_timer_cancel(r.self), 0);
    zev_loop_destroy(loop);
}

/* Periodic timers run at start + n x period; a run that fell behind (here
 * a callback that holds the loop for 3.5 periods) skips the periods it
 * missed instead of drifting (next = late run + period) or bursting. The
 * deadlines are read with zev_timer_due, so the check is exact. */
typedef struct grid {
    zev_loop_t *loop;
    uint64_t due[32];
    uint64_t ended[32]; /* clock when each callback returned */
    int calls;
    int stall_at; /* this call holds the loop for `stall_ns` */
    uint64_t stall_ns;
} grid_t;

static void grid_timer(zev_timer_t *t, void *arg)
{
    grid_t *g = arg;
    if (g->calls < 32)
        g->due[g->calls] = zev_timer_due(t);
    if (g->calls == g->stall_at)
        for (uint64_t until = test_clock_ns() + g->stall_ns; test_clock_ns() < until;)
            ;
    if (g->calls < 32)
        g->ended[g->calls] = test_clock_ns();
    g->calls++;
}

Test(timer, periodic_stays_on_its_grid_and_skips_missed_periods)
{
    zev_loop_t *loop = test_loop_new();
    const uint64_t period_ns = 10000000; /* 10 ms */
    grid_t g = {.loop = loop, .stall_at = 3, .stall_ns = 35000000};
    zev_timer_t *t = zev_timer_start(loop, period_ns / 1000, period_ns / 1000, grid_timer, &g);
    cr_assert_not_null(t);
    uint64_t first = zev_timer_due(t);
    cr_assert_gt(first, 0, "zev_timer_due: %s", zmq_strerror(errno));
    for (uint64_t end = test_ms() + 5000; g.calls < 10;) {
        cr_assert(test_ms() < end, "watchdog: %d runs", g.calls);
        cr_assert_geq(zev_loop_run_once(loop, -1), 0);
    }
    cr_assert_eq(g.due[0], first, "the first run was not due when zev_timer_due said");
    int late_runs = 0;
    for (int i = 0; i < 10; i++) {
        cr_assert_eq((g.due[i] - first) % period_ns, 0,
                     "run %d was due %llu ns after the first: off the grid", i,
                     (unsigned long long)(g.due[i] - first));
        if (i > 0)
            cr_assert_gt(g.due[i], g.due[i - 1], "run %d not after run %d", i, i - 1);
        if (i > g.stall_at && g.due[i] < g.ended[g.stall_at])
            late_runs++;
    }
    cr_assert_leq(late_runs, 1, "%d runs caught up after the stall: a burst", late_runs);
    cr_assert_gt(g.due[g.stall_at + 2] - g.due[g.stall_at + 1], period_ns,
                 "no period was skipped after the stall (next due %llu ns after)",
                 (unsigned long long)(g.due[g.stall_at + 2] - g.due[g.stall_at + 1]));
    cr_assert_eq(zev_timer_cancel(t), 0);
    zev_loop_destroy(loop);
}

/* Timers keep the microseconds the API takes: a 100 us periodic timer
 * runs again well within a millisecond, with the loop asleep in between. A
 * timer rounded to milliseconds never does (a periodic timer skips the
 * periods it missed). Counted as intervals, not as a rate, so a busy machine
 * that deschedules the test only makes it run longer (up to 5 s): the speed
 * is measured in perf/timers.c. */
static void interval_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    uint64_t *v = arg; /* [0] last run, [1] runs, [2] runs < 500 us after the last */
    uint64_t now = test_clock_ns();
    if (v[0] && now - v[0] < 500000)
        v[2]++;
    v[0] = now;
    v[1]++;
}

Test(timer, sub_millisecond_period_is_honoured)
{
    zev_loop_t *loop = test_loop_new();
    uint64_t v[3] = {0};
    zev_timer_t *t = zev_timer_start(loop, 100, 100, interval_timer, v);
    cr_assert_not_null(t);
    uint64_t start = test_clock_ns();
    while (v[2] < 200 && test_clock_ns() - start < 5000000000u)
        cr_assert_geq(zev_loop_run_once(loop, -1), 0);
    uint64_t ms = (test_clock_ns() - start) / 1000000u;
    cr_assert_geq(v[2], 200, "%llu of %llu runs came < 500 us after the previous one",
                  (unsigned long long)v[2], (unsigned long long)v[1]);
    cr_assert_leq(v[1], ms * 10 + 2, "%llu runs in %llu ms: fired early", (unsigned long long)v[1],
                  (unsigned long long)ms);
    cr_assert_eq(zev_timer_cancel(t), 0);
    zev_loop_destroy(loop);
}

/* A one-shot never fires before its delay, however short. */
Test(timer, short_oneshot_never_early)
{
    zev_loop_t *loop = test_loop_new();
    for (int i = 0; i < 50; i++) {
        rec_t r = {.loop = loop};
        uint64_t t0 = test_clock_ns();
        r.self = zev_timer_start(loop, 300, 0, rec_timer, &r);
        cr_assert_not_null(r.self);
        while (!r.calls)
            cr_assert_geq(zev_loop_run_once(loop, -1), 0);
        cr_assert_geq(r.at[0] - t0, 300000u, "a 300 us timer fired after %llu ns",
                      (unsigned long long)(r.at[0] - t0));
    }
    zev_loop_destroy(loop);
}

/* ------------------------------------------------ timers the user owns */

/* The per-request timeout: arm, disarm before it fires, arm again, let it
 * fire, disarm after it fired (harmless), re-arm (replacing the deadline),
 * free. */
Test(timer, owned_arm_disarm_rearm_free)
{
    zev_loop_t *loop = test_loop_new();
    int fired = 0;
    zev_timer_t *t = zev_timer_new(loop, count_timer, &fired);
    cr_assert_not_null(t, "zev_timer_new: %s", zmq_strerror(errno));
    cr_assert_eq(zev_timer_due(t), 0, "a new owned timer is unarmed");
    cr_assert_eq(zev_loop_timeout(loop), -1);

    cr_assert_eq(zev_timer_arm(t, 20000, 0), 0);
    cr_assert_gt(zev_timer_due(t), 0);
    cr_assert_eq(zev_timer_disarm(t), 0); /* the reply came first */
    cr_assert_eq(zev_timer_due(t), 0);
    run_past(loop, 40000);
    cr_assert_eq(fired, 0, "a disarmed timer fired");

    cr_assert_eq(zev_timer_arm(t, 10000, 0), 0);
    test_run_until(loop, &fired, 5000);
    cr_assert_eq(zev_timer_due(t), 0, "a fired one-shot is unarmed");
    cr_assert_eq(zev_timer_disarm(t), 0, "disarm after it fired: %s", zmq_strerror(errno));

    cr_assert_eq(zev_timer_arm(t, 10u * 1000u * 1000u, 0), 0);
    cr_assert_eq(zev_timer_arm(t, 5000, 0), 0); /* replaces the 10 s deadline */
    uint64_t end = test_ms() + 5000;
    while (fired < 2) {
        cr_assert(test_ms() < end, "the replaced 5 ms deadline never came");
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    }
    cr_assert_eq(fired, 2);

    cr_assert_eq(zev_timer_free(t), 0);
    errno = 0;
    cr_assert_eq(zev_timer_arm(t, 0, 0), -1, "arm after free");
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_timer_free(t), -1, "free twice");
    cr_assert_eq(errno, EINVAL);
    zev_loop_destroy(loop);
}

/* zev_timer_cancel is for the loop's timers, arm/disarm/free for the
 * user's: each refuses the other flavour with EINVAL and changes nothing. */
Test(timer, flavours_refuse_each_others_calls)
{
    zev_loop_t *loop = test_loop_new();
    int a = 0, b = 0;
    zev_timer_t *owned = zev_timer_new(loop, count_timer, &a);
    zev_timer_t *started = zev_timer_start(loop, 10000, 0, count_timer, &b);
    cr_assert(owned && started);
    cr_assert_eq(zev_timer_arm(owned, 10000, 0), 0);
    errno = 0;
    cr_assert_eq(zev_timer_cancel(owned), -1);
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_timer_arm(started, 0, 0), -1);
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_timer_disarm(started), -1);
    cr_assert_eq(errno, EINVAL);
    errno = 0;
    cr_assert_eq(zev_timer_free(started), -1);
    cr_assert_eq(errno, EINVAL);
    uint64_t end = test_ms() + 5000;
    while (a + b < 2) {
        cr_assert(test_ms() < end, "watchdog: %d + %d", a, b);
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    }
    cr_assert_eq(a, 1, "the refused calls changed the owned timer");
    cr_assert_eq(b, 1, "the refused calls changed the started timer");
    cr_assert_eq(zev_timer_free(owned), 0);
    zev_loop_destroy(loop);
}

/* The trap of issue 11: a one-shot's timeout that already fired, cancelled
 * when the reply comes. Its handle is stale: EINVAL, no use-after-free
 * (ASan), and when its slot in the pool already holds another timer, that
 * timer is not touched. */
Test(timer, cancel_after_fire_is_einval_and_spares_the_next_owner)
{
    zev_loop_t *loop = test_loop_new();
    int first = 0;
    zev_timer_t *t = zev_timer_start(loop, 0, 0, count_timer, &first);
    cr_assert_not_null(t);
    test_run_until(loop, &first, 5000);
    errno = 0;
    cr_assert_eq(zev_timer_cancel(t), -1, "cancel after the one-shot fired");
    cr_assert_eq(errno, EINVAL);
    cr_assert_eq(zev_timer_due(t), 0);

    /* Cycle the pool so that the slot is reused, then keep many armed. */
    enum { LIVE = 256 };
    int fired[LIVE] = {0};
    for (int i = 0; i < 1000; i++) {
        zev_timer_t *x = zev_timer_start(loop, 1000000, 0, count_timer, &fired[0]);
        cr_assert_not_null(x);
        cr_assert_eq(zev_timer_cancel(x), 0);
    }
    zev_timer_t *live[LIVE];
    for (int i = 0; i < LIVE; i++) {
        live[i] = zev_timer_start(loop, 20000, 0, count_timer, &fired[i]);
        cr_assert_not_null(live[i]);
        cr_assert_neq(live[i], t, "a new timer got the stale handle's value");
    }
    errno = 0;
    cr_assert_eq(zev_timer_cancel(t), -1);
    cr_assert_eq(errno, EINVAL);
    run_past(loop, 60000);
    for (int i = 0; i < LIVE; i++)
        cr_assert_eq(fired[i], 1, "timer %d fired %d times: the stale cancel reached it", i,
                     fired[i]);
    zev_loop_destroy(loop);
}

/* Inside its own callback an owned timer may disarm (no repeat), re-arm
 * (its next run is the new deadline) or free itself. */
typedef struct selfowned {
    zev_timer_t *t;
    int calls;
    int action; /* 1 disarm, 2 re-arm 20 ms once, 3 free */
    uint64_t rearmed_due;
} selfowned_t;

static void selfowned_timer(zev_timer_t *t, void *arg)
{
    selfowned_t *so = arg;
    cr_assert_eq(t, so->t);
    so->calls++;
    if (so->calls == 1 && so->action == 1)
        cr_assert_eq(zev_timer_disarm(t), 0);
    if (so->calls == 1 && so->action == 2) {
        cr_assert_eq(zev_timer_arm(t, 20000, 0), 0);
        so->rearmed_due = zev_timer_due(t);
    }
    if (so->calls == 1 && so->action == 3)
        cr_assert_eq(zev_timer_free(t), 0);
}

Test(timer, owned_disarm_rearm_free_inside_own_callback)
{
    zev_loop_t *loop = test_loop_new();
    selfowned_t so[3] = {{.action = 1}, {.action = 2}, {.action = 3}};
    for (int i = 0; i < 3; i++) {
        so[i].t = zev_timer_new(loop, selfowned_timer, &so[i]);
        cr_assert_not_null(so[i].t);
        cr_assert_eq(zev_timer_arm(so[i].t, 1000, 2000), 0); /* periodic */
    }
    /* until the re-armed one ran (load may delay it past any fixed wait),
     * then a while more, for runs that should not come */
    uint64_t t0 = test_ms();
    while (so[1].calls < 2 && test_ms() - t0 < 10000)
        zev_loop_run_once(loop, 10);
    run_past(loop, 30000);
    cr_assert_eq(so[0].calls, 1, "disarmed in its callback, it repeated");
    cr_assert_eq(zev_timer_due(so[0].t), 0);
    cr_assert_eq(so[1].calls, 2, "re-armed once as a one-shot: %d runs", so[1].calls);
    cr_assert_gt(so[1].rearmed_due, 0);
    cr_assert_eq(zev_timer_due(so[1].t), 0);
    cr_assert_eq(so[2].calls, 1, "freed in its callback, it repeated");
    errno = 0;
    cr_assert_eq(zev_timer_arm(so[2].t, 0, 0), -1, "the freed timer's handle still works");
    cr_assert_eq(errno, EINVAL);
    cr_assert_eq(zev_timer_free(so[0].t), 0);
    cr_assert_eq(zev_timer_free(so[1].t), 0);
    zev_loop_destroy(loop);
}

/* zev_loop_destroy frees owned timers, armed or not (ASan checks). */
Test(timer, destroy_frees_owned_timers)
{
    zev_loop_t *loop = test_loop_new();
    int n = 0;
    for (int i = 0; i < 100; i++) {
        zev_timer_t *t = zev_timer_new(loop, count_timer, &n);
        cr_assert_not_null(t);
        if (i % 2)
            cr_assert_eq(zev_timer_arm(t, 1000000, 1000), 0);
    }
    cr_assert_eq(zev_loop_destroy(loop), 0);
    cr_assert_eq(n, 0);
}

/* A timer that ends inside its own callback (zev_timer_free of an owned
 * one, zev_timer_cancel of a started one) has a stale handle from that
 * moment, as after any other end: a second free or cancel, an arm, a
 * disarm and zev_timer_due all fail with EINVAL, and the timer runs no more. */
typedef struct selfend {
    int calls;
    int second_rc, second_errno; /* the second free / cancel */
    int arm_rc, arm_errno;
    int disarm_rc, disarm_errno;
    uint64_t due;
    int due_errno;
} selfend_t;

static void selfend_check(zev_timer_t *t, selfend_t *se, int (*end)(zev_timer_t *))
{
    cr_assert_eq(end(t), 0, "the first end: %s", zmq_strerror(errno));
    errno = 0;
    se->second_rc = end(t);
    se->second_errno = errno;
    errno = 0;
    se->arm_rc = zev_timer_arm(t, 1000, 0);
    se->arm_errno = errno;
    errno = 0;
    se->disarm_rc = zev_timer_disarm(t);
    se->disarm_errno = errno;
    errno = 0;
    se->due = zev_timer_due(t);
    se->due_errno = errno;
}

static void selfend_free_timer(zev_timer_t *t, void *arg)
{
    selfend_t *se = arg;
    if (se->calls++ == 0)
        selfend_check(t, se, zev_timer_free);
}

static void selfend_cancel_timer(zev_timer_t *t, void *arg)
{
    selfend_t *se = arg;
    if (se->calls++ == 0)
        selfend_check(t, se, zev_timer_cancel);
}

Test(timer, ended_inside_own_callback_handle_is_stale_at_once)
{
    zev_loop_t *loop = test_loop_new();
    selfend_t se[2] = {{0}, {0}};
    zev_timer_t *owned = zev_timer_new(loop, selfend_free_timer, &se[0]);
    cr_assert_not_null(owned);
    cr_assert_eq(zev_timer_arm(owned, 0, 1000), 0); /* periodic */
    cr_assert_not_null(zev_timer_start(loop, 0, 1000, selfend_cancel_timer, &se[1]));
    run_past(loop, 20000);
    const char *what[2] = {"owned, freed", "started, cancelled"};
    for (int i = 0; i < 2; i++) {
        cr_expect_eq(se[i].calls, 1, "%s in its callback: ran %d times", what[i], se[i].calls);
        cr_expect_eq(se[i].second_rc, -1, "%s: the second end succeeded", what[i]);
        cr_expect_eq(se[i].second_errno, EINVAL, "%s", what[i]);
        cr_expect_eq(se[i].arm_rc, -1, "%s: arm after the end succeeded", what[i]);
        cr_expect_eq(se[i].arm_errno, EINVAL, "%s", what[i]);
        cr_expect_eq(se[i].disarm_rc, -1, "%s: disarm after the end succeeded", what[i]);
        cr_expect_eq(se[i].disarm_errno, EINVAL, "%s", what[i]);
        cr_expect_eq(se[i].due, 0, "%s: due after the end", what[i]);
        cr_expect_eq(se[i].due_errno, EINVAL, "%s", what[i]);
    }
    cr_assert_eq(zev_loop_timeout(loop), -1, "an ended timer is still scheduled");
    zev_loop_destroy(loop);
}

/* A stale handle never names a later timer, however often its slot is
 * reused. With every pooled slot but one held (an owned timeout per client),
 * every new timer takes that one slot, so a handle kept from its first use
 * met the slot's generation again after 32,768 reuses: a late cancel then
 * cancelled someone else's timer (review finding 1). A slot whose
 * generations are spent is now retired, so a million reuses never bring the
 * stale handle back, and the timer living in the slot is never touched. */
Test(timer, stale_handle_never_returns_however_often_the_slot_is_reused)
{
    zev_loop_t *loop = test_loop_new();
    enum { HELD = 63, REUSES = 1000000 }; /* a pool chunk holds 64 */
    int held_fired = 0, live_fired = 0;
    zev_timer_t *held[HELD];
    for (int i = 0; i < HELD; i++) {
        held[i] = zev_timer_new(loop, count_timer, &held_fired);
        cr_assert_not_null(held[i]);
    }
    zev_timer_t *stale = zev_timer_start(loop, 1000000, 0, count_timer, &live_fired);
    cr_assert_not_null(stale);
    cr_assert_eq(zev_timer_cancel(stale), 0);
    zev_timer_t *t = NULL;
    for (long n = 1; n <= REUSES; n++) {
        t = zev_timer_start(loop, 1000000, 0, count_timer, &live_fired);
        cr_assert_not_null(t, "zev_timer_start: %s", zmq_strerror(errno));
        if (t == stale)
            cr_assert_fail("reuse %ld of the slot gave the stale handle's value", n);
        if (n < REUSES)
            cr_assert_eq(zev_timer_cancel(t), 0);
    }
    errno = 0;
    cr_assert_eq(zev_timer_cancel(stale), -1, "the stale handle's late cancel");
    cr_assert_eq(errno, EINVAL);
    cr_assert_eq(zev_timer_due(stale), 0);
    cr_assert_gt(zev_timer_due(t), 0, "the live timer was touched by the stale cancel");
    cr_assert_eq(zev_timer_cancel(t), 0);
    for (int i = 0; i < HELD; i++)
        cr_assert_eq(zev_timer_free(held[i]), 0, "held timer %d: %s", i, zmq_strerror(errno));
    cr_assert_eq(held_fired + live_fired, 0);
    zev_loop_destroy(loop);
}

/* ------------------------------------------- churn: removal is lazy */

/* Owned timers armed, disarmed and re-armed many times over (each re-arm
 * and disarm leaves a dead heap entry; the heap compacts when full), plus
 * loop-owned ones started and cancelled: each live timer fires exactly
 * once, at its last deadline, in (deadline, last arm) order, and nothing
 * disarmed or cancelled fires. */
#define CHURN_N 2000

typedef struct churn {
    zev_timer_t *t[CHURN_N];
    uint64_t due[CHURN_N];  /* the last deadline armed, 0 if disarmed */
    uint64_t order[CHURN_N]; /* arm order of the last arm */
    int fired[CHURN_N];
    int bad_order, stray;
    size_t last_i;
    bool any;
} churn_t;

static churn_t *churn_global;

static void churn_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    churn_t *c = churn_global;
    size_t i = (size_t)(uintptr_t)arg;
    if (i >= CHURN_N) {
        c->stray++; /* a cancelled loop-owned timer */
        return;
    }
    c->fired[i]++;
    if (!c->due[i])
        c->stray++;
    if (c->any && (c->due[i] < c->due[c->last_i] ||
                   (c->due[i] == c->due[c->last_i] && c->order[i] < c->order[c->last_i])))
        c->bad_order++;
    c->any = true;
    c->last_i = i;
}

Test(timer, churn_lazy_removal_keeps_order_and_fires_once)
{
    zev_loop_t *loop = test_loop_new();
    static churn_t c;
    memset(&c, 0, sizeof c);
    churn_global = &c;
    uint64_t seq = 0;
    size_t i = 0;
    while (i < CHURN_N) {
        c.t[i] = zev_timer_new(loop, churn_timer, (void *)(uintptr_t)i);
        cr_assert_not_null(c.t[i]);
        i++;
    }
    int round = 0;
    while (round++ < 50) { /* about 100,000 arms and disarms: many compactions */
        i = 0;
        while (i < CHURN_N) {
            uint64_t r = rng();
            if (r % 5 == 0) {
                cr_assert_eq(zev_timer_disarm(c.t[i]), 0);
                c.due[i] = 0;
            } else {
                /* few distinct delays: many equal deadlines */
                cr_assert_eq(zev_timer_arm(c.t[i], 20000 + (r >> 8) % 8 * 1000, 0), 0);
                c.due[i] = zev_timer_due(c.t[i]);
                c.order[i] = seq++;
            }
            zev_timer_t *gone = zev_timer_start(loop, 1000 + r % 5000, 0, churn_timer,
                                                (void *)(uintptr_t)CHURN_N);
            cr_assert_not_null(gone);
            cr_assert_eq(zev_timer_cancel(gone), 0);
            i++;
        }
    }
    run_past(loop, 60000);
    i = 0;
    while (i < CHURN_N) {
        cr_assert_eq(c.fired[i], c.due[i] ? 1 : 0, "timer %zu fired %d times", i, c.fired[i]);
        i++;
    }
    cr_assert_eq(c.stray, 0, "%d disarmed or cancelled timers fired", c.stray);
    cr_assert_eq(c.bad_order, 0, "%d timers fired out of (deadline, arm) order", c.bad_order);
    i = 0;
    while (i < CHURN_N)
        cr_assert_eq(zev_timer_free(c.t[i++]), 0);
    zev_loop_destroy(loop);
}
