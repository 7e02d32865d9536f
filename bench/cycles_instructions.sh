#!/bin/bash
# blockwayd's user-space instructions per 4k request on the two paths that
# matter most (issue 17), counted by callgrind: repeatable on this shared,
# loaded machine (and this VM has no PMU for perf stat), where CPU-time
# figures move by tens of per cent between runs.
#
# For each binary given (default: build/blockwayd) and each kind:
#   file-read   4k random reads, NBD over a file (file://IMG)
#   file-write  4k random writes, the same export
#   hit-read    4k random reads through a warm cache (nbd://REMOTE,cache=DIR;
#               nbdkit remote; the cache warmed by a daemon run without
#               valgrind, then reused)
#   clone-read  4k random reads of base data through a clone (issue 18) of
#               such a warm cached base
#   clone-write 4k random writes into a fresh clone (granularity 64k: first
#               writes copy up from the warm base); clone-write4k: granularity
#               4k. Each run starts from the warm base's catalogue, no clone.
# a fresh daemon runs under `valgrind --tool=callgrind`, fio sends N requests
# (nbd engine over a Unix socket, QD16, random offsets of an image in the
# page cache) and the daemon stops. The slope between two request counts
# (N1, N2) is the instructions per request: start-up and shutdown cancel
# out. Kernel work (system calls, copies) is not counted here: bench/cycles.py
# measures the whole CPU time and the system calls per request.
# Usage: bench/cycles_instructions.sh [BLOCKWAYD...]   (BENCH_N1, BENCH_N2,
#        CYCLES_KINDS="file-read file-write hit-read"; the clone kinds are
#        asked for by name)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 1 1 64
bench_tmpdir cycles-instr
bench_cleanup_trap
for t in valgrind fio nbdkit nbdcopy nbdinfo jq; do command -v $t >/dev/null || die "$t is missing"; done

N1=${BENCH_N1:-4000}
N2=${BENCH_N2:-20000}
if [[ $QUICK == 1 ]]; then N1=${BENCH_N1:-1000} N2=${BENCH_N2:-3000}; fi
read -r -a kinds <<<"${CYCLES_KINDS:-file-read file-write hit-read}"
binaries=("$@")
((${#binaries[@]})) || binaries=("$BLOCKWAYD")

img=$TMP/img
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MIB" status=none
cat "$img" >/dev/null
sock=$TMP/nbd.sock
rsock=$TMP/remote.sock
bench_start "$TMP/nbdkit.log" nbdkit -f -U "$rsock" file "$TMP/img"
nbdkit_pid=$BG_PID
wait_nbd "nbd+unix:///?socket=$rsock" 10

export_of() {  # kind -> the --export value
    case $1 in
        file-*) echo "bench=file://$img" ;;
        hit-read) echo "bench=nbd+unix:///?socket=$rsock,cache=$TMP/cache,mode=writethrough" ;;
        clone-read | clone-write) echo "golden=nbd+unix:///?socket=$rsock,cache=$TMP/cache bench=clone:golden,overlay=$TMP/overlays,granularity=64k" ;;
        clone-write4k) echo "golden=nbd+unix:///?socket=$rsock,cache=$TMP/cache bench=clone:golden,overlay=$TMP/overlays,granularity=4k" ;;
        *) die "unknown kind $1" ;;
    esac
}

# warm BINARY KIND: fills the cache with the whole image (a daemon without
# valgrind); its catalogue is kept in $TMP/data.warm for every run.
warm() {
    local spec=$(export_of hit-read) name=bench
    [[ $2 == clone-* ]] && spec="golden=nbd+unix:///?socket=$rsock,cache=$TMP/cache" name=golden
    rm -rf "$TMP/cache" "$TMP/pid" "$sock" "$TMP/data" "$TMP/data.warm"
    bench_start "$TMP/blockwayd.log" "$1" --listen "unix:$sock" --control-socket off --pid-file "$TMP/pid" \
        --data-dir "$TMP/data" --export "$spec"
    local pid=$BG_PID
    wait_pid_file "$TMP/pid" "$pid" 30
    wait_nbd "nbd+unix:///$name?socket=$sock" 30
    nbdcopy "nbd+unix:///$name?socket=$sock" null: || die "warming the cache failed"
    stop_pid "$pid" TERM
    cp -a "$TMP/data" "$TMP/data.warm"
}

# instructions BINARY KIND N: the daemon's total instructions for N requests.
instructions() {
    local rw=randread
    [[ $2 == *-write* ]] && rw=randwrite
    if [[ $2 == hit-read || $2 == clone-* ]]; then  # the warm catalogue, no clone yet
        rm -rf "$TMP/data" "$TMP/overlays"
        cp -a "$TMP/data.warm" "$TMP/data"
    fi
    callgrind_requests "$1" "$(export_of "$2")" bench "$rw" "$3"
}

bench_machine_info "callgrind; $N1 and $N2 random 4k requests per run, QD16; image ${SIZE_MIB} MiB in the page cache"
echo "## Results: user-space instructions per 4k request"
echo
hdr="| binary |" sep="| --- |"
for kind in "${kinds[@]}"; do hdr+=" $kind |" sep+=" ---: |"; done
echo "$hdr"; echo "$sep"
for bin in "${binaries[@]}"; do
    row="| $bin |"
    for kind in "${kinds[@]}"; do
        [[ $kind == hit-read || $kind == clone-* ]] && warm "$bin" "$kind"
        a=$(instructions "$bin" "$kind" "$N1")
        b=$(instructions "$bin" "$kind" "$N2")
        row+=" $(awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.0f", (b - a) / (n2 - n1) }') |"
        echo "$bin $kind: $a instructions for $N1 requests, $b for $N2" >&2
    done
    echo "$row"
done
