/*
 * The backend contract: the only thing the core knows about the OS's
 * readiness API. A backend is one file implementing the ops table below over
 * a private state struct; the core never includes <sys/epoll.h> or
 * <sys/event.h>.
 *
 * Semantics every backend keeps:
 *   - level-triggered: an fd that stays ready is reported by every wait;
 *   - an fd is registered at most once (the core checks, the backend may
 *     assume it); `token` is opaque and is handed back in fired entries.
 *     It is a number, not a pointer: a kernel registration can outlive the
 *     core's (epoll keeps one while the file lives on through a dup or a
 *     forked child, even after the fd number is closed), and what comes
 *     back from it must not reach freed memory; the core looks the token up
 *     and ignores one it no longer knows;
 *   - events are ZEV_BE_READ | ZEV_BE_WRITE; registering with 0 events keeps
 *     the fd known but silent; errors and hang-ups are reported as both
 *     READ and WRITE of what was asked for, so the callback finds out;
 *   - wait reports at most `max` entries; the same data may appear twice in
 *     one wait (kqueue reports read and write separately); the core copes;
 *   - all functions return 0 / a count on success, -1 with errno on failure.
 *     errno after a success is not the backend's concern (epoll's modify
 *     may see ENOENT and then add): the core restores the caller's.
 */
#ifndef ZEV_BACKEND_H
#define ZEV_BACKEND_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

enum { ZEV_BE_READ = 1, ZEV_BE_WRITE = 2 };

typedef struct zev_fired {
    uint64_t token; /* what add() was given */
    int events;     /* ZEV_BE_READ | ZEV_BE_WRITE */
} zev_fired_t;

typedef struct zev_backend_ops {
    const char *name;
    /* Creates the private state; NULL with errno on failure. */
    void *(*init)(void);
    /* Frees the state; registered fds are not touched (the core removed them). */
    void (*destroy)(void *state);
    /* Starts watching fd for events, handing token back when it fires. */
    int (*add)(void *state, int fd, int events, uint64_t token);
    /* Changes the events watched for a registered fd. */
    int (*modify)(void *state, int fd, int events, uint64_t token);
    /* Stops watching fd. The fd may already be closed: that is not an error. */
    int (*remove)(void *state, int fd);
    /* Waits up to timeout_ns (-1 = forever, 0 = poll) and fills out[0..max).
     * Returns the number filled (0 on timeout or EINTR). The wait keeps the
     * precision the OS offers (epoll_pwait2, ppoll, kevent take a timespec):
     * rounding a timeout up to whole milliseconds would make every timer
     * shorter than that run late by up to a millisecond. */
    int (*wait)(void *state, int64_t timeout_ns, zev_fired_t *out, int max);
    /* A pollable fd that is readable while some registered fd is ready, for
     * embedding the loop in a host loop; -1 with ENOTSUP if the backend
     * cannot give one on this platform. Owned by the backend. */
    int (*pollable_fd)(void *state);
} zev_backend_ops_t;

/* timeout_ns as a timespec for the OS's wait; NULL for -1 (forever). */
static inline struct timespec *zev_be_timespec(int64_t timeout_ns, struct timespec *ts)
{
    if (timeout_ns < 0)
        return NULL;
    ts->tv_sec = (time_t)(timeout_ns / 1000000000);
    ts->tv_nsec = (long)(timeout_ns % 1000000000);
    return ts;
}

/* timeout_ns in whole milliseconds, rounded up (never early), for OS waits
 * that take nothing finer. */
static inline int zev_be_ms(int64_t timeout_ns)
{
    if (timeout_ns < 0)
        return -1;
    int64_t ms = (timeout_ns + 999999) / 1000000;
    return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

/* One per backend file; each is compiled only where the platform has it
 * (ZEV_HAVE_EPOLL, ZEV_HAVE_KQUEUE; poll everywhere). */
extern const zev_backend_ops_t zev__backend_epoll;
extern const zev_backend_ops_t zev__backend_kqueue;
extern const zev_backend_ops_t zev__backend_poll;

#endif /* ZEV_BACKEND_H */
