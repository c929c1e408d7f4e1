#!/usr/bin/env bash
# Installs libzev (a normal build: no shim, no sanitizer) into a scratch
# prefix and builds a consumer against the installed files twice: through
# find_package(zev) and through `pkg-config --static --libs zev`.
set -euo pipefail
src=$1 work=$2
rm -rf "$work" && mkdir -p "$work"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$work/prefix" >/dev/null
cmake --build "$work/build" -j2 >/dev/null
cmake --install "$work/build" >/dev/null
test -f "$work/prefix/include/zev.h"
ls "$work"/prefix/lib*/libzev.a "$work"/prefix/lib*/libzev.so.0 >/dev/null

cmake -S "$src/tests/consumer" -B "$work/consumer" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/consumer" >/dev/null
"$work/consumer/consumer_cmake"

pcdir=$(dirname "$(ls "$work"/prefix/lib*/pkgconfig/zev.pc)")
flags=$(PKG_CONFIG_PATH="$pcdir" pkg-config --cflags zev)
libs=$(PKG_CONFIG_PATH="$pcdir" pkg-config --static --libs zev)
# The archive, not the .so, must satisfy -lzev; the rest links as usual.
rest=$(echo " $libs " | sed 's/ -lzev / /')
cc $flags "$src/tests/consumer/main.c" -o "$work/consumer_pc" \
    -L"$pcdir/.." -Wl,-Bstatic -lzev -Wl,-Bdynamic $rest
"$work/consumer_pc" \
    -Wl,-Bstatic $(echo "$libs" | sed 's/-lzmq//') -Wl,-Bdynamic -lzmq
"$work/consumer_pc"
# Only zev_* is exported by the shared library.
bad=$(nm -D --defined-only "$work"/prefix/lib*/libzev.so.0 | awk '{print $3}' | grep -v '^zev_' | grep -v '^_' || true)
if [ -n "$bad" ]; then echo "unexpected exports: $bad"; exit 1; fi
echo "install-consumer: ok"
