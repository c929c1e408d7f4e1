/*
 * poll backend (everywhere). Level-triggered.
 *
 * Design notes:
 *   - The watched set is a dense `struct pollfd` array with a parallel `data`
 *     array, so poll() gets it as is and nothing is rebuilt per wait. An
 *     fd -> index map (grown by doubling on demand, -1 = absent) makes add,
 *     modify and remove O(1); remove fills the hole with the last entry.
 *   - An fd watched for nothing is parked as fd = -fd-1 (see park()); so is
 *     one that poll() reports POLLNVAL for (closed without being removed):
 *     it then goes silent, as it does in epoll and kqueue, whose kernels
 *     drop a closed fd, instead of spinning the loop. An update unparks it.
 *   - Timeouts keep their nanoseconds through ppoll where the platform has
 *     it; elsewhere they are rounded up to whole milliseconds.
 *   - poll() cannot say which entries fired without a scan; the scan starts
 *     where the last truncated one stopped, so with more than `max` ready fds
 *     every one is reported within a few waits instead of the first `max`
 *     forever.
 *   - pollable_fd (Linux): poll has no fd of its own, so a shadow epoll set
 *     is built the first time one is asked for and mirrors every later
 *     change. It watches exactly what wait() reports (including POLLPRI) so
 *     it is readable iff wait(0) would return something. Until it is asked
 *     for, nothing is mirrored and the backend costs no extra syscalls.
 *     Once it exists, fds epoll refuses (regular files: EPERM) can no longer
 *     be added: a silent gap in the mirror would be a missed wakeup.
 */
#include "backend.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

typedef struct poll_state {
    struct pollfd *pfds; /* dense, [0, count) in use */
    uint64_t *tokens;    /* parallel to pfds */
    int count, cap;
    int *map; /* fd -> index in pfds, -1 = absent */
    size_t mapcap;
    int next; /* where the next wait's scan starts, for fairness */
    int epfd; /* shadow epoll set for pollable_fd, -1 until asked for */
} poll_state_t;

static short to_poll(int events)
{
    /* POLLPRI too: some fds (sysfs, /proc/self/mounts) only ever signal that. */
    return (short)(((events & ZEV_BE_READ) ? POLLIN | POLLPRI : 0) |
                   ((events & ZEV_BE_WRITE) ? POLLOUT : 0));
}

static int from_poll(short events)
{
    return ((events & (POLLIN | POLLPRI)) ? ZEV_BE_READ : 0) |
           ((events & POLLOUT) ? ZEV_BE_WRITE : 0);
}

/* poll() reports POLLHUP/POLLERR/POLLNVAL even with events = 0, and returns at
 * once when it does: filtering them out afterwards would still spin the loop
 * on a hung-up fd watched for nothing. A negative fd is skipped by poll()
 * altogether, so a silent fd is parked as -fd-1 (not -fd: fd 0 must park
 * too) and keeps its slot, which keeps modify O(1). */
static int park(int fd, int events)
{
    return events ? fd : -fd - 1;
}

static int lookup(const poll_state_t *st, int fd)
{
    return (fd >= 0 && (size_t)fd < st->mapcap) ? st->map[fd] : -1;
}

#ifdef __linux__
/* Moves fd's registration in the shadow set from `old` to `events`. An fd
 * watched for nothing is kept out of it: epoll, like poll, reports errors and
 * hang-ups for an empty mask, which would leave the pollable fd readable. */
static int mirror(poll_state_t *st, int fd, int old, int events)
{
    if (st->epfd < 0 || (!old && !events))
        return 0;
    struct epoll_event ev = {.data.fd = fd};
    ev.events = ((events & ZEV_BE_READ) ? EPOLLIN | EPOLLPRI : 0u) |
                ((events & ZEV_BE_WRITE) ? EPOLLOUT : 0u);
    int op = !events ? EPOLL_CTL_DEL : old ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(st->epfd, op, fd, &ev) == 0)
        return 0;
    /* A closed fd has already left the set (epoll drops it on last close). */
    if (op == EPOLL_CTL_DEL)
        return (errno == EBADF || errno == ENOENT) ? 0 : -1;
    /* The kernel's set can disagree with ours when an fd was closed and its
     * number reused (or dup2'd over) behind our back: try the other op. */
    if ((op == EPOLL_CTL_MOD && errno == ENOENT) || (op == EPOLL_CTL_ADD && errno == EEXIST))
        return epoll_ctl(st->epfd, op == EPOLL_CTL_MOD ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev);
    return -1;
}
#else
static int mirror(poll_state_t *st, int fd, int old, int events)
{
    (void)st, (void)fd, (void)old, (void)events;
    return 0;
}
#endif

static void *poll_init(void)
{
    poll_state_t *st = calloc(1, sizeof *st);
    if (!st) {
        errno = ENOMEM;
        return NULL;
    }
    st->epfd = -1;
    return st;
}

static void poll_destroy(void *state)
{
    poll_state_t *st = state;
    if (st->epfd >= 0)
        close(st->epfd);
    free(st->pfds);
    free(st->tokens);
    free(st->map);
    free(st);
}

/* Makes room for fd in the map and for one more entry, before anything is
 * changed, so a failed add leaves the state as it was. */
static int reserve(poll_state_t *st, int fd)
{
    if ((size_t)fd >= st->mapcap) {
        size_t cap = st->mapcap ? st->mapcap : 64;
        while (cap <= (size_t)fd)
            cap *= 2;
        int *map = realloc(st->map, cap * sizeof *map);
        if (!map)
            goto nomem;
        for (size_t i = st->mapcap; i < cap; i++)
            map[i] = -1;
        st->map = map;
        st->mapcap = cap;
    }
    if (st->count == st->cap) {
        size_t cap = st->cap ? (size_t)st->cap * 2 : 16;
        struct pollfd *pfds = realloc(st->pfds, cap * sizeof *pfds);
        if (!pfds)
            goto nomem;
        st->pfds = pfds; /* the larger block is kept even if the next fails */
        uint64_t *tokens = realloc(st->tokens, cap * sizeof *tokens);
        if (!tokens)
            goto nomem;
        st->tokens = tokens;
        st->cap = (int)cap;
    }
    return 0;
nomem:
    errno = ENOMEM;
    return -1;
}

static int poll_add(void *state, int fd, int events, uint64_t token)
{
    poll_state_t *st = state;
    if (fd < 0) {
        errno = EBADF;
        return -1;
    }
    if (lookup(st, fd) >= 0) {
        errno = EEXIST;
        return -1;
    }
    if (reserve(st, fd) < 0 || mirror(st, fd, 0, events) < 0)
        return -1;
    int i = st->count++;
    st->pfds[i] = (struct pollfd){.fd = park(fd, events), .events = to_poll(events)};
    st->tokens[i] = token;
    st->map[fd] = i;
    return 0;
}

static int poll_modify(void *state, int fd, int events, uint64_t token)
{
    poll_state_t *st = state;
    int i = lookup(st, fd);
    if (i < 0) {
        errno = ENOENT;
        return -1;
    }
    if (mirror(st, fd, from_poll(st->pfds[i].events), events) < 0)
        return -1;
    st->pfds[i].fd = park(fd, events);
    st->pfds[i].events = to_poll(events);
    st->tokens[i] = token;
    return 0;
}

static int poll_remove(void *state, int fd)
{
    poll_state_t *st = state;
    int i = lookup(st, fd);
    if (i < 0) {
        errno = ENOENT;
        return -1;
    }
    if (mirror(st, fd, from_poll(st->pfds[i].events), 0) < 0)
        return -1;
    int last = --st->count;
    if (i != last) {
        st->pfds[i] = st->pfds[last];
        st->tokens[i] = st->tokens[last];
        int moved = st->pfds[i].fd;
        st->map[moved >= 0 ? moved : -moved - 1] = i;
    }
    st->map[fd] = -1;
    return 0;
}

static int poll_wait(void *state, int64_t timeout_ns, zev_fired_t *out, int max)
{
    poll_state_t *st = state;
    if (max <= 0) {
        errno = EINVAL;
        return -1;
    }
#ifdef ZEV_HAVE_PPOLL
    struct timespec ts;
    int ready = ppoll(st->pfds, (nfds_t)st->count, zev_be_timespec(timeout_ns, &ts), NULL);
#else
    int ready = poll(st->pfds, (nfds_t)st->count, zev_be_ms(timeout_ns));
#endif
    if (ready < 0)
        return errno == EINTR ? 0 : -1;
    int n = 0;
    int start = st->next < st->count ? st->next : 0;
    for (int k = 0; k < st->count && ready > 0 && n < max; k++) {
        int i = (start + k) % st->count;
        short re = st->pfds[i].revents;
        if (!re)
            continue;
        ready--;
        if (re & POLLNVAL) { /* closed without remove: silent from now on */
            st->pfds[i].fd = -st->pfds[i].fd - 1;
            continue;
        }
        int asked = from_poll(st->pfds[i].events);
        int ev = from_poll(re);
        if (re & (POLLERR | POLLHUP))
            ev |= ZEV_BE_READ | ZEV_BE_WRITE;
        ev &= asked;
        if (!ev)
            continue;
        out[n].token = st->tokens[i];
        out[n].events = ev;
        if (++n == max)
            st->next = (i + 1) % st->count; /* truncated: the rest go first next time */
    }
    return n;
}

static int poll_pollable_fd(void *state)
{
#ifdef __linux__
    poll_state_t *st = state;
    if (st->epfd >= 0)
        return st->epfd;
    st->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (st->epfd < 0)
        return -1;
    for (int i = 0; i < st->count; i++) {
        const struct pollfd *p = &st->pfds[i];
        if (p->fd >= 0 && mirror(st, p->fd, 0, from_poll(p->events)) < 0) {
            int err = errno;
            close(st->epfd);
            st->epfd = -1;
            errno = err;
            return -1;
        }
    }
    return st->epfd;
#else
    (void)state;
    errno = ENOTSUP;
    return -1;
#endif
}

const zev_backend_ops_t zev__backend_poll = {
    .name = "poll",
    .init = poll_init,
    .destroy = poll_destroy,
    .add = poll_add,
    .modify = poll_modify,
    .remove = poll_remove,
    .wait = poll_wait,
    .pollable_fd = poll_pollable_fd,
};
