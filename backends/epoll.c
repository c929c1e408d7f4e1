/*
 * epoll backend (Linux). Level-triggered; data rides in epoll_data.ptr, so
 * no fd-indexed table is needed.
 *
 * Timeouts keep their nanoseconds: epoll_pwait2 (Linux 5.11) takes a
 * timespec. On older kernels (ENOSYS), or with ZEV_EPOLL_PWAIT2=0 in the
 * environment (how the tests reach this path on a new kernel), a timed wait
 * arms a timerfd that sits in the set and waits without a timeout; the
 * timerfd's own event is consumed here and never reported.
 */
#include "backend.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

/* The fallback timerfd's token: no registration of the core's has it (the
 * core's tokens carry an fd that is >= 0 in their low 32 bits). */
#define TIMERFD_TOKEN UINT64_MAX

typedef struct epoll_state {
    int epfd;
    int tfd;         /* the fallback's timerfd, -1 until a timed wait needs it */
    bool use_pwait2; /* false once the kernel said ENOSYS (or the env said so) */
    struct epoll_event events[256];
} epoll_state_t;

static uint32_t to_epoll(int events)
{
    return ((events & ZEV_BE_READ) ? EPOLLIN : 0u) | ((events & ZEV_BE_WRITE) ? EPOLLOUT : 0u);
}

static void *epoll_init(void)
{
    epoll_state_t *st = malloc(sizeof *st);
    if (!st)
        return NULL;
    st->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (st->epfd < 0) {
        int err = errno;
        free(st);
        errno = err;
        return NULL;
    }
    st->tfd = -1;
    const char *env = getenv("ZEV_EPOLL_PWAIT2");
    st->use_pwait2 = !(env && strcmp(env, "0") == 0);
    return st;
}

static void epoll_destroy(void *state)
{
    epoll_state_t *st = state;
    if (st->tfd >= 0)
        close(st->tfd);
    close(st->epfd);
    free(st);
}

static int epoll_ctl_op(void *state, int op, int fd, int events, uint64_t token)
{
    epoll_state_t *st = state;
    struct epoll_event ev = {.events = to_epoll(events), .data.u64 = token};
    return epoll_ctl(st->epfd, op, fd, &ev);
}

static int epoll_remove(void *state, int fd)
{
    epoll_state_t *st = state;
    struct epoll_event ev = {0};
    /* A closed fd has already left the set: not an error for the core. */
    if (epoll_ctl(st->epfd, EPOLL_CTL_DEL, fd, &ev) < 0 && errno != EBADF && errno != ENOENT)
        return -1;
    return 0;
}

/* epoll reports EPOLLERR/EPOLLHUP even for an empty mask, which would make a
 * hung-up fd watched for nothing spin the loop; an fd with no events is
 * therefore kept out of the kernel set until it asks for some. */
static int epoll_add(void *state, int fd, int events, uint64_t token)
{
    if (!events)
        return 0;
    return epoll_ctl_op(state, EPOLL_CTL_ADD, fd, events, token);
}

static int epoll_modify(void *state, int fd, int events, uint64_t token)
{
    if (!events)
        return epoll_remove(state, fd);
    if (epoll_ctl_op(state, EPOLL_CTL_MOD, fd, events, token) == 0)
        return 0;
    return errno == ENOENT ? epoll_ctl_op(state, EPOLL_CTL_ADD, fd, events, token) : -1;
}

/* epoll_pwait2 through the C library where it has it (glibc 2.35), else the
 * raw system call where the kernel's timespec is the C library's (64-bit). */
static int pwait2(int epfd, struct epoll_event *ev, int n, const struct timespec *ts)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
    return epoll_pwait2(epfd, ev, n, ts, NULL);
#elif defined(SYS_epoll_pwait2) && UINTPTR_MAX == UINT64_MAX
    return (int)syscall(SYS_epoll_pwait2, epfd, ev, n, ts, NULL, 0);
#else
    (void)epfd, (void)ev, (void)n, (void)ts;
    errno = ENOSYS;
    return -1;
#endif
}

/* The fallback: the deadline goes to a timerfd in the set, the wait has
 * none. Returns epoll_wait's result. */
static int wait_with_timerfd(epoll_state_t *st, int64_t timeout_ns, int n)
{
    if (timeout_ns <= 0)
        return epoll_wait(st->epfd, st->events, n, timeout_ns < 0 ? -1 : 0);
    if (st->tfd < 0) {
        st->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (st->tfd < 0)
            return -1;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TIMERFD_TOKEN};
        if (epoll_ctl(st->epfd, EPOLL_CTL_ADD, st->tfd, &ev) < 0) {
            int err = errno;
            close(st->tfd);
            st->tfd = -1;
            errno = err;
            return -1;
        }
    }
    struct itimerspec its = {0};
    zev_be_timespec(timeout_ns, &its.it_value);
    if (timerfd_settime(st->tfd, 0, &its, NULL) < 0)
        return -1;
    int got = epoll_wait(st->epfd, st->events, n, -1);
    /* Woken by something else: disarm, or the set (zev_loop_fd, when
     * embedded) would turn readable later for a deadline nobody waits for. */
    its.it_value.tv_sec = 0;
    its.it_value.tv_nsec = 0;
    int err = errno;
    (void)timerfd_settime(st->tfd, 0, &its, NULL);
    errno = err;
    return got;
}

static int epoll_wait_fired(void *state, int64_t timeout_ns, zev_fired_t *out, int max)
{
    epoll_state_t *st = state;
    const int cap = (int)(sizeof st->events / sizeof st->events[0]);
    const int want = max < cap ? max : cap;
    int n = -1;
    if (st->use_pwait2) {
        struct timespec ts;
        n = pwait2(st->epfd, st->events, want, zev_be_timespec(timeout_ns, &ts));
        if (n < 0 && errno == ENOSYS)
            st->use_pwait2 = false;
    }
    if (!st->use_pwait2)
        n = wait_with_timerfd(st, timeout_ns, want);
    if (n < 0)
        return errno == EINTR ? 0 : -1;
    int filled = 0;
    for (int i = 0; i < n; i++) {
        if (st->events[i].data.u64 == TIMERFD_TOKEN) { /* the fallback's deadline */
            uint64_t expirations;
            (void)!read(st->tfd, &expirations, sizeof expirations);
            continue;
        }
        uint32_t e = st->events[i].events;
        int ev = 0;
        if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
            ev |= ZEV_BE_READ;
        if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            ev |= ZEV_BE_WRITE;
        out[filled].token = st->events[i].data.u64;
        out[filled].events = ev;
        filled++;
    }
    return filled;
}

static int epoll_pollable_fd(void *state)
{
    return ((epoll_state_t *)state)->epfd;
}

const zev_backend_ops_t zev__backend_epoll = {
    .name = "epoll",
    .init = epoll_init,
    .destroy = epoll_destroy,
    .add = epoll_add,
    .modify = epoll_modify,
    .remove = epoll_remove,
    .wait = epoll_wait_fired,
    .pollable_fd = epoll_pollable_fd,
};
