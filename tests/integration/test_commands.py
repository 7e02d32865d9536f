"""Every NBD transmission command against a file export, driven by libnbd's
Python bindings; results are checked by reading the backing file directly."""

import os
import random
import sys
import tempfile
import shutil
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402

import nbd  # noqa: E402

SIZE = 32 * MiB


def extents_of(h, count, offset, flags=0):
    """base:allocation extents as [(offset, length, flags)]."""
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        pos = off
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    return out


state_at = harness.type_at


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


# Punching a hole can split an extent and cost the file a block of extent
# tree (st_blocks counts it): a punch frees "at least N bytes" up to this.
EXTENT_SLACK = 64 * 1024


class CommandTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_random_image(self.path("disk.img"), SIZE, seed=21)
        self.serve({"disk": self.img})
        self.h = self.connect_ba(self.uri("disk"))

    def connect_ba(self, uri):
        h = nbd.NBD()
        self.addCleanup(harness.close_handle, h)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri)
        self.assertTrue(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        return h

    def test_read_matches_file(self):
        for off, n in ((0, 4096), (12345, 54321), (SIZE - 512, 512), (MiB, 8 * MiB)):
            self.assertEqual(self.h.pread(n, off), harness.read_file(self.img, off, n), (off, n))

    def test_write_then_flush_reaches_file(self):
        data = random.Random(1).randbytes(3 * MiB + 17)
        self.h.pwrite(data, 5 * MiB + 3)
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, 5 * MiB + 3, len(data)), data)
        self.assertEqual(self.h.pread(len(data), 5 * MiB + 3), data)

    def test_fua_write(self):
        self.assertTrue(self.h.can_fua())
        data = b"\xf0" * 65536
        self.h.pwrite(data, 7 * MiB, nbd.CMD_FLAG_FUA)
        # Acknowledged with FUA: the file holds it without any flush.
        self.assertEqual(harness.read_file(self.img, 7 * MiB, len(data)), data)

    def test_many_parallel_writes(self):
        rng = random.Random(2)
        blocks = {}
        cookies = []
        for i in range(64):
            off = rng.randrange(0, SIZE // 65536) * 65536
            blocks[off] = rng.randbytes(65536)
        for off, data in blocks.items():
            cookies.append(self.h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
        deadline_loops = 0
        while self.h.aio_in_flight() > 0:
            self.h.poll(1)
            deadline_loops += 1
            self.assertLess(deadline_loops, 2000, "writes never completed")
        for c in cookies:
            self.assertTrue(self.h.aio_command_completed(c))
        self.h.flush()
        for off, data in blocks.items():
            self.assertEqual(harness.read_file(self.img, off, 65536), data, off)

    def test_trim_makes_hole(self):
        self.assertTrue(self.h.can_trim())
        before = allocated_bytes(self.img)
        ext = extents_of(self.h, 4 * MiB, 8 * MiB)
        self.assertEqual(state_at(ext, 8 * MiB) & nbd.STATE_HOLE, 0, ext)
        self.h.trim(4 * MiB, 8 * MiB)
        self.h.flush()
        ext = extents_of(self.h, 4 * MiB, 8 * MiB)
        self.assertEqual(ext, [(8 * MiB, 4 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO)])
        self.assertEqual(harness.read_file(self.img, 8 * MiB, 4 * MiB), bytes(4 * MiB))
        self.assertLessEqual(allocated_bytes(self.img), before - 4 * MiB + EXTENT_SLACK)
        # Neighbours untouched and still data.
        ext = extents_of(self.h, 16 * MiB, 0)
        self.assertEqual(state_at(ext, 0), 0)
        self.assertEqual(state_at(ext, 12 * MiB) & nbd.STATE_HOLE, 0, ext)

    def test_zero_punches_hole(self):
        before = allocated_bytes(self.img)
        self.h.zero(2 * MiB, 4 * MiB)
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, 4 * MiB, 2 * MiB), bytes(2 * MiB))
        self.assertEqual(self.h.pread(2 * MiB, 4 * MiB), bytes(2 * MiB))
        self.assertLessEqual(allocated_bytes(self.img), before - 2 * MiB + EXTENT_SLACK)
        self.assertTrue(state_at(extents_of(self.h, MiB, 4 * MiB), 4 * MiB) & nbd.STATE_ZERO)

    def test_zero_no_hole_keeps_allocation(self):
        before = allocated_bytes(self.img)
        self.h.zero(2 * MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, 4 * MiB, 2 * MiB), bytes(2 * MiB))
        # Nothing was punched out. (ext4 may add an extent-tree block when it
        # splits the extent, so allow a little growth.)
        after = allocated_bytes(self.img)
        self.assertGreaterEqual(after, before)
        self.assertLess(after, before + 64 * 1024)
        # Bytes around the range are untouched.
        self.assertEqual(self.h.pread(4096, 4 * MiB - 4096),
                         harness.read_file(self.img, 4 * MiB - 4096, 4096))
        self.assertNotEqual(harness.read_file(self.img, 6 * MiB, 4096), bytes(4096))

    def test_fast_zero(self):
        self.assertTrue(self.h.can_fast_zero())
        self.h.zero(MiB, 10 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        self.h.zero(MiB, 12 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        self.assertEqual(harness.read_file(self.img, 12 * MiB, MiB), bytes(MiB))
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, 10 * MiB, MiB), bytes(MiB))

    def test_unaligned_zero_and_trim(self):
        self.h.zero(1000, 4 * MiB + 123)
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, 4 * MiB + 123, 1000), bytes(1000))
        self.assertNotEqual(harness.read_file(self.img, 4 * MiB + 1123, 16), bytes(16))
        # Trim may leave data, but must not change bytes outside its range.
        outside = harness.read_file(self.img, 9 * MiB + 500, 100)
        self.h.trim(5000, 9 * MiB + 600)
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, 9 * MiB + 500, 100), outside)

    def test_cache(self):
        self.assertTrue(self.h.can_cache())
        self.h.cache(8 * MiB, 0)
        self.h.cache(SIZE, 0)
        self.assertEqual(self.h.pread(4096, 0), harness.read_file(self.img, 0, 4096))

    def test_block_status_req_one(self):
        self.h.trim(MiB, 2 * MiB)
        ext = extents_of(self.h, 8 * MiB, 0)
        self.assertGreaterEqual(len(ext), 3, ext)
        one = extents_of(self.h, 8 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)
        self.assertEqual(len(one), 1, one)
        self.assertEqual(one[0], (0, 2 * MiB, 0))
        one = extents_of(self.h, 8 * MiB, 2 * MiB, nbd.CMD_FLAG_REQ_ONE)
        self.assertEqual(one, [(2 * MiB, MiB, nbd.STATE_HOLE | nbd.STATE_ZERO)])

    def test_block_status_whole_disk_covers_size(self):
        self.h.trim(MiB, SIZE - MiB)
        # A server may answer with fewer bytes than asked; walk to the end.
        pos = 0
        seen = []
        while pos < SIZE:
            ext = extents_of(self.h, SIZE - pos, pos)
            self.assertTrue(ext, "empty block status reply at %d" % pos)
            self.assertEqual(ext[0][0], pos)
            for e in ext:
                self.assertGreater(e[1], 0, ext)
            seen += ext
            pos = ext[-1][0] + ext[-1][1]
        self.assertEqual(pos, SIZE)
        self.assertTrue(state_at(seen, SIZE - 1) & nbd.STATE_HOLE)
        self.assertFalse(state_at(seen, 0) & nbd.STATE_HOLE)

    def test_read_df_and_zero_read(self):
        self.assertTrue(self.h.can_df())
        self.h.zero(MiB, 3 * MiB)
        chunks = []

        def chunk(buf, offset, status, err):
            chunks.append((offset, len(buf), status))
            return 0

        # DF: the whole read arrives as one chunk (data or hole).
        self.assertEqual(self.h.pread_structured(MiB, 3 * MiB, chunk, nbd.CMD_FLAG_DF), bytes(MiB))
        self.assertEqual(len(chunks), 1, chunks)
        chunks.clear()
        self.assertEqual(self.h.pread_structured(MiB, 0, chunk, nbd.CMD_FLAG_DF),
                         harness.read_file(self.img, 0, MiB))
        self.assertEqual(chunks, [(0, MiB, nbd.READ_DATA)])

    def test_structured_reply_chunks(self):
        # pread_structured shows the chunks: a zeroed range may come back as a hole.
        self.h.zero(64 * 1024, 0)
        chunks = []

        def chunk(buf, offset, status, err):
            chunks.append((offset, len(buf), status))
            return 0

        buf = self.h.pread_structured(64 * 1024, 0, chunk)
        self.assertEqual(buf, bytes(64 * 1024))
        self.assertEqual(sum(c[1] for c in chunks), 64 * 1024)

    def test_old_style_simple_replies(self):
        h = self.connect(self.uri("disk"), structured=False)
        self.assertFalse(h.get_structured_replies_negotiated())
        self.assertEqual(h.pread(MiB, 2 * MiB), harness.read_file(self.img, 2 * MiB, MiB))
        h.pwrite(b"s" * 4096, 0)
        h.flush()
        self.assertEqual(harness.read_file(self.img, 0, 4096), b"s" * 4096)
        # Zeroes over simple replies come back as real bytes.
        h.zero(4096, 8192)
        self.assertEqual(h.pread(4096, 8192), bytes(4096))

    def test_multi_conn_flush_covers_other_connection(self):
        self.assertTrue(self.h.can_multi_conn())
        other = self.connect(self.uri("disk"))
        other.pwrite(b"M" * 8192, 20 * MiB)
        self.h.flush()
        self.assertEqual(self.h.pread(8192, 20 * MiB), b"M" * 8192)
        self.assertEqual(harness.read_file(self.img, 20 * MiB, 8192), b"M" * 8192)

    def test_disconnect_without_flush_keeps_writes(self):
        h = self.connect(self.uri("disk"))
        h.pwrite(b"D" * 4096, 30 * MiB)
        h.shutdown()
        self.assertEqual(harness.read_file(self.img, 30 * MiB, 4096), b"D" * 4096)


def _can_losetup():
    return os.geteuid() == 0 and harness.have("losetup") and os.path.exists("/dev/loop-control")


@unittest.skipUnless(_can_losetup(), "needs root and loop devices")
class BlockDeviceExportTest(harness.DaemonTestCase):
    """A block device (a loop device over a file) exported directly."""

    def setUp(self):
        super().setUp()
        self.backing = harness.make_random_image(self.path("loop.img"), 16 * MiB, seed=41)
        p = harness.run(["losetup", "-f", "--show", self.backing], timeout=20, check=False)
        if p.returncode != 0:
            self.skipTest("losetup failed: " + p.stderr.decode())
        self.dev = p.stdout.decode().strip()
        self.addCleanup(harness.run, ["losetup", "-d", self.dev], 20, False)
        self.serve({"blk": self.dev})
        self.h = nbd.NBD()
        self.addCleanup(harness.close_handle, self.h)
        self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        self.h.connect_uri(self.uri("blk"))

    def test_size_read_write(self):
        self.assertEqual(self.h.get_size(), 16 * MiB)
        self.assertEqual(self.h.pread(MiB, 3 * MiB), harness.read_file(self.backing, 3 * MiB, MiB))
        self.h.pwrite(b"L" * 65536, 5 * MiB, nbd.CMD_FLAG_FUA)
        self.h.flush()
        self.assertEqual(harness.read_file(self.dev, 5 * MiB, 65536), b"L" * 65536)

    def test_zero_trim_and_block_status(self):
        self.h.zero(MiB, 2 * MiB)
        self.h.flush()
        self.assertEqual(harness.read_file(self.dev, 2 * MiB, MiB), bytes(MiB))
        self.assertEqual(self.h.pread(MiB, 2 * MiB), bytes(MiB))
        self.h.trim(MiB, 8 * MiB)  # advisory; must succeed and not touch neighbours
        self.assertEqual(self.h.pread(4096, 9 * MiB), harness.read_file(self.backing, 9 * MiB, 4096))
        # No extent information on a block device: all of it reads as data.
        ext = extents_of(self.h, 16 * MiB, 0)
        self.assertEqual(sum(e[1] for e in ext), 16 * MiB)
        self.assertEqual(ext[0][0], 0)
        with self.assertRaises(nbd.Error) as cm:
            self.h.set_strict_mode(0)
            self.h.pwrite(b"x" * 512, 16 * MiB)
        self.assertEqual(cm.exception.errnum, 28)  # ENOSPC


@unittest.skipUnless(os.path.isdir("/dev/shm"), "no tmpfs at /dev/shm")
class EmulatedZeroTest(harness.DaemonTestCase):
    """tmpfs cannot FALLOC_FL_ZERO_RANGE: NO_HOLE zeroes are written, FAST_ZERO fails."""

    def setUp(self):
        super().setUp()
        self.shm = tempfile.mkdtemp(prefix="bw-it-", dir="/dev/shm")
        self.addCleanup(shutil.rmtree, self.shm, ignore_errors=True)
        self.img = harness.make_random_image(os.path.join(self.shm, "d.img"), 8 * MiB, seed=4)
        self.serve({"d": self.img})
        self.h = self.connect(self.uri("d"))

    def test_no_hole_zero_is_emulated(self):
        self.h.zero(2 * MiB, MiB, nbd.CMD_FLAG_NO_HOLE)
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, MiB, 2 * MiB), bytes(2 * MiB))
        self.assertNotEqual(harness.read_file(self.img, 3 * MiB, 4096), bytes(4096))

    def test_fast_zero_refused_when_it_would_be_slow(self):
        before = harness.read_file(self.img, MiB, MiB)
        with self.assertRaises(nbd.Error) as cm:
            self.h.zero(MiB, MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        self.assertEqual(cm.exception.errnum, 95)  # ENOTSUP
        self.assertEqual(harness.read_file(self.img, MiB, MiB), before)
        # The connection is still fine, and a fast zero that can punch works.
        self.h.zero(MiB, MiB, nbd.CMD_FLAG_FAST_ZERO)
        self.assertEqual(harness.read_file(self.img, MiB, MiB), bytes(MiB))


if __name__ == "__main__":
    unittest.main()
