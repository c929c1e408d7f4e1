/*
 * marketdata: one publisher fanning ticks out to subscribers of different
 * speeds, where the slow one must not hold up the others.
 *
 * The publisher is an XPUB on the main thread's loop: it waits until all
 * three subscribers have subscribed (an XPUB sees the subscriptions), then
 * publishes a tick every 100 us (10 kHz) from a zev timer. Each subscriber
 * is a SUB with its own loop on its own thread. One is deliberately slow:
 * it spends 1 ms on every tick, ten times longer than the ticks come.
 *
 * libzmq gives every subscriber its own pipe with its own high-water mark,
 * and a PUB never blocks: once the slow subscriber's pipe is full, the
 * publisher drops that subscriber's ticks and goes on. So the fast
 * subscribers get every tick, at the publisher's rate and with a small
 * delay; the slow one sees gaps in the sequence numbers (counted as lost);
 * and memory stays flat however far behind the slow one falls.
 *
 * Prints a line for the publisher, one per subscriber and one for memory:
 *   publisher backend=epoll ticks=20000 seconds=2.04 rate_hz=9804
 *   client name=fast1 slow=0 received=20000 lost=0 rate_hz=9804 p50_us=30 p99_us=160 max_us=900
 *   client name=slow slow=1 received=1950 lost=8870 rate_hz=950 p50_us=1050000 ...
 *   memory rss_start_kb=9120 rss_end_kb=9132 growth_kb=12
 * latency is from the publisher's send to the subscriber's callback: for the
 * slow one, the time its ticks waited in its full pipe.
 *
 * Over tcp the kernel's socket buffers hold ticks too, on top of the
 * high-water marks: the slow subscriber then falls several seconds behind
 * before the publisher drops anything (bound them with ZMQ_SNDBUF and
 * ZMQ_RCVBUF, or give such a subscriber ZMQ_CONFLATE if the latest tick is
 * all it needs).
 *
 * Run: ./marketdata [seconds] [endpoint]   (default 2, inproc://marketdata)
 *      ./marketdata 10 tcp://127.0.0.1:*
 *      ZEV_BACKEND=poll ./marketdata       (any backend zev was built with)
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zev.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#define TICK_US 100       /* 10 kHz */
#define SLOW_WORK_US 1000 /* what the slow subscriber spends on each tick */
#define SLOW_RCVHWM 100   /* its pipe: the publisher's 1000 + these 100 ticks */
#define FAST_RCVHWM 20000 /* 2 s of ticks: a fast client descheduled a while loses none */
#define DRAIN_US 3000000  /* after the last tick, how long the fast ones may take */
#define NCLIENTS 3

static const char SYMBOL[] = "EURUSD";

/* A tick on the wire: [symbol][tick_t], a two-part message. */
typedef struct tick {
    uint64_t seq;
    uint64_t sent_ns; /* CLOCK_MONOTONIC at the send: same host, same clock */
    int64_t price;    /* in units of 1e-5 */
} tick_t;

typedef struct publisher publisher_t;

typedef struct client {
    const char *name;
    unsigned work_us; /* time spent on each tick: 0 for the fast ones */
    publisher_t *pub;
    zev_loop_t *loop; /* made and destroyed by main, run by the client's thread */
    pthread_t thread;
    int err;
    /* Results: written by the client's thread, read by main after the join. */
    uint64_t received, lost, first_seq, last_seq, first_ns, last_ns;
    uint32_t *latency_us; /* one entry per tick received */
} client_t;

struct publisher {
    void *ctx;
    char endpoint[256];
    zev_loop_t *loop;
    zev_stream_t *xpub;
    zev_timer_t *ticker;
    client_t clients[NCLIENTS];
    int subscribed, fast_left;
    uint64_t ticks, seq, first_ns, last_ns;
    int64_t price;
    long rss_start_kb, rss_end_kb;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void spend_us(unsigned us)
{
    struct timespec ts = {0, (long)us * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* The whole process's resident memory in KiB (Linux; 0 elsewhere). */
static long rss_kb(void)
{
    long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return 0;
    if (fscanf(f, "%ld %ld", &size, &resident) != 2)
        resident = 0;
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* -------------------------------------------------------------- subscribers */

static void client_finished(zev_loop_t *loop, void *arg);

static void on_tick(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    client_t *c = arg;
    tick_t t;
    if (zev_msg_parts(msg) != 2 || zev_msg_size(msg, 1) != sizeof t)
        return;
    memcpy(&t, zev_msg_data(msg, 1), sizeof t);
    uint64_t now = now_ns();

    if (c->received == 0) {
        c->first_seq = t.seq;
        c->first_ns = now;
    } else if (t.seq > c->last_seq + 1) {
        c->lost += t.seq - c->last_seq - 1; /* dropped for us at our high-water mark */
    }
    c->last_seq = t.seq;
    c->last_ns = now;
    c->latency_us[c->received++] = (uint32_t)((now - t.sent_ns) / 1000);

    if (c->work_us)
        spend_us(c->work_us);
    if (t.seq + 1 == c->pub->ticks) {
        zev_loop_stop(zev_stream_loop(s));
        /* The only way into another thread's loop: its callback queue. */
        zev_loop_add_callback(c->pub->loop, client_finished, c);
    }
}

static void *client_main(void *arg)
{
    client_t *c = arg;
    void *sub = zmq_socket(c->pub->ctx, ZMQ_SUB);
    zev_stream_t *s = NULL;
    int hwm = c->work_us ? SLOW_RCVHWM : FAST_RCVHWM;
    if (sub)
        zmq_setsockopt(sub, ZMQ_RCVHWM, &hwm, sizeof hwm); /* before connecting */
    if (sub && zmq_setsockopt(sub, ZMQ_SUBSCRIBE, SYMBOL, strlen(SYMBOL)) == 0 &&
        zmq_connect(sub, c->pub->endpoint) == 0)
        s = zev_stream_new(c->loop, sub);
    if (!s || zev_stream_on_recv(s, on_tick, c) < 0) {
        c->err = errno;
        zev_loop_add_callback(c->pub->loop, client_finished, c);
    } else {
        zev_loop_run(c->loop);  /* until the last tick, or until main stops it */
        zev_stream_close(s, 0); /* zev lets go of the socket: it can be closed */
    }
    if (sub)
        zmq_close(sub);
    return NULL;
}

/* ---------------------------------------------------------------- publisher */

static void stop_all(publisher_t *p)
{
    for (int i = 0; i < NCLIENTS; i++)
        zev_loop_stop(p->clients[i].loop); /* thread-safe; harmless if it stopped */
    zev_loop_stop(p->loop);
}

/* On the publisher's loop: a subscriber saw the last tick (or failed). */
static void client_finished(zev_loop_t *loop, void *arg)
{
    (void)loop;
    client_t *c = arg;
    if (c->err || (c->work_us == 0 && --c->pub->fast_left == 0))
        stop_all(c->pub); /* the slow one is not waited for */
}

static void drain_deadline(zev_timer_t *t, void *arg)
{
    (void)t;
    stop_all(arg);
}

static void publish(zev_timer_t *t, void *arg)
{
    publisher_t *p = arg;
    p->price += (int64_t)(rand() % 21) - 10;
    tick_t tick = {.seq = p->seq, .sent_ns = now_ns(), .price = p->price};
    zev_stream_send(p->xpub, SYMBOL, strlen(SYMBOL), ZMQ_SNDMORE);
    zev_stream_send(p->xpub, &tick, sizeof tick, 0); /* a PUB never says EAGAIN */

    if (p->seq == 0)
        p->first_ns = tick.sent_ns;
    if (p->seq == p->ticks / 4)
        p->rss_start_kb = rss_kb(); /* every thread is up and the slow pipe full */
    if (++p->seq == p->ticks) {
        p->last_ns = tick.sent_ns;
        p->rss_end_kb = rss_kb();
        zev_timer_cancel(t);
        zev_timer_start(p->loop, DRAIN_US, 0, drain_deadline, p);
    }
}

/* An XPUB receives its subscribers' (un)subscriptions: [1|0][topic]. */
static void on_subscription(zev_stream_t *s, zev_msg_t *msg, void *arg)
{
    (void)s;
    publisher_t *p = arg;
    const unsigned char *sub = zev_msg_data(msg, 0);
    if (zev_msg_size(msg, 0) < 1 || sub[0] != 1 || p->ticker)
        return;
    if (++p->subscribed == NCLIENTS) /* everyone listens: no tick is lost to joining late */
        p->ticker = zev_timer_start(p->loop, TICK_US, TICK_US, publish, p);
}

/* ------------------------------------------------------------------ summary */

static int by_value(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void print_client(const client_t *c)
{
    uint32_t *lat = c->latency_us;
    uint64_t n = c->received;
    qsort(lat, n, sizeof *lat, by_value);
    double secs = n > 1 ? (double)(c->last_ns - c->first_ns) / 1e9 : 0;
    printf("client name=%s slow=%d received=%llu lost=%llu rate_hz=%.0f p50_us=%u p99_us=%u "
           "max_us=%u\n",
           c->name, c->work_us > 0, (unsigned long long)n, (unsigned long long)c->lost,
           secs > 0 ? (double)(n - 1) / secs : 0, n ? lat[n / 2] : 0, n ? lat[n * 99 / 100] : 0,
           n ? lat[n - 1] : 0);
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 2;
    if (seconds <= 0 || seconds > 3600)
        seconds = 2;
    publisher_t p = {.price = 108000};
    p.ticks = (uint64_t)(seconds * 1e6 / TICK_US);
    snprintf(p.endpoint, sizeof p.endpoint, "%s", argc > 2 ? argv[2] : "inproc://marketdata");

#ifdef __linux__
    /* This thread sleeps 100 us at a time: let Linux end the sleeps on time
     * rather than up to 50 us late (see docs/design.md, Timers). */
    prctl(PR_SET_TIMERSLACK, 1);
#endif
    p.ctx = zmq_ctx_new();
    void *xpub = zmq_socket(p.ctx, ZMQ_XPUB);
    int verbose = 1; /* pass on every subscription, not only the first per topic */
    zmq_setsockopt(xpub, ZMQ_XPUB_VERBOSE, &verbose, sizeof verbose);
    size_t len = sizeof p.endpoint;
    if (zmq_bind(xpub, p.endpoint) || zmq_getsockopt(xpub, ZMQ_LAST_ENDPOINT, p.endpoint, &len)) {
        fprintf(stderr, "marketdata: bind %s: %s\n", p.endpoint, zmq_strerror(errno));
        return 1;
    }
    p.loop = zev_loop_new(NULL);
    if (!p.loop) {
        fprintf(stderr, "marketdata: %s\n", zmq_strerror(errno));
        return 1;
    }
    p.xpub = zev_stream_new(p.loop, xpub);
    zev_stream_on_recv(p.xpub, on_subscription, &p);

    const char *names[NCLIENTS] = {"fast1", "fast2", "slow"};
    for (int i = 0; i < NCLIENTS; i++) {
        client_t *c = &p.clients[i];
        *c = (client_t){.name = names[i], .pub = &p, .loop = zev_loop_new(NULL)};
        c->work_us = strcmp(c->name, "slow") == 0 ? SLOW_WORK_US : 0;
        p.fast_left += c->work_us == 0;
        c->latency_us = malloc(p.ticks * sizeof *c->latency_us);
        if (!c->loop || !c->latency_us) {
            fprintf(stderr, "marketdata: %s\n", zmq_strerror(errno));
            return 1;
        }
        /* Written now, so that filling it in later does not count as growth
         * (not with zeros: the compiler may turn that into a lazy calloc). */
        memset(c->latency_us, 0xff, p.ticks * sizeof *c->latency_us);
        pthread_create(&c->thread, NULL, client_main, c);
    }

    zev_loop_run(p.loop); /* until the fast clients have every tick */

    int failed = 0;
    for (int i = 0; i < NCLIENTS; i++) {
        pthread_join(p.clients[i].thread, NULL);
        zev_loop_destroy(p.clients[i].loop);
        if (p.clients[i].err) {
            fprintf(stderr, "marketdata: %s: %s\n", p.clients[i].name,
                    zmq_strerror(p.clients[i].err));
            failed = 1;
        }
    }
    double secs = (double)(p.last_ns - p.first_ns) / 1e9;
    printf("publisher backend=%s ticks=%llu seconds=%.2f rate_hz=%.0f\n", zev_loop_backend(p.loop),
           (unsigned long long)p.seq, secs, secs > 0 ? (double)(p.seq - 1) / secs : 0);
    for (int i = 0; i < NCLIENTS; i++) {
        print_client(&p.clients[i]);
        free(p.clients[i].latency_us);
    }
    printf("memory rss_start_kb=%ld rss_end_kb=%ld growth_kb=%ld\n", p.rss_start_kb, p.rss_end_kb,
           p.rss_end_kb - p.rss_start_kb);

    zev_loop_destroy(p.loop);
    zmq_close(xpub);
    zmq_ctx_term(p.ctx);
    return failed;
}
