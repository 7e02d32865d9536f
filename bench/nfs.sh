#!/usr/bin/env bash
# Benchmark the NFS backend: blockwayd serving an image file from nfs-ganesha
# (VFS FSAL, loopback) as an NBD export, next to clients that read and write
# the same file over NFS directly: nfs-cp (libnfs-utils) and qemu's nfs driver
# (qemu-img convert, qemu-img bench; package qemu-block-extra).
#
# Usage: bench/nfs.sh            (as root: ganesha, rpcbind)
#
# Environment knobs:
#   BENCH_QUICK=1       smoke test: one round, 2 s fio runs, 256 MiB image
#   BENCH_RUNTIME=N     seconds per fio run (default 10; 2 in quick mode)
#   BENCH_REPS=N        rounds; each figure is the median (default 3; 1 quick)
#   BENCH_SIZE_MIB=N    image size in MiB (default 1024; 256 in quick mode)
#   BENCH_TMPDIR=DIR    where the exported directory goes (default /var/tmp)
#   BLOCKWAYD=PATH      daemon binary (default <repo>/build/blockwayd)
#
# Method: one ganesha (port 2049; rpcbind is started only if none runs) exports
# a directory holding the image (random data, in page cache). Each round, for
# each contender in turn: sequential read of the whole image into a file in
# /dev/shm (nbdcopy from blockwayd's export; nfs-cp and qemu-img convert from
# the nfs:// URI), sequential write of a random source over the whole image
# (nbdcopy to blockwayd; qemu-img convert -n to nfs:// onto a second file of
# the same size; nfs-cp, which only creates files, to a new file), 4k QD16 random read and write with fio's nbd
# engine through blockwayd, and 4k QD16 reads and writes with qemu-img bench
# against both blockwayd's nbd:// and the nfs:// URI (the same client on both
# paths). blockwayd runs without a cache layer, with its default sessions (one
# per event loop); it is started per round and must exit 0 after SIGTERM.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 3
PSEUDO=/bwbench
BENCH_COUNT=$((QUICK == 1 ? 20000 : 100000))   # qemu-img bench requests


port_open 2049 && die "port 2049 is taken: another NFS server runs here"
bench_remote_setup nfs-bench ganesha.nfsd rpcbind nfs-ls nfs-cp qemu-img nbdcopy nbdinfo fio jq
EXP=$TMP/export
mkdir -p "$EXP"
IMG=$EXP/img.raw       # served by blockwayd
IMG2=$EXP/img2.raw     # written by the direct clients
SRC=$TMP/src.raw       # source of the sequential writes
OUT=/dev/shm/nfs-bench-out.$$.raw
BW_PID=

before_cleanup() {
    stop_pid "$BW_PID"
    [[ $1 -eq 0 ]] || bench_tail_logs 15 "$TMP"/blockwayd.log "$TMP"/ganesha.log
    rm -f "$OUT"
}
bench_cleanup_trap before_cleanup

# ---------------------------------------------------------------- setup
BYTES=$((SIZE_MIB * 1024 * 1024))
echo "Creating ${SIZE_MIB} MiB random images in $TMP ..." >&2
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
dd if=/dev/urandom of="$SRC" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
cp "$IMG" "$IMG2"
sync
cat "$IMG" "$IMG2" "$SRC" >/dev/null
: >"$RESULTS"

if ! port_open 111; then
    bench_start "$TMP/rpcbind.log" rpcbind -w -f
    for _ in $(seq 100); do port_open 111 && break; sleep 0.05; done
fi
cat >"$TMP/ganesha.conf" <<EOF
NFS_CORE_PARAM { Protocols = 3, 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; }
NFSv4 { Graceless = true; }
EXPORT { Export_Id = 1; Path = $EXP; Pseudo = $PSEUDO; Access_Type = RW;
         Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; FSAL { Name = VFS; } }
EOF
bench_start /dev/null ganesha.nfsd -F -f "$TMP/ganesha.conf" -L "$TMP/ganesha.log" -p "$TMP/ganesha.pid"
GANESHA_PID=$BG_PID
ok=0
for _ in $(seq 120); do
    kill -0 "$GANESHA_PID" 2>/dev/null || die "ganesha exited during startup"
    if nfs-ls "nfs://127.0.0.1$EXP" >/dev/null 2>&1 && nfs-ls "nfs://127.0.0.1$PSEUDO?version=4" >/dev/null 2>&1; then
        ok=1; break
    fi
    sleep 0.5
done
[[ $ok == 1 ]] || die "ganesha did not answer within 60 s"

V3=nfs://127.0.0.1$EXP/img.raw
V4="nfs://127.0.0.1$PSEUDO/img.raw?version=4"
V3_2=nfs://127.0.0.1$EXP/img2.raw

# ---------------------------------------------------------------- blockwayd
start_blockwayd() {   # start_blockwayd URI -> sets BW_PORT
    BW_PORT=$(free_port)
    rm -f "$TMP/blockwayd.pid"
    bench_start "$TMP/blockwayd.log" "$BLOCKWAYD" --listen "127.0.0.1:$BW_PORT" --export "bench=$1" \
        --pid-file "$TMP/blockwayd.pid"
    BW_PID=$BG_PID
    wait_pid_file "$TMP/blockwayd.pid" "$BW_PID" 20
    wait_nbd "nbd://127.0.0.1:$BW_PORT/bench"
}

stop_blockwayd() {
    stop_pid "$BW_PID"
    BW_PID=
    [[ $STOP_RC == 0 ]] || die "blockwayd exited with status $STOP_RC after SIGTERM"
}

timed() {   # timed CMD... -> MB/s for BYTES
    local t0 t1
    t0=$(now)
    "$@" >/dev/null 2>"$TMP/cmd.err" || { cat "$TMP/cmd.err" >&2; die "failed: $*"; }
    t1=$(now)
    mbps "$BYTES" "$t0" "$t1"
}

fio_4k() {   # fio_4k URI randread|randwrite -> IOPS
    local v
    v=$(fio_nbd "$1" "$2" 4k)
    echo "${v% *}"
}

qbench() {   # qbench URI [-w] -> IOPS (4k requests, 16 in flight, sequential offsets)
    local uri=$1; shift
    local t0 t1
    t0=$(now)
    qemu-img bench -f raw -c "$BENCH_COUNT" -d 16 -s 4k "$@" "$uri" >/dev/null 2>"$TMP/cmd.err" \
        || { cat "$TMP/cmd.err" >&2; die "qemu-img bench $* $uri failed"; }
    t1=$(now)
    "$PY" -c "print('%.0f' % ($BENCH_COUNT / ($t1 - $t0)))"
}

# ---------------------------------------------------------------- machine info
bench_machine_info "$(dpkg-query -W -f='nfs-ganesha ${Version}' nfs-ganesha 2>/dev/null); $(dpkg-query -W -f='libnfs ${Version}' libnfs13 2>/dev/null); $(qemu-img --version | head -n1)" \
    "image: ${SIZE_MIB} MiB random data on $(df --output=fstype "$TMP" | tail -n1 | tr -d ' '), in page cache; reads land in /dev/shm" \
    "fio runtime ${RUNTIME} s, qemu-img bench ${BENCH_COUNT} requests, ${REPS} round(s), median reported"

# ---------------------------------------------------------------- run
for ((round = 1; round <= REPS; round++)); do
    # blockwayd over NFSv3 and NFSv4
    for v in 3 4; do
        uri=$V3; [[ $v == 4 ]] && uri=$V4
        name=blockwayd-v$v
        start_blockwayd "$uri"
        nbd="nbd://127.0.0.1:$BW_PORT/bench"
        record "$name" seqread "$round" "$(timed nbdcopy "$nbd" "$OUT")"; rm -f "$OUT"
        record "$name" seqwrite "$round" "$(timed nbdcopy "$SRC" "$nbd")"
        if [[ $round == 1 ]]; then
            cmp -s "$SRC" "$IMG" || die "$name: the server's file differs from what was written"
        fi
        record "$name" randread "$round" "$(fio_4k "$nbd" randread)"
        record "$name" randwrite "$round" "$(fio_4k "$nbd" randwrite)"
        record "$name" qread "$round" "$(qbench "$nbd")"
        record "$name" qwrite "$round" "$(qbench "$nbd" -w)"
        stop_blockwayd
    done
    # the direct clients (NFSv3: nfs-cp's NFSv4 writes fail with libnfs 4.0,
    # qemu's nfs driver speaks NFSv3 only)
    record nfs-cp seqread "$round" "$(timed nfs-cp "$V3" "$OUT")"; rm -f "$OUT"
    # nfs-cp only creates new files: a fresh name each round
    record nfs-cp seqwrite "$round" "$(timed nfs-cp "$SRC" "nfs://127.0.0.1$EXP/new-$round.raw")"
    rm -f "$EXP/new-$round.raw"
    record nfs-cp-v4 seqread "$round" "$(timed nfs-cp "$V4" "$OUT")"; rm -f "$OUT"
    record qemu-img seqread "$round" "$(timed qemu-img convert -f raw -O raw "$V3" "$OUT")"; rm -f "$OUT"
    record qemu-img seqwrite "$round" "$(timed qemu-img convert -n -f raw -O raw "$SRC" "$V3_2")"
    record qemu-img qread "$round" "$(qbench "$V3")"
    record qemu-img qwrite "$round" "$(qbench "$V3" -w)"
    sync
    echo "round $round/$REPS: $(awk -F'\t' -v r="$round" '$3==r {printf "%s/%s=%s ", $1, $2, $4}' "$RESULTS")" >&2
done

# ---------------------------------------------------------------- report
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
PYTHONPATH=$repo/bench "$PY" - "$RESULTS" "$LOAD_END" <<'EOF'
import statistics, sys
from lib import read_results
rows, data, med = read_results(sys.argv[1])
def cell(who, test):
    v = data.get((who, test))
    return "%.0f" % med[(who, test)] if v else "-"
cols = ["blockwayd-v3", "blockwayd-v4", "nfs-cp", "nfs-cp-v4", "qemu-img"]
tests = [("seqread", "seq read MB/s (nbdcopy / nfs-cp / qemu-img convert)"),
         ("seqwrite", "seq write MB/s (nbdcopy / nfs-cp / qemu-img convert -n)"),
         ("randread", "4k randread IOPS, QD16 (fio nbd)"),
         ("randwrite", "4k randwrite IOPS, QD16 (fio nbd)"),
         ("qread", "4k read IOPS, QD16 (qemu-img bench)"),
         ("qwrite", "4k write IOPS, QD16 (qemu-img bench -w)")]
print("## Results (median)")
print()
print("| test | " + " | ".join(cols) + " | v3: blockwayd / best direct | v4: blockwayd / nfs-cp |")
print("| --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: |")
for t, label in tests:
    direct = [med[(w, t)] for w in ("nfs-cp", "qemu-img") if (w, t) in med]
    r3 = "%.2f" % (med[("blockwayd-v3", t)] / max(direct)) if direct else "-"
    r4 = "%.2f" % (med[("blockwayd-v4", t)] / med[("nfs-cp-v4", t)]) if ("nfs-cp-v4", t) in med else "-"
    print(f"| {label} | " + " | ".join(cell(c, t) for c in cols) + f" | {r3} | {r4} |")
print()
# Rounds are interleaved, so the ratio within each round cancels much of the
# drift between rounds on a shared VM.
by_round = {(w, t, r): float(v) for w, t, r, v in rows}
rounds = sorted({r for _, _, r, _ in rows}, key=int)
print("Ratios within each round, blockwayd / best direct client of that round:")
print()
for t, label in tests:
    for ours, theirs in (("blockwayd-v3", ("nfs-cp", "qemu-img")), ("blockwayd-v4", ("nfs-cp-v4",))):
        rs = []
        for r in rounds:
            d = [by_round[(w, t, r)] for w in theirs if (w, t, r) in by_round]
            if (ours, t, r) in by_round and d:
                rs.append(by_round[(ours, t, r)] / max(d))
        if rs:
            print(f"- {label}, {ours[-2:]}: per round " + " ".join("%.2f" % x for x in rs)
                  + "; median %.2fx" % statistics.median(rs))
print()
print("All runs:", "; ".join(f"{w}/{t}: " + ", ".join("%.0f" % x for x in v) for (w, t), v in sorted(data.items())))
print()
print(f"Load average at end: {sys.argv[2]}")
EOF
