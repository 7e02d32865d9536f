#!/usr/bin/env bash
# Benchmark clones of a golden image (issue 18, "Targets"), side by side in
# one run, against nbdkit's file plugin over loopback behind
# `--filter=delay rdelay=1ms` (and its log filter, which counts the bytes
# the remote was asked for):
#
#   1. eight clients doing the same read trace at once (fio, nbd engine,
#      16k random reads over the first quarter of the image, same seed, each
#      block once) through
#        a. eight clones of one cached base export (one shared cache),
#        b. eight independent cached exports of the same remote,
#        c. eight qcow2 overlays over one nbd:// base (qemu-img create -b),
#           each served by its own qemu-nbd;
#      wall time until all eight finish, and the bytes the remote sent.
#      Targets: remote bytes of (a) <= 1.1x one trace's, time (a) <= 0.5x (b).
#   2. 4k random writes (fio, QD16, time based) into a fresh clone (64k and
#      4k granularity, base cache warm) versus a file:// export of a local
#      copy of the image. Target: >= 0.8x the file export.
#   3. 4k random reads (fio, QD16, time based) through a clone with the
#      base's cache warm versus the base export itself. Target: >= 0.9x.
#
# Usage: bench/clones.sh
# Environment knobs:
#   BENCH_QUICK=1      smoke test: one round, 2 s fio runs, 256 MiB image
#   BENCH_SIZE_MIB=N   image size (default 1024; 256 quick)
#   BENCH_REPS=N       rounds, figures are medians (default 3; 1 quick)
#   BENCH_RUNTIME=N    seconds per time-based fio run (default 6; 2 quick)
#   BENCH_TMPDIR=DIR   where the temp dir goes (default /var/tmp)
#   BLOCKWAYD=PATH     daemon binary (default <repo>/build/blockwayd)
#
# Every process is started here, stopped by pid, and the temp dir removed.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 6 3
DELAY=${BENCH_DELAY:-1ms}
CLONES=8

for t in nbdkit qemu-nbd qemu-img fio nbdinfo nbdcopy jq; do command -v $t >/dev/null || die "$t missing"; done
[[ -x $BLOCKWAYD ]] || die "no daemon at $BLOCKWAYD (build it: ninja -C build blockwayd)"

bench_tmpdir bw-clones-bench
work=$TMP
bench_cleanup_trap
bench_private_daemon

img=$work/golden.img
echo "creating a ${SIZE_MIB} MiB random image..." >&2
head -c $((SIZE_MIB << 20)) /dev/urandom > "$img"
cat "$img" > /dev/null
trace_mib=$((SIZE_MIB / 4))

# nbdkit over the image with a read delay and a request log; sets KPID, REMOTE, KLOG.
start_remote() {
    local port
    port=$(free_port)
    KLOG=$work/nbdkit-$1.log
    rm -f "$KLOG"
    bench_start "$work/nbdkit.out" nbdkit -f -p "$port" -i 127.0.0.1 --filter=delay --filter=log \
        file "$img" rdelay="$DELAY" logfile="$KLOG"
    KPID=$BG_PID
    REMOTE="nbd://127.0.0.1:$port/"
    wait_nbd "$REMOTE"
}
remote_bytes() { grep -o ' Read id=[0-9]* offset=[^ ]* count=[^ ]*' "$KLOG" | sed 's/.*count=//' |
                 "$PY" -c 'import sys; print(sum(int(x, 0) for x in sys.stdin))'; }

# blockwayd with the given --export specs; sets BPID, BPORT.
start_bw() {
    local name=$1 args=() spec
    shift
    BPORT=$(free_port)
    rm -rf "${work:?}/$name"; mkdir -p "$work/$name"
    for spec in "$@"; do args+=(--export "$spec"); done
    bench_start "$work/$name/log" "$BLOCKWAYD" --log-level info --control-socket off \
        --listen "127.0.0.1:$BPORT" --data-dir "$work/$name/data" --pid-file "$work/$name/pid" "${args[@]}"
    BPID=$BG_PID
    wait_pid_file "$work/$name/pid" "$BPID"
}

# Eight fio random-read traces at once, one per URI; prints the wall time.
eight_traces() {
    local t0 t1 pids=() uri i=0
    t0=$(now)
    for uri in "$@"; do
        fio --name=trace$i --ioengine=nbd --uri="$uri" --rw=randread --bs=16k --iodepth=4 \
            --size="${trace_mib}M" --randseed=42 --output-format=json --output="$work/trace$i.json" >/dev/null &
        pids+=($!)
        i=$((i + 1))
    done
    for p in "${pids[@]}"; do wait "$p" || die "a trace fio failed"; done
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

shared_t=() shared_b=() indep_t=() indep_b=() qemu_t=() qemu_b=()
w64=() w4=() wfile=() rclone=() rbase=()
for round in $(seq "$REPS"); do
    echo "round $round/$REPS" >&2
    # 1a. eight clones, one shared base cache.
    start_remote shared
    specs=("golden=$REMOTE,cache=$work/shared-cache")
    uris=()
    for i in $(seq 0 $((CLONES - 1))); do
        specs+=("vm$i=clone:golden,overlay=$work/shared-ov"); uris+=("nbd://127.0.0.1:PORT/vm$i")
    done
    rm -rf "$work/shared-cache" "$work/shared-ov"
    start_bw shared "${specs[@]}"
    shared_t+=("$(eight_traces "${uris[@]/PORT/$BPORT}")")
    shared_b+=("$(remote_bytes)")
    # 2 and 3 on the same daemon, base cache warm (the whole image read once).
    nbdcopy "nbd://127.0.0.1:$BPORT/golden" null:
    rbase+=("$(fio_nbd "nbd://127.0.0.1:$BPORT/golden" randread 4k | cut -d' ' -f1)")
    rclone+=("$(fio_nbd "nbd://127.0.0.1:$BPORT/vm1" randread 4k | cut -d' ' -f1)")
    w64+=("$(fio_nbd "nbd://127.0.0.1:$BPORT/vm2" randwrite 4k | cut -d' ' -f1)")
    stop_pid "$BPID"
    stop_pid "$KPID"

    # 1b. eight independent cached exports of the same remote.
    start_remote indep
    specs=() uris=()
    for i in $(seq 0 $((CLONES - 1))); do
        specs+=("e$i=$REMOTE,cache=$work/indep-cache$i"); uris+=("nbd://127.0.0.1:PORT/e$i")
        rm -rf "$work/indep-cache$i"
    done
    start_bw indep "${specs[@]}"
    indep_t+=("$(eight_traces "${uris[@]/PORT/$BPORT}")")
    indep_b+=("$(remote_bytes)")
    stop_pid "$BPID"
    stop_pid "$KPID"

    # 1c. qemu: eight qcow2 overlays over the nbd:// base, each behind qemu-nbd.
    start_remote qemu
    qpids=() uris=()
    for i in $(seq 0 $((CLONES - 1))); do
        rm -f "$work/ov$i.qcow2"
        qemu-img create -q -f qcow2 -b "$REMOTE" -F raw "$work/ov$i.qcow2"
        bench_start "$work/qemu-nbd$i.log" qemu-nbd --persistent -f qcow2 -k "$work/q$i.sock" "$work/ov$i.qcow2"
        qpids+=("$BG_PID"); uris+=("nbd+unix:///?socket=$work/q$i.sock")
    done
    for u in "${uris[@]}"; do wait_nbd "$u"; done
    qemu_t+=("$(eight_traces "${uris[@]}")")
    qemu_b+=("$(remote_bytes)")
    for p in "${qpids[@]}"; do stop_pid "$p"; done
    stop_pid "$KPID"

    # 2. 4k-granularity clone writes, and the local file export.
    cp "$img" "$work/local.img"
    start_remote w4
    start_bw w4 "golden=$REMOTE,cache=$work/w4-cache" "vm=clone:golden,overlay=$work/w4-ov,granularity=4k" \
        "local=file://$work/local.img"
    nbdcopy "nbd://127.0.0.1:$BPORT/golden" null:
    w4+=("$(fio_nbd "nbd://127.0.0.1:$BPORT/vm" randwrite 4k | cut -d' ' -f1)")
    wfile+=("$(fio_nbd "nbd://127.0.0.1:$BPORT/local" randwrite 4k | cut -d' ' -f1)")
    stop_pid "$BPID"
    stop_pid "$KPID"
    rm -rf "$work/local.img" "$work/w4-cache" "$work/shared-cache" "$work"/indep-cache* "$work/shared-ov" "$work"/ov*.qcow2
done

trace_bytes=$((trace_mib << 20))
ratio() { "$PY" -c "print('%.2f' % ($1 / $2))"; }
bench_machine_info "image ${SIZE_MIB} MiB random; remote nbdkit file plugin, delay rdelay=$DELAY, log filter" \
    "trace: fio randread bs=16k iodepth=4 over ${trace_mib} MiB, randseed=42 (every block once), $CLONES at once" \
    "rounds: $REPS, medians; time-based fio runs ${RUNTIME} s at QD16"
echo "## Results"
echo
echo "| what | median | rounds | target |"
echo "| --- | --- | --- | --- |"
st=$(median "${shared_t[@]}"); it=$(median "${indep_t[@]}"); qt=$(median "${qemu_t[@]}")
sb=$(median "${shared_b[@]}"); ib=$(median "${indep_b[@]}"); qb=$(median "${qemu_b[@]}")
echo "| 8 clones, same trace: wall time (s) | $st | ${shared_t[*]} | <= 0.5x independent: $(ratio "$st" "$it")x |"
echo "| 8 independent cached exports: wall time (s) | $it | ${indep_t[*]} | |"
echo "| 8 qcow2 overlays over nbd:// (qemu-nbd): wall time (s) | $qt | ${qemu_t[*]} | (qemu side by side) |"
echo "| 8 clones: remote bytes / one trace | $(ratio "$sb" "$trace_bytes") | ${shared_b[*]} | <= 1.1 |"
echo "| 8 independent: remote bytes / one trace | $(ratio "$ib" "$trace_bytes") | ${indep_b[*]} | |"
echo "| 8 qcow2 overlays: remote bytes / one trace | $(ratio "$qb" "$trace_bytes") | ${qemu_b[*]} | |"
f=$(median "${wfile[@]}")
echo "| 4k randwrite IOPS, clone granularity 64k | $(median "${w64[@]}") | ${w64[*]} | >= 0.8x file: $(ratio "$(median "${w64[@]}")" "$f")x |"
echo "| 4k randwrite IOPS, clone granularity 4k | $(median "${w4[@]}") | ${w4[*]} | >= 0.8x file: $(ratio "$(median "${w4[@]}")" "$f")x |"
echo "| 4k randwrite IOPS, file:// export | $f | ${wfile[*]} | |"
b=$(median "${rbase[@]}")
echo "| 4k randread IOPS through a clone, warm base cache | $(median "${rclone[@]}") | ${rclone[*]} | >= 0.9x base: $(ratio "$(median "${rclone[@]}")" "$b")x |"
echo "| 4k randread IOPS, the base export | $b | ${rbase[*]} | |"
