#!/usr/bin/env bash
# Builds blockwayd and runs it in the foreground. With no arguments it serves
# its embedded default: a sparse 1 GiB demo image as export "demo" on
# localhost:10809 (try: nbdinfo nbd://localhost/demo). Arguments are passed
# to blockwayd (see ./build/blockwayd --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build
exec ./build/blockwayd "$@"
