/*
 * fiber_echo: examples/echo.c written with fibers. A REP server and a REQ
 * client on one loop, each a fiber in blocking style: zev_fiber_recv and
 * zev_fiber_send suspend only the fiber that calls them, and the loop runs
 * the other one meanwhile. Run: ./fiber_echo [endpoint] [count]
 *
 * It shows:
 * - a receive loop in a fiber (the frames of a received message are
 *   borrowed until the fiber's next blocking call: the server makes its
 *   reply out of them, with zmq_msg_copy, before it sends);
 * - a receive with a timeout (EAGAIN when it passes);
 * - stopping a fiber that waits for ever: zev_fiber_cancel makes its
 *   blocking call fail with ECANCELED, and zev_fiber_join waits until it
 *   returned;
 * - a fiber that is the program's main line: it spawns the others, joins
 *   them and stops the loop.
 *
 * Prints one `reply: ping <n>` line per request, then
 *   echo backend=<name> requests=<n> replies=<n> echoed=<n> parts=<n>
 *        timeouts=<n> server_end=<errno name>
 * which tests/check_example.py checks.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zev.h>

typedef struct app {
    zev_loop_t *loop;
    zev_stream_t *rep, *req;
    int count;
    int replies, timeouts; /* the client's */
    int echoed, parts;     /* the server's */
    int server_end;        /* the errno the server's receive loop ended with */
} app_t;

/* The server: receive a request, send it back, part for part. */
static void server(void *arg)
{
    app_t *a = arg;
    for (;;) {
        zev_msg_t *msg;
        if (zev_fiber_recv(a->rep, &msg, -1) < 0) {
            a->server_end = errno; /* ECANCELED: the main fiber cancelled us */
            return;
        }
        /* msg's frames are borrowed until this fiber's next blocking call,
         * and zev_fiber_send_msg is one: copy the frames into zmq_msg_t's
         * first (zmq_msg_copy shares the data, it does not copy it). */
        size_t n = zev_msg_parts(msg);
        zmq_msg_t reply[8];
        if (n > 8)
            n = 8; /* this server echoes at most 8 parts */
        for (size_t i = 0; i < n; i++) {
            zmq_msg_init(&reply[i]);
            zmq_msg_copy(&reply[i], zev_msg_frame(msg, i));
        }
        /* Waits until libzmq took the reply: no queue, no on_send needed. */
        if (zev_fiber_send_msg(a->rep, reply, n, 0, -1) < 0) {
            for (size_t i = 0; i < n; i++)
                zmq_msg_close(&reply[i]);
            a->server_end = errno;
            return;
        }
        a->echoed++;
        a->parts += (int)n;
    }
}

/* The client: send a request, wait up to a second for its reply. */
static void client(void *arg)
{
    app_t *a = arg;
    for (int i = 0; i < a->count; i++) {
        char buf[32];
        int len = snprintf(buf, sizeof buf, "ping %d", i);
        if (zev_fiber_send(a->req, buf, (size_t)len, 0, -1) < 0) {
            fprintf(stderr, "fiber_echo: send: %s\n", zmq_strerror(errno));
            return;
        }
        zev_msg_t *msg;
        if (zev_fiber_recv(a->req, &msg, 1000000) < 0) {
            if (errno != EAGAIN) {
                fprintf(stderr, "fiber_echo: recv: %s\n", zmq_strerror(errno));
                return;
            }
            a->timeouts++; /* no reply within a second (a REQ cannot go on) */
            return;
        }
        printf("reply: %.*s\n", (int)zev_msg_size(msg, 0), (const char *)zev_msg_data(msg, 0));
        a->replies++;
    }
}

/* The main line, itself a fiber: fibers can be spawned and joined from
 * anywhere on the loop's thread, but only a fiber can wait (join). */
static void main_fiber(void *arg)
{
    app_t *a = arg;
    zev_fiber_t *srv = zev_fiber_spawn(a->loop, server, a, NULL);
    zev_fiber_t *cli = zev_fiber_spawn(a->loop, client, a, NULL);
    if (!srv || !cli) {
        fprintf(stderr, "fiber_echo: spawn: %s\n", zmq_strerror(errno));
        exit(1);
    }
    zev_fiber_join(cli, -1); /* the client is done */

    /* The server waits in zev_fiber_recv for ever: cancel it (its call
     * fails with ECANCELED, it returns) and wait until it has returned. */
    zev_fiber_cancel(srv);
    zev_fiber_join(srv, -1);
    zev_loop_stop(a->loop);
}

static const char *errno_name(int e)
{
    switch (e) {
    case 0:
        return "none";
    case ECANCELED:
        return "ECANCELED";
    case EBADF:
        return "EBADF";
    case EAGAIN:
        return "EAGAIN";
    default:
        return "other";
    }
}

int main(int argc, char **argv)
{
    const char *endpoint = argc > 1 ? argv[1] : "inproc://fiber-echo";
    app_t a = {.count = argc > 2 ? atoi(argv[2]) : 5};

    void *ctx = zmq_ctx_new();
    void *rep = zmq_socket(ctx, ZMQ_REP);
    void *req = zmq_socket(ctx, ZMQ_REQ);
    if (zmq_bind(rep, endpoint) || zmq_connect(req, endpoint)) {
        fprintf(stderr, "fiber_echo: %s\n", zmq_strerror(errno));
        return 1;
    }
    a.loop = zev_loop_new(NULL);
    if (!a.loop) {
        fprintf(stderr, "fiber_echo: %s\n", zmq_strerror(errno));
        return 1;
    }
    /* Streams without on_recv: the fibers receive from them. */
    a.rep = zev_stream_new(a.loop, rep);
    a.req = zev_stream_new(a.loop, req);
    zev_fiber_t *m = a.rep && a.req ? zev_fiber_spawn(a.loop, main_fiber, &a, NULL) : NULL;
    if (!m) {
        fprintf(stderr, "fiber_echo: %s\n", zmq_strerror(errno));
        return 1;
    }
    zev_fiber_detach(m);  /* nobody joins it: freed when it returns */
    zev_loop_run(a.loop); /* until main_fiber stops it */

    printf("echo backend=%s requests=%d replies=%d echoed=%d parts=%d timeouts=%d "
           "server_end=%s\n",
           zev_loop_backend(a.loop), a.count, a.replies, a.echoed, a.parts, a.timeouts,
           errno_name(a.server_end));
    zev_loop_destroy(a.loop); /* closes both streams, and no socket */
    zmq_close(req);
    zmq_close(rep);
    zmq_ctx_term(ctx);
    return a.replies == a.count ? 0 : 1;
}
