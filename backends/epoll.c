/*
 * epoll backend (Linux). Level-triggered; data rides in epoll_data.ptr, so
 * no fd-indexed table is needed.
 */
#include "backend.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

typedef struct epoll_state {
    int epfd;
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
    return st;
}

static void epoll_destroy(void *state)
{
    epoll_state_t *st = state;
    close(st->epfd);
    free(st);
}

static int epoll_ctl_op(void *state, int op, int fd, int events, void *data)
{
    epoll_state_t *st = state;
    struct epoll_event ev = {.events = to_epoll(events), .data.ptr = data};
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
static int epoll_add(void *state, int fd, int events, void *data)
{
    if (!events)
        return 0;
    return epoll_ctl_op(state, EPOLL_CTL_ADD, fd, events, data);
}

static int epoll_modify(void *state, int fd, int events, void *data)
{
    if (!events)
        return epoll_remove(state, fd);
    if (epoll_ctl_op(state, EPOLL_CTL_MOD, fd, events, data) == 0)
        return 0;
    return errno == ENOENT ? epoll_ctl_op(state, EPOLL_CTL_ADD, fd, events, data) : -1;
}

static int epoll_wait_fired(void *state, int timeout_ms, zev_fired_t *out, int max)
{
    epoll_state_t *st = state;
    const int cap = (int)(sizeof st->events / sizeof st->events[0]);
    int n = epoll_wait(st->epfd, st->events, max < cap ? max : cap, timeout_ms);
    if (n < 0)
        return errno == EINTR ? 0 : -1;
    for (int i = 0; i < n; i++) {
        uint32_t e = st->events[i].events;
        int ev = 0;
        if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
            ev |= ZEV_BE_READ;
        if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            ev |= ZEV_BE_WRITE;
        out[i].data = st->events[i].data.ptr;
        out[i].events = ev;
    }
    return n;
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
