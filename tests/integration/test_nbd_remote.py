"""blockwayd in front of a real NBD server (nbdkit): what is particular to
the nbd:// backend. The cases every backend shares (copy, fio verify, flush
and FUA, restart, EIO after retry-timeout, a hung peer, bad URIs) are in
test_conformance.py."""

import errno
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
from harness import MiB  # noqa: E402

import nbd  # noqa: E402


@unittest.skipUnless(harness.have("nbdkit"), "nbdkit missing")
class NbdRemoteTestCase(harness.DaemonTestCase):
    def start_nbdkit(self, img, unix=False, filters=(), params=(), port=None, name="nbdkit"):
        sock = self.path(name + ".sock") if unix else None
        return remotes.started(self, remotes.Nbdkit(self.tmp, img, port=port, sock=sock, filters=filters,
                                                    params=params, name=name))


class DataPathTest(NbdRemoteTestCase):
    def test_nbdcopy_in_and_out_over_unix_socket(self):
        size = 64 * MiB
        img = harness.make_sparse_image(self.path("remote.img"), size)
        kit = self.start_nbdkit(img, unix=True)
        self.assertTrue(kit.uri.startswith("nbd+unix:///?socket="))
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
        self.assertNotIn("reconnect", daemon.full_log())


class ReconnectTest(NbdRemoteTestCase):
    def test_unflushed_writes_before_a_restart_fail_the_next_flush(self):
        img = harness.make_sparse_image(self.path("remote.img"), 16 * MiB)
        kit = self.start_nbdkit(img)
        self.serve_remote(kit.uri, "retry-timeout=30")
        h = self.connect(self.uri("r"))
        h.pwrite(b"\x42" * 4096, 0)  # acknowledged, never flushed on that session
        kit.restart()
        with self.assertRaises(nbd.Error) as cm:
            h.flush()
        self.assertEqual(cm.exception.errnum, errno.EIO)
        h.flush()  # reported once; the export works on
        h.pwrite(b"\x43" * 4096, 4096)
        h.flush()
        self.assertEqual(harness.read_file(img, 4096, 4096), b"\x43" * 4096)


class StartupErrorTest(NbdRemoteTestCase):
    """Malformed URIs and a remote nobody serves: test_conformance.py."""

    def test_unknown_export(self):
        # blockwayd itself is a server that refuses unknown export names.
        img = harness.make_sparse_image(self.path("d.img"), 16 * MiB)
        self.serve({"d": img})
        self.start_refused("r=nbd://127.0.0.1:%d/nosuch" % self.port, "cannot connect", "nosuch")
        # ...and a known one works through it.
        remote_port = self.port
        self.serve_remote("nbd://127.0.0.1:%d/d" % remote_port)
        h = self.connect(self.uri("r"))
        self.assertEqual(h.get_size(), 16 * MiB)

    def test_bad_options(self):
        img = harness.make_sparse_image(self.path("remote.img"), 16 * MiB)
        kit = self.start_nbdkit(img)
        self.start_refused("r=%s,connections=0" % kit.uri, "connections")
        self.start_refused("r=%s,io-timeout=soon" % kit.uri, "io-timeout")
        self.start_refused("r=%s,retry-timeout=-1" % kit.uri, "retry-timeout")
        self.start_refused("r=file://%s,retry-timeout=3" % img, "unknown option 'retry-timeout'")


if __name__ == "__main__":
    unittest.main()
