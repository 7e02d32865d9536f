#!/usr/bin/env bash
# Runs fuzz harnesses of tests/fuzz/, one after the other, each for SECONDS,
# from its seed corpus (tests/fuzz/corpus/NAME/) and the inputs that once
# crashed it (tests/fuzz/regressions/NAME/), neither written to, plus a
# working corpus under WORKDIR/NAME that grows from run to run. Prints one
# result line per harness:
#   HARNESS SECONDS EXECUTIONS CRASHES CORPUS_ENTRIES
# and keeps each crashing input as WORKDIR/crashes/NAME-crash-HASH.
# Exits 1 if any harness crashed. Used by scripts/test.sh (smoke run) and
# bench/fuzz.sh (campaign).
# Usage: scripts/fuzz-run.sh BUILD_DIR WORKDIR SECONDS [HARNESS...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build=$1 workdir=$2 seconds=$3
shift 3
harnesses=("$@")
if [[ ${#harnesses[@]} == 0 ]]; then
    for f in "$build"/*_fuzzer; do harnesses+=("$(basename "${f%_fuzzer}")"); done
fi
mkdir -p "$workdir/crashes"
failed=0
for name in "${harnesses[@]}"; do
    bin=$build/${name}_fuzzer
    [[ -x $bin ]] || { echo "fuzz-run: no harness $bin" >&2; exit 2; }
    mkdir -p "$workdir/$name"
    dict=()
    [[ -f $repo/tests/fuzz/$name.dict ]] && dict=(-dict="$repo/tests/fuzz/$name.dict")
    # Inputs that once crashed it: run first, at every start.
    regressions=()
    [[ -d $repo/tests/fuzz/regressions/$name ]] && regressions=("$repo/tests/fuzz/regressions/$name")
    log=$workdir/$name.log
    rc=0
    # Invariant 6 (bounded memory): an allocation or a process above 1 GiB is a finding.
    "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
        -artifact_prefix="$workdir/crashes/$name-" "${dict[@]}" \
        "$workdir/$name" "$repo/tests/fuzz/corpus/$name" "${regressions[@]}" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    crashes=0
    if [[ $rc != 0 ]]; then
        crashes=1 failed=1
        grep -E "ERROR|SUMMARY|Test unit written" "$log" | head -5 >&2
    fi
    echo "$name $seconds ${execs:-0} $crashes $(ls "$workdir/$name" | wc -l)"
done
exit $failed
