#!/usr/bin/env bash
# A/B of two blockwayd builds reading an RBD image in order: fio's nbd
# engine, sequential 256 KiB reads at QD16 (a kernel's readahead or a small
# request copy; nbdcopy would take the 4 MiB preferred block), and nbdcopy
# to /dev/shm as bench/rbd.sh does. Per run: MB/s, and the CPU seconds per
# GB of blockwayd and of the OSD (utime + stime from /proc), which a loaded
# machine blurs less than the rate. Builds alternate, order flipped every
# other round, one cluster for all (bench/ceph_cluster.py).
#
# Usage: bench/rbd_seq_ab.sh OLD_BLOCKWAYD NEW_BLOCKWAYD   (as root)
# Environment: BENCH_REPS (rounds, default 4), BENCH_SIZE_MIB (default 256),
# BENCH_TMPDIR.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 5 4 256
[[ $# == 2 && -x $1 && -x $2 ]] || die "usage: $0 OLD_BLOCKWAYD NEW_BLOCKWAYD"
OLD=$1 NEW=$2
bench_remote_setup rbd-seq-ab ceph-mon ceph-osd qemu-img nbdcopy fio jq
BW_PID=
before_cleanup() { stop_pid "$BW_PID"; rm -f /dev/shm/rbd-seq-ab.$$.raw; }
bench_cleanup_trap before_cleanup

BYTES=$((SIZE_MIB * 1024 * 1024))
bench_ceph_cluster "$TMP/src.raw"
rm -f "$TMP/src.raw"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

one() {   # one LABEL BINARY TEST -> a result row
    local t0 t1 b0 o0 mbs
    bench_blockwayd "$2" "rbd://rbd/bench?conf=$CONF&keyring=$KEYRING"
    b0=$(ticks "$BW_PID") o0=$(ticks "$OSD") t0=$(now)
    case $3 in
        fio256k) fio --name=s --ioengine=nbd --uri="$NBD" --rw=read --bs=256k --iodepth=16 \
                     --size="$BYTES" --output-format=json --output="$TMP/fio.json" >/dev/null ;;
        nbdcopy) nbdcopy "$NBD" /dev/shm/rbd-seq-ab.$$.raw; rm -f /dev/shm/rbd-seq-ab.$$.raw ;;
    esac
    t1=$(now)
    mbs=$(mbps "$BYTES" "$t0" "$t1")
    echo "$1 $3 $mbs $(awk -v b=$(( $(ticks "$BW_PID") - b0 )) -v o=$(( $(ticks "$OSD") - o0 )) -v hz="$hz" \
        -v gb="$BYTES" 'BEGIN {printf "%.3f %.3f", b / hz / (gb / 1e9), o / hz / (gb / 1e9)}')"
    stop_pid "$BW_PID"
    BW_PID=
}

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$RESULTS"
for ((round = 1; round <= REPS; round++)); do
    order=(old new); ((round % 2 == 0)) && order=(new old)
    for test in fio256k nbdcopy; do
        for who in "${order[@]}"; do
            bin=$OLD; [[ $who == new ]] && bin=$NEW
            one "$who" "$bin" "$test" | tee -a "$RESULTS"
        done
    done
done
echo
"$PY" - "$RESULTS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print("| test | build | MB/s (median) | blockwayd CPU-s/GB | OSD CPU-s/GB | MB/s per round |")
print("| --- | --- | ---: | ---: | ---: | --- |")
for test in ("fio256k", "nbdcopy"):
    for who in ("old", "new"):
        rs = [r for r in rows if r[0] == who and r[1] == test]
        med = [statistics.median(float(r[i]) for r in rs) for i in (2, 3, 4)]
        print(f"| {test} | {who} | {med[0]:.0f} | {med[1]:.3f} | {med[2]:.3f} | " + " ".join(r[2] for r in rs) + " |")
EOF
echo
echo "old: $OLD; new: $NEW; load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
