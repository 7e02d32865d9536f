#!/usr/bin/env bash
# A fuzzing campaign: each harness of tests/fuzz/ in turn (one at a time, so
# one core, at nice 19: the machine is shared) for SECONDS each, from its
# seed corpus plus a working corpus kept across campaigns in
# $BENCH_TMPDIR/blockway-fuzz (default /var/tmp). Appends one line per
# harness to bench/results/fuzz-campaign.tsv:
#   date  harness  seconds  executions  crashes  corpus_entries  commit
# (the BENCHMARKS.md figures are the sums per harness). A crashing input is
# kept in the working directory's crashes/; fix it, add it as a regression
# input (tests/fuzz/regressions/NAME/), and rerun.
# Usage: bench/fuzz.sh [SECONDS (default 3600)] [HARNESS...]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
seconds=${1:-3600}
shift || true
build=${FUZZ_BUILD:-$repo/build-fuzz}
if [[ ! -d $build ]]; then
    command -v clang++ >/dev/null || die "clang++ is needed (scripts/install-deps.sh installs it)"
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DBLOCKWAY_FUZZ=ON \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
nice -n 19 ninja -C "$build" >/dev/null
work=${BENCH_TMPDIR:-/var/tmp}/blockway-fuzz
# A copy of the harnesses, so that a rebuild during the campaign does not mix versions.
# One copy per campaign, so that campaigns of different harnesses can run in
# parallel (a running binary cannot be overwritten: ETXTBSY).
bin=$(mktemp -d "$work/bin.XXXXXX")
trap 'rm -rf "$bin"' EXIT
cp "$build"/*_fuzzer "$bin"/
commit=$(git -C "$repo" rev-parse --short HEAD)
results=$repo/bench/results/fuzz-campaign.tsv
[[ -f $results ]] || printf 'date\tharness\tseconds\texecutions\tcrashes\tcorpus_entries\tcommit\n' >"$results"
rc=0
nice -n 19 "$repo/scripts/fuzz-run.sh" "$bin" "$work" "$seconds" "$@" | while read -r name secs execs crashes entries; do
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$name" "$secs" "$execs" "$crashes" "$entries" "$commit" \
        | tee -a "$results"
done || rc=$?
exit "$rc"
