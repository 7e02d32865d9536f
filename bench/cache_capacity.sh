#!/usr/bin/env bash
# A cache smaller than the working set (issue 12): warm-cache 4k random reads
# (fio, nbd engine, QD16) over a remote with 1 ms read delay, side by side in
# one run:
#   half     blockwayd cache, capacity = half the working set (eviction runs
#            all the time; about 45% of reads can hit)
#   whole    blockwayd cache, capacity = the working set (every read hits)
#   direct   blockwayd without a cache, over the same remote
# Each configuration is started fresh, warmed with one untimed fio pass over
# the working set, then measured time based; the report gives the median
# IOPS of REPS rounds, the hit ratio and evictions of the timed run (from
# `blockway stats --json`), and the cache file's size on disk at the end.
#
# Usage: bench/cache_capacity.sh
#   BENCH_QUICK=1 (2 s runs, 1 round, 128 MiB), BENCH_RUNTIME, BENCH_REPS,
#   BENCH_SIZE_MIB (working set, default 512), BENCH_DELAY (default 1ms),
#   BENCH_TMPDIR, BLOCKWAYD (see bench/lib.sh); BLOCKWAYD_BASE=PATH adds
#   half-base and whole-base: the same with a second daemon (say, last
#   main's; its blockway CLI next to it), in the same rounds: an A/B
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 3 512
[[ $QUICK == 1 ]] && SIZE_MIB=${BENCH_SIZE_MIB:-128}
DELAY=${BENCH_DELAY:-1ms}
BLOCKWAY=${BLOCKWAY:-$(dirname "$BLOCKWAYD")/blockway}
[[ -x $BLOCKWAYD && -x $BLOCKWAY ]] || die "build blockwayd and blockway first"
CONFIGS=(half whole direct)
if [[ -n ${BLOCKWAYD_BASE:-} ]]; then
    [[ -x $BLOCKWAYD_BASE && -x $(dirname "$BLOCKWAYD_BASE")/blockway ]] ||
        die "BLOCKWAYD_BASE=$BLOCKWAYD_BASE: no blockwayd with a blockway next to it"
    CONFIGS=(half half-base whole whole-base direct)
fi

bench_tmpdir bw-capacity
tmp=$TMP
bench_cleanup_trap

img=$tmp/remote.img
head -c $((SIZE_MIB << 20)) /dev/urandom > "$img"

wait_port() {
    for _ in $(seq 200); do port_open "$1" && return 0; sleep 0.05; done
    die "nothing listens on port $1"
}

rport=$(free_port)
bench_start /dev/null nbdkit -f -i 127.0.0.1 -p "$rport" --filter=delay file "$img" rdelay="$DELAY"
wait_port "$rport"

fio_iops() {  # URI SECONDS [extra fio args]: read IOPS
    local uri=$1 secs=$2; shift 2
    fio --name=r --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=16 --size=${SIZE_MIB}M \
        --time_based --runtime="$secs" --output-format=json "$@" 2>"$tmp/fio.err" |
        "$PY" -c 'import json,sys; t=sys.stdin.read(); print(int(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))' ||
        die "fio failed: $(cat "$tmp/fio.err")"
}

run_cfg() {  # NAME -> prints "IOPS HITRATIO EVICTIONS FILEBYTES"
    local name=$1 port sock dir opts daemon=$BLOCKWAYD cli=$BLOCKWAY
    port=$(free_port); dir=$tmp/$name-$RANDOM; mkdir -p "$dir"; sock=$dir/control.sock
    if [[ $name == *-base ]]; then
        daemon=$BLOCKWAYD_BASE; cli=$(dirname "$BLOCKWAYD_BASE")/blockway
    fi
    case ${name%-base} in
        half)   opts=",cache=$dir/cache,capacity=$((SIZE_MIB / 2))M" ;;
        whole)  opts=",cache=$dir/cache,capacity=${SIZE_MIB}M" ;;
        direct) opts="" ;;
    esac
    bench_start "$dir/log" "$daemon" --listen 127.0.0.1:"$port" --data-dir "$dir/data" \
        --control-socket "$sock" --log-level warn --export "b=nbd://127.0.0.1:$rport/$opts"
    local pid=$BG_PID
    wait_port "$port"
    local uri=nbd://127.0.0.1:$port/b
    # Warm-up: one pass over the working set in random order (untimed).
    fio --name=w --ioengine=nbd --uri="$uri" --rw=randread --bs=64k --iodepth=16 --size=${SIZE_MIB}M \
        >/dev/null 2>&1
    local before after iops
    before=$("$cli" --socket "$sock" stats b --json)
    iops=$(fio_iops "$uri" "$RUNTIME")
    after=$("$cli" --socket "$sock" stats b --json)
    "$PY" - "$iops" "$before" "$after" <<'EOF'
import json, sys
iops = int(sys.argv[1]); b = json.loads(sys.argv[2]); a = json.loads(sys.argv[3])
if a.get("cache"):
    hits = a["cache"]["hits"] - b["cache"]["hits"]; misses = a["cache"]["misses"] - b["cache"]["misses"]
    print(iops, "%.2f" % (hits / max(1, hits + misses)), a["cache"]["evictions"] - b["cache"]["evictions"],
          a["cache"]["file_bytes"])
else:
    print(iops, "-", "-", "-")
EOF
    stop_pid "$pid" >&2
}

declare -A results
for ((r = 1; r <= REPS; r++)); do
    for cfg in "${CONFIGS[@]}"; do
        results[$cfg]+="$(run_cfg $cfg);"
    done
done

echo "4k random read, QD16, warm, working set ${SIZE_MIB} MiB, remote nbdkit rdelay=$DELAY, ${RUNTIME}s x $REPS rounds"
printf "%-11s %10s %8s %12s %14s\n" config IOPS hits evictions "file on disk"
for cfg in "${CONFIGS[@]}"; do
    "$PY" - "$cfg" "${results[$cfg]}" <<'EOF'
import statistics, sys
cfg, raw = sys.argv[1], [r.split() for r in sys.argv[2].split(";") if r.strip()]
iops = statistics.median(int(r[0]) for r in raw)
last = raw[-1]
fb = "-" if last[3] == "-" else "%d MiB" % (int(last[3]) >> 20)
print("%-11s %10d %8s %12s %14s" % (cfg, iops, last[1], last[2], fb))
EOF
done
