#!/bin/bash
# What the QoS layer costs a request when limits are set but not reached,
# counted in instructions by callgrind: repeatable on a shared, loaded
# machine where IOPS and CPU-time figures swing by tens of per cent.
#
# For each binary given (default: build/blockwayd) and each export kind
# (off: no limits; on: qos-read-iops/bps limits it never reaches), a fresh
# daemon runs under `valgrind --tool=callgrind`, fio reads N 4k blocks from
# it (nbd engine, QD16, random offsets of a 64 MiB file in the page cache)
# and the daemon stops. The slope between two request counts (N1, N2) is
# the daemon's user-space instructions per request; start-up and shutdown
# cancel out. Kernel time is not counted: the share printed is of the
# daemon's user-space instructions.
# Usage: bench/qos_instructions.sh [BLOCKWAYD...]   (BENCH_N1, BENCH_N2)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 1 1 64
bench_tmpdir qos-instr
bench_cleanup_trap
command -v valgrind >/dev/null || die "valgrind is not installed"

N1=${BENCH_N1:-4000}
N2=${BENCH_N2:-20000}
binaries=("$@")
((${#binaries[@]})) || binaries=("$BLOCKWAYD")

img=$TMP/img
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MIB" status=none
cat "$img" >/dev/null
declare -A spec=(
    [off]="off=file://$img"
    [on]="on=file://$img,qos-read-iops=4000000000,qos-read-bps=1T"
)

# instructions BINARY KIND N: the daemon's total instructions for N requests.
instructions() { callgrind_requests "$1" "${spec[$2]}" "$2" randread "$3"; }

bench_machine_info "callgrind; $N1 and $N2 random 4k reads per run, QD16; image ${SIZE_MIB} MiB in the page cache"
echo "## Results"
echo
echo "| binary | user instructions per 4k read, no limits | limits set but not reached | added by QoS |"
echo "| --- | --- | --- | --- |"
for bin in "${binaries[@]}"; do
    declare -A per=()
    for kind in off on; do
        a=$(instructions "$bin" "$kind" "$N1")
        b=$(instructions "$bin" "$kind" "$N2")
        per[$kind]=$(awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.0f", (b - a) / (n2 - n1) }')
        echo "$bin $kind: $a instructions for $N1 reads, $b for $N2" >&2
    done
    echo "| $bin | ${per[off]} | ${per[on]} | $(awk -v on="${per[on]}" -v off="${per[off]}" \
        'BEGIN { printf "%+.0f (%+.1f%%)", on - off, (on / off - 1) * 100 }') |"
done
