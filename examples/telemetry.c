/*
 * telemetry: a PUB publishes samples from a repeating timer; a SUB stream
 * on the same loop prints them, and stdin (an fd watcher) stops the loop on
 * EOF or "q". Run: ./telemetry [endpoint] [samples]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <zev.h>

typedef struct app {
    zev_stream_t *pub;
    int published, limit;
} app_t;

static void sample(zev_timer_t *t, void *arg)
{
    app_t *app = arg;
    char buf[64];
    int n = snprintf(buf, sizeof buf, "cpu.load %d %llu", app->published++,
                     (unsigned long long)zev_now_ns(zev_stream_loop(app->pub)));
    zev_stream_send(app->pub, "metrics", 7, ZMQ_SNDMORE);
    zev_stream_send(app->pub, buf, (size_t)n, 0);
    if (app->published == app->limit)
        zev_timer_cancel(t);
}

static void on_sample(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    app_t *app = arg;
    printf("%.*s: %.*s\n", (int)zev_msg_size(msg, 0), (const char *)zev_msg_data(msg, 0),
           (int)zev_msg_size(msg, 1), (const char *)zev_msg_data(msg, 1));
    if (app->published == app->limit)
        zev_loop_stop(zev_stream_loop(s));
}

static void on_stdin(zev_io_t *io, int fd, int events, void *arg)
{
    (void)events;
    char c;
    if (read(fd, &c, 1) <= 0 || c == 'q') {
        zev_io_stop(io);
        zev_loop_stop(arg);
    }
}

int main(int argc, char **argv)
{
    const char *endpoint = argc > 1 ? argv[1] : "inproc://telemetry";
    app_t app = {.limit = argc > 2 ? atoi(argv[2]) : 10};

    void *ctx = zmq_ctx_new();
    void *pub = zmq_socket(ctx, ZMQ_PUB);
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "metrics", 7);
    if (zmq_bind(pub, endpoint) || zmq_connect(sub, endpoint)) {
        fprintf(stderr, "telemetry: %s\n", zmq_strerror(errno));
        return 1;
    }
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop)
        return 1;
    app.pub = zev_stream_new(loop, pub);
    zev_stream_t *in = zev_stream_new(loop, sub);
    zev_stream_on_recv(in, on_sample, &app);
    zev_io_start(loop, STDIN_FILENO, ZEV_READ, on_stdin, loop);
    zev_timer_start(loop, 10000, 10000, sample, &app); /* 10 ms: lets the SUB join */
    zev_loop_run(loop);

    zev_loop_destroy(loop);
    zmq_close(sub);
    zmq_close(pub);
    zmq_ctx_term(ctx);
    return 0;
}
