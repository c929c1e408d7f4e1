/* A user's program built against the *installed* libzev: proves the header,
 * the static archive and the package files work outside the source tree. */
#include <stdio.h>
#include <zev.h>

static void on_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    zev_loop_stop(arg);
}

int main(void)
{
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop)
        return 1;
    if (!zev_timer_start(loop, 1000, 0, on_timer, loop) || zev_loop_run(loop) != 0)
        return 1;
    printf("consumer ok on %s\n", zev_loop_backend(loop));
    zev_loop_destroy(loop);
    return 0;
}
