#!/usr/bin/python3
"""Seed experiment 2 (issue 17): boot a VM from a remote image through
blockwayd, as the remote-disk cache papers measured it.

Usage: bench/seeds/boot.py            (BENCH_QUICK=1: one round)

The image (bench/seeds/build_boot_image.sh, built once and kept in
BENCH_SEEDS_BOOT_DIR, default /var/tmp/blockway-seeds-boot): Debian's cloud
kernel and an initramfs given to qemu with -kernel/-initrd, and a 1 GiB ext4
root disk with busybox and the kernel's module tree whose /sbin/init reads
its programs and every module file (what udev's coldplug and the services
do with a boot disk), prints SEEDS-BOOT-DONE on the serial console and
powers off; beside it 640 MiB of random data the boot never reads (an image
holds more than its boot needs, so a prefetch's order matters). qemu-system-x86_64 with TCG (no KVM here), 1 vCPU, 512 MiB,
virtio disk. The figure is the time from qemu's start to the marker; also
shown: the time from SEEDS-INIT-START (the root's init starts) to the
marker, the part of the boot that reads the disk (the kernel comes from
-kernel, and TCG makes its boot mostly CPU).

The remote is nbdkit's file plugin with --filter=delay rdelay=1ms wdelay=1ms
on loopback, serving a copy of the root disk. blockwayd exports it as
"boot" on a Unix socket and qemu attaches it as
nbd:unix:SOCK:exportname=boot. Boots, each round in this order:

  local       qemu on a local copy of the root disk (the ceiling)
  no cache    blockwayd boot=nbd://REMOTE: every read goes remote
  cold        a fresh cache (writethrough, prefetch off); this boot is also
              the recorded boot: blockwayd records the order of first reads
  hot-first   the cold round's cache emptied with its access profile kept
              (`blockway cache drop boot --keep-profile` after the recorded
              boot), and the same data dir restarted with prefetch=hot-first
  sequential  a fresh cache with prefetch=sequential

Targets: hot-first <= 1.2x local, and faster than the cold cache.
Knobs: BENCH_QUICK, BENCH_REPS (5), BENCH_DELAY (1ms), BLOCKWAYD, BLOCKWAY
(default: beside BLOCKWAYD), BENCH_TMPDIR, BENCH_SEEDS_BOOT_DIR. Writes bench/results/seeds-boot.md and
.png and the seeds:boot section of BENCHMARKS.md (not in quick mode).
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seedlib import Bench, bar_chart, die  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
b = Bench("boot", runtime=1, reps=5, size_mib=1024)
DELAY = os.environ.get("BENCH_DELAY", "1ms")
IMGDIR = os.environ.get("BENCH_SEEDS_BOOT_DIR", "/var/tmp/blockway-seeds-boot")
BOOT_TIMEOUT = 300
BLOCKWAY = os.environ.get("BLOCKWAY", os.path.join(os.path.dirname(os.path.abspath(b.blockwayd_orig)), "blockway"))
MARKER = b"SEEDS-BOOT-DONE"
INIT_MARKER = b"SEEDS-INIT-START"
for tool in ("nbdkit", "nbdinfo", "qemu-system-x86_64"):
    if subprocess.run(["sh", "-c", f"command -v {tool}"], stdout=subprocess.DEVNULL).returncode != 0:
        die(f"missing tool: {tool}")
if subprocess.run([os.path.join(HERE, "build_boot_image.sh"), IMGDIR]).returncode != 0:
    die("building the boot image failed")
KERNEL, INITRD, ROOT = (os.path.join(IMGDIR, f) for f in ("vmlinuz", "initrd.gz", "root.img"))
REMOTE_IMG = os.path.join(b.tmp, "remote.img")
LOCAL_IMG = os.path.join(b.tmp, "local.img")
subprocess.run(["cp", ROOT, REMOTE_IMG], check=True)
subprocess.run(["cp", ROOT, LOCAL_IMG], check=True)
IMG_BYTES = os.path.getsize(ROOT)


# no_timer_check: on a loaded host the TCG guest's timer interrupt check can
# fail ("IO-APIC + timer doesn't work", a panic); VMs skip it.
def boot(drive, tag, rnd):
    """Boots the VM on drive (qemu -drive file=...); (seconds to the marker,
    seconds from the init's start to the marker: the disk-reading phase)."""
    serial = os.path.join(b.tmp, f"serial.{tag}.{rnd}.log")
    t0 = time.time()
    q = b.start("qemu-" + tag, ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-display", "none",
                                "-no-reboot", "-monitor", "none", "-serial", f"file:{serial}",
                                "-kernel", KERNEL, "-initrd", INITRD,
                                "-append", "console=ttyS0 root=/dev/vda quiet panic=-1 no_timer_check",
                                "-drive", f"file={drive},format=raw,if=virtio"])
    took = init = None
    while time.time() - t0 < BOOT_TIMEOUT:
        out = open(serial, "rb").read() if os.path.exists(serial) else b""
        if init is None and INIT_MARKER in out:
            init = time.time() - t0
        if MARKER in out:
            took = time.time() - t0
            break
        if q.poll() is not None:
            break
        time.sleep(0.02)
    try:
        q.wait(30)
    except subprocess.TimeoutExpired:
        pass
    b.stop(q)
    if took is None:
        tail = open(serial, "rb").read()[-1500:].decode(errors="replace") if os.path.exists(serial) else ""
        die(f"{tag}: no {MARKER.decode()} within {BOOT_TIMEOUT} s (qemu status {q.returncode}); serial:\n{tail}")
    return took, took - (init if init is not None else took)


def start_remote():
    port = b.free_port()
    uri = f"nbd://127.0.0.1:{port}/"
    p = b.start("nbdkit", ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--filter=delay", "file",
                           REMOTE_IMG, f"rdelay={DELAY}", f"wdelay={DELAY}"])
    b.wait_nbd(uri, p)
    return p, uri


def start_bw(d, spec):
    os.makedirs(os.path.join(d, "cache"), exist_ok=True)
    sock = os.path.join(d, "nbd.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    spec = spec.replace("CACHE", os.path.join(d, "cache"))
    p = b.start("blockwayd", [b.blockwayd, "--listen", f"unix:{sock}", "--data-dir", os.path.join(d, "data"),
                              "--control-socket", os.path.join(d, "control.sock"), "--export", "boot=" + spec])
    b.wait_nbd(f"nbd+unix:///boot?socket={sock}", p)
    return p, f"nbd:unix:{sock}:exportname=boot"


def stop_bw(p):
    rc = b.stop(p, timeout=30)
    if rc != 0:
        die(f"blockwayd exited {rc} after SIGTERM:\n{b.tail(p)}")


def blockway(d, *args):
    r = subprocess.run([BLOCKWAY, *args, "--socket", os.path.join(d, "control.sock")], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    if r.returncode != 0:
        die(f"blockway {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def empty_cache_keep_profile(d):
    """The cache of export boot emptied with its access profile kept (the
    daemon that recorded the boot still running); returns the chunks the
    recorded boot read."""
    profile = json.loads(blockway(d, "profile", "show", "boot", "--json"))
    if not profile["sessions"]:
        die("the recorded boot left no access profile")
    blockway(d, "cache", "drop", "boot", "--keep-profile")
    return profile["sessions"][0]["chunks"]


def fetched(p):
    """The cache statistics blockwayd logs at shutdown and its prefetch's end."""
    lines = b.tail(p, 60).splitlines()
    hits = [ln.split("] ", 1)[-1] for ln in lines if "cache hits" in ln]
    done = [ln.split("prefetch done: ", 1)[-1] for ln in lines if "prefetch done" in ln]
    return (hits[-1] if hits else "") + (f"; prefetch done: {done[-1]}" if done else "")


stats = []


def measure(who, drive, tag, rnd):
    total, disk = boot(drive, tag, rnd)
    b.record(who, "boot_s", rnd, total)
    b.record(who, "init_s", rnd, disk)



for rnd in range(1, b.reps + 1):
    b.note_load()
    print(f"round {rnd}/{b.reps}", file=sys.stderr)
    measure("local", LOCAL_IMG, "local", rnd)
    rem, ruri = start_remote()
    d = os.path.join(b.tmp, f"nocache.{rnd}")
    bw, drive = start_bw(d, ruri)
    measure("no cache", drive, "nocache", rnd)
    stop_bw(bw)
    d = os.path.join(b.tmp, f"cold.{rnd}")
    bw, drive = start_bw(d, ruri + ",cache=CACHE")
    measure("cold cache", drive, "cold", rnd)
    profiled = empty_cache_keep_profile(d)
    stop_bw(bw)
    stats.append(f"round {rnd} cold: {fetched(bw)}")
    bw, drive = start_bw(d, ruri + ",cache=CACHE,prefetch=hot-first")
    measure("hot-first", drive, "hotfirst", rnd)
    stop_bw(bw)
    stats.append(f"round {rnd} hot-first ({profiled} chunks in the recorded boot's profile): {fetched(bw)}")
    d = os.path.join(b.tmp, f"seq.{rnd}")
    bw, drive = start_bw(d, ruri + ",cache=CACHE,prefetch=sequential")
    measure("sequential", drive, "seq", rnd)
    stop_bw(bw)
    stats.append(f"round {rnd} sequential: {fetched(bw)}")
    b.stop(rem)
    subprocess.run(["sh", "-c", f"rm -rf {b.tmp}/*.{rnd}"])

WHO = ["local", "no cache", "cold cache", "sequential", "hot-first"]
table = ["| boot from | s to the marker (median) | x local | runs | s from init start to marker (disk phase) | x local |",
         "| --- | ---: | ---: | --- | ---: | ---: |"]
d = b.data()
for w in WHO:
    r, _ = b.ratio((w, "boot_s"), ("local", "boot_s"))
    ri, _ = b.ratio((w, "init_s"), ("local", "init_s"))
    runs = ", ".join(f"{d[(w, 'boot_s')][k]:.1f}" for k in sorted(d[(w, "boot_s")]))
    table.append(f"| {w} | {b.med(w, 'boot_s'):.1f} | {r:.2f}x | {runs} | {b.med(w, 'init_s'):.2f} | {ri:.2f}x |")
hl, phl = b.ratio(("hot-first", "boot_s"), ("local", "boot_s"))
hc, phc = b.ratio(("hot-first", "boot_s"), ("cold cache", "boot_s"))
ttable = ["| target | of medians | median per round | goal | result |", "| --- | ---: | ---: | ---: | --- |",
          f"| hot-first / local | {hl:.2f}x | {phl:.2f}x | ≤ 1.2x | {'met' if hl <= 1.2 else 'missed'} |",
          f"| hot-first / cold cache | {hc:.2f}x | {phc:.2f}x | < 1.0x | {'met' if hc < 1.0 else 'missed'} |"]
png = b.out_name("png")
bar_chart(png, f"boot to marker, qemu TCG, remote {DELAY} delay, medians of {b.reps}",
          [("qemu start to the init's marker (lower is better)", "s", [(w, b.med(w, "boot_s")) for w in WHO]),
           ("init start to marker: the disk phase (lower is better)", "s",
            [(w, b.med(w, "init_s")) for w in WHO])])
machine = b.machine_lines([
    f"image: {IMGDIR} (build_boot_image.sh): Debian cloud kernel via -kernel/-initrd, {IMG_BYTES >> 20} MiB ext4 "
    "root (busybox + module tree, init reads every file, ~110 MB; 640 MiB of data the boot does not read)",
    f"qemu: {subprocess.run(['qemu-system-x86_64', '--version'], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]}, "
    "TCG, 1 vCPU, 512 MiB, virtio-blk",
    f"remote: nbdkit file + delay filter rdelay={DELAY} wdelay={DELAY}, loopback"])
report = ["# Seed experiment: boot from a remote image (bench/seeds/boot.py)", ""] + ["- " + l for l in machine] + \
    ["- " + b.load_line(), "", "## Results", ""] + table + ["", "## Targets", ""] + ttable + \
    ["", f"![chart]({os.path.basename(png)})", "", "## blockwayd cache statistics at shutdown", ""] + \
    ["    " + s for s in stats]
section = [
    "### Seed experiment: boot from a remote image: `bench/seeds/boot.py`", "",
    f"Run {machine[0][6:]}, {b.reps} round(s), {b.load_line()}. qemu TCG boots Debian's cloud kernel with a "
    f"{IMG_BYTES >> 20} MiB ext4 busybox root (init reads its programs and the module tree, ~110 MB, then "
    f"prints a marker; 640 MiB more that the boot does not read) from blockwayd (nbd:unix drive) over nbdkit + delay {DELAY}; hot-first after the cold boot "
    "recorded the read order (cache emptied, profile kept). "
    f"Full report: [bench/results/{os.path.basename(b.out_name('md'))}](bench/results/{os.path.basename(b.out_name('md'))}), "
    f"chart: [{os.path.basename(png)}](bench/results/{os.path.basename(png)}).", ""] + table + [""] + ttable
b.publish(report, section)
