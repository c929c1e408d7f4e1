/*
 * echo: a REP server on a zev stream answering a REQ client driven by a
 * timer on the same loop. Run: ./echo [endpoint] [count]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zev.h>

typedef struct client {
    zev_stream_t *req;
    int sent, received, count;
} client_t;

static void server_recv(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    (void)arg;
    /* Echo every part back; frames are borrowed, zev_stream_send copies. */
    for (size_t i = 0; i < zev_msg_parts(msg); i++)
        zev_stream_send(s, zev_msg_data(msg, i), zev_msg_size(msg, i),
                        zev_msg_more(msg, i) ? ZMQ_SNDMORE : 0);
}

static void client_send(client_t *c)
{
    char buf[32];
    int n = snprintf(buf, sizeof buf, "ping %d", c->sent++);
    zev_stream_send(c->req, buf, (size_t)n, 0);
}

static void client_recv(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    client_t *c = arg;
    printf("reply: %.*s\n", (int)zev_msg_size(msg, 0), (const char *)zev_msg_data(msg, 0));
    if (++c->received == c->count)
        zev_loop_stop(zev_stream_loop(s));
}

static void tick(zev_timer_t *t, void *arg)
{
    client_t *c = arg;
    if (c->sent < c->count)
        client_send(c);
    else
        zev_timer_cancel(t);
}

int main(int argc, char **argv)
{
    const char *endpoint = argc > 1 ? argv[1] : "inproc://echo";
    client_t c = {.count = argc > 2 ? atoi(argv[2]) : 5};

    void *ctx = zmq_ctx_new();
    void *rep = zmq_socket(ctx, ZMQ_REP);
    void *req = zmq_socket(ctx, ZMQ_REQ);
    if (zmq_bind(rep, endpoint) || zmq_connect(req, endpoint)) {
        fprintf(stderr, "echo: %s\n", zmq_strerror(errno));
        return 1;
    }
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop) {
        fprintf(stderr, "echo: %s\n", zmq_strerror(errno));
        return 1;
    }
    zev_stream_t *server = zev_stream_new(loop, rep);
    c.req = zev_stream_new(loop, req);
    zev_stream_on_recv(server, server_recv, NULL);
    zev_stream_on_recv(c.req, client_recv, &c);
    /* REQ allows one request in flight: the second send waits in the
     * stream's queue (EFSM counts as "not now") until the reply came. */
    zev_timer_start(loop, 0, 10000, tick, &c);
    zev_loop_run(loop);

    zev_loop_destroy(loop); /* closes both streams, and no socket */
    zmq_close(req);
    zmq_close(rep);
    zmq_ctx_term(ctx);
    return 0;
}
