#!/usr/bin/env bash
# tests/consumer/check.sh SRC WORK [DOCS]
#
# What a user meets after `cmake --install`: builds libzev as a user would
# (a normal build: no kqueue shim, no sanitizer, the DEFAULT install prefix),
# installs it with `cmake --install --prefix WORK/prefix` (a prefix chosen at
# install time, not at configure time), then builds the same program
# (tests/consumer/main.c) against the installed files four ways and runs it:
#   static  through find_package(zev) + zev::zev_static, and pkg-config zev-static:
#           ldd must not show any libzev;
#   shared  through find_package(zev) + zev::zev, and pkg-config zev:
#           ldd must show libzev.so.0 resolved from WORK/prefix, found through the
#           program's RUNPATH (CMake sets it for imported shared libraries; the
#           pkg-config build adds -Wl,-rpath,<libdir>); LD_LIBRARY_PATH is unset.
# The program prints the zev_version() it was linked with and fails if it differs
# from its header's ZEV_VERSION_*. Also: libzev.so exports only zev_* symbols,
# and with DOCS=ON (the default when doxygen is there) every public function has
# a man page under WORK/prefix/share/man that `man -M` finds.
# WORK/build stays for tests/consumer/deb.sh (ctest fixture).
set -euo pipefail
src=$(cd "$1" && pwd)
work=$2
docs=${3:-}
say() { echo "install-consumer: $*"; }
fail() {
    echo "install-consumer: FAIL: $*" >&2
    exit 1
}
unset LD_LIBRARY_PATH
rm -rf "$work" && mkdir -p "$work"
work=$(cd "$work" && pwd)
prefix=$work/prefix

# ------------------------------------------- build, install at a new prefix
docs_arg=()
[[ -n $docs ]] && docs_arg=(-DZEV_BUILD_DOCS="$docs")
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release "${docs_arg[@]}" >"$work/configure.log" ||
    fail "configure failed: see $work/configure.log"
configured=$(sed -n 's/^CMAKE_INSTALL_PREFIX:PATH=//p' "$work/build/CMakeCache.txt")
docs=$(sed -n 's/^ZEV_BUILD_DOCS:BOOL=//p' "$work/build/CMakeCache.txt")
[[ $configured != "$prefix" ]] || fail "configured with the install prefix: this proves nothing"
cmake --build "$work/build" -j2 >"$work/build.log" || fail "build failed: see $work/build.log"
cmake --install "$work/build" --prefix "$prefix" >"$work/install.log"
say "configured for $configured, installed into $prefix"
test -f "$prefix/include/zev.h" || fail "no include/zev.h in $prefix"
if grep -rlI -- "$configured" "$prefix"; then
    fail "the files above still name the configure-time prefix $configured"
fi

export PKG_CONFIG_PATH
PKG_CONFIG_PATH=$(dirname "$(ls "$prefix"/lib*/pkgconfig/zev.pc)")
libdir=$(cd "$(pkg-config --variable=libdir zev)" && pwd -P) ||
    fail "zev.pc's libdir $(pkg-config --variable=libdir zev) does not exist"
[[ $libdir == "$(cd "$prefix" && pwd -P)"/* ]] || fail "zev.pc's libdir $libdir is not under $prefix"
ls "$libdir/libzev.a" "$libdir/libzev.so.0" >/dev/null
for pc in zev zev-static; do
    [[ $(pkg-config --modversion $pc) == "$(pkg-config --modversion zev)" ]] || fail "$pc version"
done

runs() { # runs <program>: it prints its version line and "consumer ok"
    local out
    out=$("$1") || fail "$1 failed: $out"
    grep -q '^consumer ok' <<<"$out" || fail "$1 printed: $out"
    echo "$out" | sed "s|^|  $(basename "$1"): |"
}
static_ok() { # no libzev at all among the program's shared libraries
    if ldd "$1" | grep libzev; then fail "$1 is not statically linked to libzev"; fi
    runs "$1"
    say "$2: links libzev.a (ldd: no libzev), runs"
}
shared_ok() { # libzev.so.0 from the prefix
    local got
    got=$(ldd "$1" | awk '$1 == "libzev.so.0" { print $3 }')
    [[ -n $got && $got != "not" ]] || fail "$1: ldd finds no libzev.so.0: $(ldd "$1")"
    [[ $(cd "$(dirname "$got")" && pwd -P) == "$libdir" ]] ||
        fail "$1 resolves libzev.so.0 to $got, not into $libdir"
    runs "$1"
    say "$2: libzev.so.0 => $got, runs"
}

# ------------------------------------------------------------ find_package
cmake -S "$src/tests/consumer" -B "$work/consumer" -DCMAKE_PREFIX_PATH="$prefix" \
    >"$work/consumer.log" || fail "find_package(zev) failed: see $work/consumer.log"
cmake --build "$work/consumer" >>"$work/consumer.log" || fail "see $work/consumer.log"
static_ok "$work/consumer/consumer_static" "find_package(zev) zev::zev_static"
shared_ok "$work/consumer/consumer_shared" "find_package(zev) zev::zev"

# -------------------------------------------------------------- pkg-config
main=$src/tests/consumer/main.c
# shellcheck disable=SC2046 # pkg-config's output is a list of words
cc $(pkg-config --cflags zev-static) "$main" -o "$work/consumer_pc_static" \
    $(pkg-config --libs zev-static)
static_ok "$work/consumer_pc_static" "pkg-config --libs zev-static ($(pkg-config --libs zev-static))"
# shellcheck disable=SC2046
cc $(pkg-config --cflags zev) "$main" -o "$work/consumer_pc_shared" \
    $(pkg-config --libs zev) -Wl,-rpath,"$(pkg-config --variable=libdir zev)"
shared_ok "$work/consumer_pc_shared" "pkg-config --libs zev + -Wl,-rpath"

# ------------------------------------------------------------- the exports
bad=$(nm -D --defined-only "$libdir/libzev.so.0" | awk '{print $3}' | grep -v '^zev_' | grep -v '^_' || true)
[[ -z $bad ]] || fail "libzev.so exports more than zev_*: $bad"
say "libzev.so.0 exports only zev_* symbols"

# --------------------------------------------------------------- man pages
if [[ $docs == ON ]]; then
    mandir=$prefix/share/man
    page=$(man -M "$mandir" -w zev_stream_send) || fail "man -M $mandir -w zev_stream_send finds nothing"
    [[ $page == "$mandir"/man3/* ]] || fail "man found $page, not a page under $mandir"
    MANWIDTH=80 man -M "$mandir" -P cat zev_stream_send 2>/dev/null | grep -q '^NAME' ||
        fail "man -M $mandir zev_stream_send does not render"
    missing=()
    for f in $(grep -o '^ZEV_API[^(]*\bzev_[a-z0-9_]*(' "$prefix/include/zev.h" |
        grep -o 'zev_[a-z0-9_]*($' | tr -d '('); do
        [[ -f $mandir/man3/$f.3 ]] || missing+=("$f")
    done
    ((${#missing[@]} == 0)) || fail "no installed man page for: ${missing[*]}"
    say "man -M $mandir -w zev_stream_send: $page (and a page for every public function)"
else
    say "man pages not checked: ZEV_BUILD_DOCS is $docs (needs doxygen and python3)"
fi
say "ok"
