/*
 * embed_libuv: zev inside a program whose thread belongs to libuv.
 *
 * A libuv program cannot call zev_loop_run: libuv owns the thread. It
 * drives zev instead with three handles of its own:
 *   - a uv_poll_t on zev_loop_fd(), which is readable exactly while zev has
 *     work (a message, a queued callback, a due timer on Linux): then it
 *     runs one zev iteration that does not block, zev_loop_run_once(zev, 0);
 *   - a uv_timer_t armed with zev_loop_timeout(), for zev's next timer
 *     (off Linux the fd does not cover timers);
 *   - a uv_prepare_t, which libuv runs before it blocks, to re-arm that
 *     timer with whatever the callbacks just changed.
 *
 * The program talks to a quote service (a ROUTER on another thread, plain
 * blocking libzmq) through a zev DEALER stream: a libuv timer sends a
 * request every 20 ms from libuv's callback, zev's on_recv gets the replies.
 * A zev timer ticks every 20 ms as well, 10 ms out of phase with the libuv
 * one, so the two kinds of timers must take turns. Then the program sits
 * idle for a second with nothing due: neither loop may spin, so the
 * thread's CPU time over that second stays near zero.
 *
 * Prints (each on one line):
 *   embed host=libuv backend=epoll
 *   messages sent=20 replies=20 in_order=1
 *   timers zev_fired=20 zev_early=0 zev_late_avg_us=80 zev_late_max_us=350
 *       host_fired=20 host_late_max_us=900 out_of_order=0
 *   idle seconds=1.00 cpu_thread_us=30 cpu_process_us=60 host_iterations=2 zev_runs=0
 *
 * Needs libuv (Debian: libuv1-dev). Run: ./embed_libuv
 *      ZEV_BACKEND=poll ./embed_libuv     (any backend zev was built with)
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <uv.h>
#include <zev.h>

#define ROUNDS 20
#define PERIOD_MS 20

typedef struct event {
    char who; /* 'z': the zev timer, 'h': the libuv timer */
    uint64_t due_ns, fired_ns;
} event_t;

typedef struct app {
    uv_loop_t uv;
    uv_poll_t zev_io;       /* zev_loop_fd readable: zev has work */
    uv_timer_t zev_timeout; /* zev's next timer */
    uv_prepare_t zev_rearm; /* before libuv blocks: re-arm zev_timeout */
    uv_timer_t requests;    /* the program's own timer */
    uv_timer_t idle_end;
    zev_loop_t *zev;
    zev_stream_t *dealer;
    uint64_t start_ms, host_due_ms;
    int sent, replies, in_order, zev_ticks;
    event_t events[2 * ROUNDS];
    int nevents;
    /* The idle second. */
    uint64_t idle_ns, cpu_thread_ns, cpu_process_ns, host_iterations, zev_runs;
} app_t;

static uint64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void)
{
    return clock_ns(CLOCK_MONOTONIC); /* zev's clock, and libuv's */
}

/* ------------------------------------------------------ zev inside libuv */

static void zev_run(app_t *app)
{
    app->zev_runs++;
    zev_loop_run_once(app->zev, 0); /* never blocks: libuv does the waiting */
}

static void on_zev_fd(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    zev_run(h->data);
}

static void on_zev_timeout(uv_timer_t *t)
{
    zev_run(t->data);
}

static void rearm_zev_timeout(uv_prepare_t *p)
{
    app_t *app = p->data;
    app->host_iterations++;
    int ms = zev_loop_timeout(app->zev); /* -1: no zev timer at all */
    if (ms < 0)
        uv_timer_stop(&app->zev_timeout);
    else
        uv_timer_start(&app->zev_timeout, on_zev_timeout, (uint64_t)ms, 0);
}

/* --------------------------------------------------------- the program */

static void log_event(app_t *app, char who, uint64_t due_ns)
{
    if (app->nevents < 2 * ROUNDS)
        app->events[app->nevents++] = (event_t){who, due_ns, now_ns()};
}

static void end_idle(uv_timer_t *t);

/* Both timers done and every reply in: measure an idle second. */
static void maybe_idle(app_t *app)
{
    if (app->sent < ROUNDS || app->replies < ROUNDS || app->zev_ticks < ROUNDS)
        return;
    app->idle_ns = now_ns();
    app->cpu_thread_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    app->cpu_process_ns = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
    app->host_iterations = app->zev_runs = 0;
    uv_timer_start(&app->idle_end, end_idle, 1000, 0);
}

static void on_reply(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    (void)s;
    app_t *app = arg;
    char want[32];
    int n = snprintf(want, sizeof want, "re: request %d", app->replies);
    if (zev_msg_size(msg, 0) != (size_t)n || memcmp(zev_msg_data(msg, 0), want, (size_t)n))
        app->in_order = 0;
    app->replies++;
    maybe_idle(app);
}

static void zev_tick(zev_timer_t *t, void *arg)
{
    app_t *app = arg;
    log_event(app, 'z', zev_timer_due(t)); /* the deadline this run was due at */
    if (++app->zev_ticks == ROUNDS) {
        zev_timer_cancel(t);
        maybe_idle(app);
    }
}

/* libuv's timer, kept on a fixed schedule (a repeating uv_timer drifts by
 * its lateness): due at start + 10 ms + n x 20 ms, on libuv's clock. */
static void send_request(uv_timer_t *t)
{
    app_t *app = t->data;
    log_event(app, 'h', app->host_due_ms * 1000000u);
    char req[32];
    int n = snprintf(req, sizeof req, "request %d", app->sent++);
    zev_stream_send(app->dealer, req, (size_t)n, 0); /* from libuv's callback */
    if (app->sent < ROUNDS) {
        app->host_due_ms += PERIOD_MS;
        uint64_t now = uv_now(&app->uv);
        uv_timer_start(t, send_request, app->host_due_ms > now ? app->host_due_ms - now : 0, 0);
    }
    maybe_idle(app);
}

static void end_idle(uv_timer_t *t)
{
    app_t *app = t->data;
    app->idle_ns = now_ns() - app->idle_ns;
    app->cpu_thread_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - app->cpu_thread_ns;
    app->cpu_process_ns = clock_ns(CLOCK_PROCESS_CPUTIME_ID) - app->cpu_process_ns;
    /* Closing every handle ends uv_run. */
    uv_close((uv_handle_t *)&app->zev_io, NULL);
    uv_close((uv_handle_t *)&app->zev_timeout, NULL);
    uv_close((uv_handle_t *)&app->zev_rearm, NULL);
    uv_close((uv_handle_t *)&app->requests, NULL);
    uv_close((uv_handle_t *)&app->idle_end, NULL);
}

/* ------------------------------------------------ the quote service */

static void *quote_service(void *router)
{
    for (;;) {
        zmq_msg_t id, req;
        zmq_msg_init(&id);
        zmq_msg_init(&req);
        if (zmq_msg_recv(&id, router, 0) < 0 || zmq_msg_recv(&req, router, 0) < 0) {
            zmq_msg_close(&id);
            zmq_msg_close(&req);
            break; /* ETERM: the program is ending */
        }
        char reply[64];
        int n = snprintf(reply, sizeof reply, "re: %.*s", (int)zmq_msg_size(&req),
                         (const char *)zmq_msg_data(&req));
        zmq_msg_send(&id, router, ZMQ_SNDMORE);
        zmq_send(router, reply, (size_t)n, 0);
        zmq_msg_close(&req);
    }
    int linger = 0;
    zmq_setsockopt(router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(router);
    return NULL;
}

static void print_summary(const app_t *app)
{
    uint64_t late_sum = 0, late_max = 0, host_late_max = 0;
    int zev_fired = 0, host_fired = 0, early = 0, out_of_order = 0;
    for (int i = 0; i < app->nevents; i++) {
        const event_t *e = &app->events[i];
        int64_t late = (int64_t)(e->fired_ns - e->due_ns);
        if (i > 0 && e->due_ns < app->events[i - 1].due_ns)
            out_of_order++;
        if (e->who == 'h') {
            host_fired++;
            if (late > 0 && (uint64_t)late > host_late_max)
                host_late_max = (uint64_t)late;
            continue;
        }
        zev_fired++;
        if (late < 0) {
            early++;
            continue;
        }
        late_sum += (uint64_t)late;
        if ((uint64_t)late > late_max)
            late_max = (uint64_t)late;
    }
    printf("embed host=libuv backend=%s\n", zev_loop_backend(app->zev));
    printf("messages sent=%d replies=%d in_order=%d\n", app->sent, app->replies, app->in_order);
    printf("timers zev_fired=%d zev_early=%d zev_late_avg_us=%llu zev_late_max_us=%llu "
           "host_fired=%d host_late_max_us=%llu out_of_order=%d\n",
           zev_fired, early, zev_fired ? (unsigned long long)(late_sum / 1000 / zev_fired) : 0,
           (unsigned long long)late_max / 1000, host_fired,
           (unsigned long long)host_late_max / 1000, out_of_order);
    printf("idle seconds=%.2f cpu_thread_us=%llu cpu_process_us=%llu host_iterations=%llu "
           "zev_runs=%llu\n",
           (double)app->idle_ns / 1e9, (unsigned long long)app->cpu_thread_ns / 1000,
           (unsigned long long)app->cpu_process_ns / 1000, (unsigned long long)app->host_iterations,
           (unsigned long long)app->zev_runs);
}

int main(void)
{
    app_t app = {.in_order = 1};
    void *ctx = zmq_ctx_new();
    void *router = zmq_socket(ctx, ZMQ_ROUTER);
    void *dealer = zmq_socket(ctx, ZMQ_DEALER);
    char endpoint[256];
    size_t len = sizeof endpoint;
    if (zmq_bind(router, "tcp://127.0.0.1:*") ||
        zmq_getsockopt(router, ZMQ_LAST_ENDPOINT, endpoint, &len) ||
        zmq_connect(dealer, endpoint)) {
        fprintf(stderr, "embed_libuv: %s\n", zmq_strerror(errno));
        return 1;
    }
    pthread_t service;
    pthread_create(&service, NULL, quote_service, router); /* the socket is its now */

    app.zev = zev_loop_new(NULL);
    int fd = app.zev ? zev_loop_fd(app.zev) : -1; /* switches zev to embedded mode */
    if (fd < 0 || uv_loop_init(&app.uv) < 0) {
        fprintf(stderr, "embed_libuv: %s\n", zmq_strerror(errno));
        return 1;
    }
    app.dealer = zev_stream_new(app.zev, dealer);
    zev_stream_on_recv(app.dealer, on_reply, &app);

    uv_poll_init(&app.uv, &app.zev_io, fd);
    uv_timer_init(&app.uv, &app.zev_timeout);
    uv_prepare_init(&app.uv, &app.zev_rearm);
    uv_timer_init(&app.uv, &app.requests);
    uv_timer_init(&app.uv, &app.idle_end);
    app.zev_io.data = app.zev_timeout.data = app.zev_rearm.data = &app;
    app.requests.data = app.idle_end.data = &app;
    uv_poll_start(&app.zev_io, UV_READABLE, on_zev_fd);
    uv_prepare_start(&app.zev_rearm, rearm_zev_timeout);

    /* The libuv timer is due at start + 10 ms, + 30 ms, ...; the zev timer
     * at start + 20 ms, + 40 ms, ...: they take turns 10 ms apart. */
    uv_update_time(&app.uv);
    app.start_ms = uv_now(&app.uv);
    app.host_due_ms = app.start_ms + PERIOD_MS / 2;
    uv_timer_start(&app.requests, send_request, PERIOD_MS / 2, 0);
    uint64_t zev_start_us = (app.start_ms + PERIOD_MS) * 1000 - now_ns() / 1000;
    zev_timer_start(app.zev, zev_start_us, PERIOD_MS * 1000, zev_tick, &app);

    uv_run(&app.uv, UV_RUN_DEFAULT); /* until end_idle closed every handle */
    uv_loop_close(&app.uv);
    print_summary(&app);

    zev_loop_destroy(app.zev); /* after uv_poll let go of its fd */
    zmq_close(dealer);
    zmq_ctx_shutdown(ctx); /* the service's recv fails with ETERM */
    pthread_join(service, NULL);
    zmq_ctx_term(ctx);
    return 0;
}
