#!/usr/bin/env bash
# Throughput of blockwayd's aoe:// backend against vblade, at MTU 1500 and
# 9000, measured through blockwayd's NBD export with nbdcopy and fio.
#
# Usage (as root: it creates a network namespace and a veth pair):
#   bench/aoe.sh
#
# Environment knobs:
#   BENCH_QUICK=1       smoke test: one round, 2 s fio runs, 256 MiB image
#   BENCH_SIZE_MIB=N    image size (default 512; 256 quick)
#   BENCH_RUNTIME=N     seconds per fio run (default 10; 2 quick)
#   BENCH_REPS=N        rounds; each figure is the median (default 3; 1 quick)
#   BENCH_MTUS="..."    MTUs to measure (default "1500 9000")
#   BENCH_TMPDIR=DIR    where the image goes (default /var/tmp)
#   BLOCKWAYD=PATH      daemon binary (default <repo>/build/blockwayd)
#
# Method: per MTU, a namespace holds vblade (shelf 0 slot 1) on one end of a
# veth pair; blockwayd serves aoe://HOSTEND/0.1 (no cache layer) on loopback.
# Each round: seq write (nbdcopy from a random file), seq read (nbdcopy to
# null:), 4k randread and 4k randwrite (fio nbd engine, QD16, time based).
# vblade is single-threaded and answers one frame at a time, so it is part of
# what is measured. Prints a Markdown table of medians (MB/s: 10^6 bytes/s;
# runs before 2026-12-06 printed MiB/s under the same heading).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 3 512
MTUS=${BENCH_MTUS:-"1500 9000"}

[[ $(id -u) == 0 ]] || die "run as root (network namespaces, AF_PACKET)"
for tool in ip vblade nbdcopy fio jq; do command -v "$tool" >/dev/null || die "missing tool: $tool"; done
[[ -x $BLOCKWAYD ]] || die "blockwayd not found at $BLOCKWAYD (set BLOCKWAYD=)"

bench_tmpdir aoe-bench
bench_private_daemon
NS=bwbench$$
HOST_IF=bwbh$$
PEER_IF=bwbp$$
VBLADE_PID=
BW_PID=
RESULTS=$TMP/results.tsv
: > "$RESULTS"
cd "$TMP"

teardown_net() {
    stop_pid "$BW_PID"; BW_PID=
    stop_pid "$VBLADE_PID"; VBLADE_PID=
    ip link del "$HOST_IF" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
}

before_cleanup() {
    teardown_net
    [[ $1 -ne 0 && -f $TMP/bw.log ]] && tail -n 20 "$TMP/bw.log" >&2
}
bench_cleanup_trap before_cleanup

setup_net() {
    local mtu=$1
    ip netns add "$NS"
    ip link add "$HOST_IF" type veth peer name "$PEER_IF"
    ip link set "$PEER_IF" netns "$NS"
    ip link set "$HOST_IF" mtu "$mtu" up
    ip netns exec "$NS" ip link set "$PEER_IF" mtu "$mtu" up
    : > "$TMP/vblade.log"
    # `ip netns exec` execs vblade: the pid is vblade's.
    bench_start "$TMP/vblade.log" ip netns exec "$NS" vblade 0 1 "$PEER_IF" "$TMP/img.raw"
    VBLADE_PID=$BG_PID
    for _ in $(seq 100); do grep -q "pid $VBLADE_PID:" "$TMP/vblade.log" && break; sleep 0.05; done
    PORT=$(free_port)
    : > "$TMP/bw.log"
    bench_start "$TMP/bw.log" "$BLOCKWAYD" --listen "127.0.0.1:$PORT" --export "bench=aoe://$HOST_IF/0.1" \
        --log-level info
    BW_PID=$BG_PID
    URI="nbd://127.0.0.1:$PORT/bench"
    wait_nbd "$URI"
}

timed() {   # CMD...: MB/s over the image's bytes
    local t0 t1
    t0=$(now); "$@" >/dev/null 2>&1 || die "failed: $*"; t1=$(now)
    mbps "$bytes" "$t0" "$t1"
}

fio_mbps() {
    local v
    v=$(fio_nbd "$URI" "$1" 4k)
    echo "${v#* }"
}

head -c "$((SIZE_MIB << 20))" /dev/urandom > "$TMP/src.raw"
truncate -s "${SIZE_MIB}M" "$TMP/img.raw"
bytes=$((SIZE_MIB << 20))

for round in $(seq "$REPS"); do
    for mtu in $MTUS; do
        setup_net "$mtu"
        w=$(timed nbdcopy "$TMP/src.raw" "$URI")
        cmp -s "$TMP/src.raw" "$TMP/img.raw" || die "image differs after the copy (MTU $mtu)"
        r=$(timed nbdcopy "$URI" null:)
        rr=$(fio_mbps randread)
        rw=$(fio_mbps randwrite)
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mtu" "$round" "$r" "$w" "$rr" "$rw" | tee -a "$RESULTS"
        teardown_net
    done
done

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
