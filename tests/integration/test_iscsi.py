"""blockwayd in front of a real iSCSI target (tgt): what is particular to
the iscsi:// backend (thin LUNs, SCSI errors, CHAP, unit attentions). The
cases every backend shares are in test_conformance.py.

Every test starts its own tgtd (remotes.Tgt) on a free portal port, so
tests running in parallel never talk to each other's daemon.
"""

import errno
import os
import re
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
from harness import MiB  # noqa: E402
from remotes import IQN, Tgt  # noqa: E402

import nbd  # noqa: E402

@unittest.skipUnless(harness.have("tgtd") and harness.have("tgtadm"), "tgt missing")
class IscsiTestCase(harness.DaemonTestCase):
    def start_tgt(self, luns, port=None, bstype=None):
        """luns: {lun: (path, thin)}."""
        tgt = Tgt(self.tmp, port=port)
        tgt.bstype = bstype
        for lun, (path, thin) in luns.items():
            tgt.luns.append((lun, path, thin))
        return remotes.started(self, tgt)


class DataPathTest(IscsiTestCase):
    def test_writes_and_flushes_are_scsi_16_byte_commands(self):
        img = harness.make_sparse_image(self.path("lun.img"), 16 * MiB)
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri())
        self.assertRegex(daemon.log(), r"16777216 bytes, 512-byte blocks, \d+ session\(s\)")
        h = self.connect(self.uri("r"))
        self.assertTrue(h.can_multi_conn())
        tgt.debug(True)
        h.pwrite(b"\xab" * 8192, 4096)
        h.flush()
        tgt.debug(False)
        log = tgt.log()
        # tgt's debug log names each command's opcode: 0x8a WRITE(16), 0x91 SYNCHRONIZE CACHE(16).
        self.assertRegex(log, r"target_cmd_queue\(\d+\) 0x[0-9a-f]+ 8a ")
        self.assertRegex(log, r"target_cmd_queue\(\d+\) 0x[0-9a-f]+ 91 ")

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
        self.assertTrue(h.can_zero())   # WRITE SAME without UNMAP (test_plain_lun_zero_is_write_same)
        h.zero(MiB, MiB)
        h.flush()
        self.assertEqual(harness.read_file(img, MiB, MiB), b"\0" * MiB)
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))

    @staticmethod
    def commands(log, opcode):
        """How many commands with this opcode tgt's debug log shows queued."""
        return len(re.findall(r"target_cmd_queue\(\d+\) 0x[0-9a-f]+ %02x " % opcode, log))

    def zero_and_check(self, h, img, expect, offset, length, flags=0):
        """Zeroes [offset, offset+length) over NBD; the export and the LUN's
        file then read as `expect` with that range zeroed."""
        h.zero(length, offset, flags)
        h.flush()
        expect[offset:offset + length] = bytes(length)
        for at in range(0, len(expect), 32 * MiB):
            piece = min(32 * MiB, len(expect) - at)
            self.assertTrue(h.pread(piece, at) == expect[at:at + piece], "differs in [%d, +%d)" % (at, piece))
        self.assertTrue(harness.read_file(img, 0, len(expect)) == expect, "the LUN's file differs")

    def test_plain_lun_zero_is_write_same(self):
        # A LUN that is not thin: write-zeroes is WRITE SAME(16) without
        # UNMAP, one block of zeroes on the wire, the target writes the range.
        size = 80 * MiB
        img = harness.make_random_image(self.path("lun.img"), size, seed=21)
        expect = bytearray(harness.read_file(img, 0, size))
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri())
        self.assertIn(", write-same", daemon.full_log())
        h = self.connect(self.uri("r"))
        self.assertTrue(h.can_zero())
        tgt.debug(True)
        # 70 MiB, more than one command's 32 MiB, from and to odd 512-byte
        # blocks (the export's minimum block; libnbd refuses less).
        self.zero_and_check(h, img, expect, MiB + 512, 70 * MiB + 1536)
        tgt.debug(False)
        log = tgt.log(tail=10 ** 7)
        self.assertGreaterEqual(self.commands(log, 0x93), 3, log[-2000:])
        self.assertEqual(self.commands(log, 0x8a), 0, log[-2000:])
        # NO_HOLE is the same command; the whole LUN in one request too.
        self.zero_and_check(h, img, expect, 0, 4096, nbd.CMD_FLAG_NO_HOLE)
        h.pwrite(b"\x77" * 8192, size - 8192)
        expect[size - 8192:] = b"\x77" * 8192
        self.zero_and_check(h, img, expect, 0, size)
        # FAST_ZERO: the target writes every block, which is not fast.
        if h.can_fast_zero():
            with self.assertRaises(nbd.Error) as cm:
                h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO)
            self.assertEqual(cm.exception.errnum, errno.ENOTSUP)
        self.assertNotIn("refuses WRITE SAME", daemon.full_log())

    def test_fuse_zero_range_at_byte_edges(self):
        # The path of a file system's discard on the FUSE file (mkfs, a
        # loop device, blkdiscard -z): fallocate ZERO_RANGE / PUNCH_HOLE at
        # byte offsets. The partial blocks at the edges are read, patched and
        # written; the blocks between go as WRITE SAME.
        size = 40 * MiB
        img = harness.make_random_image(self.path("lun.img"), size, seed=24)
        expect = bytearray(harness.read_file(img, 0, size))
        tgt = self.start_tgt({1: (img, False)})
        mnt = self.path("mnt")
        os.mkdir(mnt)
        self.start_daemon(["--log-level", "debug", "--listen", "127.0.0.1:%d" % harness.free_port(),
                           "--fuse-mount", mnt, "--export", "r=" + tgt.uri()])
        self.addCleanup(subprocess.run, ["fusermount3", "-u", "-z", mnt], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, timeout=30)
        f = os.path.join(mnt, "r")
        harness.wait_until(lambda: os.path.exists(f), 10, what="the FUSE file")
        tgt.debug(True)
        for op, off, length in (("--zero-range", MiB + 1000, 20 * MiB + 333),
                                ("--punch-hole", 30 * MiB + 7, 3 * MiB + 1)):
            harness.run(["fallocate", op, "--keep-size", "-o", str(off), "-l", str(length), f], timeout=60)
            expect[off:off + length] = bytes(length)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tgt.debug(False)
        log = tgt.log(tail=10 ** 7)
        self.assertGreaterEqual(self.commands(log, 0x93), 2, log[-2000:])
        self.assertLessEqual(self.commands(log, 0x8a), 8, log[-2000:])  # the edges only
        self.assertTrue(harness.read_file(img, 0, size) == expect, "the LUN's file differs")
        with open(f, "rb") as fh:
            self.assertTrue(fh.read() == expect, "the FUSE file differs")

    def test_lun_refusing_write_same_falls_back_to_writes(self):
        # tgt's aio backing store answers WRITE SAME with ILLEGAL REQUEST /
        # INVALID OPERATION CODE: the zeroes are written instead, and WRITE
        # SAME is not tried again.
        size = 16 * MiB
        img = harness.make_random_image(self.path("lun.img"), size, seed=22)
        expect = bytearray(harness.read_file(img, 0, size))
        tgt = self.start_tgt({1: (img, False)}, bstype="aio")
        daemon = self.serve_remote(tgt.uri())
        h = self.connect(self.uri("r"))
        tgt.debug(True)
        self.zero_and_check(h, img, expect, 3 * MiB, 5 * MiB)
        log = tgt.log(tail=10 ** 7)
        self.assertGreaterEqual(self.commands(log, 0x93), 1)
        self.assertGreaterEqual(self.commands(log, 0x8a), 5)
        self.assertEqual(daemon.full_log().count("the LUN refuses WRITE SAME(16) without UNMAP"), 1)
        self.zero_and_check(h, img, expect, 9 * MiB + 512, 2 * MiB)
        tgt.debug(False)
        self.assertEqual(self.commands(tgt.log(tail=10 ** 7), 0x93), self.commands(log, 0x93))
        self.assertEqual(daemon.full_log().count("the LUN refuses WRITE SAME(16) without UNMAP"), 1)
        self.assertNotIn("reconnect", daemon.full_log())

    def test_write_same_off_sends_the_zeroes(self):
        size = 16 * MiB
        img = harness.make_random_image(self.path("lun.img"), size, seed=23)
        expect = bytearray(harness.read_file(img, 0, size))
        tgt = self.start_tgt({1: (img, False)})
        daemon = self.serve_remote(tgt.uri(), "write-same=off")
        self.assertNotIn(", write-same", daemon.full_log())
        h = self.connect(self.uri("r"))
        self.assertTrue(h.can_zero())  # CheckedDevice writes zeroes
        tgt.debug(True)
        self.zero_and_check(h, img, expect, 2 * MiB, 6 * MiB)
        tgt.debug(False)
        log = tgt.log(tail=10 ** 7)
        self.assertEqual(self.commands(log, 0x93), 0)
        self.assertGreaterEqual(self.commands(log, 0x8a), 6)
        self.start_refused("r=%s,write-same=sometimes" % tgt.uri(), "write-same='sometimes'")

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
        self.assertNotIn("reconnect", daemon.full_log())

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
        self.assertNotIn("reconnect", daemon.full_log())

    def test_chap(self):
        img = harness.make_random_image(self.path("lun.img"), 8 * MiB, seed=5)
        tgt = Tgt(self.tmp)
        tgt.luns.append((1, img, False))
        tgt.accounts.append(("bob", "s3cret-pass12"))
        remotes.started(self, tgt)
        self.start_refused("r=" + tgt.uri(), "the target wants CHAP; give iscsi://user%password@")
        out = self.start_refused("r=" + tgt.uri(auth="bob%wrong-pass1234"),
                                 "CHAP authentication failed for user 'bob'")
        self.assertNotIn("wrong-pass1234", out)
        self.port = harness.free_port()
        control = self.path("c.control")
        daemon = self.start_daemon(["--log-level", "debug", "--listen", "127.0.0.1:%d" % self.port,
                                    "--control-socket", control,
                                    "--export", "r=" + tgt.uri(auth="bob%s3cret-pass12")], ready_timeout=20)
        self.assertNotIn("s3cret", daemon.full_log())
        # Nor in what the control socket shows (the password stays in the
        # configuration, where the operator put it).
        for args in (["status", "--json"], ["export", "list"], ["stats", "r"]):
            shown = harness.run([harness.BLOCKWAY, "--socket", control] + args, timeout=30).stdout.decode()
            self.assertNotIn("s3cret", shown)
            self.assertIn("bob%***@", shown)
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


class StartupErrorTest(IscsiTestCase):
    """Malformed URIs and a portal nobody serves: test_conformance.py."""

    def test_bad_options(self):
        self.start_refused("r=iscsi://127.0.0.1/%s/1,sessions=0" % IQN, "sessions='0'")
        self.start_refused("r=iscsi://127.0.0.1/%s/1,io-timeout=x" % IQN, "io-timeout='x'")
        self.start_refused("r=iscsi://127.0.0.1/%s/1,inflight-kib=x" % IQN, "inflight-kib='x'")
        self.start_refused("r=iscsi://127.0.0.1/%s/1,inflight-kib=2000000" % IQN, "inflight-kib='2000000'")

    def test_missing_lun_and_wrong_iqn(self):
        img = harness.make_sparse_image(self.path("lun.img"), 8 * MiB)
        tgt = self.start_tgt({1: (img, False)})
        self.start_refused("r=" + tgt.uri(lun=7), "LUN 7 does not exist on target " + IQN)
        self.start_refused("r=%s,colour=red" % tgt.uri(), "unknown option 'colour'")
        wrong = "iqn.2026-11.io.blockway.test:nosuch"
        self.start_refused("r=iscsi://127.0.0.1:%d/%s/1" % (tgt.port, wrong),
                           "target %s not found on 127.0.0.1:%d" % (wrong, tgt.port))

    def test_unknown_host_and_silent_portal(self):
        self.start_refused("r=iscsi://no-such-host.invalid/%s/1" % IQN, "cannot log in", "no-such-host.invalid")
        # A portal that accepts TCP but never answers the login.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(4)
            start = time.monotonic()
            self.start_refused("r=iscsi://127.0.0.1:%d/%s/1,io-timeout=1" % (silent.getsockname()[1], IQN),
                               "no answer to the login within 1000 ms")
            self.assertLess(time.monotonic() - start, 10)


if __name__ == "__main__":
    unittest.main()
