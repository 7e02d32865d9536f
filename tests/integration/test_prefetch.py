"""Background prefetch and detach to local mode, against an nbdkit remote.

The daemon is configured with prefetch=sequential (and auto-detach=on where
the test needs it): the control plane and the `blockway` command are tested
elsewhere. Progress is read from the blockway:cache metadata context
(nbdinfo --map), bytes read at the remote from nbdkit's log filter.
"""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
from harness import MiB  # noqa: E402

CHUNK = 64 * 1024


class PrefetchTestCase(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.data_dir = self.path("data")
        self.cache_dir = self.path("cache")
        self.cache_file = os.path.join(self.cache_dir, "disk.img")

    def daemon(self, remote_uri, opts, name="blockwayd"):
        self.port = harness.free_port()
        spec = "disk=%s,cache=%s,chunk=64k,%s" % (remote_uri, self.cache_dir, opts)
        args = ["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port,
                "--data-dir", self.data_dir, "--export", spec]
        return self.start_daemon(args, name)

    def nbdkit(self, image):
        """nbdkit's file plugin with its log filter (every request, with offsets)."""
        return remotes.started(self, remotes.Nbdkit(self.tmp, image, log_requests=True))

    def cache_map(self):
        """[(offset, length, flags)] of the blockway:cache context."""
        return harness.nbd_map(self.uri("disk"), "blockway:cache")

    def present_bytes(self):
        return sum(length for _, length, flags in self.cache_map() if flags & 1)

    def persisted_present_chunks(self):
        """Present chunks as the catalogue has them (after the daemon is gone)."""
        db = sqlite3.connect(os.path.join(self.data_dir, "catalogue.db"))
        try:
            rows = db.execute("SELECT bits FROM bitmap_pages WHERE name = 'disk' AND kind = 0").fetchall()
        finally:
            db.close()
        return sum(bin(int.from_bytes(r[0], "little")).count("1") for r in rows)

    def wait_all_present(self, size, timeout):
        harness.wait_until(lambda: self.cache_map() == [(0, size, 1)], timeout,
                           interval=0.25, what="every chunk present")

    def wait_log(self, d, pattern, timeout):
        harness.wait_until(lambda: re.search(pattern, d.log()) is not None, timeout,
                           interval=0.1, what="log line %r" % pattern)


@unittest.skipUnless(harness.have("nbdkit") and harness.have("nbdinfo") and harness.have("fio"),
                     "nbdkit, nbdinfo or fio missing")
class PrefetchTest(PrefetchTestCase):
    def test_prefetch_512m_while_fio_verifies(self):
        size = 512 * MiB
        remote = harness.make_random_image(self.path("remote.img"), size, seed=5)
        kit = self.nbdkit(remote)
        d = self.daemon(kit.uri, "mode=writethrough,prefetch=sequential")
        fio_result = {}

        def fio():
            # A verify workload in the second quarter of the image while the
            # prefetch copies the whole of it.
            fio_result["proc"] = subprocess.run(
                ["fio", "--name=v", "--ioengine=nbd", "--uri=" + self.uri("disk"),
                 "--rw=randwrite", "--bs=4k", "--iodepth=8", "--offset=%d" % (128 * MiB),
                 "--size=%d" % (32 * MiB), "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, cwd=self.tmp)

        t = threading.Thread(target=fio)
        t.start()
        self.assertLess(self.present_bytes(), size, "the prefetch ended before fio began")
        t.join(320)
        self.assertFalse(t.is_alive(), "fio did not finish")
        p = fio_result["proc"]
        self.assertEqual(p.returncode, 0, p.stdout.decode(errors="replace")[-3000:])
        self.assertRegex(p.stdout.decode(errors="replace"), r"err=\s*0")
        self.wait_all_present(size, 240)
        self.assertRegex(d.log(), r"prefetch done")
        d.stop()
        # Writethrough: the remote has fio's writes too; cache file == remote.
        harness.run(["cmp", self.cache_file, remote], timeout=120)
        # Each chunk came from the remote once (fio's writes cover whole 4k
        # blocks, so partial chunks were fetched by the prefetch or a miss).
        self.assertLessEqual(kit.read_bytes(), size)

    def test_kill9_halfway_then_resume_fetches_only_what_is_missing(self):
        size = 128 * MiB
        remote = harness.make_random_image(self.path("remote.img"), size, seed=6)
        kit = self.nbdkit(remote)
        d = self.daemon(kit.uri, "prefetch=sequential,prefetch-rate=24M", name="first")
        harness.wait_until(lambda: self.present_bytes() >= size // 3, 60, interval=0.2,
                           what="a third of the image present")
        time.sleep(2.5)  # a checkpoint (every 2 s) persists what is present
        d.send_signal(signal.SIGKILL)
        d.wait(10)
        present = self.persisted_present_chunks()
        self.assertGreater(present, 0)
        self.assertLess(present, size // CHUNK)
        before = kit.read_bytes()
        self.assertGreaterEqual(before, present * CHUNK)

        d2 = self.daemon(kit.uri, "prefetch=sequential", name="second")
        self.wait_all_present(size, 120)
        self.assertRegex(d2.log(), r"recovered after an unclean stop")
        d2.stop()
        fetched_again = kit.read_bytes() - before
        self.assertEqual(fetched_again, size - present * CHUNK,
                         "after the restart the remote read %d bytes; %d chunks were present"
                         % (fetched_again, present))
        harness.run(["cmp", self.cache_file, remote], timeout=60)

    def test_auto_detach_then_the_remote_is_not_needed_even_after_a_restart(self):
        size = 64 * MiB
        remote = harness.make_random_image(self.path("remote.img"), size, seed=8)
        expected = harness.make_random_image(self.path("expected.img"), size, seed=8)
        kit = self.nbdkit(remote)
        d = self.daemon(kit.uri, "mode=writeback,prefetch=sequential,auto-detach=on")
        h = self.connect(self.uri("disk"))  # stays connected through the switch
        self.assertEqual(h.pread(CHUNK, 5 * MiB), harness.read_file(remote, 5 * MiB, CHUNK))
        self.wait_log(d, r"detached from", 120)
        self.assertRegex(d.log(), r"auto-detach: detached")
        kit.stop()
        reads_at_detach = kit.read_bytes()

        def write(handle, data, offset):
            handle.pwrite(data, offset)
            with open(expected, "r+b") as f:
                f.seek(offset)
                f.write(data)

        # The same connection: reads, writes, flush, FUA, zero, all local.
        write(h, b"A" * 100000, 12345)
        self.assertEqual(h.pread(100000, 12345), b"A" * 100000)
        self.assertEqual(h.pread(CHUNK, 40 * MiB), harness.read_file(expected, 40 * MiB, CHUNK))
        h.flush()
        h.pwrite(b"F" * 4096, 3 * MiB, 1)  # LIBNBD_CMD_FLAG_FUA
        with open(expected, "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"F" * 4096)
        h.zero(2 * CHUNK, 20 * MiB)
        with open(expected, "r+b") as f:
            f.seek(20 * MiB)
            f.write(b"\0" * (2 * CHUNK))
        # A new connection.
        h2 = self.connect(self.uri("disk"))
        write(h2, b"B" * 8192, size - 8192)
        h2.flush()
        self.assertEqual(h2.pread(8192, size - 8192), b"B" * 8192)
        harness.close_handle(h2)
        harness.close_handle(h)
        d.stop()

        # Restart with nbdkit still stopped: local mode, the remote never opened.
        d2 = self.daemon(kit.uri, "mode=writeback,prefetch=sequential,auto-detach=on", name="second")
        self.assertRegex(d2.log(), r"local \(detached\)")
        h3 = self.connect(self.uri("disk"))
        self.assertEqual(h3.pread(100000, 12345), b"A" * 100000)
        write(h3, b"C" * 65536, 30 * MiB)
        h3.flush()
        harness.close_handle(h3)
        d2.stop()
        self.assertEqual(kit.read_bytes(), reads_at_detach)
        # The cache file is the image, with every write made through the gateway.
        harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", self.cache_file, expected], timeout=60)
        # And the remote has none of the writes made after the detach.
        original = harness.make_random_image(self.path("original.img"), size, seed=8)
        harness.run(["cmp", remote, original], timeout=60)

if __name__ == "__main__":
    unittest.main()
