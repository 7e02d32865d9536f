#!/usr/bin/env bash
# CPU per GiB written through blockwayd's FUSE file, for two daemon binaries
# side by side in one run (an A/B of a change on the write path).
#
# Usage: bench/fuse_write_cpu.sh OLD_BLOCKWAYD NEW_BLOCKWAYD   (as root)
#
# Environment knobs:
#   BENCH_QUICK=1     smoke test: 2 s runs, 1 round, 256 MiB image
#   BENCH_RUNTIME=N   seconds per fio run (default 6)
#   BENCH_REPS=N      rounds, alternating old/new (default 2)
#   BENCH_SIZE_MIB=N  image size (default 512)
#   BENCH_TMPDIR=DIR  where the temp dir goes (default /var/tmp)
#   BENCH_MIN_BLOCK=N export an NBD remote instead of the file: nbdkit's file
#                     plugin with the blocksize-policy filter, N-byte minimum
#                     block (the read-modify-write front end's aligned path)
#
# Method: for each binary in turn, a fresh daemon exports one image file
# (in the page cache) under --fuse-mount with direct-io, and fio writes to
# the FUSE file with --direct=1: 1 MiB sequential writes (libaio, depth 4)
# and 4 KiB random writes (psync, one at a time). The daemon's CPU time
# (utime + stime of /proc/PID/stat) over the fio run, divided by the bytes
# fio wrote, is the figure: seconds of CPU per GiB. Throughput is printed
# too. Repeated BENCH_REPS times alternating the binaries; every figure is
# printed (no median: compare them yourself on a loaded machine).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 6 2 512
OLD=${1:?usage: $0 OLD_BLOCKWAYD NEW_BLOCKWAYD}
NEW=${2:?usage: $0 OLD_BLOCKWAYD NEW_BLOCKWAYD}

[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts)"
command -v fio >/dev/null || die "fio is missing"
[[ -x $OLD && -x $NEW ]] || die "both daemon binaries must exist"

bench_tmpdir bw-fuse-wcpu
work=$TMP
img=$work/image.raw
mnt=$work/mnt
mkdir -p "$mnt"
bw_pid=
unmount() {   # before the temp dir goes: nothing may stay mounted in it
    stop_pid "$bw_pid"
    grep -q " $mnt " /proc/self/mountinfo && umount -l "$mnt"
}
bench_cleanup_trap unmount

head -c $((SIZE_MIB << 20)) /dev/urandom > "$img"
ticks=$(getconf CLK_TCK)
uri=file://$img
if [[ -n ${BENCH_MIN_BLOCK:-} ]]; then
    port=$(free_port)
    bench_start "$work/nbdkit.log" nbdkit -f -p "$port" -i 127.0.0.1 --filter=blocksize-policy file "$img" \
        blocksize-minimum="$BENCH_MIN_BLOCK" blocksize-error-policy=error
    uri=nbd://127.0.0.1:$port
    wait_nbd "$uri"
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() { # binary label test-name fio-args...
    local bin=$1 label=$2 name=$3; shift 3
    rm -f "$work/bw.pid"
    bench_start "$work/bw.log" "$bin" --listen 127.0.0.1:0 --control-socket off --log-level warn \
        --export "bench=$uri" --fuse-mount "$mnt,direct-io=on" --pid-file "$work/bw.pid"
    bw_pid=$BG_PID
    wait_pid_file "$work/bw.pid" "$bw_pid"
    local before after
    before=$(cpu_ticks "$bw_pid")
    fio --name=w --filename="$mnt/bench" --direct=1 --time_based --runtime="$RUNTIME" \
        --size="${SIZE_MIB}M" --output-format=json "$@" > "$work/fio.json"
    after=$(cpu_ticks "$bw_pid")
    stop_pid "$bw_pid"
    [[ $STOP_RC == 0 ]] || die "blockwayd did not exit 0"
    bw_pid=
    $PY - "$work/fio.json" "$before" "$after" "$ticks" "$label" "$name" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
w = j["jobs"][0]["write"]
gib = w["io_bytes"] / 2**30
cpu = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
print("%-4s %-22s %8.1f MB/s %8.0f IOPS  cpu %6.2f s  %6.3f s/GiB" %
      (sys.argv[5], sys.argv[6], w["bw_bytes"] / 1e6, w["iops"], cpu, cpu / gib if gib else 0))
EOF
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); ${RUNTIME}s runs, ${SIZE_MIB} MiB image, $uri"
for rep in $(seq "$REPS"); do
    for pair in "old:$OLD" "new:$NEW"; do
        label=${pair%%:*} bin=${pair#*:}
        run_one "$bin" "$label" "seq-write-1M-qd4" --rw=write --bs=1M --ioengine=libaio --iodepth=4
        run_one "$bin" "$label" "rand-write-4k-psync" --rw=randwrite --bs=4k --ioengine=psync
    done
done
