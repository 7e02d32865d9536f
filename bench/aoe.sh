#!/usr/bin/env bash
# Throughput of blockwayd's aoe:// backend against vblade, at MTU 1500 and
# 9000, measured through blockwayd's NBD export with nbdcopy and fio.
#
# Usage (as root: it creates a network namespace and a veth pair):
#   bench/aoe.sh
#
# Environment knobs:
#   BENCH_SIZE_MIB=N    image size (default 512)
#   BENCH_RUNTIME=N     seconds per fio run (default 10)
#   BENCH_REPS=N        rounds; each figure is the median (default 3)
#   BENCH_MTUS="..."    MTUs to measure (default "1500 9000")
#   BENCH_TMPDIR=DIR    where the image goes (default /var/tmp)
#   BLOCKWAYD=PATH      daemon binary (default <repo>/build/blockwayd)
#
# Method: per MTU, a namespace holds vblade (shelf 0 slot 1) on one end of a
# veth pair; blockwayd serves aoe://HOSTEND/0.1 (no cache layer) on loopback.
# Each round: seq write (nbdcopy from a random file), seq read (nbdcopy to
# null:), 4k randread and 4k randwrite (fio nbd engine, QD16, time based).
# vblade is single-threaded and answers one frame at a time, so it is part of
# what is measured. Prints a Markdown table of medians.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-512}
RUNTIME=${BENCH_RUNTIME:-10}
REPS=${BENCH_REPS:-3}
MTUS=${BENCH_MTUS:-"1500 9000"}
TMPBASE=${BENCH_TMPDIR:-/var/tmp}
BLOCKWAYD=${BLOCKWAYD:-$repo/build/blockwayd}

die() { echo "aoe.sh: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root (network namespaces, AF_PACKET)"
for tool in ip vblade nbdcopy fio jq; do command -v "$tool" >/dev/null || die "missing tool: $tool"; done
[[ -x $BLOCKWAYD ]] || die "blockwayd not found at $BLOCKWAYD (set BLOCKWAYD=)"

TMP=$(mktemp -d "$TMPBASE/aoe-bench.XXXXXX")
cp "$BLOCKWAYD" "$TMP/blockwayd"
NS=bwbench$$
HOST_IF=bwbh$$
PEER_IF=bwbp$$
VBLADE_PID=
BW_PID=
RESULTS=$TMP/results.tsv
: > "$RESULTS"
cd "$TMP"

stop_pid() {
    local pid=$1
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

teardown_net() {
    stop_pid "$BW_PID"; BW_PID=
    stop_pid "$VBLADE_PID"; VBLADE_PID=
    ip link del "$HOST_IF" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    teardown_net
    [[ $rc -ne 0 && -f $TMP/bw.log ]] && tail -n 20 "$TMP/bw.log" >&2
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

setup_net() {
    local mtu=$1
    ip netns add "$NS"
    ip link add "$HOST_IF" type veth peer name "$PEER_IF"
    ip link set "$PEER_IF" netns "$NS"
    ip link set "$HOST_IF" mtu "$mtu" up
    ip netns exec "$NS" ip link set "$PEER_IF" mtu "$mtu" up
    ip netns exec "$NS" vblade 0 1 "$PEER_IF" "$TMP/img.raw" > "$TMP/vblade.log" 2>&1 &
    VBLADE_PID=$!
    for _ in $(seq 100); do grep -q "pid $VBLADE_PID:" "$TMP/vblade.log" && break; sleep 0.05; done
    PORT=$(free_port)
    "$TMP/blockwayd" --listen "127.0.0.1:$PORT" --export "bench=aoe://$HOST_IF/0.1" --log-level info \
        > "$TMP/bw.log" 2>&1 &
    BW_PID=$!
    for _ in $(seq 200); do nbdinfo "nbd://127.0.0.1:$PORT/bench" >/dev/null 2>&1 && break; sleep 0.05; done
    URI="nbd://127.0.0.1:$PORT/bench"
}

mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / 1048576 / s }'; }

timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'; }

fio_mbps() {
    local rw=$1
    fio --name=b --ioengine=nbd --uri="$URI" --rw="$rw" --bs=4k --iodepth=16 --time_based \
        --runtime="$RUNTIME" --size="${SIZE_MIB}M" --output-format=json --output="$TMP/fio.json" >/dev/null 2>&1
    local dir=read; [[ $rw == randwrite ]] && dir=write
    jq -r ".jobs[0].$dir.bw_bytes / 1048576 | floor" "$TMP/fio.json"
}

head -c "$((SIZE_MIB << 20))" /dev/urandom > "$TMP/src.raw"
truncate -s "${SIZE_MIB}M" "$TMP/img.raw"
bytes=$((SIZE_MIB << 20))

for round in $(seq "$REPS"); do
    for mtu in $MTUS; do
        setup_net "$mtu"
        w=$(mbps "$bytes" "$(timed nbdcopy "$TMP/src.raw" "$URI")")
        cmp -s "$TMP/src.raw" "$TMP/img.raw" || die "image differs after the copy (MTU $mtu)"
        r=$(mbps "$bytes" "$(timed nbdcopy "$URI" null:)")
        rr=$(fio_mbps randread)
        rw=$(fio_mbps randwrite)
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mtu" "$round" "$r" "$w" "$rr" "$rw" | tee -a "$RESULTS"
        teardown_net
    done
done

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
echo
echo "| MTU | seq read MB/s (nbdcopy) | seq write MB/s (nbdcopy) | 4k randread MB/s (fio QD16) | 4k randwrite MB/s (fio QD16) |"
echo "| --- | --- | --- | --- | --- |"
for mtu in $MTUS; do
    row="| $mtu"
    for col in 3 4 5 6; do
        row="$row | $(awk -F'\t' -v m="$mtu" -v c="$col" '$1 == m { print $c }' "$RESULTS" | median)"
    done
    echo "$row |"
done
