/*
 * ZEV_THREAD_CHECKS (debug builds; this program links a library built with
 * them on): a loop-thread function called from another thread while the
 * loop runs prints which function and aborts, in a child process here; the
 * same call while the loop does not run, and the thread-safe functions at
 * any time, are fine. Every test runs on the backend under test.
 */
#include "common.h"

#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

TestSuite(threadcheck, .timeout = 60);

typedef struct wrong {
    zev_loop_t *loop;
    zev_stream_t *s;
    int what;
} wrong_t;

static wrong_t w;

static void *call_from_another_thread(void *arg)
{
    (void)arg;
    test_sleep_ms(50); /* the loop is inside zev_loop_run by now */
    switch (w.what) {
    case 0:
        zev_stream_send(w.s, "x", 1, 0);
        break;
    case 1:
        zev_timer_start(w.loop, 1000, 0, (zev_timer_fn)(void (*)(void))abort, NULL);
        break;
    case 2:
        zev_stream_new(w.loop, zev_stream_socket(w.s));
        break;
    case 3:
        zev_loop_on_slow(w.loop, 1000, NULL, NULL);
        break;
    case 4: {
        zev_loop_stats_t st;
        zev_loop_stats(w.loop, &st);
        break;
    }
    case 5: {
        zev_stream_stats_t st;
        zev_stream_stats(w.s, &st);
        break;
    }
    case 6:
        zev_loop_timeout(w.loop);
        break;
    }
    return NULL;
}

static void child_calls_wrong_thread(void)
{
    void *ctx = zmq_ctx_new();
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    w.loop = zev_loop_new(NULL);
    w.s = zev_stream_new(w.loop, push);
    pthread_t th;
    pthread_create(&th, NULL, call_from_another_thread, NULL);
    zev_timer_start(w.loop, 2000000, 0, (zev_timer_fn)(void (*)(void))abort, NULL);
    zev_loop_run(w.loop); /* the other thread's call aborts the process */
    _exit(7);
}

static void expect_abort_naming(int what, const char *fn)
{
    static test_child_t r;
    w.what = what;
    test_run_child(child_calls_wrong_thread, &r);
    cr_assert(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGABRT, "status %#x; stderr:\n%s",
              r.status, r.err);
    char want[96];
    snprintf(want, sizeof want, "zev: %s() called from thread", fn);
    cr_assert(strstr(r.err, want), "stderr:\n%s", r.err);
    cr_assert(strstr(r.err, "ZEV_THREAD_CHECKS"), "stderr:\n%s", r.err);
}

Test(threadcheck, a_send_from_another_thread_aborts_with_its_name)
{
    expect_abort_naming(0, "zev_stream_send");
}

Test(threadcheck, a_timer_from_another_thread_aborts_with_its_name)
{
    expect_abort_naming(1, "zev_timer_start");
}

Test(threadcheck, a_stream_made_from_another_thread_aborts_with_its_name)
{
    expect_abort_naming(2, "zev_stream_new");
}

/* The statistics and the slow hook are loop-thread calls too (the hook's
 * function and argument are plain fields the loop reads). */
Test(threadcheck, the_slow_hook_from_another_thread_aborts_with_its_name)
{
    expect_abort_naming(3, "zev_loop_on_slow");
}

Test(threadcheck, loop_stats_from_another_thread_abort_with_their_name)
{
    expect_abort_naming(4, "zev_loop_stats");
}

Test(threadcheck, stream_stats_from_another_thread_abort_with_their_name)
{
    expect_abort_naming(5, "zev_stream_stats");
}

Test(threadcheck, the_timeout_from_another_thread_aborts_with_its_name)
{
    expect_abort_naming(6, "zev_loop_timeout");
}

/* No false alarm: the loop made on one thread and run on another, used
 * from a third while it does not run, and the thread-safe calls at any
 * time. */
typedef struct relay {
    zev_loop_t *loop;
    zev_stream_t *s;
    int sent;
} relay_t;

static void send_on_loop(zev_loop_t *loop, void *arg)
{
    (void)loop;
    relay_t *r = arg;
    cr_assert_eq(zev_stream_send(r->s, "y", 1, 0), 0);
    r->sent++;
    zev_loop_stop(loop);
}

static void *runner(void *arg)
{
    relay_t *r = arg;
    zev_loop_run(r->loop);
    return NULL;
}

Test(threadcheck, the_right_threads_pass)
{
    test_pair_t p = test_pair_open(ZMQ_PUSH, ZMQ_PULL, "inproc");
    relay_t r = {.loop = p.loop, .s = test_stream_new(p.loop, p.a)};
    cr_assert_eq(zev_stream_send(r.s, "x", 1, 0), 0); /* not running: any thread */
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, runner, &r), 0);
    test_sleep_ms(20);
    cr_assert_eq(zev_loop_add_callback(p.loop, send_on_loop, &r), 0); /* thread-safe */
    pthread_join(th, NULL);
    cr_assert_eq(r.sent, 1);
    cr_assert_eq(zev_stream_send(r.s, "z", 1, 0), 0); /* stopped: this thread again */
    char buf[4];
    test_set_int(p.b, ZMQ_RCVTIMEO, 5000);
    zev_loop_run_once(p.loop, 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(zmq_recv(p.b, buf, sizeof buf, 0), 1);
    test_pair_close(&p);
}
