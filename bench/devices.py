#!/usr/bin/python3
"""Kernel devices in a TCG guest (tests/integration/guest.py): the daemon's
socketpair device (blockway connect) vs the same daemon reached by
nbd-client over TCP on the guest's loopback, fio 4k random and 1M
sequential, direct I/O, rounds interleaved; then the I/O pause of a daemon
restart (SIGTERM and SIGKILL) under fio load: the longest completion latency
fio saw, and its error count.

TCG emulates the CPU: absolute figures are far below a real machine's; the
ratios within a round are the result.

    bench/devices.sh            # BENCH_RUNTIME (s per cell, default 5 here), BENCH_REPS (3)
"""

import json
import os
import re
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lib  # noqa: E402

import guest  # noqa: E402

TESTS = [("randread", "4k"), ("randwrite", "4k"), ("read", "1M"), ("write", "1M")]

SCRIPT = r"""
set -u
""" + guest.PRELUDE + r"""
dd if=/dev/urandom of=/tmp/a.img bs=1M count=256 2>/dev/null
cp /tmp/a.img /tmp/b.img
""" + guest.daemon_config(["127.0.0.1:10809"], """
[[export]]
name = "kern"
uri = "file:///tmp/a.img"
[[export]]
name = "tcp"
uri = "file:///tmp/b.img"
""") + r"""
start
bw connect kern /dev/nbd0 --connections 1 --timeout 1 > /dev/null
nbd-client 127.0.0.1 10809 /dev/nbd1 -N tcp -b 512 > /tmp/nbdc.log 2>&1 || { echo "@@NBDCLIENT failed"; cat /tmp/nbdc.log; }
run() {
  echo "@@FIO $1 $2 $3 $4"
  fio --name=b --filename=$5 --rw=$3 --bs=$4 --ioengine=libaio --iodepth=16 --direct=1 --time_based \
      --runtime=@RUNTIME@ --size=256M --output-format=json 2>&1
  echo "@@ENDFIO"
}
for r in $(seq 1 @REPS@); do
  for t in @TESTS@; do
    rw=${t%:*}; bs=${t#*:}
    if [ $((r % 2)) = 1 ]; then order="kern tcp"; else order="tcp kern"; fi
    for who in $order; do
      if [ $who = kern ]; then dev=/dev/nbd0; else dev=/dev/nbd1; fi
      run $who $r $rw $bs $dev
    done
  done
done
nbd-client -d /dev/nbd1 > /dev/null 2>&1
for sig in TERM KILL; do
  echo "@@FIO pause $sig randwrite 4k"
  fio --name=p --filename=/dev/nbd0 --rw=randwrite --bs=4k --ioengine=libaio --iodepth=4 --direct=1 \
      --time_based --runtime=20 --size=256M --output-format=json > /tmp/p.json 2>&1 &
  f=$!
  sleep 6
  kill -$sig $(cat /run/bw.daemon)
  wait_gone $(cat /run/bw.daemon)
  start
  wait $f
  cat /tmp/p.json
  echo "@@ENDFIO"
  echo "@@IOERRORS $sig $(dmesg | grep -ci 'I/O error')"
done
echo "@@LOAD $(cat /proc/loadavg)"
"""


def main():
    s = lib.settings(runtime=5, reps=3, size_mib=256)
    runtime = int(os.environ.get("BENCH_RUNTIME", "5"))
    reps = 1 if s["QUICK"] else int(os.environ.get("BENCH_REPS", "3"))
    blockwayd = s["BLOCKWAYD"]
    blockway = os.path.join(os.path.dirname(blockwayd), "blockway")
    nbd_client = shutil.which("nbd-client") or "/usr/sbin/nbd-client"
    if not os.path.exists(nbd_client):
        sys.exit("nbd-client is not installed (apt-get install nbd-client)")
    g = guest.Guest({"blockwayd": blockwayd, "blockway": blockway, "fio": shutil.which("fio"),
                     "nbd-client": nbd_client}, memory_mb=1536)
    script = (SCRIPT.replace("@RUNTIME@", str(runtime)).replace("@REPS@", str(reps))
              .replace("@TESTS@", " ".join("%s:%s" % t for t in TESTS)))
    host_load = open("/proc/loadavg").read().split()[:3]
    started = time.strftime("%Y-%m-%d %H:%M")
    _, text, seconds = g.run(script, timeout=3000, smp=2)
    figures = {}  # (who, test) -> [value per round]
    pauses = {}
    for m in re.finditer(r"^@@FIO (\S+) (\S+) (\S+) (\S+)\n(.*?)^@@ENDFIO", text, re.S | re.M):
        who, rnd, rw, bs, body = m.groups()
        try:
            job = json.loads(body[body.index("{"):])["jobs"][0]
        except (ValueError, KeyError):
            print("unparsed fio output for %s %s %s:\n%s" % (who, rnd, rw, body[-2000:]))
            continue
        side = job["read"] if "read" in rw else job["write"]
        if who == "pause":
            pauses[rnd] = (side["clat_ns"]["max"] / 1e9, job["error"], side["total_ios"])
        else:
            value = side["iops"] if bs == "4k" else side["bw_bytes"] / 1e6
            figures.setdefault((who, "%s %s" % (rw, bs)), []).append(value)
    errors = dict(re.findall(r"^@@IOERRORS (\S+) (\d+)", text, re.M))
    load = re.findall(r"^@@LOAD (.*)$", text, re.M)
    print("kernel devices in a TCG guest (2 vCPU), %s, host load %s, guest run %.0f s, %d round(s) of %d s"
          % (started, " ".join(host_load), seconds, reps, runtime))
    print("| test | socketpair (blockway connect) | nbd-client over TCP | ratio (median of per-round ratios) |")
    print("| --- | --- | --- | --- |")
    for rw, bs in TESTS:
        t = "%s %s" % (rw, bs)
        k, c = figures.get(("kern", t), []), figures.get(("tcp", t), [])
        if not k or not c:
            print("| %s | missing | missing | |" % t)
            continue
        unit = "IOPS" if bs == "4k" else "MB/s"
        ratios = [a / b for a, b in zip(k, c) if b]
        print("| %s | %.0f %s | %.0f %s | %.2fx (%s) |" % (t, statistics.median(k), unit, statistics.median(c), unit,
                                                          statistics.median(ratios),
                                                          " ".join("%.2f" % r for r in ratios)))
    for sig, (pause, err, ios) in sorted(pauses.items()):
        print("restart by SIG%s under fio 4k randwrite: longest I/O %.2f s, fio error %d, %d I/Os, "
              "kernel I/O errors %s" % (sig, pause, err, ios, errors.get(sig, "?")))
    if load:
        print("guest load at the end:", load[0])
    if not figures:
        print(text[-5000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
