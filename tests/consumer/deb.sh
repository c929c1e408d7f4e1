#!/usr/bin/env bash
# tests/consumer/deb.sh WORK
#
# Packs the build that tests/consumer/check.sh left in WORK/build into the
# libzev-dev .deb (`cpack -G DEB`, the CPack lines of CMakeLists.txt) and
# checks the package: its control fields, and with `dpkg-deb -c` that it
# holds the header, both libraries, the pkg-config and CMake files (and the
# man pages when that build made them) under /usr, and nothing else.
set -euo pipefail
work=$(cd "$1" && pwd)
say() { echo "package-deb: $*"; }
fail() {
    echo "package-deb: FAIL: $*" >&2
    exit 1
}
build=$work/build
[[ -f $build/CPackConfig.cmake ]] || fail "no $build/CPackConfig.cmake: run check.sh first"
rm -rf "$work/deb"
(cd "$build" && cpack -G DEB -B "$work/deb") >"$work/cpack.log" || fail "cpack failed: see $work/cpack.log"
deb=$(ls "$work"/deb/libzev-dev_*.deb) || fail "cpack made no libzev-dev_*.deb: see $work/cpack.log"
say "built $(basename "$deb")"

field() { dpkg-deb -f "$deb" "$1"; }
[[ $(field Package) == libzev-dev ]] || fail "Package: $(field Package)"
[[ $(field Depends) == *libzmq3-dev* ]] || fail "Depends: $(field Depends) (needs libzmq3-dev)"

# Regular files and symlinks, as "./usr/..." paths.
mapfile -t files < <(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $6 }')
lib='usr/lib(/[a-z0-9_-]+)?' # lib, or lib/<multiarch triplet> when configured for /usr
required=("usr/include/zev\.h" "$lib/libzev\.a" "$lib/libzev\.so" "$lib/libzev\.so\.[0-9]+"
    "$lib/libzev\.so\.[0-9]+\.[0-9]+\.[0-9]+" "$lib/pkgconfig/zev\.pc" "$lib/pkgconfig/zev-static\.pc"
    "$lib/cmake/zev/zevConfig\.cmake" "$lib/cmake/zev/zevConfigVersion\.cmake"
    "$lib/cmake/zev/zevTargets\.cmake" "$lib/cmake/zev/zevTargets-[a-z]+\.cmake")
if grep -q '^ZEV_BUILD_DOCS:BOOL=ON' "$build/CMakeCache.txt"; then
    required+=("usr/share/man/man3/zev\.h\.3" "usr/share/man/man3/zev_stream_send\.3")
fi
allowed=("${required[@]}" "usr/share/man/man3/zev[a-z0-9_.]*\.3")
for re in "${required[@]}"; do
    printf '%s\n' "${files[@]}" | grep -Eqx "\./$re" || fail "no file matching /$re in the package"
done
for f in "${files[@]}"; do
    ok=
    for re in "${allowed[@]}"; do
        if grep -Eqx "\./$re" <<<"$f"; then ok=1 && break; fi
    done
    [[ -n $ok ]] || fail "unexpected file in the package: $f"
done
say "dpkg-deb -c: ${#files[@]} files, the expected ones:"
printf '  %s\n' "${files[@]}" | grep -v '/man3/' || true
say "  ... and $(printf '%s\n' "${files[@]}" | grep -c '/man3/' || true) man pages in /usr/share/man/man3"
say "ok"
