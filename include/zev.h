/*
 * zev — one native event loop for ZeroMQ sockets, file descriptors, timers
 * and cross-thread callbacks.
 *
 * Conventions (as libzmq's, since zev users are libzmq users):
 *   - functions return 0 (or a count, or a pointer) on success and -1 (or
 *     NULL) with errno set on failure; zmq_strerror(errno) describes it; a
 *     call that succeeds leaves errno as it found it;
 *   - bad input never aborts: a NULL handle gives EINVAL, a handle used after
 *     close gives EBADF, bad flags give EINVAL; predicates (1 / 0) and
 *     getters that return a value also set EINVAL for a NULL handle;
 *   - every function except zev_loop_add_callback, zev_loop_post,
 *     zev_loop_stop, zev_frame_release, the other zev_frame_* accessors and
 *     zev_tracker_done must be called on the loop's thread (the thread that
 *     runs it, or any one thread while it is not running); fibers run on
 *     that thread, so a fiber may call them too. Builds configured with
 *     -DZEV_THREAD_CHECKS=ON (the default for CMAKE_BUILD_TYPE=Debug)
 *     catch a call from another thread while the loop runs: they print the
 *     function's name and both threads to stderr and abort. Other builds
 *     do not check;
 *   - handles are opaque. Timers and kept frames come from pools, and their
 *     handles carry a generation: using one after its timer or frame ended
 *     (a cancel after the one-shot fired, a second release) fails with
 *     EINVAL and never touches whatever reuses the slot, however often it
 *     was reused, as long as the loop (for frames, any frame of the loop)
 *     still exists. (A pool slot is retired when its handles would repeat,
 *     after 524,288 reuses: about 150 bytes kept until the loop goes, per
 *     half a million timers or kept frames through one slot. On 32-bit
 *     platforms a handle is the bare address, and only a use while its slot
 *     is still free is detected.) Other handles whose lifetime has ended
 *     (a stopped io watcher, a stream after its close callback returned, a
 *     released tracker, a destroyed loop) are dangling pointers, exactly as
 *     after free(): zev cannot detect that use.
 */
#ifndef ZEV_H
#define ZEV_H

#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(ZEV_STATIC) || !defined(__GNUC__)
#define ZEV_API
#else
#define ZEV_API __attribute__((visibility("default")))
#endif

#define ZEV_VERSION_MAJOR 0
#define ZEV_VERSION_MINOR 1
#define ZEV_VERSION_PATCH 0

/* The version of the libzev the program runs with, as zmq_version: stores
 * it in *major, *minor and *patch; any of them may be NULL. A program linked
 * against libzev.so can compare it with the ZEV_VERSION_* it was compiled
 * with to catch a mismatched library at start. Callable from any thread,
 * before any loop exists. Returns 0; it cannot fail. */
ZEV_API int zev_version(int *major, int *minor, int *patch);

typedef struct zev_loop zev_loop_t;
typedef struct zev_stream zev_stream_t;
typedef struct zev_timer zev_timer_t;
typedef struct zev_io zev_io_t;
typedef struct zev_msg zev_msg_t;
typedef struct zev_frame zev_frame_t;
typedef struct zev_tracker zev_tracker_t;
typedef struct zev_fiber zev_fiber_t;

typedef struct zev_loop_opts {
    const char *backend; /* "epoll" | "kqueue" | "poll" | NULL: $ZEV_BACKEND, else best */
    unsigned batch;      /* per-stream messages per iteration; 0 = 64 */
    unsigned spin_us;    /* busy-poll this long before blocking; 0 = off */
} zev_loop_opts_t;

enum { ZEV_READ = 1, ZEV_WRITE = 2 };               /* io events and flush flags */
enum { ZEV_CLOSE_SOCKET = 1, ZEV_CLOSE_FLUSH = 2 }; /* zev_stream_close flags */

typedef void (*zev_cb_fn)(zev_loop_t *loop, void *arg);
typedef void (*zev_timer_fn)(zev_timer_t *t, void *arg);
typedef void (*zev_io_fn)(zev_io_t *io, int fd, int events, void *arg);
typedef void (*zev_recv_fn)(zev_stream_t *s, zev_msg_t *msg, void *arg);
/* seq: the message's number, as zev_stream_send_seq gave it */
typedef void (*zev_send_fn)(zev_stream_t *s, uint64_t seq, int status, void *arg);
typedef void (*zev_close_fn)(zev_stream_t *s, void *arg);
typedef void (*zev_frame_fn)(zev_stream_t *s, size_t size, void *arg);
typedef void (*zev_free_fn)(void *data, void *hint);
typedef void (*zev_tracker_fn)(zev_tracker_t *t, void *arg);

/* ------------------------------------------------------------------ loop */

/* Creates a loop. opts may be NULL. The backend is opts->backend, else the
 * environment variable ZEV_BACKEND, else the best one compiled in (epoll,
 * then kqueue, then poll). A name that is unknown or not compiled in fails
 * with ENOTSUP: there is never a silent fallback.
 * Ownership: the caller owns the loop and frees it with zev_loop_destroy.
 * Errors: NULL with ENOTSUP (backend), ENOMEM, EMFILE (no fd for the wakeup). */
ZEV_API zev_loop_t *zev_loop_new(const zev_loop_opts_t *opts);

/* Destroys the loop and everything still registered on it: open streams are
 * closed as zev_stream_close(s, 0) would (queued sends reported ECANCELED,
 * close callbacks run once; sockets are closed only for streams closed with
 * ZEV_CLOSE_SOCKET), io watchers and timers are freed; callbacks still
 * queued by zev_loop_add_callback are dropped without running, and posts
 * still queued (zev_loop_post) run once with loop == NULL, on this thread,
 * before it returns (also a post queued behind a frame release that another
 * thread is making at that moment); zev_stream_new from those close (or send)
 * callbacks fails with EBUSY. Kept frames and trackers stay valid and may be
 * released later from any thread. Must not be called from inside one of the
 * loop's callbacks (it is then refused: -1 with EBUSY, the loop keeps
 * running). Returns 0; NULL is ignored (0). Timers are freed, the ones the
 * user owns (zev_timer_new) included; their handles are stale afterwards.
 * fork: a child process shares the parent's epoll or kqueue instance (and,
 * once zev_loop_fd was asked for, the poll backend's embedding set), and
 * libzmq sockets cannot be used across fork at all. The only thing a child
 * may do with a loop it inherited is zev_loop_destroy: it then frees the
 * memory and closes the loop's own descriptors, but unregisters nothing from
 * the kernel objects it shares with the parent (which would silence the
 * parent's watchers) and closes no socket, even for ZEV_CLOSE_SOCKET; the
 * callbacks run as described above. A child forked while another thread was
 * running the loop holds a copy taken in the middle of an iteration: there
 * destroy refuses (-1/EBUSY, as from inside the loop) and the child must
 * leave the copy alone (exec or _exit, as POSIX asks of a child of a
 * threaded process anyway). A child that needs a loop makes its own, as
 * libuv advises. */
ZEV_API int zev_loop_destroy(zev_loop_t *loop);

/* Runs iterations until zev_loop_stop. Returns 0 after a stop, -1 with EINVAL
 * (NULL), EBUSY (called from one of this loop's callbacks) or the backend's
 * errno if waiting failed. With nothing registered it blocks until stopped.
 * A stop requested before run makes run return at once. Either way the
 * request is consumed: the next run or run_once starts afresh. */
ZEV_API int zev_loop_run(zev_loop_t *loop);

/* Runs one iteration, one full turn as libuv's UV_RUN_ONCE: due timers,
 * queued callbacks, ready streams, the wait, ready fds, and, if it waited,
 * the timers that became due meanwhile (so a run_once(-1) that blocked for a
 * timer has run it when it returns). timeout_ms bounds the wait: -1 blocks
 * until something happens, 0 does not wait; if timers, queued callbacks or
 * streams already ran callbacks in this iteration it does not block at all,
 * so `while (!done) zev_loop_run_once(loop, -1);` always makes progress. A
 * zev_loop_stop requested before or during the call is consumed when it
 * returns. Returns 1 if the loop still has work pending (as
 * zev_loop_timeout == 0 would say), 0 otherwise, -1 with EINVAL / EBUSY or
 * the backend's errno. */
ZEV_API int zev_loop_run_once(zev_loop_t *loop, int timeout_ms);

/* Asks the loop to stop: zev_loop_run returns after the current iteration
 * (zev_loop_run_once returns anyway; it consumes the request too).
 * Thread-safe, async-safe with respect to the loop; callable from callbacks. */
ZEV_API void zev_loop_stop(zev_loop_t *loop);

/* The backend's name ("epoll", "kqueue", "poll"); NULL with EINVAL for NULL. */
ZEV_API const char *zev_loop_backend(const zev_loop_t *loop);

/* A file descriptor for embedding zev in a host loop (libuv, libev, tornado):
 * it is readable while the loop has work (ready fds or streams, queued
 * callbacks, due timers) and not while it is idle; the host then calls
 * zev_loop_run_once(loop, 0). That holds also for work the host's own code
 * makes between iterations: a send, a new stream, on_recv set, a close, a
 * timer started or cancelled. Owned by the loop: do not close or read it.
 * Due timers make it readable on Linux (a timerfd, to the nanosecond);
 * elsewhere the host must also honour zev_loop_timeout.
 * Not a plain getter: the first call switches the loop to embedded mode for
 * good (it creates the timerfd and from then on keeps the fd's readiness
 * exact, at the cost of a wakeup write when host code makes work and a
 * timerfd re-arm when the next deadline changes). Later calls return the
 * same fd. Errors: -1 with EINVAL, ENOTSUP (a backend with no pollable fd on
 * this platform), EMFILE/ENOMEM (the timerfd). */
ZEV_API int zev_loop_fd(zev_loop_t *loop);

/* Milliseconds until the loop next needs to run, rounded up (a host that
 * waits this long is never early): 0 when work is pending, -1 when nothing
 * is scheduled (no timers, or only timers at the end of time; or for a NULL
 * loop, errno EINVAL). Loop thread (the host's thread, in embedded mode). */
ZEV_API int zev_loop_timeout(const zev_loop_t *loop);

/* --------------------------------------------------------- loop statistics */

/* What the loop did since it was made (or last reset). The counters cost an
 * increment each and are always on; the timing fields need the clock around
 * every callback and are kept only while timing is on (zev_loop_set_timing,
 * or a slow-callback hook is set): 0 otherwise. */
typedef struct zev_loop_stats {
    uint64_t iterations;     /* iterations run */
    uint64_t wakeups;        /* waits in the backend that returned ready fds */
    uint64_t callbacks;      /* cross-thread callbacks and posts run */
    uint64_t timers_fired;   /* timer callbacks run */
    uint64_t stream_passes;  /* streams served from the ready-list */
    uint64_t fibers_resumed; /* fiber resumes */
    size_t ready_peak;       /* the most streams on the ready-list at a phase 3 */
    size_t callbacks_peak;   /* the most cross-thread callbacks run in one drain */
    /* timing on: */
    uint64_t longest_ns;   /* the longest single callback (or fiber resume) */
    int longest_kind;      /* its ZEV_SLOW_* kind */
    uint64_t lag_samples;  /* readiness-to-callback delays recorded: */
    uint64_t lag_p50_ns;   /* from an fd's readiness (the wait returning) to */
    uint64_t lag_p99_ns;   /* its stream's pass, and from a timer's deadline */
    uint64_t lag_max_ns;   /* to its callback; percentiles within 19 % */
} zev_loop_stats_t;

/* Fills *out. Loop thread. Errors: EINVAL (NULL). */
ZEV_API int zev_loop_stats(const zev_loop_t *loop, zev_loop_stats_t *out);

/* Zeroes the counters and the timing figures (the peaks too). Loop thread.
 * Errors: EINVAL. */
ZEV_API int zev_loop_stats_reset(zev_loop_t *loop);

/* Turns the timing figures of zev_loop_stats on (1) or off (0); off by
 * default. On, the loop reads the clock before and after every callback:
 * about 2 x 20 ns each (perf/loop.c measures it). Loop thread. Errors:
 * EINVAL. */
ZEV_API int zev_loop_set_timing(zev_loop_t *loop, int on);

/* What ran too long: a callback's kind and which one. */
enum {
    ZEV_SLOW_TIMER = 1, /* what: the zev_timer_t */
    ZEV_SLOW_IO,        /* what: the zev_io_t */
    ZEV_SLOW_RECV,      /* what: the zev_stream_t (its on_recv) */
    ZEV_SLOW_SEND,      /* what: the zev_stream_t (its on_send) */
    ZEV_SLOW_CLOSE,     /* what: the zev_stream_t (its on_close) */
    ZEV_SLOW_FRAME,     /* what: the zev_stream_t (its on_frame_release) */
    ZEV_SLOW_CALLBACK,  /* what: the arg of zev_loop_add_callback / zev_loop_post; fn: its fn */
    ZEV_SLOW_TRACKER,   /* what: the zev_tracker_t (its on_done) */
    ZEV_SLOW_FIBER      /* what: the zev_fiber_t (one resume, until it blocked) */
};
typedef struct zev_slow {
    int kind;             /* ZEV_SLOW_* */
    const void *what;     /* as the kind says; may be stale once the hook returns */
    zev_cb_fn fn;         /* ZEV_SLOW_CALLBACK: the callback; else NULL */
    uint64_t duration_ns; /* how long it held the loop */
} zev_slow_t;
typedef void (*zev_slow_fn)(zev_loop_t *loop, const zev_slow_t *slow, void *arg);

/* asyncio's slow_callback_duration for zev: fn(loop, slow, arg) runs on the
 * loop thread right after any callback (or fiber resume) that took
 * threshold_us or longer, with what it was and how long it took; it is not
 * itself timed. fn NULL removes the hook. While set, timing is on (see
 * zev_loop_set_timing). fn may call any loop-thread function, set or clear
 * the hook itself, but not run the loop (EBUSY). Loop thread. Errors:
 * EINVAL (NULL loop). */
ZEV_API int zev_loop_on_slow(zev_loop_t *loop, uint64_t threshold_us, zev_slow_fn fn, void *arg);

/* Queues fn(loop, arg) to run on the loop's thread. Thread-safe and
 * lock-free (one atomic exchange; a malloc for the node); wakes the loop with
 * one coalesced write. Callbacks run in FIFO order per producer, each at most
 * once: exactly once unless the loop is destroyed first (an iteration runs
 * only what was queued when its drain began). Callbacks still queued at
 * zev_loop_destroy never run: they are dropped without a word, and so is
 * whatever their arg points to; a producer that must free it then posts
 * with zev_loop_post instead. Errors: -1 with EINVAL (NULL loop or fn),
 * ENOMEM. */
ZEV_API int zev_loop_add_callback(zev_loop_t *loop, zev_cb_fn fn, void *arg);

/* A cross-thread post the caller owns: zev_loop_post without an allocation.
 * Put it inside your own object (an order, a request), post it, and reuse it
 * once its callback ran. Its contents are zev's while it is posted. */
typedef struct zev_post {
    void *zev_private[4];
} zev_post_t;

/* Queues fn(loop, arg) as zev_loop_add_callback does (thread-safe,
 * lock-free, FIFO per producer, one coalesced wakeup, the same drain), with
 * the caller's post for the node: no allocation, and no failure but bad
 * input. fn runs exactly once: on the loop's thread with the loop; or, if
 * the loop is destroyed with the post still queued, from zev_loop_destroy
 * with loop == NULL, before destroy returns, so that fn can free what arg
 * holds (it must call nothing of the loop's then). The post belongs to zev
 * from this call until fn starts; posting it again before that is
 * undefined. Posting to a loop that is being (or was) destroyed is a use
 * after free, as for zev_loop_add_callback: stop the producers first.
 * Errors: -1 with EINVAL (NULL loop, post or fn). */
ZEV_API int zev_loop_post(zev_loop_t *loop, zev_post_t *post, zev_cb_fn fn, void *arg);

/* Cached CLOCK_MONOTONIC time of the current iteration, in ns (0 for NULL).
 * Callbacks that zev_stream_flush or zev_tracker_on_done run when called
 * from outside the loop's callbacks see the time of that call instead: the
 * last iteration may be long past. */
ZEV_API uint64_t zev_now_ns(const zev_loop_t *loop);

/* ---------------------------------------------------------------- timers */

/* Starts a timer that fires after delay_us, then every repeat_us (0 = one
 * shot). Microseconds are kept: the loop sleeps until the deadline with the
 * backend's full precision (epoll_pwait2, ppoll, kevent), and a timer never
 * fires before its delay; Linux may end such a sleep up to the thread's
 * timer slack late (50 us by default; prctl(PR_SET_TIMERSLACK) lowers it).
 * A periodic timer's n-th run is due at start + n x repeat_us, whatever the
 * callbacks cost; a run that fell behind skips the periods it missed (no
 * burst to catch up). Delays and repeats saturate: UINT64_MAX (or anything
 * past the end of the clock) means "never". Timers with equal deadlines fire in start order; a timer
 * started inside a callback never fires in the same iteration and counts
 * from the iteration's cached time (zev_now_ns); a timer started outside the
 * loop's callbacks counts from the current time.
 * Lifetime: the loop owns this timer; a one-shot ends after its callback
 * returns (or at zev_timer_cancel), a repeating one at zev_timer_cancel.
 * Its handle is stale afterwards (EINVAL). No allocation in steady state:
 * timers come from the loop's pool. Errors: NULL with EINVAL (NULL loop or
 * fn), ENOMEM. */
ZEV_API zev_timer_t *zev_timer_start(zev_loop_t *loop, uint64_t delay_us, uint64_t repeat_us,
                                     zev_timer_fn fn, void *arg);

/* Cancels a timer made by zev_timer_start and ends it. Safe inside its own
 * callback (it will not repeat) and inside any other callback (a due timer
 * that has not run yet in this iteration will not run). A handle whose timer
 * already ended (a one-shot that fired, a second cancel) fails with EINVAL
 * and changes nothing: for timeouts that may have fired, prefer an owned
 * timer. Errors: -1 with EINVAL (NULL, stale, or an owned timer). */
ZEV_API int zev_timer_cancel(zev_timer_t *t);

/* A timer the user owns, for timeouts that are armed, cancelled and re-armed
 * again and again (libuv's uv_timer_t, Go's time.Timer): made unarmed, it
 * lives until zev_timer_free or zev_loop_destroy, whether or not it fired.
 * fn(t, arg) runs on the loop's thread each time it comes due. The loop
 * reserves everything it needs here: arm and disarm never allocate and
 * never fail on a live timer. Errors: NULL with EINVAL (NULL loop or fn),
 * ENOMEM. */
ZEV_API zev_timer_t *zev_timer_new(zev_loop_t *loop, zev_timer_fn fn, void *arg);

/* (Re)arms an owned timer: due after delay_us, then every repeat_us (0 =
 * once), with zev_timer_start's rules (microseconds, the grid, saturation,
 * never in the iteration that armed it). Arming an armed timer replaces its
 * deadline; arming it inside its own callback replaces the next run.
 * Errors: -1 with EINVAL (NULL, stale, or a timer from zev_timer_start). */
ZEV_API int zev_timer_arm(zev_timer_t *t, uint64_t delay_us, uint64_t repeat_us);

/* Disarms an owned timer: it will not run until armed again. Safe whether
 * or not it is armed or already fired, and inside its own callback (a
 * repeating timer then does not repeat). Errors: -1 with EINVAL (NULL,
 * stale, or a timer from zev_timer_start). */
ZEV_API int zev_timer_disarm(zev_timer_t *t);

/* Frees an owned timer; also inside its own callback (it is freed when the
 * callback returns). Its handle is stale afterwards. Errors: -1 with EINVAL
 * (NULL, stale, or a timer from zev_timer_start). */
ZEV_API int zev_timer_free(zev_timer_t *t);

/* When the timer is next due: a CLOCK_MONOTONIC time in ns, the clock of
 * zev_now_ns. Inside the timer's own callback, the deadline that run was
 * due at. 0 when it is not armed (an owned timer disarmed, or a one-shot of
 * its that fired). Errors: 0 with EINVAL (NULL, or a stale handle, e.g. a
 * zev_timer_start one-shot that fired). */
ZEV_API uint64_t zev_timer_due(const zev_timer_t *t);

/* ------------------------------------------------------------ fd watchers */

/* Watches fd for events (ZEV_READ | ZEV_WRITE, level-triggered: the callback
 * runs every iteration while the condition holds). events may be 0 (watch
 * nothing until zev_io_update). The fd is not owned: close it only after
 * zev_io_stop. An fd closed before zev_io_stop is a usage error, as in
 * libuv. zev keeps it memory-safe on every backend: the number stays taken
 * in zev (EEXIST for a new watcher on it) until zev_io_stop, and nothing
 * reaches a stopped watcher. What else happens depends on the kernel:
 * poll and kqueue forget a closed number (the watcher goes silent); epoll
 * forgets a file only when its last descriptor closes, so while the file is
 * still open elsewhere (a dup, a forked child) epoll keeps reporting it,
 * the watcher keeps firing until zev_io_stop and the loop wakes for it
 * (for nothing) after that. If the number is reused for another file
 * meanwhile, what the old watcher sees is unspecified.
 * Lifetime: until zev_io_stop.
 * Errors: NULL with EINVAL (NULL loop/fn, bad events), EBADF (fd not open),
 * EEXIST (fd already watched by this loop, or it is a stream's ZMQ_FD),
 * EPERM (the backend cannot watch this fd, e.g. a regular file with epoll). */
ZEV_API zev_io_t *zev_io_start(zev_loop_t *loop, int fd, int events, zev_io_fn fn, void *arg);

/* Changes the watched events (ZEV_READ | ZEV_WRITE, or 0). Safe from any
 * callback. Errors: -1 with EINVAL (NULL, stopped watcher, bad events), or
 * the backend's errno. */
ZEV_API int zev_io_update(zev_io_t *io, int events);

/* Stops and frees the watcher. Safe from any callback, including for a
 * watcher whose event is already pending in this iteration: it will not
 * fire. Errors: -1 with EINVAL (NULL). */
ZEV_API int zev_io_stop(zev_io_t *io);

/* --------------------------------------------------------------- streams */

/* Wraps a libzmq socket. Registers its ZMQ_FD; messages already pending are
 * found at registration. The socket stays the caller's (zev_stream_close
 * with ZEV_CLOSE_SOCKET hands it over). A pointer that is not a live libzmq
 * socket is caught only as far as libzmq's own checks go (ENOTSOCK).
 * Lifetime: valid until its close callback has returned (after
 * zev_stream_close or zev_loop_destroy); then freed by the loop.
 * Errors: NULL with EINVAL (NULL), ENOTSOCK, ETERM, EEXIST (the socket
 * already has a stream on this loop; also a new socket that libzmq put at
 * the address, and gave the ZMQ_FD number, of one zmq_closed under its
 * stream: close that stream first), ENOMEM, EBUSY (called from a callback
 * that zev_loop_destroy runs, e.g. a close callback: the loop is going away
 * and the stream would outlive it). */
ZEV_API zev_stream_t *zev_stream_new(zev_loop_t *loop, void *zmq_socket);

/* The stream's socket's zmq_connect, zmq_bind, zmq_disconnect and
 * zmq_unbind, for use once the socket has a stream. Use these rather than
 * libzmq's on the socket: those process the socket's pending commands
 * (which can swallow the ZMQ_FD edge of a message that just arrived), and an
 * inproc connect or bind attaches its pipe at once and signals nothing, so
 * the stream would not learn of the new peer's room or message. These tell
 * the stream to look again. Any other libzmq call on the socket that touches
 * its state (zmq_send, zmq_recv, zmq_poll, reading ZMQ_EVENTS) has the same
 * effect and is not supported; after one, zev_stream_flush(s, ZEV_READ |
 * ZEV_WRITE, 0) makes the stream look again. Returns libzmq's result (-1
 * with its errno, never EINTR: a signal that interrupts libzmq's first look
 * at the socket makes zev call again), or -1 with EINVAL (NULL), EBADF
 * (closed), ENOTSOCK/ETERM (the socket is gone). */
ZEV_API int zev_stream_connect(zev_stream_t *s, const char *endpoint);
ZEV_API int zev_stream_bind(zev_stream_t *s, const char *endpoint);
ZEV_API int zev_stream_disconnect(zev_stream_t *s, const char *endpoint);
ZEV_API int zev_stream_unbind(zev_stream_t *s, const char *endpoint);

/* Sets the receive callback: fn gets every whole message (always multipart,
 * even with one frame) with frames borrowed for the duration of the call.
 * fn == NULL stops receiving; messages then stay queued in libzmq.
 * Errors: EINVAL (NULL stream), EBADF (closed), EBUSY (fibers receive from
 * or poll the stream for ZEV_READ: they would wait for ever). */
ZEV_API int zev_stream_on_recv(zev_stream_t *s, zev_recv_fn fn, void *arg);

/* Sets the send callback. Every message given to a send function gets one
 * status, in send order, with the message's number (zev_stream_send_seq):
 * 0 when handed to libzmq (what libzmq does with it then is libzmq's: a PUB
 * at its high-water mark drops it, as zmq_send would), or the errno:
 *   ECANCELED  never sent: the stream was closed or the loop destroyed
 *              first;
 *   ETIMEDOUT  libzmq refused it until the stream's send timeout ran out
 *              (zev_stream_set_send_timeout);
 *   EPIPE      its peer went away after libzmq took its first parts and
 *              libzmq refused the rest: no part of it is sent later on its
 *              own, and the next message is whole (when libzmq drops the
 *              rest silently itself, the message is reported 0, as libzmq
 *              reports it; a REQ socket cannot be used after such a loss,
 *              so its stream then fails with EPIPE);
 *   ENOTSOCK, ETERM  the socket was closed under the stream, or its context
 *              terminated, before it was sent;
 *   or another errno libzmq gave when it left the queue (EHOSTUNREACH: a
 *   ROUTER_MANDATORY peer that is not connected).
 * Each status goes to the callback set when it is delivered: a message
 * given before on_send was set is reported if its status comes later, a
 * callback set from inside on_send gets the statuses that follow, and with
 * none set a status is dropped. Runs from the loop, never nested inside a
 * send call; zev_stream_flush reports what it sent before it returns,
 * except from inside on_send, where those statuses follow after that
 * on_send returns, in order. A pass reports the statuses owed when it
 * began: those of messages sent from inside on_send come in the stream's
 * next pass, so an on_send that sends again on every success cannot hold
 * the loop. The memory for the statuses is reserved when a message is given
 * (ENOMEM there), so none is lost later.
 * Errors: EINVAL, EBADF, ENOMEM (no room for the statuses of messages
 * already queued; the previous callback stays). */
ZEV_API int zev_stream_on_send(zev_stream_t *s, zev_send_fn fn, void *arg);

/* Sets the close callback, run once after zev_stream_close (or destroy),
 * from the loop, never from inside the close call. Errors: EINVAL (NULL),
 * EBADF (already closed). */
ZEV_API int zev_stream_on_close(zev_stream_t *s, zev_close_fn fn, void *arg);

/* Sends a copy of data as one part; ZMQ_SNDMORE builds a multipart message
 * part by part. Never blocks: if libzmq says EAGAIN the message waits in the
 * stream's FIFO queue. Returns 0, or -1 with EAGAIN (the queue already holds
 * max_queue messages; nothing taken), EINVAL (NULL, data NULL with len > 0,
 * flags other than ZMQ_SNDMORE/ZMQ_DONTWAIT), EBADF (closed), ENOTSOCK/ETERM
 * (the socket is gone), ENOMEM (no room to queue it or for its on_send
 * status; nothing taken), EBUSY (a fiber is in the middle of a multipart
 * message on the stream: zev_fiber_send) or another errno libzmq gave at
 * once. The other send functions fail the same ways. */
ZEV_API int zev_stream_send(zev_stream_t *s, const void *data, size_t len, int flags);

/* Sends nparts messages as one multipart message (ZMQ_SNDMORE in flags: more
 * parts follow in a later call). Takes ownership on success: each part is
 * moved out (left empty, as zmq_msg_send does); on failure nothing is taken.
 * Errors as zev_stream_send. */
ZEV_API int zev_stream_send_msg(zev_stream_t *s, zmq_msg_t *parts, size_t nparts, int flags);

/* Zero-copy send of data as one message part (copy=false, track=true):
 * libzmq references the buffer. free_fn(data, hint) (may be NULL) runs
 * exactly once when libzmq no longer needs the buffer, on whatever thread
 * libzmq drops it (usually its I/O thread), also when the message is never
 * sent (stream closed: ECANCELED through on_send). If out is not NULL it
 * receives a tracker: it completes exactly once, on the loop thread, after
 * free_fn has run (zev_tracker_done, zev_tracker_on_done); release it with
 * zev_tracker_release. Buffers of at most ZEV_ZC_COPY_MAX bytes are copied
 * instead (libzmq keeps such messages inline; referencing them would only
 * add an allocation): free_fn then runs before this returns.
 * On failure nothing is taken: free_fn does not run, the buffer stays the
 * caller's, *out is untouched. Errors as zev_stream_send, plus ENOMEM. */
#define ZEV_ZC_COPY_MAX 33
ZEV_API int zev_stream_send_zc(zev_stream_t *s, void *data, size_t len, zev_free_fn free_fn,
                               void *hint, zev_tracker_t **out);

/* Lets the trackers of this stream's later zero-copy sends complete
 * without waking the loop, so that completions trickling in one by one
 * (libzmq's I/O thread frees each buffer as the peer makes room) share
 * wakeups instead of costing one each. Such a completion runs at the loop's
 * next iteration, whatever woke it; while any of them is out, the loop
 * wakes by itself at most delay_us after it went to sleep; and the last one
 * out wakes it at once, so the end of a burst is never delayed. on_done may
 * thus run up to delay_us (plus the iteration) after zev_tracker_done
 * turned 1; free_fn is not delayed (it runs on libzmq's thread). The cost:
 * while delayed trackers are out, an idle loop wakes every delay_us.
 * 0 (the default) wakes the loop for every completion. Buffers that
 * zev_stream_send_zc copies (ZEV_ZC_COPY_MAX) complete at once either way.
 * Loop thread only. Errors: EINVAL (NULL stream), EBADF (closed). */
ZEV_API int zev_stream_set_tracker_delay(zev_stream_t *s, uint64_t delay_us);

/* The number of the last message a send call gave to the stream: messages
 * are numbered 1, 2, 3, ... in the order their first part is given (a call
 * that fails takes nothing and no number). on_send hands each status with
 * that number, so a gateway knows which order a status is for:
 *     zev_stream_send_msg(router, parts, 3, 0);
 *     order->seq = zev_stream_send_seq(router);
 * 0 before the first message (and for NULL, errno EINVAL). */
ZEV_API uint64_t zev_stream_send_seq(const zev_stream_t *s);

/* A send deadline, the stream's counterpart of ZMQ_SNDTIMEO. A message
 * libzmq takes is always sent, late or not. A message it refuses is dropped
 * and reported ETIMEDOUT through on_send once it has been at the head of the
 * stream's send queue for timeout_us (as a blocking send gives up after
 * ZMQ_SNDTIMEO); and, when the last message to the same destination timed
 * out, as soon as it has waited timeout_us since it was queued. The
 * destination is the peer for a ROUTER (the message's first frame) and the
 * whole socket for other types. A destination stays remembered as timed
 * out until libzmq takes a message for it; the stream remembers up to 4096
 * (its memory is taken when a destination first times out, never per
 * message; past 4096, a new one displaces another, whose next message then
 * waits at the head again). So a peer that stopped reading (a
 * ROUTER_MANDATORY peer whose pipe is full) costs its own messages, not the
 * ones queued behind it for other peers, and a peer that is merely slow
 * loses nothing as long as it catches up within the timeout. Checked by the
 * stream's one timer, not one per message. A message libzmq already holds
 * parts of cannot be taken back and is not dropped. 0 = none (the default).
 * The queue stays first in, first out: zev keeps no queue per peer, because
 * on_send reports in send order and per-peer queues would reorder it.
 * Errors: EINVAL, EBADF, ENOMEM (the stream's timer). */
ZEV_API int zev_stream_set_send_timeout(zev_stream_t *s, uint64_t timeout_us);

/* Bounds the send queue in messages (0 = unbounded; default 1000). A
 * smaller bound than the messages queued now drops none of them: sends
 * fail with EAGAIN until the queue is below it. Errors: EINVAL (NULL),
 * EBADF (closed). */
ZEV_API int zev_stream_set_max_queue(zev_stream_t *s, size_t n);

/* Bounds messages handled per loop iteration (recv and send together);
 * 0 restores the loop's batch (zev_loop_opts_t.batch). A smaller batch
 * shortens how long other streams wait behind this one, a larger one gives
 * it more throughput per wake-up (docs/design.md, Fairness). Errors: EINVAL
 * (NULL), EBADF (closed). */
ZEV_API int zev_stream_set_batch(zev_stream_t *s, unsigned n);

/* Handles pending work now: ZEV_READ receives and dispatches, ZEV_WRITE sends
 * queued messages, at most limit messages (0 = no limit; as in a pass of the
 * loop, each 64 parts of a long message count as one more, so a message of
 * many parts may take several calls, and is delivered whole by the last);
 * on_send statuses of what it sent are reported before it returns (from
 * inside on_send: after that on_send returns, see zev_stream_on_send).
 * Returns the messages handled: delivered, dropped (max_parts) and sent;
 * -1 with EINVAL (NULL, bad flags) or EBADF. */
ZEV_API int zev_stream_flush(zev_stream_t *s, int flags, size_t limit);

/* Closes the stream; safe from inside any callback. closed() is 1 at once.
 * Without ZEV_CLOSE_FLUSH, queued sends are reported ECANCELED and zev no
 * longer touches the socket when this returns. With ZEV_CLOSE_FLUSH the queue
 * is handed to libzmq first, from the loop, for at most the socket's
 * ZMQ_LINGER (-1: until drained or the loop is destroyed); the rest is then
 * ECANCELED; the socket is the stream's until its close callback has run.
 * A message zev was in the middle of receiving (a long one, taken over
 * several passes) is dropped and the rest of it drained from the socket, so
 * the socket is left at a message boundary (on REP, the request is answered
 * with one empty part, see zev_stream_set_max_parts).
 * ZEV_CLOSE_SOCKET also zmq_closes the socket; with ZEV_CLOSE_FLUSH too, the
 * two waits share one ZMQ_LINGER: zev sets the socket's ZMQ_LINGER to what is
 * left of it before zmq_close, so libzmq's own linger for what it still
 * holds does not start the wait over. The close callback runs once,
 * from the loop. Errors: EINVAL (NULL, bad flags), EBADF (already closed),
 * ENOMEM (flush: the linger timer could not be started; the stream stays
 * open and nothing was cancelled). */
ZEV_API int zev_stream_close(zev_stream_t *s, int flags);

/* 1 if messages wait in the send queue; 0 if not (and for NULL: EINVAL). */
ZEV_API int zev_stream_sending(const zev_stream_t *s);
/* 1 if on_recv is set and the stream is open; 0 if not (NULL: EINVAL). */
ZEV_API int zev_stream_receiving(const zev_stream_t *s);
/* 1 once close was called; 0 before (and for NULL: EINVAL). */
ZEV_API int zev_stream_closed(const zev_stream_t *s);
/* The stream's libzmq socket (still the caller's unless closed with
 * ZEV_CLOSE_SOCKET); NULL with EINVAL for NULL. */
ZEV_API void *zev_stream_socket(const zev_stream_t *s);
/* The loop the stream belongs to; NULL with EINVAL for NULL. */
ZEV_API zev_loop_t *zev_stream_loop(const zev_stream_t *s);

/* Called on the loop thread once for every frame kept from this stream
 * (zev_msg_keep) when it is released, with the frame's size; not after the
 * stream's close callback has run. Errors: EINVAL, EBADF. */
ZEV_API int zev_stream_on_frame_release(zev_stream_t *s, zev_frame_fn fn, void *arg);

/* Bounds kept frames in flight (0 = unbounded, the default). At the bound
 * the stream stops reading (libzmq's HWM then pushes back on the sender)
 * and resumes as frames are released. A message's parts are kept as one, so
 * one message may take the count past the bound. Errors: EINVAL, EBADF. */
ZEV_API int zev_stream_set_max_frames(zev_stream_t *s, size_t n);

/* Bounds the parts of one received message (0 = unbounded; default
 * ZEV_MAX_PARTS_DEFAULT). libzmq bounds a part's size (ZMQ_MAXMSGSIZE) and
 * the messages in flight (the HWMs), but not the parts of one message: a
 * peer could send one message of millions of empty parts, which zev would
 * have to hold until its last part came. A message with more parts is
 * drained from libzmq as it comes (never more than n parts held), dropped
 * whole (never delivered in pieces) and counted in the stream's stats
 * (dropped_oversized); the stream goes on with the next message. On a REP
 * socket, which must answer every request it received before it can receive
 * the next, zev answers a dropped request with one empty part (the only
 * message zev ever sends by itself). A message being received when n is
 * lowered below its parts so far is dropped the same way. The
 * default is far above what a protocol puts in one message (an envelope of
 * routing frames and a few body frames) and bounds what one message can
 * hold in zev to 64 Ki parts. Errors: EINVAL (NULL), EBADF (closed). */
#define ZEV_MAX_PARTS_DEFAULT 65536
ZEV_API int zev_stream_set_max_parts(zev_stream_t *s, size_t n);

/* The stream's counters, for monitoring and tests; cheap enough to be
 * always on (a few increments per message). Counts start at the stream's
 * creation. */
typedef struct zev_stream_stats {
    size_t ring_size;    /* receive ring slots now (returns to its usual size
                          * after an unusually long message) */
    size_t frames_kept;  /* kept frames not yet released */
    size_t queued_msgs;  /* messages waiting in the send queue now */
    size_t queued_parts; /* their parts */
    size_t queue_peak;   /* the most messages the send queue held */
    uint64_t msgs_in;    /* whole messages received (on_recv, fibers) */
    uint64_t bytes_in;   /* their bytes, all parts */
    uint64_t msgs_out;   /* messages libzmq took (on_send status 0) */
    uint64_t bytes_out;  /* bytes of the parts libzmq took */
    uint64_t timed_out;  /* messages reported ETIMEDOUT (send deadline) */
    uint64_t cancelled;  /* messages reported ECANCELED (closed unsent) */
    uint64_t failed;     /* messages reported with another error */
    uint64_t dropped_oversized; /* received messages over max_parts, dropped */
} zev_stream_stats_t;

/* Fills *out with the stream's counters. Loop thread. Errors: EINVAL
 * (NULL). */
ZEV_API int zev_stream_stats(const zev_stream_t *s, zev_stream_stats_t *out);

/* --------------------------------------------------- messages and frames */

/* A received message. It and its borrowed frames are valid only during the
 * recv callback; every part not kept is recycled when the callback returns
 * (its buffer is freed by the stream's next receive into that slot, at the
 * latest when the stream's pass ends).
 * Functions given NULL or i >= parts fail with EINVAL (NULL / 0). */
ZEV_API size_t zev_msg_parts(const zev_msg_t *m);
ZEV_API const void *zev_msg_data(const zev_msg_t *m, size_t i);
ZEV_API size_t zev_msg_size(const zev_msg_t *m, size_t i);
ZEV_API int zev_msg_more(const zev_msg_t *m, size_t i); /* 1 if part i is not the last */
ZEV_API zmq_msg_t *zev_msg_frame(zev_msg_t *m, size_t i);

/* Keeps part i beyond the callback without copying: the zmq_msg_t moves
 * into a frame handle from a preallocated pool (no allocation in steady
 * state). The frame is the caller's until zev_frame_release; it may outlive
 * the stream and the loop. Keeping the same part twice fails with EINVAL. */
ZEV_API zev_frame_t *zev_msg_keep(zev_msg_t *m, size_t i);

/* A kept frame's bytes, its size, and its zmq_msg_t (read it; do not close
 * or move it: the frame still owns it). Thread-safe, like
 * zev_frame_release: a worker holding the frame reads it there. Valid until
 * the frame is released. A NULL or stale handle (released, or sent with
 * zev_stream_send_frame) gives NULL / 0 with EINVAL. */
ZEV_API const void *zev_frame_data(const zev_frame_t *f);
ZEV_API size_t zev_frame_size(const zev_frame_t *f);
ZEV_API zmq_msg_t *zev_frame_msg(zev_frame_t *f);

/* Gives a kept frame back. Thread-safe and lock-free: call it from any
 * thread. The stream's on_frame_release runs later on the loop thread. The
 * handle is stale afterwards: a second release, or any zev_frame_* call,
 * fails with EINVAL (also once the slot holds another frame). */
ZEV_API int zev_frame_release(zev_frame_t *f);

/* Sends a kept frame on a stream without copying it (as one part;
 * ZMQ_SNDMORE: more follow), the way to forward what was received: libzmq
 * references the frame's buffer, and the frame is released (its stream's
 * on_frame_release runs, and it counts against max_frames until then) when
 * libzmq is done with it, not before. On success the frame is zev's: the
 * handle is stale at once. Frames of at most ZEV_ZC_COPY_MAX bytes are
 * copied and released at once. The stream's queue, order, bound and on_send
 * report are those of zev_stream_send. On failure nothing is taken and the
 * frame stays the caller's. Loop thread only (the stream's); a worker may
 * release the same frame meanwhile: exactly one of the two calls takes it,
 * the other fails with EINVAL.
 * Errors: as zev_stream_send, plus EINVAL (NULL or stale frame). */
ZEV_API int zev_stream_send_frame(zev_stream_t *s, zev_frame_t *f, int flags);

/* 1 once the tracked message's buffer was released by libzmq (and its
 * free function ran), 0 before; thread-safe, and also true after
 * zev_loop_destroy (the tracker's completion callback then never runs, but
 * this says 1 as soon as the free function has). -1/EINVAL for NULL. */
ZEV_API int zev_tracker_done(const zev_tracker_t *t);

/* Calls fn(t, arg) on the loop thread when the tracker completes (at once
 * if its completion already ran on the loop thread). The completion comes
 * through the loop's queue after libzmq freed the buffer, so it may arrive
 * an iteration after zev_tracker_done turned 1 (and after the release of a
 * kept frame that libzmq let go of at the same time): a program must not
 * stop its loop on the last frame release and expect the tracker callback.
 * Never called after zev_loop_destroy; call this on the loop's thread while
 * the loop exists. Errors: EINVAL. */
ZEV_API int zev_tracker_on_done(zev_tracker_t *t, zev_tracker_fn fn, void *arg);

/* Drops the caller's tracker; its callback will not run any more (the
 * free function still runs, once, when libzmq lets the buffer go). Call it
 * on the loop's thread, or from any thread once the loop is destroyed.
 * The handle is stale afterwards. Errors: EINVAL (NULL). */
ZEV_API int zev_tracker_release(zev_tracker_t *t);

/* ---------------------------------------------------------------- fibers */

/* Fibers: code written in blocking style on the loop, the counterpart of
 * PyZMQ's zmq.green. A fiber is a stackful coroutine the loop schedules:
 * its blocking calls (zev_fiber_recv, _send, _poll, _sleep, ...) suspend
 * only the fiber, and the loop goes on with its streams, timers, callbacks
 * and other fibers. All of them keep the streams' ZMQ_FD rule: no timeout
 * papers over a missed edge.
 *
 * Scheduling. Fibers run on the loop's thread, in a phase of their own
 * right after the ready streams (phase 3), so a fiber woken by a message
 * runs in the same iteration. Runnable fibers run in the order they became
 * runnable; each runs until it blocks, yields or returns, and resumes at
 * most once per iteration. A fiber whose calls never have to wait (a
 * receive loop on a busy stream) yields after the loop's batch (64) of
 * them (every call that returns without waiting counts: recv, send, poll,
 * wait_fd, join), so fibers, callbacks and streams share the loop fairly;
 * a fiber spawned while fibers run first runs in the next iteration. No
 * callback ever runs on a fiber's stack (zev_stream_flush refuses a fiber
 * with EBUSY; a tracker's at-once on_done is deferred to the loop). A call
 * that succeeds leaves errno as the fiber had it.
 *
 * Stacks are mmap'd with an inaccessible 64 KiB guard below and pooled (no
 * system call per spawn while at most 64 idle stacks, 16 MiB, cover the
 * churn); running into the guard kills the process with SIGSEGV and a line
 * on stderr naming it (ASan builds: ASan's report). A single frame larger
 * than the guard could step over it: build fiber code with
 * -fstack-clash-protection to rule that out. Each stack costs two of the
 * process's vm.max_map_count mappings (65530 by default: about 32,000 live
 * fibers; raise it, e.g. sysctl vm.max_map_count=262144, for more).
 */

typedef void (*zev_fiber_fn)(void *arg);

typedef struct zev_fiber_opts {
    size_t stack_size; /* bytes; 0 = 64 KiB; rounded up to pages, 64 KiB guard below */
} zev_fiber_opts_t;

/* zev_fiber_poll's item: a stream, or (stream NULL) a plain fd. */
typedef struct zev_fiber_pollitem {
    zev_stream_t *stream;
    int fd;
    short events;  /* ZEV_READ | ZEV_WRITE */
    short revents; /* set by zev_fiber_poll */
} zev_fiber_pollitem_t;

/* Makes a fiber that will run fn(arg). Call it on the loop's thread, from
 * anywhere there (outside callbacks, inside them, from a fiber); the fiber
 * first runs in a later fiber phase, never inside this call. opts may be
 * NULL. Lifetime: until zev_fiber_join returned it, or, once detached,
 * until fn returns; zev_loop_destroy frees the rest. Errors: NULL with
 * EINVAL (NULL loop or fn), ENOMEM (also vm.max_map_count reached), EBUSY
 * (the loop is being destroyed). */
ZEV_API zev_fiber_t *zev_fiber_spawn(zev_loop_t *loop, zev_fiber_fn fn, void *arg,
                                     const zev_fiber_opts_t *opts);

/* From a fiber: waits until f has returned and frees it (0); timeout_us -1
 * waits for ever, 0 does not wait. Joining a fiber that has returned never
 * waits, so it works in a cancelled fiber too (one freeing its children on
 * its way out). Errors: -1 with EPERM (not in a fiber), EINVAL (NULL, the
 * calling fiber itself, a detached fiber, or one another fiber already
 * joins), ETIMEDOUT (f still runs; it is not freed), ECANCELED (the caller
 * was cancelled and f still runs). */
ZEV_API int zev_fiber_join(zev_fiber_t *f, int64_t timeout_us);

/* f is freed when it returns (at once if it already has). Loop thread.
 * Errors: EINVAL (NULL, already detached, or being joined). */
ZEV_API int zev_fiber_detach(zev_fiber_t *f);

/* Cancels f: its current blocking call and every later one fail with
 * ECANCELED (zev_fiber_sleep and zev_fiber_yield too); fn should return.
 * A fiber that returns in the middle of a multipart message it was sending
 * (ZMQ_SNDMORE given, last part not) has that message ended for it with an
 * empty last part, reported ECANCELED through on_send, so the stream's
 * next message is whole.
 * From any fiber or callback on the loop thread; a fiber may cancel
 * itself. 0 also for a fiber that already returned. Errors: EINVAL (NULL). */
ZEV_API int zev_fiber_cancel(zev_fiber_t *f);

/* The calling fiber, or NULL outside fibers. */
ZEV_API zev_fiber_t *zev_fiber_self(void);

/* The blocking calls below work inside a fiber only (elsewhere -1 with
 * EPERM) and fail with ECANCELED once the fiber is cancelled. timeout_us is
 * -1 for no timeout and 0 for "do not wait". */

/* Sleeps us microseconds (the loop's timer precision). 0, or -1 with EPERM,
 * ECANCELED. */
ZEV_API int zev_fiber_sleep(uint64_t us);

/* Lets every other runnable fiber, and the rest of the loop, run first: the
 * fiber resumes in the next iteration. 0, or -1 with EPERM, ECANCELED. */
ZEV_API int zev_fiber_yield(void);

/* Waits until fd is ready for events (ZEV_READ | ZEV_WRITE). Returns the
 * ready events, 0 on timeout, or -1 with EPERM, ECANCELED, EINVAL (bad
 * events), EBADF, EEXIST (it has to wait, and the fd is watched already: by
 * zev_io_start, a stream, or another fiber; one ready at once is reported
 * whoever watches it). */
ZEV_API int zev_fiber_wait_fd(int fd, int events, int64_t timeout_us);

/* Receives the stream's next whole message. *msg and its borrowed frames
 * are valid until the calling fiber's next blocking call, or its return;
 * zev_msg_keep keeps a frame beyond that, as in on_recv. Fibers receiving
 * from one stream get one message each, first come first served. No heap
 * allocation per message. zev_stream_set_max_frames holds fibers back as
 * it holds on_recv. A message longer than one pass (64 x batch parts) is
 * taken over several loop iterations, the fiber yielding in between and
 * keeping its turn (a fiber that comes meanwhile gets the next message).
 * The timeout bounds the call also then: timeout 0 fails with EAGAIN when
 * the whole message is not taken in this one pass, and a deadline that
 * passes between pieces (or while over-long messages are dropped) fails it
 * too; the parts already taken stay with the stream, and its next receive
 * (this fiber's or another's) goes on from there, so no message is lost or
 * split. Returns 0, or -1 with EAGAIN (timeout, or timeout 0 and no whole
 * message there now), EPERM, ECANCELED, EINVAL (NULL), EBUSY (the stream
 * has on_recv set), EBADF (closed, also while waiting: the stream stays
 * valid for the call until it returns), ENOTSOCK/ETERM (socket gone),
 * EFSM (a REQ socket expecting to send, as zmq_recv). */
ZEV_API int zev_fiber_recv(zev_stream_t *s, zev_msg_t **msg, int64_t timeout_us);

/* Sends as zev_stream_send does (same stream, same order, same on_send
 * report), but waits instead of queuing: the call returns once libzmq has
 * taken the part, 0, or -1 with the errno on_send also reports (for a
 * message built over several calls, the call giving its last part). A
 * fiber's message never waits in the stream's queue: it goes out after the
 * messages queued before it and after a multipart message a callback has
 * begun (whose end it waits for), and on timeout nothing of it is taken
 * (-1, EAGAIN; no number, no status). data is copied when the call
 * starts, so it may point into a message this fiber received (whose frames
 * the call gives back to the ring). While a fiber builds a multipart
 * message (ZMQ_SNDMORE), other fibers' sends on the stream wait for it and
 * sends from callbacks fail with EBUSY. libzmq's EAGAIN and EFSM (a REQ
 * waiting for its reply) both mean "wait": several fibers can share one
 * REQ socket, each request waiting for the previous reply. flags:
 * ZMQ_SNDMORE; ZMQ_DONTWAIT means timeout 0. Errors as zev_stream_send,
 * plus EAGAIN (timeout), EPERM, ECANCELED. */
ZEV_API int zev_fiber_send(zev_stream_t *s, const void *data, size_t len, int flags,
                           int64_t timeout_us);

/* zev_stream_send_msg's parts (moved, as zmq_msg_send does, once taken),
 * with zev_fiber_send's waiting. The first part may wait; the others never
 * do (libzmq takes the rest of a message it began). On timeout nothing is
 * taken. parts may be the message the fiber just received, forwarded as it
 * is (zev_msg_frame(msg, 0), zev_msg_parts(msg)): that message then stays
 * borrowed until this call returns, instead of until it starts, and other
 * fibers' receives on its stream wait until then. */
ZEV_API int zev_fiber_send_msg(zev_stream_t *s, zmq_msg_t *parts, size_t nparts, int flags,
                               int64_t timeout_us);

/* zmq_poll for fibers, over streams and fds: for a stream, ZEV_READ means a
 * message is there, ZEV_WRITE that a zev_fiber_send would go to libzmq at
 * once (another fiber may act first, as with zmq_poll and other threads);
 * for an fd, as zev_fiber_wait_fd. Every fiber polling a stream is woken
 * when it becomes ready. Sets each item's revents and returns how
 * many items are ready, 0 on timeout, or -1 with EPERM, ECANCELED, EINVAL
 * (NULL items with n > 0, bad events, a stream with on_recv set asked for
 * ZEV_READ), EBADF, EEXIST (an fd watched already). A stream whose socket
 * is gone is reported ready with the events asked for, as poll(2) reports
 * an error: its calls then fail at once (ETERM, ENOTSOCK). So is a stream
 * closed while the fiber waits, but that one is valid only until this call
 * returns (as for the other calls: whoever closes a stream ends its use). */
ZEV_API int zev_fiber_poll(zev_fiber_pollitem_t *items, size_t n, int64_t timeout_us);

#ifdef __cplusplus
}
#endif
#endif /* ZEV_H */
