"""A cache smaller than its image, pushed the way users push it: several
clients at once doing reads, writes and write-zeroes of mixed sizes (4 KiB to
1 MiB, aligned and not) against a model of the image, with eviction running
all the time, in every write mode, across a clean restart and a kill -9.

Every read is compared with the model; the whole image is compared after each
restart; the cache file's allocated size must stay near the capacity (dirty
chunks aside), and the cache must count evictions and no failed request.
"""

import json
import os
import random
import signal
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402
import remotes  # noqa: E402

import nbd  # noqa: E402

SIZE = 64 * MiB
CAPACITY = 8 * MiB
MODES = ("writethrough", "writeback", "writeback-local")
SANITIZED = "asan" in harness.BLOCKWAYD


class Workload:
    """Random I/O from several clients against a bytearray model. Requests in
    flight never overlap each other, so the model is exact."""

    SIZES = (4096, 8192, 16384, 65536, 65536 + 4096, 131072, 262144, 524288, MiB)

    def __init__(self, model, seed):
        self.model = model
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.busy = []  # (offset, end) of requests in flight
        self.failures = []
        self.counts = {"read": 0, "write": 0, "zero": 0, "flush": 0}

    def _pick(self):
        """A free range (under the lock): mixed sizes, 4 KiB-aligned or not."""
        with self.lock:
            for _ in range(1000):
                length = self.rng.choice(self.SIZES)
                if self.rng.random() < 0.3:  # unaligned offset and length
                    length = self.rng.randrange(1, length + 1)
                    offset = self.rng.randrange(0, SIZE - length + 1)
                else:
                    offset = self.rng.randrange(0, (SIZE - length) // 4096 + 1) * 4096
                end = offset + length
                if all(end <= a or b <= offset for a, b in self.busy):
                    self.busy.append((offset, end))
                    return offset, length, self.rng.random(), self.rng.randbytes(length)
        raise AssertionError("no free range found")

    def _done(self, offset, length):
        with self.lock:
            self.busy.remove((offset, offset + length))

    def client(self, uri, ops, write_share):
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            for i in range(ops):
                if self.failures:
                    return
                if i % 97 == 96:
                    h.flush()
                    with self.lock:
                        self.counts["flush"] += 1
                    continue
                offset, length, dice, data = self._pick()
                try:
                    if dice < write_share * 0.8:
                        h.pwrite(data, offset)
                        self.model[offset:offset + length] = data
                        kind = "write"
                    elif dice < write_share:
                        h.zero(length, offset)
                        self.model[offset:offset + length] = bytes(length)
                        kind = "zero"
                    else:
                        got = h.pread(length, offset)
                        kind = "read"
                        if got != bytes(self.model[offset:offset + length]):
                            self.failures.append("read of %d bytes at %d returned other bytes than the image's"
                                                 % (length, offset))
                    with self.lock:
                        self.counts[kind] += 1
                except nbd.Error as e:
                    self.failures.append("request of %d bytes at %d failed: %s" % (length, offset, e))
                finally:
                    self._done(offset, length)
        finally:
            harness.close_handle(h)

    def run(self, uri, clients, ops, write_share):
        threads = [threading.Thread(target=self.client, args=(uri, ops, write_share)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
            assert not t.is_alive(), "a client did not finish within 600 s (a request hangs)"
        if self.failures:
            raise AssertionError("; ".join(self.failures[:5]))


@unittest.skipUnless(harness.have("nbdkit"), "nbdkit missing")
class CapacityTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.csock = self.path("control.sock")

    def start(self, mode, remote_uri, chunk="64k"):
        self.port = harness.free_port()
        spec = "vm=%s,cache=%s,mode=%s,capacity=%d,chunk=%s,writeback-delay=0" % (
            remote_uri, self.path("cache"), mode, CAPACITY, chunk)
        return self.start_daemon(["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port,
                                  "--data-dir", self.path("data"), "--control-socket", self.csock,
                                  "--export", spec], name="bw-" + mode)

    def cache_stats(self):
        p = harness.run([harness.BLOCKWAY, "--socket", self.csock, "stats", "vm", "--json"], timeout=30)
        return json.loads(p.stdout)["cache"]

    def verify_image(self, uri, model, what):
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            for off in range(0, SIZE, 4 * MiB):
                got = h.pread(4 * MiB, off)
                if got != bytes(model[off:off + 4 * MiB]):
                    bad = next(i for i in range(4 * MiB) if got[i] != model[off + i])
                    self.fail("%s: the export differs from the model at byte %d" % (what, off + bad))
        finally:
            harness.close_handle(h)

    def data_outside_present_chunks(self, stats):
        """Chunks (by index) where the cache file holds data but the cache
        does not count the chunk present: disk space no eviction frees."""
        chunk = stats["chunk_size"]
        present = set()
        for off, length, flags in harness.nbd_map(self.uri(), "blockway:cache"):
            if flags & 1:
                present.update(range(off // chunk, (off + length + chunk - 1) // chunk))
        data = set()
        fd = os.open(stats["path"], os.O_RDONLY)
        try:
            pos = 0
            while pos < SIZE:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: only holes from here on
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                data.update(range(start // chunk, (end - 1) // chunk + 1))
                pos = end
        finally:
            os.close(fd)
        return sorted(data - present)[:10]

    def assert_cache_near_capacity(self, daemon):
        # Eviction runs every 100 ms and takes the cache down to 90 % of the
        # capacity; dirty chunks stay until written back.
        # An evicted chunk's bytes are punched out of the cache file once its
        # cleared present bit is persisted (a checkpoint, with an fdatasync).
        last = {}

        def settled():
            last.update(self.cache_stats())
            last["data_outside_present_chunks"] = self.data_outside_present_chunks(last)
            return (last["present_bytes"] <= CAPACITY + last["dirty_bytes"] and
                    last["file_bytes"] <= CAPACITY + last["dirty_bytes"] + MiB and
                    not last["data_outside_present_chunks"])
        try:
            harness.wait_until(settled, 20, what="eviction down to the capacity")
        except AssertionError:
            self.fail("the cache did not shrink to its capacity (%d bytes): %r" % (CAPACITY, last))
        s = self.cache_stats()
        self.assertEqual(s["failed_requests"], 0, s)
        self.assertIn("failed requests", harness.run(
            [harness.BLOCKWAY, "--socket", self.csock, "stats", "vm"], timeout=30).stdout.decode())
        return s

    def run_mode(self, mode, seed, chunk="64k"):
        remote = harness.make_random_image(self.path("remote.img"), SIZE, seed=seed)
        with open(remote, "rb") as f:
            model = bytearray(f.read())
        kit = remotes.started(self, remotes.Nbdkit(self.tmp, remote, name="nbdkit-" + mode))
        ops = 120 if SANITIZED else 400
        work = Workload(model, seed)

        d = self.start(mode, kit.uri, chunk)
        work.run(self.uri(), clients=4, ops=ops, write_share=0.3)
        s = self.assert_cache_near_capacity(d)
        self.assertGreater(s["evictions"], 0, "the workload never made the cache evict: %r" % s)

        d.stop()  # a clean restart in the middle
        d = self.start(mode, kit.uri, chunk)
        self.verify_image(self.uri(), model, mode + ", after a clean restart")
        work.run(self.uri(), clients=4, ops=ops, write_share=0.3)

        h = nbd.NBD()
        h.connect_uri(self.uri())
        h.flush()
        harness.close_handle(h)
        d.send_signal(signal.SIGKILL)  # everything acknowledged was flushed: all of it must survive
        d.wait(10)
        d = self.start(mode, kit.uri, chunk)
        self.verify_image(self.uri(), model, mode + ", after kill -9")
        work.run(self.uri(), clients=4, ops=ops, write_share=0.5)
        self.assert_cache_near_capacity(d)
        self.verify_image(self.uri(), model, mode + ", at the end")

        h = nbd.NBD()
        h.connect_uri(self.uri())
        h.flush()
        harness.close_handle(h)
        if mode == "writeback-local":
            harness.wait_until(lambda: self.cache_stats()["dirty_bytes"] == 0, 30,
                               what="background write-back to the remote")
        d.stop()
        with open(remote, "rb") as f:
            self.assertTrue(f.read() == bytes(model), "the remote image differs from the model")

    def uri(self):
        return "nbd://127.0.0.1:%d/vm" % self.port

    def test_writethrough(self):
        self.run_mode("writethrough", 101)

    def test_writeback(self):
        self.run_mode("writeback", 102)

    def test_writeback_local(self):
        self.run_mode("writeback-local", 103)

    def test_writeback_local_small_chunks(self):
        self.run_mode("writeback-local", 104, chunk="16k")


if __name__ == "__main__":
    unittest.main()
