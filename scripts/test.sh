#!/usr/bin/env bash
# Builds blockway twice (optimised, and with AddressSanitizer+UBSan) and runs
# the whole test suite (unit and integration) against each build.
# Usage: ./scripts/test.sh            everything
#        ./scripts/test.sh --fast     optimised build only
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
jobs=$(nproc)

echo "=== release build ==="
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBLOCKWAY_WERROR=ON >/dev/null
ninja -C build
(cd build && ctest --output-on-failure --timeout 900 -j "$jobs")

# The libFuzzer harnesses (tests/fuzz/): a short smoke run of each from its
# seeds and regression inputs; a crash fails the run. Clang only.
if command -v clang++ >/dev/null; then
  echo "=== fuzz harnesses: ${FUZZ_SMOKE_SECONDS:-20} s each ==="
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DBLOCKWAY_FUZZ=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBLOCKWAY_WERROR=ON >/dev/null
  ninja -C build-fuzz
  fuzz_work=$(mktemp -d /tmp/blockway-fuzz-smoke.XXXXXX)
  ./scripts/fuzz-run.sh build-fuzz "$fuzz_work" "${FUZZ_SMOKE_SECONDS:-20}"
  rm -rf "$fuzz_work"
fi

if [[ "${1:-}" != "--fast" ]]; then
  echo "=== AddressSanitizer + UndefinedBehaviorSanitizer build ==="
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DBLOCKWAY_SANITIZE=ON -DBLOCKWAY_WERROR=ON >/dev/null
  ninja -C build-asan
  export ASAN_OPTIONS=abort_on_error=1:detect_leaks=1:strict_string_checks=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp
  (cd build-asan && ctest --output-on-failure --timeout 1800 -j "$jobs")
fi
