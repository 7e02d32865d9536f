"""Bad requests, hostile clients, resource caps and configuration errors."""

import errno
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402

import nbd  # noqa: E402

SIZE = 16 * MiB


def assert_closed_by_peer(test, sock, timeout=10.0):
    """The server ends the connection: recv sees EOF or a reset in time."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return
        except socket.timeout:
            break
        if not data:
            return
    test.fail("server did not close the connection within %.0fs" % timeout)


class RequestErrorTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_random_image(self.path("d.img"), SIZE, seed=31)
        self.ro = harness.make_random_image(self.path("ro.img"), SIZE, seed=32)
        self.daemon = self.serve({"d": self.img, "ro": self.ro + ",read-only=on"},
                                 extra=["--max-request", "4M"])
        self.h = self.connect(self.uri("d"), strict=False)

    def assert_errno(self, err, fn, *args):
        with self.assertRaises(nbd.Error) as cm:
            fn(*args)
        self.assertEqual(cm.exception.errnum, err, str(cm.exception))

    def still_works(self, h=None):
        h = h or self.h
        self.assertEqual(h.pread(4096, 8192), harness.read_file(self.img, 8192, 4096))

    def test_read_beyond_end(self):
        self.assert_errno(errno.EINVAL, self.h.pread, 4096, SIZE)
        self.assert_errno(errno.EINVAL, self.h.pread, 4096, SIZE - 2048)
        self.assert_errno(errno.EINVAL, self.h.pread, 512, 2 ** 63)
        self.still_works()

    def test_write_beyond_end(self):
        self.assert_errno(errno.ENOSPC, self.h.pwrite, b"x" * 4096, SIZE)
        self.assert_errno(errno.ENOSPC, self.h.pwrite, b"x" * 4096, SIZE - 1024)
        self.assert_errno(errno.ENOSPC, self.h.zero, 4096, SIZE - 1024)
        self.assert_errno(errno.ENOSPC, self.h.trim, 4096, SIZE)
        self.assertEqual(os.path.getsize(self.img), SIZE, "the image grew")
        self.still_works()

    def test_write_to_read_only_export(self):
        h = self.connect(self.uri("ro"), strict=False)
        self.assertTrue(h.is_read_only())
        before = harness.read_file(self.ro, 0, 8192)
        self.assert_errno(errno.EPERM, h.pwrite, b"w" * 4096, 0)
        self.assert_errno(errno.EPERM, h.pwrite, b"w" * 4096, 0, nbd.CMD_FLAG_FUA)
        self.assert_errno(errno.EPERM, h.trim, 4096, 0)
        self.assert_errno(errno.EPERM, h.zero, 4096, 0)
        h.flush()  # harmless on a read-only export
        self.assertEqual(harness.read_file(self.ro, 0, 8192), before)
        self.assertEqual(h.pread(8192, 0), before)

    def test_zero_length_requests(self):
        # Zero-length requests are odd but legal on the wire: answered, in step.
        self.assertEqual(self.h.pread(0, 0), b"")
        self.h.pwrite(b"", 4096)
        self.h.trim(0, 0)
        self.h.zero(0, 0)
        self.still_works()
        h = self.connect(self.uri("d"), strict=False, structured=False)
        self.assertEqual(h.pread(0, 4096), b"")
        self.still_works(h)

    def test_offset_overflow(self):
        self.assert_errno(errno.EINVAL, self.h.pread, 512, 2 ** 64 - 256)
        self.assert_errno(errno.ENOSPC, self.h.pwrite, b"o" * 512, 2 ** 64 - 256)
        self.assert_errno(errno.EINVAL, self.h.cache, 4096, SIZE)
        self.still_works()

    def test_unknown_flag(self):
        self.assert_errno(errno.EINVAL, self.h.pread, 4096, 0, 1 << 12)
        self.assert_errno(errno.EINVAL, self.h.pwrite, b"q" * 4096, 0, nbd.CMD_FLAG_NO_HOLE)
        self.assertNotEqual(harness.read_file(self.img, 0, 4096), b"q" * 4096)
        self.still_works()

    def test_unknown_command_and_flag_raw(self):
        s, size, _ = harness.raw_connect(self.port, "d")
        self.addCleanup(s.close)
        self.assertEqual(size, SIZE)
        s.sendall(harness.request(99, 0, 0, cookie=7))
        self.assertEqual(harness.read_simple_reply(s), (errno.EINVAL, 7))
        s.sendall(harness.request(harness.CMD_READ, 0, 512, cookie=8, flags=0x4000))
        self.assertEqual(harness.read_simple_reply(s), (errno.EINVAL, 8))
        s.sendall(harness.request(harness.CMD_READ, 0, 512, cookie=9))
        self.assertEqual(harness.read_simple_reply(s), (0, 9))
        self.assertEqual(harness.recv_exact(s, 512), harness.read_file(self.img, 0, 512))
        s.sendall(harness.request(harness.CMD_DISC, 0, 0))
        assert_closed_by_peer(self, s)

    def test_request_over_max_size(self):
        self.assertEqual(self.h.get_block_size(nbd.SIZE_MAXIMUM), 4 * MiB)
        self.assert_errno(errno.EINVAL, self.h.pread, 8 * MiB, 0)
        before = harness.read_file(self.img, 0, 8 * MiB)
        self.assert_errno(errno.EINVAL, self.h.pwrite, b"B" * (8 * MiB), 0)
        # The payload was consumed: the connection is still in step.
        self.still_works()
        self.h.pwrite(b"k" * (4 * MiB), 0)
        self.h.flush()
        self.assertEqual(harness.read_file(self.img, 0, 4 * MiB), b"k" * (4 * MiB))
        self.assertEqual(harness.read_file(self.img, 4 * MiB, 4 * MiB), before[4 * MiB:])

    def test_huge_write_header_drops_connection(self):
        # A 3 GiB write is too large even to discard: the connection goes.
        s, _, _ = harness.raw_connect(self.port, "d")
        self.addCleanup(s.close)
        s.sendall(harness.request(harness.CMD_WRITE, 0, 3 << 30, cookie=1))
        assert_closed_by_peer(self, s)
        self.still_works()

    def test_bad_request_magic(self):
        s, _, _ = harness.raw_connect(self.port, "d")
        self.addCleanup(s.close)
        bad = struct.pack(">IHHQQI", 0xDEADBEEF, 0, harness.CMD_READ, 1, 0, 512)
        s.sendall(bad)
        assert_closed_by_peer(self, s)
        self.still_works()
        h2 = self.connect(self.uri("d"))
        self.still_works(h2)

    def test_client_vanishes_mid_payload(self):
        before = harness.read_file(self.img, 2 * MiB, MiB)
        for _ in range(3):
            s, _, _ = harness.raw_connect(self.port, "d")
            s.sendall(harness.request(harness.CMD_WRITE, 2 * MiB, MiB, cookie=1))
            s.sendall(b"V" * 100000)
            s.close()
        time.sleep(0.3)
        self.still_works()
        h2 = self.connect(self.uri("d"))
        self.assertEqual(h2.pread(MiB, 2 * MiB), before)
        self.assertEqual(harness.read_file(self.img, 2 * MiB, MiB), before,
                         "a half-received write reached the image")
        harness.close_handle(h2)
        harness.close_handle(self.h)
        t0 = time.monotonic()
        self.daemon.stop(timeout=40)
        self.assertLess(time.monotonic() - t0, 10, "shutdown waited on a dead connection")

    def test_garbage_instead_of_handshake(self):
        rng = random.Random(5)
        for variant in range(3):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.addCleanup(s.close)
            if variant == 1:
                harness.recv_exact(s, 18)  # read the greeting first
            payload = rng.randbytes(4096) if variant < 2 else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert_closed_by_peer(self, s)
        self.still_works()
        harness.run(["nbdinfo", self.uri("d")], timeout=20)
        self.assertTrue(self.daemon.running())

    def test_option_haggling_limits(self):
        # Fixed newstyle, then an unknown option and an oversized one: errors,
        # not a closed connection; NBD_OPT_GO afterwards still works.
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.addCleanup(s.close)
        harness.recv_exact(s, 18)
        s.sendall(struct.pack(">I", harness.FLAG_FIXED_NEWSTYLE | harness.FLAG_NO_ZEROES))
        s.sendall(struct.pack(">QII", harness.IHAVEOPT, 0x1234, 0))
        magic, opt, rtype, rlen = struct.unpack(">QIII", harness.recv_exact(s, 20))
        self.assertEqual((magic, opt), (harness.OPT_REPLY_MAGIC, 0x1234))
        self.assertEqual(rtype, 0x80000001)  # NBD_REP_ERR_UNSUP
        harness.recv_exact(s, rlen)
        big = 1 * MiB
        s.sendall(struct.pack(">QII", harness.IHAVEOPT, 7, big) + bytes(big))
        magic, opt, rtype, rlen = struct.unpack(">QIII", harness.recv_exact(s, 20))
        self.assertTrue(rtype & 0x80000000, hex(rtype))
        harness.recv_exact(s, rlen)
        name = b"d"
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", harness.IHAVEOPT, harness.OPT_GO, len(data)) + data)
        while True:
            magic, opt, rtype, rlen = struct.unpack(">QIII", harness.recv_exact(s, 20))
            harness.recv_exact(s, rlen)
            self.assertFalse(rtype & 0x80000000, hex(rtype))
            if rtype == harness.REP_ACK:
                break
        s.sendall(harness.request(harness.CMD_READ, 0, 16, cookie=3))
        self.assertEqual(harness.read_simple_reply(s), (0, 3))
        self.assertEqual(harness.recv_exact(s, 16), harness.read_file(self.img, 0, 16))


class UnixSocketPathTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_sparse_image(self.path("d.img"), MiB)
        self.sock = self.path("u.sock")

    def args(self):
        return ["--listen", "unix:" + self.sock, "--export", "d=file://" + self.img]

    def test_stale_socket_file_is_replaced(self):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.sock)
        stale.close()  # leaves a socket file nobody listens on
        d = self.start_daemon(self.args())
        h = self.connect("nbd+unix:///d?socket=" + self.sock)
        self.assertEqual(h.get_size(), MiB)
        harness.close_handle(h)
        d.stop()

    def test_regular_file_at_socket_path_is_an_error(self):
        with open(self.sock, "w") as f:
            f.write("precious")
        p = harness.run([harness.BLOCKWAYD] + self.args(), timeout=15, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(self.sock, p.stderr.decode())
        with open(self.sock) as f:
            self.assertEqual(f.read(), "precious")

    def test_second_daemon_on_live_unix_socket(self):
        """A second daemon must not take over a Unix socket a live daemon
        listens on (as TCP refuses with EADDRINUSE): it exits 2 and the first
        one keeps serving."""
        first = self.start_daemon(self.args(), name="first")
        p = subprocess.run([harness.BLOCKWAYD] + self.args(), capture_output=True, timeout=20)
        self.assertEqual(p.returncode, 2, p.stderr.decode())
        self.assertIn("another server", p.stderr.decode())
        h = self.connect("nbd+unix:///d?socket=" + self.sock)
        self.assertEqual(h.get_size(), MiB)
        harness.close_handle(h)
        first.stop()
        self.assertFalse(os.path.exists(self.sock), "the socket file outlived its daemon")


class HandshakeTimeoutTest(harness.DaemonTestCase):
    def test_silent_client_is_cut_off(self):
        img = harness.make_sparse_image(self.path("d.img"), MiB)
        port = harness.free_port()
        cfg = self.path("c.toml")
        with open(cfg, "w") as f:
            f.write('listen = ["127.0.0.1:%d"]\nhandshake-timeout = 1\n'
                    '[[export]]\nname = "d"\nuri = "file://%s"\n' % (port, img))
        d = self.start_daemon(["--config", cfg])
        self.port = port
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(silent.close)
        halfway = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(halfway.close)
        harness.recv_exact(halfway, 18)
        halfway.sendall(struct.pack(">I", harness.FLAG_FIXED_NEWSTYLE))
        t0 = time.monotonic()
        # While they wait, a well-behaved client is served.
        h = self.connect(self.uri("d"))
        self.assertEqual(h.get_size(), MiB)
        assert_closed_by_peer(self, halfway, timeout=8)
        assert_closed_by_peer(self, silent, timeout=8)
        self.assertLess(time.monotonic() - t0, 6)
        # A connection in transmission is not subject to the handshake deadline.
        time.sleep(1.2)
        self.assertEqual(h.pread(512, 0), bytes(512))
        harness.close_handle(h)
        d.stop(timeout=15)


class MemoryCapTest(harness.DaemonTestCase):
    RSS_LIMIT_KIB = 512 * 1024

    def _flood(self, sock, count, length, stop):
        hdr = b"".join(harness.request(harness.CMD_READ, 0, length, cookie=i) for i in range(count))
        view = memoryview(hdr)
        sock.settimeout(0.5)
        while view and not stop.is_set():
            try:
                n = sock.send(view[:65536])
                view = view[n:]
            except socket.timeout:
                continue
            except OSError:
                return

    def test_read_flood_without_reading_replies(self):
        img = harness.make_sparse_image(self.path("d.img"), 64 * MiB)
        d = self.serve({"d": img}, extra=["--max-inflight", "128M", "--max-request", "32M",
                                          "--shutdown-timeout", "3"])
        base = harness.rss_kib(d.pid)
        s, _, _ = harness.raw_connect(self.port, "d")
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # do not soak up replies
        stop = threading.Event()
        t = threading.Thread(target=self._flood, args=(s, 10000, 32 * MiB, stop), daemon=True)
        t.start()
        self.addCleanup(t.join, 5)
        self.addCleanup(stop.set)
        peak = base
        end = time.monotonic() + 6
        while time.monotonic() < end:
            peak = max(peak, harness.rss_kib(d.pid))
            time.sleep(0.1)
        self.assertLess(peak, self.RSS_LIMIT_KIB,
                        "daemon RSS reached %d MiB (started at %d MiB)" % (peak >> 10, base >> 10))
        self.assertGreater(peak - base, 16 * 1024, "the flood did not reach the daemon at all?")
        # Someone else is still served while the flood is stuck.
        h = self.connect(self.uri("d"))
        self.assertEqual(h.pread(MiB, 0), bytes(MiB))
        harness.run(["nbdinfo", self.uri("d")], timeout=20)
        harness.close_handle(h)
        peak = max(peak, harness.rss_kib(d.pid))
        self.assertLess(peak, self.RSS_LIMIT_KIB)
        # SIGTERM ends even the stuck connection (after the 3 s shutdown timeout).
        t0 = time.monotonic()
        d.stop(timeout=20)
        self.assertLess(time.monotonic() - t0, 15)

    def test_inflight_cap_below_the_largest_request(self):
        # --max-inflight may be below --max-request: one request is always
        # admitted, so a 32 MiB read or write still runs (alone), and many
        # small ones in flight at once are all answered.
        img = harness.make_random_image(self.path("d.img"), 64 * MiB, seed=31)
        self.serve({"d": img}, extra=["--max-inflight", "4M", "--max-request", "32M"])
        h = self.connect(self.uri("d"))
        self.assertEqual(h.get_block_size(nbd.SIZE_MAXIMUM), 32 * MiB)
        self.assertTrue(h.pread(32 * MiB, 0) == harness.read_file(img, 0, 32 * MiB))
        data = os.urandom(32 * MiB)
        h.pwrite(data, 32 * MiB)
        h.flush()
        self.assertTrue(harness.read_file(img, 32 * MiB, 32 * MiB) == data)
        bufs = [(nbd.Buffer(256 * 1024), off) for off in range(0, 32 * MiB, 256 * 1024)]
        cookies = [h.aio_pread(buf, off) for buf, off in bufs]  # 128 x 256 KiB: 32 MiB asked at once
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            self.assertTrue(h.aio_command_completed(c))
        expect = harness.read_file(img, 0, 32 * MiB)
        for buf, off in bufs:
            self.assertTrue(buf.to_bytearray() == expect[off:off + 256 * 1024], "wrong data at %d" % off)

    def test_small_request_flood(self):
        img = harness.make_sparse_image(self.path("d.img"), 64 * MiB)
        d = self.serve({"d": img}, extra=["--max-inflight", "128M"])
        base = harness.rss_kib(d.pid)
        s, _, _ = harness.raw_connect(self.port, "d")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stop = threading.Event()
        t = threading.Thread(target=self._flood, args=(s, 200000, 4096, stop), daemon=True)
        t.start()
        peak = base
        end = time.monotonic() + 4
        while time.monotonic() < end:
            peak = max(peak, harness.rss_kib(d.pid))
            time.sleep(0.1)
        stop.set()
        t.join(5)
        s.close()
        self.assertLess(peak, self.RSS_LIMIT_KIB,
                        "daemon RSS reached %d MiB (started at %d MiB)" % (peak >> 10, base >> 10))
        h = self.connect(self.uri("d"))
        self.assertEqual(h.pread(4096, 0), bytes(4096))
        harness.close_handle(h)
        d.stop(timeout=40)


class ConfigErrorTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_sparse_image(self.path("d.img"), MiB)
        self.port = harness.free_port()

    def expect_config_error(self, args, *needles):
        pid_file = self.path("never.pid")
        p = harness.run([harness.BLOCKWAYD, "--pid-file", pid_file] + args,
                        timeout=15, check=False)
        err = p.stderr.decode(errors="replace")
        self.assertEqual(p.returncode, 2, "exit %d, stderr: %s" % (p.returncode, err))
        for n in needles:
            self.assertIn(n, err)
        self.assertFalse(os.path.exists(pid_file), "pid file written by a daemon that failed")
        return err

    def listen(self):
        return ["--listen", "127.0.0.1:%d" % self.port]

    def test_unknown_export_option(self):
        self.expect_config_error(self.listen() + ["--export", "a=file://%s,bogus=1" % self.img],
                                 "bogus")

    def test_bad_read_only_value(self):
        self.expect_config_error(self.listen() + ["--export", "a=file://%s,read-only=maybe" % self.img],
                                 "read-only", "maybe")

    def test_bad_listen_addresses(self):
        exp = ["--export", "a=file://" + self.img]
        for addr in ("127.0.0.1", "127.0.0.1:99999", "::1:80", "unix:relative.sock", "[::1]80"):
            self.expect_config_error(["--listen", addr] + exp, addr)

    def test_missing_image(self):
        missing = self.path("nope.img")
        self.expect_config_error(self.listen() + ["--export", "a=file://" + missing], missing)

    def test_duplicate_export(self):
        self.expect_config_error(self.listen() + ["--export", "a=file://" + self.img,
                                                  "--export", "a=file://" + self.img], "'a'", "twice")

    def test_unknown_scheme_and_not_a_uri(self):
        self.expect_config_error(self.listen() + ["--export", "a=bogus://x/y"], "bogus")
        self.expect_config_error(self.listen() + ["--export", "a=" + self.img], self.img)

    def test_bad_toml(self):
        cfg = self.path("bad.toml")
        with open(cfg, "w") as f:
            f.write('listen = ["127.0.0.1:%d"\n[[export]]\nname = "a"\n' % self.port)
        self.expect_config_error(["--config", cfg], cfg)

    def test_unknown_toml_setting(self):
        cfg = self.path("c.toml")
        with open(cfg, "w") as f:
            f.write('frobnicate = 3\n')
        self.expect_config_error(["--config", cfg], "frobnicate")

    def test_unknown_toml_export_key(self):
        cfg = self.path("c.toml")
        with open(cfg, "w") as f:
            f.write('listen = ["127.0.0.1:%d"]\n[[export]]\nname = "a"\nuri = "file://%s"\n'
                    'colour = "blue"\n' % (self.port, self.img))
        self.expect_config_error(["--config", cfg], "colour")

    def test_missing_config_file(self):
        cfg = self.path("absent.toml")
        self.expect_config_error(["--config", cfg], cfg)

    def test_bad_sizes_and_levels(self):
        exp = self.listen() + ["--export", "a=file://" + self.img]
        self.expect_config_error(exp + ["--max-inflight", "1k"], "max-inflight")
        self.expect_config_error(exp + ["--max-request", "12x"], "max-request")
        self.expect_config_error(exp + ["--log-level", "loud"], "loud")
        self.expect_config_error(exp + ["--default-export", "zz"], "zz")
        self.expect_config_error(exp + ["--frobnicate"], "--frobnicate")

    def test_port_in_use(self):
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            port = blocker.getsockname()[1]
            p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % port,
                             "--export", "a=file://" + self.img,
                             "--pid-file", self.path("x.pid")], timeout=15, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(str(port), p.stderr.decode())
        self.assertFalse(os.path.exists(self.path("x.pid")))

    def test_valid_config_file(self):
        cfg = self.path("ok.toml")
        sock = self.path("ok.sock")
        with open(cfg, "w") as f:
            f.write('listen = ["127.0.0.1:%d", "unix:%s"]\ndefault-export = "a"\nthreads = 2\n'
                    'max-inflight = "64M"\nmax-request = "8M"\nlog-level = "debug"\n'
                    '[[export]]\nname = "a"\nuri = "file://%s"\ndescription = "from toml"\n'
                    '[[export]]\nname = "b"\nuri = "file://%s"\nread-only = true\n'
                    % (self.port, sock, self.img, self.img))
        d = self.start_daemon(["--config", cfg])
        h = self.connect("nbd://127.0.0.1:%d" % self.port)  # empty name: the default export
        self.assertEqual(h.get_export_name(), "")
        self.assertEqual(h.get_size(), MiB)
        self.assertFalse(h.is_read_only())
        self.assertEqual(h.get_block_size(nbd.SIZE_MAXIMUM), 8 * MiB)
        b = self.connect("nbd+unix:///b?socket=" + sock)
        self.assertTrue(b.is_read_only())
        harness.close_handle(h)
        harness.close_handle(b)
        d.stop()


if __name__ == "__main__":
    unittest.main()
