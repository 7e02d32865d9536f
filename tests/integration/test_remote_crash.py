"""A cached export rides through a remote that crashes under load.

The remote is nbdkit with its cache filter in writeback mode: writes stay in
nbdkit's memory-backed cache until a FLUSH, so a SIGKILL of nbdkit really
loses every write it acknowledged since the last flush, as a storage server
with a volatile write cache does. While a client keeps 16 writes in flight
and sends a FLUSH every 100 writes, the remote is killed and restarted every
few seconds. Every FLUSH must succeed (the gateway still holds the bytes the
remote lost and writes them again on the new session), and at the end the
remote's image must be exactly what the client wrote.
"""

import json
import os
import random
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402
import remotes  # noqa: E402

import nbd  # noqa: E402

SIZE = 32 * MiB
SANITIZED = "asan" in harness.BLOCKWAYD


@unittest.skipUnless(harness.have("nbdkit"), "nbdkit missing")
class RemoteCrashTest(harness.DaemonTestCase):
    def run_mode(self, mode, sizes, restarts=5, warm=False, capacity=None, align=4096):
        img = harness.make_random_image(self.path("remote.img"), SIZE, seed=31)
        with open(img, "rb") as f:
            model = bytearray(f.read())
        kit = remotes.started(self, remotes.Nbdkit(self.tmp, img, filters=["cache"], params=["cache=writeback"]))
        self.port = harness.free_port()
        csock = self.path("control.sock")
        spec = "vm=%s,cache=%s,mode=%s,retry-timeout=30,writeback-delay=0" % (kit.uri, self.path("cache"), mode)
        if capacity:
            spec += ",capacity=%d" % capacity
        d = self.start_daemon(["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port,
                               "--data-dir", self.path("data"), "--control-socket", csock, "--export", spec])
        uri = "nbd://127.0.0.1:%d/vm" % self.port
        if warm:  # every chunk present: the cache holds every byte a writethrough write leaves
            harness.run(["nbdcopy", uri, "null:"], timeout=120)

        h = nbd.NBD()
        h.connect_uri(uri)
        self.addCleanup(harness.close_handle, h)
        rng = random.Random(7)
        stop = threading.Event()      # the test is over: the killer may end
        restarted = threading.Event()  # the last restart is done
        kill_now = threading.Event()  # the moment to kill the remote has come (see killer)
        restarts_done = []

        def lost_reports():
            out = harness.run([harness.BLOCKWAY, "--socket", csock, "stats", "vm", "--json"], timeout=30).stdout
            return json.loads(out)["cache"]["lost_write_reports"]

        def killer():
            # This thread started the last nbdkit, which ends with the thread
            # (PR_SET_PDEATHSIG): it waits for the end of the test. In
            # writethrough it kills half-way between two FLUSHes (the remote
            # holds acknowledged, unflushed writes there); in the write-back
            # modes, as soon as a FLUSH was sent, while its write-back runs.
            # At least `restarts` times, and on (up to twice that) until the
            # remote has really lost something.
            while len(restarts_done) < 2 * restarts:
                if len(restarts_done) >= restarts and lost_reports() > 0:
                    break
                if stop.wait(1.0):
                    return
                kill_now.clear()
                kill_now.wait(5)
                kit.kill()
                time.sleep(0.2)
                kit.start()
                restarts_done.append(1)
            stop.wait(1.0)
            restarted.set()
            stop.wait()

        t = threading.Thread(target=killer)
        t.start()

        def end_killer():
            stop.set()
            t.join(30)
        self.addCleanup(end_killer)
        flushes = flush_errors = writes = 0
        inflight = {}  # cookie -> (offset, data)
        try:
            deadline = time.monotonic() + 180
            while not restarted.is_set() and time.monotonic() < deadline:
                while len(inflight) < 16:
                    length = rng.choice(sizes)
                    offset = rng.randrange(0, (SIZE - length) // align + 1) * align
                    if any(not (offset + length <= o or o + len(dt) <= offset) for o, dt in inflight.values()):
                        continue
                    data = rng.randbytes(length)
                    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
                    inflight[cookie] = (offset, data)
                h.poll(1)
                for cookie in list(inflight):
                    if h.aio_command_completed(cookie):  # raises on error: a write must not fail
                        offset, data = inflight.pop(cookie)
                        model[offset:offset + len(data)] = data
                        writes += 1
                        if writes % 100 == 50 and mode == "writethrough":
                            kill_now.set()
                        if writes % 100 == 0:
                            # FLUSH covers the writes completed so far.
                            flushes += 1
                            fc = h.aio_flush()
                            if mode != "writethrough":
                                kill_now.set()
                            try:
                                while not h.aio_command_completed(fc):
                                    h.poll(1)
                            except nbd.Error as e:
                                flush_errors += 1
                                print("FLUSH failed: %s" % e, file=sys.stderr)
            while inflight:
                h.poll(1)
                for cookie in list(inflight):
                    if h.aio_command_completed(cookie):
                        offset, data = inflight.pop(cookie)
                        model[offset:offset + len(data)] = data
                        writes += 1
            h.flush()
        except BaseException:
            print(d.log(), file=sys.stderr)
            raise
        stats = json.loads(harness.run([harness.BLOCKWAY, "--socket", csock, "stats", "vm", "--json"]).stdout)
        cache = stats["cache"]
        print("%s: %d writes, %d flushes, %d failed, %d remote restarts, %d lost-write reports, "
              "%d chunks written again" % (mode, writes, flushes, flush_errors, len(restarts_done),
                                            cache["lost_write_reports"], cache["replayed_chunks"]),
              file=sys.stderr)
        self.assertGreaterEqual(len(restarts_done), restarts)
        self.assertEqual(flush_errors, 0, "client FLUSHes failed while the remote restarted:\n" + d.log())
        self.assertGreater(cache["lost_write_reports"], 0, "the remote never lost acknowledged writes: %r" % cache)
        self.assertEqual(cache["failed_requests"], 0, cache)
        if mode == "writeback-local":  # its FLUSH does not wait for the remote
            harness.wait_until(lambda: json.loads(harness.run(
                [harness.BLOCKWAY, "--socket", csock, "stats", "vm", "--json"]).stdout)["cache"]["dirty_bytes"] == 0,
                60, what="write-back to the remote")
        d.stop()
        end_killer()
        kit.kill()
        with open(img, "rb") as f:
            got = f.read()
        if got != bytes(model):
            bad = next(i for i in range(SIZE) if got[i] != model[i])
            self.fail("the remote image differs from what the client wrote and flushed, first at byte %d" % bad)

    def test_writeback(self):
        self.run_mode("writeback", (4096, 16384, 65536, 262144))

    def test_writeback_local(self):
        self.run_mode("writeback-local", (4096, 65536, 262144))

    def test_writethrough_over_a_warm_cache(self):
        self.run_mode("writethrough", (4096, 16384, 65536), warm=True)

    def test_writethrough_whole_chunks_with_a_capacity(self):
        # Whole-chunk writes are allocated in the cache, so it holds them even
        # when cold; the capacity makes eviction run, and it must not drop a
        # chunk the remote may still lose.
        self.run_mode("writethrough", (65536, 131072, 262144), capacity=8 * MiB, align=65536)

    def test_writethrough_partial_writes_to_a_cold_cache_fail_the_flush_honestly(self):
        """4 KiB writes into chunks the cache does not hold cannot be written
        again: a FLUSH after the remote lost them fails with EIO (once), the
        log says why, and the export goes on working."""
        img = harness.make_random_image(self.path("remote.img"), SIZE, seed=32)
        kit = remotes.started(self, remotes.Nbdkit(self.tmp, img, filters=["cache"], params=["cache=writeback"]))
        self.port = harness.free_port()
        spec = "vm=%s,cache=%s,mode=writethrough,retry-timeout=30" % (kit.uri, self.path("cache"))
        d = self.start_daemon(["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port,
                               "--data-dir", self.path("data"), "--control-socket", "off", "--export", spec])
        h = nbd.NBD()
        h.connect_uri("nbd://127.0.0.1:%d/vm" % self.port)
        self.addCleanup(harness.close_handle, h)
        h.pwrite(b"\x42" * 4096, 8 * MiB + 4096)  # acknowledged by the remote, lost when it dies
        kit.kill()
        kit.start()
        with self.assertRaises(nbd.Error) as cm:
            h.flush()
        self.assertEqual(cm.exception.errnum, 5)  # EIO
        self.assertIn("the cache does not hold", d.log())
        h.flush()  # reported once
        h.pwrite(b"\x43" * 4096, 4096)
        h.flush()
        self.assertEqual(harness.read_file(img, 4096, 4096), b"\x43" * 4096)
        d.stop()


if __name__ == "__main__":
    unittest.main()
