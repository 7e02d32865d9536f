#!/usr/bin/env bash
# NBD over TLS (issue 14): blockwayd with --tls=require against blockwayd in
# plaintext and against nbdkit --tls=require on the same certificates,
# serving the same raw file from page cache, side by side in one run.
#
# Usage: bench/tls.sh            (report on stdout; BENCH_OUT=FILE also writes it there)
#
# Client: bench/nbd_io.c (built here with cc -lnbd): libnbd's asynchronous
# API on one connection, requests kept DEPTH deep. fio's nbd engine cannot
# be used: libnbd refuses the tls-certificates URI parameter unless the
# program allows local files, and fio does not; nbdcopy has no random I/O.
# Tests: seq read and seq write (1 MiB, depth 8), 4k random read and write
# (depth 16), each for RUNTIME seconds. Both sides' CPU is reported: the
# server's from /proc, the client's from /usr/bin/time; on the sequential
# tests their sum bounds what any server-side threading could gain here.
#
# Environment knobs: BENCH_QUICK=1 (one round, 2 s, 256 MiB), BENCH_RUNTIME=N
# (seconds per test, default 8), BENCH_REPS=N (rounds, default 5),
# BENCH_SIZE_MIB=N (default 1024), BENCH_TMPDIR, BLOCKWAYD; BLOCKWAYD_BASE=OLD
# adds an older build's TLS server to the same rounds (a before/after column).
#
# Method: each round starts each server in turn on a fresh port, runs the four
# tests against it, and stops it; the servers' order rotates from round to
# round so drift in the machine's load hits all of them alike. The report
# gives the median of each cell, the ratios the targets are about, and the
# load average before every round.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 8 5
EXPORT=bench
SERVERS=(blockwayd-tls blockwayd-plain nbdkit-tls)
TESTS=(seq-read seq-write rand-read-4k rand-write-4k)
[[ -n ${BLOCKWAYD_BASE:-} ]] && SERVERS+=(base-tls)

bench_remote_setup tls-bench nbdkit nbdinfo cc certtool
IMG=$TMP/img.raw
bench_cleanup_trap

cc -O2 -Wall -o "$TMP/nbd_io" "$repo/bench/nbd_io.c" -lnbd || die "cannot build bench/nbd_io.c (libnbd-dev)"
"$PY" -c "import sys; sys.path.insert(0, '$repo/tests/integration'); import tls_certs; tls_certs.make_pki('$TMP/pki')" \
    || die "cannot make certificates (certtool)"
PKI=$TMP/pki
head -c $((SIZE_MIB << 20)) /dev/urandom >"$IMG"

start_server() {
    local name=$1 port=$2
    case $name in
    blockwayd-tls | blockwayd-plain | base-tls)
        local tls=() bin=$BLOCKWAYD
        [[ $name == *-tls ]] && tls=(--tls=require --tls-certificates "$PKI/server")
        [[ $name == base-tls ]] && bin=$BLOCKWAYD_BASE
        rm -f "$TMP/blockwayd.pid"
        bench_start "$TMP/$name.log" "$bin" --listen "127.0.0.1:$port" --export "$EXPORT=file://$IMG" \
            --control-socket off --pid-file "$TMP/blockwayd.pid" "${tls[@]}"
        wait_pid_file "$TMP/blockwayd.pid" "$BG_PID"
        ;;
    nbdkit-tls)
        bench_start "$TMP/$name.log" nbdkit -f -p "$port" -e "$EXPORT" --tls=require \
            --tls-certificates="$PKI/server" file "$IMG"
        ;;
    esac
    SERVER_PID=$BG_PID
    wait_nbd "$(uri "$name" "$port")"
}

uri() {
    if [[ $1 == *-tls ]]; then
        echo "nbds://localhost:$2/$EXPORT?tls-certificates=$PKI/client"
    else
        echo "nbd://localhost:$2/$EXPORT"
    fi
}

# run_test URI TEST: prints "IOPS MB/s"; the client's user+system CPU
# seconds go to $TMP/client.cpu.
run_test() {
    local u=$1 test=$2 args
    case $test in
    seq-read) args=(read 1048576 8) ;;
    seq-write) args=(write 1048576 8) ;;
    rand-read-4k) args=(randread 4096 16) ;;
    rand-write-4k) args=(randwrite 4096 16) ;;
    esac
    "$TIME" -f '%U %S' -o "$TMP/client.cpu" "$TMP/nbd_io" "$u" "${args[@]}" "$RUNTIME"
}

# The server's user+system CPU (clock ticks): what a request costs it, which
# the machine's load disturbs far less than throughput does.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU-s per GB for the sequential tests, CPU-us per request for the 4k ones:
# cpu_cost TEST CPU-SECONDS IOPS MB/s
cpu_cost() {
    if [[ $1 == seq-* ]]; then
        "$PY" -c "print('%.3f' % ($2 / max($4 * $RUNTIME / 1000, 1e-9)))"
    else
        "$PY" -c "print('%.1f' % ($2 * 1e6 / max($3 * $RUNTIME, 1)))"
    fi
}
HZ=$(getconf CLK_TCK)
# The client's CPU too: client and server share the machine's cores, so what
# the client spends bounds what a faster server could gain (see the notes in
# bench/results/tls.md on encrypting on a second thread).
TIME=/usr/bin/time
[[ -x $TIME ]] || die "missing /usr/bin/time (Debian package time)"

loads=()
for round in $(seq "$REPS"); do
    loads+=("$(cut -d' ' -f1 /proc/loadavg)")
    n=${#SERVERS[@]}
    for i in $(seq 0 $((n - 1))); do
        name=${SERVERS[$(((i + round - 1) % n))]}
        port=$(free_port)
        start_server "$name" "$port"
        for test in "${TESTS[@]}"; do
            t0=$(cpu_ticks "$SERVER_PID")
            run_test "$(uri "$name" "$port")" "$test" >"$TMP/io.out" || die "$name $test failed"
            t1=$(cpu_ticks "$SERVER_PID")
            read -r iops mbs <"$TMP/io.out"
            read -r cu cs <"$TMP/client.cpu"
            server=$("$PY" -c "print($((t1 - t0)) / $HZ)")
            client=$("$PY" -c "print($cu + $cs)")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$test" "$iops" "$mbs" \
                "$(cpu_cost "$test" "$server" "$iops" "$mbs")" "$(cpu_cost "$test" "$client" "$iops" "$mbs")" >>"$RESULTS"
        done
        stop_pid "$SERVER_PID"
    done
done

cell() { median $(awk -F'\t' -v s="$1" -v t="$2" -v c="$3" '$2==s && $3==t {print $c}' "$RESULTS"); }
ratio() { "$PY" -c "print('%.2f' % ($1 / $2))"; }
ceiling() { "$PY" -c "print('%.0f' % ($(nproc) * 1000 / max($(cell "$1" "$2" 6) + $(cell "$1" "$2" 7), 1e-9)))"; }

report() {
    echo "# NBD over TLS: blockwayd --tls=require vs plaintext vs nbdkit --tls=require"
    echo
    bench_machine_info "$(nbdkit --version | head -n1); libnbd $(nbdinfo --version | sed -n 2p | awk '{print $2}')" \
        "client: bench/nbd_io.c (libnbd aio, one connection); seq 1 MiB depth 8, 4k random depth 16, ${RUNTIME} s each" \
        "image: ${SIZE_MIB} MiB random data in $TMPBASE, in page cache; certificates: ECDSA P-256 (certtool)" \
        "${REPS} round(s), servers rotated each round; load average (1 min) before each round: ${loads[*]}"
    echo "| test | blockwayd TLS | blockwayd plain | nbdkit TLS | TLS/plain (target) | vs nbdkit TLS (target >= 1.0) |"
    echo "| --- | --- | --- | --- | --- | --- |"
    local test col unit tls plain kit target base_rows=()
    for test in "${TESTS[@]}"; do
        if [[ $test == seq-* ]]; then col=5; unit=MB/s; target=0.8; else col=4; unit=IOPS; target=0.9; fi
        tls=$(cell blockwayd-tls "$test" $col)
        plain=$(cell blockwayd-plain "$test" $col)
        kit=$(cell nbdkit-tls "$test" $col)
        echo "| $test ($unit) | $tls | $plain | $kit | $(ratio "$tls" "$plain") (>= $target) | $(ratio "$tls" "$kit") |"
        [[ -n ${BLOCKWAYD_BASE:-} ]] && base_rows+=("| $test ($unit) | $(cell base-tls "$test" $col) | $tls |")
    done
    echo
    echo "Server CPU (user+system; median): CPU-s per GB (seq), CPU-us per request (4k)"
    echo
    echo "| test | blockwayd TLS | blockwayd plain | nbdkit TLS |$([[ -n ${BLOCKWAYD_BASE:-} ]] && echo ' base TLS |')"
    echo "| --- | --- | --- | --- |$([[ -n ${BLOCKWAYD_BASE:-} ]] && echo ' --- |')"
    for test in "${TESTS[@]}"; do
        echo "| $test | $(cell blockwayd-tls "$test" 6) | $(cell blockwayd-plain "$test" 6) | $(cell nbdkit-tls "$test" 6) |$(
            [[ -n ${BLOCKWAYD_BASE:-} ]] && echo " $(cell base-tls "$test" 6) |")"
    done
    echo
    echo "Client CPU (bench/nbd_io with libnbd, user+system; median), same units"
    echo
    echo "| test | blockwayd TLS | blockwayd plain | nbdkit TLS |"
    echo "| --- | --- | --- | --- |"
    for test in "${TESTS[@]}"; do
        echo "| $test | $(cell blockwayd-tls "$test" 7) | $(cell blockwayd-plain "$test" 7) | $(cell nbdkit-tls "$test" 7) |"
    done
    echo
    echo "Ceiling with client and server on this machine's $(nproc) cores, sequential:"
    echo "cores / (server + client CPU-s per GB), in MB/s (the most any server"
    echo "threading could reach with this client here), against the median measured"
    echo
    echo "| test | blockwayd TLS ceiling | measured | blockwayd plain ceiling | measured |"
    echo "| --- | --- | --- | --- | --- |"
    for test in "${TESTS[@]}"; do
        [[ $test == seq-* ]] || continue
        echo "| $test | $(ceiling blockwayd-tls "$test") | $(cell blockwayd-tls "$test" 5) | $(ceiling blockwayd-plain "$test") | $(cell blockwayd-plain "$test" 5) |"
    done
    if [[ -n ${BLOCKWAYD_BASE:-} ]]; then
        echo
        echo "Before/after, TLS: BLOCKWAYD_BASE=$BLOCKWAYD_BASE vs BLOCKWAYD=$BLOCKWAYD"
        echo
        echo "| test | base TLS | this TLS |"
        echo "| --- | --- | --- |"
        printf '%s\n' "${base_rows[@]}"
    fi
    echo
    echo "Raw rounds (round, server, test, IOPS, MB/s, server CPU cost, client CPU cost):"
    echo
    echo '```'
    cat "$RESULTS"
    echo '```'
}

if [[ -n ${BENCH_OUT:-} ]]; then report | tee "$BENCH_OUT"; else report; fi
