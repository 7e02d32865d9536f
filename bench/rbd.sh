#!/usr/bin/env bash
# Benchmark the RBD backend: blockwayd serving an image of a one-node Ceph
# cluster (mon + bluestore OSD on a sparse file, loopback, cephx; the
# integration tests' fixture, bench/ceph_cluster.py) as an NBD export, next to
# the direct librbd clients on the same image: qemu-img convert with qemu's
# rbd driver (qemu-block-extra) and `rbd bench`.
#
# Usage: bench/rbd.sh            (as root)
#
# Environment knobs:
#   BENCH_QUICK=1       smoke test: one round, 2 s fio runs, 256 MiB image
#   BENCH_RUNTIME=N     seconds per fio run (default 10; 2 in quick mode)
#   BENCH_REPS=N        rounds; each figure is the median (default 3; 1 quick)
#   BENCH_SIZE_MIB=N    image size in MiB (default 512; 256 in quick mode)
#   BENCH_TMPDIR=DIR    where the cluster and the cache go (default /var/tmp)
#   BLOCKWAYD=PATH      daemon binary (default <repo>/build/blockwayd)
#
# Method: one cluster, one image `bench`, written full of random data first.
# Each round, in turn: sequential read of the whole image into /dev/shm
# (nbdcopy from blockwayd's export; qemu-img convert from rbd:; and
# qemu-img convert from blockwayd's nbd:// export, the same client on both
# sides, so the gateway's own cost is seen apart from nbdcopy's), sequential
# write of a random source over the whole image (the same three: nbdcopy to
# blockwayd, qemu-img convert -n to rbd: and to blockwayd's export), 4k
# QD16 random read and write (fio's nbd engine through blockwayd;
# `rbd bench --io-threads 16 --io-pattern rand`, librbd directly, with its
# cache as it runs by default (on) and with --rbd_cache=false, as blockwayd
# runs librbd by default; and fio's own rbd engine, librbd inside fio with
# its cache off: the same client program as through blockwayd, without the
# NBD hop); blockwayd again with rbd_cache=on (nbdcopy seq
# read and write, fio 4k); and 4k QD16 random read through blockwayd with a
# warm cache (cache=DIR, prefetched whole before fio starts). blockwayd runs
# without a cache unless said, is started per contender (it holds the
# image's exclusive lock) and must exit 0 after SIGTERM.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 3 512
[[ $QUICK == 1 ]] && SIZE_MIB=${BENCH_SIZE_MIB:-256}
RBD_OPS=$((QUICK == 1 ? 20000 : 100000))   # rbd bench 4k requests

bench_remote_setup rbd-bench ceph-mon ceph-osd rbd qemu-img nbdcopy nbdinfo fio jq
fio --enghelp 2>/dev/null | grep -qw rbd || die "this fio has no rbd engine (Debian's fio has it)"
SRC=$TMP/src.raw
OUT=/dev/shm/rbd-bench-out.$$.raw
BW_PID=

before_cleanup() {
    stop_pid "$BW_PID"
    [[ $1 -eq 0 ]] || bench_tail_logs 15 "$TMP"/blockwayd.log "$TMP"/cluster.log
    rm -f "$OUT"
}
bench_cleanup_trap before_cleanup

# ---------------------------------------------------------------- setup
BYTES=$((SIZE_MIB * 1024 * 1024))
echo "Starting a Ceph cluster in $TMP/cluster ..." >&2
bench_ceph_cluster "$SRC"
URI="rbd://rbd/bench?conf=$CONF&keyring=$KEYRING"
: >"$RESULTS"

# ---------------------------------------------------------------- blockwayd
start_blockwayd() {   # start_blockwayd [OPTIONS [URI-QUERY]] -> sets BW_PID, NBD
    bench_blockwayd "$BLOCKWAYD" "$URI${2:+&$2}${1:+,$1}"
}
stop_blockwayd() { bench_stop_blockwayd; }

timed() {   # timed CMD... -> MB/s for BYTES
    local t0 t1
    t0=$(now)
    "$@" >/dev/null 2>"$TMP/cmd.err" || { cat "$TMP/cmd.err" >&2; die "failed: $*"; }
    t1=$(now)
    mbps "$BYTES" "$t0" "$t1"
}

fio_4k() {   # fio_4k URI randread|randwrite -> IOPS
    local v
    v=$(fio_nbd "$1" "$2" 4k)
    echo "${v% *}"
}

fio_rbd() {   # fio_rbd randread|randwrite -> IOPS (4k QD16, fio's rbd engine: librbd in fio, cache off)
    local dir=read
    [[ $1 == randwrite ]] && dir=write
    CEPH_CONF=$CONF CEPH_ARGS="--keyring $KEYRING --rbd_cache=false" fio --name="$1" --ioengine=rbd \
        --clientname=admin --pool=rbd --rbdname=bench --rw="$1" --bs=4k --iodepth=16 --numjobs=1 --time_based \
        --runtime="$RUNTIME" --size="${SIZE_MIB}M" --output-format=json --output="$TMP/fio-rbd.json" \
        >/dev/null 2>"$TMP/cmd.err" || { cat "$TMP/cmd.err" >&2; die "fio's rbd engine $1 failed"; }
    [[ $(jq '.jobs[0].error' "$TMP/fio-rbd.json") == 0 ]] || die "fio's rbd engine $1 reported an error"
    jq ".jobs[0].$dir.iops | floor" "$TMP/fio-rbd.json"
}

rbd_bench() {   # rbd_bench read|write [CEPH-OPTION...] -> IOPS (4k random, 16 threads, librbd directly)
    local type=$1; shift
    rbd -c "$CONF" --keyring "$KEYRING" "$@" bench --io-type "$type" --io-size 4K --io-threads 16 --io-pattern rand \
        --io-total $((RBD_OPS * 4096)) rbd/bench 2>"$TMP/cmd.err" | awk '/^elapsed:/ {print int($6)}' \
        | grep . || { cat "$TMP/cmd.err" >&2; die "rbd bench $type failed"; }
}

# ---------------------------------------------------------------- machine info
bench_machine_info "$(dpkg-query -W -f='ceph ${Version}' ceph-osd 2>/dev/null); $(qemu-img --version | head -n1)" \
    "cluster: 1 mon, 1 OSD (bluestore on a sparse file in $(df --output=fstype "$TMP" | tail -n1 | tr -d ' ')), pool size 1, loopback, cephx" \
    "image: ${SIZE_MIB} MiB, 4 MiB objects, random data; reads land in /dev/shm" \
    "fio runtime ${RUNTIME} s, rbd bench ${RBD_OPS} requests, ${REPS} round(s), median reported"

# ---------------------------------------------------------------- run
for ((round = 1; round <= REPS; round++)); do
    start_blockwayd
    nbd=$NBD
    record blockwayd seqread "$round" "$(timed nbdcopy "$nbd" "$OUT")"; rm -f "$OUT"
    record blockwayd seqwrite "$round" "$(timed nbdcopy "$SRC" "$nbd")"
    record blockwayd randread "$round" "$(fio_4k "$nbd" randread)"
    record blockwayd randwrite "$round" "$(fio_4k "$nbd" randwrite)"
    record blockwayd-qemu seqread "$round" "$(timed qemu-img convert -f raw -O raw "$nbd" "$OUT")"; rm -f "$OUT"
    record blockwayd-qemu seqwrite "$round" "$(timed qemu-img convert -n -f raw -O raw "$SRC" "$nbd")"
    stop_blockwayd
    start_blockwayd "" rbd_cache=on
    record blockwayd-rbdcache seqread "$round" "$(timed nbdcopy "$NBD" "$OUT")"; rm -f "$OUT"
    record blockwayd-rbdcache seqwrite "$round" "$(timed nbdcopy "$SRC" "$NBD")"
    record blockwayd-rbdcache randread "$round" "$(fio_4k "$NBD" randread)"
    record blockwayd-rbdcache randwrite "$round" "$(fio_4k "$NBD" randwrite)"
    stop_blockwayd

    record qemu-img seqread "$round" "$(timed qemu-img convert -f raw -O raw "$QEMU" "$OUT")"; rm -f "$OUT"
    record qemu-img seqwrite "$round" "$(timed qemu-img convert -n -f raw -O raw "$SRC" "$QEMU")"
    record rbd-bench randread "$round" "$(rbd_bench read)"
    record rbd-bench randwrite "$round" "$(rbd_bench write)"
    # librbd's own cache is on by default in rbd bench, rbd-nbd and qemu
    # (cache=writeback); blockwayd runs it off unless rbd_cache=on: the
    # like-for-like pairs are blockwayd / --rbd_cache=false and
    # blockwayd rbd_cache=on / rbd bench's default.
    record rbd-bench-nocache randread "$round" "$(rbd_bench read --rbd_cache=false)"
    record rbd-bench-nocache randwrite "$round" "$(rbd_bench write --rbd_cache=false)"
    record fio-rbd randread "$round" "$(fio_rbd randread)"
    record fio-rbd randwrite "$round" "$(fio_rbd randwrite)"

    # a warm cache: prefetch everything, then random reads
    rm -rf "$TMP/cache" "$TMP/data"
    mkdir -p "$TMP/cache"
    start_blockwayd "cache=$TMP/cache,prefetch=sequential"
    for _ in $(seq 600); do grep -q "prefetch done" "$TMP/blockwayd.log" && break; sleep 0.2; done
    grep -q "prefetch done" "$TMP/blockwayd.log" || die "the prefetch did not finish within 120 s"
    record blockwayd-warm randread "$round" "$(fio_4k "$NBD" randread)"
    stop_blockwayd
    : >"$TMP/blockwayd.log"
    echo "round $round/$REPS: $(awk -F'\t' -v r="$round" '$3==r {printf "%s/%s=%s ", $1, $2, $4}' "$RESULTS")" >&2
done

# The data path is right: what blockwayd reads is what qemu's driver wrote.
qemu-img convert -n -f raw -O raw "$SRC" "$QEMU"
start_blockwayd
nbdcopy "$NBD" "$OUT"
stop_blockwayd
cmp -s "$SRC" "$OUT" || die "blockwayd read back something else than qemu-img wrote"
rm -f "$OUT"

# ---------------------------------------------------------------- report
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
PYTHONPATH=$repo/bench "$PY" - "$RESULTS" "$LOAD_END" <<'EOF'
import statistics, sys
from lib import read_results
rows, data, med = read_results(sys.argv[1])
by_round = {(w, t, r): float(v) for w, t, r, v in rows}
rounds = sorted({r for _, _, r, _ in rows}, key=int)
def ratio(ours, theirs, t_ours, t_theirs=None):
    t_theirs = t_theirs or t_ours
    rs = [by_round[(ours, t_ours, r)] / by_round[(theirs, t_theirs, r)] for r in rounds
          if (ours, t_ours, r) in by_round and (theirs, t_theirs, r) in by_round]
    return rs
lines = [("seq read MB/s (nbdcopy vs qemu-img convert)", "blockwayd", "qemu-img", "seqread", None, 1.0),
         ("seq read MB/s, same client (qemu-img convert from nbd:// vs from rbd:)", "blockwayd-qemu", "qemu-img",
          "seqread", None, 1.0),
         ("seq write MB/s (nbdcopy vs qemu-img convert -n)", "blockwayd", "qemu-img", "seqwrite", None, 1.0),
         ("seq write MB/s, same client (qemu-img convert -n to nbd:// vs to rbd:)", "blockwayd-qemu", "qemu-img",
          "seqwrite", None, 1.0),
         ("4k randread IOPS QD16 (fio nbd vs rbd bench as it runs by default, librbd cache on)", "blockwayd",
          "rbd-bench", "randread", None, 0.9),
         ("4k randwrite IOPS QD16 (fio nbd vs rbd bench as it runs by default, librbd cache on)", "blockwayd",
          "rbd-bench", "randwrite", None, 0.9),
         ("4k randread IOPS QD16, librbd cache off on both (fio nbd vs rbd bench --rbd_cache=false)",
          "blockwayd", "rbd-bench-nocache", "randread", None, 0.9),
         ("4k randwrite IOPS QD16, librbd cache off on both (fio nbd vs rbd bench --rbd_cache=false)",
          "blockwayd", "rbd-bench-nocache", "randwrite", None, 0.9),
         ("4k randread IOPS QD16, the same client program (fio nbd vs fio's rbd engine, librbd cache off on both)",
          "blockwayd", "fio-rbd", "randread", None, 0),
         ("4k randwrite IOPS QD16, the same client program (fio nbd vs fio's rbd engine, librbd cache off on both)",
          "blockwayd", "fio-rbd", "randwrite", None, 0),
         ("4k randread IOPS QD16, librbd cache on on both (fio nbd, rbd_cache=on vs rbd bench)",
          "blockwayd-rbdcache", "rbd-bench", "randread", None, 0.9),
         ("4k randwrite IOPS QD16, librbd cache on on both (fio nbd, rbd_cache=on vs rbd bench)",
          "blockwayd-rbdcache", "rbd-bench", "randwrite", None, 0.9),
         ("seq read MB/s, blockwayd rbd_cache=on vs off (nbdcopy, same run)", "blockwayd-rbdcache", "blockwayd",
          "seqread", None, 0),
         ("seq write MB/s, blockwayd rbd_cache=on vs off (nbdcopy, same run)", "blockwayd-rbdcache", "blockwayd",
          "seqwrite", None, 0),
         ("4k randread IOPS QD16, blockwayd rbd_cache=on vs off (same run)", "blockwayd-rbdcache", "blockwayd",
          "randread", None, 0),
         ("4k randwrite IOPS QD16, blockwayd rbd_cache=on vs off (same run)", "blockwayd-rbdcache", "blockwayd",
          "randwrite", None, 0),
         ("4k randread IOPS QD16, warm cache vs the cluster directly (rbd bench)", "blockwayd-warm", "rbd-bench",
          "randread", None, 10.0)]
print("## Results (median of rounds)")
print()
print("| test | blockwayd | direct | blockwayd / direct (per-round median) | target | met |")
print("| --- | ---: | ---: | ---: | ---: | --- |")
for label, ours, theirs, t, _, target in lines:
    rs = ratio(ours, theirs, t)
    m = statistics.median(rs) if rs else float("nan")
    print(f"| {label} | {med[(ours, t)]:.0f} | {med[(theirs, t)]:.0f} | {m:.2f} (rounds: "
          + " ".join("%.2f" % x for x in rs) + ") | "
          + (f"{target:g}x | {'yes' if m >= target else 'no'} |" if target else "- | - |"))
print()
print("All runs:", "; ".join(f"{w}/{t}: " + ", ".join("%.0f" % x for x in v) for (w, t), v in sorted(data.items())))
print()
print(f"Load average at end: {sys.argv[2]}")
EOF
