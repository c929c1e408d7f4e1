/*
 * Test-only kqueue emulation on epoll (Linux), so that backends/kqueue.c runs
 * the whole test suite here. Never shipped; built as libzev_kqueue_shim.a
 * when ZEV_KQUEUE_SHIM is on.
 *
 * Model: kqueue() returns an epoll fd. Each kq has a private table, indexed
 * by fd, holding the state of the two descriptor filters (present, enabled,
 * oneshot, clear, udata); the epoll registration of an fd is derived from it
 * (EPOLLIN if the read filter is present and enabled, EPOLLOUT likewise for
 * write). An fd with nothing enabled is kept out of epoll, which would
 * otherwise report EPOLLERR/EPOLLHUP for it forever. kevent() applies the
 * changelist in order, BSD-style, then waits in epoll_wait() and expands each
 * epoll event into up to two kevents (read first, then write).
 *
 * The table is found from the kq fd through a registry guarded by a mutex;
 * each kq has its own mutex, never held across epoll_wait(), so one thread
 * per kq plus others creating their own kqs (or changing a kq someone waits
 * on) is safe. Closing a kq is a plain close(): its slot goes stale and is
 * reset when kqueue() returns that number again.
 *
 * Departures from BSD, none of which backends/kqueue.c relies on:
 *   - only EVFILT_READ/EVFILT_WRITE on fds epoll accepts (not regular files:
 *     EV_ADD fails with EPERM); fflags and data are 0 on returned events;
 *   - EV_CLEAR is emulated with EPOLLET for the whole fd (if either present,
 *     enabled filter has it, both behave edge-triggered); an edge that did not
 *     fit in the eventlist is re-armed with EPOLL_CTL_MOD, which re-reports it
 *     only if the fd is still ready;
 *   - a successful EV_RECEIPT change with no room left in the eventlist is
 *     applied silently (FreeBSD would stop processing the changelist there);
 *   - BSD drops the knotes of an fd when it is closed; the shim notices only
 *     when a later change on that fd number fails with EBADF (the table entry
 *     is then reset), or when epoll reports the registration gone (ENOENT);
 *   - a wait whose epoll events are all filtered out (a change raced in from
 *     another thread) returns 0 early instead of waiting on.
 */
#include <sys/event.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

typedef struct shim_filter {
    bool present, enabled, oneshot, clear;
    void *udata;
} shim_filter_t;

typedef struct shim_fd {
    shim_filter_t f[2]; /* [0] = EVFILT_READ, [1] = EVFILT_WRITE */
    bool in_epoll;
} shim_fd_t;

typedef struct shim_kq {
    pthread_mutex_t lock;
    bool live;
    shim_fd_t *fds; /* indexed by fd */
    int nfds;
} shim_kq_t;

/* Slots are indexed by kq fd and never freed, so a pointer looked up once
 * stays valid even if the registry grows or the slot is reset. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static shim_kq_t **registry;
static int registry_len;

int kqueue(void)
{
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        return -1;
    pthread_mutex_lock(&registry_lock);
    if (epfd >= registry_len) {
        int len = registry_len ? registry_len : 64;
        while (len <= epfd)
            len *= 2;
        shim_kq_t **grown = realloc(registry, (size_t)len * sizeof *grown);
        if (!grown)
            goto nomem;
        memset(grown + registry_len, 0, (size_t)(len - registry_len) * sizeof *grown);
        registry = grown;
        registry_len = len;
    }
    if (!registry[epfd]) {
        shim_kq_t *kq = calloc(1, sizeof *kq);
        if (!kq)
            goto nomem;
        pthread_mutex_init(&kq->lock, NULL);
        registry[epfd] = kq;
    }
    shim_kq_t *kq = registry[epfd];
    /* A previous kq with this number was closed: forget its table. */
    pthread_mutex_lock(&kq->lock);
    free(kq->fds);
    kq->fds = NULL;
    kq->nfds = 0;
    kq->live = true;
    pthread_mutex_unlock(&kq->lock);
    pthread_mutex_unlock(&registry_lock);
    return epfd;
nomem:
    pthread_mutex_unlock(&registry_lock);
    close(epfd);
    errno = ENOMEM;
    return -1;
}

static shim_kq_t *lookup(int kqfd)
{
    shim_kq_t *kq = NULL;
    pthread_mutex_lock(&registry_lock);
    if (kqfd >= 0 && kqfd < registry_len && registry[kqfd] && registry[kqfd]->live)
        kq = registry[kqfd];
    pthread_mutex_unlock(&registry_lock);
    if (!kq)
        errno = EBADF;
    return kq;
}

/* The entry for fd, grown into existence if create; NULL otherwise. */
static shim_fd_t *slot(shim_kq_t *kq, int fd, bool create)
{
    if (fd < kq->nfds)
        return &kq->fds[fd];
    if (!create)
        return NULL;
    int len = kq->nfds ? kq->nfds : 64;
    while (len <= fd)
        len = len > INT_MAX / 2 ? INT_MAX : len * 2;
    shim_fd_t *grown = realloc(kq->fds, (size_t)len * sizeof *grown);
    if (!grown)
        return NULL;
    memset(grown + kq->nfds, 0, (size_t)(len - kq->nfds) * sizeof *grown);
    kq->fds = grown;
    kq->nfds = len;
    return &kq->fds[fd];
}

/* Brings epoll in line with the table entry; returns 0 or an errno. Always
 * issues the epoll_ctl (even for an unchanged mask): that re-arms EPOLLET
 * and re-registers an fd number whose old file epoll has dropped. */
static int sync_fd(int epfd, int fd, shim_fd_t *s)
{
    uint32_t mask = 0;
    bool edge = false;
    if (s->f[0].present && s->f[0].enabled) {
        mask |= EPOLLIN | EPOLLRDHUP;
        edge |= s->f[0].clear;
    }
    if (s->f[1].present && s->f[1].enabled) {
        mask |= EPOLLOUT;
        edge |= s->f[1].clear;
    }
    if (!mask) {
        if (s->in_epoll && epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &(struct epoll_event){0}) < 0 &&
            errno != ENOENT && errno != EBADF)
            return errno;
        s->in_epoll = false;
        return 0;
    }
    struct epoll_event ev = {.events = mask | (edge ? EPOLLET : 0u), .data.fd = fd};
    int op = s->in_epoll ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(epfd, op, fd, &ev) < 0) {
        if (!((op == EPOLL_CTL_MOD && errno == ENOENT) || (op == EPOLL_CTL_ADD && errno == EEXIST)))
            return errno;
        op = op == EPOLL_CTL_MOD ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
        if (epoll_ctl(epfd, op, fd, &ev) < 0)
            return errno;
    }
    s->in_epoll = true;
    return 0;
}

/* Applies one change; returns 0 or the errno BSD would give for it. */
static int apply(shim_kq_t *kq, int epfd, const struct kevent *ch)
{
    int fi;
    if (ch->filter == EVFILT_READ)
        fi = 0;
    else if (ch->filter == EVFILT_WRITE)
        fi = 1;
    else
        return EINVAL;
    if (ch->ident > (uintptr_t)INT_MAX)
        return EBADF;
    int fd = (int)ch->ident;
    if (fcntl(fd, F_GETFD) < 0) {
        /* Closed: BSD has dropped its knotes on close(), so do we. */
        shim_fd_t *old = slot(kq, fd, false);
        if (old)
            memset(old, 0, sizeof *old);
        return EBADF;
    }
    shim_fd_t *s = slot(kq, fd, (ch->flags & EV_ADD) != 0);
    if (!s)
        return (ch->flags & EV_ADD) ? ENOMEM : ENOENT;
    shim_fd_t saved = *s;
    shim_filter_t *f = &s->f[fi];
    if (ch->flags & EV_ADD) {
        if (!f->present)
            *f = (shim_filter_t){.present = true, .enabled = true};
        f->udata = ch->udata;
        f->oneshot = (ch->flags & EV_ONESHOT) != 0;
        f->clear = (ch->flags & EV_CLEAR) != 0;
    } else if (!f->present) {
        return ENOENT;
    }
    if (ch->flags & EV_ENABLE) /* wins over EV_DISABLE, as on FreeBSD */
        f->enabled = true;
    else if (ch->flags & EV_DISABLE)
        f->enabled = false;
    if (ch->flags & EV_DELETE)
        memset(f, 0, sizeof *f);
    int err = sync_fd(epfd, fd, s);
    if (err)
        *s = saved;
    return err;
}

/* kevent's timespec keeps its nanoseconds, as a real kqueue does: through
 * epoll_pwait2 where the C library has it, else rounded up to whole ms (a
 * wait never ends before the time asked for). */
static int wait_epoll(int epfd, struct epoll_event *evs, int n, const struct timespec *ts)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
    int rc = epoll_pwait2(epfd, evs, n, ts, NULL);
    if (rc >= 0 || errno != ENOSYS)
        return rc;
#endif
    int ms = -1;
    if (ts)
        ms = ts->tv_sec >= INT_MAX / 1000
                 ? INT_MAX
                 : (int)ts->tv_sec * 1000 + (int)((ts->tv_nsec + 999999L) / 1000000L);
    return epoll_wait(epfd, evs, n, ms);
}

/* Delivers filter fi of fd if epoll's events concern it and there is room.
 * Returns true if the filter was due but did not fit. */
static bool deliver(shim_fd_t *s, int fi, int fd, uint32_t e, struct kevent *eventlist,
                    int nevents, int *nout, bool *changed)
{
    static const uint32_t wants[2] = {EPOLLIN | EPOLLRDHUP, EPOLLOUT};
    shim_filter_t *f = &s->f[fi];
    if (!f->present || !f->enabled || !(e & (wants[fi] | EPOLLHUP | EPOLLERR)))
        return false;
    if (*nout >= nevents)
        return true;
    uint16_t flags = (uint16_t)((f->oneshot ? EV_ONESHOT : 0) | (f->clear ? EV_CLEAR : 0));
    if (e & (EPOLLHUP | EPOLLERR | (fi == 0 ? EPOLLRDHUP : 0u)))
        flags |= EV_EOF;
    EV_SET(&eventlist[(*nout)++], (uintptr_t)fd, fi == 0 ? EVFILT_READ : EVFILT_WRITE, flags, 0, 0,
           f->udata);
    if (f->oneshot) {
        memset(f, 0, sizeof *f);
        *changed = true;
    }
    return false;
}

int kevent(int kqfd, const struct kevent *changelist, int nchanges, struct kevent *eventlist,
           int nevents, const struct timespec *timeout)
{
    bool bad_ts = timeout && (timeout->tv_sec < 0 || timeout->tv_nsec < 0 ||
                              timeout->tv_nsec >= 1000000000L);
    if (nchanges < 0 || nevents < 0 || bad_ts) {
        errno = EINVAL;
        return -1;
    }
    if ((nchanges && !changelist) || (nevents && !eventlist)) {
        errno = EFAULT;
        return -1;
    }
    shim_kq_t *kq = lookup(kqfd);
    if (!kq)
        return -1;

    /* Changes, in order. As on BSD, a failed change (or any change with
     * EV_RECEIPT) is reported as an EV_ERROR entry while there is room, and
     * otherwise makes the call fail; reported errors end the call. */
    int nout = 0, nerrors = 0;
    pthread_mutex_lock(&kq->lock);
    for (int i = 0; i < nchanges; i++) {
        struct kevent ch = changelist[i]; /* eventlist may alias changelist */
        int err = apply(kq, kqfd, &ch);
        if (!err && !(ch.flags & EV_RECEIPT))
            continue;
        if (nout < nevents) {
            ch.flags = EV_ERROR;
            ch.data = err;
            eventlist[nout++] = ch;
            nerrors++;
        } else if (err) {
            pthread_mutex_unlock(&kq->lock);
            errno = err;
            return -1;
        }
    }
    pthread_mutex_unlock(&kq->lock);
    if (nerrors || nevents == 0)
        return nout;

    struct epoll_event evs[256];
    const int cap = (int)(sizeof evs / sizeof evs[0]);
    int n = wait_epoll(kqfd, evs, nevents < cap ? nevents : cap, timeout);
    if (n < 0)
        return -1;

    pthread_mutex_lock(&kq->lock);
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        shim_fd_t *s = slot(kq, fd, false);
        if (!s)
            continue;
        bool changed = false;
        bool missed = deliver(s, 0, fd, evs[i].events, eventlist, nevents, &nout, &changed);
        missed |= deliver(s, 1, fd, evs[i].events, eventlist, nevents, &nout, &changed);
        bool edge = (s->f[0].present && s->f[0].clear) || (s->f[1].present && s->f[1].clear);
        /* A level-triggered leftover is reported again by the next wait; an
         * edge must be re-armed. A failure here leaves the entry as it was. */
        if (changed || (missed && edge))
            (void)sync_fd(kqfd, fd, s);
    }
    pthread_mutex_unlock(&kq->lock);
    return nout;
}
