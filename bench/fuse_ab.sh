#!/bin/bash
# A/B of two blockwayd builds on the FUSE file's small-request fast path:
# 4k random reads (psync, O_DIRECT, QD1: per-request overhead) and 4k random writes
# (libaio, O_DIRECT, QD16), on a file export in /dev/shm (no disk in the
# way). The two builds alternate ROUNDS times; each figure is one 10 s fio run.
#
#   bench/fuse_ab.sh OLD_BLOCKWAYD NEW_BLOCKWAYD [ROUNDS]
set -euo pipefail
old=$1 new=$2 rounds=${3:-2}
work=$(mktemp -d /dev/shm/bw-fuse-ab-XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  mountpoint -q "$work/mnt" && umount -l "$work/mnt" || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt"
dd if=/dev/urandom of="$work/img" bs=1M count=256 status=none
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
run() {  # BIN NAME
  "$1" --control-socket off --listen 127.0.0.1:$port --export d=file://$work/img \
       --fuse-mount "$work/mnt" >"$work/daemon.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do [ -e "$work/mnt/d" ] && break; sleep 0.05; done
  local r w
  r=$(fio --name=r --filename="$work/mnt/d" --ioengine=psync --direct=1 --rw=randread --bs=4k --size=256M \
          --time_based --runtime=10 --output-format=json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
  w=$(fio --name=w --filename="$work/mnt/d" --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite \
          --bs=4k --size=256M --time_based --runtime=10 --output-format=json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
  printf '%-4s randread-4k-qd1 %8s IOPS   randwrite-4k-qd16 %8s IOPS\n' "$2" "$r" "$w"
  kill "$pid"; wait "$pid" || true; pid=
  for _ in $(seq 100); do mountpoint -q "$work/mnt" || break; sleep 0.05; done
}
for i in $(seq "$rounds"); do
  run "$old" old
  run "$new" new
done
