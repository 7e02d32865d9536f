#!/usr/bin/env bash
# Benchmark the iscsi:// backend: blockwayd in front of a tgt LUN (NBD
# clients: nbdcopy, fio's nbd engine), next to clients that read the same LUN
# directly over iSCSI (iscsi-perf from libiscsi-bin, qemu-img convert from
# qemu-block-extra). No cache layer. One run, side by side.
#
# Usage: bench/iscsi.sh
#
# Environment knobs:
#   BENCH_QUICK=1       smoke test: one round, 2 s timed runs, 256 MiB LUN
#   BENCH_RUNTIME=N     seconds per fio / iscsi-perf run (default 10; 2 quick)
#   BENCH_REPS=N        rounds; each figure is the median (default 3; 1 quick)
#   BENCH_SIZE_MIB=N    LUN size in MiB (default 1024; 256 quick)
#   BENCH_TMPDIR=DIR    where the temp dir goes (default /var/tmp)
#   BLOCKWAYD=PATH      daemon binary (default <repo>/build/blockwayd)
#
# Method: one tgtd (userspace target, rdwr backing store on a file of random
# data in page cache) on a free loopback port. Per round:
#   seq read   blockwayd: nbdcopy --requests=64 --connections=4 nbd://... null:
#              qemu-img:  qemu-img convert -m 16 -f raw iscsi://... null-co
#              iscsi-perf -m 16 -b 512 (256 KiB requests, sequential, timed)
#   seq write  blockwayd: nbdcopy --requests=64 --connections=4 SRC nbd://...
#              qemu-img:  qemu-img convert -n -m 16 SRC iscsi://...
#              (both end with a flush: SYNCHRONIZE CACHE -> tgt's fdatasync)
#   4k rand    blockwayd: fio --ioengine=nbd --bs=4k --iodepth=16 randread / randwrite
#              iscsi-perf -r -m 16 -b 8 (4 KiB random reads, QD16); it has no write mode
# blockwayd runs twice per round: with its default (one iSCSI session per
# event loop, 2 here) and with sessions=1.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 3
IQN=iqn.2026-11.io.blockway.bench:lun

bench_remote_setup iscsi-bench tgtd tgtadm iscsi-perf qemu-img nbdcopy fio jq
IMG=$TMP/lun.raw
SRC=$TMP/src.raw
TGT_PID=
BW_PID=
CONTROL=

before_cleanup() {
    stop_pid "$BW_PID"
    if [[ -n $TGT_PID ]]; then
        # tgtd ignores SIGTERM while it has targets: remove them first.
        tgtadm -C "$CONTROL" --op delete --mode system --force >/dev/null 2>&1 || true
        stop_pid "$TGT_PID"
    fi
    if [[ $1 -ne 0 ]]; then
        for f in "$TMP"/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
    fi
}
bench_cleanup_trap before_cleanup

# ---------------------------------------------------------------- target
PORT=$(free_port)
start_tgt() {
    for _ in 1 2 3 4 5; do
        CONTROL=$((RANDOM % 30000 + 1000))
        bench_start "$TMP/tgtd.log" tgtd -f -C "$CONTROL" --iscsi "portal=127.0.0.1:$PORT"
        TGT_PID=$BG_PID
        for _ in $(seq 100); do
            kill -0 "$TGT_PID" 2>/dev/null || break
            tgtadm -C "$CONTROL" --op show --mode target >/dev/null 2>&1 && return 0
            sleep 0.05
        done
        stop_pid "$TGT_PID" KILL
        TGT_PID=
    done
    die "tgtd did not start"
}

echo "iscsi.sh: ${SIZE_MIB} MiB random image in $TMP ..." >&2
head -c $((SIZE_MIB << 20)) /dev/urandom >"$IMG"
cp "$IMG" "$SRC"
start_tgt
tgtadm -C "$CONTROL" --lld iscsi --op new --mode target --tid 1 -T "$IQN"
tgtadm -C "$CONTROL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
tgtadm -C "$CONTROL" --lld iscsi --op bind --mode target --tid 1 -I ALL
LUN_URI=iscsi://127.0.0.1:$PORT/$IQN/1
BYTES=$((SIZE_MIB << 20))

start_blockwayd() {  # extra export options
    local port
    port=$(free_port)
    rm -f "$TMP/bw.pid"
    bench_start "$TMP/blockwayd.log" "$BLOCKWAYD" --listen "127.0.0.1:$port" --export "bench=$LUN_URI$1" \
        --pid-file "$TMP/bw.pid"
    BW_PID=$BG_PID
    wait_pid_file "$TMP/bw.pid" "$BW_PID"
    NBD_URI=nbd://127.0.0.1:$port/bench
}

fio_iops() {  # rw uri
    local v
    v=$(fio_nbd "$2" "$1" 4k)
    echo "${v% *}"
}

perf_avg() {  # iscsi-perf args...; prints "iops MB/s"
    timeout $((RUNTIME + 20)) iscsi-perf -t "$RUNTIME" "$@" "$LUN_URI" >"$TMP/perf.out" 2>&1 || true
    tr '\r' '\n' <"$TMP/perf.out" | grep -o 'iops average [0-9]* ([0-9]* MB/s)' | tail -n1 |
        sed -E 's/iops average ([0-9]+) \(([0-9]+) MB\/s\)/\1 \2/'
}


for round in $(seq "$REPS"); do
    echo "iscsi.sh: round $round/$REPS" >&2
    for variant in default sessions=1; do
        opts=""; [[ $variant == sessions=1 ]] && opts=",sessions=1"
        start_blockwayd "$opts"
        t0=$(now); nbdcopy --requests=64 --connections=4 "$NBD_URI" null: ; t1=$(now)
        record "blockwayd ($variant)" seqread "$(mbps $BYTES "$t0" "$t1")"
        t0=$(now); nbdcopy --requests=64 --connections=4 "$SRC" "$NBD_URI"; t1=$(now)
        record "blockwayd ($variant)" seqwrite "$(mbps $BYTES "$t0" "$t1")"
        record "blockwayd ($variant)" randread "$(fio_iops randread "$NBD_URI")"
        record "blockwayd ($variant)" randwrite "$(fio_iops randwrite "$NBD_URI")"
        stop_pid "$BW_PID"; BW_PID=
        grep -q "session(s)" "$TMP/blockwayd.log" || die "blockwayd did not open the LUN"
    done
    t0=$(now)
    qemu-img convert -m 16 -f raw -O raw -n "$LUN_URI" \
        "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"null-co\",\"size\":$BYTES}}"
    t1=$(now)
    record "qemu-img convert" seqread "$(mbps $BYTES "$t0" "$t1")"
    t0=$(now); qemu-img convert -m 16 -f raw -O raw -n "$SRC" "$LUN_URI"; t1=$(now)
    record "qemu-img convert" seqwrite "$(mbps $BYTES "$t0" "$t1")"
    read -r _ mb < <(perf_avg -m 16 -b 512)
    record "iscsi-perf" seqread "$mb"
    read -r iops _ < <(perf_avg -m 16 -b 8 -r)
    record "iscsi-perf" randread "$iops"
done
cmp "$SRC" "$IMG" || die "the LUN does not hold what was written"

cell() { awk -F'\t' -v c="$1" -v m="$2" '$1==c && $2==m {print $3}' "$RESULTS" | median; }

echo "## iSCSI backend: blockwayd vs direct iSCSI clients"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); nproc $(nproc); load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
echo "- blockwayd $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?') ($BLOCKWAYD_ORIG); tgt $(tgtd --version 2>&1 | head -n1); $(qemu-img --version | head -n1); $(fio --version)"
echo "- LUN: ${SIZE_MIB} MiB random data, tgt rdwr backing file in page cache; ${REPS} round(s), median; timed runs ${RUNTIME} s"
echo
echo "| client | seq read MB/s | seq write MB/s | 4k randread IOPS QD16 | 4k randwrite IOPS QD16 |"
echo "| --- | --- | --- | --- | --- |"
for c in "blockwayd (default)" "blockwayd (sessions=1)" "qemu-img convert" "iscsi-perf"; do
    printf '| %s | %s | %s | %s | %s |\n' "$c" "$(cell "$c" seqread)" "$(cell "$c" seqwrite)" \
        "$(cell "$c" randread)" "$(cell "$c" randwrite)"
done

# Rounds are interleaved, so the ratio within each round cancels much of this
# VM's drift between rounds (single figures swing by 30% or more).
ratios() {  # label test ours theirs
    awk -F'\t' -v t="$2" -v a="$3" -v b="$4" -v label="$1" '
        $2==t && $1==a {x[++na]=$3} $2==t && $1==b {y[++nb]=$3}
        END {
            n = na < nb ? na : nb; out = ""
            for (i = 1; i <= n; i++) { r[i] = x[i] / y[i]; out = out sprintf(" %.2f", r[i]) }
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (r[j] < r[i]) { t2 = r[i]; r[i] = r[j]; r[j] = t2 }
            if (n) printf "- %s: per round%s; median %.2fx\n", label, out, r[int((n + 1) / 2)]
        }' "$RESULTS"
}
echo
echo "Ratios within each round (blockwayd default / direct client):"
echo
ratios "seq read vs qemu-img convert" seqread "blockwayd (default)" "qemu-img convert"
ratios "seq read (sessions=1) vs qemu-img convert" seqread "blockwayd (sessions=1)" "qemu-img convert"
ratios "seq write vs qemu-img convert" seqwrite "blockwayd (default)" "qemu-img convert"
ratios "4k randread QD16 vs iscsi-perf" randread "blockwayd (default)" "iscsi-perf"
