#!/usr/bin/env bash
# Benchmark background prefetch and detach (issue 5, "Targets"), side by side
# in one run, against nbdkit's file plugin over loopback behind
# `--filter=delay rdelay=1ms`:
#
#   1. time to detach: blockwayd started with prefetch=sequential,auto-detach=on
#      on a fresh cache; from the daemon's launch until its log says
#      "detached from" (the whole image copied, synced, catalogue updated,
#      remote closed) -- versus the time `nbdcopy REMOTE out.img` needs to
#      copy the same image from the same remote to a local file.
#      Target: <= 1.2x nbdcopy. Also shown: the copy time the daemon logs
#      (without start-up and the final sync), and nbdcopy followed by
#      `sync --data` of the copy, since detach makes the image durable first.
#   2. 4k random read latency through the export (fio, nbd engine,
#      --rw=randread --bs=4k --iodepth=1, time based, in the last quarter of
#      the image, which the sequential prefetch reaches last) on a fresh cache:
#      idle (no prefetch) versus while the prefetch runs at full speed (no
#      rate limit). Target: p99 while prefetching <= 2x idle p99. Only the
#      cache misses (>= 300 us) issued before the prefetch reached fio's
#      region count (fio's per-I/O latency log, cut at 0.7 of the prefetch
#      time the daemon logs): what the prefetch's traffic costs a client's
#      remote reads. The idle figure uses the same window of a run without
#      prefetch.
#
# Usage: bench/prefetch.sh
# Environment knobs:
#   BENCH_QUICK=1      smoke test: one round, 2 s fio runs, 256 MiB image
#   BENCH_SIZE_MIB=N   image size (default 1024; 256 quick)
#   BENCH_REPS=N       rounds, figures are medians (default 3; 1 quick)
#   BENCH_RUNTIME=N    seconds per fio run (default 6; 2 quick)
#   BENCH_DELAY=D      remote read delay (default 1ms)
#   BENCH_TMPDIR=DIR   where the temp dir goes (default /var/tmp)
#   BLOCKWAYD=PATH     daemon binary (default <repo>/build/blockwayd)
#
# Every process is started here, stopped by pid, and the temp dir removed.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 6 3
DELAY=${BENCH_DELAY:-1ms}

for t in nbdkit nbdcopy fio nbdinfo; do command -v $t >/dev/null || die "$t missing"; done
[[ -x $BLOCKWAYD ]] || die "no daemon at $BLOCKWAYD (build it: ninja -C build blockwayd)"

bench_tmpdir bw-prefetch-bench
work=$TMP
bench_cleanup_trap
wait_port() { wait_nbd "nbd://127.0.0.1:$1/"; }  # PORT

img=$work/image.img
echo "creating a ${SIZE_MIB} MiB random image..." >&2
head -c $((SIZE_MIB << 20)) /dev/urandom > "$img"
cat "$img" > /dev/null  # page cache: the remote's disk is not what we measure

kport=$(free_port)
bench_start "$work/nbdkit.log" nbdkit -f -p "$kport" -i 127.0.0.1 --filter=delay file "$img" rdelay="$DELAY"
wait_port "$kport"
remote="nbd://127.0.0.1:$kport/"

# Starts blockwayd with export "bench" over the remote; sets BW_PID, BW_PORT.
# Args: NAME OPTS
start_bw() {
    local name=$1 opts=$2 port
    port=$(free_port)
    BW_PORT=$port
    rm -rf "$work/$name"
    mkdir -p "$work/$name"
    bench_start "$work/$name/log" "$BLOCKWAYD" --log-level info --listen "127.0.0.1:$port" \
        --data-dir "$work/$name/data" --pid-file "$work/$name/pid" \
        --export "bench=$remote,cache=$work/$name/cache,$opts"
    BW_PID=$BG_PID
}

# fio 4k random reads, QD1, time based, with a per-I/O latency log.
# Args: PORT TAG
fio_run() {
    rm -f "$work/$2"_clat.*.log
    fio --name=lat --ioengine=nbd --uri="nbd://127.0.0.1:$1/bench" --rw=randread --bs=4k \
        --iodepth=1 --time_based --runtime="$RUNTIME" \
        --offset=$((SIZE_MIB * 3 / 4 << 20)) --size=$((SIZE_MIB / 4 << 20)) \
        --write_lat_log="$work/$2" --log_avg_msec=0 >/dev/null 2>&1 || die "fio failed"
}
# Prints "p50_us p99_us count" of the cache misses (I/Os of 300 us or more:
# a remote read costs at least the 1 ms delay) issued in the first WINDOW ms.
# Counting only misses compares like with like: fio's own earlier reads and
# the prefetch turn some reads into hits, which would flatter the figure.
# Args: TAG WINDOW_MS
lat_stats() {
    $PY - "$work/$1"_clat.1.log "$2" <<'EOF'
import sys
window = float(sys.argv[2])
lat = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    t_ms, us = float(f[0]), float(f[1]) / 1000
    if t_ms - us / 1000 <= window and us >= 300:
        lat.append(us)
lat.sort()
if not lat:
    print("0 0 0")
else:
    print("%.0f %.0f %d" % (lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat)))
EOF
}


copy_t=() copysync_t=() pcopy_t=() detach_t=() idle_p50=() idle_p99=() pf_p50=() pf_p99=() idle_n=() pf_n=() windows=()
for round in $(seq "$REPS"); do
    echo "round $round/$REPS" >&2
    # 1a. nbdcopy of the image to a local file. Every timed step starts with
    #     the disk idle (sync): otherwise whichever step syncs pays for the
    #     previous steps' writes and deletes (a detach must fdatasync).
    rm -f "$work/copy.img"
    sync
    t0=$(now)
    nbdcopy "$remote" "$work/copy.img"
    t1=$(now)
    copy_t+=("$(echo "$t1 - $t0" | bc -l)")
    cmp "$work/copy.img" "$img" || die "nbdcopy's copy differs"
    rm -f "$work/copy.img"
    # The same made durable (detach syncs the image before it switches).
    sync
    t0=$(now)
    nbdcopy "$remote" "$work/copy.img"
    sync --data "$work/copy.img"
    t1=$(now)
    copysync_t+=("$(echo "$t1 - $t0" | bc -l)")
    rm -f "$work/copy.img"

    # 1b. prefetch until detached. The previous round's cache files (1 GiB
    #     and more) are deleted before the sync, not inside the timed step:
    #     deleting them there (and the disk work it causes) made 1-2 of
    #     every 5 rounds take 1.6-3.8 s while the daemon logged 0.4 s from
    #     connect to detached.
    rm -rf "$work/detach" "$work/busy" "$work/idle"
    sync
    t0=$(now)
    start_bw detach "prefetch=sequential,auto-detach=on"
    pid=$BW_PID
    for _ in $(seq 6000); do
        grep -qs "detached from" "$work/detach/log" && break
        kill -0 "$pid" 2>/dev/null || die "blockwayd died: $(tail -5 "$work/detach/log")"
        sleep 0.01
    done
    t1=$(now)
    grep -q "detached from" "$work/detach/log" || die "no detach within 60 s"
    detach_t+=("$(echo "$t1 - $t0" | bc -l)")
    pcopy_t+=("$(sed -n 's/.*prefetch done: [0-9]* bytes copied in \([0-9.]*\) s.*/\1/p' "$work/detach/log" | head -1)")
    stop_pid "$pid"
    cmp "$work/detach/cache/bench.img" "$img" || die "the detached image differs"

    # 2a. while the prefetch runs at full speed (cold cache): only the I/Os
    #     issued before the prefetch finished count.
    start_bw busy "mode=writethrough,prefetch=sequential"
    pid=$BW_PID port=$BW_PORT
    tstart=$(now)
    wait_port "$port"
    tfio=$(now)
    fio_run "$port" busy
    stop_pid "$pid"
    secs=$(sed -n 's/.*prefetch done: [0-9]* bytes copied in \([0-9.]*\) s.*/\1/p' "$work/busy/log" | head -1)
    if [[ -n $secs ]]; then
        # The sequential prefetch reaches fio's region (the last quarter) at
        # about 3/4 of its time: cut at 0.7 of it, so every read is a miss.
        window=$(echo "($tstart + 0.7 * $secs - $tfio) * 1000" | bc -l)
    else
        window=$((RUNTIME * 1000))
    fi
    windows+=("$(printf %.0f "$window")")
    if (( $(echo "$window < 100" | bc -l) )); then
        echo "  prefetch ended before fio got going (window ${window} ms): round not used for latency" >&2
        continue
    fi
    read -r a b c < <(lat_stats busy "$window")
    pf_p50+=("$a"); pf_p99+=("$b"); pf_n+=("$c")

    # 2b. idle: the same workload on a cold cache without prefetch, over the
    #     same window.
    start_bw idle "mode=writethrough"
    pid=$BW_PID port=$BW_PORT
    wait_port "$port"
    fio_run "$port" idle
    stop_pid "$pid"
    read -r a b c < <(lat_stats idle "$window")
    idle_p50+=("$a"); idle_p99+=("$b"); idle_n+=("$c")
done

ct=$(median "${copy_t[@]}")
dt=$(median "${detach_t[@]}")
cst=$(median "${copysync_t[@]}")
ip99=$(median "${idle_p99[@]}")
pp99=$(median "${pf_p99[@]}")
cat <<EOF
Prefetch and detach: ${SIZE_MIB} MiB image, nbdkit file plugin --filter=delay rdelay=$DELAY over loopback, $REPS rounds (medians)

| measurement | value | per round |
|---|---|---|
| nbdcopy remote -> local file | $(printf %.2f "$ct") s | ${copy_t[*]} |
| blockwayd prefetch until detached | $(printf %.2f "$dt") s | ${detach_t[*]} |
| ratio (target <= 1.2) | $(printf %.2f "$(echo "$dt / $ct" | bc -l)") | |
| of which the copy itself (daemon log) | $(median "${pcopy_t[@]}") s | ${pcopy_t[*]} |
| nbdcopy + sync --data of the copy | $(printf %.2f "$cst") s | ${copysync_t[*]} |
| ratio to the durable copy | $(printf %.2f "$(echo "$dt / $cst" | bc -l)") | |
| window: fio I/Os issued while the prefetch ran (ms) | $(median "${windows[@]}") | ${windows[*]} |
| 4k randread QD1 misses p50 idle / prefetching (us) | $(median "${idle_p50[@]}") / $(median "${pf_p50[@]}") | ${idle_p50[*]} / ${pf_p50[*]} |
| 4k randread QD1 misses p99 idle / prefetching (us) | $ip99 / $pp99 | ${idle_p99[*]} / ${pf_p99[*]} |
| p99 ratio (target <= 2) | $(printf %.2f "$(echo "$pp99 / $ip99" | bc -l)") | |
| misses in the window idle / prefetching | ${idle_n[*]} / ${pf_n[*]} | |
EOF
