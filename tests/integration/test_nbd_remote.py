"""blockwayd in front of a real NBD server (nbdkit): the nbd:// backend,
its reconnect layer, and what a user sees when the remote misbehaves."""

import errno
import os
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


class Nbdkit(harness.PeerProcess):
    """One nbdkit process serving a file, on a TCP port or a Unix socket.

    nbdkit sets PR_SET_PDEATHSIG(SIGTERM): it shuts down when the *thread*
    that started it ends. Start it from a thread that outlives it (the test's
    main thread, or a helper thread joined only after the last use)."""

    def __init__(self, workdir, img, port=None, sock=None, filters=(), params=(), name="nbdkit"):
        self.workdir = workdir
        self.img = img
        self.port = port
        self.sock = sock
        self.filters = list(filters)
        self.params = list(params)
        self.log_path = os.path.join(workdir, name + ".log")
        self.proc = None

    def start(self, timeout=10.0):
        args = ["nbdkit", "-f"]
        if self.sock:
            if os.path.exists(self.sock):
                os.unlink(self.sock)
            args += ["-U", self.sock]
        else:
            args += ["-i", "127.0.0.1", "-p", str(self.port)]
        args += ["--filter=" + f for f in self.filters]
        args += ["file", self.img] + self.params
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("nbdkit exited with %d:\n%s" % (self.proc.returncode, self.log()))
            try:
                if self.sock:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.sock)
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError("nbdkit did not listen within %.0fs:\n%s" % (timeout, self.log()))

    @property
    def uri(self):
        if self.sock:
            return "nbd+unix:///?socket=" + self.sock
        return "nbd://127.0.0.1:%d/" % self.port


@unittest.skipUnless(harness.have("nbdkit"), "nbdkit missing")
class NbdRemoteTestCase(harness.DaemonTestCase):
    def start_nbdkit(self, img, unix=False, filters=(), params=(), port=None, name="nbdkit"):
        if unix:
            kit = Nbdkit(self.tmp, img, sock=self.path(name + ".sock"), filters=filters,
                         params=params, name=name)
        else:
            kit = Nbdkit(self.tmp, img, port=port or harness.free_port(), filters=filters,
                         params=params, name=name)
        self.addCleanup(kit.kill)
        return kit.start()

    def serve_remote(self, uri, options=""):
        """blockwayd exporting `uri` as export 'r' on a free port."""
        self.port = harness.free_port()
        spec = "r=" + uri + ("," + options if options else "")
        return self.start_daemon(["--log-level", "debug", "--listen", "127.0.0.1:%d" % self.port,
                                  "--export", spec])

    def start_expecting_failure(self, spec, timeout=30):
        p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                         "--export", spec], timeout=timeout, check=False)
        return p.returncode, p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")


class DataPathTest(NbdRemoteTestCase):
    SIZE = 256 * MiB

    def copy_in_and_out(self, kit, img, size):
        src = harness.make_random_image(self.path("src.img"), size, seed=7)
        daemon = self.serve_remote(kit.uri)
        uri = self.uri("r")
        p = harness.run(["nbdcopy", src, uri], timeout=300, check=False)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace") + daemon.log())
        harness.run(["cmp", src, img], timeout=120)  # reached nbdkit's file
        out = self.path("out.img")
        harness.run(["nbdcopy", uri, out], timeout=300)
        harness.run(["cmp", src, out], timeout=120)
        daemon.stop(timeout=30)

    def test_nbdcopy_256m_in_and_out_over_tcp(self):
        img = harness.make_sparse_image(self.path("remote.img"), self.SIZE)
        kit = self.start_nbdkit(img)
        self.copy_in_and_out(kit, img, self.SIZE)

    def test_nbdcopy_in_and_out_over_unix_socket(self):
        img = harness.make_sparse_image(self.path("remote.img"), 64 * MiB)
        kit = self.start_nbdkit(img, unix=True)
        self.assertTrue(kit.uri.startswith("nbd+unix:///?socket="))
        self.copy_in_and_out(kit, img, 64 * MiB)

    def test_export_reports_the_remote_size_and_flags(self):
        img = harness.make_sparse_image(self.path("remote.img"), 48 * MiB)
        kit = self.start_nbdkit(img)
        self.serve_remote(kit.uri)
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(self.uri("r"))
        self.addCleanup(harness.close_handle, h)
        self.assertEqual(h.get_size(), 48 * MiB)
        self.assertTrue(h.can_flush())
        self.assertTrue(h.can_fua())
        self.assertTrue(h.can_trim())
        self.assertTrue(h.can_zero())
        self.assertTrue(h.can_multi_conn())
        self.assertFalse(h.is_read_only())
        self.assertTrue(h.can_meta_context("base:allocation"))
        # Holes in the remote show as holes here.
        h.pwrite(b"\x11" * 65536, 8 * MiB)
        extents = []
        h.block_status(48 * MiB, 0,
                       lambda ctx, off, ents, err: extents.extend(ents) if ctx == "base:allocation" else 0)
        self.assertGreaterEqual(len(extents), 4)
        self.assertEqual(extents[1] & 1, 1, "the start of the image should be a hole: %r" % extents)

    def test_read_only_remote_and_zero_trim_pass_through(self):
        img = harness.make_random_image(self.path("remote.img"), 16 * MiB, seed=3)
        kit = self.start_nbdkit(img)
        self.serve_remote(kit.uri)
        h = self.connect(self.uri("r"))
        h.zero(1 * MiB, 2 * MiB)
        h.trim(1 * MiB, 4 * MiB)
        h.flush()
        self.assertEqual(harness.read_file(img, 2 * MiB, 1 * MiB), b"\0" * MiB)
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_qd16_over_four_connections(self):
        img = harness.make_sparse_image(self.path("remote.img"), 512 * MiB)
        kit = self.start_nbdkit(img)
        daemon = self.serve_remote(kit.uri, "connections=4")
        self.assertIn("4 connection(s)", daemon.log())
        p = harness.run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + self.uri("r"),
                         "--rw=randrw", "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=64M",
                         "--offset_increment=128M", "--verify=crc32c", "--verify_fatal=1",
                         "--runtime=60", "--group_reporting"],
                        timeout=180, cwd=self.tmp, check=False)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace")[-3000:])
        self.assertNotIn(b"verify:", p.stderr)

    def test_flush_is_forwarded_to_the_remote(self):
        img = harness.make_sparse_image(self.path("remote.img"), 16 * MiB)
        logfile = self.path("nbdkit-calls.log")
        kit = self.start_nbdkit(img, filters=["log"], params=["logfile=" + logfile])
        self.serve_remote(kit.uri)
        h = self.connect(self.uri("r"))
        h.pwrite(b"\xab" * 8192, 4096)
        h.flush()
        self.assertEqual(harness.read_file(img, 4096, 8192), b"\xab" * 8192)
        h.pwrite(b"\xcd" * 4096, 0, nbd.CMD_FLAG_FUA)
        def logged_flush():
            with open(logfile) as f:
                return "Flush" in f.read()
        harness.wait_until(logged_flush, 5, what="Flush in nbdkit's log")
        with open(logfile) as f:
            calls = f.read()
        self.assertIn("Write", calls)
        self.assertRegex(calls, r"Write .*fua=1")

    def test_slow_remote(self):
        img = harness.make_random_image(self.path("remote.img"), 16 * MiB, seed=9)
        kit = self.start_nbdkit(img, filters=["delay"], params=["rdelay=2ms", "wdelay=2ms"])
        self.serve_remote(kit.uri)
        out = self.path("out.img")
        harness.run(["nbdcopy", self.uri("r"), out], timeout=120)
        harness.run(["cmp", img, out])

    def test_remote_errors_reach_the_client_and_go_away(self):
        img = harness.make_random_image(self.path("remote.img"), 16 * MiB, seed=11)
        errfile = self.path("ERR")
        kit = self.start_nbdkit(img, filters=["error"],
                                params=["error-rate=100%", "error-file=" + errfile])
        daemon = self.serve_remote(kit.uri, "retry-timeout=3")
        h = self.connect(self.uri("r"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        open(errfile, "w").close()
        start = time.monotonic()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(4096, 8192)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertLess(time.monotonic() - start, 2.0, "an EIO from the remote is not retried")
        os.unlink(errfile)
        self.assertEqual(h.pread(4096, 8192), harness.read_file(img, 8192, 4096))
        self.assertNotIn("reconnect", daemon.log())


class ReconnectTest(NbdRemoteTestCase):
    def test_remote_restart_mid_run_loses_nothing_acknowledged(self):
        img = harness.make_sparse_image(self.path("remote.img"), 64 * MiB)
        port = harness.free_port()
        kit = self.start_nbdkit(img, port=port)
        daemon = self.serve_remote(kit.uri, "retry-timeout=30")
        h = self.connect(self.uri("r"))
        flushed = {}
        for i in range(32):
            data = bytes([i + 1]) * 65536
            h.pwrite(data, i * 65536)
            flushed[i * 65536] = data
        h.flush()

        # A reader keeps going through the outage.
        errors = []
        done = threading.Event()

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
                rh.shutdown()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.3)
        kit.kill()
        time.sleep(1.5)
        kit.start()
        time.sleep(0.5)
        # Writes and flushes work again on the new session.
        h.pwrite(b"\xee" * 4096, 40 * MiB)
        h.flush()
        done.set()
        t.join(60)
        self.assertFalse(t.is_alive())
        self.assertEqual(errors, [])
        for off, data in flushed.items():
            self.assertEqual(harness.read_file(img, off, len(data)), data)
        self.assertEqual(harness.read_file(img, 40 * MiB, 4096), b"\xee" * 4096)
        self.assertIn("reconnected", daemon.log())
        daemon.stop(timeout=30)

    def test_unflushed_writes_before_a_restart_fail_the_next_flush(self):
        img = harness.make_sparse_image(self.path("remote.img"), 16 * MiB)
        port = harness.free_port()
        kit = self.start_nbdkit(img, port=port)
        self.serve_remote(kit.uri, "retry-timeout=30")
        h = self.connect(self.uri("r"))
        h.pwrite(b"\x42" * 4096, 0)  # acknowledged, never flushed on that session
        kit.kill()
        kit.start()
        with self.assertRaises(nbd.Error) as cm:
            h.flush()
        self.assertEqual(cm.exception.errnum, errno.EIO)
        h.flush()  # reported once; the export works on
        h.pwrite(b"\x43" * 4096, 4096)
        h.flush()
        self.assertEqual(harness.read_file(img, 4096, 4096), b"\x43" * 4096)

    def test_remote_down_longer_than_retry_timeout_fails_with_eio_in_time(self):
        img = harness.make_random_image(self.path("remote.img"), 16 * MiB, seed=5)
        port = harness.free_port()
        kit = self.start_nbdkit(img, port=port)
        daemon = self.serve_remote(kit.uri, "retry-timeout=3")
        h = self.connect(self.uri("r"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        kit.kill()
        self.assert_requests_fail_with_eio_in_time(h, retry_timeout=3, slack=5)
        self.assertTrue(daemon.running())
        kit.start()
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        daemon.stop(timeout=30)

    def test_hung_remote_hits_io_timeout(self):
        img = harness.make_random_image(self.path("remote.img"), 16 * MiB, seed=6)
        kit = self.start_nbdkit(img, filters=["delay"], params=["rdelay=20"])  # 20 s per read
        daemon = self.serve_remote(kit.uri, "io-timeout=1,retry-timeout=2")
        h = self.connect(self.uri("r"))
        start = time.monotonic()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(4096, 0)
        took = time.monotonic() - start
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertLess(took, 6.0)
        self.assertIn("no reply within 1000 ms", daemon.log())


class StartupErrorTest(NbdRemoteTestCase):
    def assert_refused(self, spec, *needles):
        rc, out = self.start_expecting_failure(spec)
        self.assertEqual(rc, 2, out)
        for n in needles:
            self.assertIn(n, out)

    def test_bad_uris(self):
        self.assert_refused("r=nbd:///export", "names no host")
        self.assert_refused("r=nbd+unix:///export", "has no socket")
        self.assert_refused("r=nbd://127.0.0.1/x?tls=on", "takes no query")

    def test_nothing_listening(self):
        port = harness.free_port()
        self.assert_refused("r=nbd://127.0.0.1:%d/" % port, "cannot connect", str(port))
        self.assert_refused("r=nbd+unix:///?socket=" + self.path("none.sock"), "cannot connect")

    def test_unknown_export(self):
        # blockwayd itself is a server that refuses unknown export names.
        img = harness.make_sparse_image(self.path("d.img"), 16 * MiB)
        self.serve({"d": img})
        self.assert_refused("r=nbd://127.0.0.1:%d/nosuch" % self.port, "cannot connect", "nosuch")
        # ...and a known one works through it.
        remote_port = self.port
        self.serve_remote("nbd://127.0.0.1:%d/d" % remote_port)
        h = self.connect(self.uri("r"))
        self.assertEqual(h.get_size(), 16 * MiB)

    def test_bad_options(self):
        img = harness.make_sparse_image(self.path("remote.img"), 16 * MiB)
        kit = self.start_nbdkit(img)
        self.assert_refused("r=%s,connections=0" % kit.uri, "connections")
        self.assert_refused("r=%s,io-timeout=soon" % kit.uri, "io-timeout")
        self.assert_refused("r=%s,retry-timeout=-1" % kit.uri, "retry-timeout")
        self.assert_refused("r=file://%s,retry-timeout=3" % img, "unknown option 'retry-timeout'")


if __name__ == "__main__":
    unittest.main()
