/*
 * Fibers (issue 12): every rule of docs/design.md's Fibers section, on the
 * backend under test, and the ZMQ_FD edge rule under fibers.
 *
 * Tests that wait without a timeout run the loop with zev_loop_run under a
 * watchdog (common.h), so a swallowed edge shows as a hang the watchdog
 * reports, never as slowness a polling timeout would hide. Fibers record
 * what their calls returned (values, errno, order) in the test's state and
 * the test asserts on it once the loop stopped: criterion's asserts do not
 * belong on a fiber's stack.
 */
#include "common.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

TestSuite(fiber, .timeout = 60);

#define FOREVER (-1)

/* ------------------------------------------------------------------ helpers */

/* What happened, in order: each fiber appends a short token. */
typedef struct trace {
    char buf[1024];
    size_t n;
} trace_t;

static void trace_add(trace_t *t, const char *tok)
{
    size_t k = strlen(tok);
    if (t->n + k + 2 < sizeof t->buf) {
        if (t->n)
            t->buf[t->n++] = ' ';
        memcpy(t->buf + t->n, tok, k);
        t->n += k;
        t->buf[t->n] = '\0';
    }
}

static void trace_addf(trace_t *t, const char *fmt, int v)
{
    char tok[32];
    snprintf(tok, sizeof tok, fmt, v);
    trace_add(t, tok);
}

/* A call's outcome: its return and the errno it left. */
typedef struct outcome {
    int rc;
    int err;
} outcome_t;

#define CALL(o, expr)                                                                              \
    do {                                                                                           \
        errno = 0;                                                                                 \
        (o).rc = (expr);                                                                           \
        (o).err = errno;                                                                           \
    } while (0)

static void expect_fail(outcome_t o, int err, const char *what)
{
    cr_expect_eq(o.rc, -1, "%s returned %d, not -1", what, o.rc);
    cr_expect_eq(o.err, err, "%s: errno %d (%s), not %d (%s)", what, o.err, strerror(o.err), err,
                 strerror(err));
}

static void expect_ok(outcome_t o, const char *what)
{
    cr_expect_eq(o.rc, 0, "%s returned %d, errno %d (%s)", what, o.rc, o.err, strerror(o.err));
}

/* Runs the loop with zev_loop_run until a fiber calls zev_loop_stop (or
 * the watchdog does: then the test fails). */
static void run_watched(zev_loop_t *loop, int ms)
{
    test_watchdog_t w;
    test_watchdog_start(&w, loop, ms);
    cr_assert_eq(zev_loop_run(loop), 0, "zev_loop_run: %s", strerror(errno));
    cr_assert_eq(test_watchdog_stop(&w), 0, "hung: the watchdog had to stop the loop");
}

static zev_fiber_t *spawn(zev_loop_t *loop, zev_fiber_fn fn, void *arg)
{
    zev_fiber_t *f = zev_fiber_spawn(loop, fn, arg, NULL);
    cr_assert_not_null(f, "zev_fiber_spawn: %s", strerror(errno));
    return f;
}

static zev_fiber_t *spawn_detached(zev_loop_t *loop, zev_fiber_fn fn, void *arg)
{
    zev_fiber_t *f = spawn(loop, fn, arg);
    cr_assert_eq(zev_fiber_detach(f), 0);
    return f;
}

/* Bytes of part i as a string (tests send short text). */
static void part_str(zev_msg_t *m, size_t i, char *out, size_t cap)
{
    size_t n = zev_msg_size(m, i);
    n = n < cap - 1 ? n : cap - 1;
    memcpy(out, zev_msg_data(m, i), n);
    out[n] = '\0';
}

static void raw_send_str(void *sock, const char *s, int flags)
{
    cr_assert_eq(zmq_send(sock, s, strlen(s), flags), (int)strlen(s), "zmq_send: %s",
                 zmq_strerror(errno));
}

/* Receives one part with a 5 s wait; its text in out. */
static int raw_recv_str(void *sock, char *out, size_t cap)
{
    test_set_int(sock, ZMQ_RCVTIMEO, 5000);
    int n = zmq_recv(sock, out, cap - 1, 0);
    cr_assert_geq(n, 0, "zmq_recv: %s", zmq_strerror(errno));
    out[(size_t)n < cap - 1 ? (size_t)n : cap - 1] = '\0';
    int more = 0;
    size_t len = sizeof more;
    zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len);
    return more;
}

/* A whole message read raw, parts joined with '|'. */
static void raw_recv_msg(void *sock, char *out, size_t cap)
{
    size_t n = 0;
    out[0] = '\0';
    int more;
    do {
        char part[64];
        more = raw_recv_str(sock, part, sizeof part);
        n += (size_t)snprintf(out + n, cap - n, "%s%s", n ? "|" : "", part);
        cr_assert_lt(n, cap);
    } while (more);
}

/* -------------------------------------------------- spawn, order, yield */

typedef struct order {
    zev_loop_t *loop;
    trace_t t;
    zev_fiber_t *handle[4];
    int self_ok;
    int rounds;
    int finished;
} order_t;

typedef struct named {
    order_t *o;
    int id;
} named_t;

static void yielder(void *arg)
{
    named_t *n = arg;
    if (zev_fiber_self() == n->o->handle[n->id])
        n->o->self_ok++;
    for (int r = 0; r < n->o->rounds; r++) {
        trace_addf(&n->o->t, "%c", 'A' + n->id);
        if (r + 1 < n->o->rounds)
            cr_assert_eq(zev_fiber_yield(), 0);
    }
    n->o->finished++;
}

Test(fiber, spawn_runs_later_in_fifo_order_and_yield_alternates)
{
    zev_loop_t *loop = test_loop_new();
    order_t o = {.loop = loop, .rounds = 3};
    named_t n[3];
    cr_assert_null(zev_fiber_self(), "outside fibers self is NULL");
    for (int i = 0; i < 3; i++) {
        n[i] = (named_t){&o, i};
        o.handle[i] = spawn(loop, yielder, &n[i]);
    }
    cr_assert_eq(o.t.n, 0, "a fiber ran inside zev_fiber_spawn");
    cr_assert_eq(zev_loop_timeout(loop), 0, "runnable fibers are work");
    /* Each iteration resumes each runnable fiber once, in FIFO order. */
    cr_assert_geq(zev_loop_run_once(loop, 0), 1);
    cr_assert_str_eq(o.t.buf, "A B C");
    cr_assert_geq(zev_loop_run_once(loop, 0), 1);
    cr_assert_str_eq(o.t.buf, "A B C A B C");
    cr_assert_eq(zev_loop_run_once(loop, 0), 0, "work left after the fibers returned");
    cr_assert_str_eq(o.t.buf, "A B C A B C A B C");
    cr_assert_eq(o.finished, 3);
    cr_assert_eq(o.self_ok, 3, "zev_fiber_self is not the spawned handle");
    for (int i = 0; i < 3; i++)
        cr_assert_eq(zev_fiber_detach(o.handle[i]), 0, "detach of a returned fiber frees it");
    cr_assert_eq(zev_loop_destroy(loop), 0);
    test_expect_no_leaks();
}

typedef struct nested {
    zev_loop_t *loop;
    trace_t t;
} nested_t;

static void child_fiber(void *arg)
{
    trace_add(&((nested_t *)arg)->t, "child");
}

static void parent_fiber(void *arg)
{
    nested_t *n = arg;
    trace_add(&n->t, "parent1");
    spawn_detached(n->loop, child_fiber, n);
    trace_add(&n->t, "parent2");
}

static void spawning_cb(zev_loop_t *loop, void *arg)
{
    nested_t *n = arg;
    trace_add(&n->t, "cb1");
    spawn_detached(loop, parent_fiber, n);
    trace_add(&n->t, "cb2");
}

Test(fiber, spawn_from_callback_and_fiber_never_nests)
{
    zev_loop_t *loop = test_loop_new();
    nested_t n = {.loop = loop};
    cr_assert_eq(zev_loop_add_callback(loop, spawning_cb, &n), 0);
    test_spin(loop, 4, 0);
    cr_assert_str_eq(n.t.buf, "cb1 cb2 parent1 parent2 child");
    cr_assert_eq(zev_loop_destroy(loop), 0);
    test_expect_no_leaks();
}

static void busy_yielder(void *arg)
{
    int *count = arg;
    while (zev_fiber_yield() == 0)
        (*count)++;
}

/* A fiber that yields for ever resumes once per iteration: run_once returns. */
Test(fiber, a_yielding_fiber_resumes_once_per_iteration)
{
    zev_loop_t *loop = test_loop_new();
    int count = 0;
    spawn_detached(loop, busy_yielder, &count);
    for (int i = 1; i <= 50; i++) {
        cr_assert_geq(zev_loop_run_once(loop, 1000), 1);
        cr_assert_eq(count, i - 1, "iteration %d: %d yields", i, count);
    }
    cr_assert_eq(zev_loop_destroy(loop), 0, "destroy cancels the yielder");
    test_expect_no_leaks();
}

/* -------------------------------------------------- join, detach, errors */

typedef struct family {
    zev_loop_t *loop;
    zev_fiber_t *kid, *self, *detached;
    int kid_done;
    uint64_t sleep_us;
    outcome_t join0, join_short, join_null, join_self, join_detached, join_second, join_ok,
        join_after, detach_joined;
    uint64_t short_ns;
} family_t;

static void sleeping_kid(void *arg)
{
    family_t *f = arg;
    zev_fiber_sleep(f->sleep_us);
    f->kid_done = 1;
}

static void second_joiner(void *arg)
{
    family_t *f = arg;
    CALL(f->join_second, zev_fiber_join(f->kid, FOREVER));
}

static void parent(void *arg)
{
    family_t *f = arg;
    f->self = zev_fiber_self();
    f->kid = spawn(f->loop, sleeping_kid, f);
    f->detached = spawn_detached(f->loop, sleeping_kid, f);
    CALL(f->join0, zev_fiber_join(f->kid, 0));
    uint64_t t0 = test_clock_ns();
    CALL(f->join_short, zev_fiber_join(f->kid, 5000));
    f->short_ns = test_clock_ns() - t0;
    CALL(f->join_null, zev_fiber_join(NULL, FOREVER));
    CALL(f->join_self, zev_fiber_join(f->self, FOREVER));
    CALL(f->join_detached, zev_fiber_join(f->detached, FOREVER));
    zev_fiber_t *other = spawn_detached(f->loop, second_joiner, f);
    (void)other;
    /* this fiber joins first; second_joiner runs while it waits */
    CALL(f->join_ok, zev_fiber_join(f->kid, FOREVER));
    zev_loop_stop(f->loop);
}

Test(fiber, join_waits_times_out_and_refuses_bad_targets)
{
    zev_loop_t *loop = test_loop_new();
    family_t f = {.loop = loop, .sleep_us = 50000};
    spawn_detached(loop, parent, &f);
    run_watched(loop, 10000);
    expect_fail(f.join0, ETIMEDOUT, "join with timeout 0 of a running fiber");
    expect_fail(f.join_short, ETIMEDOUT, "join with a 5 ms timeout");
    cr_expect_geq(f.short_ns, 5000000u, "join timed out after %llu ns",
                  (unsigned long long)f.short_ns);
    expect_fail(f.join_null, EINVAL, "join(NULL)");
    expect_fail(f.join_self, EINVAL, "join of itself");
    expect_fail(f.join_detached, EINVAL, "join of a detached fiber");
    expect_fail(f.join_second, EINVAL, "a second joiner");
    expect_ok(f.join_ok, "join");
    cr_expect_eq(f.kid_done, 1, "join returned before the fiber did");
    cr_assert_eq(zev_loop_destroy(loop), 0);
    test_expect_no_leaks();
}

static void noop_fiber(void *arg)
{
    (void)arg;
}

Test(fiber, detach_rules)
{
    zev_loop_t *loop = test_loop_new();
    outcome_t o;
    CALL(o, zev_fiber_detach(NULL));
    expect_fail(o, EINVAL, "detach(NULL)");
    zev_fiber_t *f = spawn(loop, noop_fiber, NULL);
    CALL(o, zev_fiber_detach(f));
    expect_ok(o, "detach");
    CALL(o, zev_fiber_detach(f));
    expect_fail(o, EINVAL, "detach twice");
    test_spin(loop, 2, 0); /* it returns and is freed */
    zev_fiber_t *g = spawn(loop, noop_fiber, NULL);
    test_spin(loop, 2, 0); /* returned, not freed: still joinable or detachable */
    CALL(o, zev_fiber_detach(g));
    expect_ok(o, "detach of a fiber that returned");
    zev_fiber_t *h = spawn(loop, noop_fiber, NULL); /* never detached nor joined */
    (void)h;
    cr_assert_eq(zev_loop_destroy(loop), 0, "destroy frees what nobody joined");
    test_expect_no_leaks();
}

typedef struct joined_detach {
    zev_loop_t *loop;
    zev_fiber_t *kid;
    outcome_t detach;
    outcome_t join;
} joined_detach_t;

static void detach_while_joined(zev_loop_t *loop, void *arg)
{
    (void)loop;
    joined_detach_t *j = arg;
    CALL(j->detach, zev_fiber_detach(j->kid));
}

static void joiner_of_sleeper(void *arg)
{
    joined_detach_t *j = arg;
    CALL(j->join, zev_fiber_join(j->kid, FOREVER));
    zev_loop_stop(j->loop);
}

static void short_sleeper(void *arg)
{
    (void)arg;
    zev_fiber_sleep(20000);
}

Test(fiber, detach_of_a_fiber_being_joined_is_refused)
{
    zev_loop_t *loop = test_loop_new();
    joined_detach_t j = {.loop = loop};
    j.kid = spawn(loop, short_sleeper, NULL);
    spawn_detached(loop, joiner_of_sleeper, &j);
    test_spin(loop, 2, 0);
    cr_assert_eq(zev_loop_add_callback(loop, detach_while_joined, &j), 0);
    run_watched(loop, 10000);
    expect_fail(j.detach, EINVAL, "detach of a fiber being joined");
    expect_ok(j.join, "join");
    cr_assert_eq(zev_loop_destroy(loop), 0);
    test_expect_no_leaks();
}

/* ------------------------------------------------ outside fibers, inside */

static void check_eperm_everywhere(void)
{
    zev_msg_t *m = NULL;
    zmq_msg_t part;
    zmq_msg_init(&part);
    zev_fiber_pollitem_t item = {.fd = 0, .events = ZEV_READ};
    outcome_t o;
    CALL(o, zev_fiber_sleep(1));
    expect_fail(o, EPERM, "sleep outside a fiber");
    CALL(o, zev_fiber_yield());
    expect_fail(o, EPERM, "yield outside a fiber");
    CALL(o, zev_fiber_wait_fd(0, ZEV_READ, 0));
    expect_fail(o, EPERM, "wait_fd outside a fiber");
    CALL(o, zev_fiber_recv((zev_stream_t *)&part, &m, 0));
    expect_fail(o, EPERM, "recv outside a fiber");
    CALL(o, zev_fiber_send((zev_stream_t *)&part, "x", 1, 0, 0));
    expect_fail(o, EPERM, "send outside a fiber");
    CALL(o, zev_fiber_send_msg((zev_stream_t *)&part, &part, 1, 0, 0));
    expect_fail(o, EPERM, "send_msg outside a fiber");
    CALL(o, zev_fiber_poll(&item, 1, 0));
    expect_fail(o, EPERM, "poll outside a fiber");
    CALL(o, zev_fiber_join((zev_fiber_t *)&part, 0));
    expect_fail(o, EPERM, "join outside a fiber");
    zmq_msg_close(&part);
}

static void eperm_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    check_eperm_everywhere();
    (*(int *)arg)++;
}

Test(fiber, blocking_calls_outside_a_fiber_fail_eperm)
{
    check_eperm_everywhere();
    zev_loop_t *loop = test_loop_new();
    int done = 0;
    cr_assert_eq(zev_loop_add_callback(loop, eperm_cb, &done), 0);
    test_run_until(loop, &done, 5000);
    cr_assert_eq(zev_loop_destroy(loop), 0);
}

typedef struct inside {
    zev_loop_t *loop;
    zev_stream_t *s;
    outcome_t run, run_once, destroy, flush, spawn_null, cancel_null;
    int done;
} inside_t;

static void loop_calls_fiber(void *arg)
{
    inside_t *in = arg;
    CALL(in->run, zev_loop_run(in->loop));
    CALL(in->run_once, zev_loop_run_once(in->loop, 0));
    CALL(in->destroy, zev_loop_destroy(in->loop));
    CALL(in->flush, zev_stream_flush(in->s, ZEV_WRITE, 0));
    errno = 0;
    in->spawn_null.rc = zev_fiber_spawn(in->loop, NULL, NULL, NULL) ? 0 : -1;
    in->spawn_null.err = errno;
    CALL(in->cancel_null, zev_fiber_cancel(NULL));
    in->done = 1;
}

Test(fiber, loop_calls_from_a_fiber_fail_ebusy)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    inside_t in = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, loop_calls_fiber, &in);
    test_run_until(p.loop, &in.done, 5000);
    expect_fail(in.run, EBUSY, "zev_loop_run in a fiber");
    expect_fail(in.run_once, EBUSY, "zev_loop_run_once in a fiber");
    expect_fail(in.destroy, EBUSY, "zev_loop_destroy in a fiber");
    expect_fail(in.flush, EBUSY, "zev_stream_flush in a fiber");
    expect_fail(in.spawn_null, EINVAL, "spawn of NULL fn");
    expect_fail(in.cancel_null, EINVAL, "cancel(NULL)");
    test_pair_close(&p);
}

/* ------------------------------------------------------------ sleep, cancel */

typedef struct sleeper {
    zev_loop_t *loop;
    uint64_t us;
    uint64_t slept_ns;
    outcome_t first, later_sleep, later_yield, later_recv;
    zev_stream_t *s;
    int done;
} sleeper_t;

static void timed_sleep(void *arg)
{
    sleeper_t *s = arg;
    uint64_t t0 = test_clock_ns();
    CALL(s->first, zev_fiber_sleep(s->us));
    s->slept_ns = test_clock_ns() - t0;
    s->done = 1;
}

Test(fiber, sleep_lasts_at_least_its_time)
{
    zev_loop_t *loop = test_loop_new();
    sleeper_t a = {.loop = loop, .us = 20000}, z = {.loop = loop, .us = 0};
    spawn_detached(loop, timed_sleep, &a);
    spawn_detached(loop, timed_sleep, &z);
    test_run_until(loop, &a.done, 5000);
    expect_ok(a.first, "sleep(20 ms)");
    cr_expect_geq(a.slept_ns, 20000000u, "slept %llu ns", (unsigned long long)a.slept_ns);
    expect_ok(z.first, "sleep(0)");
    cr_expect_eq(z.done, 1);
    cr_assert_eq(zev_loop_destroy(loop), 0);
}

static void cancelled_sleeper(void *arg)
{
    sleeper_t *s = arg;
    zev_msg_t *m;
    CALL(s->first, zev_fiber_sleep(s->us));
    CALL(s->later_sleep, zev_fiber_sleep(0));
    CALL(s->later_yield, zev_fiber_yield());
    CALL(s->later_recv, zev_fiber_recv(s->s, &m, 0));
    s->done = 1;
}

static void cancel_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    cr_assert_eq(zev_fiber_cancel(arg), 0);
}

Test(fiber, cancel_fails_the_current_and_every_later_call)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *st = test_stream_new(p.loop, p.a);
    sleeper_t s = {.loop = p.loop, .us = 10000000, .s = st};
    zev_fiber_t *f = spawn(p.loop, cancelled_sleeper, &s);
    cr_assert_not_null(zev_timer_start(p.loop, 5000, 0, cancel_timer, f));
    test_run_until(p.loop, &s.done, 5000);
    expect_fail(s.first, ECANCELED, "the sleep it was in");
    expect_fail(s.later_sleep, ECANCELED, "a later sleep");
    expect_fail(s.later_yield, ECANCELED, "a later yield");
    expect_fail(s.later_recv, ECANCELED, "a later recv");
    cr_assert_eq(zev_fiber_cancel(f), 0, "cancel of a fiber that returned");
    cr_assert_eq(zev_fiber_detach(f), 0);
    test_pair_close(&p);
    test_expect_no_leaks();
}

typedef struct selfcancel {
    outcome_t before, after;
    int started;
} selfcancel_t;

static void self_canceller(void *arg)
{
    selfcancel_t *c = arg;
    c->started = 1;
    CALL(c->before, zev_fiber_cancel(zev_fiber_self()));
    CALL(c->after, zev_fiber_yield());
}

static void never_started(void *arg)
{
    selfcancel_t *c = arg;
    c->started = 1;
    CALL(c->after, zev_fiber_sleep(0));
}

typedef struct yc {
    zev_fiber_t *victim;
    outcome_t victim_yield;
    int order;
} yc_t;

static void yield_victim(void *arg)
{
    yc_t *y = arg;
    CALL(y->victim_yield, zev_fiber_yield()); /* runnable when cancelled */
}

static void yield_canceller(void *arg)
{
    yc_t *y = arg;
    zev_fiber_yield(); /* resumes after the victim yielded, before the victim does */
    zev_fiber_cancel(y->victim);
}

Test(fiber, cancel_of_self_of_an_unstarted_and_of_a_runnable_fiber)
{
    zev_loop_t *loop = test_loop_new();
    selfcancel_t self = {0}, unstarted = {0};
    spawn_detached(loop, self_canceller, &self);
    zev_fiber_t *u = spawn(loop, never_started, &unstarted);
    cr_assert_eq(zev_fiber_cancel(u), 0, "cancel before its first run");
    yc_t y = {0};
    spawn_detached(loop, yield_canceller, &y); /* first: runs before the victim resumes */
    y.victim = spawn(loop, yield_victim, &y);
    test_spin(loop, 4, 0);
    expect_ok(self.before, "cancel(self)");
    expect_fail(self.after, ECANCELED, "yield after cancelling itself");
    cr_expect_eq(unstarted.started, 1, "a cancelled fiber still runs its function");
    expect_fail(unstarted.after, ECANCELED, "the first call of a fiber cancelled before it ran");
    expect_fail(y.victim_yield, ECANCELED, "the yield of a fiber cancelled while runnable");
    cr_assert_eq(zev_fiber_detach(u), 0);
    cr_assert_eq(zev_fiber_detach(y.victim), 0);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    test_expect_no_leaks();
}

/* ------------------------------------------------------------------- recv */

typedef struct rx {
    zev_loop_t *loop;
    zev_stream_t *s;
    int want;
    int got;
    int bad;         /* messages not as expected */
    int64_t timeout; /* per recv */
    outcome_t last;
    uint64_t waited_ns;
    int done;
    zev_frame_t *kept;
    trace_t t;
} rx_t;

static void recv_in_order(void *arg)
{
    rx_t *r = arg;
    while (r->got < r->want) {
        zev_msg_t *m;
        CALL(r->last, zev_fiber_recv(r->s, &m, FOREVER));
        if (r->last.rc < 0)
            break;
        char a[32], b[32], want[32];
        snprintf(want, sizeof want, "m%d", r->got);
        part_str(m, 0, a, sizeof a);
        part_str(m, 1, b, sizeof b);
        if (zev_msg_parts(m) != 2 || strcmp(a, want) || strcmp(b, "tail"))
            r->bad++;
        r->got++;
    }
    r->done = 1;
}

static void recv_transport(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, transport);
    rx_t r = {.loop = p.loop, .s = test_stream_new(p.loop, p.a), .want = 500};
    spawn_detached(p.loop, recv_in_order, &r);
    test_spin(p.loop, 2, 0); /* the fiber waits first: messages come to a waiter */
    for (int i = 0; i < r.want; i++) {
        char head[32];
        snprintf(head, sizeof head, "m%d", i);
        raw_send_str(p.b, head, ZMQ_SNDMORE);
        raw_send_str(p.b, "tail", 0);
    }
    test_run_until(p.loop, &r.done, 10000);
    expect_ok(r.last, "recv");
    cr_assert_eq(r.got, r.want);
    cr_assert_eq(r.bad, 0, "%d messages out of order or mangled", r.bad);
    test_pair_close(&p);
}

Test(fiber, recv_gets_whole_messages_in_order_inproc)
{
    recv_transport("inproc");
}
Test(fiber, recv_gets_whole_messages_in_order_ipc)
{
    recv_transport("ipc");
}
Test(fiber, recv_gets_whole_messages_in_order_tcp)
{
    recv_transport("tcp");
}

static void recv_timeouts(void *arg)
{
    rx_t *r = arg;
    zev_msg_t *m;
    outcome_t o0;
    CALL(o0, zev_fiber_recv(r->s, &m, 0));
    r->got = o0.err; /* EAGAIN expected: nothing there, and it must not wait */
    uint64_t t0 = test_clock_ns();
    CALL(r->last, zev_fiber_recv(r->s, &m, 20000));
    r->waited_ns = test_clock_ns() - t0;
    r->done = 1;
}

Test(fiber, recv_timeout_is_eagain)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    rx_t r = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, recv_timeouts, &r);
    test_run_until(p.loop, &r.done, 5000);
    cr_expect_eq(r.got, EAGAIN, "timeout 0 on an empty stream: errno %d", r.got);
    expect_fail(r.last, EAGAIN, "recv with a 20 ms timeout");
    cr_expect_geq(r.waited_ns, 20000000u, "gave up after %llu ns", (unsigned long long)r.waited_ns);
    test_pair_close(&p);
}

static void ignore_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (void)arg;
}

typedef struct badrecv {
    zev_stream_t *s;
    outcome_t busy, null_s, null_m, poll_busy, bad_events, null_items;
    int done;
} badrecv_t;

static void bad_recv_calls(void *arg)
{
    badrecv_t *b = arg;
    zev_msg_t *m;
    CALL(b->busy, zev_fiber_recv(b->s, &m, 0));
    CALL(b->null_s, zev_fiber_recv(NULL, &m, 0));
    CALL(b->null_m, zev_fiber_recv(b->s, NULL, 0));
    zev_fiber_pollitem_t it = {.stream = b->s, .events = ZEV_READ};
    CALL(b->poll_busy, zev_fiber_poll(&it, 1, 0));
    it.events = 4;
    CALL(b->bad_events, zev_fiber_poll(&it, 1, 0));
    CALL(b->null_items, zev_fiber_poll(NULL, 1, 0));
    b->done = 1;
}

Test(fiber, recv_and_poll_refuse_bad_arguments)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    badrecv_t b = {.s = test_stream_new(p.loop, p.a)};
    cr_assert_eq(zev_stream_on_recv(b.s, ignore_msg, NULL), 0);
    spawn_detached(p.loop, bad_recv_calls, &b);
    test_run_until(p.loop, &b.done, 5000);
    expect_fail(b.busy, EBUSY, "recv on a stream with on_recv");
    expect_fail(b.null_s, EINVAL, "recv(NULL stream)");
    expect_fail(b.null_m, EINVAL, "recv(NULL msg)");
    expect_fail(b.poll_busy, EINVAL, "poll for READ on a stream with on_recv");
    expect_fail(b.bad_events, EINVAL, "poll with bad events");
    expect_fail(b.null_items, EINVAL, "poll(NULL, 1)");
    test_pair_close(&p);
}

/* Several fibers wait on one stream: one message each, first come first
 * served, and a fiber that got one queues up again behind the others. */
typedef struct pool {
    zev_stream_t *s;
    trace_t t;
    int got;
    int want;
    int dup;
    unsigned char seen[64];
    int done;
} pool_t;

typedef struct pool_member {
    pool_t *p;
    int id;
} pool_member_t;

static void pool_receiver(void *arg)
{
    pool_member_t *pm = arg;
    pool_t *p = pm->p;
    while (p->got < p->want) {
        zev_msg_t *m;
        if (zev_fiber_recv(p->s, &m, FOREVER) < 0)
            break;
        char txt[16];
        part_str(m, 0, txt, sizeof txt);
        int k = atoi(txt);
        if (k < 0 || k >= 64 || p->seen[k]++)
            p->dup++;
        char tok[16];
        snprintf(tok, sizeof tok, "%d:%d", pm->id, k);
        trace_add(&p->t, tok);
        if (++p->got == p->want)
            p->done = 1;
    }
}

Test(fiber, receivers_on_one_stream_get_one_message_each_fifo)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    pool_t pl = {.s = test_stream_new(p.loop, p.a), .want = 8};
    pool_member_t pm[4];
    for (int i = 0; i < 4; i++) {
        pm[i] = (pool_member_t){&pl, i};
        spawn_detached(p.loop, pool_receiver, &pm[i]);
    }
    test_spin(p.loop, 3, 0); /* all four wait, in spawn order */
    cr_assert_eq(pl.got, 0);
    for (int i = 0; i < 8; i++) {
        char txt[8];
        snprintf(txt, sizeof txt, "%d", i);
        raw_send_str(p.b, txt, 0);
    }
    /* the iteration that hands the stream to the first waiter serves all
     * four: each one that got a message hands the stream to the next */
    for (int i = 0; i < 1000 && pl.got == 0; i++)
        zev_loop_run_once(p.loop, 10);
    cr_assert_eq(pl.got, 4, "one iteration served %d of the 4 waiting fibers", pl.got);
    test_run_until(p.loop, &pl.done, 5000);
    cr_assert_eq(pl.dup, 0, "a message was received twice");
    cr_assert_str_eq(pl.t.buf, "0:0 1:1 2:2 3:3 0:4 1:5 2:6 3:7");
    test_pair_close(&p);
}

static void keep_and_go_on(void *arg)
{
    rx_t *r = arg;
    for (int i = 0; i < r->want; i++) {
        zev_msg_t *m;
        CALL(r->last, zev_fiber_recv(r->s, &m, FOREVER));
        if (r->last.rc < 0)
            break;
        if (i == 0) {
            r->kept = zev_msg_keep(m, 0);
            if (!r->kept)
                r->bad++;
        }
        r->got++;
    }
    r->done = 1;
}

static void *release_on_thread(void *arg)
{
    return (void *)(intptr_t)zev_frame_release(arg);
}

Test(fiber, kept_frames_outlive_the_next_calls)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    rx_t r = {.loop = p.loop, .s = test_stream_new(p.loop, p.a), .want = 300};
    spawn_detached(p.loop, keep_and_go_on, &r);
    char big[200];
    memset(big, 'k', sizeof big);
    cr_assert_eq(zmq_send(p.b, big, sizeof big, 0), (int)sizeof big);
    for (int i = 1; i < r.want; i++) {
        memset(big, 'a' + i % 26, sizeof big);
        cr_assert_eq(zmq_send(p.b, big, sizeof big, 0), (int)sizeof big);
    }
    test_run_until(p.loop, &r.done, 5000);
    expect_ok(r.last, "recv");
    cr_assert_eq(r.got, r.want);
    cr_assert_not_null(r.kept);
    cr_assert_eq(zev_frame_size(r.kept), sizeof big);
    const char *d = zev_frame_data(r.kept);
    for (size_t i = 0; i < sizeof big; i++)
        cr_assert_eq(d[i], 'k', "the kept frame was overwritten at %zu", i);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, release_on_thread, r.kept), 0);
    void *rc;
    pthread_join(th, &rc);
    cr_assert_eq((intptr_t)rc, 0, "zev_frame_release on another thread");
    test_pair_close(&p);
    test_expect_no_leaks();
}

/* A stream closed while a fiber waits on it, or holds its message: the
 * call fails EBADF and the stream stays valid until the fiber leaves it. */
typedef struct closing {
    zev_loop_t *loop;
    zev_stream_t *s;
    outcome_t waiting, after;
    int closes;
    int done;
    char held[16];
} closing_t;

static void wait_then_closed(void *arg)
{
    closing_t *c = arg;
    zev_msg_t *m;
    CALL(c->waiting, zev_fiber_recv(c->s, &m, FOREVER));
    c->done = 1;
}

static void close_stream_cb(zev_timer_t *t, void *arg)
{
    (void)t;
    closing_t *c = arg;
    cr_assert_eq(zev_stream_close(c->s, 0), 0);
}

static void count_close(zev_stream_t *s, void *arg)
{
    (void)s;
    ((closing_t *)arg)->closes++;
}

Test(fiber, closing_a_stream_wakes_its_waiters_with_ebadf)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    closing_t c = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    cr_assert_eq(zev_stream_on_close(c.s, count_close, &c), 0);
    spawn_detached(p.loop, wait_then_closed, &c);
    cr_assert_not_null(zev_timer_start(p.loop, 2000, 0, close_stream_cb, &c));
    test_run_until(p.loop, &c.done, 5000);
    expect_fail(c.waiting, EBADF, "recv on a stream closed while waiting");
    test_spin(p.loop, 2, 0);
    cr_assert_eq(c.closes, 1);
    test_pair_close(&p);
    test_expect_no_leaks();
}

static void hold_close_read(void *arg)
{
    closing_t *c = arg;
    zev_msg_t *m;
    if (zev_fiber_recv(c->s, &m, FOREVER) < 0)
        return;
    zev_stream_close(c->s, 0);
    /* the message stays valid until this fiber's next blocking call, the
     * closed stream for calls made before the close phase: they fail */
    part_str(m, 0, c->held, sizeof c->held);
    CALL(c->after, zev_fiber_recv(c->s, &m, 0));
    c->done = 1;
}

Test(fiber, a_stream_closed_by_its_fiber_keeps_the_message_it_holds)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    closing_t c = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    cr_assert_eq(zev_stream_on_close(c.s, count_close, &c), 0);
    raw_send_str(p.b, "one", 0);
    spawn_detached(p.loop, hold_close_read, &c);
    test_run_until(p.loop, &c.done, 5000);
    cr_assert_str_eq(c.held, "one");
    expect_fail(c.after, EBADF, "recv after close");
    test_spin(p.loop, 2, 0);
    cr_assert_eq(c.closes, 1);
    test_pair_close(&p);
    test_expect_no_leaks();
}

typedef struct gone {
    zev_stream_t *s;
    outcome_t o;
    int done;
} gone_t;

static void wait_for_gone(void *arg)
{
    gone_t *g = arg;
    zev_msg_t *m;
    CALL(g->o, zev_fiber_recv(g->s, &m, FOREVER));
    g->done = 1;
}

static void *shutdown_ctx(void *ctx)
{
    test_sleep_ms(20);
    zmq_ctx_shutdown(ctx);
    return NULL;
}

Test(fiber, a_context_shut_down_under_a_waiting_fiber_fails_eterm)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    gone_t g = {.s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, wait_for_gone, &g);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, shutdown_ctx, p.ctx), 0);
    test_run_until(p.loop, &g.done, 5000);
    pthread_join(th, NULL);
    expect_fail(g.o, ETERM, "recv when the context shuts down");
    test_pair_close(&p);
}

/* ------------------------------------------------------------------- send */

/* Fills the pipe PUSH -> PULL with fiber sends of timeout 0; the count. */
typedef struct drainer drainer_t;
typedef struct tx {
    zev_loop_t *loop;
    drainer_t *drainer;
    zev_stream_t *s;
    void *peer;
    int prefill; /* messages taken before the first EAGAIN */
    outcome_t full, waited, timed_out, multi, queued_order;
    uint64_t waited_ns;
    uint64_t seq_before, seq_after;
    int done;
    int drain_after_ms;
} tx_t;

static void fill(tx_t *t)
{
    char txt[16];
    for (;;) {
        snprintf(txt, sizeof txt, "p%d", t->prefill);
        /* the first waits (a tcp peer may not be connected yet), then until full */
        CALL(t->full, zev_fiber_send(t->s, txt, strlen(txt), 0, t->prefill ? 0 : FOREVER));
        if (t->full.rc < 0)
            break;
        t->prefill++;
    }
}

/* The peer's side: reads what there is and checks the order as it goes
 * ("p0", "p1", ... then "last"). */
typedef struct drainer {
    void *peer;
    int prefill; /* how many "p" messages come before "last" */
    int n;       /* received */
    int bad;     /* out of order */
} drainer_t;

static void drain_one(drainer_t *d, const char *buf)
{
    char want[24];
    if (d->n < d->prefill)
        snprintf(want, sizeof want, "p%d", d->n);
    else
        snprintf(want, sizeof want, "%s", d->n == d->prefill ? "last" : "(nothing)");
    if (strcmp(buf, want))
        d->bad++;
    d->n++;
}

/* Reads what is there now. */
static void drain_all(drainer_t *d)
{
    for (;;) {
        char buf[24];
        int n = zmq_recv(d->peer, buf, sizeof buf - 1, ZMQ_DONTWAIT);
        if (n < 0)
            break;
        buf[n] = '\0';
        drain_one(d, buf);
    }
}

/* Reads until `total` came (5 s per message at most), then checks that
 * nothing more comes. */
static void drain_until(drainer_t *d, int total)
{
    test_set_int(d->peer, ZMQ_RCVTIMEO, 5000);
    while (d->n < total) {
        char buf[24];
        int n = zmq_recv(d->peer, buf, sizeof buf - 1, 0);
        cr_assert_geq(n, 0, "after %d of %d: %s", d->n, total, zmq_strerror(errno));
        buf[n] = '\0';
        drain_one(d, buf);
    }
    test_sleep_ms(10);
    drain_all(d);
}

static void drain_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    drain_all(arg);
}

static void send_waits_for_room(void *arg)
{
    tx_t *t = arg;
    fill(t);
    t->drainer->prefill = t->prefill;
    uint64_t t0 = test_clock_ns();
    CALL(t->waited, zev_fiber_send(t->s, "last", 4, 0, FOREVER));
    t->waited_ns = test_clock_ns() - t0;
    t->done = 1;
}

/* Over inproc the pipe is full until the peer reads (the timer, at 30 ms);
 * over ipc and tcp libzmq's I/O thread also makes room by moving messages
 * to the kernel, so there only the order and the count are checked. */
static void send_transport(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, 4);
    test_set_int(p.b, ZMQ_RCVHWM, 4);
    test_bind_connect(p.a, p.b, transport);
    test_sleep_ms(20); /* tcp/ipc: connected */
    drainer_t d = {.peer = p.b};
    tx_t t = {.loop = p.loop, .s = test_stream_new(p.loop, p.a), .drainer = &d};
    spawn_detached(p.loop, send_waits_for_room, &t);
    cr_assert_not_null(zev_timer_start(p.loop, 30000, 0, drain_timer, &d));
    test_run_until(p.loop, &t.done, 10000);
    expect_fail(t.full, EAGAIN, "send with timeout 0 into a full pipe");
    cr_assert_gt(t.prefill, 0);
    expect_ok(t.waited, "send that waited for room");
    if (!strcmp(transport, "inproc"))
        cr_expect_geq(t.waited_ns, 25000000u, "it returned before the peer read");
    drain_until(&d, t.prefill + 1);
    cr_assert_eq(d.n, t.prefill + 1, "%d messages arrived, %d sent", d.n, t.prefill + 1);
    cr_assert_eq(d.bad, 0, "%d messages out of order", d.bad);
    test_pair_close(&p);
}

Test(fiber, send_waits_for_room_inproc)
{
    send_transport("inproc");
}
Test(fiber, send_waits_for_room_ipc)
{
    send_transport("ipc");
}
Test(fiber, send_waits_for_room_tcp)
{
    send_transport("tcp");
}

static void send_times_out(void *arg)
{
    tx_t *t = arg;
    fill(t);
    t->seq_before = zev_stream_send_seq(t->s);
    zmq_msg_t parts[2];
    zmq_msg_init_size(&parts[0], 3);
    memcpy(zmq_msg_data(&parts[0]), "big", 3);
    zmq_msg_init_size(&parts[1], 3);
    memcpy(zmq_msg_data(&parts[1]), "end", 3);
    uint64_t t0 = test_clock_ns();
    CALL(t->timed_out, zev_fiber_send_msg(t->s, parts, 2, 0, 20000));
    t->waited_ns = test_clock_ns() - t0;
    t->seq_after = zev_stream_send_seq(t->s);
    /* nothing taken: the parts are still the caller's */
    t->multi.rc = (int)(zmq_msg_size(&parts[0]) + zmq_msg_size(&parts[1]));
    zmq_msg_close(&parts[0]);
    zmq_msg_close(&parts[1]);
    t->done = 1;
}

Test(fiber, send_timeout_takes_nothing)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, 4);
    test_set_int(p.b, ZMQ_RCVHWM, 4);
    test_bind_connect(p.a, p.b, "inproc");
    tx_t t = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, send_times_out, &t);
    test_run_until(p.loop, &t.done, 5000);
    expect_fail(t.timed_out, EAGAIN, "send_msg with a 20 ms timeout into a full pipe");
    cr_expect_geq(t.waited_ns, 20000000u);
    cr_expect_eq(t.seq_after, t.seq_before, "a send that timed out took a number");
    cr_expect_eq(t.multi.rc, 6, "the parts were taken");
    drainer_t d = {.peer = p.b, .prefill = t.prefill};
    drain_until(&d, t.prefill);
    cr_assert_eq(d.n, t.prefill, "the timed-out message arrived anyway");
    cr_assert_eq(d.bad, 0);
    test_pair_close(&p);
}

typedef struct statuses {
    uint64_t seq[16];
    int status[16];
    int n;
} statuses_t;

static void record_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    statuses_t *st = arg;
    if (st->n < 16) {
        st->seq[st->n] = seq;
        st->status[st->n] = status;
    }
    st->n++;
}

static void send_unroutable(void *arg)
{
    tx_t *t = arg;
    CALL(t->multi, zev_fiber_send(t->s, "nobody", 6, ZMQ_SNDMORE, FOREVER));
    if (t->multi.rc == 0)
        CALL(t->waited, zev_fiber_send(t->s, "x", 1, 0, FOREVER));
    t->done = 1;
}

Test(fiber, send_reports_what_on_send_reports)
{
    test_pair_t p = test_pair_open(ZMQ_ROUTER, TEST_NO_SOCKET, NULL);
    test_set_int(p.a, ZMQ_ROUTER_MANDATORY, 1);
    char ep[128];
    test_bind_ep(p.a, "inproc", ep, sizeof ep);
    tx_t t = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    statuses_t st = {0};
    cr_assert_eq(zev_stream_on_send(t.s, record_send, &st), 0);
    spawn_detached(p.loop, send_unroutable, &t);
    test_run_until(p.loop, &t.done, 5000);
    expect_fail(t.multi, EHOSTUNREACH, "send to an unknown peer with ROUTER_MANDATORY");
    cr_expect_eq(zev_stream_send_seq(t.s), 0, "a refused message took a number");
    test_spin(p.loop, 2, 0);
    cr_expect_eq(st.n, 0, "a message that was refused at once got a status");
    test_pair_close(&p);
}

static void send_after_queue(void *arg)
{
    tx_t *t = arg;
    CALL(t->queued_order, zev_fiber_send(t->s, "fiber", 5, 0, FOREVER));
    t->seq_after = zev_stream_send_seq(t->s);
    t->done = 1;
}

static void queue_three_then_spawn(zev_loop_t *loop, void *arg)
{
    tx_t *t = arg;
    for (int i = 0; i < 3; i++) {
        char txt[8];
        snprintf(txt, sizeof txt, "q%d", i);
        cr_assert_eq(zev_stream_send(t->s, txt, strlen(txt), 0), 0);
    }
    spawn_detached(loop, send_after_queue, t);
}

Test(fiber, a_fiber_message_goes_after_those_queued_before_it)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, 2);
    test_set_int(p.b, ZMQ_RCVHWM, 2);
    test_bind_connect(p.a, p.b, "inproc");
    tx_t t = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    statuses_t st = {0};
    cr_assert_eq(zev_stream_on_send(t.s, record_send, &st), 0);
    /* fill the pipe raw, so the three callback sends queue */
    int pre = 0;
    while (zmq_send(p.a, "pre", 3, ZMQ_DONTWAIT) == 3)
        pre++;
    cr_assert_eq(zev_loop_add_callback(p.loop, queue_three_then_spawn, &t), 0);
    test_spin(p.loop, 4, 0);
    cr_assert_eq(t.done, 0, "the fiber's send did not wait behind the queue");
    char got[64][8];
    int n = 0;
    for (int i = 0; i < 200 && !t.done; i++) {
        char buf[8];
        int k;
        while (n < 64 && (k = zmq_recv(p.b, buf, sizeof buf - 1, ZMQ_DONTWAIT)) >= 0) {
            buf[k] = '\0';
            strcpy(got[n++], buf);
        }
        zev_loop_run_once(p.loop, 10);
    }
    cr_assert_eq(t.done, 1);
    expect_ok(t.queued_order, "fiber send");
    test_set_int(p.b, ZMQ_RCVTIMEO, 5000);
    while (n < pre + 4) {
        char buf[8];
        int k = zmq_recv(p.b, buf, sizeof buf - 1, 0);
        cr_assert_geq(k, 0, "%d of %d arrived", n, pre + 4);
        buf[k] = '\0';
        strcpy(got[n++], buf);
    }
    for (int i = 0; i < pre; i++)
        cr_assert_str_eq(got[i], "pre");
    cr_assert_str_eq(got[pre + 0], "q0");
    cr_assert_str_eq(got[pre + 1], "q1");
    cr_assert_str_eq(got[pre + 2], "q2");
    cr_assert_str_eq(got[pre + 3], "fiber");
    cr_assert_eq(t.seq_after, 4, "the fiber's message is number 4");
    test_spin(p.loop, 2, 0);
    cr_assert_eq(st.n, 4, "%d statuses", st.n);
    for (int i = 0; i < 4; i++) {
        cr_expect_eq(st.seq[i], (uint64_t)i + 1);
        cr_expect_eq(st.status[i], 0);
    }
    test_pair_close(&p);
}

/* Multipart messages from fibers are never interleaved, and a callback
 * cannot send into the middle of one. */
typedef struct mp {
    zev_loop_t *loop;
    zev_stream_t *s;
    outcome_t cb_send;
    int cb_ran;
    int done;
    outcome_t a[3], b[2];
} mp_t;

static void mp_a(void *arg)
{
    mp_t *m = arg;
    CALL(m->a[0], zev_fiber_send(m->s, "a1", 2, ZMQ_SNDMORE, FOREVER));
    zev_fiber_yield();
    zev_fiber_yield(); /* b and the callback try meanwhile */
    CALL(m->a[1], zev_fiber_send(m->s, "a2", 2, ZMQ_SNDMORE, FOREVER));
    zev_fiber_yield();
    CALL(m->a[2], zev_fiber_send(m->s, "a3", 2, 0, FOREVER));
    m->done++;
}

static void mp_b(void *arg)
{
    mp_t *m = arg;
    CALL(m->b[0], zev_fiber_send(m->s, "b1", 2, ZMQ_SNDMORE, FOREVER));
    CALL(m->b[1], zev_fiber_send(m->s, "b2", 2, 0, FOREVER));
    m->done++;
}

static void mp_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    mp_t *m = arg;
    CALL(m->cb_send, zev_stream_send(m->s, "cb", 2, 0));
    m->cb_ran = 1;
}

static void mp_starter(void *arg)
{
    mp_t *m = arg;
    spawn_detached(m->loop, mp_a, m);
    spawn_detached(m->loop, mp_b, m);
    zev_fiber_yield(); /* a has begun its message */
    cr_assert_eq(zev_loop_add_callback(m->loop, mp_cb, m), 0);
}

Test(fiber, multipart_messages_from_fibers_are_never_interleaved)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    mp_t m = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, mp_starter, &m);
    for (int i = 0; i < 100 && m.done < 2; i++)
        zev_loop_run_once(p.loop, 10);
    cr_assert_eq(m.done, 2);
    cr_assert_eq(m.cb_ran, 1);
    for (int i = 0; i < 3; i++)
        expect_ok(m.a[i], "a's parts");
    for (int i = 0; i < 2; i++)
        expect_ok(m.b[i], "b's parts");
    expect_fail(m.cb_send, EBUSY, "a callback's send inside a fiber's open message");
    char msg[64];
    raw_recv_msg(p.b, msg, sizeof msg);
    cr_assert_str_eq(msg, "a1|a2|a3");
    raw_recv_msg(p.b, msg, sizeof msg);
    cr_assert_str_eq(msg, "b1|b2");
    test_pair_close(&p);
}

static void send_msg_moves(void *arg)
{
    tx_t *t = arg;
    zmq_msg_t parts[3];
    const char *txt[3] = {"one", "two", "three"};
    for (int i = 0; i < 3; i++) {
        zmq_msg_init_size(&parts[i], strlen(txt[i]));
        memcpy(zmq_msg_data(&parts[i]), txt[i], strlen(txt[i]));
    }
    CALL(t->multi, zev_fiber_send_msg(t->s, parts, 3, 0, FOREVER));
    t->prefill = 0;
    for (int i = 0; i < 3; i++) {
        t->prefill += (int)zmq_msg_size(&parts[i]);
        zmq_msg_close(&parts[i]);
    }
    t->done = 1;
}

Test(fiber, send_msg_moves_its_parts)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    tx_t t = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, send_msg_moves, &t);
    test_run_until(p.loop, &t.done, 5000);
    expect_ok(t.multi, "send_msg");
    cr_assert_eq(t.prefill, 0, "parts not moved out");
    char msg[64];
    raw_recv_msg(p.b, msg, sizeof msg);
    cr_assert_str_eq(msg, "one|two|three");
    test_pair_close(&p);
}

/* ------------------------------------------------------------ poll, fds */

typedef struct pl {
    zev_loop_t *loop;
    zev_stream_t *s, *out;
    int pipe[2];
    int rc[4];
    short revents[4][3];
    outcome_t timeout, eexist, ebadf_fd, bad_events;
    uint64_t waited_ns;
    int done;
} pl_t;

static void poller(void *arg)
{
    pl_t *p = arg;
    zev_fiber_pollitem_t it[3] = {
        {.stream = p->s, .events = ZEV_READ},
        {.stream = NULL, .fd = p->pipe[0], .events = ZEV_READ},
        {.stream = p->out, .events = ZEV_WRITE},
    };
    /* 1: only the PUSH side has room */
    p->rc[0] = zev_fiber_poll(it, 3, FOREVER);
    for (int i = 0; i < 3; i++)
        p->revents[0][i] = it[i].revents;
    /* 2: the pipe becomes readable (a timer writes) */
    p->rc[1] = zev_fiber_poll(it, 2, FOREVER);
    for (int i = 0; i < 2; i++)
        p->revents[1][i] = it[i].revents;
    char c;
    (void)!read(p->pipe[0], &c, 1);
    /* 3: a message comes (a timer sends it) */
    p->rc[2] = zev_fiber_poll(it, 2, FOREVER);
    for (int i = 0; i < 2; i++)
        p->revents[2][i] = it[i].revents;
    zev_msg_t *m;
    zev_fiber_recv(p->s, &m, 0);
    /* 4: nothing comes */
    uint64_t t0 = test_clock_ns();
    CALL(p->timeout, zev_fiber_poll(it, 2, 10000));
    p->waited_ns = test_clock_ns() - t0;
    p->done = 1;
}

static void write_pipe_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    pl_t *p = arg;
    cr_assert_eq(write(p->pipe[1], "x", 1), 1);
}

static void send_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    raw_send_str(arg, "hello", 0);
}

Test(fiber, poll_over_streams_and_fds)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    void *push2 = test_socket(p.ctx, ZMQ_PUSH), *pull2 = test_socket(p.ctx, ZMQ_PULL);
    test_bind_connect(pull2, push2, "inproc");
    pl_t st = {
        .loop = p.loop, .s = test_stream_new(p.loop, p.a), .out = test_stream_new(p.loop, push2)};
    test_pipe(st.pipe);
    spawn_detached(p.loop, poller, &st);
    cr_assert_not_null(zev_timer_start(p.loop, 5000, 0, write_pipe_timer, &st));
    cr_assert_not_null(zev_timer_start(p.loop, 15000, 0, send_timer, p.b));
    test_run_until(p.loop, &st.done, 5000);
    cr_expect_eq(st.rc[0], 1);
    cr_expect_eq(st.revents[0][0], 0);
    cr_expect_eq(st.revents[0][1], 0);
    cr_expect_eq(st.revents[0][2], ZEV_WRITE);
    cr_expect_eq(st.rc[1], 1);
    cr_expect_eq(st.revents[1][0], 0);
    cr_expect_eq(st.revents[1][1], ZEV_READ);
    cr_expect_eq(st.rc[2], 1);
    cr_expect_eq(st.revents[2][0], ZEV_READ);
    cr_expect_eq(st.revents[2][1], 0);
    cr_expect_eq(st.timeout.rc, 0, "poll with nothing ready: %d", st.timeout.rc);
    cr_expect_geq(st.waited_ns, 10000000u);
    cr_assert_eq(zev_loop_destroy(p.loop), 0);
    p.loop = NULL;
    test_close(push2);
    test_close(pull2);
    close(st.pipe[0]);
    close(st.pipe[1]);
    test_pair_close(&p);
}

static void poll_closed(void *arg)
{
    pl_t *p = arg;
    zev_fiber_pollitem_t it = {.stream = p->s, .events = ZEV_READ};
    p->rc[0] = zev_fiber_poll(&it, 1, FOREVER); /* the stream is gone after it */
    p->revents[0][0] = it.revents;
    p->done = 1;
}

static void close_pl_stream(zev_timer_t *t, void *arg)
{
    (void)t;
    zev_stream_close(((pl_t *)arg)->s, 0);
}

Test(fiber, poll_reports_a_stream_closed_while_waiting)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    pl_t st = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, poll_closed, &st);
    cr_assert_not_null(zev_timer_start(p.loop, 2000, 0, close_pl_stream, &st));
    test_run_until(p.loop, &st.done, 5000);
    cr_expect_eq(st.rc[0], 1);
    cr_expect_eq(st.revents[0][0], ZEV_READ, "revents %d: the events asked for", st.revents[0][0]);
    test_pair_close(&p);
    test_expect_no_leaks();
}

static void fd_waiter(void *arg)
{
    pl_t *p = arg;
    uint64_t t0 = test_clock_ns();
    p->rc[0] = zev_fiber_wait_fd(p->pipe[0], ZEV_READ, 5000); /* nothing: 0 */
    p->waited_ns = test_clock_ns() - t0;
    p->rc[1] = zev_fiber_wait_fd(p->pipe[0], ZEV_READ, FOREVER);  /* the timer writes */
    p->rc[2] = zev_fiber_wait_fd(p->pipe[1], ZEV_WRITE, FOREVER); /* room: at once */
    p->rc[3] = zev_fiber_wait_fd(p->pipe[0], ZEV_READ | ZEV_WRITE, 0);
    CALL(p->bad_events, zev_fiber_wait_fd(p->pipe[0], 0, 0));
    CALL(p->ebadf_fd, zev_fiber_wait_fd(-1, ZEV_READ, 0));
    int watched = p->pipe[1] + 100; /* closed number: EBADF too */
    outcome_t closed_fd;
    CALL(closed_fd, zev_fiber_wait_fd(watched, ZEV_READ, 10));
    p->revents[0][0] = (short)closed_fd.err;
    CALL(p->eexist, zev_fiber_wait_fd(p->pipe[1], ZEV_WRITE | ZEV_READ, 1000));
    p->done = 1;
}

static void io_noop(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    (void)fd;
    (void)events;
    (void)arg;
}

Test(fiber, wait_fd)
{
    zev_loop_t *loop = test_loop_new();
    pl_t st = {.loop = loop};
    test_pipe(st.pipe);
    /* the write end is watched by an io watcher: the fiber gets EEXIST
     * when it has to register it (it is not ready for reading) */
    zev_io_t *io = zev_io_start(loop, st.pipe[1], 0, io_noop, NULL);
    cr_assert_not_null(io);
    spawn_detached(loop, fd_waiter, &st);
    cr_assert_not_null(zev_timer_start(loop, 15000, 0, write_pipe_timer, &st));
    test_run_until(loop, &st.done, 5000);
    cr_expect_eq(st.rc[0], 0, "timeout: %d", st.rc[0]);
    cr_expect_geq(st.waited_ns, 5000000u);
    cr_expect_eq(st.rc[1], ZEV_READ);
    cr_expect_eq(st.rc[2], ZEV_WRITE);
    cr_expect_eq(st.rc[3], ZEV_READ, "a read end is never writable");
    expect_fail(st.bad_events, EINVAL, "wait_fd with no events");
    expect_fail(st.ebadf_fd, EBADF, "wait_fd(-1)");
    cr_expect_eq(st.revents[0][0], EBADF, "wait_fd on a closed number: errno %d", st.revents[0][0]);
    cr_expect_eq(st.eexist.rc, ZEV_WRITE, "ready at once needs no registration");
    zev_io_stop(io);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    close(st.pipe[0]);
    close(st.pipe[1]);
}

static void wait_watched(void *arg)
{
    pl_t *p = arg;
    CALL(p->eexist, zev_fiber_wait_fd(p->pipe[0], ZEV_READ, 1000));
    p->done = 1;
}

Test(fiber, wait_fd_on_a_watched_fd_is_eexist)
{
    zev_loop_t *loop = test_loop_new();
    pl_t st = {.loop = loop};
    test_pipe(st.pipe);
    zev_io_t *io = zev_io_start(loop, st.pipe[0], 0, io_noop, NULL);
    cr_assert_not_null(io);
    spawn_detached(loop, wait_watched, &st);
    test_run_until(loop, &st.done, 5000);
    expect_fail(st.eexist, EEXIST, "wait_fd on an fd an io watcher has");
    zev_io_stop(io);
    cr_assert_eq(zev_loop_destroy(loop), 0);
    close(st.pipe[0]);
    close(st.pipe[1]);
}

/* --------------------------------------------------------------- fairness */

/* A fiber whose recv never has to wait (10,000 messages queued) yields
 * after each batch: a timer due meanwhile runs long before it is done. */
typedef struct hog {
    zev_stream_t *s;
    int got;
    int got_at_timer;
    int done;
} hog_t;

static void hog_fiber(void *arg)
{
    hog_t *h = arg;
    zev_msg_t *m;
    while (zev_fiber_recv(h->s, &m, 0) == 0)
        h->got++;
    h->done = 1;
}

static void hog_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    hog_t *h = arg;
    h->got_at_timer = h->got;
}

Test(fiber, a_receiving_fiber_cannot_hold_the_loop)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL);
    test_set_int(p.a, ZMQ_RCVHWM, 0);
    test_set_int(p.b, ZMQ_SNDHWM, 0);
    test_bind_connect(p.a, p.b, "inproc");
    for (int i = 0; i < 10000; i++)
        raw_send_str(p.b, "m", 0);
    hog_t h = {.s = test_stream_new(p.loop, p.a), .got_at_timer = -1};
    spawn_detached(p.loop, hog_fiber, &h);
    test_spin(p.loop, 1, 0); /* the fiber ran its first batch */
    cr_assert_not_null(zev_timer_start(p.loop, 0, 0, hog_timer, &h));
    test_run_until(p.loop, &h.done, 10000);
    cr_assert_eq(h.got, 10000);
    cr_assert_geq(h.got_at_timer, 1);
    cr_assert_leq(h.got_at_timer, 3 * 64, "the timer waited for %d receives", h.got_at_timer);
    test_pair_close(&p);
}

/* A firehose stream with on_recv and a yielding fiber share the loop: the
 * fiber resumes in every iteration and the stream is served in each. */
typedef struct share {
    size_t msgs;
    int yields;
    atomic_int stop;
    void *push;
} share_t;

static void count_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    ((share_t *)arg)->msgs++;
}

static void share_yielder(void *arg)
{
    share_t *sh = arg;
    while (zev_fiber_yield() == 0)
        sh->yields++;
}

static void *firehose(void *arg)
{
    share_t *sh = arg;
    while (!atomic_load(&sh->stop))
        zmq_send(sh->push, "f", 1, ZMQ_DONTWAIT);
    return NULL;
}

Test(fiber, a_firehose_and_a_yielding_fiber_share_the_loop)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    share_t sh = {.push = p.b};
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_recv(s, count_recv, &sh), 0);
    spawn_detached(p.loop, share_yielder, &sh);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, firehose, &sh), 0);
    test_sleep_ms(20); /* the pipe fills */
    for (int i = 1; i <= 200; i++) {
        size_t before = sh.msgs;
        zev_loop_run_once(p.loop, 100);
        cr_assert_leq(sh.msgs - before, 64, "the stream took more than its batch");
        cr_assert_eq(sh.yields, i - 1, "iteration %d: %d yields", i, sh.yields);
    }
    atomic_store(&sh.stop, 1);
    pthread_join(th, NULL);
    cr_assert_gt(sh.msgs, 200, "the stream starved: %zu messages", sh.msgs);
    test_pair_close(&p);
}

/* ------------------------------------------------------- the edge rule */

/* Two fibers ping-pong over a DEALER pair with no timeouts. */
typedef struct pp {
    zev_loop_t *loop;
    zev_stream_t *a, *b;
    int rounds;
    int a_done, b_done;
    int errors;
} pp_t;

static void pp_ping(void *arg)
{
    pp_t *p = arg;
    for (int i = 0; i < p->rounds; i++) {
        zev_msg_t *m;
        if (zev_fiber_send(p->a, &i, sizeof i, 0, FOREVER) < 0 ||
            zev_fiber_recv(p->a, &m, FOREVER) < 0 || zev_msg_size(m, 0) != sizeof i ||
            memcmp(zev_msg_data(m, 0), &i, sizeof i)) {
            p->errors++;
            break;
        }
    }
    p->a_done = 1;
    zev_loop_stop(p->loop);
}

static void pp_pong(void *arg)
{
    pp_t *p = arg;
    for (int i = 0; i < p->rounds; i++) {
        zev_msg_t *m;
        if (zev_fiber_recv(p->b, &m, FOREVER) < 0) {
            p->errors++;
            break;
        }
        int v;
        memcpy(&v, zev_msg_data(m, 0), sizeof v);
        if (zev_fiber_send(p->b, &v, sizeof v, 0, FOREVER) < 0) {
            p->errors++;
            break;
        }
    }
    p->b_done = 1;
}

static void pingpong(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_DEALER, ZMQ_DEALER, transport);
    pp_t pp = {.loop = p.loop,
               .a = test_stream_new(p.loop, p.a),
               .b = test_stream_new(p.loop, p.b),
               .rounds = 3000};
    spawn_detached(p.loop, pp_pong, &pp);
    spawn_detached(p.loop, pp_ping, &pp);
    run_watched(p.loop, 20000);
    cr_assert_eq(pp.errors, 0);
    cr_assert_eq(pp.a_done + pp.b_done, 2);
    test_pair_close(&p);
}

Test(fiber, pingpong_without_timeouts_inproc)
{
    pingpong("inproc");
}
Test(fiber, pingpong_without_timeouts_ipc)
{
    pingpong("ipc");
}
Test(fiber, pingpong_without_timeouts_tcp)
{
    pingpong("tcp");
}

/* One DEALER stream, two fibers: one waits to receive while the other
 * sends. Each send can swallow the ZMQ_FD edge of an echo that just came;
 * the receiver must get every echo anyway, with no timeout. The peer is a
 * raw ROUTER echo thread. */
typedef struct share_sock {
    zev_loop_t *loop;
    zev_stream_t *s;
    int n;
    int sent, got;
    int errors;
    int receiver_done;
    void *router;
    atomic_int stop;
    int echo_lost; /* echoes the ROUTER could not send */
} share_sock_t;

/* ROUTER_MANDATORY: a plain ROUTER drops what it cannot queue at once, and
 * libzmq's view of the peer's pipe lags its reads by up to half the HWM,
 * so a plain echo loses messages now and then; this one waits instead. */
static void *echo_thread(void *arg)
{
    share_sock_t *ss = arg;
    test_set_int(ss->router, ZMQ_RCVTIMEO, 50);
    test_set_int(ss->router, ZMQ_SNDTIMEO, 2000);
    test_set_int(ss->router, ZMQ_ROUTER_MANDATORY, 1);
    while (!atomic_load(&ss->stop)) {
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        zmq_msg_init(&body);
        if (zmq_msg_recv(&id, ss->router, 0) < 0) {
            zmq_msg_close(&id);
            zmq_msg_close(&body);
            continue;
        }
        zmq_msg_recv(&body, ss->router, 0);
        if (zmq_msg_send(&id, ss->router, ZMQ_SNDMORE) < 0 ||
            zmq_msg_send(&body, ss->router, 0) < 0)
            ss->echo_lost++;
        zmq_msg_close(&id);
        zmq_msg_close(&body);
    }
    return NULL;
}

static void shared_sender(void *arg)
{
    share_sock_t *ss = arg;
    for (int i = 0; i < ss->n; i++) {
        if (zev_fiber_send(ss->s, &i, sizeof i, 0, FOREVER) < 0) {
            ss->errors++;
            break;
        }
        ss->sent++;
        if (i % 7 == 0)
            zev_fiber_yield();
    }
}

static void shared_receiver(void *arg)
{
    share_sock_t *ss = arg;
    for (int i = 0; i < ss->n; i++) {
        zev_msg_t *m;
        if (zev_fiber_recv(ss->s, &m, FOREVER) < 0) {
            ss->errors++;
            break;
        }
        int v;
        memcpy(&v, zev_msg_data(m, 0), sizeof v);
        if (v != i)
            ss->errors++;
        ss->got++;
    }
    ss->receiver_done = 1;
    zev_loop_stop(ss->loop);
}

static void shared_socket(const char *transport)
{
    test_pair_t p = test_pair_open(ZMQ_ROUTER, ZMQ_DEALER, transport);
    share_sock_t ss = {.loop = p.loop, .s = test_stream_new(p.loop, p.b), .n = 5000, .router = p.a};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, echo_thread, &ss), 0);
    spawn_detached(p.loop, shared_receiver, &ss);
    spawn_detached(p.loop, shared_sender, &ss);
    test_watchdog_t w;
    test_watchdog_start(&w, p.loop, 20000);
    zev_loop_run(p.loop);
    int hung = test_watchdog_stop(&w);
    atomic_store(&ss.stop, 1);
    pthread_join(th, NULL);
    cr_assert_eq(hung, 0, "hung after %d sent, %d received", ss.sent, ss.got);
    cr_assert_eq(ss.echo_lost, 0);
    cr_assert_eq(ss.errors, 0);
    cr_assert_eq(ss.got, ss.n);
    test_pair_close(&p);
}

Test(fiber, a_sender_fiber_never_swallows_a_receiver_fibers_edge_inproc)
{
    shared_socket("inproc");
}
Test(fiber, a_sender_fiber_never_swallows_a_receiver_fibers_edge_tcp)
{
    shared_socket("tcp");
}

/* The same with the sends made by a callback (a timer) on the stream a
 * fiber receives from, and a poller fiber waiting on it beside. */
typedef struct mixed {
    zev_loop_t *loop;
    zev_stream_t *s;
    int n, sent, got, errors, polls;
    int done;
    zev_timer_t *tick;
} mixed_t;

static void mixed_tick(zev_timer_t *t, void *arg)
{
    mixed_t *mx = arg;
    for (int k = 0; k < 3 && mx->sent < mx->n; k++, mx->sent++)
        if (zev_stream_send(mx->s, &mx->sent, sizeof mx->sent, 0) < 0)
            mx->errors++;
    if (mx->sent == mx->n)
        zev_timer_cancel(t);
}

static void mixed_receiver(void *arg)
{
    mixed_t *mx = arg;
    while (mx->got < mx->n) {
        zev_msg_t *m;
        if (zev_fiber_recv(mx->s, &m, FOREVER) < 0) {
            mx->errors++;
            break;
        }
        mx->got++;
    }
    mx->done = 1;
    zev_loop_stop(mx->loop);
}

static void mixed_poller(void *arg)
{
    mixed_t *mx = arg;
    zev_fiber_pollitem_t it = {.stream = mx->s, .events = ZEV_READ};
    while (!mx->done) {
        int rc = zev_fiber_poll(&it, 1, FOREVER);
        if (rc < 0)
            break;
        mx->polls++;
        zev_fiber_yield();
    }
}

Test(fiber, callback_sends_and_a_poller_beside_a_receiving_fiber)
{
    test_pair_t p = test_pair_open(ZMQ_ROUTER, ZMQ_DEALER, "inproc");
    share_sock_t echo = {.router = p.a};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, echo_thread, &echo), 0);
    mixed_t mx = {.loop = p.loop, .s = test_stream_new(p.loop, p.b), .n = 3000};
    spawn_detached(p.loop, mixed_receiver, &mx);
    spawn_detached(p.loop, mixed_poller, &mx);
    cr_assert_not_null(zev_timer_start(p.loop, 0, 20, mixed_tick, &mx));
    test_watchdog_t w;
    test_watchdog_start(&w, p.loop, 20000);
    zev_loop_run(p.loop);
    int hung = test_watchdog_stop(&w);
    atomic_store(&echo.stop, 1);
    pthread_join(th, NULL);
    cr_assert_eq(hung, 0, "hung after %d sent, %d received", mx.sent, mx.got);
    cr_assert_eq(echo.echo_lost, 0);
    cr_assert_eq(mx.errors, 0);
    cr_assert_eq(mx.got, mx.n);
    test_pair_close(&p);
}

/* A fiber's receive can swallow the edge that a sender fiber on the same
 * socket waits for: the peer made room (activate_write is in the socket's
 * mailbox, ZMQ_FD is readable), then the receive processes that command
 * before the loop waits. The stream must look again by itself. */
typedef struct swallow {
    zev_loop_t *loop;
    zev_stream_t *s;
    int filled, sender_waiting, go, recv_done, sent_last;
    outcome_t recv0, last;
} swallow_t;

static void swallow_sender(void *arg)
{
    swallow_t *w = arg;
    while (zev_fiber_send(w->s, "f", 1, 0, 0) == 0)
        w->filled++;
    w->sender_waiting = 1;
    CALL(w->last, zev_fiber_send(w->s, "last", 4, 0, FOREVER));
    w->sent_last = 1;
    zev_loop_stop(w->loop);
}

static void swallow_receiver(void *arg)
{
    swallow_t *w = arg;
    zev_msg_t *m;
    while (!w->go)
        zev_fiber_yield();
    CALL(w->recv0, zev_fiber_recv(w->s, &m, 0)); /* nothing to get; takes the edge */
    w->recv_done = 1;
}

Test(fiber, a_receive_that_takes_a_senders_edge_does_not_strand_it)
{
    test_pair_t p = test_pair_open(ZMQ_DEALER, ZMQ_DEALER, NULL);
    test_set_int(p.a, ZMQ_SNDHWM, 2);
    test_set_int(p.b, ZMQ_RCVHWM, 2);
    test_bind_connect(p.a, p.b, "inproc");
    swallow_t w = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, swallow_sender, &w);
    spawn_detached(p.loop, swallow_receiver, &w);
    for (int i = 0; i < 10 && !w.sender_waiting; i++)
        zev_loop_run_once(p.loop, 0);
    cr_assert_eq(w.sender_waiting, 1);
    test_spin(p.loop, 3, 0); /* its stream has looked at POLLOUT and waits for the edge */
    char buf[8];
    for (int i = 0; i < w.filled; i++)
        cr_assert_geq(zmq_recv(p.b, buf, sizeof buf, ZMQ_DONTWAIT), 0, "message %d", i);
    w.go = 1; /* the receiver runs before the loop next waits */
    run_watched(p.loop, 5000);
    expect_fail(w.recv0, EAGAIN, "recv with nothing there");
    expect_ok(w.last, "the sender's wait for room");
    cr_assert_eq(w.sent_last, 1);
    test_pair_close(&p);
}

/* Receivers with short timeouts racing the messages: a fiber that timed out
 * just as it was handed the stream gives its turn back; nothing is lost. */
typedef struct racer {
    zev_loop_t *loop;
    zev_stream_t *s;
    int n, got, timeouts, errors;
    int done;
} racer_t;

static void racing_receiver(void *arg)
{
    racer_t *r = arg;
    while (r->got < r->n) {
        zev_msg_t *m;
        if (zev_fiber_recv(r->s, &m, 50) == 0)
            r->got++;
        else if (errno == EAGAIN)
            r->timeouts++;
        else {
            r->errors++;
            break;
        }
    }
    if (!r->done++)
        zev_loop_stop(r->loop);
}

typedef struct pacer {
    void *push;
    int n;
} pacer_t;

static void *paced_sender(void *arg)
{
    pacer_t *pc = arg;
    for (int i = 0; i < pc->n; i++) {
        zmq_send(pc->push, "r", 1, 0);
        if (i % 16 == 0) {
            struct timespec ts = {0, (long)(i % 5) * 20000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

Test(fiber, receivers_timing_out_as_messages_come_lose_nothing)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "tcp");
    racer_t r = {.loop = p.loop, .s = test_stream_new(p.loop, p.a), .n = 4000};
    for (int i = 0; i < 3; i++)
        spawn_detached(p.loop, racing_receiver, &r);
    pacer_t pc = {.push = p.b, .n = r.n};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, paced_sender, &pc), 0);
    run_watched(p.loop, 20000);
    pthread_join(th, NULL);
    cr_assert_eq(r.errors, 0);
    cr_assert_eq(r.got, r.n, "got %d of %d (%d timeouts)", r.got, r.n, r.timeouts);
    test_pair_close(&p);
}

/* The fiber a stream was handed to is cancelled before it runs: the next
 * waiter gets the message. The canceller is another stream's on_recv, in
 * the same pass, after or before the handing (both must work). */
typedef struct handed {
    zev_stream_t *s, *x;
    zev_fiber_t *first;
    outcome_t first_o, second_o;
    char second_got[16];
    int done;
} handed_t;

static void handed_first(void *arg)
{
    handed_t *h = arg;
    zev_msg_t *m;
    CALL(h->first_o, zev_fiber_recv(h->s, &m, FOREVER));
}

static void handed_second(void *arg)
{
    handed_t *h = arg;
    zev_msg_t *m;
    CALL(h->second_o, zev_fiber_recv(h->s, &m, FOREVER));
    if (h->second_o.rc == 0)
        part_str(m, 0, h->second_got, sizeof h->second_got);
    h->done = 1;
}

static void cancel_first(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    handed_t *h = arg;
    zev_fiber_cancel(h->first);
}

Test(fiber, a_cancelled_handed_fiber_passes_the_message_on)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    void *xpull = test_socket(p.ctx, ZMQ_PULL), *xpush = test_socket(p.ctx, ZMQ_PUSH);
    test_bind_connect(xpull, xpush, "inproc");
    handed_t h = {.s = test_stream_new(p.loop, p.a)};
    h.x = test_stream_new(p.loop, xpull);
    cr_assert_eq(zev_stream_on_recv(h.x, cancel_first, &h), 0);
    h.first = spawn(p.loop, handed_first, &h);
    spawn_detached(p.loop, handed_second, &h);
    test_spin(p.loop, 3, 0);
    raw_send_str(p.b, "msg", 0);
    raw_send_str(xpush, "cancel", 0);
    test_run_until(p.loop, &h.done, 5000);
    expect_fail(h.first_o, ECANCELED, "the first waiter");
    expect_ok(h.second_o, "the second waiter");
    cr_assert_str_eq(h.second_got, "msg");
    cr_assert_eq(zev_fiber_detach(h.first), 0);
    cr_assert_eq(zev_loop_destroy(p.loop), 0);
    p.loop = NULL;
    test_close(xpull);
    test_close(xpush);
    test_pair_close(&p);
}

/* Random interleavings: fibers doing recv, poll, send and yield at random
 * on one DEALER stream against an echo; every message sent comes back once,
 * with no timeout anywhere. */
typedef struct chaos {
    zev_loop_t *loop;
    zev_stream_t *s;
    uint64_t rng;
    int to_send, sent, got, errors, live;
    int receivers; /* fibers inside a recv without timeout */
} chaos_t;

static uint64_t chaos_next(chaos_t *c)
{
    c->rng ^= c->rng >> 12;
    c->rng ^= c->rng << 25;
    c->rng ^= c->rng >> 27;
    return c->rng * 2685821657736338717u;
}

static void chaos_fiber(void *arg)
{
    chaos_t *c = arg;
    while (c->got < c->to_send) {
        uint64_t r = chaos_next(c) % 10;
        zev_msg_t *m;
        if (r < 3 && c->sent < c->to_send) {
            int v = c->sent++;
            if (zev_fiber_send(c->s, &v, sizeof v, 0, FOREVER) < 0)
                c->errors++;
        } else if (r < 5) {
            zev_fiber_pollitem_t it = {.stream = c->s, .events = ZEV_READ | ZEV_WRITE};
            if (zev_fiber_poll(&it, 1, (int64_t)(chaos_next(c) % 3) * 100) < 0)
                c->errors++;
        } else if (r < 6) {
            zev_fiber_yield();
        } else if (r < 8 && c->got + c->receivers < c->sent) {
            /* receives only while more echoes are due than fibers wait
             * for, so no fiber waits for an echo another one took */
            bool forever = chaos_next(c) & 1;
            c->receivers++;
            int rc = zev_fiber_recv(c->s, &m, forever ? FOREVER : 0);
            c->receivers--;
            if (rc == 0)
                c->got++;
            else if (errno != EAGAIN || forever)
                c->errors++;
        } else {
            zev_fiber_sleep(chaos_next(c) % 200);
        }
        if (c->errors)
            break;
    }
    if (--c->live == 0)
        zev_loop_stop(c->loop);
}

Test(fiber, random_interleavings_on_one_socket_lose_nothing)
{
    test_pair_t p = test_pair_open(ZMQ_ROUTER, ZMQ_DEALER, "inproc");
    share_sock_t echo = {.router = p.a};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, echo_thread, &echo), 0);
    chaos_t c = {.loop = p.loop,
                 .s = test_stream_new(p.loop, p.b),
                 .rng = 0x9e3779b97f4a7c15u,
                 .to_send = 4000,
                 .live = 6};
    for (int i = 0; i < c.live; i++)
        spawn_detached(p.loop, chaos_fiber, &c);
    test_watchdog_t w;
    test_watchdog_start(&w, p.loop, 30000);
    zev_loop_run(p.loop);
    int hung = test_watchdog_stop(&w);
    atomic_store(&echo.stop, 1);
    pthread_join(th, NULL);
    cr_assert_eq(hung, 0, "hung: sent %d, got %d", c.sent, c.got);
    cr_assert_eq(echo.echo_lost, 0);
    cr_assert_eq(c.errors, 0);
    cr_assert_eq(c.got, c.to_send);
    test_pair_close(&p);
}

/* ----------------------------------------------------------- teardown */

/* zev_loop_destroy with fibers blocked in every kind of call: each call
 * fails ECANCELED, each function returns, nothing leaks. */
typedef struct blocked {
    zev_loop_t *loop;
    zev_stream_t *in, *out;
    int pipe[2], pipe2[2]; /* one fd has one waiter */
    zev_fiber_t *joined;
    int errs[16];
    int returned;
} blocked_t;

typedef struct blocked_fiber {
    blocked_t *b;
    int kind;
} blocked_fiber_t;

enum { B_SLEEP, B_RECV, B_SEND, B_POLL, B_WAITFD, B_JOIN, B_YIELD, B_HOLD, B_UNSTARTED, B_N };

static void blocked_body(void *arg)
{
    blocked_fiber_t *bf = arg;
    blocked_t *b = bf->b;
    zev_msg_t *m;
    int rc = 0;
    switch (bf->kind) {
    case B_SLEEP:
        rc = zev_fiber_sleep(100000000);
        break;
    case B_RECV:
        while ((rc = zev_fiber_recv(b->in, &m, FOREVER)) == 0) /* gets the first */
            ;
        break;
    case B_SEND:
        while ((rc = zev_fiber_send(b->out, "x", 1, 0, FOREVER)) == 0) /* until full */
            ;
        break;
    case B_POLL: {
        zev_fiber_pollitem_t it[2] = {{.stream = b->in, .events = ZEV_READ},
                                      {.fd = b->pipe[0], .events = ZEV_READ}};
        rc = zev_fiber_poll(it, 2, FOREVER);
        break;
    }
    case B_WAITFD:
        rc = zev_fiber_wait_fd(b->pipe2[0], ZEV_READ, FOREVER);
        break;
    case B_JOIN:
        rc = zev_fiber_join(b->joined, FOREVER);
        break;
    case B_YIELD:
        while ((rc = zev_fiber_yield()) == 0)
            ;
        break;
    case B_HOLD:
        /* holds a received message (the second) while it sleeps */
        if ((rc = zev_fiber_recv(b->in, &m, FOREVER)) == 0)
            rc = zev_fiber_sleep(100000000);
        break;
    case B_UNSTARTED:
        rc = zev_fiber_sleep(0);
        break;
    }
    b->errs[bf->kind] = rc < 0 ? errno : -1;
    /* a fiber that goes on calling after ECANCELED gets it again */
    if (zev_fiber_yield() == 0 || errno != ECANCELED)
        b->errs[bf->kind] = -2;
    b->returned++;
}

Test(fiber, destroy_unwinds_fibers_blocked_in_every_call)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, NULL);
    test_set_int(p.b, ZMQ_SNDHWM, 2);
    test_set_int(p.a, ZMQ_RCVHWM, 2);
    test_bind_connect(p.a, p.b, "inproc");
    void *pull2 = test_socket(p.ctx, ZMQ_PULL), *push_raw = test_socket(p.ctx, ZMQ_PUSH);
    test_bind_connect(pull2, push_raw, "inproc");
    blocked_t b = {
        .loop = p.loop, .in = test_stream_new(p.loop, pull2), .out = test_stream_new(p.loop, p.b)};
    test_pipe(b.pipe);
    test_pipe(b.pipe2);
    blocked_fiber_t bf[B_N];
    for (int k = 0; k < B_N; k++)
        bf[k] = (blocked_fiber_t){&b, k};
    b.joined = spawn(p.loop, blocked_body, &bf[B_SLEEP]);
    for (int k = 1; k < B_N - 1; k++)
        spawn_detached(p.loop, blocked_body, &bf[k]);
    raw_send_str(push_raw, "first", 0); /* B_RECV's, which waits again behind B_HOLD */
    raw_send_str(push_raw, "held", 0);  /* B_HOLD's */
    test_spin(p.loop, 5, 0);
    spawn(p.loop, blocked_body, &bf[B_UNSTARTED]); /* never runs before destroy */
    cr_assert_eq(b.returned, 0, "a fiber returned before destroy: %d", b.returned);
    cr_assert_eq(zev_loop_destroy(p.loop), 0);
    p.loop = NULL;
    cr_assert_eq(b.returned, B_N);
    for (int k = 0; k < B_N; k++) {
        cr_expect_eq(b.errs[k], ECANCELED, "fiber %d ended with %d", k, b.errs[k]);
    }
    test_close(pull2);
    test_close(push_raw);
    close(b.pipe[0]);
    close(b.pipe[1]);
    close(b.pipe2[0]);
    close(b.pipe2[1]);
    test_pair_close(&p);
    test_expect_no_leaks();
}

static void spawn_after_destroy_cb(zev_stream_t *s, void *arg)
{
    (void)s;
    zev_loop_t *loop = arg;
    errno = 0;
    zev_fiber_t *f = zev_fiber_spawn(loop, noop_fiber, NULL, NULL);
    cr_expect_null(f, "spawn during destroy");
    cr_expect_eq(errno, EBUSY);
}

Test(fiber, spawn_while_the_loop_is_destroyed_is_ebusy)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_on_close(s, spawn_after_destroy_cb, p.loop), 0);
    test_pair_close(&p);
}

/* ------------------------------------------------------ trackers, embedding */

typedef struct zc {
    zev_loop_t *loop;
    zev_stream_t *s;
    zev_tracker_t *t;
    int on_done_in_fiber; /* 1 if the callback ran on a fiber's stack */
    int on_done_calls;
    int inside_call; /* the fiber is inside zev_tracker_on_done */
    int done;
} zc_t;

static char zc_buf[4096];

static void zc_done(zev_tracker_t *t, void *arg)
{
    (void)t;
    zc_t *z = arg;
    z->on_done_calls++;
    if (zev_fiber_self() || z->inside_call)
        z->on_done_in_fiber = 1;
}

static void zc_fiber(void *arg)
{
    zc_t *z = arg;
    if (zev_stream_send_zc(z->s, zc_buf, sizeof zc_buf, NULL, NULL, &z->t) < 0)
        return;
    while (!zev_tracker_done(z->t))
        zev_fiber_sleep(100);
    z->inside_call = 1;
    zev_tracker_on_done(z->t, zc_done, z);
    z->inside_call = 0;
    zev_fiber_yield();
    zev_fiber_yield();
    z->done = 1;
}

Test(fiber, a_trackers_on_done_never_runs_on_a_fiber_stack)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    zc_t z = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    spawn_detached(p.loop, zc_fiber, &z);
    char buf[4096];
    test_set_int(p.b, ZMQ_RCVTIMEO, 5000);
    for (int i = 0; i < 100 && !z.done; i++) {
        zmq_recv(p.b, buf, sizeof buf, ZMQ_DONTWAIT);
        zev_loop_run_once(p.loop, 10);
    }
    cr_assert_eq(z.done, 1);
    cr_assert_eq(z.on_done_calls, 1);
    cr_assert_eq(z.on_done_in_fiber, 0, "on_done ran inside the fiber's call");
    zev_tracker_release(z.t);
    test_pair_close(&p);
}

static void sleep_30ms(void *arg)
{
    zev_fiber_sleep(30000);
    (*(int *)arg)++;
}

Test(fiber, an_embedding_host_sees_fiber_work)
{
    zev_loop_t *loop = test_loop_new();
    int fd = zev_loop_fd(loop);
    if (fd < 0 && errno == ENOTSUP)
        cr_skip_test("no pollable fd for this backend");
    cr_assert_geq(fd, 0);
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(test_readable(fd, 0), 0, "idle loop's fd readable");
    int done = 0;
    spawn_detached(loop, sleep_30ms, &done);
    cr_assert_eq(zev_loop_timeout(loop), 0, "a runnable fiber is work");
    cr_assert_eq(test_readable(fd, 0), 1, "the host was not woken for a spawned fiber");
    cr_assert_eq(zev_loop_run_once(loop, 0), 0, "a sleeping fiber is no work");
    cr_assert_eq(test_readable(fd, 0), 0, "the fd stays readable while the fiber sleeps");
    int t = zev_loop_timeout(loop);
    cr_assert(t > 0 && t <= 30, "timeout %d for a fiber sleeping 30 ms", t);
    for (int i = 0; i < 100 && !done; i++)
        if (test_readable(fd, 100))
            zev_loop_run_once(loop, 0);
    cr_assert_eq(done, 1, "the sleeping fiber never woke through the loop's fd");
    cr_assert_eq(zev_loop_destroy(loop), 0);
}

/* ------------------------------------------------------------ the guard */

static volatile int dive_on = 1;

static __attribute__((noinline)) int dive(int depth)
{
    volatile char pad[256];
    pad[0] = (char)depth;
    int r = dive_on ? dive(depth + 1) : 0;
    pad[1] = (char)r;
    return r + pad[0];
}

static void overflowing_fiber(void *arg)
{
    (void)arg;
    dive(0);
}

static void child_overflows(void)
{
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop)
        _exit(3);
    zev_fiber_opts_t o = {.stack_size = 32 * 1024};
    if (!zev_fiber_spawn(loop, overflowing_fiber, NULL, &o))
        _exit(4);
    zev_loop_run_once(loop, 0);
    _exit(5); /* survived */
}

Test(fiber, a_stack_overflow_is_a_reported_death, .timeout = 60)
{
    static test_child_t r;
    test_run_child(child_overflows, &r);
    if (test_asan()) {
        cr_assert(strstr(r.err, "stack-overflow"), "no ASan report; stderr:\n%s", r.err);
    } else {
        cr_assert(test_died_of_segv(r.status), "status %#x; stderr:\n%s", r.status, r.err);
        cr_assert(strstr(r.err, "zev: fiber stack overflow"), "stderr:\n%s", r.err);
        cr_assert(strstr(r.err, "32768 bytes"), "stderr:\n%s", r.err);
    }
}
