/*
 * router: a ROUTER stream serving several DEALER clients; each reply goes
 * back to the identity it came from. With ZMQ_ROUTER_MANDATORY a reply to a
 * peer that vanished is reported through on_send (EHOSTUNREACH) instead of
 * being dropped. Run: ./router [clients] [requests-per-client]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zev.h>

typedef struct stats {
    int replies, expected, failed;
} stats_t;

static void serve(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    (void)arg;
    if (zev_msg_parts(msg) != 2)
        return;
    /* [identity][request] -> [identity][reply]: move the identity frame. */
    zmq_msg_t parts[2];
    zmq_msg_init(&parts[0]);
    zmq_msg_copy(&parts[0], zev_msg_frame(msg, 0));
    zmq_msg_init_size(&parts[1], zev_msg_size(msg, 1) + 4);
    memcpy(zmq_msg_data(&parts[1]), "re: ", 4);
    memcpy((char *)zmq_msg_data(&parts[1]) + 4, zev_msg_data(msg, 1), zev_msg_size(msg, 1));
    if (zev_stream_send_msg(s, parts, 2, 0) < 0) {
        zmq_msg_close(&parts[0]);
        zmq_msg_close(&parts[1]);
    }
}

static void sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)seq;
    (void)s;
    stats_t *st = arg;
    if (status)
        st->failed++;
}

static void reply(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    stats_t *st = arg;
    (void)msg;
    if (++st->replies == st->expected)
        zev_loop_stop(zev_stream_loop(s));
}

int main(int argc, char **argv)
{
    int nclients = argc > 1 ? atoi(argv[1]) : 4, per = argc > 2 ? atoi(argv[2]) : 1000;
    if (nclients < 1 || nclients > 64)
        nclients = 4;
    stats_t st = {.expected = nclients * per};

    void *ctx = zmq_ctx_new();
    void *router = zmq_socket(ctx, ZMQ_ROUTER);
    int one = 1;
    zmq_setsockopt(router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_bind(router, "inproc://router");
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop)
        return 1;
    zev_stream_t *server = zev_stream_new(loop, router);
    zev_stream_on_recv(server, serve, NULL);
    zev_stream_on_send(server, sent, &st);

    void *dealers[64];
    for (int i = 0; i < nclients; i++) {
        dealers[i] = zmq_socket(ctx, ZMQ_DEALER);
        zmq_connect(dealers[i], "inproc://router");
        zev_stream_t *c = zev_stream_new(loop, dealers[i]);
        zev_stream_set_max_queue(c, 0);
        zev_stream_on_recv(c, reply, &st);
        for (int r = 0; r < per; r++)
            zev_stream_send(c, "job", 3, 0);
    }
    zev_loop_run(loop);
    printf("replies %d of %d, failed sends %d\n", st.replies, st.expected, st.failed);

    zev_loop_destroy(loop);
    for (int i = 0; i < nclients; i++)
        zmq_close(dealers[i]);
    zmq_close(router);
    zmq_ctx_term(ctx);
    return st.replies == st.expected ? 0 : 1;
}
