#!/usr/bin/python3
"""A/B of the cold-cache read path (issue 17): nbdcopy through an empty
cache over a remote with added delay, against the same read through
blockwayd without a cache, for one or two blockwayd builds.

Usage (as root):  bench/cache_miss_ab.py REPS NEW_BINARY [BASE_BINARY]

Remote: nbdkit's file plugin on a random image in page cache, behind
--filter=delay rdelay=BENCH_DELAY (1ms) on loopback. Variants, each a fresh
blockwayd with export `bench` and a fresh cache directory:
  remote     NEW_BINARY, bench=nbd://REMOTE (no cache)
  cold       NEW_BINARY, bench=nbd://REMOTE,cache=DIR (writethrough, empty)
  cold-base  BASE_BINARY, the same (when given)
One pass of nbdcopy --requests=64 --connections=4 URI null: per variant and
round; the order rotates by one each round (A B C, B C A, C A B, ...), so
every variant runs in every position and after every other one alike: the
run after a cold one is cheaper (its deleted 512 MiB cache file leaves free
pages to the next writer; measured: a fixed order made the same build look
40 % cheaper or dearer by position), and the load of this shared machine
hits them alike. Use a multiple of the number of variants as REPS. Measured: MB/s, and blockwayd's
CPU (utime + stime from /proc/PID/stat) in CPU-s per GB. Figures: medians,
and the ratio cold / remote (the issue's target: >= 0.8x) as a ratio of
medians and the median of the per-round ratios.

Environment: BENCH_SIZE_MIB (512), BENCH_DELAY (1ms), BENCH_TMPDIR (/var/tmp:
the cache file lives on disk, as a user's would). Prints a Markdown table.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def wait_nbd(uri, p, seconds=20):
    end = time.time() + seconds
    while time.time() < end:
        if p.poll() is not None:
            sys.exit(f"{p.args[0]} exited {p.returncode}")
        if subprocess.run(["nbdinfo", "--size", uri], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0:
            return
        time.sleep(0.1)
    sys.exit(f"{uri} did not come up")


def stop(p):
    p.terminate()
    try:
        return p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    reps = int(sys.argv[1])
    if reps < 1:
        sys.exit("REPS must be at least 1")
    size_mib = int(os.environ.get("BENCH_SIZE_MIB", "512"))
    delay = os.environ.get("BENCH_DELAY", "1ms")
    tmp = tempfile.mkdtemp(prefix="cache-miss-ab.", dir=os.environ.get("BENCH_TMPDIR", "/var/tmp"))
    binaries = {}
    for label, path in (("new", sys.argv[2]), ("base", sys.argv[3] if len(sys.argv) == 4 else None)):
        if path is None:
            continue
        if not os.access(path, os.X_OK):
            sys.exit(f"not an executable: {path}")
        binaries[label] = os.path.join(tmp, f"blockwayd-{label}")  # private copies: a rebuild cannot mix versions
        shutil.copy2(path, binaries[label])
    variants = [("remote", "new", False), ("cold", "new", True)]
    if "base" in binaries:
        variants.append(("cold-base", "base", True))
    img = os.path.join(tmp, "img.raw")
    with open(img, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    rport = free_port()
    remote = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(rport), "--filter=delay", "file", img,
                               f"rdelay={delay}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ruri = f"nbd://127.0.0.1:{rport}/"
    rows = {}  # (variant, round) -> (MB/s, CPU-s/GB)
    try:
        wait_nbd(ruri, remote)
        for rnd in range(reps):
            k = rnd % len(variants)
            order = variants[k:] + variants[:k]
            for name, which, cached in order:
                d = os.path.join(tmp, name)
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                spec = ruri + (f",cache={d}/cache" if cached else "")
                port = free_port()
                bw = subprocess.Popen([binaries[which], "--listen", f"127.0.0.1:{port}", "--data-dir", f"{d}/data",
                                       "--control-socket", "off", "--log-level", "warn", "--export", "bench=" + spec],
                                      stdout=subprocess.DEVNULL, stderr=open(f"{d}/log", "w"))
                uri = f"nbd://127.0.0.1:{port}/bench"
                wait_nbd(uri, bw)
                c0, t0 = cpu_seconds(bw.pid), time.monotonic()
                subprocess.run(["nbdcopy", "--requests=64", "--connections=4", uri, "null:"], check=True)
                t1, c1 = time.monotonic(), cpu_seconds(bw.pid)
                if stop(bw) != 0:
                    sys.exit(f"blockwayd ({name}) exited {bw.returncode}: {open(f'{d}/log').read()[-600:]}")
                gb = size_mib / 1024
                rows[(name, rnd)] = (size_mib * 1.048576 / (t1 - t0), (c1 - c0) / gb)
                print(f"round {rnd} {name:9} {rows[(name, rnd)][0]:8.1f} MB/s {rows[(name, rnd)][1]:6.2f} CPU-s/GB",
                      file=sys.stderr)
                shutil.rmtree(d, ignore_errors=True)
                subprocess.run(["sync"])
    finally:
        stop(remote)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name, k):
        return statistics.median(rows[(name, r)][k] for r in range(reps))

    load = open("/proc/loadavg").read().split()[:3]
    print(f"cache_miss_ab.py: {size_mib} MiB, delay {delay}, {reps} rounds, medians; load at end {' '.join(load)}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| variant | MB/s | blockwayd CPU-s/GB | x remote (of medians) | x remote (median per round) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, _, _ in variants:
        per = statistics.median(rows[(name, r)][0] / rows[("remote", r)][0] for r in range(reps))
        print(f"| {name} | {med(name, 0):.0f} | {med(name, 1):.2f} | {med(name, 0) / med('remote', 0):.2f}x | "
              f"{per:.2f}x |")


if __name__ == "__main__":
    main()
