/*
 * The loop core (issue #2): creation and backend choice, run / run_once /
 * stop semantics, re-entrancy guards, the cached clock, zev_loop_timeout,
 * embedding through zev_loop_fd, and busy-poll. Every test runs on the
 * backend ctest names in ZEV_TEST_BACKEND.
 */
#include "common.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

TestSuite(loop, .timeout = 20);

/* ------------------------------------------------------------------ helpers */

static void write_byte(int fd)
{
    char c = 'x';
    cr_assert_eq(write(fd, &c, 1), 1, "write: %s", strerror(errno));
}

static void count_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    (*(volatile int *)arg)++;
}

static void count_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    (*(volatile int *)arg)++;
}

/* Reads everything the pipe has (it is non-blocking in the tests that use it
 * through this; otherwise one read) and counts the callback. */
typedef struct pipe_ctx {
    int calls;
    int events;
    int fd_seen;
    size_t bytes;
} pipe_ctx_t;

static void drain_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    pipe_ctx_t *c = arg;
    char buf[256];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0)
        c->bytes += (size_t)n;
    c->calls++;
    c->events = events;
    c->fd_seen = fd;
}

/* --------------------------------------------------------- new / backends */

Test(loop, new_destroy)
{
    zev_loop_t *loop = test_loop_new();
    cr_assert_str_eq(zev_loop_backend(loop), test_backend());
    zev_loop_destroy(loop);

    /* NULL opts: a loop on $ZEV_BACKEND (ctest sets it to the backend under
     * test) or the best available one. */
    loop = zev_loop_new(NULL);
    cr_assert_not_null(loop, "zev_loop_new(NULL): %s", zmq_strerror(errno));
    cr_assert_not_null(zev_loop_backend(loop));
    zev_loop_destroy(loop);

    /* Several loops side by side are independent. */
    zev_loop_t *a = test_loop_new(), *b = test_loop_new();
    cr_assert_neq(a, b);
    int na = 0, nb = 0;
    cr_assert_eq(zev_loop_add_callback(a, count_cb, &na), 0);
    cr_assert_geq(zev_loop_run_once(b, 0), 0);
    cr_assert_eq(na, 0, "a callback queued on loop a ran on loop b");
    cr_assert_geq(zev_loop_run_once(a, 0), 0);
    cr_assert_eq(na, 1);
    cr_assert_eq(nb, 0);
    zev_loop_destroy(a);
    zev_loop_destroy(b);
}

Test(loop, backend_name_is_the_one_asked)
{
    zev_loop_opts_t opts = {.backend = test_backend()};
    zev_loop_t *loop = zev_loop_new(&opts);
    cr_assert_not_null(loop, "zev_loop_new(%s): %s", opts.backend, zmq_strerror(errno));
    cr_assert_str_eq(zev_loop_backend(loop), test_backend());
    zev_loop_destroy(loop);

    /* poll is compiled everywhere; asking for it gives it, whatever the
     * default is. */
    opts.backend = "poll";
    loop = zev_loop_new(&opts);
    cr_assert_not_null(loop, "zev_loop_new(poll): %s", zmq_strerror(errno));
    cr_assert_str_eq(zev_loop_backend(loop), "poll");
    zev_loop_destroy(loop);
}

Test(loop, unknown_backend_is_enotsup)
{
    static const char *const bad[] = {"no-such-backend", "EPOLL", "epoll ", "select", "io_uring2"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        zev_loop_opts_t opts = {.backend = bad[i]};
        errno = 0;
        zev_loop_t *loop = zev_loop_new(&opts);
        cr_assert_null(loop, "backend '%s' must not fall back to another one", bad[i]);
        cr_assert_eq(errno, ENOTSUP, "backend '%s': errno %d (%s)", bad[i], errno, strerror(errno));
    }
}

/* Restores $ZEV_BACKEND on scope exit of the tests that change it. */
static char *saved_env;
static void save_env(void)
{
    const char *v = getenv("ZEV_BACKEND");
    saved_env = v ? strdup(v) : NULL;
}
static void restore_env(void)
{
    if (saved_env) {
        setenv("ZEV_BACKEND", saved_env, 1);
        free(saved_env);
        saved_env = NULL;
    } else {
        unsetenv("ZEV_BACKEND");
    }
}

Test(loop, env_backend_honoured, .init = save_env, .fini = restore_env)
{
    static const char *const names[] = {"epoll", "poll", "kqueue"};
    int tried = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        /* Only backends compiled in: the explicit option tells. */
        zev_loop_opts_t opts = {.backend = names[i]};
        zev_loop_t *probe = zev_loop_new(&opts);
        if (!probe)
            continue;
        zev_loop_destroy(probe);

        cr_assert_eq(setenv("ZEV_BACKEND", names[i], 1), 0);
        zev_loop_t *loop = zev_loop_new(NULL);
        cr_assert_not_null(loop, "ZEV_BACKEND=%s: %s", names[i], zmq_strerror(errno));
        cr_assert_str_eq(zev_loop_backend(loop), names[i], "ZEV_BACKEND=%s ignored", names[i]);
        zev_loop_destroy(loop);

        /* opts with backend NULL but other fields set still read the env. */
        zev_loop_opts_t nob = {.backend = NULL, .batch = 8};
        loop = zev_loop_new(&nob);
        cr_assert_not_null(loop);
        cr_assert_str_eq(zev_loop_backend(loop), names[i]);
        zev_loop_destroy(loop);
        tried++;
    }
    cr_assert_geq(tried, 2, "at least poll and the backend under test exist");

    /* The test backend through the env, as ctest runs it. */
    cr_assert_eq(setenv("ZEV_BACKEND", test_backend(), 1), 0);
    zev_loop_t *loop = zev_loop_new(NULL);
    cr_assert_not_null(loop);
    cr_assert_str_eq(zev_loop_backend(loop), test_backend());
    zev_loop_destroy(loop);

    /* An unknown name in the env fails the same way, no silent fallback. */
    cr_assert_eq(setenv("ZEV_BACKEND", "no-such-backend", 1), 0);
    errno = 0;
    cr_assert_null(zev_loop_new(NULL));
    cr_assert_eq(errno, ENOTSUP, "errno %d (%s)", errno, strerror(errno));

    /* An explicit opts->backend wins over the env. */
    zev_loop_opts_t opts = {.backend = test_backend()};
    loop = zev_loop_new(&opts);
    cr_assert_not_null(loop, "opts->backend must override ZEV_BACKEND: %s", zmq_strerror(errno));
    cr_assert_str_eq(zev_loop_backend(loop), test_backend());
    zev_loop_destroy(loop);
}

/* ------------------------------------------------------------ run and stop */

typedef struct stopper {
    zev_loop_t *loop;
    int fired;
    int stop_at; /* calls zev_loop_stop on this call (1-based); 0 = never */
} stopper_t;

static void stopper_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    stopper_t *s = arg;
    if (++s->fired == s->stop_at)
        zev_loop_stop(s->loop);
}

static void stopper_cb(zev_loop_t *loop, void *arg)
{
    stopper_t *s = arg;
    cr_assert_eq(loop, s->loop);
    if (++s->fired == s->stop_at)
        zev_loop_stop(loop);
}

static void stopper_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    (void)events;
    stopper_t *s = arg;
    char buf[64];
    (void)!read(fd, buf, sizeof buf);
    if (++s->fired == s->stop_at)
        zev_loop_stop(s->loop);
}

Test(loop, stop_before_run_returns_at_once)
{
    zev_loop_t *loop = test_loop_new();
    zev_loop_stop(loop);
    /* Would block forever (test timeout) if the request were lost. */
    cr_assert_eq(zev_loop_run(loop), 0);

    /* The request was consumed: the next run blocks until stopped again. */
    stopper_t s = {loop, 0, 1};
    cr_assert_not_null(zev_timer_start(loop, 20000, 0, stopper_timer, &s));
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(s.fired, 1, "the second run returned before its stop");

    /* Twice in a row is one request, not two. */
    zev_loop_stop(loop);
    zev_loop_stop(loop);
    cr_assert_eq(zev_loop_run(loop), 0);
    stopper_t s2 = {loop, 0, 1};
    cr_assert_not_null(zev_timer_start(loop, 20000, 0, stopper_timer, &s2));
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(s2.fired, 1);
    zev_loop_destroy(loop);
}

/* A stop request is consumed by whichever run call ends next, as libuv
 * does: a stop seen by run_once must not leave a stale flag that makes the
 * next run_once(-1) spin without blocking, or the next zev_loop_run return
 * at once. */
Test(loop, stop_is_consumed_by_run_once)
{
    zev_loop_t *loop = test_loop_new();
    zev_loop_stop(loop);
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);

    int fired = 0;
    uint64_t t0 = test_clock_ns(); /* before the start, which reads the clock itself */
    cr_assert_not_null(zev_timer_start(loop, 30000, 0, count_timer, &fired));
    int calls = 0;
    while (!fired && calls < 1000000) {
        cr_assert_geq(zev_loop_run_once(loop, -1), 0);
        calls++;
    }
    cr_assert_eq(fired, 1);
    cr_assert_geq(test_clock_ns() - t0, 30000000u, "the timer ran early");
    cr_assert_eq(calls, 1, "run_once(-1) took %d calls to wait for one timer", calls);

    stopper_t st = {loop, 0, 1};
    cr_assert_not_null(zev_timer_start(loop, 20000, 0, stopper_timer, &st));
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(st.fired, 1, "zev_loop_run returned on a stale stop request");
    zev_loop_destroy(loop);
}

/* run_once(-1) is one full turn, as libuv's UV_RUN_ONCE: when it blocks
 * for a timer, it runs that timer before it returns. */
Test(loop, run_once_blocking_runs_the_timer_it_waited_for)
{
    zev_loop_t *loop = test_loop_new();
    for (int i = 0; i < 5; i++) {
        int fired = 0;
        cr_assert_not_null(zev_timer_start(loop, 20000, 0, count_timer, &fired));
        cr_assert_geq(zev_loop_run_once(loop, -1), 0);
        cr_assert_eq(fired, 1, "round %d: run_once(-1) returned without running its timer", i);
    }
    /* A bounded wait that ends at the timer runs it too. */
    int fired = 0;
    cr_assert_not_null(zev_timer_start(loop, 20000, 0, count_timer, &fired));
    cr_assert_geq(zev_loop_run_once(loop, 5000), 0);
    cr_assert_eq(fired, 1);
    zev_loop_destroy(loop);
}

/* A forked child that destroys its copy of the loop must not take the
 * parent's registrations with it (an epoll or kqueue instance, and poll's
 * embedding set, are shared with the child). */
Test(loop, forked_child_destroy_leaves_parent_alone)
{
    zev_loop_t *loop = test_loop_new();
    int fd = zev_loop_fd(loop); /* the embedding set too */
    cr_assert_geq(fd, 0);
    int p[2];
    test_pipe(p);
    pipe_ctx_t pc = {0};
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, drain_io, &pc);
    cr_assert_not_null(io);
    int fired = 0;
    cr_assert_not_null(zev_timer_start(loop, 100000, 0, count_timer, &fired));

    pid_t pid = fork();
    cr_assert_geq(pid, 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        zev_loop_destroy(loop);
        _exit(0);
    }
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    write_byte(p[1]);
    cr_assert(test_readable(fd, 2000), "the embedding fd lost its registrations");
    for (uint64_t end = test_ms() + 2000; pc.calls == 0 && test_ms() < end;)
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
    cr_assert_eq(pc.calls, 1, "the parent's io watcher never fired after the child's destroy");
    test_run_until(loop, &fired, 2000);
    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

static void ignore_msg(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    (void)m;
    (void)arg;
}

/* ... nor touch the parent's sockets: a stream in the middle of a long
 * message (review of e28fa60: the child's destroy drained the rest of it,
 * 19,937 receives on the parent's socket, whose mailbox fd the child
 * shares). The child finds the message where the parent left it. */
Test(loop, forked_child_destroy_leaves_a_cut_message_alone)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    for (uint32_t i = 0; i < 200; i++)
        cr_assert_eq(zmq_send(p.b, &i, sizeof i, i + 1 < 200 ? ZMQ_SNDMORE : 0), (int)sizeof i);
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    cr_assert_eq(zev_stream_set_batch(s, 1), 0); /* a pass takes 64 parts */
    cr_assert_eq(zev_stream_on_recv(s, ignore_msg, NULL), 0);
    zev_loop_run_once(p.loop, 0);
    zev_stream_stats_t st;
    cr_assert_eq(zev_stream_stats(s, &st), 0);
    cr_assert_eq(st.msgs_in, 0, "the message came whole in one pass: nothing tested");

    pid_t pid = fork();
    cr_assert_geq(pid, 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        zev_loop_destroy(p.loop);
        uint32_t v = UINT32_MAX;
        int rc = -1;
        for (int tries = 0; rc < 0 && tries < 100; tries++)
            rc = zmq_recv(p.a, &v, sizeof v, ZMQ_DONTWAIT);
        _exit(rc == (int)sizeof v && v == 64 ? 0 : rc < 0 ? 2 : 1);
    }
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status), "status %#x", status);
    cr_assert_eq(WEXITSTATUS(status), 0,
                 "the child's destroy %s the parent's socket (exit %d)",
                 WEXITSTATUS(status) == 1 ? "read from" : "broke", WEXITSTATUS(status));
    test_pair_close(&p);
}

/* Callbacks that zev_stream_flush runs for host code count as inside the
 * loop: destroy and run from there are refused (review finding 3: destroy
 * freed the stream under its own pass, run nested an iteration over the
 * borrowed message). */
typedef struct reentry {
    zev_loop_t *loop;
    int destroy_rc, destroy_errno, run_rc, run_errno;
    size_t parts_before, parts_after;
    int calls;
} reentry_t;

static void reenter_recv(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    (void)s;
    reentry_t *r = arg;
    r->calls++;
    r->parts_before = zev_msg_parts(m);
    errno = 0;
    r->destroy_rc = zev_loop_destroy(r->loop);
    r->destroy_errno = errno;
    errno = 0;
    r->run_rc = zev_loop_run_once(r->loop, 0);
    r->run_errno = errno;
    r->parts_after = zev_msg_parts(m);
}

Test(loop, callbacks_run_by_a_host_flush_are_inside_the_loop)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.a);
    reentry_t r = {.loop = p.loop};
    cr_assert_eq(zev_stream_on_recv(s, reenter_recv, &r), 0);
    cr_assert_eq(zmq_send(p.b, "m", 1, 0), 1);
    test_sleep_ms(5);
    cr_assert_eq(zev_stream_flush(s, ZEV_READ, 1), 1);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.destroy_rc, -1, "zev_loop_destroy inside a flushed on_recv was not refused");
    cr_assert_eq(r.destroy_errno, EBUSY);
    cr_assert_eq(r.run_rc, -1, "zev_loop_run_once inside a flushed on_recv was not refused");
    cr_assert_eq(r.run_errno, EBUSY);
    cr_assert_eq(r.parts_after, r.parts_before, "the borrowed message changed");
    test_pair_close(&p);
}

/* on_send is a callback too: run_once(-1) that delivered statuses returns
 * without blocking (review finding 6). */
static void noted_send(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    (void)seq;
    (void)status;
    (*(int *)arg)++;
}

Test(loop, run_once_returns_after_running_on_send)
{
    test_pair_t p = test_pair_open(ZMQ_PULL, ZMQ_PUSH, "inproc");
    zev_stream_t *s = test_stream_new(p.loop, p.b);
    int sent = 0;
    cr_assert_eq(zev_stream_on_send(s, noted_send, &sent), 0);
    test_spin(p.loop, 3, 0);
    test_watchdog_t w;
    test_watchdog_start(&w, p.loop, 2000);
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(zev_stream_send(s, "x", 1, 0), 0);
        uint64_t t0 = test_ms();
        cr_assert_geq(zev_loop_run_once(p.loop, -1), 0);
        cr_assert_eq(sent, i + 1, "round %d: on_send did not run", i);
        cr_assert_lt(test_ms() - t0, 1000, "round %d: run_once blocked after running on_send", i);
    }
    cr_assert_eq(test_watchdog_stop(&w), 0);
    test_pair_close(&p);
}

/* run_once returns 1 while a timer is due, as zev_loop_timeout == 0 says
 * (review finding 9): a host draining with `while (run_once(loop, 0) > 0)`
 * must not stop with a timer due, here one started with delay 0 from a
 * callback (it runs in the next iteration, not this one). */
static void start_now_timer(zev_loop_t *loop, void *arg)
{
    cr_assert_not_null(zev_timer_start(loop, 0, 0, count_timer, arg));
}

Test(loop, run_once_says_a_due_timer_is_work)
{
    zev_loop_t *loop = test_loop_new();
    int fired = 0;
    cr_assert_eq(zev_loop_add_callback(loop, start_now_timer, &fired), 0);
    cr_assert_eq(zev_loop_run_once(loop, 0), 1, "a timer is due: there is work");
    cr_assert_eq(zev_loop_timeout(loop), 0);
    cr_assert_eq(fired, 0);
    while (zev_loop_run_once(loop, 0) > 0)
        ;
    cr_assert_eq(fired, 1);
    cr_assert_eq(zev_loop_timeout(loop), -1);
    zev_loop_destroy(loop);
}

/* The wait's timeout counts from when the wait starts: a timer is not late
 * by the time earlier callbacks of the same iteration took (review
 * finding 7: 5 ms of callback made the next timer 5 ms late). */
static void busy_100ms(zev_timer_t *t, void *arg)
{
    (void)t;
    (void)arg;
    for (uint64_t end = test_clock_ns() + 100000000u; test_clock_ns() < end;)
        ;
}

typedef struct late {
    zev_loop_t *loop;
    uint64_t at;
} late_t;

static void stamp_and_stop(zev_timer_t *t, void *arg)
{
    (void)t;
    late_t *l = arg;
    l->at = test_clock_ns();
    zev_loop_stop(l->loop);
}

Test(loop, timer_not_late_by_earlier_callbacks)
{
    zev_loop_t *loop = test_loop_new();
    late_t l = {.loop = loop};
    /* 100 ms of callback: the bug made the timer 100 ms late; the bound
     * leaves 50 ms to a loaded machine's scheduling */
    cr_assert_not_null(zev_timer_start(loop, 1000, 0, busy_100ms, NULL));
    zev_timer_t *t = zev_timer_start(loop, 130000, 0, stamp_and_stop, &l);
    cr_assert_not_null(t);
    uint64_t due = zev_timer_due(t);
    test_watchdog_t w;
    test_watchdog_start(&w, loop, 5000);
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(test_watchdog_stop(&w), 0);
    cr_assert_geq(l.at, due);
    cr_assert_lt(l.at - due, 50000000u, "the timer ran %llu us late (100 ms of callback before)",
                 (unsigned long long)((l.at - due) / 1000));
    zev_loop_destroy(loop);
}

typedef struct blocker {
    zev_loop_t *loop;
    atomic_int running;  /* main is about to call / is in zev_loop_run */
    atomic_int returned; /* zev_loop_run has returned */
    int still_running;   /* what the stopping thread saw after waiting */
} blocker_t;

static void *stop_later(void *arg)
{
    blocker_t *b = arg;
    while (!atomic_load(&b->running))
        test_sleep_ms(1);
    test_sleep_ms(200);
    b->still_running = !atomic_load(&b->returned);
    zev_loop_stop(b->loop);
    return NULL;
}

Test(loop, run_with_nothing_blocks_until_stopped_from_thread)
{
    zev_loop_t *loop = test_loop_new();
    blocker_t b = {.loop = loop};
    atomic_init(&b.running, 0);
    atomic_init(&b.returned, 0);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, stop_later, &b), 0);
    atomic_store(&b.running, 1);
    int rc = zev_loop_run(loop);
    atomic_store(&b.returned, 1);
    cr_assert_eq(pthread_join(th, NULL), 0);
    cr_assert_eq(rc, 0, "run: %s", zmq_strerror(errno));
    cr_assert(b.still_running, "zev_loop_run returned with nothing registered and no stop");
    zev_loop_destroy(loop);
}

Test(loop, stop_from_inside_callbacks)
{
    zev_loop_t *loop = test_loop_new();

    /* From a repeating timer, on its third call: run returns after that
     * iteration, the timer does not fire a fourth time meanwhile. */
    stopper_t st = {loop, 0, 3};
    zev_timer_t *t = zev_timer_start(loop, 1000, 1000, stopper_timer, &st);
    cr_assert_not_null(t);
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(st.fired, 3);
    cr_assert_eq(zev_timer_cancel(t), 0);

    /* From a queued callback. */
    stopper_t sc = {loop, 0, 1};
    cr_assert_eq(zev_loop_add_callback(loop, stopper_cb, &sc), 0);
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(sc.fired, 1);

    /* From an io callback. */
    int p[2];
    test_pipe(p);
    stopper_t si = {loop, 0, 1};
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, stopper_io, &si);
    cr_assert_not_null(io);
    write_byte(p[1]);
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(si.fired, 1);
    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);

    /* Each stop was consumed by the run it ended: the loop runs on. */
    stopper_t again = {loop, 0, 2};
    t = zev_timer_start(loop, 1000, 1000, stopper_timer, &again);
    cr_assert_not_null(t);
    cr_assert_eq(zev_loop_run(loop), 0);
    cr_assert_eq(again.fired, 2);
    cr_assert_eq(zev_timer_cancel(t), 0);
    zev_loop_destroy(loop);
}

static void requeue_cb(zev_loop_t *loop, void *arg)
{
    (*(int *)arg)++;
    cr_assert_eq(zev_loop_add_callback(loop, count_cb, arg), 0);
}

Test(loop, run_once_zero_returns_promptly)
{
    zev_loop_t *loop = test_loop_new();

    /* Idle, and with a far timer and a quiet fd: never waits. The bound is
     * a watchdog (a blocking wait would take the full 10 s timer), not a
     * speed measurement. */
    int far = 0;
    zev_timer_t *t = zev_timer_start(loop, 10u * 1000u * 1000u, 0, count_timer, &far);
    cr_assert_not_null(t);
    int p[2];
    test_pipe(p);
    pipe_ctx_t pc = {0};
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, drain_io, &pc);
    cr_assert_not_null(io);
    uint64_t start = test_ms();
    for (int i = 0; i < 100; i++)
        cr_assert_eq(zev_loop_run_once(loop, 0), 0, "nothing is pending");
    cr_assert_lt(test_ms() - start, 5000, "run_once(loop, 0) waited");
    cr_assert_eq(far, 0);
    cr_assert_eq(pc.calls, 0);

    /* Work present: it is done in that one call. */
    int n = 0;
    cr_assert_eq(zev_loop_add_callback(loop, count_cb, &n), 0);
    write_byte(p[1]);
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(pc.calls, 1);
    cr_assert_eq(pc.bytes, 1);

    /* A callback that queues another: run_once says work is pending (1). */
    int m = 0;
    cr_assert_eq(zev_loop_add_callback(loop, requeue_cb, &m), 0);
    cr_assert_eq(zev_loop_run_once(loop, 0), 1);
    cr_assert_eq(m, 1);
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(m, 2);

    cr_assert_eq(zev_io_stop(io), 0);
    cr_assert_eq(zev_timer_cancel(t), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

/* ------------------------------------------------- re-entrancy guards */

typedef struct nested {
    zev_loop_t *loop;
    int calls;
    int run_rc, run_errno;
    int once_rc, once_errno;
    int block_rc, block_errno;
    int destroy_errno;
    void (*act)(struct nested *n); /* try_nested or try_destroy */
} nested_t;

static void try_nested(nested_t *n)
{
    n->calls++;
    errno = 0;
    n->run_rc = zev_loop_run(n->loop);
    n->run_errno = errno;
    errno = 0;
    n->once_rc = zev_loop_run_once(n->loop, 0);
    n->once_errno = errno;
    errno = 0;
    n->block_rc = zev_loop_run_once(n->loop, -1);
    n->block_errno = errno;
}

static void try_destroy(nested_t *n)
{
    n->calls++;
    errno = 0;
    zev_loop_destroy(n->loop);
    n->destroy_errno = errno;
}

/* The adapters: each runs its nested_t's act (try_nested or try_destroy). */
static void act_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    nested_t *n = arg;
    n->act(n);
}
static void act_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    nested_t *n = arg;
    n->act(n);
}
static void act_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)events;
    char c;
    (void)!read(fd, &c, 1);
    nested_t *n = arg;
    n->act(n);
    zev_io_stop(io);
}

/* Runs each nested_t's act once from inside a timer (t), a queued callback
 * (c) and an io watcher on p[0] (i); returns when all three have run. */
static void act_in_each_kind(zev_loop_t *loop, int p[2], nested_t *t, nested_t *c, nested_t *i)
{
    cr_assert_not_null(zev_timer_start(loop, 0, 0, act_timer, t));
    cr_assert_eq(zev_loop_add_callback(loop, act_cb, c), 0);
    cr_assert_not_null(zev_io_start(loop, p[0], ZEV_READ, act_io, i));
    write_byte(p[1]);
    volatile int done = 0;
    uint64_t end = test_ms() + 5000;
    while (!done) {
        cr_assert_lt(test_ms(), end, "watchdog");
        cr_assert_geq(zev_loop_run_once(loop, 10), 0);
        done = t->calls && c->calls && i->calls;
    }
}

static void check_nested(const nested_t *n, const char *where)
{
    cr_assert_eq(n->calls, 1, "%s: callback did not run once", where);
    cr_assert_eq(n->run_rc, -1, "%s: nested zev_loop_run", where);
    cr_assert_eq(n->run_errno, EBUSY, "%s: run errno %d", where, n->run_errno);
    cr_assert_eq(n->once_rc, -1, "%s: nested zev_loop_run_once(0)", where);
    cr_assert_eq(n->once_errno, EBUSY, "%s: run_once errno %d", where, n->once_errno);
    cr_assert_eq(n->block_rc, -1, "%s: nested zev_loop_run_once(-1)", where);
    cr_assert_eq(n->block_errno, EBUSY, "%s: run_once(-1) errno %d", where, n->block_errno);
}

Test(loop, nested_run_from_callback_is_ebusy)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);

    nested_t nt = {.loop = loop, .act = try_nested}, nc = {.loop = loop, .act = try_nested},
             ni = {.loop = loop, .act = try_nested};
    act_in_each_kind(loop, p, &nt, &nc, &ni);
    check_nested(&nt, "timer");
    check_nested(&nc, "callback");
    check_nested(&ni, "io");

    /* Also inside zev_loop_run (not only run_once). */
    nested_t nr = {.loop = loop, .act = try_nested};
    stopper_t s = {loop, 0, 1};
    cr_assert_eq(zev_loop_add_callback(loop, act_cb, &nr), 0);
    cr_assert_eq(zev_loop_add_callback(loop, stopper_cb, &s), 0);
    cr_assert_eq(zev_loop_run(loop), 0);
    check_nested(&nr, "callback under zev_loop_run");

    /* The refused calls left the loop working. */
    int n = 0;
    cr_assert_not_null(zev_timer_start(loop, 1000, 0, count_timer, &n));
    test_run_until(loop, &n, 5000);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

Test(loop, destroy_inside_callback_refused)
{
    zev_loop_t *loop = test_loop_new();
    int p[2];
    test_pipe(p);

    nested_t dt = {.loop = loop, .act = try_destroy}, dc = {.loop = loop, .act = try_destroy},
             di = {.loop = loop, .act = try_destroy};
    act_in_each_kind(loop, p, &dt, &dc, &di);
    cr_assert_eq(dt.destroy_errno, EBUSY, "timer: errno %d", dt.destroy_errno);
    cr_assert_eq(dc.destroy_errno, EBUSY, "callback: errno %d", dc.destroy_errno);
    cr_assert_eq(di.destroy_errno, EBUSY, "io: errno %d", di.destroy_errno);

    /* The loop is intact: timers, callbacks and io all still work (under
     * ASan a partial destroy would show up here as use-after-free). */
    int tn = 0, cn = 0;
    pipe_ctx_t pc = {0};
    cr_assert_not_null(zev_timer_start(loop, 1000, 0, count_timer, &tn));
    cr_assert_eq(zev_loop_add_callback(loop, count_cb, &cn), 0);
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, drain_io, &pc);
    cr_assert_not_null(io, "fd still registered after the refused destroy: %s",
                       zmq_strerror(errno));
    write_byte(p[1]);
    test_run_until(loop, &tn, 5000);
    test_run_until(loop, &cn, 5000);
    test_run_until(loop, &pc.calls, 5000);
    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

/* ---------------------------------------------------------- cached time */

typedef struct now_probe {
    zev_loop_t *loop;
    uint64_t seen;
    int calls;
} now_probe_t;

static void now_cb(zev_loop_t *loop, void *arg)
{
    now_probe_t *p = arg;
    p->seen = zev_now_ns(loop);
    p->calls++;
}

Test(loop, now_ns_monotonic_and_updated_each_iteration)
{
    uint64_t before_new = test_clock_ns();
    zev_loop_t *loop = test_loop_new();
    uint64_t prev = zev_now_ns(loop);
    cr_assert_geq(prev, before_new, "now_ns must be CLOCK_MONOTONIC, set at creation");
    cr_assert_leq(prev, test_clock_ns());

    for (int i = 0; i < 20; i++) {
        test_sleep_ms(1); /* the clock moves on between iterations */
        uint64_t before = test_clock_ns();
        cr_assert_geq(zev_loop_run_once(loop, 0), 0);
        uint64_t after = test_clock_ns();
        uint64_t now = zev_now_ns(loop);
        cr_assert_gt(now, prev, "iteration %d: now_ns did not advance", i);
        cr_assert_geq(now, before, "iteration %d: stale cached time", i);
        cr_assert_leq(now, after, "iteration %d: cached time from the future", i);
        prev = now;
    }

    /* Inside a callback it is the iteration's time: between the call
     * bracketing run_once, and stable for the whole callback phase. */
    now_probe_t a = {loop, 0, 0}, b = {loop, 0, 0};
    cr_assert_eq(zev_loop_add_callback(loop, now_cb, &a), 0);
    cr_assert_eq(zev_loop_add_callback(loop, now_cb, &b), 0);
    uint64_t before = test_clock_ns();
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    uint64_t after = test_clock_ns();
    cr_assert_eq(a.calls, 1);
    cr_assert_eq(b.calls, 1);
    cr_assert_geq(a.seen, before);
    cr_assert_leq(a.seen, after);
    cr_assert_eq(a.seen, b.seen, "cached time changed within one callback phase");
    cr_assert_eq(zev_now_ns(NULL), 0);
    zev_loop_destroy(loop);
}

/* ---------------------------------------------------------- loop timeout */

Test(loop, loop_timeout)
{
    zev_loop_t *loop = test_loop_new();
    cr_assert_eq(zev_loop_timeout(loop), -1, "idle loop: nothing scheduled");

    /* A quiet fd schedules nothing. */
    int p[2];
    test_pipe(p);
    pipe_ctx_t pc = {0};
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, drain_io, &pc);
    cr_assert_not_null(io);
    cr_assert_eq(zev_loop_timeout(loop), -1);

    /* A queued callback: run now. */
    int n = 0;
    cr_assert_eq(zev_loop_add_callback(loop, count_cb, &n), 0);
    cr_assert_eq(zev_loop_timeout(loop), 0);
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(zev_loop_timeout(loop), -1, "callback ran: idle again");

    /* A 10 s timer: about 10000 ms, never more, rounded so that waiting that
     * long does not wake early. */
    int fired = 0;
    zev_timer_t *t = zev_timer_start(loop, 10u * 1000u * 1000u, 0, count_timer, &fired);
    cr_assert_not_null(t);
    int ms = zev_loop_timeout(loop);
    cr_assert_leq(ms, 10000, "timeout %d ms for a 10 s timer", ms);
    cr_assert_gt(ms, 9000, "timeout %d ms for a 10 s timer", ms);

    /* The nearest timer counts. */
    zev_timer_t *near = zev_timer_start(loop, 2u * 1000u * 1000u, 0, count_timer, &fired);
    cr_assert_not_null(near);
    ms = zev_loop_timeout(loop);
    cr_assert_leq(ms, 2000, "timeout %d ms with a 2 s timer", ms);
    cr_assert_gt(ms, 1000, "timeout %d ms with a 2 s timer", ms);

    /* Pending work beats the timer. */
    cr_assert_eq(zev_loop_add_callback(loop, count_cb, &n), 0);
    cr_assert_eq(zev_loop_timeout(loop), 0);
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(n, 2);
    cr_assert_gt(zev_loop_timeout(loop), 0);

    /* A due timer: 0. */
    int due = 0;
    cr_assert_not_null(zev_timer_start(loop, 0, 0, count_timer, &due));
    cr_assert_eq(zev_loop_timeout(loop), 0, "a due timer means run now");
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(due, 1);

    /* Cancelling the timers: idle again. */
    cr_assert_eq(zev_timer_cancel(near), 0);
    ms = zev_loop_timeout(loop);
    cr_assert_gt(ms, 2000, "cancelled timer still counted: %d ms", ms);
    cr_assert_eq(zev_timer_cancel(t), 0);
    cr_assert_eq(zev_loop_timeout(loop), -1);
    cr_assert_eq(fired, 0);

    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

/* -------------------------------------------------------------- embedding */

typedef struct later {
    zev_loop_t *loop;
    int delay_ms;
    int *count;
    int fd; /* for later_write */
} later_t;

static void *later_add_callback(void *arg)
{
    later_t *l = arg;
    test_sleep_ms(l->delay_ms);
    cr_assert_eq(zev_loop_add_callback(l->loop, count_cb, l->count), 0);
    return NULL;
}

static void *later_write(void *arg)
{
    later_t *l = arg;
    test_sleep_ms(l->delay_ms);
    char c = 'w';
    cr_assert_eq(write(l->fd, &c, 1), 1);
    return NULL;
}

Test(loop, embed_fd_not_readable_when_idle)
{
    zev_loop_t *loop = test_loop_new();
    int fd = zev_loop_fd(loop);
    cr_assert_geq(fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    cr_assert_eq(zev_loop_fd(loop), fd, "the same fd every time");
    cr_assert_eq(test_readable(fd, 0), 0, "fresh loop: nothing to do");

    /* A quiet pipe and a far timer are no work. */
    int p[2];
    test_pipe(p);
    pipe_ctx_t pc = {0};
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, drain_io, &pc);
    cr_assert_not_null(io);
    int fired = 0;
    zev_timer_t *t = zev_timer_start(loop, 10u * 1000u * 1000u, 0, count_timer, &fired);
    cr_assert_not_null(t);
    cr_assert_eq(test_readable(fd, 0), 0);
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(test_readable(fd, 0), 0, "idle after an empty iteration");
    cr_assert_eq(test_readable(fd, 50), 0, "became readable with nothing to do");

    cr_assert_eq(zev_timer_cancel(t), 0);
    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

Test(loop, embed_fd_readable_after_cross_thread_callback)
{
    zev_loop_t *loop = test_loop_new();
    int fd = zev_loop_fd(loop);
    cr_assert_geq(fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    cr_assert_eq(test_readable(fd, 0), 0);

    /* The host blocks on the fd; another thread queues a callback. */
    int count = 0;
    later_t l = {.loop = loop, .delay_ms = 50, .count = &count};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, later_add_callback, &l), 0);
    int ready = test_readable(fd, 10000);
    cr_assert_eq(pthread_join(th, NULL), 0);
    cr_assert(ready, "zev_loop_fd did not become readable after add_callback");
    cr_assert_eq(count, 0, "only run_once runs it");
    cr_assert_eq(zev_loop_timeout(loop), 0);

    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(count, 1);
    cr_assert_eq(test_readable(fd, 0), 0, "still readable after run_once handled everything");

    /* From the loop's own thread, between iterations, too. */
    cr_assert_eq(zev_loop_add_callback(loop, count_cb, &count), 0);
    cr_assert(test_readable(fd, 5000));
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(count, 2);
    cr_assert_eq(test_readable(fd, 0), 0);
    zev_loop_destroy(loop);
}

static void start_timer_cb(zev_loop_t *loop, void *arg)
{
    /* 200 ms: long enough that "not readable yet" right after the
     * iteration cannot flake on a loaded machine. */
    cr_assert_not_null(zev_timer_start(loop, 200000, 0, count_timer, arg));
}

Test(loop, embed_fd_readable_when_timer_due)
{
    zev_loop_t *loop = test_loop_new();

    /* Timer started before the fd was asked for. */
    int early = 0;
    cr_assert_not_null(zev_timer_start(loop, 50000, 0, count_timer, &early));
    int fd = zev_loop_fd(loop);
    cr_assert_geq(fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    cr_assert(test_readable(fd, 5000), "not readable when a timer started before became due");
    cr_assert_eq(early, 0);
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(early, 1);
    cr_assert_eq(test_readable(fd, 0), 0, "readable after the due timer ran");

    /* Timer started from inside a callback run by run_once. */
    int inside = 0;
    cr_assert_eq(zev_loop_add_callback(loop, start_timer_cb, &inside), 0);
    cr_assert(test_readable(fd, 5000));
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(inside, 0);
    cr_assert_eq(test_readable(fd, 0), 0, "readable before the new timer is due");
    cr_assert(test_readable(fd, 5000),
              "not readable when a timer started in a callback became due");
    cr_assert_eq(inside, 0);
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(inside, 1);
    cr_assert_eq(test_readable(fd, 0), 0);

    /* Timer started by host code after the fd was taken, between
     * iterations: the host just blocks on the fd, longer than the delay. A
     * far timer stays behind so the loop is not idle either. */
    int far = 0, later = 0;
    zev_timer_t *ft = zev_timer_start(loop, 10u * 1000u * 1000u, 0, count_timer, &far);
    cr_assert_not_null(ft);
    cr_assert_not_null(zev_timer_start(loop, 50000, 0, count_timer, &later));
    cr_assert(test_readable(fd, 5000),
              "zev_loop_fd not readable when a timer started outside the loop became due");
    cr_assert_eq(later, 0);
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(later, 1);
    cr_assert_eq(far, 0);
    cr_assert_eq(test_readable(fd, 0), 0, "readable again with only a far timer left");
    cr_assert_eq(zev_timer_cancel(ft), 0);
    zev_loop_destroy(loop);
}

/* A timer cancelled by host code before it was due must not wake the host
 * later: with nothing left the loop is idle, and the fd must say so. */
Test(loop, embed_fd_cancelled_timer_does_not_wake)
{
    zev_loop_t *loop = test_loop_new();
    int fired = 0;
    zev_timer_t *t = zev_timer_start(loop, 50000, 0, count_timer, &fired);
    cr_assert_not_null(t);
    int fd = zev_loop_fd(loop); /* arms whatever signals the due timer */
    cr_assert_geq(fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(zev_timer_cancel(t), 0);
    cr_assert_eq(zev_loop_timeout(loop), -1);
    cr_assert_eq(test_readable(fd, 300), 0,
                 "zev_loop_fd became readable for a cancelled timer while the loop is idle");
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(fired, 0);
    zev_loop_destroy(loop);
}

static void stop_only_cb(zev_loop_t *loop, void *arg)
{
    (*(int *)arg)++;
    zev_loop_stop(loop);
}

/* A host drives zev only through zev_loop_fd + run_once, and some callback
 * calls zev_loop_stop (e.g. library code written for zev_loop_run). Once
 * that iteration is over the loop has nothing to do: the fd must not stay
 * readable, zev_loop_timeout must not say 0 and run_once must not report
 * pending work forever, or the host spins at full CPU on an idle loop. One
 * extra iteration to settle is allowed. */
Test(loop, embed_stop_from_callback_leaves_loop_idle)
{
    zev_loop_t *loop = test_loop_new();
    int fd = zev_loop_fd(loop);
    cr_assert_geq(fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    int n = 0;
    cr_assert_eq(zev_loop_add_callback(loop, stop_only_cb, &n), 0);
    cr_assert(test_readable(fd, 5000));
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(n, 1);
    cr_assert_geq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(zev_loop_timeout(loop), -1,
                 "idle loop reports work after a zev_loop_stop (timeout %d)",
                 zev_loop_timeout(loop));
    cr_assert_eq(test_readable(fd, 0), 0,
                 "zev_loop_fd stays readable after a zev_loop_stop: the host would spin");
    cr_assert_eq(zev_loop_run_once(loop, 0), 0, "run_once keeps reporting pending work");
    cr_assert_eq(n, 1);
    zev_loop_destroy(loop);
}

Test(loop, embed_fd_readable_when_pipe_readable)
{
    zev_loop_t *loop = test_loop_new();
    int fd = zev_loop_fd(loop);
    cr_assert_geq(fd, 0, "zev_loop_fd: %s", zmq_strerror(errno));
    int p[2];
    test_pipe(p);
    pipe_ctx_t pc = {0};
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, drain_io, &pc);
    cr_assert_not_null(io);
    cr_assert_eq(test_readable(fd, 0), 0);

    /* Written by another thread while the host blocks. */
    later_t l = {.loop = loop, .delay_ms = 50, .fd = p[1]};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, later_write, &l), 0);
    int ready = test_readable(fd, 10000);
    cr_assert_eq(pthread_join(th, NULL), 0);
    cr_assert(ready, "zev_loop_fd not readable with a readable watched pipe");
    cr_assert_eq(pc.calls, 0);
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(pc.calls, 1);
    cr_assert_eq(pc.events, ZEV_READ);
    cr_assert_eq(pc.bytes, 1);
    cr_assert_eq(test_readable(fd, 0), 0, "readable after the pipe was drained");

    /* Watcher added after the fd was taken, data already there. */
    int q[2];
    test_pipe(q);
    write_byte(q[1]);
    pipe_ctx_t qc = {0};
    zev_io_t *qio = zev_io_start(loop, q[0], ZEV_READ, drain_io, &qc);
    cr_assert_not_null(qio);
    cr_assert(test_readable(fd, 5000), "not readable with a ready watcher added later");
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(qc.calls, 1);
    cr_assert_eq(test_readable(fd, 0), 0);

    cr_assert_eq(zev_io_stop(qio), 0);
    cr_assert_eq(zev_io_stop(io), 0);
    close(p[0]);
    close(p[1]);
    close(q[0]);
    close(q[1]);
    zev_loop_destroy(loop);
}

/* -------------------------------------------------------------- busy-poll */

enum { SPIN_CALLBACKS = 200, SPIN_BYTES = 50, SPIN_TICKS = 20 };

typedef struct spin_ctx {
    zev_loop_t *loop;
    int callbacks; /* cross-thread callbacks run */
    int order_errors;
    int bytes;
    int ticks;   /* repeating timer */
    int oneshot; /* one-shot timer fired */
    uint64_t oneshot_deadline;
    uint64_t oneshot_at;
    int watchdog;
    int wfd;
    atomic_int go;
} spin_ctx_t;

static void spin_check_done(spin_ctx_t *c)
{
    if (c->callbacks == SPIN_CALLBACKS && c->bytes == SPIN_BYTES && c->ticks >= SPIN_TICKS &&
        c->oneshot)
        zev_loop_stop(c->loop);
}

static spin_ctx_t *spin_global;

static void spin_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    spin_ctx_t *c = spin_global;
    if ((intptr_t)arg != c->callbacks)
        c->order_errors++;
    c->callbacks++;
    spin_check_done(c);
}

static void spin_io(zev_io_t *io, int fd, int events, void *arg)
{
    (void)io;
    (void)events;
    spin_ctx_t *c = arg;
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0)
        c->bytes += (int)n;
    spin_check_done(c);
}

static void spin_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    spin_ctx_t *c = arg;
    c->ticks++;
    spin_check_done(c);
}

static void spin_oneshot(zev_timer_t *t, void *arg)
{
    (void)t;
    spin_ctx_t *c = arg;
    c->oneshot++;
    c->oneshot_at = test_clock_ns();
    spin_check_done(c);
}

static void spin_watchdog(zev_timer_t *t, void *arg)
{
    (void)t;
    spin_ctx_t *c = arg;
    c->watchdog = 1;
    zev_loop_stop(c->loop);
}

static void *spin_producer(void *arg)
{
    spin_ctx_t *c = arg;
    while (!atomic_load(&c->go))
        test_sleep_ms(1);
    for (int i = 0; i < SPIN_CALLBACKS; i++) {
        cr_assert_eq(zev_loop_add_callback(c->loop, spin_cb, (void *)(intptr_t)i), 0);
        if (i < SPIN_BYTES) {
            char b = 'b';
            cr_assert_eq(write(c->wfd, &b, 1), 1);
        }
        if (i % 10 == 0)
            test_sleep_ms(1);
    }
    return NULL;
}

Test(loop, busy_poll_delivers_everything)
{
    zev_loop_t *loop = test_loop_new_opts(0, 2000);
    spin_ctx_t c = {.loop = loop};
    atomic_init(&c.go, 0);
    spin_global = &c;
    int p[2];
    test_pipe(p);
    c.wfd = p[1];
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, spin_io, &c);
    cr_assert_not_null(io);
    zev_timer_t *tick = zev_timer_start(loop, 1000, 1000, spin_tick, &c);
    cr_assert_not_null(tick);
    uint64_t before = test_clock_ns();
    cr_assert_not_null(zev_timer_start(loop, 30000, 0, spin_oneshot, &c));
    c.oneshot_deadline = before + 30000000u;
    zev_timer_t *wd = zev_timer_start(loop, 10u * 1000u * 1000u, 0, spin_watchdog, &c);
    cr_assert_not_null(wd);

    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, spin_producer, &c), 0);
    atomic_store(&c.go, 1);
    int rc = zev_loop_run(loop);
    cr_assert_eq(pthread_join(th, NULL), 0);
    cr_assert_eq(rc, 0);
    cr_assert_not(c.watchdog, "watchdog: callbacks %d/%d bytes %d/%d ticks %d oneshot %d",
                  c.callbacks, SPIN_CALLBACKS, c.bytes, SPIN_BYTES, c.ticks, c.oneshot);
    cr_assert_eq(c.callbacks, SPIN_CALLBACKS);
    cr_assert_eq(c.order_errors, 0, "cross-thread callbacks out of order");
    cr_assert_eq(c.bytes, SPIN_BYTES);
    cr_assert_eq(c.oneshot, 1);
    cr_assert_geq(c.oneshot_at, c.oneshot_deadline, "one-shot fired before its deadline");

    /* run_once(loop, 0) never spins; a bounded wait spins at most its
     * timeout (a watchdog bound, far below the 5 s spin asked for below). */
    cr_assert_eq(zev_timer_cancel(tick), 0);
    cr_assert_eq(zev_timer_cancel(wd), 0);
    cr_assert_eq(zev_io_stop(io), 0);
    zev_loop_destroy(loop);

    loop = test_loop_new_opts(0, 5u * 1000u * 1000u);
    uint64_t start = test_ms();
    cr_assert_eq(zev_loop_run_once(loop, 0), 0);
    cr_assert_eq(zev_loop_run_once(loop, 20), 0);
    cr_assert_lt(test_ms() - start, 2500, "run_once spun past its timeout");
    /* A timer due during the spin fires at its deadline, not after it. */
    int fired = 0;
    cr_assert_not_null(zev_timer_start(loop, 10000, 0, count_timer, &fired));
    test_run_until(loop, &fired, 2500);
    /* A pipe written during the spin is seen. */
    int q[2];
    test_pipe(q);
    pipe_ctx_t qc = {0};
    zev_io_t *qio = zev_io_start(loop, q[0], ZEV_READ, drain_io, &qc);
    cr_assert_not_null(qio);
    write_byte(q[1]);
    cr_assert_eq(zev_loop_run_once(loop, -1), 0);
    cr_assert_eq(qc.calls, 1);
    cr_assert_eq(zev_io_stop(qio), 0);
    close(q[0]);
    close(q[1]);
    close(p[0]);
    close(p[1]);
    zev_loop_destroy(loop);
}

/*
 * Busy-poll of a loop whose only fd is one receiving stream: the spin reads
 * the socket's ZMQ_EVENTS instead of the backend. Requests come at mixed
 * gaps (back to back, inside the spin, past it so the loop blocks), replies
 * are sent from the callback, cross-thread callbacks and a repeating timer
 * run meanwhile, and for a stretch on_recv is switched off and on again (no
 * longer a candidate: the loop waits in the backend). Nothing may be lost,
 * reordered or left waiting.
 */
enum { LONE_REQUESTS = 3000, LONE_CALLBACKS = 300 };

struct lone;
static struct lone *spin_lone;

typedef struct lone {
    zev_loop_t *loop;
    zev_stream_t *s;
    char ep[256];
    void *ctx;
    int echoed, callbacks, cb_order, ticks, client_ok;
    atomic_int client_done;
} lone_t;

static void lone_echo(zev_stream_t *s, zev_msg_t *m, void *arg)
{
    lone_t *l = arg;
    cr_assert_eq(zev_stream_send(s, zev_msg_data(m, 0), zev_msg_size(m, 0), 0), 0);
    l->echoed++;
}

static void lone_cb(zev_loop_t *loop, void *arg)
{
    (void)loop;
    struct lone *l = spin_lone;
    if ((intptr_t)arg != l->callbacks)
        l->cb_order++;
    l->callbacks++;
}

static void lone_tick(zev_timer_t *t, void *arg)
{
    (void)t;
    lone_t *l = arg;
    l->ticks++;
    /* Between requests 1000 and 1500 receiving is switched off and on at
     * every tick; elsewhere the timer leaves the stream alone, so that it
     * cannot paper over a lost edge. */
    if (l->echoed >= 1000 && l->echoed < 1500)
        cr_assert_eq(zev_stream_on_recv(l->s, l->ticks % 2 ? NULL : lone_echo, l), 0);
}

static void *lone_client(void *arg)
{
    lone_t *l = arg;
    void *req = zmq_socket(l->ctx, ZMQ_REQ);
    int to = 10000, ok = 1;
    zmq_setsockopt(req, ZMQ_RCVTIMEO, &to, sizeof to);
    cr_assert_eq(zmq_connect(req, l->ep), 0);
    for (int i = 0; i < LONE_REQUESTS && ok; i++) {
        if (i % 10 == 0)
            cr_assert_eq(zev_loop_add_callback(l->loop, lone_cb, (void *)(intptr_t)(i / 10)), 0);
        if (i % 500 == 499)
            test_sleep_ms(5); /* past the 1 ms spin: the loop blocks */
        else if (i % 7 == 3) {
            struct timespec ts = {0, 200000}; /* inside the spin */
            nanosleep(&ts, NULL);
        }
        int v = i, back = -1;
        ok = zmq_send(req, &v, sizeof v, 0) == (int)sizeof v &&
             zmq_recv(req, &back, sizeof back, 0) == (int)sizeof back && back == i;
    }
    l->client_ok = ok;
    zmq_close(req);
    atomic_store(&l->client_done, 1);
    zev_loop_add_callback(l->loop, lone_cb, (void *)(intptr_t)-1); /* wakes the loop */
    return NULL;
}

static void lone_stream_run(const char *transport)
{
    /* spin 1 ms; the REQ client is a thread */
    test_pair_t p = test_pair_open_opts(ZMQ_REP, TEST_NO_SOCKET, NULL, 0, 1000);
    lone_t l = {.ctx = p.ctx, .loop = p.loop};
    atomic_init(&l.client_done, 0);
    spin_lone = &l;
    void *rep = p.a;
    test_bind_ep(rep, transport, l.ep, sizeof l.ep);
    l.s = test_stream_new(l.loop, rep);
    cr_assert_eq(zev_stream_on_recv(l.s, lone_echo, &l), 0);
    zev_timer_t *tick = zev_timer_start(l.loop, 2000, 2000, lone_tick, &l);
    cr_assert_not_null(tick);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, lone_client, &l), 0);
    uint64_t deadline = test_ms() + 60000;
    while (!atomic_load(&l.client_done) && test_ms() < deadline)
        cr_assert_geq(zev_loop_run_once(l.loop, 100), 0);
    cr_assert_eq(pthread_join(th, NULL), 0);
    test_spin(l.loop, 3, 1);
    cr_assert(l.client_ok, "a reply was lost or wrong (%d echoed)", l.echoed);
    cr_assert_eq(l.echoed, LONE_REQUESTS);
    cr_assert_eq(l.callbacks, LONE_CALLBACKS + 1);
    cr_assert_eq(l.cb_order, 1, "only the final wake-up callback is out of sequence");
    cr_assert_gt(l.ticks, 0);
    cr_assert_eq(zev_timer_cancel(tick), 0);
    cr_assert_eq(zev_stream_close(l.s, 0), 0);
    cr_assert_eq(test_pair_close(&p), 0);
}

Test(loop, busy_poll_lone_stream_inproc, .timeout = 90)
{
    lone_stream_run("inproc");
}

Test(loop, busy_poll_lone_stream_tcp, .timeout = 90)
{
    lone_stream_run("tcp");
}
