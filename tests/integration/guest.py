"""A small Linux guest for tests that need kernel block devices.

The host kernel here cannot attach NBD devices (no nbd module), so those
tests boot Debian's linux-image-cloud-amd64 kernel (it has nbd.ko) under
qemu-system-x86_64 with TCG, from an initramfs built here: busybox-static,
the binaries the test names (blockwayd, blockway, fio, mkfs.ext4...) and the
shared libraries ldd finds for them. The kernel package is fetched with
`apt-get download` and unpacked into the cache (never installed on the
host). The base image is cached, keyed by the kernel package's version and
the hashes of every file packed; each run appends a tiny cpio with the test's
script (the kernel unpacks concatenated archives in order).

The guest runs the script as /test.sh under busybox sh with /dev, /proc,
/sys, a tmpfs /tmp and the nbd module loaded; it prints results on the
serial console as lines `@@RESULT <json>` and powers off. Every run is
bounded (qemu is killed by pid at the timeout).

Network: none, unless run() is given `forwards`: then the guest has a
virtio NIC on qemu's user network with restrict=on (it reaches nothing on
the host or beyond but what a forward names), the address 10.0.2.15/24, and
each forward is one qemu `guestfwd` rule: a TCP address in the guest's
network (10.0.2.100:10809) that qemu connects to a host command's
stdin/stdout, one process per connection (cmd:PATH ARGS), or to a host
loopback port (tcp:127.0.0.1:PORT: a chardev, so one connection at a time
and none after it closes). A relay command (`busybox nc 127.0.0.1 PORT`)
is how a guest daemon reaches a remote served on the host's loopback over
as many connections as it likes, without the guest getting any other way
out.

The shell helpers (PRELUDE) and the daemon's config (daemon_config) are
shared by the guest tests and bench/devices.py.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time

CACHE = os.environ.get("BLOCKWAY_GUEST_CACHE", "/var/tmp/blockway-guest")
KERNEL_PACKAGE = "linux-image-cloud-amd64"
QEMU = "qemu-system-x86_64"
RESULT = "@@RESULT "
# virtio-net and what it needs, in load order (Debian's cloud kernel has them as modules).
NET_MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "failover",
               "net_failover", "virtio_net"]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
# Only emergencies on the console: nbd's connection messages (a restart drops
# its sockets) would split our marker lines; dmesg still has them all.
echo 1 > /proc/sys/kernel/printk
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t tmpfs shm /dev/shm
mount -t tmpfs -o size=80% tmp /tmp
mkdir -p /run /var/tmp && mount -t tmpfs run /run
ip link set lo up
insmod /lib/modules/nbd.ko nbds_max=8 || echo "@@RESULT {\"init\": \"insmod nbd failed\"}"
if [ -e /etc/guest-net ]; then
  # qemu's user network (Guest.run with forwards): virtio-net, static address.
  for m in $(cat /lib/modules/net/order); do
    insmod /lib/modules/net/$m.ko || echo "@@RESULT {\"init\": \"insmod $m failed\"}"
  done
  i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 \
    || echo "@@RESULT {\"init\": \"no network\"}"
fi
echo "@@BOOTED $(cut -d' ' -f1 /proc/uptime)"
sh /test.sh
echo "@@RESULT {\"exit\": $?}"
sync
poweroff -f
"""


# Shell helpers for a guest script that runs blockwayd with /tmp/bw.toml
# (daemon_config): start (re)starts the daemon and waits for its pid file,
# bw is the blockway command on its control socket; the waits give up after
# 60 s and return non-zero.
PRELUDE = r"""
wait_file() { i=0; while [ ! -e "$1" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -e "$1" ]; }
wait_gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; ! kill -0 "$1" 2>/dev/null; }
# A daemon that cannot reach a remote at start exits 1; as systemd's
# Restart=on-failure would, start tries twice more, 1 s apart (the guestfwd
# path to the host's nbdkit refused a handshake once in CI right after a
# SIGKILL restart).
start() {
  n=0
  while :; do
    rm -f /run/bw.pid
    blockwayd --config /tmp/bw.toml --pid-file /run/bw.pid >> /tmp/daemon.log 2>&1 &
    pid=$!
    echo $pid > /run/bw.daemon
    i=0; while [ ! -e /run/bw.pid ] && kill -0 $pid 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
    [ -e /run/bw.pid ] && return 0
    n=$((n+1))
    if [ $n -ge 3 ] || kill -0 $pid 2>/dev/null; then
      echo "blockwayd did not start:"; tail -n 20 /tmp/daemon.log; return 1
    fi
    sleep 1
  done
}
bw() { blockway --socket /run/bw.sock "$@"; }
"""


def daemon_config(listen, tables):
    """Shell lines that write /tmp/bw.toml: the settings every guest daemon
    shares (data in /tmp/data, two threads, the control socket PRELUDE's bw
    uses), `listen` (a list of addresses) and `tables`, the TOML text of the
    script's [[export]] and [[device]] tables."""
    return ("mkdir -p /tmp/data\ncat > /tmp/bw.toml <<'EOF'\n"
            'data-dir = "/tmp/data"\nlisten = [%s]\nthreads = 2\n[control]\nsocket = "/run/bw.sock"\n%s\nEOF\n'
            % (", ".join('"%s"' % a for a in listen), tables.strip()))


def _cpio(root, out):
    """Writes the tree under `root` to the open file `out` as a newc cpio
    archive (what the kernel unpacks as an initramfs)."""
    ino = 1

    def entry(name, st, data=b""):
        nonlocal ino
        ino += 1
        fields = [ino, st.st_mode if st else 0, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        raw = hdr + name.encode() + b"\0"
        raw += b"\0" * (-len(raw) % 4)
        out.write(raw)
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for d, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(d, root)
        if rel != ".":
            entry(rel, os.lstat(d))
        for f in sorted(files):
            path = os.path.join(d, f)
            st = os.lstat(path)
            name = os.path.normpath(os.path.join(rel, f))
            if os.path.islink(path):
                entry(name, st, os.readlink(path).encode())
            else:
                with open(path, "rb") as fh:
                    entry(name, st, fh.read())
    entry("TRAILER!!!", None)


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def missing_tools():
    """What the host lacks to boot a guest (empty: nothing)."""
    need = [QEMU, "busybox", "apt-get", "dpkg-deb", "ldd", "objcopy"]
    return [t for t in need if not shutil.which(t) and not os.path.exists("/bin/" + t)]


def _kernel():
    """(vmlinuz, nbd.ko, {name: path} of NET_MODULES, version) from the cached
    kernel package."""
    policy = _run(["apt-cache", "depends", KERNEL_PACKAGE]).stdout
    pkg = next(line.split()[-1] for line in policy.splitlines()
               if "Depends:" in line and "linux-image" in line)
    root = os.path.join(CACHE, pkg)
    marker = os.path.join(root, ".unpacked")
    if not os.path.exists(marker):
        os.makedirs(root, exist_ok=True)
        dl = tempfile.mkdtemp(dir=CACHE)
        try:
            _run(["apt-get", "download", pkg], cwd=dl, timeout=600)
            deb = [f for f in os.listdir(dl) if f.endswith(".deb")][0]
            _run(["dpkg-deb", "-x", os.path.join(dl, deb), root], timeout=600)
            with open(marker, "w") as f:
                f.write(deb + "\n")
        finally:
            shutil.rmtree(dl, ignore_errors=True)
    with open(marker) as f:
        version = f.read().strip()
    vmlinuz = [os.path.join(root, "boot", f) for f in os.listdir(os.path.join(root, "boot"))
               if f.startswith("vmlinuz")][0]
    modules = {}
    for d, _, files in os.walk(os.path.join(root, "lib", "modules")):
        for f in files:
            if f.endswith(".ko") and f[:-3] in NET_MODULES + ["nbd"]:
                modules[f[:-3]] = os.path.join(d, f)
    missing = [m for m in NET_MODULES + ["nbd"] if m not in modules]
    if missing:
        raise RuntimeError(f"{pkg} lacks the modules {' '.join(missing)}")
    nbd = modules.pop("nbd")
    return vmlinuz, nbd, modules, version


def _libraries(paths):
    libs = set()
    for p in paths:
        out = subprocess.run(["ldd", p], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs.add(parts[2])
            elif parts and parts[0].startswith("/"):
                libs.add(parts[0])  # the dynamic loader
    return sorted(libs)


def _hash_files(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class Guest:
    """Builds (or reuses) the guest image for `binaries` ({name in /bin: host
    path}); run() boots it with a script."""

    def __init__(self, binaries, memory_mb=1024):
        self.memory_mb = memory_mb
        self.vmlinuz, self.nbd_ko, self.net_modules, self.kernel_version = _kernel()
        self.binaries = dict(binaries)
        self.binaries.setdefault("busybox", shutil.which("busybox") or "/bin/busybox")
        files = sorted(set(self.binaries.values()))
        # The names too: the same file under another name is another image.
        names = " ".join(sorted(self.binaries))
        key = hashlib.sha256((self.kernel_version + INIT + names + _hash_files(files + [self.nbd_ko] + [self.net_modules[m] for m in NET_MODULES])).encode()).hexdigest()[:16]
        self.base = os.path.join(CACHE, f"base-{key}.cpio")
        self.build_seconds = 0.0
        if not os.path.exists(self.base):
            start = time.monotonic()
            self._build_base()
            self.build_seconds = time.monotonic() - start

    def _build_base(self):
        os.makedirs(CACHE, exist_ok=True)
        root = tempfile.mkdtemp(dir=CACHE)
        try:
            for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib/modules", "etc", "proc", "sys", "dev", "tmp",
                      "root"):
                os.makedirs(os.path.join(root, d), exist_ok=True)
            for name, path in self.binaries.items():
                dst = os.path.join(root, "bin", name)
                if name == "busybox":
                    shutil.copy(path, dst)
                else:
                    # Debug info would make the image ten times larger.
                    _run(["objcopy", "--strip-debug", path, dst])
            for lib in _libraries([p for n, p in self.binaries.items() if n != "busybox"]):
                dst = os.path.join(root, lib.lstrip("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy(lib, dst)
            # /lib64 -> the loader's real directory, as on the host.
            shutil.copy(self.nbd_ko, os.path.join(root, "lib/modules/nbd.ko"))
            os.makedirs(os.path.join(root, "lib/modules/net"))
            for m in NET_MODULES:
                shutil.copy(self.net_modules[m], os.path.join(root, "lib/modules/net", m + ".ko"))
            with open(os.path.join(root, "lib/modules/net/order"), "w") as f:
                f.write(" ".join(NET_MODULES) + "\n")
            with open(os.path.join(root, "etc/passwd"), "w") as f:
                f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
            with open(os.path.join(root, "etc/group"), "w") as f:
                f.write("root:x:0:\nnogroup:x:65534:\n")
            init = os.path.join(root, "init")
            with open(init, "w") as f:
                f.write(INIT)
            os.chmod(init, 0o755)
            tmp = self.base + ".tmp"
            with open(tmp, "wb") as out:
                _cpio(root, out)
            os.rename(tmp, self.base)
            # Every rebuild of the binaries makes a new image: keep the newest few.
            bases = sorted((os.path.join(CACHE, f) for f in os.listdir(CACHE)
                            if f.startswith("base-") and f.endswith(".cpio")), key=os.path.getmtime)
            for old in bases[:-4]:
                os.unlink(old)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def run(self, script, timeout=600, files=None, smp=1, forwards=()):
        """Boots the guest with /test.sh = script (and `files`: {guest path:
        bytes}). `forwards`: qemu guestfwd rules, e.g.
        "tcp:10.0.2.100:10809-tcp:127.0.0.1:PORT" (see the module's head);
        with any, the guest has a network device. Returns (results: list of
        dicts, console text, seconds)."""
        work = tempfile.mkdtemp(prefix="blockway-guest-")
        proc = None
        try:
            extra = os.path.join(work, "extra")
            os.makedirs(extra)
            entries = {"test.sh": script.encode()}
            if forwards:
                entries["etc/guest-net"] = b"10.0.2.15/24\n"
            for path, data in (files or {}).items():
                entries[path.lstrip("/")] = data
            for rel, data in entries.items():
                dst = os.path.join(extra, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "wb") as f:
                    f.write(data)
                os.chmod(dst, 0o755)
            initrd = os.path.join(work, "initrd.cpio")
            shutil.copy(self.base, initrd)
            with open(initrd, "ab") as out:
                _cpio(extra, out)
            console = os.path.join(work, "console.log")
            cmd = [QEMU, "-machine", "q35,accel=tcg", "-cpu", "max", "-m", str(self.memory_mb), "-smp", str(smp),
                   "-kernel", self.vmlinuz, "-initrd", initrd,
                   "-append", "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
                   "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
                   "-no-reboot", "-nodefaults"]
            if forwards:
                # A comma inside an option value is written twice.
                rules = "".join(",guestfwd=" + f.replace(",", ",,") for f in forwards)
                cmd += ["-netdev", "user,id=net0,restrict=on" + rules,
                        "-device", "virtio-net-pci,netdev=net0,romfile="]
            else:
                cmd += ["-net", "none"]
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            seconds = time.monotonic() - start
            with open(console, errors="replace") as f:
                text = f.read()
            results = []
            for line in text.splitlines():
                at = line.find(RESULT)
                if at >= 0:
                    try:
                        results.append(json.loads(line[at + len(RESULT):]))
                    except ValueError:
                        results.append({"unparsed": line})
            return results, text, seconds
        finally:
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(work, ignore_errors=True)
