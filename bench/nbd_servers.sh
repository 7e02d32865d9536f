#!/usr/bin/env bash
# Benchmark blockwayd against nbdkit (file plugin) and qemu-nbd, serving the
# same raw file from page cache, measured with the same clients (nbdcopy, fio).
#
# Usage: bench/nbd_servers.sh
#
# Environment knobs:
#   BENCH_QUICK=1       smoke test: one round, 2 s fio runs, 256 MiB image
#   BENCH_RUNTIME=N     seconds per fio run (default 10; 2 in quick mode)
#   BENCH_REPS=N        rounds; each figure is the median (default 5; 1 quick)
#   BENCH_SIZE_MIB=N    image size in MiB (default 1024; 256 in quick mode)
#   BENCH_TMPDIR=DIR    where the temp dir goes (default /var/tmp)
#   BLOCKWAYD=PATH      daemon binary (default <repo>/build/blockwayd)
#   BLOCKWAYD_BASE=PATH a second daemon binary (say, last main's) measured as
#                       "blockwayd-base" in the same rounds: an A/B of a change
#
# Method: each round starts each server in turn on a fresh free port, runs
# seq read, 4k randread, seq write, 4k randwrite against it, then stops it
# with SIGTERM. Rounds interleave the servers so slow drift in the machine
# affects all of them alike. The report gives the median per cell.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 5
EXPORT=bench
SERVERS=(blockwayd nbdkit qemu-nbd)
[[ -n ${BLOCKWAYD_BASE:-} ]] && SERVERS=(blockwayd blockwayd-base nbdkit qemu-nbd)
NBDCOPY_OPTS=(--requests=64 --connections=4)


for tool in nbdkit qemu-nbd nbdcopy nbdinfo fio jq; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[[ -x $BLOCKWAYD ]] || die "blockwayd not found at $BLOCKWAYD (set BLOCKWAYD=)"

bench_tmpdir nbd-bench
IMG=$TMP/img.raw        # the served image
SRC=$TMP/src.raw        # source of the sequential write
RESULTS=$TMP/results.tsv
bench_private_daemon
if [[ -n ${BLOCKWAYD_BASE:-} ]]; then
    [[ -x $BLOCKWAYD_BASE ]] || die "BLOCKWAYD_BASE=$BLOCKWAYD_BASE is not an executable"
    cp "$BLOCKWAYD_BASE" "$TMP/blockwayd-base"
fi
cd "$TMP"   # anything a client drops in its cwd goes away with TMP
SERVER_PID=
SERVER_NAME=
SERVER_LOG=

show_log() {
    if [[ $1 -ne 0 && -n $SERVER_LOG && -f $SERVER_LOG ]]; then
        echo "--- last lines of $SERVER_NAME log ---" >&2
        tail -n 20 "$SERVER_LOG" >&2 || true
    fi
}
bench_cleanup_trap show_log

# ---------------------------------------------------------------- machine info
machine_info() {
    bench_machine_info "$(nbdkit --version | head -n1); $(qemu-nbd --version | head -n1)" \
        "$(nbdcopy --version | head -n1) ($(nbdcopy --version | sed -n 2p)); $(fio --version)" \
        "image: ${SIZE_MIB} MiB random data on $(df --output=source,fstype "$TMP" | tail -n1 | tr -s ' '), in page cache" \
        "fio runtime ${RUNTIME} s, ${REPS} round(s), median reported"
}

# ---------------------------------------------------------------- servers
start_server() {
    local name=$1 port=$2
    SERVER_NAME=$name
    SERVER_LOG=$TMP/$name.log
    case $name in
    blockwayd | blockwayd-base)
        local bin=$BLOCKWAYD
        [[ $name == blockwayd-base ]] && bin=$TMP/blockwayd-base
        rm -f "$TMP/blockwayd.pid"
        bench_start "$SERVER_LOG" "$bin" --listen "127.0.0.1:$port" --export "$EXPORT=file://$IMG" \
            --pid-file "$TMP/blockwayd.pid"
        wait_pid_file "$TMP/blockwayd.pid" "$BG_PID"
        ;;
    nbdkit)
        bench_start "$SERVER_LOG" nbdkit -f -p "$port" file "$IMG"
        ;;
    qemu-nbd)
        # -x: same export name as the others; -e 4: allow nbdcopy's 4
        # connections (the default, 1, also makes qemu-nbd not advertise
        # multi-conn, so nbdcopy would fall back to a single connection).
        bench_start "$SERVER_LOG" qemu-nbd -f raw -p "$port" -t -x "$EXPORT" -e 4 "$IMG"
        ;;
    *) die "unknown server $name" ;;
    esac
    SERVER_PID=$BG_PID
    wait_nbd "nbd://127.0.0.1:$port/$EXPORT"
}

stop_server() {
    stop_pid "$SERVER_PID"
    if [[ $SERVER_NAME == blockwayd* && $STOP_RC -ne 0 ]]; then
        die "blockwayd exited with status $STOP_RC after SIGTERM (log: see above)"
    fi
    SERVER_PID=
}

# ---------------------------------------------------------------- tests

seq_read() {
    local port=$1 t0 t1
    t0=$(now)
    nbdcopy "${NBDCOPY_OPTS[@]}" "nbd://127.0.0.1:$port/$EXPORT" null: \
        || die "$SERVER_NAME: nbdcopy read failed"
    t1=$(now)
    mbps "$BYTES" "$t0" "$t1"
}

seq_write() {
    local port=$1 t0 t1
    t0=$(now)
    nbdcopy "${NBDCOPY_OPTS[@]}" "$SRC" "nbd://127.0.0.1:$port/$EXPORT" \
        || die "$SERVER_NAME: nbdcopy write failed"
    t1=$(now)
    mbps "$BYTES" "$t0" "$t1"
}

fio_4k() {   # port rw: IOPS
    local v
    v=$(fio_nbd "nbd://127.0.0.1:$1/$EXPORT" "$2" 4k)
    echo "${v% *}"
}

# ---------------------------------------------------------------- setup
BYTES=$((SIZE_MIB * 1024 * 1024))
echo "Creating ${SIZE_MIB} MiB random images in $TMP ..." >&2
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
dd if=/dev/urandom of="$SRC" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
sync
cat "$IMG" "$SRC" >/dev/null      # make sure both are in page cache
: >"$RESULTS"

machine_info

# ---------------------------------------------------------------- run
for ((round = 1; round <= REPS; round++)); do
    for srv in "${SERVERS[@]}"; do
        port=$(free_port)
        start_server "$srv" "$port"
        v=$(seq_read "$port");              record "$srv" seqread  "$round" "$v"
        v=$(fio_4k "$port" randread);       record "$srv" randread "$round" "$v"
        v=$(seq_write "$port");             record "$srv" seqwrite "$round" "$v"
        sync   # flush dirty pages now, not during the next test
        if [[ $round == 1 ]]; then
            # not timed: what was written reads back intact over this server
            nbdcopy "nbd://127.0.0.1:$port/$EXPORT" - | cmp -s - "$SRC" \
                || die "$srv: data read back after the sequential write differs from the source"
        fi
        v=$(fio_4k "$port" randwrite);      record "$srv" randwrite "$round" "$v"
        sync
        stop_server
        echo "round $round/$REPS $srv (port $port): $(awk -F'\t' -v s="$srv" -v r="$round" '$1==s && $3==r {printf "%s=%s ", $2, $4}' "$RESULTS")" >&2
    done
done

# ---------------------------------------------------------------- report
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
PYTHONPATH=$repo/bench "$PY" - "$RESULTS" "$LOAD_END" <<'EOF'
import statistics, sys
from lib import read_results
_, data, med = read_results(sys.argv[1])
servers = ["blockwayd", "nbdkit", "qemu-nbd"]
base = ("blockwayd-base", "seqread") in med
if base:
    servers.insert(1, "blockwayd-base")
others = [s for s in servers if s != "blockwayd"]
tests = [("seqread", "seq read MB/s (nbdcopy)"),
         ("seqwrite", "seq write MB/s (nbdcopy)"),
         ("randread", "4k randread IOPS (fio nbd, QD16)"),
         ("randwrite", "4k randwrite IOPS (fio nbd, QD16)")]
print("## Results (median)")
print()
print("| test | " + " | ".join(servers) + " | " + " | ".join(f"blockwayd/{o}" for o in others) + " |")
print("| --- | " + " | ".join("---:" for _ in servers + others) + " |")
for t, label in tests:
    b = med[("blockwayd", t)]
    print(f"| {label} | " + " | ".join(f"{med[(s, t)]:.0f}" for s in servers) + " | "
          + " | ".join(f"{b / med[(o, t)]:.2f}" for o in others) + " |")
print()
print(f"Load average at end: {sys.argv[2]}")
print()
# Servers are interleaved within a round, so a ratio taken inside one round
# sees the same machine state; its median is robust against drift.
def ratios(t, other):
    return [b / o for b, o in zip(data[("blockwayd", t)], data[(other, t)])]
print("## All runs (in round order)")
print()
print("| test | " + " | ".join(servers) + " | " + " | ".join(f"median per-round blockwayd/{o}" for o in others) + " |")
print("| --- | " + " | ".join("---" for _ in servers) + " | " + " | ".join("---:" for _ in others) + " |")
for t, label in tests:
    cells = [", ".join(f"{v:.0f}" for v in data[(s, t)]) for s in servers]
    cells += [f"{statistics.median(ratios(t, o)):.2f}" for o in others]
    print(f"| {label} | " + " | ".join(cells) + " |")
EOF
