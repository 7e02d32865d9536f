#!/usr/bin/env bash
# Builds the optimised tree with the distribution's hardening flags and both
# packages from it: build-package/blockway_VERSION_ARCH.deb and
# build-package/blockway-VERSION-1.ARCH.rpm (the .rpm needs rpmbuild: the
# `rpm` package on Debian; skipped with a note when it is missing), and the
# nbdkit plugin's own package, nbdkit-plugin-blockway, in both forms beside them.
# Install with: sudo apt install ./build-package/blockway_*.deb
#           or: sudo dnf install ./build-package/blockway-*.rpm
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --build-only

# The distribution's flags, as its own package builds use them: Debian's from
# dpkg-buildflags (hardening=+all: _FORTIFY_SOURCE, stack protector, PIE,
# RELRO, BIND_NOW), Fedora's from rpm's %optflags and %build_ldflags. Our own
# BLOCKWAY_HARDENING set is then off, so no flag is given twice.
if command -v dpkg-buildflags >/dev/null; then
  export DEB_BUILD_MAINT_OPTIONS=hardening=+all
  CXXFLAGS="$(dpkg-buildflags --get CPPFLAGS) $(dpkg-buildflags --get CXXFLAGS)"
  LDFLAGS="$(dpkg-buildflags --get LDFLAGS)"
  # Debian's -ffile-prefix-map is for reproducible paths; it is harmless here.
elif command -v rpm >/dev/null && [[ $(rpm --eval '%{?build_ldflags}') != "" ]]; then
  CXXFLAGS="$(rpm --eval '%{optflags}')"
  LDFLAGS="$(rpm --eval '%{build_ldflags}')"
else
  echo "package.sh: neither dpkg-buildflags nor rpm's %build_ldflags; using blockway's own hardening flags" >&2
  CXXFLAGS="" LDFLAGS=""
fi
HARDENING=ON; [[ -n $CXXFLAGS ]] && HARDENING=OFF
# A build tree of its own, since its flags differ from build/'s; the flags are
# given on the command line so that a second run applies them again.
cmake -S . -B build-package -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      "-DCMAKE_CXX_FLAGS=$CXXFLAGS" "-DCMAKE_EXE_LINKER_FLAGS=$LDFLAGS" \
      -DBLOCKWAY_TESTS=OFF -DBLOCKWAY_HARDENING=$HARDENING >/dev/null
ninja -C build-package blockwayd blockway blockway_nbdkit_plugin
(cd build-package && cpack -G DEB && cpack -G DEB -D BLOCKWAY_PACKAGE=nbdkit-plugin)
if command -v rpmbuild >/dev/null; then
  (cd build-package && cpack -G RPM && cpack -G RPM -D BLOCKWAY_PACKAGE=nbdkit-plugin)
else
  echo "package.sh: rpmbuild missing (Debian: apt-get install rpm); no .rpm built" >&2
fi
ls -l build-package/*.deb build-package/*.rpm 2>/dev/null
