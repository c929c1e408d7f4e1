# libuv and libev, the host loops the embedding examples and tests run zev
# inside (examples/embed_libuv.c, embed_libev.c, tests/test_embed_hosts.c).
# Both are optional: what is missing is skipped, with a message.
#   libuv: pkg-config "libuv" (Debian: libuv1-dev)  -> target PkgConfig::LIBUV
#   libev: no .pc on Debian (libev-dev): ev.h + libev -> target zev_libev
pkg_check_modules(LIBUV QUIET IMPORTED_TARGET libuv)
if(LIBUV_FOUND)
  set(ZEV_HAVE_LIBUV ON)
else()
  message(STATUS "libuv not found (Debian: libuv1-dev): libuv embedding example and tests skipped")
endif()

find_path(LIBEV_INCLUDE_DIR ev.h)
find_library(LIBEV_LIBRARY ev)
if(LIBEV_INCLUDE_DIR AND LIBEV_LIBRARY)
  set(ZEV_HAVE_LIBEV ON)
  add_library(zev_libev INTERFACE IMPORTED)
  set_target_properties(zev_libev PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES ${LIBEV_INCLUDE_DIR}
    INTERFACE_LINK_LIBRARIES ${LIBEV_LIBRARY})
else()
  message(STATUS "libev not found (Debian: libev-dev): libev embedding example and tests skipped")
endif()
