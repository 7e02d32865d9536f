#!/usr/bin/python3
"""Seed experiment 3 (issue 17): bonnie++ and PostMark on ext4 on the FUSE
file blockwayd shows for an iSCSI and an NFS remote, as the VM-disk papers
measured iSCSI and NFS storage.

Usage: bench/seeds/fs.py [--remote iscsi|nfs|both]
       (as root; both remotes by default; BENCH_QUICK=1 for a smoke run)

Why this shape: one process drives everything in order (no threads); every
peer it starts is stopped by pid and every mount and loop device it makes is
undone newest first, also when it fails (atexit). Waits are bounded.

Remotes, each serving one image: a sparse file of LUN_MIB, emptied (truncated
to 0 and back) before every configuration so each starts from the same state:
  iscsi   tgtd (userspace iSCSI target, tests/integration/remotes.Tgt) on a
          free loopback port of the host
  nfs     nfs-ganesha (VFS FSAL) with its own rpcbind in a private network
          namespace (remotes.PrivateNfs), so port 2049 and rpcbind's socket
          stay free on the host; blockwayd and qemu-nbd run inside its network
          namespace (nsenter -n, the host's mount namespace: their FUSE mounts
          and Unix sockets are seen from the host). NFSv3, the version qemu's
          nfs driver speaks.

Configurations, each an ext4 made fresh (mkfs.ext4) on a loop device over a
file, mounted, and both workloads run on it:
  local            the loop device on a local sparse file with direct I/O,
                   like every other configuration's loop device (the papers'
                   ceiling, the first ratio table: ext4's O_DIRECT reads reach
                   the host file with O_DIRECT, i.e. the disk, as the papers'
                   local disk; run once per round, shared by both remotes'
                   tables)
  local-buffered   the same with the loop device buffered (--direct-io=off):
                   the local file's storage is the host's page cache, as the
                   remote image's is for tgtd and ganesha and blockway's
                   cache file's is for blockwayd (its reads are buffered
                   preadv2). A second, labelled ceiling with its own ratios;
                   see bench/results/seeds-notes.md for why both
  direct           the same image without blockway: qemu-nbd (qemu's iscsi or
                   nfs driver: libiscsi, libnfs) on a Unix socket + nbdfuse
                   (libnbd's FUSE tool). nbdkit has no iscsi or nfs plugin
                   here, and this kernel has no NFS client (no nfs in
                   /proc/filesystems, no modules) for a kernel mount.
  bw-MODE          blockwayd --export d=URI,cache=DIR,mode=MODE --fuse-mount
                   MNT (a fresh cache), the loop device on MNT/d; MODE
                   writethrough, writeback, writeback-local
The loop devices use --direct-io=on (all but local-buffered), so every request
of the FUSE files reaches the daemon or nbdfuse.

Workloads:
  bonnie++ -D -s FILE_MIB:8k -r FILE_MIB/2 -n 0 -f -u root   (8 KiB blocks:
           block write (O_DIRECT) and rewrite (buffered: read ahead from the
           device, written back by its fsync), MB/s). bonnie++ 2.00a's -D
           opens only the file it creates O_DIRECT: its block read and seeks
           reopen it without and find it whole in the page cache (over 1 GB/s
           on every path), so they are not reported (full report only, as
           *_pagecache); see bench/results/seeds-notes.md
  fio --direct=1 --ioengine=psync on a FILE_MIB file of the ext4 (written in
           1 MiB O_DIRECT writes, fsync'd): one process reading it in 8 KiB
           blocks from start to end (bonnie++'s block read, with O_DIRECT),
           then 5 processes reading 8 KiB blocks at random for 10 s (bonnie++'s
           5 seekers, reads only). The loop device's own counters must show
           the whole file read during the sequential pass, or the run fails
  postmark: set location, set transactions TRANSACTIONS, run (the papers'
           100,000 transactions, its defaults otherwise: 500 files of 500 B
           to 10 KB; buffered, so mostly the page cache and ext4's journal)
then `sync` and the umount are timed too (what writeback owes the remote),
and fsck.ext4 -fn must find the file system clean.

Knobs: BENCH_QUICK (FILE_MIB 128, 2,000 transactions, images 512 MiB, 3 s
of random reads),
BENCH_REPS (1), SEEDS_FILE_MIB (1024), SEEDS_TRANSACTIONS (100000),
SEEDS_LUN_MIB (3072), SEEDS_CONFIGS (names of the above), BLOCKWAYD,
BENCH_TMPDIR. Writes bench/results/seeds-fs.md/.png (iSCSI) and
seeds-fs-nfs.md/.png (NFS) and their sections of BENCHMARKS.md (seeds:fs,
seeds:fs-nfs; not in quick mode).
"""
import argparse
import atexit
import glob
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seedlib import Bench, bar_chart, die  # noqa: E402
import remotes  # noqa: E402  (tests/integration, on the path through bench/lib.py)

ap = argparse.ArgumentParser(description="bonnie++ and PostMark on ext4 on blockway's FUSE file over iSCSI and NFS")
ap.add_argument("--remote", choices=("iscsi", "nfs", "both"), default="both",
                help="which remote's experiment to run (default both)")
ARGS = ap.parse_args()
if os.geteuid() != 0:
    die("run as root (loop devices, mounts, tgtd, ganesha)")
b = Bench("fs", runtime=1, reps=1, size_mib=1024)
Q = b.quick
FILE_MIB = int(os.environ.get("SEEDS_FILE_MIB", 128 if Q else 1024))
TRANSACTIONS = int(os.environ.get("SEEDS_TRANSACTIONS", 2000 if Q else 100000))
LUN_MIB = int(os.environ.get("SEEDS_LUN_MIB", 512 if Q else 3072))
SEEK_S = 3 if Q else 10
ALL_CONFIGS = ["local", "local-buffered", "direct", "bw-writethrough", "bw-writeback", "bw-writeback-local"]
CONFIGS = os.environ.get("SEEDS_CONFIGS", " ".join(ALL_CONFIGS)).split()
for c in CONFIGS:
    if c not in ALL_CONFIGS:
        die(f"SEEDS_CONFIGS: unknown configuration {c!r}; the configurations: {' '.join(ALL_CONFIGS)}")
REMOTE_KEYS = ["iscsi", "nfs"] if ARGS.remote == "both" else [ARGS.remote]
TOOLS = {"iscsi": ("tgtd", "tgtadm"), "nfs": ("ganesha.nfsd", "rpcbind", "nfs-ls", "nsenter", "unshare")}
for tool in ("bonnie++", "postmark", "fio", "qemu-nbd", "nbdfuse", "nbdinfo", "losetup", "mkfs.ext4", "fsck.ext4",
             "fusermount3") + sum((TOOLS[k] for k in REMOTE_KEYS), ()):
    if subprocess.run(["sh", "-c", f"command -v {tool}"], stdout=subprocess.DEVNULL).returncode != 0:
        die(f"missing tool: {tool} (scripts/install-deps.sh)")
if "direct" in CONFIGS and "nfs" in REMOTE_KEYS and not glob.glob("/usr/lib/*/qemu/block-nfs.so"):
    die("qemu's nfs driver is missing (package qemu-block-extra)")


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if check and r.returncode != 0:
        die(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}")
    return r.stdout


def sparse(path):
    """path becomes an empty sparse file of LUN_MIB (its old blocks freed)."""
    with open(path, "wb") as f:   # O_TRUNC
        f.truncate(LUN_MIB << 20)


class Iscsi:
    """tgtd on the host with one LUN on a sparse file."""
    key, title, section = "iscsi", "iSCSI (tgt)", "fs"

    def __init__(self):
        d = os.path.join(b.tmp, "tgt")
        os.makedirs(d)
        self.image = os.path.join(d, "lun.raw")
        sparse(self.image)
        self.tgt = remotes.Tgt(d)
        self.tgt.add_lun(1, self.image)
        self.uri = self.tgt.uri()
        self.prefix = []
        self.version = f"tgtd (tgt {sh(['tgtd', '--version'], check=False).strip()}) LUN"

    def start(self):
        self.tgt.start()

    def close(self):
        self.tgt.close()


class Nfs:
    """ganesha and rpcbind in a private network namespace, one file exported."""
    key, title, section = "nfs", "NFS (ganesha)", "fs-nfs"

    def __init__(self):
        self.nfs = remotes.PrivateNfs(os.path.join(b.tmp, "nfs"))
        self.image = self.nfs.server.file("img.raw")
        sparse(self.image)
        self.uri = self.nfs.server.v3_uri("img.raw")
        self.version = (sh(["dpkg-query", "-W", "-f=nfs-ganesha ${Version}", "nfs-ganesha"], check=False).strip()
                        + " (VFS FSAL, NFSv3, in a private network namespace) exporting")

    def start(self):
        self.nfs.start()
        self.prefix = self.nfs.prefix()

    def close(self):
        self.nfs.close()


MOUNTS = []   # stack of (kind, what, label): undone newest first
REMOTES = []


def undo():
    while MOUNTS:
        kind, what, label = MOUNTS.pop()
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
            if label == "blockwayd" and rc != 0:
                print(f"warning: blockwayd exited {rc}:\n{b.tail(what)}", file=sys.stderr)


def cleanup():
    undo()
    for r in reversed(REMOTES):
        r.close()


atexit.register(cleanup)   # registered after Bench's: runs before its temp dir goes


def start(label, cmd):
    p = b.start(label, cmd)
    MOUNTS.append(("proc", p, label))
    return p


def wait_file(path, p, seconds=20):
    end = time.time() + seconds
    while time.time() < end:
        if p.poll() is not None:
            die(f"{p.args[0]} exited ({p.returncode}) before {path} appeared:\n{b.tail(p)}")
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        time.sleep(0.05)
    die(f"{path} did not appear in {seconds} s")


def attach(name, remote, d):
    """The file the loop device goes on, for configuration name over remote
    (None for local), in the work directory d."""
    if remote is None:   # local, local-buffered
        path = os.path.join(d, "local.raw")
        sparse(path)
        return path
    sparse(remote.image)
    mnt = os.path.join(d, "mnt")
    if name == "direct":
        sock = os.path.join(d, "qemu-nbd.sock")
        q = start("qemu-nbd", remote.prefix + ["qemu-nbd", "-f", "raw", "-k", sock, "-t", "--cache=none",
                                               remote.uri])
        uri = f"nbd+unix:///?socket={sock}"
        b.wait_nbd(uri, q, seconds=60)
        open(mnt, "w").close()   # nbdfuse mounts a single file on a file
        nf = start("nbdfuse", ["nbdfuse", mnt, uri])
        MOUNTS.append(("fuse", mnt, None))
        wait_file(mnt, nf)
        return mnt
    os.makedirs(mnt)
    mode = name.split("-", 1)[1]
    bw = start("blockwayd", remote.prefix + [
        b.blockwayd, "--listen", f"unix:{d}/nbd.sock", "--control-socket", "off", "--data-dir", f"{d}/data",
        "--fuse-mount", mnt, "--export", f"d={remote.uri},cache={d}/cache,mode={mode}"])
    MOUNTS.append(("fuse", mnt, None))
    path = os.path.join(mnt, "d")
    wait_file(path, bw, seconds=60)
    return path


def timed(cmd, cwd=None):
    """Runs cmd to its end; (seconds, output)."""
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        die(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}")
    return time.time() - t0, r.stdout


def fio(d, job, *args):
    """fio with the psync engine on a file of the mounted ext4; its JSON's first job."""
    out = os.path.join(d, "fio.json")
    sh(["fio", f"--name={job}", "--ioengine=psync", "--direct=1", "--output-format=json", f"--output={out}", *args])
    j = json.load(open(out))["jobs"][0]
    if j["error"]:
        die(f"fio {job} reported error {j['error']}")
    return j


def loop_sectors_read(loop):
    return int(open(f"/sys/block/{os.path.basename(loop)}/stat").read().split()[2])


def read_passes(who, rnd, fs, loop, d):
    """bonnie++'s block read and seeks as they would be with O_DIRECT: a
    FILE_MIB file written with 1 MiB O_DIRECT writes (and fsync'd), read
    sequentially in 8 KiB O_DIRECT reads by one process (bonnie++'s block
    read), then read at random in 8 KiB O_DIRECT reads by 5 processes
    (bonnie++'s seekers) for SEEK_S seconds. The loop device must have read
    the whole file during the sequential pass: the proof that ext4's page
    cache did not serve it."""
    f = os.path.join(fs, "read.dat")
    common = [f"--filename={f}", f"--size={FILE_MIB}M"]
    fio(d, "layout", *common, "--rw=write", "--bs=1M", "--end_fsync=1")
    before = loop_sectors_read(loop)
    j = fio(d, "seqread", *common, "--rw=read", "--bs=8k")
    moved = (loop_sectors_read(loop) - before) * 512
    if moved < (FILE_MIB << 20):
        die(f"{who}: the loop device read {moved >> 20} MiB during an O_DIRECT read of {FILE_MIB} MiB: "
            "something above it cached the file")
    b.record(who, "read_8k", rnd, j["read"]["bw_bytes"] / 1e6)
    j = fio(d, "randread", *common, "--rw=randread", "--bs=8k", "--numjobs=5", "--group_reporting",
            "--time_based", f"--runtime={SEEK_S}")
    b.record(who, "randread_8k", rnd, j["read"]["iops"])
    os.unlink(f)


def run_config(name, remote, rnd):
    """Both workloads on a fresh ext4 for configuration name; records under
    who (local, or REMOTE/name); returns whether the loop device ran with
    direct I/O."""
    who = name if remote is None else f"{remote.key}/{name}"
    d = os.path.join(b.tmp, who.replace("/", "-"))
    os.makedirs(d)
    path = attach(name, remote, d)
    # Every request of the FUSE files must reach the daemon (nbdfuse): the loop
    # device reads and writes them with O_DIRECT; so does the local ceiling's,
    # on its file (the disk). local-buffered: the host's page cache instead.
    loop = sh(["losetup", "-f", "--show", f"--direct-io={'off' if name == 'local-buffered' else 'on'}",
               path]).strip()
    MOUNTS.append(("loop", loop, None))
    direct = open(f"/sys/block/{os.path.basename(loop)}/loop/dio").read().strip() == "1"
    sh(["mkfs.ext4", "-q", "-F", loop])
    fs = os.path.join(d, "fs")
    os.makedirs(fs)
    sh(["mount", loop, fs])
    MOUNTS.append(("mount", fs, None))
    t, out = timed(["bonnie++", "-D", "-d", fs, "-s", f"{FILE_MIB}:8k", "-r", str(FILE_MIB // 2), "-n", "0", "-f",
                    "-u", "root", "-q"])
    csv = [ln for ln in out.splitlines() if ln.count(",") > 10][-1].split(",")
    # bonnie++ CSV (format 1.98): [11] block write, [13] rewrite, [17] block read (KiB/s), [19] seeks/s;
    # "+++++" when a phase took under 500 ms (too fast to time: no figure). Its -D opens only the
    # file it creates O_DIRECT (the block write); rewrite, read and seeks reopen it without: the
    # read and the seeks find the whole file in the page cache (seeds-notes.md), so they are kept
    # in the full report only (*_pagecache) and read_passes measures reads instead.
    for idx, test in ((11, "bonnie_write"), (13, "bonnie_rewrite"), (17, "bonnie_read_pagecache"),
                      (19, "bonnie_seeks_pagecache")):
        v = csv[idx] if idx < len(csv) else ""
        if v.startswith("+"):
            continue
        try:
            b.record(who, test, rnd, float(v) if test.startswith("bonnie_seeks") else float(v) * 1024 / 1e6)
        except ValueError:
            die(f"cannot read bonnie++'s CSV field {idx}: {','.join(csv)}")
    b.record(who, "bonnie_s", rnd, t)
    read_passes(who, rnd, fs, loop, d)
    pm = os.path.join(fs, "pm")
    os.makedirs(pm)
    cfg = os.path.join(d, "postmark.cfg")
    open(cfg, "w").write(f"set location {pm}\nset transactions {TRANSACTIONS}\nrun\nquit\n")
    t, out = timed(["postmark", cfg], cwd=d)
    m = re.search(r"Time:\s*\n?\s*(\d+) seconds total", out)
    tps = re.search(r"(\d+) seconds of transactions \((\d+) per second\)", out)
    b.record(who, "postmark_s", rnd, t)
    if tps:
        b.record(who, "postmark_tps", rnd, float(tps.group(2)) if int(tps.group(1)) > 0 else TRANSACTIONS / t)
    elif not m:
        die(f"cannot read postmark's output:\n{out[-1500:]}")
    t0 = time.time()
    subprocess.run(["sync"])
    subprocess.run(["umount", fs], check=True)
    MOUNTS.pop()
    b.record(who, "sync_umount_s", rnd, time.time() - t0)
    fsck = subprocess.run(["fsck.ext4", "-fn", loop], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if fsck.returncode != 0:
        die(f"{who}: fsck.ext4 found errors after the run:\n{fsck.stdout[-1500:]}")
    undo()
    subprocess.run(["rm", "-rf", d])
    return direct


for k in REMOTE_KEYS:
    REMOTES.append({"iscsi": Iscsi, "nfs": Nfs}[k]())
    REMOTES[-1].start()   # after the append: cleanup() closes it if it fails half started
dio = {}
for rnd in range(1, b.reps + 1):
    b.note_load()
    for r in [None] + REMOTES:
        for c in CONFIGS:
            if c.startswith("local") != (r is None):
                continue
            print(f"round {rnd}/{b.reps}: {c}{'' if r is None else ' over ' + r.key}", file=sys.stderr)
            dio[(r.key if r else None, c)] = run_config(c, r, rnd)

# (test, label, in the ratios and the chart: +1 more is better, -1 less is better, 0 not there)
TESTS = [("bonnie_write", "bonnie++ block write MB/s", 1), ("bonnie_rewrite", "bonnie++ rewrite MB/s", 1),
         ("read_8k", "8k O_DIRECT read MB/s", 1), ("randread_8k", "8k O_DIRECT random read IOPS", 1),
         ("postmark_tps", "PostMark transactions/s", 0), ("postmark_s", "PostMark total s", -1),
         ("sync_umount_s", "sync + umount s", 0)]
SPEED = [(t, label, sign) for t, label, sign in TESTS if sign]


def fmt(v):
    return "–" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def publish(remote):
    """The report, chart and BENCHMARKS.md section of one remote's experiment."""
    cols = [(c if c.startswith("local") else f"{remote.key}/{c}", c) for c in CONFIGS]   # (who, label)
    table = ["| test | " + " | ".join(label for _, label in cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for t, label, _ in TESTS:
        table.append(f"| {label} | " + " | ".join(fmt(b.med(who, t)) for who, _ in cols) + " |")
    others = [(who, label) for who, label in cols if not label.startswith("local")]

    def ratios(ceiling, title):
        rows = [f"| speed (x {title}; times: its / this one's) | " + " | ".join(label for _, label in others) + " |",
                "| --- |" + " ---: |" * len(others)]
        for t, label, sign in SPEED:
            cells = []
            for who, _ in others:
                r, _ = b.ratio((who, t), (ceiling, t))
                cells.append("–" if not r else f"{r ** sign:.2f}x")
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        return rows

    # Against the direct-I/O local ext4 (the ceiling); against the buffered one too, labelled, when it ran.
    ttable = ratios("local", "local ext4, loop dio")
    if "local-buffered" in CONFIGS:
        ttable += [""] + ratios("local-buffered", "local ext4, loop buffered (page cache)")
    png = b.out_name("png", remote.section)
    bar_chart(png, f"ext4 on the FUSE file over {remote.title}, bonnie++ {FILE_MIB} MiB 8k, PostMark {TRANSACTIONS}",
              [(label, label.split()[-1], [(lb, b.med(who, t)) for who, lb in cols if b.med(who, t) is not None])
               for t, label, _ in SPEED])
    machine = b.machine_lines([
        f"remote: {remote.version} a sparse {LUN_MIB} MiB file, loopback",
        f"bonnie++ -D -s {FILE_MIB}:8k -r {FILE_MIB // 2} -n 0 -f; fio --direct=1 --ioengine=psync --bs=8k on a "
        f"{FILE_MIB} MiB file: --rw=read, then --rw=randread --numjobs=5 --runtime={SEEK_S}; "
        f"postmark {TRANSACTIONS} transactions (defaults otherwise)",
        "loop devices with direct I/O: " + ", ".join(f"{c} {'yes' if v else 'no'}" for (k, c), v in dio.items()
                                                     if k in (None, remote.key))])
    md = os.path.basename(b.out_name("md", remote.section))
    report = [f"# Seed experiment: bonnie++ and PostMark over {remote.title} (bench/seeds/fs.py)", ""] + \
        ["- " + ln for ln in machine] + ["- " + b.load_line(), "", "## Results (median)", ""] + table + \
        ["", "## Ratios", ""] + ttable + ["", f"![chart]({os.path.basename(png)})", "", "## All runs", ""] + \
        b.all_runs_table(lambda who: who.startswith("local") or who.startswith(remote.key + "/"))
    section = [
        f"### Seed experiment: bonnie++ and PostMark over {remote.title}: `bench/seeds/fs.py --remote {remote.key}`", "",
        f"Run {machine[0][6:]}, {b.reps} round(s), {b.load_line()}. ext4 on a loop device on: a local file (`local`: loop "
        "with direct I/O, the ceiling of the ratios; `local-buffered`: loop buffered, the host's page cache, second ratio "
        f"table), the {remote.title} image through "
        "qemu-nbd + nbdfuse (`direct`, no blockway), blockwayd's FUSE file over "
        f"{remote.key}:// with a fresh cache in each write mode (`bw-*`). bonnie++ {FILE_MIB} MiB, 8 KiB blocks "
        "(block write O_DIRECT, rewrite buffered); reads: fio, 8 KiB O_DIRECT, on a "
        f"{FILE_MIB} MiB file, sequential (one process) and random (5 processes, {SEEK_S} s), checked against "
        "the loop device's counters (bonnie++'s own read and seeks reopen its file without O_DIRECT and measure "
        "the page cache: see [seeds notes](bench/results/seeds-notes.md)); PostMark "
        f"{TRANSACTIONS} transactions. "
        "PostMark's rate is whole seconds, so compare its total s. "
        f"Full report: [bench/results/{md}](bench/results/{md}), "
        f"chart: [{os.path.basename(png)}](bench/results/{os.path.basename(png)}).", ""] + table + [""] + ttable
    b.publish(report, section, remote.section)


for r in REMOTES:
    publish(r)
