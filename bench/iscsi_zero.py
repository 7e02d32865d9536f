#!/usr/bin/python3
"""Write-zeroes over a non-thin iSCSI LUN (issue 17): what crosses the wire
and how long it takes, for `blkdiscard -z` and `mkfs.ext4` through
blockway's FUSE file, main's daemon against this tree's, in the same run.

Usage: bench/iscsi_zero.py   (as root; BLOCKWAYD_BASE=PATH for the A side)

Why this shape: one process, every peer stopped by pid and every loop
device and FUSE mount undone at exit (seedlib.Bench, atexit); waits bounded.

Per round and variant (rounds alternate the variants' order): a fresh sparse
LUN file of ZERO_MIB (default 1024) behind one tgtd (rdwr backing store,
not thin: the LUN has no UNMAP, tgt's default), blockwayd with an uncached
export of it and --fuse-mount, a loop device over the FUSE file with
direct I/O (every request reaches the daemon), then
  blkdiscard -z LOOP   BLKZEROOUT -> FALLOC_FL_ZERO_RANGE -> write-zeroes
  mkfs.ext4 LOOP       its discard of the device -> PUNCH_HOLE -> write-zeroes
each timed, with the bytes tgtd read from its sockets and files (rchar of
/proc/PID/io: the zeroes that crossed the wire show there) and the CPU
seconds of blockwayd and tgtd. Variants:
  base       BLOCKWAYD_BASE (main's build): zeroes sent as WRITE(16)s
  new        BLOCKWAYD (this tree): WRITE SAME(16) without UNMAP
  new-off    BLOCKWAYD with write-same=off: zeroes sent, as base
Knobs: BENCH_REPS (3), ZERO_MIB, BENCH_QUICK (1 round, 256 MiB), ZERO_FILL=1
(the LUN file full of random data instead of sparse: tgt then overwrites
allocated blocks). Writes bench/results/iscsi-zero[-fill].md.
"""

import atexit
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds"))
import seedlib  # noqa: E402
from seedlib import die  # noqa: E402

import lib  # noqa: E402
import remotes  # noqa: E402

b = seedlib.Bench("iscsi-zero", 0, 3, 1024)
MIB = int(os.environ.get("ZERO_MIB", 256 if b.quick else 1024))
BASE = os.environ.get("BLOCKWAYD_BASE", "/work/main/build/blockwayd")
if not os.access(BASE, os.X_OK):
    die(f"no base daemon at {BASE} (BLOCKWAYD_BASE)")
base_copy = os.path.join(b.tmp, "blockwayd-base")
subprocess.run(["cp", BASE, base_copy], check=True)
FILL = None
if os.environ.get("ZERO_FILL") == "1":
    FILL = os.path.join(b.tmp, "fill.raw")
    subprocess.run(["dd", "if=/dev/urandom", f"of={FILL}", "bs=1M", f"count={MIB}", "status=none"], check=True)
VARIANTS = {"base": (base_copy, ""), "new": (b.blockwayd, ""), "new-off": (b.blockwayd, ",write-same=off")}
UNDO = []


def undo_all():
    while UNDO:
        kind, what = UNDO.pop()
        if kind == "loop":
            subprocess.run(["losetup", "-d", what], stderr=subprocess.DEVNULL)
        else:
            subprocess.run(["fusermount3", "-u", "-z", what], stderr=subprocess.DEVNULL)


atexit.register(undo_all)


def rchar(pid):
    for line in open(f"/proc/{pid}/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def one(variant, rnd):
    daemon, opts = VARIANTS[variant]
    d = os.path.join(b.tmp, f"{variant}-{rnd}")
    os.makedirs(d)
    img = os.path.join(d, "lun.raw")
    if FILL:  # a LUN whose blocks hold data: tgt overwrites them in place
        subprocess.run(["cp", FILL, img], check=True)
    else:
        with open(img, "wb") as f:
            f.truncate(MIB << 20)
    tgt = remotes.Tgt(d)
    tgt.luns.append((1, img, False))
    tgt.start()
    mnt = os.path.join(d, "mnt")
    os.makedirs(mnt)
    bw = b.start("blockwayd", [daemon, "--listen", f"unix:{d}/nbd.sock", "--control-socket", "off",
                               "--data-dir", f"{d}/data", "--fuse-mount", mnt,
                               "--export", f"d={tgt.uri()}{opts}"])
    UNDO.append(("fuse", mnt))
    path = os.path.join(mnt, "d")
    end = time.time() + 60
    while not os.path.exists(path):
        if bw.poll() is not None or time.time() > end:
            die(f"{variant}: no FUSE file: {b.tail(bw)}")
        time.sleep(0.05)
    loop = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", path], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    UNDO.append(("loop", loop))
    for test, cmd in (("blkdiscard-z", ["blkdiscard", "-z", loop]), ("mkfs", ["mkfs.ext4", "-q", "-F", loop])):
        r0, c0, t0 = rchar(tgt.pid), lib.cpu(bw.pid) + lib.cpu(tgt.pid), time.time()
        cb0 = lib.cpu(bw.pid)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        b.record(variant, f"{test}_s", rnd, wall)
        b.record(variant, f"{test}_tgtd_read_mib", rnd, (rchar(tgt.pid) - r0) / 2**20)
        b.record(variant, f"{test}_blockwayd_cpu_s", rnd, lib.cpu(bw.pid) - cb0)
        b.record(variant, f"{test}_cpu_s", rnd, lib.cpu(bw.pid) + lib.cpu(tgt.pid) - c0)
        print(f"round {rnd} {variant:8} {test:13} {wall:6.2f} s, tgtd read {(rchar(tgt.pid) - r0) / 2**20:8.1f} MiB",
              file=sys.stderr)
    undo_all()
    b.stop(bw)
    tgt.tgtadm("--op", "delete", "--mode", "system", "--force", check=False)
    tgt.kill()
    os.unlink(img)


for rnd in range(1, b.reps + 1):
    b.note_load()
    order = list(VARIANTS) if rnd % 2 else list(reversed(VARIANTS))
    for v in order:
        one(v, rnd)

tests = [("blkdiscard-z", "blkdiscard -z"), ("mkfs", "mkfs.ext4")]
lines = [f"# Write-zeroes over a non-thin tgt LUN ({MIB} MiB, {'random data' if FILL else 'sparse'}): "
         "main's daemon vs WRITE SAME", "",
         f"`BENCH_REPS={b.reps} ZERO_MIB={MIB}{' ZERO_FILL=1' if FILL else ''} BLOCKWAYD_BASE={BASE} "
         f"bench/iscsi_zero.py`, {b.load_line()}", ""] + \
    [f"- {ln}" for ln in b.machine_lines()] + ["",
         "Medians of the rounds. tgtd read: bytes tgtd read from sockets and files (rchar), i.e. the zeroes "
         "that crossed the wire; CPU: blockwayd + tgtd.", "",
         "| variant | test | seconds | tgtd read MiB | blockwayd CPU s | blockwayd+tgtd CPU s |", "|---|---|---|---|---|---|"]
for v in VARIANTS:
    for t, label in tests:
        lines.append(f"| {v} | {label} | {b.med(v, t + '_s'):.2f} | {b.med(v, t + '_tgtd_read_mib'):.1f} | "
                     f"{b.med(v, t + '_blockwayd_cpu_s'):.2f} | {b.med(v, t + '_cpu_s'):.2f} |")
lines += ["", "All rounds:", ""] + b.all_runs_table()
out = os.path.join(lib.REPO, "bench", "results", "iscsi-zero%s.md" % ("-fill" if FILL else ""))
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
