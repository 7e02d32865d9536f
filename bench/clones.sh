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
#      the time from the jobs' start until all eight finish (one fio
#      process, eight jobs: see eight_traces), and the bytes the remote sent.
#      Targets: remote bytes of (a) <= 1.1x one trace's, time (a) <= 0.5x (b).
#   2. 4k random writes (fio, QD16, time based) into a fresh clone (64k and
#      4k granularity, base cache warm) versus a file:// export of a local
#      copy of the image. Target: >= 0.8x the file export.
#   3. 4k random reads (fio, QD16, time based) through a clone with the
#      base's cache warm versus the base export itself. Target: >= 0.9x.
#   4. `blockway flatten CLONE --wait` of a fresh clone (64k granularity),
#      unpaced: its wall time with the base's cache cold (every block from
#      the 1 ms remote) and warm.
#
# Usage: bench/clones.sh
# Environment knobs:
#   BENCH_QUICK=1      smoke test: one round, 2 s fio runs, 256 MiB image
#   BENCH_SIZE_MIB=N   image size (default 1024; 256 quick)
#   BENCH_REPS=N       rounds, figures are medians (default 3; 1 quick)
#   BENCH_RUNTIME=N    seconds per time-based fio run (default 6; 2 quick)
#   BENCH_TMPDIR=DIR   where the temp dir goes (default /var/tmp)
#   BLOCKWAYD=PATH     daemon binary (default <repo>/build/blockwayd)
#   BLOCKWAY=PATH      CLI binary, for the flatten (default: blockway beside BLOCKWAYD)
#   BENCH_PARTS=LIST   which parts run (default "traces qemu writes flatten")
#
# Every process is started here, stopped by pid, and the temp dir removed.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 6 3
DELAY=${BENCH_DELAY:-1ms}
CLONES=8

PARTS=" ${BENCH_PARTS:-traces qemu writes flatten} "
part() { [[ $PARTS == *" $1 "* ]]; }
for t in nbdkit qemu-nbd qemu-img fio nbdinfo nbdcopy jq; do command -v $t >/dev/null || die "$t missing"; done
[[ -x $BLOCKWAYD ]] || die "no daemon at $BLOCKWAYD (build it: ninja -C build blockwayd)"
BLOCKWAY=${BLOCKWAY:-$(dirname "$BLOCKWAYD")/blockway}
if part flatten; then [[ -x $BLOCKWAY ]] || die "no CLI at $BLOCKWAY (build it: ninja -C build blockway)"; fi

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

# blockwayd with the given --export specs (its control socket $work/NAME/ctl);
# sets BPID, BPORT.
start_bw() {
    local name=$1 args=() spec
    shift
    BPORT=$(free_port)
    rm -rf "${work:?}/$name"; mkdir -p "$work/$name"
    for spec in "$@"; do args+=(--export "$spec"); done
    bench_start "$work/$name/log" "$BLOCKWAYD" --log-level info --control-socket "$work/$name/ctl" \
        --listen "127.0.0.1:$BPORT" --data-dir "$work/$name/data" --pid-file "$work/$name/pid" "${args[@]}"
    BPID=$BG_PID
    wait_pid_file "$work/$name/pid" "$BPID"
}

# Eight fio random-read traces at once, one per URI: one fio process with
# eight jobs (each its own NBD connection), which fio starts together.
# Prints "IO WALL": seconds from the jobs' start until the last one ended
# (the longest job runtime: what the target is judged on), and the wall time
# of the fio process (its own start-up, about 0.3-0.5 s of clock calibration
# and job set-up here, included). Eight fio processes started at once spent
# 1.5-2.5 s of the wall time in their start-ups, the same in every variant,
# which the first version of this script counted.
eight_traces() {
    local t0 t1 uri i=0 jobs=()
    for uri in "$@"; do
        jobs+=(--name=trace$i --uri="$uri")
        i=$((i + 1))
    done
    t0=$(now)
    fio --ioengine=nbd --rw=randread --bs=16k --iodepth=4 --size="${trace_mib}M" --randseed=42 \
        "${jobs[@]}" --output-format=json --output="$work/trace.json" >/dev/null || die "the trace fio failed"
    t1=$(now)
    [[ $(jq '[.jobs[].error] | add' "$work/trace.json") == 0 ]] || die "a trace fio job reported an error"
    [[ $(jq '[.jobs[].read.io_bytes] | add' "$work/trace.json") == $((${#@} * (trace_mib << 20))) ]] ||
        die "the trace jobs did not read ${#@} x ${trace_mib} MiB"
    echo "$(jq '[.jobs[].job_runtime] | max / 1000' "$work/trace.json") $(echo "$t1 - $t0" | bc -l)"
}

# iops URI RW: fio_nbd's 4k IOPS (QD16, time based).
iops() { fio_nbd "$1" "$2" 4k | cut -d' ' -f1; }

# run_traces VAR URI...: eight_traces over the URIs; appends the time, the
# wall time and the remote's bytes to the arrays VAR_t, VAR_w and VAR_b.
run_traces() {
    local -n times=$1_t walls=$1_w remote=$1_b
    local io wall
    read -r io wall < <(eight_traces "${@:2}")
    [[ -n ${wall:-} ]] || die "the $1 traces failed"
    times+=("$io"); walls+=("$wall"); remote+=("$(remote_bytes)")
}

# flatten_time NAME CLONE: starts `blockway flatten CLONE` on the daemon of
# NAME and polls its status every 50 ms (`--wait` reports once a second, too
# coarse here) until it is done; prints the time it took.
flatten_time() {
    local t0 t1 state="" ctl=$work/$1/ctl
    t0=$(now)
    "$BLOCKWAY" --socket "$ctl" flatten "$2" >/dev/null || die "flatten $2 did not start"
    for _ in $(seq 36000); do
        state=$("$BLOCKWAY" --socket "$ctl" flatten "$2" --status --json | jq -r .state)
        [[ $state == running ]] || break
        sleep 0.05
    done
    t1=$(now)
    [[ $state == done ]] || die "flatten of $2 ended $state"
    echo "$t1 - $t0" | bc -l
    echo "flatten $2: $(echo "$t1 - $t0" | bc -l) s, daemon CPU $(awk '{print ($14 + $15) / 100}' "/proc/$BPID/stat") s so far, remote bytes $(remote_bytes) so far, load $(cut -d' ' -f1 /proc/loadavg)" >&2
}

shared_t=() shared_b=() indep_t=() indep_b=() qemu_t=() qemu_b=() shared_w=() indep_w=() qemu_w=()
w64=() w4=() wfile=() rclone=() rbase=() fcold=() fwarm=()
for round in $(seq "$REPS"); do
    echo "round $round/$REPS" >&2
    if part traces || part writes; then
        # 1a. eight clones, one shared base cache.
        start_remote shared
        specs=("golden=$REMOTE,cache=$work/shared-cache")
        uris=()
        for i in $(seq 0 $((CLONES - 1))); do
            specs+=("vm$i=clone:golden,overlay=$work/shared-ov"); uris+=("nbd://127.0.0.1:PORT/vm$i")
        done
        rm -rf "$work/shared-cache" "$work/shared-ov"
        start_bw shared "${specs[@]}"
        if part traces; then
            run_traces shared "${uris[@]/PORT/$BPORT}"
        fi
        if part writes; then
            # 2 and 3 on the same daemon, base cache warm (the whole image read once).
            nbdcopy "nbd://127.0.0.1:$BPORT/golden" null:
            rbase+=("$(iops "nbd://127.0.0.1:$BPORT/golden" randread)")
            rclone+=("$(iops "nbd://127.0.0.1:$BPORT/vm1" randread)")
            w64+=("$(iops "nbd://127.0.0.1:$BPORT/vm2" randwrite)")
        fi
        stop_pid "$BPID"
        stop_pid "$KPID"
    fi

    if part traces; then
        # 1b. eight independent cached exports of the same remote.
        start_remote indep
        specs=() uris=()
        for i in $(seq 0 $((CLONES - 1))); do
            specs+=("e$i=$REMOTE,cache=$work/indep-cache$i"); uris+=("nbd://127.0.0.1:PORT/e$i")
            rm -rf "$work/indep-cache$i"
        done
        start_bw indep "${specs[@]}"
        run_traces indep "${uris[@]/PORT/$BPORT}"
        stop_pid "$BPID"
        stop_pid "$KPID"
    fi

    if part qemu; then
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
        run_traces qemu "${uris[@]}"
        for p in "${qpids[@]}"; do stop_pid "$p"; done
        stop_pid "$KPID"
    fi

    if part writes; then
        # 2. 4k-granularity clone writes, and the local file export.
        cp "$img" "$work/local.img"
        start_remote w4
        start_bw w4 "golden=$REMOTE,cache=$work/w4-cache" "vm=clone:golden,overlay=$work/w4-ov,granularity=4k" \
            "local=file://$work/local.img"
        nbdcopy "nbd://127.0.0.1:$BPORT/golden" null:
        w4+=("$(iops "nbd://127.0.0.1:$BPORT/vm" randwrite)")
        wfile+=("$(iops "nbd://127.0.0.1:$BPORT/local" randwrite)")
        stop_pid "$BPID"
        stop_pid "$KPID"
    fi

    if part flatten; then
        # 4. flatten a fresh clone: the base's cache cold (each block from the
        # 1 ms remote), then warm (a fresh clone of the now full cache).
        start_remote flatten
        rm -rf "$work/f-cache" "$work/f-ov"
        start_bw flatten "golden=$REMOTE,cache=$work/f-cache" "vm=clone:golden,overlay=$work/f-ov"
        fcold+=("$(flatten_time flatten vm)")
        nbdcopy "nbd://127.0.0.1:$BPORT/golden" null:
        "$BLOCKWAY" --socket "$work/flatten/ctl" clone golden vw --overlay "$work/f-ov" >/dev/null
        fwarm+=("$(flatten_time flatten vw)")
        stop_pid "$BPID"
        stop_pid "$KPID"
    fi
    rm -rf "$work/local.img" "$work/w4-cache" "$work/shared-cache" "$work"/indep-cache* "$work/shared-ov" \
        "$work"/ov*.qcow2 "$work/f-cache" "$work"/f-ov*
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
if part traces; then
    st=$(median "${shared_t[@]}"); it=$(median "${indep_t[@]}")
    sb=$(median "${shared_b[@]}"); ib=$(median "${indep_b[@]}")
    echo "| 8 clones, same trace: time (s) | $st | ${shared_t[*]} | <= 0.5x independent: $(ratio "$st" "$it")x |"
    echo "| 8 independent cached exports: time (s) | $it | ${indep_t[*]} | |"
    sw=$(median "${shared_w[@]}"); iw=$(median "${indep_w[@]}")
    echo "| 8 clones: wall time of the fio process, its start-up included (s) | $sw | ${shared_w[*]} | ($(ratio "$sw" "$iw")x) |"
    echo "| 8 independent: wall time of the fio process (s) | $iw | ${indep_w[*]} | |"
fi
if part qemu; then
    qt=$(median "${qemu_t[@]}"); qb=$(median "${qemu_b[@]}")
    echo "| 8 qcow2 overlays over nbd:// (qemu-nbd): time (s) | $qt | ${qemu_t[*]} | (qemu side by side) |"
fi
if part traces; then
    echo "| 8 clones: remote bytes / one trace | $(ratio "$sb" "$trace_bytes") | ${shared_b[*]} | <= 1.1 |"
    echo "| 8 independent: remote bytes / one trace | $(ratio "$ib" "$trace_bytes") | ${indep_b[*]} | |"
fi
if part qemu; then
    echo "| 8 qcow2 overlays: remote bytes / one trace | $(ratio "$qb" "$trace_bytes") | ${qemu_b[*]} | |"
fi
if part writes; then
    f=$(median "${wfile[@]}")
    echo "| 4k randwrite IOPS, clone granularity 64k | $(median "${w64[@]}") | ${w64[*]} | >= 0.8x file: $(ratio "$(median "${w64[@]}")" "$f")x |"
    echo "| 4k randwrite IOPS, clone granularity 4k | $(median "${w4[@]}") | ${w4[*]} | >= 0.8x file: $(ratio "$(median "${w4[@]}")" "$f")x |"
    echo "| 4k randwrite IOPS, file:// export | $f | ${wfile[*]} | |"
    b=$(median "${rbase[@]}")
    echo "| 4k randread IOPS through a clone, warm base cache | $(median "${rclone[@]}") | ${rclone[*]} | >= 0.9x base: $(ratio "$(median "${rclone[@]}")" "$b")x |"
    echo "| 4k randread IOPS, the base export | $b | ${rbase[*]} | |"
fi
if part flatten; then
    echo "| flatten of a ${SIZE_MIB} MiB clone (64k), base cache cold, 1 ms remote: time (s) | $(median "${fcold[@]}") | ${fcold[*]} | |"
    echo "| flatten of a ${SIZE_MIB} MiB clone (64k), base cache warm: time (s) | $(median "${fwarm[@]}") | ${fwarm[*]} | |"
fi
