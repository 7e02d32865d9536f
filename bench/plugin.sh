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
# Usage: bench/plugin.sh   (BENCH_QUICK=1: 2 s runs, 1 round; BENCH_RUNTIME, BENCH_REPS, BENCH_SIZE_MIB)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 5 3 256
PLUGIN=${BLOCKWAY_NBDKIT_PLUGIN:-$(dirname "$BLOCKWAYD")/nbdkit-blockway-plugin.so}
[[ -f $PLUGIN ]] || die "no plugin at $PLUGIN (build blockway_nbdkit_plugin)"
bench_tmpdir plugin
bench_private_daemon
cp "$PLUGIN" "$TMP/plugin.so"
PLUGIN=$TMP/plugin.so
bench_cleanup_trap
loops=$(nproc)

declare -A remote server_uri
for who in daemon plugin; do
    dd if=/dev/urandom of="$TMP/$who.img" bs=1M count="$SIZE_MIB" status=none
    port=$(free_port)
    bench_start "$TMP/remote-$who.log" nbdkit -f -i 127.0.0.1 -p "$port" file "$TMP/$who.img"
    remote[$who]="nbd://127.0.0.1:$port/"
    wait_nbd "${remote[$who]}"
done

# start_servers KIND OPTIONS: blockwayd and nbdkit+plugin over their remotes.
start_servers() {
    local kind=$1 opts=$2 popts=()
    [[ -n $opts ]] && IFS=, read -ra popts <<<"$opts"
    bench_start "$TMP/blockwayd-$kind.log" "$BLOCKWAYD" --listen "unix:$TMP/d-$kind.sock" --control-socket off \
        --data-dir "$TMP/d-data-$kind" --pid-file "$TMP/d-$kind.pid" \
        --export "r=${remote[daemon]}${opts:+,$opts}${opts:+,cache=$TMP/d-cache-$kind}"
    DAEMON_PID=$BG_PID
    wait_pid_file "$TMP/d-$kind.pid" "$DAEMON_PID" 30
    local cache=()
    [[ -n $opts ]] && cache=("cache=$TMP/p-cache-$kind")
    bench_start "$TMP/nbdkit-$kind.log" nbdkit -f -U "$TMP/p-$kind.sock" "$PLUGIN" "${remote[plugin]}" \
        threads="$loops" name=r "${popts[@]}" "${cache[@]}"
    PLUGIN_PID=$BG_PID
    server_uri[daemon]="nbd+unix:///r?socket=$TMP/d-$kind.sock"
    server_uri[plugin]="nbd+unix:///?socket=$TMP/p-$kind.sock"
    wait_nbd "${server_uri[daemon]}" 30
    wait_nbd "${server_uri[plugin]}" 30
}

cells=("read 1m" "write 1m" "randread 4k" "randwrite 4k")
declare -A got
for kind in uncached cached; do
    opts=""
    [[ $kind == cached ]] && opts="mode=writeback-local"
    start_servers "$kind" "$opts"
    if [[ $kind == cached ]]; then  # fill both caches
        for who in daemon plugin; do
            fio --name=fill --ioengine=nbd --uri="${server_uri[$who]}" --rw=read --bs=1m --iodepth=8 \
                --size="${SIZE_MIB}M" >/dev/null
        done
    fi
    for ((r = 1; r <= REPS; r++)); do
        for cell in "${cells[@]}"; do
            read -r rw bs <<<"$cell"
            for who in daemon plugin; do
                read -r iops mb < <(fio_nbd "${server_uri[$who]}" "$rw" "$bs")
                v=$iops; [[ $bs == 1m ]] && v=$mb
                got["$kind $rw $who"]+="$v "
                echo "round $r $kind $rw $bs $who: $iops IOPS $mb MB/s (load $(cut -d' ' -f1 /proc/loadavg))" >&2
            done
        done
    done
    stop_pid "$PLUGIN_PID"; stop_pid "$DAEMON_PID"
done

bench_machine_info "image: ${SIZE_MIB} MiB per server in the page cache, remotes: nbdkit file on loopback TCP" \
    "$REPS rounds of ${RUNTIME} s per cell, interleaved daemon/plugin; blockwayd loops = plugin threads = $loops" \
    "nbdkit $(nbdkit --version | awk '{print $2}'), plugin $(sha256sum "$PLUGIN" | cut -c1-12)" \
    "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "## Results (medians; MB/s for 1 MiB cells, IOPS for 4 KiB cells)"
echo
echo "| stack | cell | blockwayd | nbdkit + plugin | plugin / daemon |"
echo "| --- | --- | --- | --- | --- |"
for kind in uncached cached; do
    for cell in "${cells[@]}"; do
        read -r rw bs <<<"$cell"
        # shellcheck disable=SC2086
        d=$(median ${got["$kind $rw daemon"]}); p=$(median ${got["$kind $rw plugin"]})
        echo "| $kind | $rw $bs | $d | $p | $(awk -v a="$p" -v b="$d" 'BEGIN { printf "%.2fx", a / b }') |"
    done
done
echo
for k in "${!got[@]}"; do echo "- rounds $k: ${got[$k]}"; done | sort
