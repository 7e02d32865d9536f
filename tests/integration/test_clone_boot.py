"""VMs boot from clones of one golden image (issue 18: "a VM boots from a
clone (qemu nbd:// drive)").

The golden image is a bootable ext4 root (bench/seeds/build_boot_image.sh:
Debian's cloud kernel given to qemu with -kernel, a busybox initramfs that
mounts /dev/vda, and an init that reads its programs and every module file
as a boot does). It lives on an nbdkit remote (every request logged) behind
a cached base export; two clones of it boot at once in qemu (TCG) from
`nbd://` drives. With seeds_id=NAME on its kernel command line each VM
remounts its root read-write and writes its own name and 1 MiB of its own
data, as a booted system writes to its disk.

- both VMs reach the end of their boot, and each wrote its own name;
- the remote was asked for each byte at most once in all (one shared cache
  serves both boots), and the golden image is unchanged;
- each clone's disk holds its own writes (read back through the daemon and
  inspected with debugfs) and not the other's;
- after a daemon restart, vm1 boots again and finds the name its first boot
  wrote: a clone's overlay is its persistent disk.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import harness  # noqa: E402
import remotes  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_IMAGE = os.path.join(HERE, "..", "..", "bench", "seeds", "build_boot_image.sh")
IMAGE_DIR = os.environ.get("BLOCKWAY_CLONE_BOOT_DIR", "/var/tmp/blockway-clone-boot")
# A TCG boot reads ~100 MB; under the sanitizer build and a loaded CI
# machine two boots at once take a few minutes at worst.
BOOT_TIMEOUT = float(os.environ.get("CLONE_BOOT_TIMEOUT", "420"))
DONE = b"SEEDS-BOOT-DONE"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_file(path):
    """The bytes of path, or b"" before it exists."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def intervals_read(log):
    """(offset, count) of every Read in nbdkit's request log."""
    return [(int(o, 0), int(c, 0)) for o, c in re.findall(r" Read id=\d+ offset=(\S+) count=(\S+)", log)]


class CloneBootTest(control_common.ControlTestCase):
    @classmethod
    def setUpClass(cls):
        for tool in ("qemu-system-x86_64", "nbdkit", "debugfs", "mkfs.ext4"):
            if not harness.have(tool):
                raise unittest.SkipTest("needs " + tool)
        # Builds once per machine (the kernel package is fetched with
        # apt-get download, never installed); later runs reuse it.
        env = dict(os.environ, ROOT_MIB="192", FILLER_MIB="8")
        p = subprocess.run([BUILD_IMAGE, IMAGE_DIR], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=900)
        if p.returncode != 0:
            raise AssertionError("building the boot image failed:\n" + p.stdout.decode(errors="replace")[-3000:])
        cls.kernel, cls.initrd, cls.root = (os.path.join(IMAGE_DIR, f) for f in ("vmlinuz", "initrd.gz", "root.img"))

    def setUp(self):
        super().setUp()
        self.golden = self.path("golden.img")
        subprocess.run(["cp", "--sparse=always", self.root, self.golden], check=True)
        self.golden_sha = sha256(self.golden)
        self.remote = remotes.started(self, remotes.Nbdkit(self.tmp, self.golden, log_requests=True))

    def start_clones(self):
        overlays = self.path("overlays")
        return self.start({"golden": self.remote.uri + ",cache=" + self.path("cache"),
                           "vm1": "clone:golden,granularity=64k,overlay=" + overlays,
                           "vm2": "clone:golden,granularity=64k,overlay=" + overlays})

    def boot(self, export, seeds_id):
        """Starts qemu on nbd://.../export; returns (process, serial log path)."""
        serial = self.path("serial.%s.%s.log" % (export, seeds_id))
        # no_timer_check: on a loaded host the TCG guest's timer check can fail.
        args = ["qemu-system-x86_64", "-accel", "tcg", "-m", "384", "-smp", "1", "-display", "none",
                "-no-reboot", "-monitor", "none", "-serial", "file:" + serial,
                "-kernel", self.kernel, "-initrd", self.initrd,
                "-append", "console=ttyS0 root=/dev/vda quiet panic=-1 no_timer_check seeds_id=" + seeds_id,
                "-drive", "file=nbd://127.0.0.1:%d/%s,format=raw,if=virtio,cache=none" % (self.port, export)]
        with open(serial + ".stderr", "wb") as err:
            q = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.addCleanup(self.stop_qemu, q)
        return q, serial

    @staticmethod
    def stop_qemu(q):
        if q.poll() is None:
            q.kill()
            q.wait(10)

    def wait_booted(self, boots):
        """Waits until every (process, serial) reached the end of its boot and
        powered off; returns the serial logs."""
        deadline = time.time() + BOOT_TIMEOUT
        logs = {}
        while len(logs) < len(boots) and time.time() < deadline:
            for q, serial in boots:
                if serial in logs:
                    continue
                out = read_file(serial)
                if DONE in out and q.poll() is not None:
                    logs[serial] = out.decode(errors="replace")
                elif q.poll() is not None and DONE not in out:
                    self.fail("qemu exited (%s) before the end of its boot; serial:\n%s\nstderr:\n%s"
                              % (q.returncode, out.decode(errors="replace")[-3000:],
                                 read_file(serial + ".stderr").decode(errors="replace")[-2000:]))
            time.sleep(0.1)
        for q, serial in boots:
            if serial not in logs:
                out = read_file(serial)
                self.fail("no %s within %d s; serial:\n%s" % (DONE.decode(), BOOT_TIMEOUT,
                                                               out.decode(errors="replace")[-3000:]))
        return [logs[serial] for _, serial in boots]

    def disk_file(self, export, path):
        """The content of `path` in the ext4 root on export (read through the
        daemon into a copy, then debugfs)."""
        copy = self.path(export + ".copy.img")
        subprocess.run(["nbdcopy", self.uri(export), copy], check=True, timeout=300)
        p = subprocess.run(["debugfs", "-R", "cat " + path, copy], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        os.unlink(copy)
        return p.stdout

    def test_two_clones_boot_at_once_then_one_reboots(self):
        d = self.start_clones()
        logs = self.wait_booted([self.boot("vm1", "vm1"), self.boot("vm2", "vm2")])
        for name, log in zip(("vm1", "vm2"), logs):
            self.assertIn("SEEDS-WROTE-ID=" + name, log)
            self.assertNotIn("SEEDS-REMOUNT-FAILED", log)
            self.assertNotIn("SEEDS-PREVIOUS-ID", log, "a fresh clone has no earlier boot")
            self.assertNotRegex(log, r"(?i)I/O error|EXT4-fs error")

        # One shared cache: no byte of the golden image was fetched twice.
        reads = sorted(intervals_read(read_file(self.remote.requests_log).decode()))
        self.assertTrue(reads, "the boots read nothing from the remote")
        for (o1, c1), (o2, _) in zip(reads, reads[1:]):
            self.assertLessEqual(o1 + c1, o2, "bytes %d..%d fetched twice" % (o2, o1 + c1))
        fetched = sum(c for _, c in reads)
        self.assertGreater(fetched, 50 * harness.MiB, "a boot reads its modules: %d bytes fetched" % fetched)
        by_name = {e["name"]: e for e in self.bwj("status")["exports"]}
        self.assertEqual(by_name["golden"]["base_of_clones"], 2)
        for name in ("vm1", "vm2"):
            clone = self.bwj("stats", name)["clone"]
            self.assertGreater(clone["allocated_bytes"], 1 * harness.MiB, name + " took the VM's writes")
            self.assertGreater(clone["base_read_bytes"], 50 * harness.MiB, name + " booted from the base")

        # Each clone holds its own writes, and not the other's.
        self.assertEqual(self.disk_file("vm1", "/etc/seeds-id"), b"vm1\n")
        self.assertEqual(self.disk_file("vm2", "/etc/seeds-id"), b"vm2\n")
        self.assertEqual(len(self.disk_file("vm1", "/var/lib/vm1.bin")), 1 * harness.MiB)
        self.assertEqual(self.disk_file("vm1", "/var/lib/vm2.bin"), b"")
        self.assertEqual(self.disk_file("vm2", "/var/lib/vm1.bin"), b"")

        # The clone is a persistent disk: after a restart vm1 boots again and
        # finds what its first boot wrote.
        d.send_signal(signal.SIGTERM)
        d.wait(60)
        self.start_clones()
        (log,) = self.wait_booted([self.boot("vm1", "again")])
        self.assertIn("SEEDS-PREVIOUS-ID=vm1", log)
        self.assertIn("SEEDS-WROTE-ID=again", log)
        self.assertEqual(self.disk_file("vm1", "/etc/seeds-id"), b"again\n")
        self.assertEqual(self.disk_file("vm2", "/etc/seeds-id"), b"vm2\n")

        # The golden image never changed.
        self.assertEqual(sha256(self.golden), self.golden_sha)


if __name__ == "__main__":
    unittest.main()
