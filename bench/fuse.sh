#!/usr/bin/env bash
# Benchmark blockway's FUSE front end (issue 6, "Targets"): fio on the file
# blockwayd shows under --fuse-mount, side by side in one run with nbdfuse
# (libnbd-bin) mounting the same image served by nbdkit's file plugin.
#
# Usage: bench/fuse.sh            (as root: it mounts FUSE filesystems)
#
# Environment knobs:
#   BENCH_QUICK=1       smoke test: 2 s runs, 256 MiB image
#   BENCH_RUNTIME=N     seconds per fio run (default 8; 2 in quick mode)
#   BENCH_REPS=N        rounds; each figure is the median (default 2; 1 quick)
#   BENCH_SIZE_MIB=N    image size in MiB (default 1024; 256 in quick mode)
#   BENCH_TMPDIR=DIR    where the temp dir goes (default /var/tmp)
#   BLOCKWAYD=PATH      daemon binary (default <repo>/build/blockwayd)
#   BW_FUSE_OPTS=...    extra --fuse-mount options for blockwayd (e.g. direct-io)
#
# Method: one image of random data (in the page cache of the host), served at
# the same time by
#   blockway   blockwayd --export bench=file://IMG --fuse-mount MNT1 (defaults)
#   nbdfuse    nbdkit -f -p P file IMG  +  nbdfuse MNT2/bench nbd://127.0.0.1:P
#              (nbdfuse defaults: 4 connections with multi-conn, its own threads)
# and fio runs on MNT1/bench and MNT2/bench in turn, each test on both before
# the next test, every run with --direct=1 so that the kernel's page cache of
# the FUSE file does not answer in place of the daemon:
#   seq read / seq write       --bs=1M
#   4k rand read / rand write  --bs=4k
# each with --ioengine=psync (one request at a time) and --ioengine=libaio
# --iodepth=16 (many in flight). Writes land in the image's page cache on
# both sides (no fsync). Ratios are blockway / nbdfuse.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 8 2

[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts, fusermount3)"
for t in fio nbdkit nbdfuse fusermount3; do command -v $t >/dev/null || die "$t is missing"; done
[[ -x $BLOCKWAYD ]] || die "no daemon at $BLOCKWAYD (build it first)"

bench_tmpdir bw-fuse-bench
work=$TMP
img=$work/image.raw
mnt_bw=$work/mnt-blockway
mnt_nf=$work/mnt-nbdfuse
mkdir -p "$mnt_bw" "$mnt_nf"
bw_pid= nbdkit_pid= nbdfuse_pid=

unmount_all() {   # before the temp dir goes: nothing may stay mounted in it
    if [[ -n $nbdfuse_pid ]]; then
        fusermount3 -u "$mnt_nf" 2>/dev/null
        stop_pid "$nbdfuse_pid"
    fi
    stop_pid "$nbdkit_pid"
    stop_pid "$bw_pid"
    for m in "$mnt_nf" "$mnt_bw"; do
        grep -q " $m " /proc/self/mountinfo && umount -l "$m"
    done
}
bench_cleanup_trap unmount_all

wait_for() { # path, what
    for _ in $(seq 200); do [[ -e $1 ]] && return 0; sleep 0.05; done
    die "$2 did not come up"
}

echo "fuse.sh: ${SIZE_MIB} MiB image of random data, ${RUNTIME}s per run, ${REPS} round(s)" >&2
head -c $((SIZE_MIB << 20)) /dev/urandom > "$img"

bw_opts=${BW_FUSE_OPTS:+,$BW_FUSE_OPTS}
bench_start "$work/bw.log" "$BLOCKWAYD" --listen 127.0.0.1:0 --log-level warn --export "bench=file://$img" \
    --fuse-mount "$mnt_bw$bw_opts" --pid-file "$work/bw.pid"
bw_pid=$BG_PID
wait_pid_file "$work/bw.pid" "$bw_pid"

port=$(free_port)
bench_start "$work/nbdkit.log" nbdkit -f -p "$port" -i 127.0.0.1 --pidfile "$work/nbdkit.pid" file "$img"
nbdkit_pid=$BG_PID
wait_for "$work/nbdkit.pid" nbdkit
bench_start "$work/nbdfuse.log" nbdfuse -P "$work/nbdfuse.pid" "$mnt_nf/bench" "nbd://127.0.0.1:$port"
nbdfuse_pid=$BG_PID
wait_for "$work/nbdfuse.pid" nbdfuse

files=("$mnt_bw/bench" "$mnt_nf/bench")
names=(blockway nbdfuse)

# fio JSON -> "MB/s IOPS" of the direction that moved bytes.
parse() {
    $PY -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print("%.1f %.0f" % (d["bw_bytes"] / 1e6, d["iops"]))' "$1"
}

tests=(
  "seq-read psync   --rw=read --bs=1M --ioengine=psync"
  "seq-write psync  --rw=write --bs=1M --ioengine=psync"
  "rand-read psync  --rw=randread --bs=4k --ioengine=psync"
  "rand-write psync --rw=randwrite --bs=4k --ioengine=psync"
  "seq-read libaio   --rw=read --bs=1M --ioengine=libaio --iodepth=16"
  "seq-write libaio  --rw=write --bs=1M --ioengine=libaio --iodepth=16"
  "rand-read libaio  --rw=randread --bs=4k --ioengine=libaio --iodepth=16"
  "rand-write libaio --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16"
)

results=$work/results.txt
: > "$results"
for ((rep = 0; rep < REPS; rep++)); do
    for t in "${tests[@]}"; do
        read -r tname engine args <<< "$t"
        for i in 0 1; do
            out=$work/fio.json
            # shellcheck disable=SC2086
            fio --name=b --filename="${files[$i]}" --direct=1 --time_based --runtime="$RUNTIME" \
                --size="${SIZE_MIB}M" --output-format=json --output="$out" $args > /dev/null
            read -r mbs iops < <(parse "$out")
            echo "$tname $engine ${names[$i]} $mbs $iops" >> "$results"
            echo "  round $rep: $tname $engine ${names[$i]}: $mbs MB/s, $iops IOPS" >&2
        done
    done
done

$PY - "$results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    t, e, who, mbs, iops = line.split()
    rows.setdefault((t, e), {}).setdefault(who, []).append((float(mbs), float(iops)))
print("| test | engine | blockway MB/s | blockway IOPS | nbdfuse MB/s | nbdfuse IOPS | ratio | target |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for (t, e), d in rows.items():
    bw = statistics.median(x[0] for x in d["blockway"]); bi = statistics.median(x[1] for x in d["blockway"])
    nw = statistics.median(x[0] for x in d["nbdfuse"]); ni = statistics.median(x[1] for x in d["nbdfuse"])
    target = 1.5 if t.startswith("seq") else 1.2
    ratio = bw / nw if nw else float("inf")
    print("| %s | %s | %.0f | %.0f | %.0f | %.0f | %.2fx | %s %.1fx |" % (
        t, e, bw, bi, nw, ni, ratio, "met" if ratio >= target else "MISSED", target))
EOF
stop_pid "$bw_pid"
[[ $STOP_RC == 0 ]] || die "blockwayd exited with $STOP_RC after SIGTERM"
bw_pid=
