/*
 * fiber_router: a ROUTER server with one fiber per client, in blocking
 * style, and its DEALER clients as fibers of the same program, all on one
 * loop. Run: ./fiber_router [clients] [requests-per-client]
 *
 * - The dispatcher fiber receives every request from the ROUTER. The first
 *   request from a client opens its session: an inproc PAIR of sockets
 *   (one stream each) and a handler fiber. Each request's body goes to the
 *   client's handler over its pair, so a client's requests are served in
 *   order, one at a time, while the other clients' handlers go on.
 * - A handler receives from its pair, works (a "slow" request sleeps
 *   100 ms with zev_fiber_sleep, which holds up only this client), and
 *   sends the reply through the shared ROUTER stream with
 *   zev_fiber_send_msg: handlers take turns on the stream, and each
 *   two-part reply goes out whole.
 * - Timeouts: a client gives each request 5 s, but its one slow request
 *   (the middle one) only 20 ms: zev_fiber_recv fails with EAGAIN, the
 *   client counts a timeout and goes on, and later drops the late reply
 *   when it comes (it carries the request's number).
 * - Cancellation and shutdown: once every client has returned, the main
 *   fiber cancels the dispatcher and the handlers, which wait in
 *   zev_fiber_recv for ever: each call fails with ECANCELED, each fiber
 *   returns, and zev_fiber_join frees it. A cancelled fiber cannot wait
 *   any more (its own joins fail with ECANCELED unless the fiber joined
 *   has already returned), so the main fiber, not the cancelled
 *   dispatcher, waits for the handlers.
 *
 * Prints, for tests/check_example.py:
 *   client n=<i> requests=<n> replies=<n> timeouts=<n> late=<n> bad=<n>
 *   session n=<i> handled=<n> end=<errno name>
 *   server backend=<name> clients=<n> sessions=<n> requests=<n>
 *          replies=<n> dispatcher_end=<errno name> fibers_resumed=<n>
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zev.h>

#define MAX_CLIENTS 64
#define SLOW_US 100000           /* a slow request's work */
#define SLOW_TIMEOUT_US 20000    /* how long a client waits for it */
#define REPLY_TIMEOUT_US 5000000 /* how long a client waits for the others */

typedef struct server server_t;

typedef struct session {
    server_t *srv;
    int n;
    char id[32]; /* the client's routing id */
    size_t idlen;
    void *to_sock, *from_sock;
    zev_stream_t *to;   /* the dispatcher's end of the pair */
    zev_stream_t *from; /* the handler's end */
    zev_fiber_t *handler;
    int handled, end;
} session_t;

typedef struct client {
    server_t *srv;
    int n;
    void *sock;
    zev_stream_t *dealer;
    zev_fiber_t *fiber;
    int replies, timeouts, late, bad;
} client_t;

struct server {
    zev_loop_t *loop;
    void *ctx;
    zev_stream_t *router;
    int nclients, per;
    client_t clients[MAX_CLIENTS];
    session_t sessions[MAX_CLIENTS];
    int nsessions, requests, replies, dispatcher_end;
};

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

/* ------------------------------------------------------------ the server */

/* One client's handler: its requests, in order, one at a time. */
static void handler(void *arg)
{
    session_t *ss = arg;
    server_t *srv = ss->srv;
    for (;;) {
        zev_msg_t *msg;
        if (zev_fiber_recv(ss->from, &msg, -1) < 0) {
            ss->end = errno; /* ECANCELED at shutdown */
            return;
        }
        /* The frames are borrowed until our next blocking call: take
         * what we need now. */
        char req[64];
        size_t len = zev_msg_size(msg, 0);
        if (len >= sizeof req)
            len = sizeof req - 1;
        memcpy(req, zev_msg_data(msg, 0), len);
        req[len] = '\0';
        ss->handled++;
        if (strncmp(req, "slow", 4) == 0 && zev_fiber_sleep(SLOW_US) < 0) {
            ss->end = errno; /* cancelled while it slept */
            return;
        }
        /* [routing id][re: request], through the one ROUTER stream. */
        zmq_msg_t parts[2];
        zmq_msg_init_size(&parts[0], ss->idlen);
        memcpy(zmq_msg_data(&parts[0]), ss->id, ss->idlen);
        zmq_msg_init_size(&parts[1], len + 4);
        memcpy(zmq_msg_data(&parts[1]), "re: ", 4);
        memcpy((char *)zmq_msg_data(&parts[1]) + 4, req, len);
        if (zev_fiber_send_msg(srv->router, parts, 2, 0, -1) < 0) {
            zmq_msg_close(&parts[0]); /* nothing was taken */
            zmq_msg_close(&parts[1]);
            ss->end = errno;
            return;
        }
        srv->replies++;
    }
}

/* The client's session, opened by its first request: a PAIR of sockets and
 * a handler fiber. Creating streams and spawning fibers never blocks, so
 * the dispatcher may do it between two receives. */
static session_t *session_of(server_t *srv, const void *id, size_t idlen)
{
    for (int i = 0; i < srv->nsessions; i++)
        if (srv->sessions[i].idlen == idlen && !memcmp(srv->sessions[i].id, id, idlen))
            return &srv->sessions[i];
    if (srv->nsessions == MAX_CLIENTS || idlen > sizeof srv->sessions[0].id)
        return NULL;
    session_t *ss = &srv->sessions[srv->nsessions];
    *ss = (session_t){.srv = srv, .n = srv->nsessions, .idlen = idlen};
    memcpy(ss->id, id, idlen);
    char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "inproc://fiber-router-session-%d", ss->n);
    ss->to_sock = zmq_socket(srv->ctx, ZMQ_PAIR);
    ss->from_sock = zmq_socket(srv->ctx, ZMQ_PAIR);
    if (zmq_bind(ss->to_sock, endpoint) || zmq_connect(ss->from_sock, endpoint))
        return NULL;
    ss->to = zev_stream_new(srv->loop, ss->to_sock);
    ss->from = zev_stream_new(srv->loop, ss->from_sock);
    ss->handler = ss->to && ss->from ? zev_fiber_spawn(srv->loop, handler, ss, NULL) : NULL;
    if (!ss->handler)
        return NULL;
    srv->nsessions++;
    return ss;
}

/* Every request from the ROUTER, to its client's handler. */
static void dispatcher(void *arg)
{
    server_t *srv = arg;
    for (;;) {
        zev_msg_t *msg;
        if (zev_fiber_recv(srv->router, &msg, -1) < 0) {
            srv->dispatcher_end = errno; /* ECANCELED at shutdown */
            return;
        }
        if (zev_msg_parts(msg) != 2)
            continue; /* [routing id][request] only */
        session_t *ss = session_of(srv, zev_msg_data(msg, 0), zev_msg_size(msg, 0));
        if (!ss) {
            fprintf(stderr, "fiber_router: session: %s\n", zmq_strerror(errno));
            continue;
        }
        srv->requests++;
        /* zev_fiber_send copies data when the call starts, so it may point
         * into the message we received (its frames are borrowed until this
         * call, our next blocking one). */
        if (zev_fiber_send(ss->to, zev_msg_data(msg, 1), zev_msg_size(msg, 1), 0, -1) < 0) {
            srv->dispatcher_end = errno;
            return;
        }
    }
}

/* ----------------------------------------------------------- the clients */

static void client(void *arg)
{
    client_t *c = arg;
    server_t *srv = c->srv;
    int slow_one = srv->per / 2;
    for (int r = 0; r < srv->per; r++) {
        char buf[64];
        int len = snprintf(buf, sizeof buf, "%s %d %d", r == slow_one ? "slow" : "req", c->n, r);
        if (zev_fiber_send(c->dealer, buf, (size_t)len, 0, -1) < 0) {
            fprintf(stderr, "fiber_router: client %d: send: %s\n", c->n, zmq_strerror(errno));
            return;
        }
        int64_t timeout = r == slow_one ? SLOW_TIMEOUT_US : REPLY_TIMEOUT_US;
        for (;;) {
            zev_msg_t *msg;
            if (zev_fiber_recv(c->dealer, &msg, timeout) < 0) {
                if (errno == EAGAIN) {
                    c->timeouts++; /* no reply in time: go on with the next */
                    break;
                }
                fprintf(stderr, "fiber_router: client %d: recv: %s\n", c->n, zmq_strerror(errno));
                return;
            }
            /* "re: <kind> <client> <request>" */
            char reply[64];
            size_t rlen = zev_msg_size(msg, 0);
            if (rlen >= sizeof reply)
                rlen = sizeof reply - 1;
            memcpy(reply, zev_msg_data(msg, 0), rlen);
            reply[rlen] = '\0';
            char kind[8];
            int who, which;
            if (sscanf(reply, "re: %7s %d %d", kind, &who, &which) != 3 || who != c->n ||
                which > r) {
                c->bad++;
                break;
            }
            if (which == r) {
                c->replies++;
                break;
            }
            c->late++; /* the reply to a request that timed out: drop it */
        }
    }
}

/* ---------------------------------------------------------- the main line */

static void main_fiber(void *arg)
{
    server_t *srv = arg;
    zev_fiber_t *disp = zev_fiber_spawn(srv->loop, dispatcher, srv, NULL);
    for (int i = 0; i < srv->nclients; i++)
        srv->clients[i].fiber = zev_fiber_spawn(srv->loop, client, &srv->clients[i], NULL);
    for (int i = 0; i < srv->nclients; i++)
        zev_fiber_join(srv->clients[i].fiber, -1);

    /* Shutdown: the dispatcher and the handlers wait for requests for
     * ever. Cancelled, their zev_fiber_recv fails with ECANCELED and they
     * return; join waits for that and frees them. */
    zev_fiber_cancel(disp);
    zev_fiber_join(disp, -1);
    for (int i = 0; i < srv->nsessions; i++) {
        zev_fiber_cancel(srv->sessions[i].handler);
        zev_fiber_join(srv->sessions[i].handler, -1);
        zev_stream_close(srv->sessions[i].to, ZEV_CLOSE_SOCKET);
        zev_stream_close(srv->sessions[i].from, ZEV_CLOSE_SOCKET);
    }
    zev_loop_stop(srv->loop);
}

int main(int argc, char **argv)
{
    static server_t srv;
    srv.nclients = argc > 1 ? atoi(argv[1]) : 4;
    srv.per = argc > 2 ? atoi(argv[2]) : 100;
    if (srv.nclients < 1 || srv.nclients > MAX_CLIENTS || srv.per < 3) {
        fprintf(stderr, "usage: fiber_router [clients 1..%d] [requests-per-client >= 3]\n",
                MAX_CLIENTS);
        return 2;
    }

    srv.ctx = zmq_ctx_new();
    void *router = zmq_socket(srv.ctx, ZMQ_ROUTER);
    int one = 1;
    zmq_setsockopt(router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    if (zmq_bind(router, "inproc://fiber-router")) {
        fprintf(stderr, "fiber_router: %s\n", zmq_strerror(errno));
        return 1;
    }
    srv.loop = zev_loop_new(NULL);
    if (!srv.loop || !(srv.router = zev_stream_new(srv.loop, router))) {
        fprintf(stderr, "fiber_router: %s\n", zmq_strerror(errno));
        return 1;
    }
    for (int i = 0; i < srv.nclients; i++) {
        client_t *c = &srv.clients[i];
        *c = (client_t){.srv = &srv, .n = i};
        char id[32];
        int idlen = snprintf(id, sizeof id, "client-%d", i);
        c->sock = zmq_socket(srv.ctx, ZMQ_DEALER);
        zmq_setsockopt(c->sock, ZMQ_ROUTING_ID, id, (size_t)idlen);
        c->dealer = zev_stream_new(srv.loop, c->sock);
        /* Once a socket has a stream, connect through the stream. */
        if (!c->dealer || zev_stream_connect(c->dealer, "inproc://fiber-router")) {
            fprintf(stderr, "fiber_router: %s\n", zmq_strerror(errno));
            return 1;
        }
    }
    zev_fiber_t *m = zev_fiber_spawn(srv.loop, main_fiber, &srv, NULL);
    if (!m) {
        fprintf(stderr, "fiber_router: %s\n", zmq_strerror(errno));
        return 1;
    }
    zev_fiber_detach(m);
    zev_loop_run(srv.loop);

    int ok = 1;
    for (int i = 0; i < srv.nclients; i++) {
        client_t *c = &srv.clients[i];
        printf("client n=%d requests=%d replies=%d timeouts=%d late=%d bad=%d\n", c->n, srv.per,
               c->replies, c->timeouts, c->late, c->bad);
        ok &= c->replies + c->timeouts == srv.per && !c->bad;
    }
    for (int i = 0; i < srv.nsessions; i++)
        printf("session n=%d handled=%d end=%s\n", i, srv.sessions[i].handled,
               errno_name(srv.sessions[i].end));
    zev_loop_stats_t st;
    zev_loop_stats(srv.loop, &st);
    printf("server backend=%s clients=%d sessions=%d requests=%d replies=%d dispatcher_end=%s "
           "fibers_resumed=%llu\n",
           zev_loop_backend(srv.loop), srv.nclients, srv.nsessions, srv.requests, srv.replies,
           errno_name(srv.dispatcher_end), (unsigned long long)st.fibers_resumed);

    zev_loop_destroy(srv.loop); /* closes the streams still open, no socket */
    for (int i = 0; i < srv.nclients; i++)
        zmq_close(srv.clients[i].sock);
    zmq_close(router);
    zmq_ctx_term(srv.ctx);
    return ok ? 0 : 1;
}
