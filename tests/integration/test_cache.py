"""blockwayd with a local cache in front of a remote: a file:// image, and
nbdkit (file plugin, with its delay and error filters) over NBD."""

import os
import re
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
from harness import MiB  # noqa: E402

SIZE = 16 * MiB
CHUNK = 64 * 1024
MODES = ("writethrough", "writeback", "writeback-local")


def fetched_bytes(log):
    """Bytes fetched from the remote, from the cache's shutdown line."""
    m = re.findall(r"cache hits \d+, misses \d+, fetched (\d+) bytes", log)
    assert m, "no cache statistics line in the log:\n" + log[-3000:]
    return int(m[-1])


class CacheTestCase(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.data_dir = self.path("data")
        self.cache_dir = self.path("cache")
        self.remote = harness.make_random_image(self.path("remote.img"), SIZE, seed=7)

    def cached(self, uri, mode, extra_opts="", name="blockwayd"):
        self.port = harness.free_port()
        spec = "disk=%s,cache=%s,mode=%s,chunk=64k%s" % (uri, self.cache_dir, mode, extra_opts)
        args = ["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port,
                "--data-dir", self.data_dir, "--export", spec]
        return self.start_daemon(args, name)

    def nbdcopy(self, src, dst):
        # --flush: without it nbdcopy never sends FLUSH.
        harness.run(["nbdcopy", "--flush", src, dst], timeout=120)

    def cmp(self, a, b):
        harness.run(["cmp", a, b], timeout=60)

    @staticmethod
    def cache_map(uri):
        """[(offset, length, type)] of the blockway:cache context."""
        return harness.nbd_map(uri, "blockway:cache")

    type_at = staticmethod(harness.type_at)


@unittest.skipUnless(harness.have("nbdcopy") and harness.have("nbdinfo"), "libnbd tools missing")
class FileRemoteTest(CacheTestCase):
    def test_nbdcopy_round_trip_every_mode(self):
        for i, mode in enumerate(MODES):
            with self.subTest(mode=mode):
                self.cache_dir = self.path("cache-" + mode)
                self.data_dir = self.path("data-" + mode)
                remote = harness.make_random_image(self.path("remote-%s.img" % mode), SIZE, seed=10 + i)
                d = self.cached("file://" + remote, mode, name="bw-" + mode)
                out = self.path("out-%s.img" % mode)
                self.nbdcopy(self.uri("disk"), out)
                self.cmp(out, remote)
                new = harness.make_random_image(self.path("new-%s.img" % mode), SIZE, seed=20 + i)
                self.nbdcopy(new, self.uri("disk"))  # ends with a FLUSH
                self.nbdcopy(self.uri("disk"), out)
                self.cmp(out, new)
                if mode != "writeback-local":
                    self.cmp(remote, new)  # the flush put it on the remote
                else:
                    harness.wait_until(
                        lambda: harness.read_file(remote, 0, SIZE) == harness.read_file(new, 0, SIZE),
                        20, what="background write-back to the remote file")
                d.stop()

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_writeback_local(self):
        self.cached("file://" + self.remote, "writeback-local")
        harness.run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + self.uri("disk"),
                     "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=%d" % SIZE,
                     "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"],
                    timeout=120, cwd=self.tmp)

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_writethrough_mixed_sizes(self):
        self.cached("file://" + self.remote, "writethrough")
        harness.run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + self.uri("disk"),
                     "--rw=randrw", "--bsrange=512-128k", "--iodepth=8", "--size=%d" % SIZE,
                     "--verify=crc32c", "--verify_fatal=1"],
                    timeout=120, cwd=self.tmp)

    def test_cache_map_shows_present_and_dirty(self):
        self.cached("file://" + self.remote, "writeback")
        h = self.connect(self.uri("disk"))
        h.pread(CHUNK, 0)                       # chunk 0: present
        h.pwrite(b"\x55" * 4096, 4 * CHUNK)     # chunk 4: present + dirty
        m = self.cache_map(self.uri("disk"))
        self.assertEqual(self.type_at(m, 0), 1)
        self.assertEqual(self.type_at(m, 4 * CHUNK), 3)
        self.assertEqual(self.type_at(m, 8 * CHUNK), 0)
        self.assertEqual(sum(length for _, length, _ in m), SIZE)
        h.flush()
        m = self.cache_map(self.uri("disk"))
        self.assertEqual(self.type_at(m, 4 * CHUNK), 1, "clean after FLUSH in writeback")
        self.assertEqual(harness.read_file(self.remote, 4 * CHUNK, 4096), b"\x55" * 4096)

    def test_flush_reaches_the_remote_where_the_mode_promises(self):
        import nbd
        for mode in ("writethrough", "writeback"):
            with self.subTest(mode=mode):
                self.cache_dir = self.path("cache-" + mode)
                self.data_dir = self.path("data-" + mode)
                d = self.cached("file://" + self.remote, mode, name="bw-" + mode)
                h = self.connect(self.uri("disk"))
                h.pwrite(b"F" * 8192, 3 * CHUNK + 512, nbd.CMD_FLAG_FUA)
                self.assertEqual(harness.read_file(self.remote, 3 * CHUNK + 512, 8192), b"F" * 8192,
                                 "FUA write not on the remote in " + mode)
                h.pwrite(mode[:1].encode() * 4096, 9 * CHUNK)
                h.flush()
                self.assertEqual(harness.read_file(self.remote, 9 * CHUNK, 4096), mode[:1].encode() * 4096,
                                 "flushed write not on the remote in " + mode)
                harness.close_handle(h)
                d.stop()

    def test_writeback_local_flush_needs_no_remote_and_catches_up(self):
        self.cached("file://" + self.remote, "writeback-local")
        h = self.connect(self.uri("disk"))
        h.pwrite(b"L" * 65536, 2 * CHUNK)
        h.flush()
        self.assertEqual(h.pread(65536, 2 * CHUNK), b"L" * 65536)
        harness.wait_until(lambda: harness.read_file(self.remote, 2 * CHUNK, 65536) == b"L" * 65536,
                           20, what="background write-back")

    def test_restart_reuses_the_cache(self):
        d = self.cached("file://" + self.remote, "writeback-local", name="first")
        out = self.path("out.img")
        self.nbdcopy(self.uri("disk"), out)
        d.stop()
        self.assertEqual(fetched_bytes(d.log()), SIZE)
        d2 = self.cached("file://" + self.remote, "writeback-local", name="second")
        self.nbdcopy(self.uri("disk"), out)
        self.cmp(out, self.remote)
        d2.stop()
        self.assertEqual(fetched_bytes(d2.log()), 0, "present chunks were fetched again")

    def test_restart_after_kill_keeps_flushed_writes(self):
        d = self.cached("file://" + self.remote, "writeback-local", name="first")
        h = self.connect(self.uri("disk"))
        h.pwrite(b"K" * 4096, 5 * CHUNK)
        h.flush()
        d.send_signal(signal.SIGKILL)
        d.wait(10)
        self.cached("file://" + self.remote, "writeback-local", name="second")
        h = self.connect(self.uri("disk"))
        self.assertEqual(h.pread(4096, 5 * CHUNK), b"K" * 4096)

    def test_restart_after_the_remote_grew_keeps_the_cache(self):
        """The remote grew while the daemon was down (truncate -s): the cache
        opens at the new size with every chunk it held, the dirty ones too,
        fetches only the new space, and writes the dirty data back."""
        spec_opts = ",writeback-delay=3600"  # the write stays dirty in the cache
        d = self.cached("file://" + self.remote, "writeback-local", spec_opts, name="first")
        h = self.connect(self.uri("disk"))
        original = harness.read_file(self.remote, 0, SIZE)
        self.assertEqual(h.pread(SIZE, 0), original)  # every chunk present
        h.pwrite(b"G" * 4096, 3 * CHUNK)
        h.flush()
        h.shutdown()
        d.stop()
        self.assertEqual(harness.read_file(self.remote, 3 * CHUNK, 4096), original[3 * CHUNK:3 * CHUNK + 4096])
        os.truncate(self.remote, SIZE + 8 * MiB)

        d = self.cached("file://" + self.remote, "writeback-local", spec_opts, name="second")
        self.assertIn("the remote grew from %d to %d bytes" % (SIZE, SIZE + 8 * MiB), d.log())
        self.assertEqual(os.path.getsize(os.path.join(self.cache_dir, "disk.img")), SIZE + 8 * MiB)
        h = self.connect(self.uri("disk"))
        self.assertEqual(h.get_size(), SIZE + 8 * MiB)
        expect = bytearray(original)
        expect[3 * CHUNK:3 * CHUNK + 4096] = b"G" * 4096
        self.assertEqual(h.pread(SIZE, 0), bytes(expect))
        self.assertEqual(h.pread(8 * MiB, SIZE), b"\0" * 8 * MiB)
        h.pwrite(b"N" * 4096, SIZE + CHUNK)
        h.flush()
        h.shutdown()
        d.stop()
        self.assertEqual(fetched_bytes(d.log()), 8 * MiB, "only the new space may be fetched")

        d = self.cached("file://" + self.remote, "writeback-local", ",writeback-delay=0", name="third")
        harness.wait_until(lambda: harness.read_file(self.remote, 3 * CHUNK, 4096) == b"G" * 4096 and
                           harness.read_file(self.remote, SIZE + CHUNK, 4096) == b"N" * 4096,
                           30, what="the dirty data written back")
        self.assertNotIn("starting with an empty cache", d.full_log())

    def test_remote_shrunk_under_dirty_data_refuses_to_start_until_grown_back(self):
        d = self.cached("file://" + self.remote, "writeback-local", ",writeback-delay=3600", name="first")
        h = self.connect(self.uri("disk"))
        h.pwrite(b"S" * 4096, SIZE - CHUNK)
        h.flush()
        h.shutdown()
        d.stop()
        os.truncate(self.remote, SIZE // 2)
        spec = "disk=file://%s,cache=%s,mode=writeback-local,chunk=64k" % (self.remote, self.cache_dir)
        p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                         "--data-dir", self.data_dir, "--export", spec], timeout=20, check=False)
        out = (p.stderr + p.stdout).decode(errors="replace")
        self.assertEqual(p.returncode, 2, out)
        self.assertIn("shrank from %d to %d bytes" % (SIZE, SIZE // 2), out)
        self.assertIn("grow the image back to %d bytes" % SIZE, out)
        # As the message says: grown back, it starts, and a FLUSH in
        # writeback mode writes the data back (and persists it clean).
        os.truncate(self.remote, SIZE)
        d = self.cached("file://" + self.remote, "writeback", name="second")
        h = self.connect(self.uri("disk"))
        h.flush()
        self.assertEqual(harness.read_file(self.remote, SIZE - CHUNK, 4096), b"S" * 4096)
        h.shutdown()
        d.stop()
        # Clean, a shrink starts an empty cache at the new size.
        os.truncate(self.remote, SIZE // 2)
        d = self.cached("file://" + self.remote, "writeback-local", name="third")
        self.assertIn("starting with an empty cache", d.log())
        self.assertEqual(self.connect(self.uri("disk")).get_size(), SIZE // 2)

    def test_clone_over_a_base_that_grew_refuses_clearly(self):
        """A clone keeps the size its base had when it was made: once the
        base's remote grew, a clone with writes of its own cannot be opened
        and says why (the base's cache itself grows, and is served)."""
        def args(port):
            return ["--log-level", "info", "--listen", "127.0.0.1:%d" % port, "--data-dir", self.data_dir,
                    "--export", "disk=file://%s,cache=%s,mode=writeback" % (self.remote, self.cache_dir),
                    "--export", "c=clone:disk,overlay=" + self.path("overlays")]
        self.port = harness.free_port()
        d = self.start_daemon(args(self.port), name="first")
        h = self.connect(self.uri("c"))
        h.pwrite(b"C" * 4096, 0)
        h.flush()
        h.shutdown()
        d.stop()
        os.truncate(self.remote, SIZE + 4 * MiB)
        self.port = harness.free_port()
        d = self.start_daemon(args(self.port), name="grown")
        self.assertIn("export 'c' cannot be opened; serving the others", d.log())
        self.assertIn("its base 'disk' is now %d bytes, but the clone was made at %d bytes" % (SIZE + 4 * MiB, SIZE),
                      d.log())
        self.assertEqual(self.connect(self.uri("disk")).get_size(), SIZE + 4 * MiB)
        import nbd
        with self.assertRaises(nbd.Error):
            self.connect(self.uri("c"))
        d.stop()
        # Restored, both start again with the clone's writes.
        os.truncate(self.remote, SIZE)
        self.port = harness.free_port()
        self.start_daemon(args(self.port), name="second")
        self.assertEqual(self.connect(self.uri("c")).pread(4096, 0), b"C" * 4096)

    def test_wrong_cache_options_exit_2_naming_the_option(self):
        cases = [("mode=writearound", "mode"), ("chunk=3k", "chunk"), ("chunk=lots", "chunk"),
                 ("preallocate=maybe", "preallocate"), ("readahead=1T", "readahead")]
        for opt, name in cases:
            with self.subTest(opt=opt):
                spec = "disk=file://%s,cache=%s,%s" % (self.remote, self.cache_dir, opt)
                p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                                 "--data-dir", self.data_dir, "--export", spec], timeout=20, check=False)
                self.assertEqual(p.returncode, 2, p.stderr.decode(errors="replace"))
                err = (p.stderr + p.stdout).decode(errors="replace")
                self.assertIn(name, err)
        for spec, name in [("disk=file://%s,cache=relative/dir" % self.remote, "cache"),
                           ("disk=file://%s,mode=writeback" % self.remote, "mode")]:
            with self.subTest(spec=spec):
                p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                                 "--data-dir", self.data_dir, "--export", spec], timeout=20, check=False)
                self.assertEqual(p.returncode, 2)
                self.assertIn(name, (p.stderr + p.stdout).decode(errors="replace"))

    def test_changed_chunk_size_with_dirty_data_refuses_to_start(self):
        d = self.cached("file://" + self.remote, "writeback-local", name="first")
        h = self.connect(self.uri("disk"))
        h.pwrite(b"D" * 4096, 0)
        h.flush()
        d.send_signal(signal.SIGKILL)  # no chance to write back
        d.wait(10)
        spec = "disk=file://%s,cache=%s,mode=writeback-local,chunk=128k" % (self.remote, self.cache_dir)
        p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                         "--data-dir", self.data_dir, "--export", spec], timeout=20, check=False)
        self.assertEqual(p.returncode, 2, (p.stderr + p.stdout).decode(errors="replace"))
        self.assertIn("not yet written", (p.stderr + p.stdout).decode(errors="replace"))


@unittest.skipUnless(harness.have("nbdkit") and harness.have("nbdcopy"), "nbdkit or nbdcopy missing")
class NbdkitRemoteTest(CacheTestCase):
    def nbdkit(self, **kw):
        return remotes.started(self, remotes.Nbdkit(self.tmp, self.remote, **kw))

    def test_slow_remote_round_trip_and_flush(self):
        kit = self.nbdkit(filters=["delay"], params=["rdelay=2ms", "wdelay=2ms"])
        self.cached(kit.uri, "writeback")
        out = self.path("out.img")
        self.nbdcopy(self.uri("disk"), out)
        self.cmp(out, self.remote)
        new = harness.make_random_image(self.path("new.img"), SIZE, seed=99)
        self.nbdcopy(new, self.uri("disk"))
        self.cmp(self.remote, new)  # writeback: the FLUSH reached nbdkit's file

    def test_present_chunks_are_served_while_the_remote_fails(self):
        errfile = self.path("ERR")
        kit = self.nbdkit(filters=["error"], params=["error-rate=100%", "error-file=" + errfile])
        self.cached(kit.uri, "writeback-local")
        h = self.connect(self.uri("disk"))
        warm = h.pread(4 * CHUNK, 0)
        self.assertEqual(warm, harness.read_file(self.remote, 0, 4 * CHUNK))
        open(errfile, "w").close()
        t0 = time.monotonic()
        self.assertEqual(h.pread(4 * CHUNK, 0), warm)
        h.pwrite(b"W" * CHUNK, 8 * CHUNK)  # whole chunk: no fetch needed
        h.flush()                          # writeback-local: no remote needed
        self.assertEqual(h.pread(CHUNK, 8 * CHUNK), b"W" * CHUNK)
        self.assertLess(time.monotonic() - t0, 10)
        os.unlink(errfile)
        self.assertEqual(h.pread(CHUNK, 12 * CHUNK), harness.read_file(self.remote, 12 * CHUNK, CHUNK))
        harness.wait_until(lambda: harness.read_file(self.remote, 8 * CHUNK, CHUNK) == b"W" * CHUNK,
                           30, what="write-back after the remote came back")

    def test_first_writes_do_not_wait_for_the_remote_and_survive_kill_after_flush(self):
        # writeback-local over a remote that takes 100 ms per read: 4 KiB
        # writes across 9 absent chunks are answered without waiting for
        # each chunk's fetch (it runs behind them, deferred fill), and what
        # the FLUSH acknowledged survives kill -9.
        kit = self.nbdkit(filters=["delay"], params=["rdelay=100ms"])
        d = self.cached(kit.uri, "writeback-local", name="first")
        h = self.connect(self.uri("disk"))
        start = 3 * CHUNK + 500
        data = os.urandom(8 * CHUNK)
        t0 = time.monotonic()
        for off in range(0, len(data), 4096):
            h.pwrite(data[off:off + 4096], start + off)
        elapsed = time.monotonic() - t0
        h.flush()
        h.pwrite(b"U" * 4096, 14 * CHUNK + 100)  # after the FLUSH: may be lost
        d.send_signal(signal.SIGKILL)
        d.wait(10)
        # Fetching first, 9 chunks one after the other take 0.9 s at least.
        self.assertLess(elapsed, 0.6, "sequential first writes waited for the remote")
        self.cached(kit.uri, "writeback-local", name="second")
        h = self.connect(self.uri("disk"))
        self.assertEqual(h.pread(len(data), start), data)
        # The rest of the first and last chunk came from the remote.
        self.assertEqual(h.pread(500, 3 * CHUNK), harness.read_file(self.remote, 3 * CHUNK, 500))
        end = start + len(data)
        self.assertEqual(h.pread(12 * CHUNK - end, end), harness.read_file(self.remote, end, 12 * CHUNK - end))
        self.assertIn(h.pread(4096, 14 * CHUNK + 100),
                      (b"U" * 4096, harness.read_file(self.remote, 14 * CHUNK + 100, 4096)))

    def test_restart_does_not_refetch_from_nbdkit(self):
        kit = self.nbdkit(log_requests=True)
        d = self.cached(kit.uri, "writethrough", name="first")
        out = self.path("out.img")
        self.nbdcopy(self.uri("disk"), out)
        d.stop()
        self.assertEqual(fetched_bytes(d.log()), SIZE)
        reads_before = len(re.findall(r" Read id=\d+ offset=", kit.requests()))
        self.assertGreater(reads_before, 0)
        d2 = self.cached(kit.uri, "writethrough", name="second")
        self.nbdcopy(self.uri("disk"), out)
        self.cmp(out, self.remote)
        d2.stop()
        self.assertEqual(fetched_bytes(d2.log()), 0)
        reads_after = len(re.findall(r" Read id=\d+ offset=", kit.requests()))
        self.assertEqual(reads_after, reads_before, "nbdkit saw reads after the restart")


if __name__ == "__main__":
    unittest.main()
