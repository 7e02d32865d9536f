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
#
# Method: each round starts each server in turn on a fresh free port, runs
# seq read, 4k randread, seq write, 4k randwrite against it, then stops it
# with SIGTERM. Rounds interleave the servers so slow drift in the machine
# affects all of them alike. The report gives the median per cell.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

source "$here/lib.sh"
bench_settings 10 5
EXPORT=bench
SERVERS=(blockwayd nbdkit qemu-nbd)
NBDCOPY_OPTS=(--requests=64 --connections=4)

die() { echo "nbd_servers.sh: $*" >&2; exit 1; }

for tool in nbdkit qemu-nbd nbdcopy nbdinfo fio jq; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[[ -x $BLOCKWAYD ]] || die "blockwayd not found at $BLOCKWAYD (set BLOCKWAYD=)"

TMP=$(mktemp -d "$TMPBASE/nbd-bench.XXXXXX")
IMG=$TMP/img.raw        # the served image
SRC=$TMP/src.raw        # source of the sequential write
RESULTS=$TMP/results.tsv
# Run a private copy of the daemon, so a rebuild of build/ during the run
# cannot mix two versions into one set of figures.
cp "$BLOCKWAYD" "$TMP/blockwayd"
BLOCKWAYD_ORIG=$BLOCKWAYD
BLOCKWAYD=$TMP/blockwayd
cd "$TMP"   # anything a client drops in its cwd goes away with TMP
SERVER_PID=
SERVER_NAME=
SERVER_LOG=

cleanup() {
    local rc=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 && -n $SERVER_LOG && -f $SERVER_LOG ]]; then
        echo "--- last lines of $SERVER_NAME log ---" >&2
        tail -n 20 "$SERVER_LOG" >&2 || true
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- machine info
machine_info() {
    echo "## Machine"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "- memory: $(free -m | awk '/^Mem:/ {print $2 " MiB"}'); kernel: $(uname -sr)"
    echo "- blockwayd: $("$BLOCKWAYD" --version 2>&1 | head -n1), $BLOCKWAYD_ORIG built $(date -u -r "$BLOCKWAYD_ORIG" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$BLOCKWAYD" | cut -c1-12) (repo at $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet 2>/dev/null || echo '+dirty'))"
    echo "- $(nbdkit --version | head -n1); $(qemu-nbd --version | head -n1)"
    echo "- $(nbdcopy --version | head -n1) ($(nbdcopy --version | sed -n 2p)); $(fio --version)"
    echo "- image: ${SIZE_MIB} MiB random data on $(df --output=source,fstype "$TMP" | tail -n1 | tr -s ' '), in page cache"
    echo "- fio runtime ${RUNTIME} s, ${REPS} round(s), median reported"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
    echo
}

# ---------------------------------------------------------------- servers
start_server() {
    local name=$1 port=$2
    SERVER_NAME=$name
    SERVER_LOG=$TMP/$name.log
    case $name in
    blockwayd)
        rm -f "$TMP/blockwayd.pid"
        "$BLOCKWAYD" --listen "127.0.0.1:$port" --export "$EXPORT=file://$IMG" \
            --pid-file "$TMP/blockwayd.pid" >>"$SERVER_LOG" 2>&1 &
        SERVER_PID=$!
        ;;
    nbdkit)
        nbdkit -f -p "$port" file "$IMG" >>"$SERVER_LOG" 2>&1 &
        SERVER_PID=$!
        ;;
    qemu-nbd)
        # -x: same export name as the others; -e 4: allow nbdcopy's 4
        # connections (the default, 1, also makes qemu-nbd not advertise
        # multi-conn, so nbdcopy would fall back to a single connection).
        qemu-nbd -f raw -p "$port" -t -x "$EXPORT" -e 4 "$IMG" >>"$SERVER_LOG" 2>&1 &
        SERVER_PID=$!
        ;;
    *) die "unknown server $name" ;;
    esac
    local ok=0
    for _ in $(seq 200); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "$name exited during startup"
        if [[ $name == blockwayd && ! -s $TMP/blockwayd.pid ]]; then sleep 0.05; continue; fi
        if nbdinfo --size "nbd://127.0.0.1:$port/$EXPORT" >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.05
    done
    [[ $ok == 1 ]] || die "$name did not answer on port $port within 10 s"
    if [[ $name == blockwayd ]]; then
        [[ $(cat "$TMP/blockwayd.pid") == "$SERVER_PID" ]] || die "blockwayd pid file does not match pid $SERVER_PID"
    fi
}

stop_server() {
    local rc=0
    kill -TERM "$SERVER_PID"
    for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "warning: $SERVER_NAME did not stop within 10 s of SIGTERM; killing it" >&2
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" || rc=$?
    if [[ $SERVER_NAME == blockwayd && $rc -ne 0 ]]; then
        die "blockwayd exited with status $rc after SIGTERM (log: see above)"
    fi
    SERVER_PID=
}

# ---------------------------------------------------------------- tests
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }

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

fio_4k() {
    local port=$1 rw=$2 dir out=$TMP/fio.json
    case $rw in randread) dir="read" ;; randwrite) dir="write" ;; esac
    fio --name="$rw" --ioengine=nbd --uri="nbd://127.0.0.1:$port/$EXPORT" \
        --rw="$rw" --bs=4k --iodepth=16 --numjobs=1 --time_based \
        --runtime="$RUNTIME" --size="${SIZE_MIB}M" \
        --output-format=json --output="$out" >/dev/null \
        || { cat "$out" >&2 2>/dev/null || true; die "$SERVER_NAME: fio $rw failed"; }
    local err
    err=$(jq '.jobs[0].error' "$out")
    [[ $err == 0 ]] || die "$SERVER_NAME: fio $rw reported error $err"
    jq -r ".jobs[0].$dir.iops | floor" "$out"
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
"$PY" - "$RESULTS" "$LOAD_END" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
data = {}
for srv, test, rnd, val in rows:
    data.setdefault((srv, test), []).append(float(val))
servers = ["blockwayd", "nbdkit", "qemu-nbd"]
tests = [("seqread", "seq read MB/s (nbdcopy)"),
         ("seqwrite", "seq write MB/s (nbdcopy)"),
         ("randread", "4k randread IOPS (fio nbd, QD16)"),
         ("randwrite", "4k randwrite IOPS (fio nbd, QD16)")]
med = {k: statistics.median(v) for k, v in data.items()}
print("## Results (median)")
print()
print("| test | blockwayd | nbdkit | qemu-nbd | blockwayd/nbdkit | blockwayd/qemu-nbd |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for t, label in tests:
    b, n, q = (med[(s, t)] for s in servers)
    print(f"| {label} | {b:.0f} | {n:.0f} | {q:.0f} | {b/n:.2f} | {b/q:.2f} |")
print()
print(f"Load average at end: {sys.argv[2]}")
print()
# Servers are interleaved within a round, so a ratio taken inside one round
# sees the same machine state; its median is robust against drift.
def ratios(t, other):
    return [b / o for b, o in zip(data[("blockwayd", t)], data[(other, t)])]
print("## All runs (in round order)")
print()
print("| test | " + " | ".join(servers) + " | median per-round blockwayd/nbdkit | median per-round blockwayd/qemu-nbd |")
print("| --- | " + " | ".join("---" for _ in servers) + " | ---: | ---: |")
for t, label in tests:
    cells = [", ".join(f"{v:.0f}" for v in data[(s, t)]) for s in servers]
    cells += [f"{statistics.median(ratios(t, o)):.2f}" for o in ("nbdkit", "qemu-nbd")]
    print(f"| {label} | " + " | ".join(cells) + " |")
EOF
