/* A user's program built against the *installed* libzev: proves the header,
 * the libraries and the package files work outside the source tree, and
 * that the library it runs with is the version its header announced. */
#include <stdio.h>
#include <zev.h>

static void on_timer(zev_timer_t *t, void *arg)
{
    (void)t;
    zev_loop_stop(arg);
}

int main(void)
{
    int major = -1, minor = -1, patch = -1;
    if (zev_version(&major, &minor, &patch) != 0 || zev_version(NULL, NULL, NULL) != 0)
        return 1;
    printf("consumer linked with zev %d.%d.%d (header %d.%d.%d)\n", major, minor, patch,
           ZEV_VERSION_MAJOR, ZEV_VERSION_MINOR, ZEV_VERSION_PATCH);
    if (major != ZEV_VERSION_MAJOR || minor != ZEV_VERSION_MINOR || patch != ZEV_VERSION_PATCH) {
        fprintf(stderr, "consumer: library and header versions differ\n");
        return 1;
    }
    zev_loop_t *loop = zev_loop_new(NULL);
    if (!loop)
        return 1;
    if (!zev_timer_start(loop, 1000, 0, on_timer, loop) || zev_loop_run(loop) != 0)
        return 1;
    printf("consumer ok on %s\n", zev_loop_backend(loop));
    zev_loop_destroy(loop);
    return 0;
}
