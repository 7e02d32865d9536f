#!/usr/bin/python3
"""Seed experiment 3 (issue 17): bonnie++ and PostMark on ext4 on the FUSE
file blockwayd shows for an iSCSI remote, as the VM-disk papers measured
NFS and iSCSI storage.

Usage: bench/seeds/fs.py          (as root; BENCH_QUICK=1 for a smoke run)

The remote is tgt (userspace iSCSI target, the fixture of
tests/integration/remotes.py) with one LUN on a sparse file of LUN_MIB. Each
configuration is an ext4 made fresh (mkfs.ext4) on a loop device over a
file, mounted, and both workloads run on it:

  local            the loop device on a local sparse file (the ceiling; a
                   buffered loop device: its storage is the host's page
                   cache, as the LUN file's is for tgtd)
  direct           the same LUN without blockway: qemu-nbd (qemu's iSCSI
                   driver, libiscsi) + nbdfuse (libnbd's FUSE tool) give the
                   file; nbdkit has no iscsi plugin on this machine
  bw-MODE          blockwayd --export d=iscsi://...,cache=DIR,mode=MODE
                   --fuse-mount MNT (a fresh cache), the loop device on
                   MNT/d; MODE writethrough, writeback, writeback-local
                   (the loop devices on FUSE files use --direct-io=on, so
                   every request reaches the daemon or nbdfuse)

Workloads:
  bonnie++ -D -s FILE_MIB:8k -r FILE_MIB/2 -n 0 -f -u root   (8 KiB blocks,
           O_DIRECT, so the page cache (24 GiB here) cannot hold the file and
           the disk path is what is measured; block write, rewrite and read
           in MB/s, random seeks/s)
  postmark: set location, set transactions TRANSACTIONS, run (the papers'
           100,000 transactions, its defaults otherwise: 500 files of 500 B
           to 10 KB; buffered, so mostly the page cache and ext4's journal)
then `sync` and the umount are timed too (what writeback owes the remote).
(A memory cgroup instead of O_DIRECT was tried: cgroup v1 OOM-kills bonnie++
while its dirty pages wait for the FUSE file.)

Knobs: BENCH_QUICK (FILE_MIB 128, 2,000 transactions, LUN 512 MiB),
BENCH_REPS (1), SEEDS_FILE_MIB (1024),
SEEDS_TRANSACTIONS (100000), SEEDS_LUN_MIB (3072), SEEDS_CONFIGS (names),
BLOCKWAYD, BENCH_TMPDIR. Writes bench/results/seeds-fs.md and .png and the
seeds:fs section of BENCHMARKS.md (not in quick mode).
"""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seedlib import Bench, bar_chart, die  # noqa: E402
import remotes  # noqa: E402  (tests/integration, on the path through bench/lib.py)

if os.geteuid() != 0:
    die("run as root (loop devices, mounts)")
b = Bench("fs", runtime=1, reps=1, size_mib=1024)
Q = b.quick
FILE_MIB = int(os.environ.get("SEEDS_FILE_MIB", 128 if Q else 1024))
TRANSACTIONS = int(os.environ.get("SEEDS_TRANSACTIONS", 2000 if Q else 100000))
LUN_MIB = int(os.environ.get("SEEDS_LUN_MIB", 512 if Q else 3072))
CONFIGS = os.environ.get("SEEDS_CONFIGS", "local direct bw-writethrough bw-writeback bw-writeback-local").split()
for tool in ("bonnie++", "postmark", "tgtd", "qemu-nbd", "nbdfuse", "losetup", "mkfs.ext4", "fusermount3"):
    if subprocess.run(["sh", "-c", f"command -v {tool}"], stdout=subprocess.DEVNULL).returncode != 0:
        die(f"missing tool: {tool} (scripts/install-deps.sh)")

MOUNTS = []   # stack of (kind, what): undone newest first
LUN = os.path.join(b.tmp, "lun.raw")
tgt = remotes.Tgt(b.tmp)


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if check and r.returncode != 0:
        die(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}")
    return r.stdout


def undo():
    while MOUNTS:
        kind, what = MOUNTS.pop()
        if kind == "mount":
            subprocess.run(["umount", what], stderr=subprocess.DEVNULL)
            if subprocess.run(["mountpoint", "-q", what]).returncode == 0:
                subprocess.run(["umount", "-l", what])
        elif kind == "loop":
            subprocess.run(["losetup", "-d", what], stderr=subprocess.DEVNULL)
        elif kind == "fuse":
            if subprocess.run(["mountpoint", "-q", what]).returncode == 0:
                subprocess.run(["fusermount3", "-u", what], stderr=subprocess.DEVNULL)
        elif kind == "proc":
            rc = b.stop(what, timeout=60)
            if "blockwayd" in str(what.args[0]) and rc != 0:
                print(f"warning: blockwayd exited {rc}:\n{b.tail(what)}", file=sys.stderr)


def cleanup():
    undo()
    tgt.close()


import atexit  # noqa: E402
atexit.register(cleanup)   # registered after Bench's: runs before its temp dir goes

with open(LUN, "wb") as f:
    f.truncate(LUN_MIB << 20)
tgt.add_lun(1, LUN)
tgt.start()


def wait_file(path, p, seconds=20):
    end = time.time() + seconds
    while time.time() < end:
        if p.poll() is not None:
            die(f"{p.args[0]} exited ({p.returncode}) before {path} appeared:\n{b.tail(p)}")
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        time.sleep(0.05)
    die(f"{path} did not appear in {seconds} s")


def attach(name):
    """The file the loop device goes on, for configuration name."""
    d = os.path.join(b.tmp, name)
    os.makedirs(d, exist_ok=True)
    if name == "local":
        path = os.path.join(d, "local.raw")
        with open(path, "wb") as f:
            f.truncate(LUN_MIB << 20)
        return path
    sh(["dd", "if=/dev/zero", f"of={LUN}", "bs=1M", "count=16", "conv=notrunc", "status=none"])  # old superblock gone
    mnt = os.path.join(d, "mnt")
    os.makedirs(mnt, exist_ok=True)
    if name == "direct":
        port = b.free_port()
        q = b.start("qemu-nbd", ["qemu-nbd", "-f", "raw", "-p", str(port), "-b", "127.0.0.1", "-t",
                                 "--cache=none", tgt.uri()])
        MOUNTS.append(("proc", q))
        b.wait_nbd(f"nbd://127.0.0.1:{port}/", q)
        path = os.path.join(mnt, "nbd")
        os.rmdir(mnt)
        open(mnt, "w").close()   # nbdfuse mounts a single file on a file
        nf = b.start("nbdfuse", ["nbdfuse", mnt, f"nbd://127.0.0.1:{port}/"])
        MOUNTS.append(("proc", nf))
        MOUNTS.append(("fuse", mnt))
        wait_file(mnt, nf)
        return mnt
    mode = name.split("-", 1)[1]
    bw = b.start("blockwayd", [b.blockwayd, "--listen", f"unix:{d}/nbd.sock", "--control-socket", "off",
                               "--data-dir", f"{d}/data", "--fuse-mount", mnt,
                               "--export", f"d={tgt.uri()},cache={d}/cache,mode={mode}"])
    MOUNTS.append(("proc", bw))
    MOUNTS.append(("fuse", mnt))
    path = os.path.join(mnt, "d")
    wait_file(path, bw)
    return path


def timed(cmd, cwd=None):
    """Runs cmd to its end; (seconds, output)."""
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        die(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}")
    return time.time() - t0, r.stdout


def run_config(name, rnd):
    path = attach(name)
    # Every request of the FUSE files must reach the daemon (nbdfuse): the loop
    # device reads and writes them with O_DIRECT. The local file's storage is
    # the host's page cache, as the remote LUN file's is for tgtd: buffered.
    loop = sh(["losetup", "-f", "--show", f"--direct-io={'off' if name == 'local' else 'on'}", path]).strip()
    MOUNTS.append(("loop", loop))
    direct = open(f"/sys/block/{os.path.basename(loop)}/loop/dio").read().strip() == "1"
    sh(["mkfs.ext4", "-q", "-F", loop])
    fs = os.path.join(b.tmp, name, "fs")
    os.makedirs(fs, exist_ok=True)
    sh(["mount", loop, fs])
    MOUNTS.append(("mount", fs))
    t, out = timed(["bonnie++", "-D", "-d", fs, "-s", f"{FILE_MIB}:8k", "-r", str(FILE_MIB // 2), "-n", "0", "-f",
                        "-u", "root", "-q"])
    csv = [ln for ln in out.splitlines() if ln.count(",") > 10][-1].split(",")
    # bonnie++ CSV (format 1.98): [11] block write, [13] rewrite, [17] block read (KiB/s), [19] seeks/s;
    # "+++++" when a phase took under 500 ms (too fast to time: no figure)
    for idx, test in ((11, "bonnie_write"), (13, "bonnie_rewrite"), (17, "bonnie_read"), (19, "bonnie_seeks")):
        v = csv[idx] if idx < len(csv) else ""
        if v.startswith("+"):
            continue
        try:
            b.record(name, test, rnd, float(v) if test == "bonnie_seeks" else float(v) * 1024 / 1e6)
        except ValueError:
            die(f"cannot read bonnie++'s CSV field {idx}: {','.join(csv)}")
    b.record(name, "bonnie_s", rnd, t)
    pm = os.path.join(fs, "pm")
    os.makedirs(pm)
    cfg = os.path.join(b.tmp, "postmark.cfg")
    open(cfg, "w").write(f"set location {pm}\nset transactions {TRANSACTIONS}\nrun\nquit\n")
    t, out = timed(["postmark", cfg], cwd=b.tmp)
    m = re.search(r"Time:\s*\n?\s*(\d+) seconds total", out)
    tps = re.search(r"(\d+) seconds of transactions \((\d+) per second\)", out)
    b.record(name, "postmark_s", rnd, t)
    if tps:
        b.record(name, "postmark_tps", rnd, float(tps.group(2)) if int(tps.group(1)) > 0 else TRANSACTIONS / t)
    elif not m:
        die(f"cannot read postmark's output:\n{out[-1500:]}")
    t0 = time.time()
    subprocess.run(["sync"])
    subprocess.run(["umount", fs], check=True)
    MOUNTS.pop()
    b.record(name, "sync_umount_s", rnd, time.time() - t0)
    fsck = subprocess.run(["fsck.ext4", "-fn", loop], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if fsck.returncode != 0:
        die(f"{name}: fsck.ext4 found errors after the run:\n{fsck.stdout[-1500:]}")
    undo()
    subprocess.run(["rm", "-rf", os.path.join(b.tmp, name)])
    return direct


dio = {}
for rnd in range(1, b.reps + 1):
    b.note_load()
    for c in CONFIGS:
        print(f"round {rnd}/{b.reps}: {c}", file=sys.stderr)
        dio[c] = run_config(c, rnd)

TESTS = [("bonnie_write", "bonnie++ block write MB/s"), ("bonnie_rewrite", "bonnie++ rewrite MB/s"),
         ("bonnie_read", "bonnie++ block read MB/s"), ("bonnie_seeks", "bonnie++ random seeks/s"),
         ("postmark_tps", "PostMark transactions/s"), ("postmark_s", "PostMark total s"),
         ("sync_umount_s", "sync + umount s")]
table = ["| test | " + " | ".join(CONFIGS) + " |", "| --- |" + " ---: |" * len(CONFIGS)]
for t, label in TESTS:
    table.append(f"| {label} | " + " | ".join(
        "–" if b.med(c, t) is None else f"{b.med(c, t):.0f}" if b.med(c, t) >= 10 else f"{b.med(c, t):.1f}"
        for c in CONFIGS) + " |")
ttable = ["| ratio (x local ext4) | " + " | ".join(c for c in CONFIGS if c != "local") + " |",
          "| --- |" + " ---: |" * (len(CONFIGS) - 1)]
for t, label in TESTS[:5]:
    cells = []
    for c in CONFIGS:
        if c == "local":
            continue
        r, _ = b.ratio((c, t), ("local", t))
        cells.append("–" if r is None else f"{r:.2f}x")
    ttable.append(f"| {label} | " + " | ".join(cells) + " |")
png = b.out_name("png")
bar_chart(png, f"ext4 on the FUSE file over iSCSI (tgt), bonnie++ {FILE_MIB} MiB 8k, PostMark {TRANSACTIONS}",
          [(label, label.split()[-1], [(c, b.med(c, t)) for c in CONFIGS if b.med(c, t) is not None])
           for t, label in TESTS[:5]])
machine = b.machine_lines([
    f"remote: tgtd (tgt {sh(['tgtd', '--version'], check=False).strip()}) LUN on a sparse {LUN_MIB} MiB file, loopback",
    f"bonnie++ -D -s {FILE_MIB}:8k -r {FILE_MIB // 2} -n 0 -f; postmark {TRANSACTIONS} transactions (defaults otherwise)",
    "loop devices with direct I/O: " + ", ".join(f"{c} {'yes' if v else 'no'}" for c, v in dio.items())])
report = ["# Seed experiment: bonnie++ and PostMark over iSCSI (bench/seeds/fs.py)", ""] + \
    ["- " + l for l in machine] + ["- " + b.load_line(), "", "## Results (median)", ""] + table + \
    ["", "## Ratios", ""] + ttable + ["", f"![chart]({os.path.basename(png)})", "", "## All runs", ""] + \
    b.all_runs_table()
section = [
    "### Seed experiment: bonnie++ and PostMark over iSCSI: `bench/seeds/fs.py`", "",
    f"Run {machine[0][6:]}, {b.reps} round(s), {b.load_line()}. ext4 on a loop device on: a local file "
    "(`local`), the tgt LUN through qemu-nbd + nbdfuse (`direct`, no blockway), blockwayd's FUSE file over "
    f"iscsi:// with a fresh cache in each write mode (`bw-*`). bonnie++ {FILE_MIB} MiB, 8 KiB blocks; PostMark "
    f"{TRANSACTIONS} transactions. "
    "bonnie++'s block read (over 1 GB/s on every path, through nbdfuse too, with O_DIRECT from bonnie++ and "
    "direct I/O on the loop devices) cannot be the disk path: something caches it, not found yet; no target "
    "uses it. PostMark's rate is whole seconds (100,000 transactions in 7-16 s), so compare its total s. "
    f"Full report: [bench/results/{os.path.basename(b.out_name('md'))}](bench/results/{os.path.basename(b.out_name('md'))}), "
    f"chart: [{os.path.basename(png)}](bench/results/{os.path.basename(png)}).", ""] + table + [""] + ttable
b.publish(report, section)
