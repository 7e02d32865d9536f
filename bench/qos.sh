#!/bin/bash
# Per-export QoS (issue 19), side by side in one daemon, rounds interleaved:
#  (a) 4k random read IOPS (fio nbd, QD16) of an export whose QoS layer
#      checks limits it never reaches (qos-read-iops=4000000000,
#      qos-read-bps=1T: the mutex and bucket path) against one without
#      limits (the layer's one-atomic-load path), by IOPS and by the
#      daemon's CPU time per request (utime + stime of /proc/PID/stat);
#  (b) p99 latency of 4k random reads (QD1) on an unthrottled export, idle
#      and while a neighbour throttled at qos-read-bps=10M is saturated
#      (fio 64k random reads, QD16).
# Both images are in the page cache (file:// exports).
# Usage: bench/qos.sh   (BENCH_QUICK=1: 2 s runs, 1 round; BENCH_RUNTIME, BENCH_REPS)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 5 5 256
bench_tmpdir qos
bench_private_daemon
bench_cleanup_trap

img=$TMP/img
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MIB" status=none
cat "$img" >/dev/null
sock=$TMP/nbd.sock
bench_start "$TMP/blockwayd.log" "$BLOCKWAYD" --listen "unix:$sock" --control-socket off --pid-file "$TMP/pid" \
    --export "off=file://$img" \
    --export "on=file://$img,qos-read-iops=4000000000,qos-read-bps=1T,qos-write-iops=4000000000,qos-write-bps=1T" \
    --export "idle=file://$img" --export "throttled=file://$img,qos-read-bps=10M"
wait_pid_file "$TMP/pid" "$BG_PID"
uri() { echo "nbd+unix:///$1?socket=$sock"; }

# p99 completion latency in microseconds of 4k random reads at QD1 on $1.
p99_us() {
    fio --name=lat --ioengine=nbd --uri="$(uri "$1")" --rw=randread --bs=4k --iodepth=1 --time_based \
        --runtime="$RUNTIME" --size="${SIZE_MIB}M" --output-format=json --output="$TMP/lat.json" >/dev/null
    jq -r '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000 | floor' "$TMP/lat.json"
}

# The daemon's CPU time (user + system, /proc/PID/stat) per request of the
# last fio run, in microseconds: steadier than IOPS on a shared machine.
daemon_pid=$(cat "$TMP/pid")
tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$daemon_pid/stat"; }
cpu_us_per_request() {  # ticks-before ticks-after
    awk -v t="$(($2 - $1))" -v hz="$tck" -v n="$(jq '.jobs[0].read.total_ios' "$TMP/fio.json")" \
        'BEGIN { printf "%.2f", t / hz * 1e6 / n }'
}

declare -a iops_off iops_on cpu_off cpu_on p99_idle p99_loaded
for ((r = 1; r <= REPS; r++)); do
    t0=$(cpu_ticks); read -r i _ < <(fio_nbd "$(uri off)" randread 4k); t1=$(cpu_ticks)
    iops_off+=("$i"); cpu_off+=("$(cpu_us_per_request "$t0" "$t1")")
    t0=$(cpu_ticks); read -r i _ < <(fio_nbd "$(uri on)" randread 4k); t1=$(cpu_ticks)
    iops_on+=("$i"); cpu_on+=("$(cpu_us_per_request "$t0" "$t1")")
    p99_idle+=("$(p99_us idle)")
    fio --name=hog --ioengine=nbd --uri="$(uri throttled)" --rw=randread --bs=64k --iodepth=16 --time_based \
        --runtime=$((RUNTIME + 2)) --size="${SIZE_MIB}M" --output-format=json --output="$TMP/hog.json" >/dev/null &
    hog=$!
    sleep 1
    p99_loaded+=("$(p99_us idle)")
    wait "$hog"
    hog_mbps=$(jq -r '.jobs[0].read.bw_bytes / 1048576 * 100 | floor / 100' "$TMP/hog.json")
    echo "round $r: IOPS off ${iops_off[-1]} on ${iops_on[-1]};" \
         "daemon CPU-us/request off ${cpu_off[-1]} on ${cpu_on[-1]}; neighbour p99 idle ${p99_idle[-1]} us," \
         "beside the throttled export ${p99_loaded[-1]} us (it read ${hog_mbps} MiB/s)" >&2
done

m_off=$(median "${iops_off[@]}"); m_on=$(median "${iops_on[@]}")
c_off=$(median "${cpu_off[@]}"); c_on=$(median "${cpu_on[@]}")
m_idle=$(median "${p99_idle[@]}"); m_loaded=$(median "${p99_loaded[@]}")
bench_machine_info "image: ${SIZE_MIB} MiB in the page cache; $REPS rounds of ${RUNTIME} s, interleaved"
echo "## Results (medians)"
echo
echo "| measure | value |"
echo "| --- | --- |"
echo "| 4k randread IOPS, QD16, no limits | $m_off |"
echo "| 4k randread IOPS, QD16, limits set but not reached | $m_on ($(awk -v a="$m_on" -v b="$m_off" 'BEGIN { printf "%+.1f%%", (a / b - 1) * 100 }')) |"
echo "| daemon CPU-us per 4k read, no limits | $c_off |"
echo "| daemon CPU-us per 4k read, limits set but not reached | $c_on ($(awk -v a="$c_on" -v b="$c_off" 'BEGIN { printf "%+.1f%%", (a / b - 1) * 100 }')) |"
echo "| neighbour 4k randread p99, QD1, idle | $m_idle us |"
echo "| neighbour p99 beside an export throttled at 10 MiB/s and saturated | $m_loaded us ($(awk -v a="$m_loaded" -v b="$m_idle" 'BEGIN { printf "%.2fx", a / b }')) |"
echo
echo "Rounds: IOPS off ${iops_off[*]}; on ${iops_on[*]}; CPU-us/request off ${cpu_off[*]}; on ${cpu_on[*]}; p99 idle ${p99_idle[*]} us; loaded ${p99_loaded[*]} us"
