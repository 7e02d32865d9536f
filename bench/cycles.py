#!/usr/bin/python3
"""What blockwayd's CPU costs per request on each path, next to the peers'
(issue 17): CPU-us per 4k request and CPU-seconds per GB.

Usage (as root):  bench/cycles.py [PATH ...]     (default: all paths)

PATHS, each run as a blockwayd variant (bw) and a peer variant, alternated
ABAB... with the order reversed every other round:
  file        bw: file://IMG            peer: nbdkit's file plugin on IMG
  cache-hit   bw: nbd://REMOTE,cache=DIR (writethrough) warmed by one full read
              first (nbdkit file remote); reads only, all hits
              peer: nbdkit's file plugin on IMG (the local ceiling)
  cache-miss  bw: the same over an empty cache (a fresh cache per test);
              seqread only (each block a miss once)
              peer: nbd-remote's bw (blockwayd over the same remote, uncached)
  nbd-remote  bw: nbd://REMOTE (nbdkit file)   peer: the client straight on REMOTE
  iscsi       bw: iscsi:// (tgt)   peer: tgtd's CPU in the bw run, and qemu's
              iscsi driver (qemu-img bench) straight on tgt
  nfs         bw: nfs:// (ganesha, v3)  peer: ganesha's CPU, and qemu's nfs
              driver (qemu-img bench) straight on ganesha
  aoe         bw: aoe:// (vblade in a namespace, MTU 9000)  peer: vblade's CPU
  fuse        bw: --fuse-mount over file://IMG   peer: nbdfuse over nbdkit's
              file plugin; fio psync --direct=1 on the FUSE file
  clone-read  bw: a clone (clone:golden) of a cached base (nbdkit file
              remote) warmed by one full read; reads only, every one a read
              of base data through the clone
              peer: the base export itself in the same daemon (issue 18:
              its CPU is in the "peer server" columns)
  clone-write bw: a fresh clone, granularity 64k (CYCLES_GRANULARITY), of
              the warm base; writes only (first writes copy up)
              peer: a file:// export of a local copy of the image, in the
              same daemon (CPU in the "peer server" columns)
Tests: randread / randwrite: 4k random, fio nbd engine QD16 (fuse: psync),
RUNTIME seconds; seqread / seqwrite: the whole image with nbdcopy (fuse: fio
1M psync; qemu-img bench -s 1M -d 16 for the qemu peers).

Measured per test: the CPU (utime + stime from /proc/PID/stat) of blockwayd,
of the server behind it (nbdkit, tgtd, ganesha, vblade; for the peer
variants the peer server itself) and of the client; blockwayd's system calls
and context switches (perf stat -e raw_syscalls:sys_enter,context-switches,
instructions: this VM has no PMU, so instructions read 0 and are left out).
Figures: us per request (4k tests), CPU-s per GB (seq tests), medians over
the rounds, and the load average at the start and end.

Environment (bench/lib.sh's settings): BENCH_QUICK=1 (smoke: 1 round,
2 s, 256 MiB), BENCH_REPS (3), BENCH_RUNTIME (3), BENCH_SIZE_MIB (1024),
BENCH_TMPDIR, BLOCKWAYD (a private copy is run); CYCLES_BASE=BINARY adds
a second blockwayd build as a third variant in the same rounds (before /
after a change); CYCLES_OUT=FILE also writes the Markdown result there;
CYCLES_TGT_MRDSL=BYTES sets tgt's MaxRecvDataSegmentLength (the largest
Data-Out PDU an initiator may send it; tgt's default 8192 splits every
write into 8 KiB PDUs, two system calls each in libiscsi) for the iscsi
path; CYCLES_PERF=DIR records each blockwayd test with `perf record -g` into
DIR/PATH-VARIANT-TEST-rROUND.data (where the CPU goes: perf report -i).

It runs in a private network and mount namespace (own rpcbind, /run, port
2049, FUSE mounts that go away with it), so it meets no other test here.
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import lib  # bench/lib.py: settings; puts tests/integration on sys.path
from harness import free_port  # noqa: E402
import remotes  # noqa: E402

SETTINGS = lib.settings(3, 3, 1024)
PATHS = ["file", "cache-hit", "cache-miss", "nbd-remote", "iscsi", "nfs", "aoe", "fuse", "clone-read", "clone-write"]
TESTS = {"cache-hit": ["randread", "seqread"], "cache-miss": ["seqread"], "clone-read": ["randread"],
         "clone-write": ["randwrite"]}
ALL_TESTS = ["randread", "randwrite", "seqread", "seqwrite"]
PEV = "raw_syscalls:sys_enter,context-switches"


class Bw:
    """A blockwayd serving one export `bench` on a free port (or FUSE)."""

    def __init__(self, binary, export, tmp, extra=(), before=()):
        """before: --export arguments ahead of `bench` (a clone's base)."""
        port = free_port()
        pidf = f"{tmp}/bw.{port}.pid"
        if "--data-dir" not in list(extra) + list(before):
            # A catalogue of its own, never the host's /var/lib/blockway (a
            # cache's record there would outlive the run and meet the next).
            extra = list(extra) + ["--data-dir", f"{tmp}/data.{port}"]
        self.uri = f"nbd://127.0.0.1:{port}/bench"
        self.p = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--log-level", "warn"] + list(before) +
                                  ["--export", f"bench={export}", "--pid-file", pidf] + list(extra),
                                  stdout=open(f"{tmp}/blockwayd.log", "a"), stderr=subprocess.STDOUT)
        for _ in range(600):
            if os.path.exists(pidf) and os.path.getsize(pidf) > 0:
                return
            if self.p.poll() is not None:
                raise SystemExit(f"blockwayd exited: {open(f'{tmp}/blockwayd.log').read()[-800:]}")
            time.sleep(0.05)
        raise SystemExit("blockwayd did not start")

    @property
    def pid(self):
        return self.p.pid

    def close(self):
        lib.stop_child(self.p)


def fio(args, tmp):  # -> wall, client CPU, {read/write: total_ios}
    out = f"{tmp}/fio.json"
    wall, c = lib.run_child(["fio", "--name=b", "--output-format=json", f"--output={out}"] + args)
    job = json.load(open(out))["jobs"][0]
    return wall, c, job


def one_test(test, target, size, tmp):
    """Runs test against target (an nbd:// URI, a FUSE file path, or
    ('qemu', URI)): -> (wall s, client CPU s, work) where work is requests
    (random tests) or GB (sequential tests)."""
    rt = SETTINGS["RUNTIME"]
    rw = {"randread": "randread", "randwrite": "randwrite", "seqread": "read", "seqwrite": "write"}[test]
    if isinstance(target, tuple):  # qemu's own driver for the remote
        # 40,000: with 200,000 strided requests qemu-img bench failed with EIO
        # (tgt and ganesha alike; not looked into)
        bs, n = ("4k", 40000) if test.startswith("rand") else \
            ("1M", size >> 20)
        cmd = ["qemu-img", "bench", "-f", "raw", "-d", "16", "-s", bs, "-c", str(n)]
        if test.startswith("rand"):
            cmd += ["-S", "7919k"]  # a prime stride: spread over the image, not sequential
        if test.endswith("write"):
            cmd += ["-w"]
        wall, c = lib.run_child(cmd + [target[1]])
        return wall, c, (n if test.startswith("rand") else size / 1e9)
    if target.startswith("nbd:"):
        if test == "seqread":
            return (*lib.run_child(["nbdcopy", "--requests=16", target, "null:"]), size / 1e9)
        if test == "seqwrite":
            return (*lib.run_child(["nbdcopy", "--requests=16", f"{tmp}/src.raw", target]), size / 1e9)
        wall, c, job = fio(["--ioengine=nbd", f"--uri={target}", f"--rw={rw}", "--bs=4k", "--iodepth=16",
                            f"--size={size}", "--time_based", f"--runtime={rt}"], tmp)
        return wall, c, job["read" if rw == "randread" else "write"]["total_ios"]
    # A FUSE file: one request at a time, past the kernel's page cache.
    common = ["--ioengine=psync", "--direct=1", f"--filename={target}", f"--rw={rw}", f"--size={size}"]
    if test.startswith("rand"):
        wall, c, job = fio(common + ["--bs=4k", "--time_based", f"--runtime={rt}"], tmp)
        return wall, c, job["read" if rw == "randread" else "write"]["total_ios"]
    wall, c, job = fio(common + ["--bs=1M"], tmp)
    return wall, c, job["read" if rw == "read" else "write"]["io_bytes"] / 1e9


class Path:
    """One path's peers and its two variants. start(variant) -> (target,
    blockwayd pid or None, server pids, closer)."""

    def __init__(self, name, binary, img, size, tmp, base=None):
        self.name, self.binary, self.img, self.size, self.tmp = name, binary, img, size, tmp
        self.base = base  # another blockwayd build measured in the same rounds (CYCLES_BASE)
        self.peers = []
        self.remote_uri = None
        self.server_pids = []
        self.tests = TESTS.get(name, ALL_TESTS)
        self.peer_label = {"file": "nbdkit file", "cache-hit": "nbdkit file (local)",
                           "cache-miss": "bw uncached", "nbd-remote": "nbdkit direct",
                           "iscsi": "qemu iscsi driver", "nfs": "qemu nfs driver", "aoe": "vblade only",
                           "fuse": "nbdfuse+nbdkit", "clone-read": "the base export (same daemon)",
                           "clone-write": "file export (same daemon)"}[name]

    def setup(self):
        n, tmp = self.name, self.tmp
        if n in ("cache-hit", "cache-miss", "nbd-remote", "clone-read", "clone-write"):
            nk = remotes.Nbdkit(tmp, self.img, name="remote")
            self.peers.append(nk)
            nk.start()
            self.remote_uri, self.server_pids = nk.uri, [nk.pid]
        elif n == "iscsi":
            tgt = remotes.Tgt(tmp)
            tgt.luns.append((1, self.img, False))
            self.peers.append(tgt)
            tgt.start()
            mrdsl = os.environ.get("CYCLES_TGT_MRDSL")
            if mrdsl:  # before anyone logs in: it is declared at login
                tgt.tgtadm("--op", "update", "--mode", "target", "--tid", "1", "--name",
                           "MaxRecvDataSegmentLength", "--value", mrdsl)
            self.remote_uri, self.server_pids = tgt.uri(), [tgt.pid]
        elif n == "nfs":
            rpc, gan = remotes.Rpcbind(tmp), remotes.Ganesha(tmp)
            os.replace(self.img, gan.file("img.raw"))
            self.img = gan.file("img.raw")
            self.peers += [rpc, gan]
            rpc.start()
            gan.start()
            self.remote_uri, self.server_pids = gan.v3_uri("img.raw"), [gan.pid]
        elif n == "aoe":
            net = remotes.AoeNet(mtu=9000).start()
            self.peers.append(net)
            vb = remotes.Vblade(tmp, net, self.img)
            self.peers.append(vb)
            vb.start()
            self.remote_uri, self.server_pids = vb.uri, [vb.pid]

    def teardown(self):
        for p in reversed(self.peers):
            p.close()

    def start_clone(self, variant):
        """clone-read / clone-write: one daemon with the base `golden` (cached,
        warmed by a full read), the clone `bench` and, for writes, `local`
        (file:// on a local copy); the peer variant measures the base (reads)
        or `local` (writes) in the same kind of daemon, its CPU as the
        server's."""
        tmp = self.tmp
        d = f"{tmp}/clone"
        shutil.rmtree(d, ignore_errors=True)
        binary = self.base if variant == "base" else self.binary
        gran = os.environ.get("CYCLES_GRANULARITY", "64k")
        before = ["--export", f"golden={self.remote_uri},cache={d}/cache"]
        extra = ["--data-dir", f"{d}/data"]  # a catalogue of its own
        if self.name == "clone-write":
            shutil.copy(self.img, f"{tmp}/local.raw")
            extra += ["--export", f"local=file://{tmp}/local.raw"]
        bw = Bw(binary, f"clone:golden,overlay={d}/overlays,granularity={gran}", tmp, extra, before)
        lib.run_child(["nbdcopy", "--requests=16", bw.uri.replace("/bench", "/golden"), "null:"])  # warm the base
        if variant != "peer":
            return bw.uri, bw.pid, [], bw.close
        peer = "/golden" if self.name == "clone-read" else "/local"
        return bw.uri.replace("/bench", peer), None, [bw.pid], bw.close

    def start(self, variant, test):
        n, tmp = self.name, self.tmp
        if n.startswith("clone-"):
            return self.start_clone(variant)
        if variant in ("bw", "base"):
            binary = self.base if variant == "base" else self.binary
            if n in ("file", "fuse"):
                extra = []
                if n == "fuse":
                    mnt = f"{tmp}/mnt-bw"
                    os.makedirs(mnt, exist_ok=True)
                    extra = ["--fuse-mount", mnt]
                bw = Bw(binary, f"file://{self.img}", tmp, extra)
                if n == "fuse":
                    wait_path(f"{mnt}/bench")
                    return f"{mnt}/bench", bw.pid, [], bw.close
                return bw.uri, bw.pid, [], bw.close
            if n in ("cache-hit", "cache-miss"):
                d = f"{tmp}/cache"
                shutil.rmtree(d, ignore_errors=True)
                bw = Bw(binary, f"{self.remote_uri},cache={d},mode=writethrough", tmp)
                if n == "cache-hit":
                    lib.run_child(["nbdcopy", "--requests=16", bw.uri, "null:"])  # warm it
                return bw.uri, bw.pid, self.server_pids, bw.close
            bw = Bw(binary, self.remote_uri, tmp)
            return bw.uri, bw.pid, self.server_pids, bw.close
        # the peer variant
        if n in ("file", "cache-hit", "fuse"):
            nk = remotes.Nbdkit(tmp, self.img, name="peer")
            nk.start()
            if n != "fuse":
                return nk.uri, None, [nk.pid], nk.close
            mnt = f"{tmp}/mnt-nbdfuse"
            os.makedirs(mnt, exist_ok=True)
            nf = subprocess.Popen(["nbdfuse", f"{mnt}/bench", nk.uri], stdout=subprocess.DEVNULL,
                                  stderr=open(f"{tmp}/nbdfuse.log", "a"))
            wait_path(f"{mnt}/bench")

            def close():
                subprocess.run(["fusermount3", "-u", mnt], stderr=subprocess.DEVNULL)
                lib.stop_child(nf)
                nk.close()
            return f"{mnt}/bench", None, [nk.pid, nf.pid], close
        if n == "cache-miss":
            bw = Bw(self.binary, self.remote_uri, tmp)
            return bw.uri, bw.pid, self.server_pids, bw.close
        if n == "nbd-remote":
            return self.remote_uri, None, self.server_pids, lambda: None
        if n in ("iscsi", "nfs"):
            return ("qemu", self.remote_uri), None, self.server_pids, lambda: None
        return None  # aoe: no other initiator here; vblade's CPU is in the bw rows


def wait_path(p, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(p):
            return
        time.sleep(0.05)
    raise SystemExit(f"{p} did not appear")


def run_path(path, reps, res):
    path.setup()
    try:
        variants = ["bw", "base", "peer"] if path.base else ["bw", "peer"]
        for r in range(reps):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                for t in path.tests:
                    started = path.start(v, t)
                    if started is None:
                        continue
                    target, bwpid, spids, close = started
                    try:
                        ps = lib.PerfStat(bwpid or spids, path.tmp, PEV)  # the peer's server when no blockwayd
                        rec = None
                        if os.environ.get("CYCLES_PERF") and (bwpid or path.name.startswith("clone-")):
                            data = f"{os.environ['CYCLES_PERF']}/{path.name}-{v}-{t}-r{r}.data"
                            rec = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "2000", "-o", data, "-p",
                                                    str(bwpid or spids[0])],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        b0, s0 = lib.cpu(bwpid), sum(lib.cpu(p) for p in spids)
                        try:
                            wall, ccpu, work = one_test(t, target, path.size, path.tmp)
                        except SystemExit as e:
                            if v != "peer":
                                raise
                            # a peer client that fails is reported, not fatal
                            ps.stop()
                            print(f"round {r} {path.name} peer {t}: {e}", flush=True)
                            continue
                        finally:
                            if rec:
                                rec.send_signal(signal.SIGINT)
                                rec.wait()
                        ev = ps.stop()
                        bcpu, scpu = lib.cpu(bwpid) - b0, sum(lib.cpu(p) for p in spids) - s0
                    finally:
                        close()
                    scale = 1e6 if t.startswith("rand") else 1.0  # us per request, s per GB
                    m = dict(rate=work / wall, bw=bcpu / work * scale, srv=scpu / work * scale,
                             cli=ccpu / work * scale, sys=ev[0] / work, cs=ev[1] / work)
                    res.setdefault((path.name, v, t), []).append(m)
                    print(f"round {r} {path.name:10s} {v:4s} {t:9s} " +
                          " ".join(f"{k} {x:.4g}" for k, x in m.items()), flush=True)
    finally:
        path.teardown()


def table(res, paths):
    out = ["| path | test | unit | blockwayd CPU | its server's CPU | client CPU | blockwayd syscalls/unit "
           "| ctx switches/unit | peer | peer server CPU | peer client CPU | peer server syscalls/unit "
           "| rate bw / peer | base build: blockwayd CPU | base syscalls/unit |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def med(key, k):
        ms = res.get(key)
        return statistics.median(m[k] for m in ms) if ms else None

    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"
    for p in paths:
        for t in ALL_TESTS:
            if (p.name, "bw", t) not in res:
                continue
            unit = "us/req" if t.startswith("rand") else "s/GB"
            b, pe, ba = (p.name, "bw", t), (p.name, "peer", t), (p.name, "base", t)
            ratio = None
            if med(pe, "rate"):
                ratio = med(b, "rate") / med(pe, "rate")
            # the peer variant of cache-miss is blockwayd itself, uncached
            peer_srv = med(pe, "bw") if p.name == "cache-miss" else med(pe, "srv")
            out.append(f"| {p.name} | {t} | {unit} | {f(med(b, 'bw'))} | {f(med(b, 'srv'))} | {f(med(b, 'cli'))} | "
                       f"{f(med(b, 'sys'), 1)} | {f(med(b, 'cs'), 2)} | {p.peer_label} | {f(peer_srv)} | "
                       f"{f(med(pe, 'cli'))} | {f(med(pe, 'sys'), 1)} | {f(ratio)} | {f(med(ba, 'bw'))} | {f(med(ba, 'sys'), 1)} |")
    return "\n".join(out)


def main():
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, FUSE, tgt, ganesha)")
    names = sys.argv[1:] or PATHS
    for n in names:
        if n not in PATHS:
            raise SystemExit(f"unknown path {n!r}; the paths: {' '.join(PATHS)}")
    if os.environ.get("CYCLES_NETNS") != "1":
        # Own network and mount namespace: rpcbind's socket lives in /run,
        # ganesha takes port 2049, FUSE mounts vanish with the namespace.
        os.environ["CYCLES_NETNS"] = "1"
        os.execvp("unshare", ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c",
                              'mount -t tmpfs t /run && mkdir -p /run/rpcbind && ip link set lo up && exec "$@"',
                              "sh", sys.executable, os.path.abspath(__file__)] + names)
    size = SETTINGS["SIZE_MIB"] << 20
    reps = SETTINGS["REPS"]
    tmp = tempfile.mkdtemp(dir=SETTINGS["TMPBASE"], prefix="cycles.")
    load0 = open("/proc/loadavg").read().split()[0]
    res, paths = {}, []
    try:
        binary, base = f"{tmp}/blockwayd", None
        shutil.copy(SETTINGS["BLOCKWAYD"], binary)
        if os.environ.get("CYCLES_BASE"):
            base = f"{tmp}/blockwayd-base"
            shutil.copy(os.environ["CYCLES_BASE"], base)
        subprocess.run(f"head -c {size} /dev/urandom > {tmp}/src.raw", shell=True, check=True)
        for n in names:
            img = f"{tmp}/{n}.raw"
            shutil.copy(f"{tmp}/src.raw", img)
            p = Path(n, binary, img, size, tmp, base)
            paths.append(p)
            run_path(p, reps, res)
            if os.path.exists(p.img):
                os.unlink(p.img)
    finally:
        subprocess.run(["rm", "-rf", tmp])
    load1 = open("/proc/loadavg").read().split()[0]
    head = (f"cycles.py {' '.join(names)}: {SETTINGS['SIZE_MIB']} MiB, {SETTINGS['RUNTIME']} s random runs, "
            f"{reps} round(s), medians; load average {load0} at the start, {load1} at the end; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    text = head + "\n\n" + table(res, paths) + "\n"
    print("\n" + text)
    if os.environ.get("CYCLES_OUT"):
        with open(os.environ["CYCLES_OUT"], "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
