/*
 * Bad input: every public function given NULL, a bad fd, bad flags or a
 * handle in the wrong state returns -1 / NULL (or the documented neutral
 * value) with the documented errno, and never crashes. One test per
 * function; stream-state cases (closed stream, socket gone) live in
 * test_stream.c beside the behaviour they guard.
 */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#define EXPECT_ERR(call, err)                                                                     \
    do {                                                                                          \
        errno = 0;                                                                                \
        cr_expect_eq((call), -1, #call " should fail");                                           \
        cr_expect_eq(errno, (err), #call ": errno %d (%s), want %d", errno, zmq_strerror(errno),   \
                     (err));                                                                      \
    } while (0)

#define EXPECT_NULL(call, err)                                                                    \
    do {                                                                                          \
        errno = 0;                                                                                \
        cr_expect_null((call), #call " should fail");                                             \
        cr_expect_eq(errno, (err), #call ": errno %d (%s), want %d", errno, zmq_strerror(errno),   \
                     (err));                                                                      \
    } while (0)

static void noop_cb(zev_loop_t *l, void *a)
{
    (void)l;
    (void)a;
}
static void noop_timer(zev_timer_t *t, void *a)
{
    (void)t;
    (void)a;
}
static void noop_io(zev_io_t *io, int fd, int ev, void *a)
{
    (void)io;
    (void)fd;
    (void)ev;
    (void)a;
}

TestSuite(badinput, .timeout = 10);

Test(badinput, loop_new)
{
    zev_loop_opts_t opts = {.backend = "no-such-backend"};
    EXPECT_NULL(zev_loop_new(&opts), ENOTSUP);
    opts.backend = "";
    zev_loop_t *loop = zev_loop_new(&opts); /* "" = best available */
    cr_assert_not_null(loop);
    zev_loop_destroy(loop);
}

Test(badinput, loop_destroy)
{
    zev_loop_destroy(NULL); /* ignored, no crash */
}

Test(badinput, loop_run)
{
    EXPECT_ERR(zev_loop_run(NULL), EINVAL);
}

Test(badinput, loop_run_once)
{
    EXPECT_ERR(zev_loop_run_once(NULL, 0), EINVAL);
}

Test(badinput, loop_stop)
{
    zev_loop_stop(NULL); /* ignored, no crash */
}

Test(badinput, loop_backend)
{
    EXPECT_NULL(zev_loop_backend(NULL), EINVAL);
}

Test(badinput, loop_fd)
{
    EXPECT_ERR(zev_loop_fd(NULL), EINVAL);
}

Test(badinput, loop_timeout)
{
    EXPECT_ERR(zev_loop_timeout(NULL), EINVAL);
}

Test(badinput, loop_add_callback)
{
    EXPECT_ERR(zev_loop_add_callback(NULL, noop_cb, NULL), EINVAL);
    zev_loop_t *loop = test_loop_new();
    EXPECT_ERR(zev_loop_add_callback(loop, NULL, NULL), EINVAL);
    zev_loop_destroy(loop);
}

Test(badinput, now_ns)
{
    cr_expect_eq(zev_now_ns(NULL), 0);
}

Test(badinput, timer_start)
{
    EXPECT_NULL(zev_timer_start(NULL, 0, 0, noop_timer, NULL), EINVAL);
    zev_loop_t *loop = test_loop_new();
    EXPECT_NULL(zev_timer_start(loop, 0, 0, NULL, NULL), EINVAL);
    zev_loop_destroy(loop);
}

Test(badinput, timer_cancel)
{
    EXPECT_ERR(zev_timer_cancel(NULL), EINVAL);
}

Test(badinput, io_start)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    zev_loop_t *loop = test_loop_new();
    EXPECT_NULL(zev_io_start(NULL, p[0], ZEV_READ, noop_io, NULL), EINVAL);
    EXPECT_NULL(zev_io_start(loop, p[0], ZEV_READ, NULL, NULL), EINVAL);
    EXPECT_NULL(zev_io_start(loop, p[0], 4, noop_io, NULL), EINVAL);
    EXPECT_NULL(zev_io_start(loop, -1, ZEV_READ, noop_io, NULL), EBADF);
    int closed = dup(p[0]);
    close(closed);
    EXPECT_NULL(zev_io_start(loop, closed, ZEV_READ, noop_io, NULL), EBADF);
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, noop_io, NULL);
    cr_assert_not_null(io);
    EXPECT_NULL(zev_io_start(loop, p[0], ZEV_READ, noop_io, NULL), EEXIST);
    cr_expect_eq(zev_io_stop(io), 0);
    zev_loop_destroy(loop);
    close(p[0]);
    close(p[1]);
}

Test(badinput, io_update)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    zev_loop_t *loop = test_loop_new();
    EXPECT_ERR(zev_io_update(NULL, ZEV_READ), EINVAL);
    zev_io_t *io = zev_io_start(loop, p[0], ZEV_READ, noop_io, NULL);
    cr_assert_not_null(io);
    EXPECT_ERR(zev_io_update(io, 8), EINVAL);
    cr_expect_eq(zev_io_update(io, ZEV_READ | ZEV_WRITE), 0);
    zev_io_stop(io);
    zev_loop_destroy(loop);
    close(p[0]);
    close(p[1]);
}

Test(badinput, io_stop)
{
    EXPECT_ERR(zev_io_stop(NULL), EINVAL);
}

/* Stream functions given NULL (state errors: test_stream.c). */
Test(badinput, stream_null)
{
    zev_loop_t *loop = test_loop_new();
    EXPECT_NULL(zev_stream_new(NULL, (void *)1), EINVAL);
    EXPECT_NULL(zev_stream_new(loop, NULL), EINVAL);
    EXPECT_ERR(zev_stream_on_recv(NULL, NULL, NULL), EINVAL);
    EXPECT_ERR(zev_stream_on_send(NULL, NULL, NULL), EINVAL);
    EXPECT_ERR(zev_stream_on_close(NULL, NULL, NULL), EINVAL);
    EXPECT_ERR(zev_stream_on_frame_release(NULL, NULL, NULL), EINVAL);
    EXPECT_ERR(zev_stream_send(NULL, "x", 1, 0), EINVAL);
    EXPECT_ERR(zev_stream_send_msg(NULL, NULL, 1, 0), EINVAL);
    EXPECT_ERR(zev_stream_send_zc(NULL, "x", 1, NULL, NULL, NULL), EINVAL);
    EXPECT_ERR(zev_stream_set_max_queue(NULL, 1), EINVAL);
    EXPECT_ERR(zev_stream_set_max_frames(NULL, 1), EINVAL);
    EXPECT_ERR(zev_stream_set_batch(NULL, 1), EINVAL);
    EXPECT_ERR(zev_stream_flush(NULL, ZEV_READ, 0), EINVAL);
    EXPECT_ERR(zev_stream_close(NULL, 0), EINVAL);
    EXPECT_ERR(zev_stream_stats(NULL, NULL), EINVAL);
    EXPECT_NULL(zev_stream_socket(NULL), EINVAL);
    EXPECT_NULL(zev_stream_loop(NULL), EINVAL);
    cr_expect_eq(zev_stream_sending(NULL), 0);
    cr_expect_eq(zev_stream_receiving(NULL), 0);
    cr_expect_eq(zev_stream_closed(NULL), 0);
    zev_loop_destroy(loop);
}

Test(badinput, stream_new_not_a_socket)
{
    zev_loop_t *loop = test_loop_new();
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_PAIR);
    zmq_close(sock);
    zmq_ctx_term(ctx); /* the socket is gone and so is its context */
    /* Only libzmq's own tag check can catch a dead socket: documented. A
     * pointer to memory that was never a socket is caught the same way. */
    long not_a_socket[16] = {0};
    EXPECT_NULL(zev_stream_new(loop, not_a_socket), ENOTSOCK);
    zev_loop_destroy(loop);
}

Test(badinput, msg_accessors)
{
    cr_expect_eq(zev_msg_parts(NULL), 0);
    EXPECT_NULL(zev_msg_data(NULL, 0), EINVAL);
    errno = 0;
    cr_expect_eq(zev_msg_size(NULL, 0), 0);
    cr_expect_eq(errno, EINVAL);
    cr_expect_eq(zev_msg_more(NULL, 0), 0);
    EXPECT_NULL(zev_msg_frame(NULL, 0), EINVAL);
    EXPECT_NULL(zev_msg_keep(NULL, 0), EINVAL);
}

Test(badinput, frame_accessors)
{
    EXPECT_NULL(zev_frame_data(NULL), EINVAL);
    cr_expect_eq(zev_frame_size(NULL), 0);
    EXPECT_NULL(zev_frame_msg(NULL), EINVAL);
    EXPECT_ERR(zev_frame_release(NULL), EINVAL);
}

Test(badinput, tracker)
{
    EXPECT_ERR(zev_tracker_done(NULL), EINVAL);
    EXPECT_ERR(zev_tracker_on_done(NULL, NULL, NULL), EINVAL);
    EXPECT_ERR(zev_tracker_release(NULL), EINVAL);
}

/* A part count whose queue room cannot be computed without overflowing
 * (nparts is checked before any part is read) fails with ENOMEM at once: no
 * endless doubling, no wrapped size handed to malloc. */
Test(badinput, stream_send_msg_absurd_part_count)
{
    void *ctx = zmq_ctx_new();
    zev_loop_t *loop = test_loop_new();
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    zev_stream_t *s = zev_stream_new(loop, push);
    cr_assert_not_null(s);
    zmq_msg_t one;
    zmq_msg_init(&one);
    EXPECT_ERR(zev_stream_send_msg(s, &one, (size_t)1 << 62, 0), ENOMEM);
    EXPECT_ERR(zev_stream_send_msg(s, &one, SIZE_MAX, 0), ENOMEM);
    zmq_msg_close(&one);
    zev_loop_destroy(loop);
    zmq_close(push);
    zmq_ctx_term(ctx);
}
