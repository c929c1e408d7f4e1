/*
 * kqueue backend (macOS, the BSDs; on Linux only against the test shim in
 * tests/kqueue-shim). Level-triggered (no EV_CLEAR); data rides in udata.
 *
 * Every registered fd owns both an EVFILT_READ and an EVFILT_WRITE knote,
 * each enabled or disabled according to the mask, so modify is a single
 * kevent() call with a two-entry changelist and a silent fd (mask 0) costs
 * nothing: a disabled knote is never reported, not even for EOF.
 *
 * Registration errors: with EV_RECEIPT every change comes back as an
 * EV_ERROR entry whose data is 0 or the errno of that change, all changes
 * are applied, and the call returns without draining pending events. Where
 * EV_RECEIPT is missing the two changes go in one call each, so that a
 * failure makes kevent() return -1 with that change's errno.
 */
#include "backend.h"

#include <sys/types.h>
#include <sys/event.h>
#include <sys/time.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#ifdef EV_RECEIPT
#define KQ_RECEIPT EV_RECEIPT
#else
#define KQ_RECEIPT 0
#endif

typedef struct kqueue_state {
    int kqfd;
    pid_t pid; /* the process that made it: a kqueue is not inherited by fork */
    struct kevent events[256];
} kqueue_state_t;

static void *kqueue_init(void)
{
    kqueue_state_t *st = malloc(sizeof *st);
    if (!st)
        return NULL;
    st->kqfd = kqueue();
    if (st->kqfd < 0) {
        int err = errno;
        free(st);
        errno = err;
        return NULL;
    }
    /* A kqueue is not inherited by fork(); keep it out of exec'd children too. */
    (void)fcntl(st->kqfd, F_SETFD, FD_CLOEXEC);
    st->pid = getpid();
    return st;
}

static void kqueue_destroy(void *state)
{
    kqueue_state_t *st = state;
    /* In a forked child the number is not a kqueue of ours (a real kqueue
     * is not inherited) and may name a file the child opened since. */
    if (st->pid == getpid())
        close(st->kqfd);
    free(st);
}

/* Applies the two changes for fd (READ first, then WRITE) without waiting.
 * Stores each change's errno (0 = applied) in err[0..1] and returns 0, or
 * returns -1 with errno when the call itself failed. */
static int kqueue_apply(kqueue_state_t *st, const struct kevent ch[2], int err[2])
{
    static const struct timespec zero = {0, 0};
    err[0] = err[1] = 0;
#ifdef EV_RECEIPT
    struct kevent res[2];
    int n = kevent(st->kqfd, ch, 2, res, 2, &zero);
    if (n < 0)
        return -1;
    for (int i = 0; i < n; i++) {
        if ((res[i].flags & EV_ERROR) && res[i].data != 0)
            err[res[i].filter == EVFILT_READ ? 0 : 1] = (int)res[i].data;
    }
#else
    /* Without receipts the first failure would stop the changelist and hide
     * which change failed: apply them one by one instead. */
    for (int i = 0; i < 2; i++) {
        if (kevent(st->kqfd, &ch[i], 1, NULL, 0, &zero) < 0)
            err[i] = errno;
    }
#endif
    return 0;
}

static int kqueue_remove(void *state, int fd)
{
    kqueue_state_t *st = state;
    struct kevent ch[2];
    int err[2];
    EV_SET(&ch[0], (uintptr_t)fd, EVFILT_READ, EV_DELETE | KQ_RECEIPT, 0, 0, NULL);
    EV_SET(&ch[1], (uintptr_t)fd, EVFILT_WRITE, EV_DELETE | KQ_RECEIPT, 0, 0, NULL);
    if (kqueue_apply(st, ch, err) < 0)
        return -1;
    /* Closing an fd drops its knotes: EBADF / ENOENT mean "already gone". */
    for (int i = 0; i < 2; i++) {
        if (err[i] && err[i] != ENOENT && err[i] != EBADF) {
            errno = err[i];
            return -1;
        }
    }
    return 0;
}

/* Adds or updates both filters of fd. EV_ADD on an existing knote only
 * updates it (its enable state and udata), so the same call serves modify
 * and survives a knote the kernel dropped. Returns 0, or -1 with errno, with
 * each change's errno left in err[0..1]. */
static int kqueue_set(kqueue_state_t *st, int fd, int events, uint64_t token, int err[2])
{
    struct kevent ch[2];
    unsigned short rd = EV_ADD | KQ_RECEIPT | ((events & ZEV_BE_READ) ? EV_ENABLE : EV_DISABLE);
    unsigned short wr = EV_ADD | KQ_RECEIPT | ((events & ZEV_BE_WRITE) ? EV_ENABLE : EV_DISABLE);
    /* udata is a pointer's width: on 32-bit systems the token's high half
     * (the core's registration serial) is lost, which the core tolerates
     * (kqueue drops a closed fd's knotes, so no stale one can fire). */
    void *data = (void *)(uintptr_t)token;
    EV_SET(&ch[0], (uintptr_t)fd, EVFILT_READ, rd, 0, 0, data);
    EV_SET(&ch[1], (uintptr_t)fd, EVFILT_WRITE, wr, 0, 0, data);
    if (kqueue_apply(st, ch, err) < 0)
        return -1;
    /* FreeBSD refuses EVFILT_WRITE on a pipe whose reader is gone (EPIPE);
     * that only matters if writing was asked for. */
    if (err[1] == EPIPE && !(events & ZEV_BE_WRITE))
        err[1] = 0;
    if (!err[0] && !err[1])
        return 0;
    errno = err[0] ? err[0] : err[1];
    return -1;
}

static int kqueue_add(void *state, int fd, int events, uint64_t token)
{
    int err[2];
    if (kqueue_set(state, fd, events, token, err) == 0)
        return 0;
    /* Leave nothing half-registered behind. */
    int e = errno;
    if (!err[0] || !err[1])
        (void)kqueue_remove(state, fd);
    errno = e;
    return -1;
}

static int kqueue_modify(void *state, int fd, int events, uint64_t token)
{
    int err[2];
    return kqueue_set(state, fd, events, token, err);
}

static int kqueue_wait_fired(void *state, int64_t timeout_ns, zev_fired_t *out, int max)
{
    kqueue_state_t *st = state;
    const int cap = (int)(sizeof st->events / sizeof st->events[0]);
    struct timespec ts;
    if (max <= 0) {
        errno = EINVAL;
        return -1;
    }
    int n = kevent(st->kqfd, NULL, 0, st->events, max < cap ? max : cap,
                   zev_be_timespec(timeout_ns, &ts));
    if (n < 0)
        return errno == EINTR ? 0 : -1;
    int filled = 0;
    for (int i = 0; i < n; i++) {
        const struct kevent *kev = &st->events[i];
        int ev;
        /* EV_EOF / EV_ERROR arrive on the filter that was asked for: reporting
         * that filter's event lets the callback find out on its next I/O. */
        if (kev->filter == EVFILT_READ)
            ev = ZEV_BE_READ;
        else if (kev->filter == EVFILT_WRITE)
            ev = ZEV_BE_WRITE;
        else
            continue;
        /* Read and write of one fd usually come back side by side: merge. */
        uint64_t token = (uint64_t)(uintptr_t)kev->udata;
        if (filled > 0 && out[filled - 1].token == token) {
            out[filled - 1].events |= ev;
            continue;
        }
        out[filled].token = token;
        out[filled].events = ev;
        filled++;
    }
    return filled;
}

static int kqueue_pollable_fd(void *state)
{
    return ((kqueue_state_t *)state)->kqfd;
}

const zev_backend_ops_t zev__backend_kqueue = {
    .name = "kqueue",
    .init = kqueue_init,
    .destroy = kqueue_destroy,
    .add = kqueue_add,
    .modify = kqueue_modify,
    .remove = kqueue_remove,
    .wait = kqueue_wait_fired,
    .pollable_fd = kqueue_pollable_fd,
};
