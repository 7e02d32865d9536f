"""The FUSE front end: every export as a file under --fuse-mount.

Real clients only: the kernel's loop driver and ext4 on the FUSE file,
fsck.ext4, sqlite3, qemu-img, fio, fallocate/lseek, and NBD (libnbd,
nbdinfo) on the same export at the same time. Loop devices and mounts are
global: each test detaches and unmounts what it created, by the device it
got, in cleanups that run even when the test fails.
"""

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402

SIZE = 64 * MiB


def mounted(path):
    """Is path a mount point now (from /proc/self/mountinfo)?"""
    real = os.path.realpath(path) if os.path.exists(path) else path
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt in (path, real):
                return True
    return False


def sha256_file(path, chunk=MiB):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_nbd(uri, size, chunk=MiB):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        d = hashlib.sha256()
        for off in range(0, size, chunk):
            d.update(h.pread(min(chunk, size - off), off))
        return d.hexdigest()
    finally:
        h.shutdown()


nbd_map, type_at = harness.nbd_map, harness.type_at


class FuseTestCase(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.mnt = self.path("mnt")
        os.mkdir(self.mnt)
        # Registered first, so it runs after every daemon was killed: a
        # daemon killed by cleanup leaves its mount behind.
        self.addCleanup(self.force_unmount, self.mnt)

    # --- global resources, always released -------------------------------

    def force_unmount(self, path):
        for _ in range(50):
            if not mounted(path):
                return
            subprocess.run(["umount", "-l", path], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
        raise AssertionError("could not unmount " + path)

    def losetup(self, path):
        dev = harness.run(["losetup", "-f", "--show", path], timeout=30).stdout.decode().strip()
        self.assertTrue(dev.startswith("/dev/loop"), dev)
        self.addCleanup(self.detach_loop, dev)
        return dev

    def detach_loop(self, dev):
        subprocess.run(["losetup", "-d", dev], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)

    def mount_ext4(self, dev, where):
        os.makedirs(where, exist_ok=True)
        harness.run(["mount", "-t", "ext4", dev, where], timeout=60)
        self.addCleanup(self.force_unmount, where)

    # --- daemon ---------------------------------------------------------

    def fuse_daemon(self, exports, fuse_opts="", extra=(), name="blockwayd"):
        """exports: {name: '--export' spec after NAME=}; also serves NBD."""
        self.port = harness.free_port()
        args = ["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port,
                "--fuse-mount", self.mnt + ("," + fuse_opts if fuse_opts else "")]
        for ename, spec in exports.items():
            args += ["--export", "%s=%s" % (ename, spec)]
        args += list(extra)
        d = self.start_daemon(args, name)
        harness.wait_until(lambda: mounted(self.mnt), 10, what="FUSE mount")
        return d

    def file(self, export):
        return os.path.join(self.mnt, export)

    def image(self, name="disk.img", size=SIZE, random_data=False):
        p = self.path(name)
        if random_data:
            return harness.make_random_image(p, size, seed=3)
        return harness.make_sparse_image(p, size)


class FuseFileTest(FuseTestCase):
    def test_listing_attributes_and_options(self):
        rw = self.image("rw.img")
        ro = self.image("ro.img", 8 * MiB)
        self.fuse_daemon({"rw": "file://" + rw, "ro": "file://%s,read-only=on" % ro},
                         fuse_opts="mode=0640,uid=1234,gid=4321")
        self.assertEqual(sorted(os.listdir(self.mnt)), ["ro", "rw"])
        st = os.stat(self.file("rw"))
        self.assertEqual(st.st_size, SIZE)
        self.assertEqual(st.st_mode & 0o7777, 0o640)
        self.assertEqual((st.st_uid, st.st_gid), (1234, 4321))
        self.assertTrue(abs(st.st_mtime - time.time()) < 60)
        st = os.stat(self.file("ro"))
        self.assertEqual(st.st_size, 8 * MiB)
        self.assertEqual(st.st_mode & 0o7777, 0o440)
        # Read-only: EROFS on open for writing, even for root.
        with self.assertRaises(OSError) as cm:
            os.open(self.file("ro"), os.O_RDWR)
        self.assertEqual(cm.exception.errno, errno.EROFS)
        with self.assertRaises(OSError) as cm:
            os.open(self.path("mnt/missing"), os.O_RDONLY)
        self.assertEqual(cm.exception.errno, errno.ENOENT)
        # Writes update mtime; statfs counts the exports' bytes.
        before = os.stat(self.file("rw")).st_mtime_ns
        time.sleep(0.05)
        fd = os.open(self.file("rw"), os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
        time.sleep(1.1)  # attribute timeout
        self.assertGreater(os.stat(self.file("rw")).st_mtime_ns, before)
        vfs = os.statvfs(self.mnt)
        self.assertEqual(vfs.f_blocks * vfs.f_frsize, SIZE + 8 * MiB)

    def test_errors_map_to_errno(self):
        img = self.image(size=4 * MiB)
        self.fuse_daemon({"d": "file://" + img})
        fd = os.open(self.file("d"), os.O_RDWR)
        try:
            # The file cannot grow: at the end there is no space.
            with self.assertRaises(OSError) as cm:
                os.pwrite(fd, b"y", 4 * MiB)
            self.assertEqual(cm.exception.errno, errno.ENOSPC)
            # A write across the end is short, like on a block device.
            self.assertEqual(os.pwrite(fd, b"z" * 8192, 4 * MiB - 4096), 4096)
            # Reads at the end are EOF.
            self.assertEqual(os.pread(fd, 100, 4 * MiB), b"")
            # Truncating to another size cannot be honoured; to its size is fine.
            with self.assertRaises(OSError) as cm:
                os.ftruncate(fd, MiB)
            self.assertEqual(cm.exception.errno, errno.EINVAL)
            os.ftruncate(fd, 4 * MiB)
            with self.assertRaises(OSError) as cm:
                os.fchmod(fd, 0o777)
            self.assertEqual(cm.exception.errno, errno.EPERM)
            # Growing with fallocate: no space.
            with self.assertRaises(OSError) as cm:
                os.posix_fallocate(fd, 0, 8 * MiB)
            self.assertIn(cm.exception.errno, (errno.ENOSPC, errno.EFBIG))
        finally:
            os.close(fd)
        # The backing image went away under the daemon's feet: EIO on read.
        # (Truncating the image makes the file backend read past its end.)
        os.truncate(img, 0)
        fd = os.open(self.file("d"), os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 65536)
            with self.assertRaises(OSError) as cm:
                os.preadv(fd, [buf], 2 * MiB)
            self.assertEqual(cm.exception.errno, errno.EIO)
        finally:
            os.close(fd)

    def test_bad_configuration(self):
        img = self.image(size=MiB)
        for opts, words in (("mode=999", "mode"), ("colour=red", "unknown fuse option"),
                            ("allow-other=maybe", "allow-other")):
            d = harness.Daemon(self.tmp, ["--listen", "127.0.0.1:0", "--export", "d=file://" + img,
                                          "--fuse-mount", self.mnt + "," + opts], name="bad")
            d.proc = subprocess.Popen(d.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = d.proc.communicate(timeout=30)
            self.assertEqual(d.proc.returncode, 2, err)
            self.assertIn(words, err.decode())
        # A mount point that is a file.
        p = subprocess.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:0", "--export",
                            "d=file://" + img, "--fuse-mount", img],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertIn("not a directory", p.stderr.decode())
        self.assertFalse(mounted(img))

    def test_live_mount_is_refused(self):
        img = self.image(size=MiB)
        self.fuse_daemon({"d": "file://" + img})
        p = subprocess.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:0", "--export",
                            "d=file://" + img, "--fuse-mount", self.mnt],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("already a FUSE mount", p.stderr.decode())
        self.assertEqual(os.listdir(self.mnt), ["d"])  # the first one still serves

    def test_hung_mount_fails_start_up_after_mount_timeout(self):
        """A FUSE mount at the directory whose server is stopped answers
        nothing: start-up gives up after mount-timeout (exit code 2, a clear
        message) instead of hanging; once that server runs again it is a live
        mount as before."""
        img = self.image(size=MiB)
        first = self.fuse_daemon({"d": "file://" + img})
        self.addCleanup(harness.kill_pid, first.proc, signal.SIGCONT)  # runs before first's cleanup
        os.listdir(self.mnt)  # attributes are cached now; statfs still asks the server
        harness.freeze(first.proc.pid)
        # In an ASan build, LeakSanitizer stops every thread with ptrace at
        # exit; the probe thread waiting in the hung mount never stops (FUSE
        # waits are killable only), so the leak check would wait forever.
        env = dict(os.environ)
        env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS", ""), "detect_leaks=0"]))
        t0 = time.monotonic()
        p = subprocess.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:0", "--control-socket", "off",
                            "--export", "d=file://" + img, "--fuse-mount", self.mnt + ",mount-timeout=1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, env=env)
        took = time.monotonic() - t0
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("did not answer within 1000 ms", p.stderr.decode())
        self.assertLess(took, 20)
        # At run time, `blockway mount` gives up the same way; the daemon runs on.
        conf = self.path("fuse.toml")
        with open(conf, "w") as f:
            f.write('[fuse]\nmount-timeout = "1"\n')
        csock = self.path("control.sock")
        third = self.start_daemon(["--config", conf, "--listen", "127.0.0.1:%d" % harness.free_port(),
                                   "--control-socket", csock, "--export", "d=file://" + img], "third")
        t0 = time.monotonic()
        p = subprocess.run([harness.BLOCKWAY, "--socket", csock, "mount", self.mnt],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("did not answer within 1000 ms", p.stderr.decode())
        self.assertLess(time.monotonic() - t0, 20)
        self.assertIsNone(third.proc.poll())
        os.kill(first.proc.pid, signal.SIGCONT)
        self.assertEqual(os.listdir(self.mnt), ["d"])  # the first one serves again

    def test_sigterm_unmounts_and_sigkill_leftover_is_cleaned(self):
        img = self.image(size=8 * MiB, random_data=True)
        want = sha256_file(img)
        d = self.fuse_daemon({"d": "file://" + img})
        self.assertEqual(sha256_file(self.file("d")), want)
        d.stop(signal.SIGTERM)
        self.assertFalse(mounted(self.mnt))
        self.assertEqual(os.listdir(self.mnt), [])

        d = self.fuse_daemon({"d": "file://" + img}, name="second")
        d.send_signal(signal.SIGKILL)
        d.wait(10)
        # A dead daemon leaves a mount that answers nothing.
        self.assertTrue(mounted(self.mnt))
        with self.assertRaises(OSError) as cm:
            os.stat(self.file("d"))
        self.assertEqual(cm.exception.errno, errno.ENOTCONN)
        d = self.fuse_daemon({"d": "file://" + img}, name="third")
        self.assertIn("stale mount", d.log())
        self.assertEqual(sha256_file(self.file("d")), want)
        d.stop(signal.SIGTERM)
        self.assertFalse(mounted(self.mnt))

    def test_sigterm_with_open_file_detaches(self):
        img = self.image(size=8 * MiB)
        d = self.fuse_daemon({"d": "file://" + img}, extra=["--shutdown-timeout", "2"])
        fd = os.open(self.file("d"), os.O_RDWR)
        try:
            os.pwrite(fd, b"held open", 0)
            d.send_signal(signal.SIGTERM)
            harness.wait_until(lambda: not mounted(self.mnt), 10, what="mount detached")
            # The open file is still served until the shutdown timeout.
            self.assertEqual(os.pread(fd, 9, 0), b"held open")
            self.assertEqual(d.wait(20), 0)
            # Then the session ends: the descriptor is dead.
            with self.assertRaises(OSError) as cm:
                os.pread(fd, 9, 0)
            self.assertIn(cm.exception.errno, (errno.ENOTCONN, errno.ECONNABORTED))
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # ENOTCONN: its flush had nowhere to go
        with open(img, "rb") as f:
            self.assertEqual(f.read(9), b"held open")

    def test_punch_hole_and_zero_range_change_block_status(self):
        img = self.image(size=16 * MiB)
        self.fuse_daemon({"d": "file://" + img})
        uri = "nbd://127.0.0.1:%d/d" % self.port
        fd = os.open(self.file("d"), os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(8 * MiB), 0)
            os.fsync(fd)
            self.assertEqual(type_at(nbd_map(uri), 2 * MiB), 0)
            self.assertEqual(os.lseek(fd, 0, os.SEEK_HOLE), 8 * MiB)
            # Punch 2..4 MiB: a hole that reads as zeroes.
            harness.run(["fallocate", "--punch-hole", "--keep-size", "-o", str(2 * MiB),
                         "-l", str(2 * MiB), self.file("d")])
            self.assertEqual(type_at(nbd_map(uri), 3 * MiB), 3)
            self.assertEqual(os.lseek(fd, 0, os.SEEK_HOLE), 2 * MiB)
            self.assertEqual(os.lseek(fd, 2 * MiB, os.SEEK_DATA), 4 * MiB)
            self.assertEqual(os.pread(fd, MiB, 2 * MiB), bytes(MiB))
            # Zero 5..6 MiB: reads as zeroes and stops being reported as data.
            harness.run(["fallocate", "--zero-range", "--keep-size", "-o", str(5 * MiB),
                         "-l", str(MiB), self.file("d")])
            # (Map first: reading the range would put pages in the image's page
            # cache, and ext4 then reports its unwritten extent as data.)
            self.assertNotEqual(type_at(nbd_map(uri), 5 * MiB + 4096) & 2, 0)
            self.assertEqual(type_at(nbd_map(uri), 4 * MiB + 4096), 0)
            self.assertEqual(os.pread(fd, MiB, 5 * MiB), bytes(MiB))
            # Past the data: SEEK_DATA says ENXIO, SEEK_HOLE finds the tail.
            with self.assertRaises(OSError) as cm:
                os.lseek(fd, 8 * MiB, os.SEEK_DATA)
            self.assertEqual(cm.exception.errno, errno.ENXIO)
            self.assertEqual(os.lseek(fd, 9 * MiB, os.SEEK_HOLE), 9 * MiB)
        finally:
            os.close(fd)


class FuseClientsTest(FuseTestCase):
    def test_ext4_on_loop_device_and_nbd_sees_the_same_bytes(self):
        img = self.image()
        # Two reader loops: both read /dev/fuse.
        self.fuse_daemon({"disk": "file://" + img}, fuse_opts="readers=2", extra=["--threads", "2"])
        dev = self.losetup(self.file("disk"))
        harness.run(["mkfs.ext4", "-q", "-F", dev], timeout=120)
        fs = self.path("fs")
        self.mount_ext4(dev, fs)
        rng = random.Random(11)
        sums = {}
        for i in range(40):
            rel = os.path.join("d%d" % (i % 5), "sub%d" % (i % 3), "f%d" % i)
            data = rng.randbytes(rng.randint(1, 300 * 1024))
            os.makedirs(os.path.dirname(os.path.join(fs, rel)), exist_ok=True)
            with open(os.path.join(fs, rel), "wb") as f:
                f.write(data)
            sums[rel] = hashlib.sha256(data).hexdigest()
        harness.run(["umount", fs], timeout=60)
        harness.run(["fsck.ext4", "-fn", dev], timeout=120)
        # The same export over NBD, while the FUSE file and the loop device
        # are live: the same bytes.
        self.assertEqual(sha256_nbd("nbd://127.0.0.1:%d/disk" % self.port, SIZE),
                         sha256_file(self.file("disk")))
        harness.run(["mount", "-t", "ext4", "-o", "ro", dev, fs], timeout=60)
        for rel, want in sums.items():
            self.assertEqual(sha256_file(os.path.join(fs, rel)), want, rel)
        harness.run(["umount", fs], timeout=60)

    def test_qemu_img_and_fio_verify(self):
        img = self.image(random_data=True)
        self.fuse_daemon({"disk": "file://" + img})
        f = self.file("disk")
        info = harness.run(["qemu-img", "info", "--output=json", "-f", "raw", f]).stdout.decode()
        self.assertIn('"virtual-size": %d' % SIZE, info)
        out = self.path("copy.qcow2")
        harness.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", f, out], timeout=120)
        harness.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", f, out], timeout=120)
        # And into the file (no create: the file has its size).
        src = harness.make_random_image(self.path("src.img"), SIZE, seed=5)
        harness.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, f], timeout=120)
        harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, f], timeout=120)
        harness.run(["cmp", src, img], timeout=60)
        # One writer with one 1 MiB request at a time, plain and O_DSYNC (FUA).
        for seed, oflag in ((6, "direct"), (7, "direct,dsync")):
            src = harness.make_random_image(self.path("src%d.img" % seed), SIZE, seed=seed)
            harness.run(["dd", "if=" + src, "of=" + f, "bs=1M", "oflag=" + oflag, "conv=notrunc",
                         "status=none"], timeout=120)
            harness.run(["cmp", src, img], timeout=60)
        for engine, extra in (("psync", []), ("libaio", ["--direct=1", "--iodepth=8"])):
            harness.run(["fio", "--name=verify", "--filename=" + f, "--ioengine=" + engine,
                         "--rw=randwrite", "--bs=4k", "--bsrange=4k-256k", "--size=12M",
                         "--numjobs=4", "--offset_increment=16M", "--verify=crc32c", "--verify_state_save=0",
                         "--do_verify=1", "--verify_fatal=1", "--group_reporting"] + extra,
                        timeout=300)

    def test_nbd_writes_show_in_the_file(self):
        img = self.image(size=8 * MiB)
        self.fuse_daemon({"d": "file://" + img})
        with open(self.file("d"), "rb") as f:
            self.assertEqual(f.read(4096), bytes(4096))  # now in the kernel's page cache
        import nbd
        h = nbd.NBD()
        h.connect_uri("nbd://127.0.0.1:%d/d" % self.port)
        try:
            h.pwrite(b"from nbd!" * 100, 0)
            h.flush()
        finally:
            h.shutdown()
        # The next open drops the file's cached pages.
        with open(self.file("d"), "rb") as f:
            self.assertEqual(f.read(900), b"from nbd!" * 100)

    def test_a_grown_image_grows_its_file(self):
        """`truncate -s` of an uncached file:// image while it is mounted: the
        file takes the new size (no NBD client needed),
        reads zeroes there and takes writes there, byte-exact in the image.
        The kernel keeps a file's attributes for a second, so a stat may show
        the old size until then."""
        img = self.image(size=8 * MiB, random_data=True)
        first = harness.read_file(img, 0, 8 * MiB)
        d = self.fuse_daemon({"d": "file://" + img})
        self.assertEqual(os.stat(self.file("d")).st_size, 8 * MiB)
        os.truncate(img, 24 * MiB)
        harness.wait_until(lambda: os.stat(self.file("d")).st_size == 24 * MiB, 3, interval=0.1,
                           what="the file's new size")
        with open(self.file("d"), "r+b") as f:
            self.assertEqual(os.fstat(f.fileno()).st_size, 24 * MiB)
            f.seek(12 * MiB)
            self.assertEqual(f.read(MiB), bytes(MiB), "the new space reads as zeroes")
            tail = os.urandom(MiB)
            f.seek(23 * MiB)
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
            with self.assertRaises(OSError) as cm:  # still a fixed size: no growth by writing
                os.pwrite(f.fileno(), b"x", 24 * MiB)
            self.assertEqual(cm.exception.errno, errno.ENOSPC)
        self.assertEqual(harness.read_file(img, 23 * MiB, MiB), tail)
        self.assertEqual(harness.read_file(img, 0, 8 * MiB), first)
        self.assertEqual(os.stat(self.file("d")).st_size, 24 * MiB)
        self.assertIn("the image grew from %d to %d bytes" % (8 * MiB, 24 * MiB), d.log(tail=None))

    def test_a_shrunk_image_is_warned_about_once_under_a_writer(self):
        """`truncate` shrinks an uncached file:// image under its mounted
        file: the file keeps its size, reads past the image's end fail with
        EIO, and writes there grow the image again. Each open looks at the
        image, and the writer grows it a little at a time: that is one
        shrink, warned about once (it was once per open), and again only
        when the image shrinks further."""
        img = self.image(size=8 * MiB, random_data=True)
        first = harness.read_file(img, 0, 2 * MiB)
        d = self.fuse_daemon({"d": "file://" + img})
        os.truncate(img, 4 * MiB)
        for i in range(20):
            fd = os.open(self.file("d"), os.O_RDWR)
            try:
                self.assertEqual(os.fstat(fd).st_size, 8 * MiB, "a shrink is not followed")
                os.pwrite(fd, bytes([i + 1]) * 4096, 6 * MiB + i * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.assertEqual(os.stat(img).st_size, 6 * MiB + 20 * 4096, "the writes grew the image again")
        self.assertEqual(harness.read_file(img, 6 * MiB + 19 * 4096, 4096), bytes([20]) * 4096)
        self.assertEqual(harness.read_file(img, 0, 2 * MiB), first)
        fd = os.open(self.file("d"), os.O_RDONLY)
        try:
            with self.assertRaises(OSError) as cm:
                os.pread(fd, 4096, 7 * MiB)
            self.assertEqual(cm.exception.errno, errno.EIO)
        finally:
            os.close(fd)
        warned = lambda: d.log(tail=None).count("smaller than the %d served" % (8 * MiB))  # noqa: E731
        self.assertEqual(warned(), 1, d.log())
        os.truncate(img, 2 * MiB)
        harness.wait_until(lambda: os.stat(self.file("d")) and warned() == 2, 5, interval=0.1,
                           what="a warning about the further shrink")

    def test_direct_io_option(self):
        img = self.image(size=8 * MiB, random_data=True)
        self.fuse_daemon({"d": "file://" + img}, fuse_opts="direct-io")
        # Direct I/O: no page cache in between, so bytes written to the image
        # behind the mount's back show at once through an open descriptor.
        fd = os.open(self.file("d"), os.O_RDONLY)
        try:
            os.pread(fd, 4096, 0)
            with open(img, "r+b") as f:
                f.write(b"changed!")
            self.assertEqual(os.pread(fd, 8, 0), b"changed!")
        finally:
            os.close(fd)


BLOCKSIZE_POLICY = "/usr/lib/x86_64-linux-gnu/nbdkit/filters/nbdkit-blocksize-policy-filter.so"


@unittest.skipUnless(harness.have("nbdkit") and os.path.exists(BLOCKSIZE_POLICY),
                     "nbdkit or its blocksize-policy filter missing")
class FuseMinBlockTest(FuseTestCase):
    """An NBD remote that takes only whole 4096-byte blocks (nbdkit's
    blocksize-policy filter, which fails anything else with EINVAL): the
    file still takes writes, reads and fallocate at any byte, and the
    remote's image ends up byte-exact with a reference."""

    BLOCK = 4096
    SIZE = 8 * MiB

    def test_unaligned_io_reaches_a_4096_byte_remote_byte_exact(self):
        img = harness.make_random_image(self.path("remote.img"), self.SIZE, seed=11)
        with open(img, "rb") as f:
            ref = bytearray(f.read())
        kit = self.blocksize_remote(img, "error")
        d = self.fuse_daemon({"r": kit.uri})
        f = self.file("r")
        self.assertEqual(os.stat(f).st_size, self.SIZE)

        # A shell redirection (O_TRUNC is ignored: the file keeps its size)
        # and dd with 100-byte blocks.
        harness.run(["sh", "-c", "echo hi > " + f])
        ref[0:3] = b"hi\n"
        src = self.path("dd.src")
        with open(src, "wb") as out:
            out.write(random.Random(12).randbytes(5000))
        harness.run(["dd", "if=" + src, "of=" + f, "bs=100", "count=50", "seek=3", "conv=notrunc"])
        with open(src, "rb") as inp:
            ref[300:5300] = inp.read()
        self.assertEqual(os.stat(f).st_size, self.SIZE)

        rng = random.Random(13)
        fd = os.open(f, os.O_RDWR)
        try:
            for _ in range(300):
                off = rng.randrange(0, 2 * MiB)
                data = rng.randbytes(rng.randrange(1, 20000))
                self.assertEqual(os.pwrite(fd, data, off), len(data))
                ref[off:off + len(data)] = data
            for _ in range(30):
                off = rng.randrange(0, 2 * MiB)
                n = rng.randrange(1, 30000)
                self.assertEqual(os.pread(fd, n, off), bytes(ref[off:off + n]), "read at %d+%d" % (off, n))

            # Threads writing their own 100-byte slots of one block at once.
            block = 3 * MiB + 5 * self.BLOCK

            def writer(i):
                wfd = os.open(f, os.O_RDWR)
                try:
                    for r in range(40):
                        os.pwrite(wfd, bytes([65 + i]) * 50 + bytes([r]) * 50, block + 7 + i * 100)
                finally:
                    os.close(wfd)

            import threading
            threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for i in range(6):
                ref[block + 7 + i * 100:block + 7 + (i + 1) * 100] = bytes([65 + i]) * 50 + bytes([39]) * 50

            # Unaligned hole and zero range.
            harness.run(["fallocate", "--punch-hole", "--keep-size", "-o", "1000", "-l", "10000", f])
            ref[1000:11000] = bytes(10000)
            harness.run(["fallocate", "--zero-range", "--keep-size", "-o", str(2 * MiB + 10),
                         "-l", str(3 * self.BLOCK), f])
            ref[2 * MiB + 10:2 * MiB + 10 + 3 * self.BLOCK] = bytes(3 * self.BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)

        # Async direct I/O, 512-byte writes, 16 in flight: neighbours in one
        # 4096-byte block are read-modify-written at the same time. fio's
        # verify finds a write that another one undid.
        region = 5 * MiB
        harness.run(["fio", "--name=rmw", "--filename=" + f, "--ioengine=libaio", "--direct=1",
                     "--iodepth=16", "--rw=randwrite", "--bs=512", "--offset=%d" % region,
                     "--size=%d" % MiB, "--verify=crc32c", "--verify_state_save=0", "--do_verify=1",
                     "--verify_fatal=1"],
                    timeout=300)
        with open(f, "rb") as inp:
            inp.seek(region)
            ref[region:region + MiB] = inp.read(MiB)

        d.stop()  # exit code 0 (with ASan: no error, no leak), mount gone
        self.assertFalse(mounted(self.mnt))
        with open(img, "rb") as inp:
            got = inp.read()
        self.assertEqual(len(got), len(ref))
        if got != bytes(ref):
            first = next(i for i in range(len(ref)) if got[i] != ref[i])
            self.fail("the remote's image differs from the reference first at byte %d" % first)


    def blocksize_remote(self, img, policy, name="nbdkit"):
        """nbdkit that takes only whole BLOCKs; `policy`: what it does with others."""
        from remotes import Nbdkit, started
        return started(self, Nbdkit(self.tmp, img, filters=["blocksize-policy"], name=name,
                                    params=["blocksize-minimum=%d" % self.BLOCK,
                                            "blocksize-error-policy=" + policy]))

    def tail_remote(self, policy):
        """nbdkit with 4096-byte blocks over an image of 4 blocks + 512 bytes."""
        size = 4 * self.BLOCK + 512
        img = harness.make_random_image(self.path("tail-%s.img" % policy), size, seed=21)
        kit = self.blocksize_remote(img, policy, name="nbdkit-" + policy)
        with open(img, "rb") as f:
            return kit, img, size, bytearray(f.read())

    def test_partial_final_block_of_a_lenient_remote_is_read_and_written(self):
        """The remote advertises 4096-byte blocks but takes a request for
        the final 512 bytes (blocksize-error-policy=allow): the file's last
        bytes are read and written byte-exact."""
        kit, img, size, ref = self.tail_remote("allow")
        self.fuse_daemon({"t": kit.uri})
        f = self.file("t")
        self.assertEqual(os.stat(f).st_size, size)
        fd = os.open(f, os.O_RDWR)
        try:
            self.assertEqual(os.pread(fd, 9000, 10000), bytes(ref[10000:]))  # short: the end of the file
            for off, n in ((size - 512 + 7, 20), (size - 600, 600), (size - 1, 1), (3 * self.BLOCK + 5, 4000)):
                data = random.Random(off).randbytes(n)
                self.assertEqual(os.pwrite(fd, data, off), n)
                ref[off:off + n] = data
            self.assertEqual(os.pread(fd, size, 0), bytes(ref))
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(img, "rb") as inp:
            self.assertEqual(inp.read(), bytes(ref))

    def test_partial_final_block_of_a_strict_remote_fails_only_there(self):
        """The remote takes whole 4096-byte blocks only
        (blocksize-error-policy=error) and so cannot reach its final 512
        bytes at all: reads and writes up to them work, a read that reaches
        into them fails with EIO (through the page cache: a short read up to
        them, then EIO), a write into them is short up to them; the log
        says why."""
        kit, img, size, ref = self.tail_remote("error")
        d = self.fuse_daemon({"t": kit.uri})
        f = self.file("t")
        tail = 4 * self.BLOCK
        fd = os.open(f, os.O_RDWR)
        try:
            self.assertEqual(os.pread(fd, size, 0), bytes(ref[:tail]))  # page cache: short, up to the final block
            self.assertEqual(os.pread(fd, 100, tail - 100), bytes(ref[tail - 100:tail]))
            with self.assertRaises(OSError) as cm:
                os.pread(fd, 10, tail + 3)
            self.assertEqual(cm.exception.errno, errno.EIO)
            data = random.Random(5).randbytes(1000)
            self.assertEqual(os.pwrite(fd, data, tail - 600), 600)  # short: stops at the final block
            ref[tail - 600:tail] = data[:600]
            with self.assertRaises(OSError) as cm:
                os.pwrite(fd, b"x" * 10, tail + 1)
            self.assertEqual(cm.exception.errno, errno.EIO)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.assertIn("refuses the final 512 bytes", d.log())
        with open(img, "rb") as inp:
            self.assertEqual(inp.read(), bytes(ref))


def sqlite(db, sql):
    return harness.run(["sqlite3", db, sql], timeout=60).stdout.decode()


class FuseDurabilityTest(FuseTestCase):
    """SQLite on ext4 on a loop device on the FUSE file; SIGKILL between
    transactions; after a restart every committed transaction is there."""

    def replay_and_fsck(self, dev, fs):
        # The kernel replays the journal on mount (as after any crash); then
        # the filesystem must check clean, read-only.
        os.makedirs(fs, exist_ok=True)
        harness.run(["mount", "-t", "ext4", dev, fs], timeout=60)
        harness.run(["umount", fs], timeout=60)
        harness.run(["fsck.ext4", "-fn", dev], timeout=120)

    def crash_rounds(self, mode):
        remote = self.image("remote.img", 32 * MiB)
        spec = "file://%s,cache=%s,mode=%s,chunk=64k" % (remote, self.path("cache"), mode)
        extra = ["--data-dir", self.path("data")]
        fs = self.path("fs")
        committed = 0
        for rnd in range(3):
            d = self.fuse_daemon({"disk": spec}, extra=extra, name="round%d" % rnd)
            if rnd > 0:
                self.assertIn("stale mount", d.log())
            dev = self.losetup(self.file("disk"))
            if rnd == 0:
                harness.run(["mkfs.ext4", "-q", "-F", dev], timeout=120)
            else:
                self.replay_and_fsck(dev, fs)
            self.mount_ext4(dev, fs)
            db = os.path.join(fs, "t.db")
            if rnd == 0:
                sqlite(db, "PRAGMA journal_mode=WAL; CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);")
            rows = sqlite(db, "SELECT count(*), coalesce(max(k), 0) FROM t;").strip()
            self.assertEqual(rows, "%d|%d" % (committed, committed), "round %d (%s)" % (rnd, mode))
            for _ in range(15):
                committed += 1
                sqlite(db, "PRAGMA synchronous=FULL; BEGIN; INSERT INTO t VALUES(%d, hex(randomblob(2000)));"
                           " COMMIT;" % committed)
            d.send_signal(signal.SIGKILL)
            d.wait(10)
            # Tear down above the dead mount: the filesystem's last writes fail.
            subprocess.run(["umount", fs], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            self.force_unmount(fs)
            self.detach_loop(dev)
        d = self.fuse_daemon({"disk": spec}, extra=extra, name="final")
        dev = self.losetup(self.file("disk"))
        self.replay_and_fsck(dev, fs)
        self.mount_ext4(dev, fs)
        db = os.path.join(fs, "t.db")
        self.assertEqual(sqlite(db, "PRAGMA integrity_check;").strip(), "ok")
        self.assertEqual(sqlite(db, "SELECT count(*), max(k) FROM t;").strip(),
                         "%d|%d" % (committed, committed))
        harness.run(["umount", fs], timeout=60)
        self.detach_loop(dev)
        d.stop(signal.SIGTERM)

    def test_writethrough(self):
        self.crash_rounds("writethrough")

    def test_writeback_local(self):
        self.crash_rounds("writeback-local")


if __name__ == "__main__":
    unittest.main()
