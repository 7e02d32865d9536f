#!/bin/bash
# A/B of two blockwayd builds on the FUSE file's small-request fast path:
# 4k random reads (psync, O_DIRECT, QD1: per-request overhead) and 4k random writes
# (libaio, O_DIRECT, QD16), on a file export in /dev/shm (no disk in the
# way). The two builds alternate ROUNDS times; each figure is one fio run.
#
#   bench/fuse_ab.sh OLD_BLOCKWAYD NEW_BLOCKWAYD [ROUNDS]     (as root)
#
# Environment knobs: BENCH_QUICK=1 (2 s runs, 1 round), BENCH_RUNTIME (s per
# fio run, default 10), BENCH_REPS (rounds when ROUNDS is not given, default
# 2), BENCH_SIZE_MIB (image, default 256), BENCH_TMPDIR (default /dev/shm).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 2 256
old=${1:?usage: $0 OLD_BLOCKWAYD NEW_BLOCKWAYD [ROUNDS]}
new=${2:?usage: $0 OLD_BLOCKWAYD NEW_BLOCKWAYD [ROUNDS]}
rounds=${3:-$REPS}
TMPBASE=${BENCH_TMPDIR:-/dev/shm}
bench_tmpdir bw-fuse-ab
work=$TMP
pid=
unmount() {
  stop_pid "$pid"
  if mountpoint -q "$work/mnt"; then umount -l "$work/mnt" || true; fi
}
bench_cleanup_trap unmount
mkdir "$work/mnt"
dd if=/dev/urandom of="$work/img" bs=1M count="$SIZE_MIB" status=none
port=$(free_port)
run() {  # BIN NAME
  bench_start "$work/daemon.log" "$1" --control-socket off --listen "127.0.0.1:$port" \
       --export "d=file://$work/img" --fuse-mount "$work/mnt"
  pid=$BG_PID
  for _ in $(seq 100); do [ -e "$work/mnt/d" ] && break; sleep 0.05; done
  local r w
  r=$(fio --name=r --filename="$work/mnt/d" --ioengine=psync --direct=1 --rw=randread --bs=4k \
          --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --output-format=json |
      "$PY" -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
  w=$(fio --name=w --filename="$work/mnt/d" --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite \
          --bs=4k --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --output-format=json |
      "$PY" -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
  printf '%-4s randread-4k-qd1 %8s IOPS   randwrite-4k-qd16 %8s IOPS\n' "$2" "$r" "$w"
  stop_pid "$pid"; pid=
  for _ in $(seq 100); do mountpoint -q "$work/mnt" || break; sleep 0.05; done
}
for i in $(seq "$rounds"); do
  run "$old" old
  run "$new" new
done
