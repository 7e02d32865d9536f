"""Graceful shutdown under load: SIGTERM and SIGINT while clients write, and a
second signal that forces the exit."""

import os
import signal
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402

import nbd  # noqa: E402

BLOCK = 4096


def block_data(i):
    """Unique, recognisable content for block i."""
    tag = b"blk%08d." % i
    return (tag * (BLOCK // len(tag) + 1))[:BLOCK]


def slurp(path):
    with open(path, errors="replace") as f:
        return f.read()


class ShutdownTest(harness.DaemonTestCase):
    def _acked_writes_survive(self, sig):
        size = 256 * MiB
        img = harness.make_sparse_image(self.path("d.img"), size)
        d = self.serve({"d": img})
        h = nbd.NBD()
        self.addCleanup(harness.close_handle, h)
        h.connect_uri(self.uri("d"))
        nblocks = size // BLOCK
        cookies = {}   # cookie -> block index
        buffers = {}   # cookie -> nbd.Buffer (kept alive until completion)
        acked = []
        failed = 0
        signalled_at = None
        i = 0
        t0 = time.monotonic()
        deadline = t0 + 40

        def retire():
            nonlocal failed
            for c in list(cookies):
                try:
                    done = h.aio_command_completed(c)
                except nbd.Error:
                    failed += 1
                    done = True
                else:
                    if done:
                        acked.append(cookies[c])
                if done:
                    del cookies[c]
                    del buffers[c]

        while time.monotonic() < deadline:
            if h.aio_is_dead() or h.aio_is_closed():
                break
            try:
                while h.aio_in_flight() < 32 and i < nblocks:
                    buf = nbd.Buffer.from_bytearray(bytearray(block_data(i)))
                    c = h.aio_pwrite(buf, i * BLOCK)
                    cookies[c] = i
                    buffers[c] = buf
                    i += 1
                h.poll(1)
            except nbd.Error:
                break
            retire()
            if signalled_at is None and (len(acked) >= 5000 or time.monotonic() - t0 > 1.0):
                os.kill(d.pid, sig)
                signalled_at = time.monotonic()
            if signalled_at is None and i >= nblocks and h.aio_in_flight() == 0:
                break
        retire()
        if signalled_at is None:
            os.kill(d.pid, sig)
            signalled_at = time.monotonic()
        rc = d.wait(40)
        self.assertEqual(rc, 0, d.log())
        self.assertLess(time.monotonic() - signalled_at, 35)
        retire()
        self.assertGreater(len(acked), 100, "too few writes were acknowledged to judge")
        # Every acknowledged write is in the image, exactly.
        with open(img, "rb") as f:
            for b in acked:
                f.seek(b * BLOCK)
                self.assertEqual(f.read(BLOCK), block_data(b), "acknowledged block %d lost" % b)
        self.assertFalse(os.path.exists(d.pid_file))
        return d

    def test_sigterm_keeps_acknowledged_writes(self):
        self._acked_writes_survive(signal.SIGTERM)

    def test_sigint_keeps_acknowledged_writes(self):
        self._acked_writes_survive(signal.SIGINT)

    def test_sighup_keeps_acknowledged_writes(self):
        """SIGHUP (a closed terminal, or `kill -HUP` meant as a reload, which
        blockwayd does not have) stops it cleanly too: it killed the daemon
        at once (exit by signal, pid file left)."""
        d = self._acked_writes_survive(signal.SIGHUP)
        self.assertIn("received SIGHUP, shutting down (blockwayd has no configuration reload", d.full_log())

    def test_idle_clients_do_not_delay_shutdown(self):
        img = harness.make_sparse_image(self.path("d.img"), 8 * MiB)
        d = self.serve({"d": img}, unix=True)
        a = self.connect(self.uri("d"))
        b = self.connect(self.unix_uri("d"))
        a.pwrite(b"i" * 4096, 0)
        # One client still in the handshake (greeting read, nothing sent).
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.addCleanup(s.close)
        harness.recv_exact(s, 18)
        t0 = time.monotonic()
        d.stop(signal.SIGTERM, timeout=40)
        self.assertLess(time.monotonic() - t0, 5, "idle connections held up the shutdown")
        self.assertEqual(harness.read_file(img, 0, 4096), b"i" * 4096)
        self.assertFalse(os.path.exists(self.sock), "Unix socket left behind")
        with self.assertRaises(nbd.Error):
            b.pread(512, 0)

    def test_second_sigterm_forces_exit(self):
        img = harness.make_sparse_image(self.path("d.img"), 64 * MiB)
        d = self.serve({"d": img})
        # A client that asks for data and never reads it keeps a session busy.
        s, _, _ = harness.raw_connect(self.port, "d")
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"".join(harness.request(harness.CMD_READ, 0, 8 * MiB, cookie=k) for k in range(64)))
        time.sleep(0.5)
        d.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        self.assertTrue(d.running(), "graceful shutdown did not wait for the busy session")
        # Meanwhile nobody new is let in (once the loops got to closing the
        # listener: on a loaded machine that can take more than the second
        # above, so poll, bounded).
        def refused():
            try:
                c = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                return True
            try:
                c.settimeout(5)
                return not c.recv(18)  # accepted then closed counts as refused
            except OSError:
                return True
            finally:
                c.close()
        harness.wait_until(refused, 10, interval=0.2, what="the listener to refuse new clients")
        self.assertTrue(d.running(), "graceful shutdown did not wait for the busy session")
        t0 = time.monotonic()
        rc = d.stop(signal.SIGTERM, timeout=10)
        self.assertEqual(rc, 0)
        self.assertLess(time.monotonic() - t0, 5)


@unittest.skipUnless(harness.have("fio"), "fio missing")
class FioShutdownTest(harness.DaemonTestCase):
    def _fio_then_signal(self, sig):
        img = harness.make_sparse_image(self.path("f.img"), 256 * MiB)
        d = self.serve({"f": img}, extra=["--log-level", "info"])
        out = self.path("fio.out")
        with open(out, "wb") as fo:
            fio = subprocess.Popen(
                ["fio", "--name=w", "--ioengine=nbd", "--uri=" + self.uri("f"), "--rw=randwrite",
                 "--bs=4k", "--iodepth=16", "--numjobs=2", "--size=128M", "--offset_increment=128M",
                 "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1",
                 "--time_based", "--runtime=60"], stdout=fo, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.addCleanup(harness.kill_pid, fio)
        self.addCleanup(lambda: fio.poll() is None and fio.wait(10))
        # Wait until fio has put data on the disk, then pull the plug politely.
        harness.wait_until(lambda: os.stat(img).st_blocks * 512 > 4 * MiB or fio.poll() is not None,
                           30, what="fio to start writing")
        self.assertIsNone(fio.poll(), "fio ended before the signal: " + slurp(out)[-2000:])
        time.sleep(1.0)
        t0 = time.monotonic()
        d.stop(sig, timeout=40)
        self.assertLess(time.monotonic() - t0, 35)
        try:
            fio.wait(60)
        except subprocess.TimeoutExpired:
            self.fail("fio hung after the server went away")
        text = slurp(out)
        for bad in ("verify failed", "bad magic", "bad header", "verify: bad"):
            self.assertNotIn(bad, text, "fio found corrupted data before shutdown:\n" + text[-3000:])
        self.assertIn("received %s" % ("SIGINT" if sig == signal.SIGINT else "SIGTERM"), d.log())

    def test_sigterm_during_fio(self):
        self._fio_then_signal(signal.SIGTERM)

    def test_sigint_during_fio(self):
        self._fio_then_signal(signal.SIGINT)


if __name__ == "__main__":
    unittest.main()
