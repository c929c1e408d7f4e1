/*
 * gateway: an order gateway, the program zev's gateway API is for.
 *
 *   ./gateway [clients] [requests-per-client]      (default 200 x 20)
 *
 * A ROUTER takes requests from many DEALER clients. Each request gets a
 * timeout: an owned timer, armed when the request comes and disarmed when
 * the answer does, made once per request slot and never allocated again.
 * The request goes to a strategy thread, which answers through
 * zev_loop_post; the post lives inside the request, so that allocates
 * nothing either. Whichever comes first, answer or timeout, is sent back to
 * the client; the other is ignored. Every reply is numbered
 * (zev_stream_send_seq), so on_send says which request a status is for.
 * One client stops reading after its first reply: with ROUTER_MANDATORY its
 * pipe fills, and the stream's send timeout drops what it cannot take
 * (ETIMEDOUT) instead of holding every other client's replies behind it. At
 * the end the gateway closes its stream with ZEV_CLOSE_FLUSH.
 *
 * The clients run on a thread of their own, with their own loop. The
 * program prints one line per client and a summary line; each request ends
 * exactly once: answered, timed out, or (the stalled client's) a reply
 * dropped at its send deadline. tests/examples.cmake runs it on every backend
 * and tests/check_example.py checks those lines.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zev.h>

#define ENDPOINT "inproc://gateway"
#define TIMEOUT_US 20000      /* a request's timeout */
#define SEND_TIMEOUT_US 50000 /* a reply's send deadline */
#define STALLED 7             /* this client stops reading after one reply */

/* ------------------------------------------------------------- requests */

enum { FREE, PENDING, ANSWERED, TIMED_OUT };

typedef struct request {
    struct gateway *gw;
    zev_timer_t *timeout;  /* owned: armed per request, made once */
    zev_post_t post;       /* the strategy's answer comes home in this */
    char client[8];        /* the client's routing id, "c<n>" */
    uint32_t id;           /* the client's request number */
    int state;
    uint64_t reply_seq;    /* the reply's message number */
    int reply_status;      /* what on_send said about it; -1 until then */
    struct request *next;  /* the strategy's queues */
    uint64_t answer_at;    /* when the strategy answers it (its clock, ns) */
} request_t;

typedef struct gateway {
    zev_loop_t *loop;
    zev_stream_t *router;
    request_t *req; /* clients x per_client slots */
    int clients, per_client;
    size_t ended, answered, timed_out, late_answers;
    size_t statuses, send_timeouts;
    pthread_mutex_t mu; /* the strategy thread's queues */
    pthread_cond_t cv;  /* on CLOCK_MONOTONIC */
    request_t *fast, **fast_tail, *slow, **slow_tail;
    bool stop;
} gateway_t;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The reply goes out once per request: answer or timeout, whichever won. */
static void reply(request_t *r, int state)
{
    gateway_t *gw = r->gw;
    r->state = state;
    gw->ended++;
    *(state == ANSWERED ? &gw->answered : &gw->timed_out) += 1;
    const char *what = state == ANSWERED ? "filled" : "timeout";
    zmq_msg_t parts[3];
    zmq_msg_init_size(&parts[0], strlen(r->client));
    memcpy(zmq_msg_data(&parts[0]), r->client, strlen(r->client));
    zmq_msg_init_size(&parts[1], sizeof r->id);
    memcpy(zmq_msg_data(&parts[1]), &r->id, sizeof r->id);
    zmq_msg_init_size(&parts[2], strlen(what));
    memcpy(zmq_msg_data(&parts[2]), what, strlen(what));
    if (zev_stream_send_msg(gw->router, parts, 3, 0) == 0)
        r->reply_seq = zev_stream_send_seq(gw->router);
    else
        for (int i = 0; i < 3; i++)
            zmq_msg_close(&parts[i]);
}

static void request_timed_out(zev_timer_t *t, void *arg)
{
    (void)t;
    request_t *r = arg;
    if (r->state == PENDING)
        reply(r, TIMED_OUT);
}

/* The strategy's answer, on the gateway's loop. loop is NULL if the loop
 * was destroyed with the answer still queued: nothing to free here. */
static void answered(zev_loop_t *loop, void *arg)
{
    request_t *r = arg;
    if (!loop)
        return;
    if (r->state != PENDING) {
        r->gw->late_answers++; /* the timeout already replied */
        return;
    }
    zev_timer_disarm(r->timeout);
    reply(r, ANSWERED);
}

/* ------------------------------------------------------------ strategy */

/* Answers each request when its answer is ready: most at once, every tenth
 * after twice the timeout (too late: the timeout has replied by then). */
static request_t *take(request_t **head, request_t ***tail)
{
    request_t *r = *head;
    if ((*head = r->next) == NULL)
        *tail = head;
    return r;
}

static void *strategy(void *arg)
{
    gateway_t *gw = arg;
    pthread_mutex_lock(&gw->mu);
    for (;;) {
        request_t *r = NULL;
        if (gw->fast)
            r = take(&gw->fast, &gw->fast_tail);
        else if (gw->slow && gw->slow->answer_at <= now_ns())
            r = take(&gw->slow, &gw->slow_tail);
        else if (gw->stop && !gw->slow)
            break;
        if (!r) {
            if (!gw->slow) {
                pthread_cond_wait(&gw->cv, &gw->mu);
            } else {
                struct timespec until = {(time_t)(gw->slow->answer_at / 1000000000u),
                                         (long)(gw->slow->answer_at % 1000000000u)};
                pthread_cond_timedwait(&gw->cv, &gw->mu, &until);
            }
            continue;
        }
        pthread_mutex_unlock(&gw->mu);
        zev_loop_post(gw->loop, &r->post, answered, r); /* no allocation */
        pthread_mutex_lock(&gw->mu);
    }
    pthread_mutex_unlock(&gw->mu);
    return NULL;
}

/* ------------------------------------------------------------- gateway */

static void on_request(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    (void)s;
    gateway_t *gw = arg;
    int client;
    uint32_t id;
    if (zev_msg_parts(msg) != 2 || zev_msg_size(msg, 0) >= sizeof gw->req->client ||
        zev_msg_size(msg, 1) != sizeof id)
        return;
    char name[8] = {0};
    memcpy(name, zev_msg_data(msg, 0), zev_msg_size(msg, 0));
    memcpy(&id, zev_msg_data(msg, 1), sizeof id);
    if (sscanf(name, "c%d", &client) != 1 || client < 0 || client >= gw->clients ||
        id >= (uint32_t)gw->per_client)
        return;
    request_t *r = &gw->req[client * gw->per_client + (int)id];
    if (r->state != FREE)
        return; /* a duplicate */
    memcpy(r->client, name, sizeof name);
    r->id = id;
    r->state = PENDING;
    zev_timer_arm(r->timeout, TIMEOUT_US, 0);
    bool slow = id % 10 == 9;
    r->answer_at = now_ns() + (slow ? 2u * TIMEOUT_US * 1000u : 0);
    r->next = NULL;
    pthread_mutex_lock(&gw->mu); /* to the strategy */
    *(slow ? gw->slow_tail : gw->fast_tail) = r;
    if (slow)
        gw->slow_tail = &r->next;
    else
        gw->fast_tail = &r->next;
    pthread_cond_signal(&gw->cv);
    pthread_mutex_unlock(&gw->mu);
}

/* Which request a status is for: its reply's number. */
static void on_reply_sent(zev_stream_t *s, uint64_t seq, int status, void *arg)
{
    (void)s;
    gateway_t *gw = arg;
    gw->statuses++;
    if (status == ETIMEDOUT)
        gw->send_timeouts++;
    int n = gw->clients * gw->per_client;
    for (int i = 0; i < n; i++)
        if (gw->req[i].reply_seq == seq) {
            gw->req[i].reply_status = status;
            break;
        }
}

static void on_closed(zev_stream_t *s, void *arg)
{
    (void)s;
    zev_loop_stop(((gateway_t *)arg)->loop);
}

/* Every request ended: close, letting the replies still queued go first
 * (for at most the socket's ZMQ_LINGER). */
static void check_done(zev_timer_t *t, void *arg)
{
    gateway_t *gw = arg;
    if (gw->ended < (size_t)(gw->clients * gw->per_client))
        return;
    zev_timer_cancel(t); /* safe inside its own callback */
    zev_stream_close(gw->router, ZEV_CLOSE_FLUSH);
}

/* --------------------------------------------------------------- clients */

typedef struct clients clients_t;

typedef struct client {
    clients_t *all;
    zev_stream_t *s;
    int n;
    uint32_t sent;  /* requests sent */
    int filled, timeouts;
    bool finished;  /* every reply it will read arrived */
} client_t;

struct clients {
    zev_loop_t *loop;
    client_t *c;
    int count, per_client, finished;
};

/* Each client keeps two requests in flight. */
static void send_request(client_t *c)
{
    if (c->sent < (uint32_t)c->all->per_client) {
        zev_stream_send(c->s, &c->sent, sizeof c->sent, 0);
        c->sent++;
    }
}

static void finish(client_t *c)
{
    if (c->finished)
        return;
    c->finished = true;
    if (++c->all->finished == c->all->count)
        zev_loop_stop(c->all->loop);
}

static void on_reply(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    (void)s;
    client_t *c = arg;
    if (zev_msg_parts(msg) != 2)
        return;
    if (zev_msg_size(msg, 1) == 6 && memcmp(zev_msg_data(msg, 1), "filled", 6) == 0)
        c->filled++;
    else
        c->timeouts++;
    int got = c->filled + c->timeouts;
    if (c->n == STALLED) {
        /* it stops reading: its remaining replies pile up at the gateway */
        zev_stream_on_recv(c->s, NULL, NULL);
        while (c->sent < (uint32_t)c->all->per_client)
            send_request(c);
        finish(c);
        return;
    }
    send_request(c);
    if (got == c->all->per_client)
        finish(c);
}

static void *run_clients(void *arg)
{
    clients_t *all = arg;
    zev_loop_run(all->loop);
    return NULL;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    int nclients = argc > 1 ? atoi(argv[1]) : 200;
    int per_client = argc > 2 ? atoi(argv[2]) : 20;
    if (nclients <= STALLED || nclients > 100000 || per_client < 2) {
        fprintf(stderr, "usage: gateway [clients > %d] [requests-per-client >= 2]\n", STALLED);
        return 2;
    }
    void *ctx = zmq_ctx_new();

    /* The gateway. */
    gateway_t gw = {.clients = nclients, .per_client = per_client};
    gw.fast_tail = &gw.fast;
    gw.slow_tail = &gw.slow;
    pthread_mutex_init(&gw.mu, NULL);
    pthread_condattr_t cva;
    pthread_condattr_init(&cva);
    pthread_condattr_setclock(&cva, CLOCK_MONOTONIC);
    pthread_cond_init(&gw.cv, &cva);
    gw.loop = zev_loop_new(NULL);
    void *router = zmq_socket(ctx, ZMQ_ROUTER);
    int one = 1, hwm = 4, linger = 1000;
    zmq_setsockopt(router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(router, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(router, ZMQ_LINGER, &linger, sizeof linger);
    gw.router = zev_stream_new(gw.loop, router);
    if (!gw.loop || !gw.router || zev_stream_bind(gw.router, ENDPOINT) < 0) {
        fprintf(stderr, "gateway: %s\n", zmq_strerror(errno));
        return 1;
    }
    zev_stream_on_recv(gw.router, on_request, &gw);
    zev_stream_on_send(gw.router, on_reply_sent, &gw);
    zev_stream_on_close(gw.router, on_closed, &gw);
    zev_stream_set_max_queue(gw.router, 0);
    zev_stream_set_send_timeout(gw.router, SEND_TIMEOUT_US);
    gw.req = calloc((size_t)nclients * (size_t)per_client, sizeof *gw.req);
    for (int i = 0; i < nclients * per_client; i++) {
        gw.req[i].gw = &gw;
        gw.req[i].reply_status = -1;
        gw.req[i].timeout = zev_timer_new(gw.loop, request_timed_out, &gw.req[i]);
    }
    zev_timer_start(gw.loop, 1000, 1000, check_done, &gw);
    pthread_t strategy_thread;
    pthread_create(&strategy_thread, NULL, strategy, &gw);

    /* The clients: one thread, one loop, a DEALER stream each. */
    clients_t all = {.count = nclients, .per_client = per_client};
    all.loop = zev_loop_new(NULL);
    all.c = calloc((size_t)nclients, sizeof *all.c);
    void **dealers = calloc((size_t)nclients, sizeof *dealers);
    for (int i = 0; i < nclients; i++) {
        client_t *c = &all.c[i];
        char id[16];
        snprintf(id, sizeof id, "c%d", i % 1000000);
        dealers[i] = zmq_socket(ctx, ZMQ_DEALER);
        zmq_setsockopt(dealers[i], ZMQ_ROUTING_ID, id, strlen(id));
        zmq_setsockopt(dealers[i], ZMQ_RCVHWM, &hwm, sizeof hwm);
        *c = (client_t){.all = &all, .n = i, .s = zev_stream_new(all.loop, dealers[i])};
        zev_stream_connect(c->s, ENDPOINT);
        zev_stream_on_recv(c->s, on_reply, c);
        send_request(c);
        send_request(c);
    }
    pthread_t client_thread;
    pthread_create(&client_thread, NULL, run_clients, &all);

    zev_loop_run(gw.loop); /* until the router's close callback */

    pthread_join(client_thread, NULL);
    pthread_mutex_lock(&gw.mu);
    gw.stop = true;
    pthread_cond_signal(&gw.cv);
    pthread_mutex_unlock(&gw.mu);
    pthread_join(strategy_thread, NULL);

    /* Each request ended once; each reply got one status, which says
     * whether the stalled client's replies were dropped at their deadline. */
    int total = nclients * per_client, unreported = 0, delivered = 0;
    for (int i = 0; i < total; i++) {
        if (gw.req[i].reply_status == 0)
            delivered++;
        else if (gw.req[i].reply_status < 0)
            unreported++;
    }
    for (int i = 0; i < nclients; i++)
        printf("client n=%d stalled=%d requests=%d filled=%d timeouts=%d\n", i, i == STALLED,
               per_client, all.c[i].filled, all.c[i].timeouts);
    printf("gateway backend=%s clients=%d requests=%d ended=%zu answered=%zu timed_out=%zu "
           "late_answers=%zu statuses=%zu delivered=%d send_timeouts=%zu unreported=%d\n",
           zev_loop_backend(gw.loop), nclients, total, gw.ended, gw.answered, gw.timed_out,
           gw.late_answers, gw.statuses, delivered, gw.send_timeouts, unreported);

    zev_loop_destroy(gw.loop); /* frees the owned timers */
    zev_loop_destroy(all.loop);
    for (int i = 0; i < nclients; i++)
        zmq_close(dealers[i]);
    zmq_close(router);
    zmq_ctx_term(ctx);
    free(dealers);
    free(all.c);
    free(gw.req);
    return 0;
}
