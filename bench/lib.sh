# Shared parts of the benchmark scripts, sourced first thing:
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It sets `repo` (the repository root) and defines die MESSAGE (prints it
# after the script's name and exits 1); then the script calls bench_settings.
#
#   bench_settings RUNTIME REPS [SIZE_MIB]
#       QUICK, RUNTIME, REPS, SIZE_MIB from BENCH_QUICK / BENCH_RUNTIME /
#       BENCH_REPS / BENCH_SIZE_MIB (quick mode: 2 s runs, 1 round, 256 MiB;
#       else the defaults given, SIZE_MIB 1024 unless given), BLOCKWAYD
#       (default build/blockwayd), TMPBASE (BENCH_TMPDIR, default /var/tmp),
#       PY (Debian's python3: the pyenv shim may not be there for every user)
#       and a PATH with the system directories first.
#   bench_tmpdir NAME          TMP: a fresh directory under TMPBASE
#   bench_private_daemon       runs a copy of BLOCKWAYD from TMP, so a rebuild
#                              of build/ during the run cannot mix versions
#                              (BLOCKWAYD_ORIG keeps the original path)
#   bench_cleanup_trap [HOOK]  on exit: HOOK, stop every tracked pid (newest
#                              first), remove TMP; INT and TERM exit too
#   bench_ceph_cluster SRC     a one-node Ceph cluster with the image
#                              rbd/bench written with SRC (random data):
#                              CONF, KEYRING, QEMU, OSD (see there)
#   bench_blockwayd BIN SPEC   BIN exporting bench=SPEC on loopback: BW_PID,
#                              NBD; bench_stop_blockwayd (exit status 0)
#   bench_start LOG CMD...     CMD in the background, output to LOG; its pid
#                              in BG_PID, tracked for the cleanup
#   stop_pid PID [SIGNAL]      SIGNAL (TERM), SIGKILL after 10 s, reap; the
#                              exit status in STOP_RC; untracks PID
#   wait_nbd URI [SECONDS]     until nbdinfo answers on URI (default 10 s)
#   wait_pid_file FILE PID [S] until FILE holds PID (blockwayd's --pid-file)
#   port_open PORT             whether something listens on 127.0.0.1:PORT
#   free_port, now, mbps BYTES T0 T1 (MB/s, 10^6 bytes), median [N...]
#   fio_nbd URI RW BS [ARGS]   fio's nbd engine, QD16, time based: prints
#                              "IOPS MB/s" of the direction that moved data
#   bench_machine_info [LINE...]  the "## Machine" block of a report

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "${0##*/}: $*" >&2; exit 1; }

bench_settings() {
    QUICK=${BENCH_QUICK:-0}
    if [[ $QUICK == 1 ]]; then
        RUNTIME=${BENCH_RUNTIME:-2}; REPS=${BENCH_REPS:-1}; SIZE_MIB=${BENCH_SIZE_MIB:-256}
    else
        RUNTIME=${BENCH_RUNTIME:-$1}; REPS=${BENCH_REPS:-$2}; SIZE_MIB=${BENCH_SIZE_MIB:-${3:-1024}}
    fi
    BLOCKWAYD=${BLOCKWAYD:-$repo/build/blockwayd}
    TMPBASE=${BENCH_TMPDIR:-/var/tmp}
    PY=python3
    [[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
    export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH
    BENCH_PIDS=()
    return 0
}

bench_tmpdir() { TMP=$(mktemp -d "$TMPBASE/$1.XXXXXX"); }

bench_private_daemon() {
    cp "$BLOCKWAYD" "$TMP/blockwayd"
    BLOCKWAYD_ORIG=$BLOCKWAYD
    BLOCKWAYD=$TMP/blockwayd
}

# The set-up every remote benchmark shares: the tools it needs (dies naming
# the first missing) and blockwayd, a private $TMP named after NAME holding
# $RESULTS and a copy of blockwayd (bench_private_daemon), the shell in $TMP.
# bench_remote_setup NAME TOOL...
bench_remote_setup() {
    local name=$1 tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "missing tool: $tool"
    done
    [[ -x $BLOCKWAYD ]] || die "blockwayd not found at $BLOCKWAYD (set BLOCKWAYD=)"
    bench_tmpdir "$name"
    RESULTS=$TMP/results.tsv
    bench_private_daemon
    cd "$TMP"
}

# A one-node Ceph cluster under $TMP/cluster (bench/ceph_cluster.py, tracked
# for the cleanup) with the image rbd/bench of SIZE_MIB, written with SRC, a
# fresh file of random data (left for the caller); sets CONF, KEYRING, QEMU
# (the image's name for qemu's rbd driver) and OSD (the ceph-osd's pid).
# bench_ceph_cluster SRC
bench_ceph_cluster() {
    mkdir -p "$TMP/cluster"
    bench_start "$TMP/cluster.log" "$PY" "$repo/bench/ceph_cluster.py" "$TMP/cluster" bench "$SIZE_MIB"
    for _ in $(seq 240); do
        [[ -f $TMP/cluster/ready ]] && break
        kill -0 "$BG_PID" || die "the cluster did not start"
        sleep 0.5
    done
    [[ -f $TMP/cluster/ready ]] || die "the cluster did not start within 120 s"
    read -r CONF KEYRING <"$TMP/cluster/ready"
    QEMU="rbd:rbd/bench:conf=$CONF:keyring=$KEYRING"
    OSD=$(pgrep -f "^ceph-osd -f -c $CONF" | head -n1)
    [[ -n $OSD ]] || die "no ceph-osd for $CONF"
    dd if=/dev/urandom of="$1" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
    qemu-img convert -n -f raw -O raw "$1" "$QEMU"
}

# blockwayd (BINARY) exporting "bench=SPEC" on a free loopback port, no
# control socket, data in $TMP/data, until it answers; sets BW_PID (tracked
# for the cleanup) and NBD (the export's URI). bench_stop_blockwayd stops it
# and fails unless it exited 0 after SIGTERM.
# bench_blockwayd BINARY SPEC
bench_blockwayd() {
    local port
    port=$(free_port)
    rm -f "$TMP/blockwayd.pid"
    bench_start "$TMP/blockwayd.log" "$1" --listen "127.0.0.1:$port" --control-socket off --data-dir "$TMP/data" \
        --export "bench=$2" --pid-file "$TMP/blockwayd.pid"
    BW_PID=$BG_PID
    wait_pid_file "$TMP/blockwayd.pid" "$BW_PID" 60
    NBD="nbd://127.0.0.1:$port/bench"
    wait_nbd "$NBD" 30
}
bench_stop_blockwayd() {
    stop_pid "$BW_PID"
    BW_PID=
    [[ $STOP_RC == 0 ]] || die "blockwayd exited with status $STOP_RC after SIGTERM"
}

# record FIELD...: one tab-separated line of $RESULTS.
record() { local IFS=$'\t'; echo "$*" >>"$RESULTS"; }

# For a cleanup hook after a failure: the last LINES lines of each FILE there.
# bench_tail_logs LINES FILE...
bench_tail_logs() {
    local lines=$1 f
    shift
    for f in "$@"; do
        [[ -f $f ]] && { echo "--- last lines of $f ---" >&2; tail -n "$lines" "$f" >&2; }
    done
    return 0
}

_bench_cleanup() {
    local rc=$? i
    set +e
    [[ -n ${BENCH_CLEANUP_HOOK:-} ]] && "$BENCH_CLEANUP_HOOK" "$rc"
    for ((i = ${#BENCH_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${BENCH_PIDS[i]}"
    done
    [[ -n ${TMP:-} ]] && rm -rf "$TMP"
    exit "$rc"
}

bench_cleanup_trap() {
    BENCH_CLEANUP_HOOK=${1:-}
    trap _bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_start() {
    local log=$1; shift
    "$@" >>"$log" 2>&1 &
    BG_PID=$!
    BENCH_PIDS+=("$BG_PID")
}

# Not called in a $(...) subshell: only this shell can wait for its children.
stop_pid() {
    local pid=$1 sig=${2:-TERM} rc=0 keep=() p
    STOP_RC=0
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill "-$sig" "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "warning: pid $pid did not stop within 10 s of SIG$sig; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || rc=$?
    STOP_RC=$rc
    for p in "${BENCH_PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    BENCH_PIDS=("${keep[@]}")
    return 0
}

wait_nbd() {
    local uri=$1 tries=$(( ${2:-10} * 20 ))
    for _ in $(seq "$tries"); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "nothing answers on $uri"
}

wait_pid_file() {
    local file=$1 pid=$2 tries=$(( ${3:-10} * 20 ))
    for _ in $(seq "$tries"); do
        kill -0 "$pid" 2>/dev/null || die "pid $pid exited during startup (waiting for $file)"
        [[ -s $file ]] && break
        sleep 0.05
    done
    [[ -s $file ]] || die "no pid file $file after ${3:-10} s"
    [[ $(cat "$file") == "$pid" ]] || die "pid file $file does not match pid $pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
now() { date +%s.%N; }
# mbps BYTES T0 T1: MB/s (10^6 bytes) between two `now` stamps.
mbps() { "$PY" -c "import sys; print('%.0f' % ($1 / 1e6 / ($3 - $2)))"; }
# median N... (or numbers on stdin): the middle one, or the mean of the two.
median() {
    if (($#)); then printf '%s\n' "$@"; else cat; fi | sort -g |
        awk '{ a[NR] = $1 } END { if (!NR) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

fio_nbd() {
    local uri=$1 rw=$2 bs=$3 out=$TMP/fio.json dir
    shift 3
    case $rw in *read) dir=read ;; *) dir=write ;; esac
    fio --name="$rw" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth=16 --numjobs=1 \
        --time_based --runtime="$RUNTIME" --size="${SIZE_MIB}M" "$@" \
        --output-format=json --output="$out" >/dev/null \
        || { cat "$out" >&2 2>/dev/null || true; die "fio $rw $bs on $uri failed"; }
    [[ $(jq '.jobs[0].error' "$out") == 0 ]] || die "fio $rw $bs on $uri reported an error"
    jq -r ".jobs[0].$dir | \"\\(.iops | floor) \\(.bw_bytes / 1000000 | floor)\"" "$out"
}

bench_machine_info() {
    local line
    echo "## Machine"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "- memory: $(free -m | awk '/^Mem:/ {print $2 " MiB"}'); kernel: $(uname -sr)"
    echo "- blockwayd: $("$BLOCKWAYD" --version 2>&1 | head -n1), ${BLOCKWAYD_ORIG:-$BLOCKWAYD} built $(date -u -r "${BLOCKWAYD_ORIG:-$BLOCKWAYD}" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$BLOCKWAYD" | cut -c1-12) (repo at $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet 2>/dev/null || echo '+dirty'))"
    for line in "$@"; do echo "- $line"; done
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
    echo
}

# callgrind_requests BINARY EXPORT NAME RW N: starts BINARY under callgrind
# with --export EXPORT (whose name is NAME; several exports separated by
# spaces, a clone's base first) on $TMP/nbd.sock, its catalogue in
# $TMP/data, sends N 4k requests of fio's RW (randread, randwrite) at QD16
# over SIZE_MIB, stops it and prints the daemon's total instructions
# (bench/*_instructions.sh).
callgrind_requests() {
    local bin=$1 spec=$2 name=$3 rw=$4 n=$5 out=$TMP/callgrind.out sock=$TMP/nbd.sock pid s args=()
    for s in $spec; do args+=(--export "$s"); done
    rm -f "$out" "$TMP/pid" "$sock"
    bench_start "$TMP/blockwayd.log" valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$bin" --listen "unix:$sock" --control-socket off --pid-file "$TMP/pid" --data-dir "$TMP/data" "${args[@]}"
    pid=$BG_PID
    wait_pid_file "$TMP/pid" "$pid" 120
    wait_nbd "nbd+unix:///$name?socket=$sock" 60
    if ((n > 0)); then
        fio --name=r --ioengine=nbd --uri="nbd+unix:///$name?socket=$sock" --rw="$rw" --bs=4k --iodepth=16 \
            --number_ios="$n" --size="${SIZE_MIB}M" --output-format=json --output="$TMP/fio.json" >/dev/null \
            || die "fio on $name failed"
        [[ $(jq '.jobs[0].error' "$TMP/fio.json") == 0 ]] || die "fio on $name reported an error"
    fi
    stop_pid "$pid" TERM
    awk '/^(summary|totals):/ { print $2; exit }' "$out"
}
