/*
 * fd watchers: level-triggered readiness callbacks on plain fds.
 *
 * Design notes
 * - A stopped watcher leaves the backend and the fd map at once, so its fd
 *   may be watched again right away, but its memory lives until the end of
 *   the iteration when it is stopped from inside one: the backend's fired
 *   list of this iteration may still point at it, and dispatch skips
 *   inactive watchers. That is what makes "stop another watcher whose event
 *   is already pending" safe.
 */
#include "zev-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>

static int valid_events(int events)
{
    return (events & ~(ZEV_READ | ZEV_WRITE)) == 0;
}

zev_io_t *zev_io_start(zev_loop_t *loop, int fd, int events, zev_io_fn fn, void *arg)
{
    ZEV__LOOP_THREAD(loop);
    if (!loop || !fn || !valid_events(events)) {
        errno = EINVAL;
        return NULL;
    }
    if (fd < 0 || fcntl(fd, F_GETFD) < 0) {
        errno = EBADF;
        return NULL;
    }
    zev_io_t *io = calloc(1, sizeof *io);
    if (!io) {
        errno = ENOMEM;
        return NULL;
    }
    io->kind = ZEV__H_IO;
    io->loop = loop;
    io->fd = fd;
    io->events = events;
    io->fn = fn;
    io->arg = arg;
    if (zev__register(loop, fd, events, io) < 0) {
        int err = errno;
        free(io);
        errno = err;
        return NULL;
    }
    io->active = true;
    loop->nios++;
    zev__list_push_tail(&loop->ios, &io->node);
    return io;
}

int zev_io_update(zev_io_t *io, int events)
{
    if (!io || !io->active || !valid_events(events)) {
        errno = EINVAL;
        return -1;
    }
    ZEV__LOOP_THREAD(io->loop);
    if (zev__reregister(io->loop, io->fd, events) < 0)
        return -1;
    io->events = events;
    return 0;
}

int zev_io_stop(zev_io_t *io)
{
    if (!io || !io->active) {
        errno = EINVAL;
        return -1;
    }
    ZEV__LOOP_THREAD(io->loop);
    zev_loop_t *loop = io->loop;
    zev__unregister(loop, io->fd);
    loop->nios--;
    io->active = false;
    zev__list_remove(&io->node);
    if (loop->depth)
        zev__list_push_tail(&loop->closing_ios, &io->node);
    else
        free(io);
    return 0;
}

void zev__io_dispatch(zev_io_t *io, int events)
{
    events &= io->events;
    if (io->active && events) {
        zev_loop_t *loop = io->loop;
        uint64_t t0 = zev__watch_begin(loop);
        io->fn(io, io->fd, events, io->arg);
        zev__watch_end(loop, t0, ZEV_SLOW_IO, io, NULL); /* io may be stopped: only its address */
    }
}

void zev__io_reap(zev_loop_t *loop)
{
    zev__list_t *n;
    while ((n = zev__list_pop_head(&loop->closing_ios)))
        free(zev__container_of(n, zev_io_t, node));
}

void zev__io_free_all(zev_loop_t *loop)
{
    zev__list_t *n;
    while ((n = zev__list_pop_head(&loop->ios))) {
        zev_io_t *io = zev__container_of(n, zev_io_t, node);
        zev__unregister(loop, io->fd);
        loop->nios--;
        free(io);
    }
    zev__io_reap(loop);
}
