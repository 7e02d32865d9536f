#!/usr/bin/env bash
# Builds the optimised tree and the Debian package: build/blockway_VERSION_ARCH.deb.
# Install it with: sudo apt install ./build/blockway_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --build-only
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build blockwayd blockway
(cd build && cpack -G DEB)
ls -l build/*.deb
