#!/bin/bash
# The nbdkit plugin (issue 16) against blockwayd serving the same stack, side
# by side in one run, rounds interleaved (daemon, plugin, daemon, plugin ...):
# fio's nbd engine at QD16 on Unix sockets, sequential 1 MiB and random 4 KiB
# reads and writes, over
#   uncached: an NBD remote (nbdkit's file plugin on loopback TCP, image in
#             the page cache) with blockway's RetryLayer above it;
#   cached:   the same with cache=DIR,mode=writeback-local, the cache filled
#             by one full read first (writes stay local; write-back runs).
# Each server has its own remote image, remote nbdkit and cache directory.
# The plugin runs with threads=N equal to blockwayd's event loops (nproc).
# Besides throughput, each cell reports the server's CPU per request: its
# user+system time over the fio run (/proc/PID/stat) divided by the requests
# fio completed, in microseconds (for nbdkit + plugin: nbdkit's process).
# Usage: bench/plugin.sh   (BENCH_QUICK=1: 2 s runs, 1 round; BENCH_RUNTIME, BENCH_REPS, BENCH_SIZE_MIB)
#   BENCH_KINDS="uncached cached"  the stacks measured (default both)
#   BENCH_SWITCHES=1  also the server's context switches per request (perf
#                     stat -e context-switches -p PID over each fio run)
#   BLOCKWAY_NBDKIT_PLUGIN=SO  the plugin measured (default: next to $BLOCKWAYD)
#   BLOCKWAY_NBDKIT_PLUGIN_BASE=SO  a second plugin (say, last main's) measured
#                              as "plugin-base" in the same rounds: before/after
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 5 3 256
PLUGIN=${BLOCKWAY_NBDKIT_PLUGIN:-$(dirname "$BLOCKWAYD")/nbdkit-blockway-plugin.so}
[[ -f $PLUGIN ]] || die "no plugin at $PLUGIN (build blockway_nbdkit_plugin)"
bench_tmpdir plugin
bench_private_daemon
cp "$PLUGIN" "$TMP/plugin.so"
declare -A plugin_so=([plugin]=$TMP/plugin.so)
servers=(daemon plugin)
if [[ -n ${BLOCKWAY_NBDKIT_PLUGIN_BASE:-} ]]; then
    [[ -f $BLOCKWAY_NBDKIT_PLUGIN_BASE ]] || die "BLOCKWAY_NBDKIT_PLUGIN_BASE=$BLOCKWAY_NBDKIT_PLUGIN_BASE: no such file"
    cp "$BLOCKWAY_NBDKIT_PLUGIN_BASE" "$TMP/plugin-base.so"
    plugin_so[plugin-base]=$TMP/plugin-base.so
    servers+=(plugin-base)
fi
bench_cleanup_trap
loops=$(nproc)
CLK_TCK=$(getconf CLK_TCK)

# cpu_ticks PID: the process's user+system time so far, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# start_switches PID / stop_switches REQUESTS: perf stat counts PID's
# context switches between the two; stop prints them per request.
SWITCHES=${BENCH_SWITCHES:-0}
[[ $SWITCHES == 1 ]] && ! command -v perf >/dev/null && die "BENCH_SWITCHES=1 needs perf (linux-perf)"
start_switches() {
    perf stat -x, -e context-switches -p "$1" -o "$TMP/switches" &
    SWITCHES_PID=$!
    sleep 0.2  # attached before fio starts
}
stop_switches() {
    kill -INT "$SWITCHES_PID"
    wait "$SWITCHES_PID" || true
    awk -F, -v n="$1" '$3 == "context-switches" { printf "%.2f", (n > 0 ? $1 / n : 0) }' "$TMP/switches"
}

declare -A remote server_uri server_pid
for who in "${servers[@]}"; do
    dd if=/dev/urandom of="$TMP/$who.img" bs=1M count="$SIZE_MIB" status=none
    port=$(free_port)
    bench_start "$TMP/remote-$who.log" nbdkit -f -i 127.0.0.1 -p "$port" file "$TMP/$who.img"
    remote[$who]="nbd://127.0.0.1:$port/"
    wait_nbd "${remote[$who]}"
done

# start_servers KIND OPTIONS: blockwayd and nbdkit+plugin(s) over their remotes.
start_servers() {
    local kind=$1 opts=$2 popts=() who cache
    [[ -n $opts ]] && IFS=, read -ra popts <<<"$opts"
    bench_start "$TMP/blockwayd-$kind.log" "$BLOCKWAYD" --listen "unix:$TMP/daemon-$kind.sock" --control-socket off \
        --data-dir "$TMP/daemon-data-$kind" --pid-file "$TMP/daemon-$kind.pid" \
        --export "r=${remote[daemon]}${opts:+,$opts}${opts:+,cache=$TMP/daemon-cache-$kind}"
    server_pid[daemon]=$BG_PID
    wait_pid_file "$TMP/daemon-$kind.pid" "$BG_PID" 30
    server_uri[daemon]="nbd+unix:///r?socket=$TMP/daemon-$kind.sock"
    for who in "${servers[@]}"; do
        [[ $who == daemon ]] && continue
        cache=()
        [[ -n $opts ]] && cache=("cache=$TMP/$who-cache-$kind")
        bench_start "$TMP/nbdkit-$who-$kind.log" nbdkit -f -U "$TMP/$who-$kind.sock" "${plugin_so[$who]}" \
            "${remote[$who]}" threads="$loops" name=r "${popts[@]}" "${cache[@]}"
        server_pid[$who]=$BG_PID
        server_uri[$who]="nbd+unix:///?socket=$TMP/$who-$kind.sock"
    done
    for who in "${servers[@]}"; do wait_nbd "${server_uri[$who]}" 30; done
}

cells=("read 1m" "write 1m" "randread 4k" "randwrite 4k")
declare -A got cpu sw
read -ra kinds <<<"${BENCH_KINDS:-uncached cached}"
for kind in "${kinds[@]}"; do
    [[ $kind == uncached || $kind == cached ]] || die "BENCH_KINDS: '$kind' is neither uncached nor cached"
    opts=""
    [[ $kind == cached ]] && opts="mode=writeback-local"
    start_servers "$kind" "$opts"
    if [[ $kind == cached ]]; then  # fill every cache
        for who in "${servers[@]}"; do
            fio --name=fill --ioengine=nbd --uri="${server_uri[$who]}" --rw=read --bs=1m --iodepth=8 \
                --size="${SIZE_MIB}M" >/dev/null
        done
    fi
    for ((r = 1; r <= REPS; r++)); do
        for cell in "${cells[@]}"; do
            read -r rw bs <<<"$cell"
            for who in "${servers[@]}"; do
                [[ $SWITCHES == 1 ]] && start_switches "${server_pid[$who]}"
                t0=$(cpu_ticks "${server_pid[$who]}")
                read -r iops mb < <(fio_nbd "${server_uri[$who]}" "$rw" "$bs")
                t1=$(cpu_ticks "${server_pid[$who]}")
                us=$(awk -v t="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$((iops * RUNTIME))" \
                    'BEGIN { printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0) }')
                cs=""
                if [[ $SWITCHES == 1 ]]; then
                    cs=$(stop_switches "$((iops * RUNTIME))")
                    sw["$kind $rw $who"]+="$cs "
                fi
                v=$iops; [[ $bs == 1m ]] && v=$mb
                got["$kind $rw $who"]+="$v "
                cpu["$kind $rw $who"]+="$us "
                echo "round $r $kind $rw $bs $who: $iops IOPS $mb MB/s, $us us CPU/request${cs:+, $cs context switches/request}" \
                    "(load $(cut -d' ' -f1 /proc/loadavg))" >&2
            done
        done
    done
    for who in "${servers[@]}"; do stop_pid "${server_pid[$who]}"; done
done

plugins="plugin $(sha256sum "${plugin_so[plugin]}" | cut -c1-12)"
[[ -n ${plugin_so[plugin-base]:-} ]] && plugins+=", plugin-base $(sha256sum "${plugin_so[plugin-base]}" | cut -c1-12)"
bench_machine_info "image: ${SIZE_MIB} MiB per server in the page cache, remotes: nbdkit file on loopback TCP" \
    "$REPS rounds of ${RUNTIME} s per cell, interleaved ${servers[*]}; blockwayd loops = plugin threads = $loops" \
    "nbdkit $(nbdkit --version | awk '{print $2}'), $plugins" \
    "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "## Results (medians; MB/s for 1 MiB cells, IOPS for 4 KiB cells; server CPU µs per request)"
echo
base_head="" base_rule=""
if [[ -n ${plugin_so[plugin-base]:-} ]]; then
    base_head=" plugin-base | base / daemon | plugin / base |"; base_rule=" --- | --- | --- |"
fi
echo "| stack | cell | blockwayd | nbdkit + plugin | plugin / daemon |$base_head CPU µs/req daemon / plugin${base_head:+ / base} |"
echo "| --- | --- | --- | --- | --- |$base_rule --- |"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
for kind in "${kinds[@]}"; do
    for cell in "${cells[@]}"; do
        read -r rw bs <<<"$cell"
        # shellcheck disable=SC2086
        d=$(median ${got["$kind $rw daemon"]}); p=$(median ${got["$kind $rw plugin"]})
        # shellcheck disable=SC2086
        c="$(median ${cpu["$kind $rw daemon"]}) / $(median ${cpu["$kind $rw plugin"]})"
        extra=""
        if [[ -n ${plugin_so[plugin-base]:-} ]]; then
            # shellcheck disable=SC2086
            b=$(median ${got["$kind $rw plugin-base"]})
            extra=" $b | $(ratio "$b" "$d") | $(ratio "$p" "$b") |"
            # shellcheck disable=SC2086
            c+=" / $(median ${cpu["$kind $rw plugin-base"]})"
        fi
        if [[ $SWITCHES == 1 ]]; then
            c+=" (switches/req"
            # shellcheck disable=SC2086
            for who in "${servers[@]}"; do c+=" $(median ${sw["$kind $rw $who"]})"; done
            c+=")"
        fi
        echo "| $kind | $rw $bs | $d | $p | $(ratio "$p" "$d") |$extra $c |"
    done
done
echo
for k in "${!got[@]}"; do
    echo "- rounds $k: ${got[$k]} (CPU µs/req: ${cpu[$k]}${sw[$k]:+; context switches/req: ${sw[$k]}})"
done | sort
