/*
 * Test-only <sys/event.h> for Linux: the kqueue API, emulated on epoll by
 * kqueue_shim.c, so backends/kqueue.c can be built and tested here. Only the
 * descriptor filters are provided (EVFILT_READ, EVFILT_WRITE); constants
 * have their BSD values. Never shipped: see ZEV_KQUEUE_SHIM.
 */
#ifndef ZEV_KQUEUE_SHIM_SYS_EVENT_H
#define ZEV_KQUEUE_SHIM_SYS_EVENT_H

#include <stdint.h>
#include <time.h>

struct kevent {
    uintptr_t ident; /* file descriptor */
    int16_t filter;  /* EVFILT_* */
    uint16_t flags;  /* EV_* */
    uint32_t fflags; /* filter flags (unused by the shim) */
    intptr_t data;   /* errno for EV_ERROR entries, else 0 */
    void *udata;     /* opaque, handed back with events */
};

#define EV_SET(kevp, a, b, c, d, e, f)                                                             \
    do {                                                                                           \
        struct kevent *ev_set_kevp_ = (kevp);                                                      \
        ev_set_kevp_->ident = (a);                                                                 \
        ev_set_kevp_->filter = (b);                                                                \
        ev_set_kevp_->flags = (c);                                                                 \
        ev_set_kevp_->fflags = (d);                                                                \
        ev_set_kevp_->data = (e);                                                                  \
        ev_set_kevp_->udata = (f);                                                                 \
    } while (0)

#define EVFILT_READ (-1)
#define EVFILT_WRITE (-2)

#define EV_ADD 0x0001     /* add the filter (implies enable) or update it */
#define EV_DELETE 0x0002  /* remove the filter */
#define EV_ENABLE 0x0004  /* report it */
#define EV_DISABLE 0x0008 /* keep it, but do not report it */
#define EV_ONESHOT 0x0010 /* remove it once it has been reported */
#define EV_CLEAR 0x0020   /* edge-triggered (emulated with EPOLLET, see the shim) */
#define EV_RECEIPT 0x0040 /* always return an EV_ERROR entry for this change */
#define EV_EOF 0x8000     /* returned: hang-up or error on the fd */
#define EV_ERROR 0x4000   /* returned: data holds the change's errno (0 = done) */

int kqueue(void);
int kevent(int kq, const struct kevent *changelist, int nchanges, struct kevent *eventlist,
           int nevents, const struct timespec *timeout);

#endif /* ZEV_KQUEUE_SHIM_SYS_EVENT_H */
