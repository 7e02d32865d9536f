#!/usr/bin/env bash
# Where the CPU goes when blockwayd serves an RBD image, next to the direct
# librbd clients on the same image (issue 15). On 2 cores the OSD is
# CPU-bound, so every CPU-microsecond the client side spends per request is
# taken from the OSD: this splits it per process, per request, which a
# loaded machine blurs far less than the rates do.
#
#   4k: fio's nbd engine, 4k random reads at QD16 through blockwayd, against
#       `rbd bench --rbd_cache=false --io-threads 16 --io-pattern rand`
#       (librbd in-process). CPU-us per read of: blockwayd's own threads
#       (event loops: NBD, submission, completion posts), librbd/librados'
#       threads inside blockwayd (io_context_pool, msgr-worker-*, ...), fio,
#       and the OSD; of `rbd bench` (all its threads) and the OSD.
#       Also the voluntary context switches per read (a thread going to
#       sleep to wait: each hop between threads costs one) of blockwayd's
#       own threads, of librbd's inside it, of `rbd bench` and of the OSD.
#   seq: nbdcopy of the whole image to /dev/shm through blockwayd, against
#       `qemu-img convert` with qemu's rbd driver; CPU-seconds per GB of the
#       same processes (nbdcopy for fio, qemu-img for rbd bench).
#
# Usage: bench/rbd_cpu.sh            (as root)
# Environment: BENCH_REPS (rounds, default 3), BENCH_RUNTIME (fio seconds,
# default 5), BENCH_SIZE_MIB (default 256), BENCH_TMPDIR, BLOCKWAYD.
# One cluster for all (bench/ceph_cluster.py); blockwayd and the direct
# client alternate, order flipped every other round; medians reported.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 5 3 256
bench_remote_setup rbd-cpu ceph-mon ceph-osd rbd qemu-img nbdcopy nbdinfo fio jq
BW_PID=
before_cleanup() { stop_pid "$BW_PID"; rm -f /dev/shm/rbd-cpu.$$.raw; }
bench_cleanup_trap before_cleanup

BYTES=$((SIZE_MIB * 1024 * 1024))
RBD_OPS=60000
bench_ceph_cluster "$TMP/src.raw"
rm -f "$TMP/src.raw"

hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# blockwayd's threads, split: "own librados" CPU ticks (split_ticks) or
# voluntary context switches (split_switches); librbd and librados name their
# threads, blockwayd's own keep the process name.
thread_ticks() { awk '{print $14 + $15}' "$1/stat"; }
thread_switches() { awk '/^voluntary_ctxt_switches/ {print $2}' "$1/status"; }
split_threads() {   # split_threads PID thread_ticks|thread_switches
    local t own=0 lib=0 comm v
    for t in /proc/"$1"/task/*; do
        comm=$(<"$t/comm") v=$("$2" "$t" 2>/dev/null) || continue
        if [[ $comm == blockwayd* ]]; then own=$((own + v)); else lib=$((lib + v)); fi
    done
    echo "$own $lib"
}
split_ticks() { split_threads "$1" thread_ticks; }
split_switches() { split_threads "$1" thread_switches; }
switches() {
    local t own=0 lib=0 comm v
    for t in /proc/"$1"/task/*; do
        comm=$(<"$t/comm") v=$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status" 2>/dev/null) || continue
        if [[ $comm == blockwayd* ]]; then own=$((own + v)); else lib=$((lib + v)); fi
    done
    echo "$own $lib"
}
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}'; }
# per_req COUNT N -> COUNT per request
per_req() { awk -v c="$1" -v n="$2" 'BEGIN {printf "%.2f", c / n}'; }
# per_op TICKS COUNT -> CPU-us per op
per_op() { awk -v t="$1" -v n="$2" -v hz="$hz" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}'; }
per_gb() { awk -v t="$1" -v hz="$hz" -v b="$BYTES" 'BEGIN {printf "%.3f", t / hz / (b / 1e9)}'; }

start_bw() { bench_blockwayd "$BLOCKWAYD" "rbd://rbd/bench?conf=$CONF&keyring=$KEYRING"; }
stop_bw() { bench_stop_blockwayd; }

# Rows: 4k blockwayd IOPS own lib fio osd own-cs lib-cs osd-cs | 4k direct IOPS rbd osd rbd-cs osd-cs
#       (CPU-us and voluntary context switches per read)
#       seq blockwayd MB/s own lib nbdcopy osd | seq direct MB/s qemu-img osd
bw_4k() {
    local own0 lib0 own1 lib1 o0 o1 n fcpu sown0 slib0 sown1 slib1 so0 so1
    start_bw
    read -r own0 lib0 < <(split_ticks "$BW_PID"); o0=$(ticks "$OSD")
    read -r sown0 slib0 < <(split_switches "$BW_PID"); so0=$(switches "$OSD")
    fio --name=r --ioengine=nbd --uri="$NBD" --rw=randread --bs=4k --iodepth=16 --numjobs=1 --time_based \
        --runtime="$RUNTIME" --size="${SIZE_MIB}M" --output-format=json --output="$TMP/fio.json" >/dev/null
    read -r own1 lib1 < <(split_ticks "$BW_PID"); o1=$(ticks "$OSD")
    read -r sown1 slib1 < <(split_switches "$BW_PID"); so1=$(switches "$OSD")
    stop_bw
    n=$(jq '.jobs[0].read.total_ios' "$TMP/fio.json")
    # fio's usr/sys are percent of its wall time
    fcpu=$(jq -r --arg hz "$hz" '(.jobs[0].usr_cpu + .jobs[0].sys_cpu) / 100 * .jobs[0].elapsed * ($hz | tonumber)' \
        "$TMP/fio.json")
    echo "4k blockwayd $(jq '.jobs[0].read.iops | floor' "$TMP/fio.json") $(per_op $((own1 - own0)) "$n") \
$(per_op $((lib1 - lib0)) "$n") $(per_op "$fcpu" "$n") $(per_op $((o1 - o0)) "$n") \
$(per_req $((sown1 - sown0)) "$n") $(per_req $((slib1 - slib0)) "$n") $(per_req $((so1 - so0)) "$n")"
}
direct_4k() {
    local o0 o1 iops c so0 so1
    o0=$(ticks "$OSD"); so0=$(switches "$OSD")
    /usr/bin/time -o "$TMP/time" -f "%U %S %w" rbd -c "$CONF" --keyring "$KEYRING" --rbd_cache=false bench \
        --io-type read --io-size 4K --io-threads 16 --io-pattern rand --io-total $((RBD_OPS * 4096)) rbd/bench \
        >"$TMP/rbd.out" 2>&1 || { cat "$TMP/rbd.out" >&2; die "rbd bench failed"; }
    o1=$(ticks "$OSD"); so1=$(switches "$OSD")
    iops=$(awk '/^elapsed:/ {print int($6)}' "$TMP/rbd.out")
    c=$(awk -v hz="$hz" '{print ($1 + $2) * hz}' "$TMP/time")
    echo "4k direct $iops $(per_op "$c" "$RBD_OPS") $(per_op $((o1 - o0)) "$RBD_OPS") \
$(per_req "$(awk '{print $3}' "$TMP/time")" "$RBD_OPS") $(per_req $((so1 - so0)) "$RBD_OPS")"
}
bw_seq() {
    local own0 lib0 own1 lib1 o0 o1 t0 t1 c
    start_bw
    read -r own0 lib0 < <(split_ticks "$BW_PID"); o0=$(ticks "$OSD"); t0=$(now)
    /usr/bin/time -o "$TMP/time" -f "%U %S" nbdcopy "$NBD" /dev/shm/rbd-cpu.$$.raw
    t1=$(now); read -r own1 lib1 < <(split_ticks "$BW_PID"); o1=$(ticks "$OSD")
    rm -f /dev/shm/rbd-cpu.$$.raw
    stop_bw
    c=$(awk -v hz="$hz" '{print ($1 + $2) * hz}' "$TMP/time")
    echo "seq blockwayd $(mbps "$BYTES" "$t0" "$t1") $(per_gb $((own1 - own0))) $(per_gb $((lib1 - lib0))) \
$(per_gb "$c") $(per_gb $((o1 - o0)))"
}
direct_seq() {
    local o0 o1 t0 t1 c
    o0=$(ticks "$OSD"); t0=$(now)
    /usr/bin/time -o "$TMP/time" -f "%U %S" qemu-img convert -f raw -O raw "$QEMU" /dev/shm/rbd-cpu.$$.raw
    t1=$(now); o1=$(ticks "$OSD")
    rm -f /dev/shm/rbd-cpu.$$.raw
    c=$(awk -v hz="$hz" '{print ($1 + $2) * hz}' "$TMP/time")
    echo "seq direct $(mbps "$BYTES" "$t0" "$t1") $(per_gb "$c") $(per_gb $((o1 - o0)))"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$RESULTS"
for ((round = 1; round <= REPS; round++)); do
    if ((round % 2)); then order=(bw_4k direct_4k bw_seq direct_seq); else order=(direct_4k bw_4k direct_seq bw_seq); fi
    for f in "${order[@]}"; do "$f" | tee -a "$RESULTS" >&2; done
done

"$PY" - "$RESULTS" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" "$BLOCKWAYD_ORIG" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
def med(kind, who, i):
    return statistics.median(float(r[i]) for r in rows if r[0] == kind and r[1] == who)
tables = (("4k", "4k random read QD16, CPU-us per read", "IOPS", "fio nbd -> blockwayd", "fio",
           "rbd bench --rbd_cache=false", "rbd", "%.1f"),
          ("seq", "sequential read of the image to /dev/shm, CPU-s per GB", "MB/s", "nbdcopy -> blockwayd", "nbdcopy",
           "qemu-img convert (rbd:)", "qemu-img", "%.3f"))
for kind, title, rate, bw_name, bw_client, direct_name, direct_client, f in tables:
    b = [med(kind, "blockwayd", i) for i in range(2, 7)]
    d = [med(kind, "direct", i) for i in range(2, 5)]
    print("%s (median of rounds):\n" % title)
    print("| client | %s | blockwayd's threads | librbd/librados in blockwayd | client process | OSD | all |" % rate)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(("| %s | %.0f | " + " | ".join([f] * 2) + " | " + f + " (%s) | " + f + " | " + f + " |")
          % (bw_name, b[0], b[1], b[2], b[3], bw_client, b[4], sum(b[1:])))
    print(("| %s | %.0f | | | " + f + " (%s) | " + f + " | " + f + " |\n")
          % (direct_name, d[0], d[1], direct_client, d[2], sum(d[1:])))
b = [med("4k", "blockwayd", i) for i in (7, 8, 9)]
d = [med("4k", "direct", i) for i in (5, 6)]
print("4k random read QD16, voluntary context switches per read (median of rounds):\n")
print("| client | blockwayd's threads | librbd/librados in blockwayd | client process | OSD |")
print("| --- | ---: | ---: | ---: | ---: |")
print("| fio nbd -> blockwayd | %.2f | %.2f | | %.2f |" % tuple(b))
print("| rbd bench --rbd_cache=false | | | %.2f (rbd) | %.2f |\n" % tuple(d))
print("load average at start %s, at end %s; blockwayd: %s" % (sys.argv[2], sys.argv[3], sys.argv[4]))
EOF
