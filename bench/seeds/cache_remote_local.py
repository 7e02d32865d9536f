#!/usr/bin/python3
"""Seed experiment 1 (issue 17): 4k reads through the cache versus the remote
and versus local disk, as the remote-disk cache papers measured them.

Usage: bench/seeds/cache_remote_local.py      (BENCH_QUICK=1 for a smoke run)

The remote is nbdkit's file plugin behind --filter=delay rdelay=1ms
wdelay=1ms on loopback (a LAN-like disk server), the image random data in
page cache. Every configuration is a fresh blockwayd with export "bench":

  remote   bench=nbd://REMOTE            no cache: every request goes remote
  cold     bench=nbd://REMOTE,cache=DIR  a fresh (empty) cache, writethrough
  warm     the same daemon after the cold pass filled the whole cache
  wbl      bench=nbd://REMOTE,cache=DIR,mode=writeback-local, fresh cache
  local    bench=file:///COPY            a local copy (the local ceiling)

Tests (fio's nbd engine, QD16; nbdcopy --requests=64 --connections=4):
  seq 4k read     fio --rw=read --bs=4k, one pass over the image
  seq read        nbdcopy URI null:, one pass (large requests)
  rand 4k read    fio --rw=randread --bs=4k, timed (the cold figure is a
                  fresh cache filling as it goes)
  rand 4k write   fio --rw=randwrite --bs=4k, timed, no FLUSH: on a fresh
                  writeback-local cache every first touch of a chunk is a
                  first write (fetch-then-merge)
  seq 4k write    fio --rw=write --bs=4k, one pass, fresh cache, no FLUSH

Each round runs every configuration once in the same order, so drift on the
shared machine hits all alike; figures are medians, ratios both as a ratio of
medians and as the median of per-round ratios. Targets (issue 17): cold
sequential read >= 0.8x remote (the same read with no cache), both with 4k
requests and with nbdcopy's large ones; first 4k writes into a fresh
writeback-local cache >= 0.8x the local ceiling.

Knobs (bench/lib.sh): BENCH_QUICK, BENCH_REPS (3), BENCH_RUNTIME (8 s),
BENCH_SIZE_MIB (512; 64 quick), BENCH_DELAY (1ms), BLOCKWAYD, BENCH_TMPDIR;
BENCH_BASE=BINARY: a second blockwayd build (before a change) also runs the
cold nbdcopy read and the first sequential 4k writes in every round, each
right after BLOCKWAYD's (`empty cache, base build`), so a before/after pair
meets the same load. BENCH_ONLY=CONFIG,... runs only those configurations
(of remote, cold, cold-nbdcopy, cold-rand, wbl-rand, wbl-seq, local; the
base ones come with BENCH_BASE) and reports to seeds-cache-only.md and the
seeds:cache-only section instead, leaving the full table alone.
Writes bench/results/seeds-cache.md and .png and the seeds:cache section of
BENCHMARKS.md (quick runs: *-quick files, BENCHMARKS.md untouched).
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seedlib import Bench, bar_chart, die  # noqa: E402

if "BENCH_SIZE_MIB" not in os.environ and os.environ.get("BENCH_QUICK") == "1":
    os.environ["BENCH_SIZE_MIB"] = "64"
b = Bench("cache", runtime=8, reps=3, size_mib=512)
DELAY = os.environ.get("BENCH_DELAY", "1ms")
for tool in ("nbdkit", "nbdcopy", "nbdinfo", "fio"):
    if not subprocess.run(["sh", "-c", f"command -v {tool}"], stdout=subprocess.DEVNULL).returncode == 0:
        die(f"missing tool: {tool}")

IMG = os.path.join(b.tmp, "img.raw")
COPY = os.path.join(b.tmp, "copy.raw")
print(f"creating a {b.size_mib} MiB random image in {b.tmp} ...", file=sys.stderr)
with open(IMG, "wb") as f:
    for _ in range(b.size_mib):
        f.write(os.urandom(1 << 20))
subprocess.run(["cp", IMG, COPY], check=True)
subprocess.run(["sync"])


def start_remote():
    port = b.free_port()
    uri = f"nbd://127.0.0.1:{port}/"
    p = b.start("nbdkit", ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--filter=delay", "file", IMG,
                           f"rdelay={DELAY}", f"wdelay={DELAY}"])
    b.wait_nbd(uri, p)
    return p, uri


BASE = None
if os.environ.get("BENCH_BASE"):
    BASE = os.path.join(b.tmp, "blockwayd-base")   # a private copy, as Bench makes of BLOCKWAYD
    subprocess.run(["cp", os.environ["BENCH_BASE"], BASE], check=True)


def start_bw(tag, spec, binary=None):
    d = os.path.join(b.tmp, tag)
    subprocess.run(["rm", "-rf", d])
    os.makedirs(os.path.join(d, "cache"))
    port = b.free_port()
    spec = spec.replace("CACHE", os.path.join(d, "cache"))
    p = b.start("blockwayd-" + tag, [binary or b.blockwayd, "--listen", f"127.0.0.1:{port}", "--data-dir",
                                      os.path.join(d, "data"), "--control-socket", "off",
                                      "--export", "bench=" + spec])
    uri = f"nbd://127.0.0.1:{port}/bench"
    b.wait_nbd(uri, p)
    return p, uri


def stop(*procs):
    for p in procs:
        rc = b.stop(p)
        if "blockwayd" in str(p.args[0]) and rc != 0:
            die(f"blockwayd exited {rc} after SIGTERM")


def every_test(who, uri, rnd):
    """The five tests in a row on one export (no cache: nothing to warm)."""
    b.record(who, "seq4k_read", rnd, b.fio(uri, "read", "4k", timed=False)[1])
    b.record(who, "seq_read", rnd, b.nbdcopy(uri))
    b.record(who, "rand4k_read", rnd, b.fio(uri, "randread", "4k")[0])
    b.record(who, "rand4k_write", rnd, b.fio(uri, "randwrite", "4k")[0])
    b.record(who, "seq4k_write", rnd, b.fio(uri, "write", "4k", timed=False)[1])


def config(rnd, name):
    if name == "local":
        bw, uri = start_bw(name, f"file://{COPY}")
        every_test("local", uri, rnd)
        stop(bw)
        return
    rem, ruri = start_remote()
    if name == "remote":
        bw, uri = start_bw(name, ruri)
        every_test("remote", uri, rnd)
        stop(bw)
    elif name == "cold":   # one pass fills the cache: then it is warm
        bw, uri = start_bw(name, ruri + ",cache=CACHE")
        b.record("cold", "seq4k_read", rnd, b.fio(uri, "read", "4k", timed=False)[1])
        if rnd == 1:   # not timed: what the cache serves is the remote's bytes
            got = subprocess.run(["nbdcopy", uri, "-"], stdout=subprocess.PIPE).stdout
            if got != open(IMG, "rb").read():
                die("data read through the cache differs from the image")
        b.record("warm", "seq4k_read", rnd, b.fio(uri, "read", "4k", timed=False)[1])
        b.record("warm", "seq_read", rnd, b.nbdcopy(uri))
        b.record("warm", "rand4k_read", rnd, b.fio(uri, "randread", "4k")[0])
        stop(bw)
    elif name == "cold-nbdcopy":
        bw, uri = start_bw(name, ruri + ",cache=CACHE")
        b.record("cold", "seq_read", rnd, b.nbdcopy(uri))
        stop(bw)
    elif name == "cold-nbdcopy-base":
        bw, uri = start_bw(name, ruri + ",cache=CACHE", BASE)
        b.record("cold-base", "seq_read", rnd, b.nbdcopy(uri))
        stop(bw)
    elif name == "cold-rand":
        bw, uri = start_bw(name, ruri + ",cache=CACHE")
        b.record("cold", "rand4k_read", rnd, b.fio(uri, "randread", "4k")[0])
        stop(bw)
    elif name == "wbl-rand":
        bw, uri = start_bw(name, ruri + ",cache=CACHE,mode=writeback-local")
        b.record("wbl", "rand4k_write", rnd, b.fio(uri, "randwrite", "4k")[0])
        stop(bw)
    elif name == "wbl-seq":
        bw, uri = start_bw(name, ruri + ",cache=CACHE,mode=writeback-local")
        b.record("wbl", "seq4k_write", rnd, b.fio(uri, "write", "4k", timed=False)[1])
        stop(bw)
    elif name == "wbl-seq-base":
        bw, uri = start_bw(name, ruri + ",cache=CACHE,mode=writeback-local", BASE)
        b.record("wbl-base", "seq4k_write", rnd, b.fio(uri, "write", "4k", timed=False)[1])
        stop(bw)
    stop(rem)
    subprocess.run(["rm", "-rf", os.path.join(b.tmp, name)])
    subprocess.run(["sync"])   # flush dirty pages now, not in the next test


CONFIGS = ["remote", "cold", "cold-nbdcopy", "cold-rand", "wbl-rand", "wbl-seq", "local"]
ONLY = [c for c in os.environ.get("BENCH_ONLY", "").split(",") if c]
for c in ONLY:
    if c not in CONFIGS:
        die(f"BENCH_ONLY: unknown configuration {c!r} (of {', '.join(CONFIGS)})")
if ONLY:
    CONFIGS = [c for c in CONFIGS if c in ONLY]
if BASE:
    for c in ("cold-nbdcopy", "wbl-seq"):
        if c in CONFIGS:
            CONFIGS.insert(CONFIGS.index(c) + 1, c + "-base")
for rnd in range(1, b.reps + 1):
    b.note_load()
    for c in CONFIGS:
        print(f"round {rnd}/{b.reps}: {c}", file=sys.stderr)
        config(rnd, c)
        # the local copy was written: restore it so every round reads the same
    subprocess.run(["cp", IMG, COPY], check=True)

# ---- report ------------------------------------------------------------------
WHO = [("remote", "remote, no cache"), ("cold", "empty cache"), ("warm", "warm cache"),
       ("wbl", "empty cache, writeback-local"), ("local", "local file")]
if BASE:
    WHO.insert(2, ("cold-base", "empty cache, base build"))
    WHO.insert(WHO.index(("wbl", "empty cache, writeback-local")) + 1,
               ("wbl-base", "empty cache, writeback-local, base build"))
TESTS = [("seq4k_read", "seq 4k read MB/s (fio QD16, one pass)"),
         ("seq_read", "seq read MB/s (nbdcopy, one pass)"),
         ("rand4k_read", "rand 4k read IOPS (fio QD16)"),
         ("rand4k_write", "rand 4k write IOPS (fio QD16, no flush)"),
         ("seq4k_write", "seq 4k write MB/s (fio QD16, one pass, no flush)")]


def cell(who, test):
    v = b.med(who, test)
    return "–" if v is None else f"{v:.0f}"


table = ["| test | " + " | ".join(w[1] for w in WHO) + " |", "| --- |" + " ---: |" * len(WHO)]
for t, label in TESTS:
    if t == "rand4k_write" or t == "seq4k_write":
        row = [cell(w, t) if w not in ("cold", "cold-base", "warm") else "–" for w, _ in WHO]
    else:
        row = [cell(w, t) for w, _ in WHO]
    table.append(f"| {label} | " + " | ".join(row) + " |")

TARGETS = [("cold seq 4k read / remote without cache", ("cold", "seq4k_read"), ("remote", "seq4k_read"), 0.8),
           ("first rand 4k writes, writeback-local / local file", ("wbl", "rand4k_write"), ("local", "rand4k_write"), 0.8),
           ("first seq 4k writes, writeback-local / local file", ("wbl", "seq4k_write"), ("local", "seq4k_write"), 0.8),
           ("first seq 4k writes, writeback-local, base build / local file", ("wbl-base", "seq4k_write"),
            ("local", "seq4k_write"), None),
           ("first seq 4k writes, writeback-local, this build / base build", ("wbl", "seq4k_write"),
            ("wbl-base", "seq4k_write"), None),
           ("cold seq read (nbdcopy) / remote without cache", ("cold", "seq_read"), ("remote", "seq_read"), 0.8),
           ("cold seq read (nbdcopy), base build / remote without cache", ("cold-base", "seq_read"),
            ("remote", "seq_read"), None),
           ("cold seq read (nbdcopy), this build / base build", ("cold", "seq_read"), ("cold-base", "seq_read"), None),
           ("cold rand 4k read / remote without cache", ("cold", "rand4k_read"), ("remote", "rand4k_read"), None),
           ("warm rand 4k read / local file", ("warm", "rand4k_read"), ("local", "rand4k_read"), None),
           ("warm seq 4k read / local file", ("warm", "seq4k_read"), ("local", "seq4k_read"), None)]
ttable = ["| ratio | of medians | median per round | goal | result |", "| --- | ---: | ---: | ---: | --- |"]
for label, x, y, goal in TARGETS:
    r, pr = b.ratio(x, y)
    if r is None:
        continue
    res = "–" if goal is None else ("met" if r >= goal else "missed")
    ttable.append(f"| {label} | {r:.2f}x | {pr:.2f}x | {'≥ ' + str(goal) + 'x' if goal else '–'} | {res} |")

OUT = "cache-only" if ONLY else None   # BENCH_ONLY: its own report and section
png = b.out_name("png", OUT)
bar_chart(png, f"blockwayd cache vs remote ({DELAY} delay) vs local file, {b.size_mib} MiB, medians of {b.reps}",
          [(label, label.split(" (")[0].split()[-1], [(w[1], b.med(w[0], t)) for w in WHO if b.med(w[0], t) is not None])
           for t, label in TESTS])
machine = b.machine_lines([f"remote: nbdkit file plugin + delay filter rdelay={DELAY} wdelay={DELAY}, loopback"])
report = ["# Seed experiment: cache vs remote vs local (bench/seeds/cache_remote_local.py)", ""] + \
    ["- " + l for l in machine] + ["- " + b.load_line(), "", "## Results (median)", ""] + table + \
    ["", "## Ratios", ""] + ttable + ["", f"![chart]({os.path.basename(png)})", "", "## All runs", ""] + b.all_runs_table()
section = [
    "### Seed experiment: cache vs remote vs local: `bench/seeds/cache_remote_local.py`" +
    (f" (BENCH_ONLY={','.join(ONLY)}" + (", BENCH_BASE" if BASE else "") + ")" if ONLY else ""), "",
    f"Run {machine[0][6:]}, {b.reps} rounds, {b.size_mib} MiB image, {b.load_line()}. "
    f"Remote: nbdkit file + delay filter ({DELAY} read and write) on loopback; each column a fresh "
    "blockwayd (`remote`: no cache; `empty`/`warm`: cache, writethrough; `writeback-local`: fresh cache; "
    "`local`: file export of a local copy). fio nbd engine QD16, nbdcopy for large reads, no flush. "
    f"Full report: [bench/results/{os.path.basename(b.out_name('md', OUT))}](bench/results/{os.path.basename(b.out_name('md', OUT))}), "
    f"chart: [{os.path.basename(png)}](bench/results/{os.path.basename(png)}).", ""] + table + [""] + ttable
b.publish(report, section, name=OUT)
