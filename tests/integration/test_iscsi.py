"""blockwayd in front of a real iSCSI target (tgt): the iscsi:// backend,
its reconnect through RetryLayer, and what a user sees when the target
misbehaves or the URI is wrong.

Every test starts its own tgtd on a free portal port, with its control
socket numbered after that port (tgtd -C / tgtadm -C), so tests running in
parallel never talk to each other's daemon; tgtd is stopped by its pid.
"""

import errno
import os
import random
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402

import nbd  # noqa: E402

IQN = "iqn.2026-11.io.blockway.test:disk1"


class TgtExited(AssertionError):
    pass


class Tgt(harness.PeerProcess):
    """One tgtd with one target (tid 1), restartable on the same portal."""

    def __init__(self, workdir, port=None, name="tgtd"):
        self.workdir = workdir
        self.port = port or harness.free_port()
        # tgtd's control-socket number (below 32768); a clash with another
        # tgtd makes ours exit at once, and start() then tries another.
        self.control = 1000 + self.port % 31000
        self.log_path = os.path.join(workdir, name + ".log")
        self.proc = None
        self.luns = []     # (lun, path, thin) to recreate on restart
        self.accounts = []  # (user, password)

    def tgtadm(self, *args, check=True):
        return harness.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi"] + list(args),
                           timeout=20, check=check)

    def start(self, timeout=10.0):
        for attempt in range(5):
            try:
                return self._start(timeout)
            except TgtExited:
                if attempt == 4:
                    raise
                self.control = random.randint(1000, 32000)

    def _start(self, timeout):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["tgtd", "-f", "-C", str(self.control),
                                      "--iscsi", "portal=127.0.0.1:%d" % self.port],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise TgtExited("tgtd exited with %d:\n%s" % (self.proc.returncode, self.log()))
            if self.tgtadm("--op", "show", "--mode", "target", check=False).returncode == 0:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError("tgtd did not answer within %.0fs:\n%s" % (timeout, self.log()))
            time.sleep(0.05)
        self.tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", IQN)
        for lun, path, thin in self.luns:
            self._add_lun(lun, path, thin)
        for user, password in self.accounts:
            self._add_account(user, password)
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        return self

    def _add_lun(self, lun, path, thin):
        self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun), "-b", path)
        if thin:
            self.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun),
                        "--params", "thin_provisioning=1")

    def _add_account(self, user, password):
        self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        self.tgtadm("--op", "bind", "--mode", "account", "--tid", "1", "--user", user)

    def add_lun(self, lun, path, thin=False):
        self.luns.append((lun, path, thin))
        if self.running():
            self._add_lun(lun, path, thin)

    def add_account(self, user, password):
        self.accounts.append((user, password))
        if self.running():
            self._add_account(user, password)

    def debug(self, on):
        harness.run(["tgtadm", "-C", str(self.control), "--op", "update", "--mode", "sys",
                     "--name", "debug", "--value", "on" if on else "off"], timeout=20)

    def uri(self, lun=1, auth=""):
        return "iscsi://%s127.0.0.1:%d/%s/%d" % (auth + "@" if auth else "", self.port, IQN, lun)


@unittest.skipUnless(harness.have("tgtd") and harness.have("tgtadm"), "tgt missing")
class IscsiTestCase(harness.DaemonTestCase):
    def start_tgt(self, luns, port=None):
        """luns: {lun: (path, thin)}."""
        tgt = Tgt(self.tmp, port=port)
        for lun, (path, thin) in luns.items():
            tgt.luns.append((lun, path, thin))
        self.addCleanup(tgt.kill)
        return tgt.start()

    def serve_remote(self, uri, options=""):
        self.port = harness.free_port()
        spec = "r=" + uri + ("," + options if options else "")
        return self.start_daemon(["--log-level", "debug", "--listen", "127.0.0.1:%d" % self.port,
                                  "--export", spec], ready_timeout=20)

    def start_expecting_failure(self, spec, timeout=60):
        p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                         "--export", spec], timeout=timeout, check=False)
        return p.returncode, p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")


class DataPathTest(IscsiTestCase):
    def test_nbdcopy_256m_in_and_out(self):
        size = 256 * MiB
        img = harness.make_sparse_image(self.path("lun.img"), size)
        tgt = self.start_tgt({1: (img, False)})
        src = harness.make_random_image(self.path("src.img"), size, seed=41)
        daemon = self.serve_remote(tgt.uri())
        self.assertRegex(daemon.log(), r"268435456 bytes, 512-byte blocks, \d+ session\(s\)")
        uri = self.uri("r")
        p = harness.run(["nbdcopy", src, uri], timeout=300, check=False)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace") + daemon.log())
        harness.run(["cmp", src, img], timeout=120)  # reached tgt's backing file
        out = self.path("out.img")
        harness.run(["nbdcopy", uri, out], timeout=300)
        harness.run(["cmp", src, out], timeout=120)
        daemon.stop(timeout=30)

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_randrw_qd16(self):
        img = harness.make_sparse_image(self.path("lun.img"), 128 * MiB)
        tgt = self.start_tgt({1: (img, False)})
        self.serve_remote(tgt.uri())
        p = harness.run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + self.uri("r"),
                         "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=64M",
                         "--verify=crc32c", "--verify_fatal=1", "--runtime=60"],
                        timeout=180, cwd=self.tmp, check=False)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace")[-3000:])
        self.assertNotIn(b"verify:", p.stderr)

    def test_flush_and_fua_reach_the_target(self):
        img = harness.make_sparse_image(self.path("lun.img"), 16 * MiB)
        tgt = self.start_tgt({1: (img, False)})
        self.serve_remote(tgt.uri())
        h = self.connect(self.uri("r"))
        self.assertTrue(h.can_flush())
        self.assertTrue(h.can_fua())
        self.assertTrue(h.can_multi_conn())
        tgt.debug(True)
        h.pwrite(b"\xab" * 8192, 4096)
        h.flush()
        tgt.debug(False)
        self.assertEqual(harness.read_file(img, 4096, 8192), b"\xab" * 8192)
        log = tgt.log()
        # tgt's debug log names each command's opcode: 0x8a WRITE(16), 0x91 SYNCHRONIZE CACHE(16).
        self.assertRegex(log, r"target_cmd_queue\(\d+\) 0x[0-9a-f]+ 8a ")
        self.assertRegex(log, r"target_cmd_queue\(\d+\) 0x[0-9a-f]+ 91 ")
        h.pwrite(b"\xcd" * 4096, 0, nbd.CMD_FLAG_FUA)
        self.assertEqual(harness.read_file(img, 0, 4096), b"\xcd" * 4096)

    def test_thin_lun_trim_zero_and_block_status(self):
        img = harness.make_sparse_image(self.path("lun.img"), 32 * MiB)
        tgt = self.start_tgt({1: (img, True)})
        daemon = self.serve_remote(tgt.uri())
        self.assertIn("unmap, write-same, lba-status", daemon.log())
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(self.uri("r"))
        self.addCleanup(harness.close_handle, h)
        self.assertTrue(h.can_trim())
        self.assertTrue(h.can_zero())
        self.assertTrue(h.can_meta_context("base:allocation"))
        h.pwrite(b"\x11" * (4 * MiB), 4 * MiB)
        h.flush()

        def extents():
            got = []
            h.block_status(32 * MiB, 0,
                           lambda ctx, off, ents, err: got.extend(ents) if ctx == "base:allocation" else 0)
            return list(zip(got[::2], got[1::2]))

        ext = extents()
        self.assertEqual(ext[0], (4 * MiB, 3), ext)  # hole, zero
        self.assertEqual(ext[1], (4 * MiB, 0), ext)  # data
        h.trim(1 * MiB, 4 * MiB)                     # UNMAP
        h.zero(1 * MiB, 6 * MiB)                     # WRITE SAME with UNMAP
        h.zero(64 * 1024, 7 * MiB + 512 * 1024, nbd.CMD_FLAG_NO_HOLE)  # WRITE SAME, allocated
        h.flush()
        self.assertEqual(h.pread(1 * MiB, 4 * MiB), b"\0" * MiB)
        self.assertEqual(h.pread(1 * MiB, 6 * MiB), b"\0" * MiB)
        self.assertEqual(h.pread(512 * 1024, 7 * MiB), b"\x11" * (512 * 1024))
        self.assertEqual(h.pread(64 * 1024, 7 * MiB + 512 * 1024), b"\0" * (64 * 1024))
        self.assertEqual(harness.read_file(img, 4 * MiB, MiB), b"\0" * MiB)
        self.assertEqual(harness.read_file(img, 7 * MiB + 512 * 1024, 65536), b"\0" * 65536)
        ext = extents()
        self.assertEqual(ext[0], (5 * MiB, 3), ext)  # trimmed (UNMAP): a hole now
        self.assertEqual(ext[1], (1 * MiB, 0), ext)  # untouched data
        self.assertEqual(ext[2], (1 * MiB, 3), ext)  # zeroed with UNMAP: a hole too
        self.assertEqual(ext[3], (1 * MiB, 0), ext)  # data, and zeroes written with NO_HOLE
        # The backing file really has holes where blockway trimmed and
        # zeroed, and none where NO_HOLE asked for allocated zeroes.
        with open(img, "rb") as f:
            self.assertEqual(os.lseek(f.fileno(), 4 * MiB, os.SEEK_DATA), 5 * MiB)
            self.assertEqual(os.lseek(f.fileno(), 5 * MiB, os.SEEK_HOLE), 6 * MiB)
            self.assertEqual(os.lseek(f.fileno(), 6 * MiB, os.SEEK_DATA), 7 * MiB)
            self.assertEqual(os.lseek(f.fileno(), 7 * MiB, os.SEEK_HOLE), 8 * MiB)

    def test_plain_lun_has_no_trim_and_emulated_zero(self):
        img = harness.make_random_image(self.path("lun.img"), 8 * MiB, seed=3)
        tgt = self.start_tgt({1: (img, False)})
        self.serve_remote(tgt.uri())
        h = self.connect(self.uri("r"))
        self.assertFalse(h.can_trim())  # no LBPME: UNMAP is not used
        self.assertTrue(h.can_zero())   # CheckedDevice writes zeroes instead
        h.zero(MiB, MiB)
        h.flush()
        self.assertEqual(harness.read_file(img, MiB, MiB), b"\0" * MiB)
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))

    def test_write_protected_lun_fails_writes_not_the_session(self):
        img = harness.make_random_image(self.path("lun.img"), 8 * MiB, seed=8)
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri(), "retry-timeout=3")
        h = self.connect(self.uri("r"))
        h.pwrite(b"\x61" * 4096, 0)
        tgt.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "--params", "readonly=1")
        start = time.monotonic()
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(b"\x62" * 4096, 0)
        # DATA PROTECT / WRITE PROTECTED is EROFS, which NBD carries as EPERM; not retried.
        self.assertEqual(cm.exception.errnum, errno.EPERM)
        self.assertLess(time.monotonic() - start, 2.0)
        self.assertEqual(h.pread(4096, 0), b"\x61" * 4096)
        tgt.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "--params", "readonly=0")
        h.pwrite(b"\x63" * 4096, 0)
        h.flush()
        self.assertEqual(harness.read_file(img, 0, 4096), b"\x63" * 4096)
        self.assertIn("DATA_PROTECTION (0x7) ascq 0x2700", daemon.log())
        self.assertNotIn("reconnect", daemon.log())

    def test_unit_attention_is_retried(self):
        img = harness.make_random_image(self.path("lun.img"), 8 * MiB, seed=10)
        extra = harness.make_sparse_image(self.path("lun2.img"), 8 * MiB)
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri(), "sessions=1")
        h = self.connect(self.uri("r"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        # A new LUN on the target: tgt answers the next command of every
        # session with UNIT ATTENTION "reported LUNs data has changed".
        tgt.add_lun(2, extra)
        self.assertEqual(h.pread(4096, 4096), harness.read_file(img, 4096, 4096))
        self.assertIn("will be retried: CHECK CONDITION: UNIT_ATTENTION (0x6) ascq 0x3f0e", daemon.log())
        self.assertNotIn("reconnect", daemon.log())

    def test_chap(self):
        img = harness.make_random_image(self.path("lun.img"), 8 * MiB, seed=5)
        tgt = Tgt(self.tmp)
        tgt.luns.append((1, img, False))
        tgt.accounts.append(("bob", "s3cret-pass12"))
        self.addCleanup(tgt.kill)
        tgt.start()
        rc, out = self.start_expecting_failure("r=" + tgt.uri())
        self.assertEqual(rc, 2, out)
        self.assertIn("the target wants CHAP; give iscsi://user%password@", out)
        rc, out = self.start_expecting_failure("r=" + tgt.uri(auth="bob%wrong-pass1234"))
        self.assertEqual(rc, 2, out)
        self.assertIn("CHAP authentication failed for user 'bob'", out)
        self.assertNotIn("wrong-pass1234", out)
        daemon = self.serve_remote(tgt.uri(auth="bob%s3cret-pass12"))
        self.assertNotIn("s3cret", daemon.log())
        h = self.connect(self.uri("r"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))

    def test_cached_export(self):
        img = harness.make_random_image(self.path("lun.img"), 16 * MiB, seed=9)
        tgt = self.start_tgt({1: (img, False)})
        cache_dir = self.path("cache")
        os.mkdir(cache_dir)
        daemon = self.serve_remote(tgt.uri(), "cache=%s,mode=writethrough" % cache_dir)
        h = self.connect(self.uri("r"))
        self.assertEqual(h.pread(MiB, 0), harness.read_file(img, 0, MiB))
        h.pwrite(b"\x5a" * 65536, 2 * MiB)
        h.flush()
        self.assertEqual(harness.read_file(img, 2 * MiB, 65536), b"\x5a" * 65536)
        # Cached chunks are served without the target.
        tgt.kill()
        self.assertEqual(h.pread(MiB, 0), harness.read_file(img, 0, MiB))
        self.assertTrue(os.path.exists(os.path.join(cache_dir, "r.img")))
        self.assertTrue(daemon.running())


class ReconnectTest(IscsiTestCase):
    def test_target_killed_and_restarted_mid_run_loses_nothing_flushed(self):
        img = harness.make_sparse_image(self.path("lun.img"), 64 * MiB)
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri(), "retry-timeout=30")
        h = self.connect(self.uri("r"))
        flushed = {}
        for i in range(32):
            data = bytes([i + 1]) * 65536
            h.pwrite(data, i * 65536)
            flushed[i * 65536] = data
        h.flush()

        errors = []
        done = threading.Event()
        reads = [0]

        def reader():
            rh = nbd.NBD()
            try:
                rh.connect_uri(self.uri("r"))
                n = 0
                while not done.is_set():
                    off = (n % 32) * 65536
                    if rh.pread(65536, off) != flushed[off]:
                        errors.append("wrong data at %d" % off)
                    n += 1
                    reads[0] = n
                rh.shutdown()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.3)
        tgt.kill()
        before = reads[0]
        time.sleep(1.5)
        tgt.start()
        # Writes and flushes work again on the new session.
        h.pwrite(b"\xee" * 4096, 40 * MiB)
        h.flush()
        harness.wait_until(lambda: reads[0] > before + 10, 30, what="reads after the restart")
        done.set()
        t.join(60)
        self.assertFalse(t.is_alive())
        self.assertEqual(errors, [])
        for off, data in flushed.items():
            self.assertEqual(harness.read_file(img, off, len(data)), data)
        self.assertEqual(harness.read_file(img, 40 * MiB, 4096), b"\xee" * 4096)
        self.assertIn("reconnected", daemon.log())
        daemon.stop(timeout=30)

    def test_target_down_longer_than_retry_timeout_fails_with_eio_in_time(self):
        img = harness.make_random_image(self.path("lun.img"), 16 * MiB, seed=5)
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri(), "retry-timeout=3")
        h = self.connect(self.uri("r"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        tgt.kill()
        self.assert_requests_fail_with_eio_in_time(h, retry_timeout=3, slack=5)
        self.assertTrue(daemon.running())
        tgt.start()
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        daemon.stop(timeout=30)

    def test_hung_target_hits_io_timeout(self):
        img = harness.make_random_image(self.path("lun.img"), 16 * MiB, seed=6)
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri(), "io-timeout=1,retry-timeout=2")
        h = self.connect(self.uri("r"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        with harness.frozen(tgt.proc.pid):  # the target stops answering, its sockets stay open
            start = time.monotonic()
            with self.assertRaises(nbd.Error) as cm:
                h.pread(4096, 8192)
            took = time.monotonic() - start
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertLess(took, 8.0)
        self.assertIn("no answer within 1000 ms", daemon.log())
        # The target is back: the export works again.
        harness.wait_until(lambda: self._reads_ok(h, img), 20, interval=0.2, what="reads after SIGCONT")

    @staticmethod
    def _reads_ok(h, img):
        try:
            return h.pread(4096, 8192) == harness.read_file(img, 8192, 4096)
        except nbd.Error:
            return False


class StartupErrorTest(IscsiTestCase):
    def assert_refused(self, spec, *needles, timeout=60):
        rc, out = self.start_expecting_failure(spec, timeout=timeout)
        self.assertEqual(rc, 2, out)
        for n in needles:
            self.assertIn(n, out)
        return out

    def test_malformed_uris(self):
        self.assert_refused("r=iscsi:///%s/1" % IQN, "no host")
        self.assert_refused("r=iscsi://127.0.0.1/%s" % IQN, "no LUN after the target name")
        self.assert_refused("r=iscsi://127.0.0.1/disk1/1", "does not start with iqn., eui. or naa.")
        self.assert_refused("r=iscsi://127.0.0.1/%s/x" % IQN, "LUN 'x' is not a number")
        self.assert_refused("r=iscsi://bob@127.0.0.1/%s/1" % IQN, "has no password")
        self.assert_refused("r=iscsi://127.0.0.1/%s/1,sessions=0" % IQN, "sessions='0'")
        self.assert_refused("r=iscsi://127.0.0.1/%s/1,io-timeout=x" % IQN, "io-timeout='x'")
        self.assert_refused("r=iscsi://127.0.0.1/%s/1,inflight-kib=x" % IQN, "inflight-kib='x'")
        self.assert_refused("r=iscsi://127.0.0.1/%s/1,inflight-kib=2000000" % IQN, "inflight-kib='2000000'")

    def test_missing_lun_and_wrong_iqn(self):
        img = harness.make_sparse_image(self.path("lun.img"), 8 * MiB)
        tgt = self.start_tgt({1: (img, False)})
        self.assert_refused("r=" + tgt.uri(lun=7), "LUN 7 does not exist on target " + IQN)
        self.assert_refused("r=%s,colour=red" % tgt.uri(), "unknown option 'colour'")
        wrong = "iqn.2026-11.io.blockway.test:nosuch"
        self.assert_refused("r=iscsi://127.0.0.1:%d/%s/1" % (tgt.port, wrong),
                            "target %s not found on 127.0.0.1:%d" % (wrong, tgt.port))

    def test_unreachable_and_silent_portals(self):
        port = harness.free_port()  # nothing listens there
        self.assert_refused("r=iscsi://127.0.0.1:%d/%s/1" % (port, IQN), "cannot log in",
                            "Connection refused")
        self.assert_refused("r=iscsi://no-such-host.invalid/%s/1" % IQN, "cannot log in", "no-such-host.invalid")
        # A portal that accepts TCP but never answers the login.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(4)
            start = time.monotonic()
            self.assert_refused("r=iscsi://127.0.0.1:%d/%s/1,io-timeout=1" % (silent.getsockname()[1], IQN),
                                "no answer to the login within 1000 ms")
            self.assertLess(time.monotonic() - start, 10)


if __name__ == "__main__":
    unittest.main()
