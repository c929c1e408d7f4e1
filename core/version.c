/*
 * zev_version: which libzev a program runs with.
 *
 * Design notes
 * - The numbers come from project(VERSION) in CMakeLists.txt, passed in as
 *   ZEV_BUILD_VERSION_* when the library is compiled: that is the one
 *   version the build, the SONAME and the package files use.
 * - include/zev.h spells the same numbers as ZEV_VERSION_* for programs to
 *   compare against at compile time. The static assertion below stops a
 *   build in which the two disagree, so neither can be bumped alone.
 */
#include "zev.h"

#if !defined(ZEV_BUILD_VERSION_MAJOR) || !defined(ZEV_BUILD_VERSION_MINOR) ||                     \
    !defined(ZEV_BUILD_VERSION_PATCH)
#error "ZEV_BUILD_VERSION_* come from project(VERSION) in CMakeLists.txt"
#endif

_Static_assert(ZEV_VERSION_MAJOR == ZEV_BUILD_VERSION_MAJOR &&
                   ZEV_VERSION_MINOR == ZEV_BUILD_VERSION_MINOR &&
                   ZEV_VERSION_PATCH == ZEV_BUILD_VERSION_PATCH,
               "ZEV_VERSION_* in include/zev.h differ from project(VERSION) in CMakeLists.txt: "
               "change both together");

int zev_version(int *major, int *minor, int *patch)
{
    if (major)
        *major = ZEV_BUILD_VERSION_MAJOR;
    if (minor)
        *minor = ZEV_BUILD_VERSION_MINOR;
    if (patch)
        *patch = ZEV_BUILD_VERSION_PATCH;
    return 0;
}
