"""Real NBD clients against blockwayd: nbdinfo, blockway info, qemu-img,
qemu-io, nbdcopy, libnbd over TCP (IPv4, IPv6), Unix sockets and --stdio."""

import filecmp
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402

import nbd  # noqa: E402


class NbdInfoTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_sparse_image(self.path("a.img"), 64 * MiB)
        self.ro = harness.make_random_image(self.path("ro.img"), 8 * MiB, seed=7)
        self.serve({"disk": self.img + ",description=the main disk",
                    "ro": self.ro + ",read-only=on",
                    "third": self.ro + ",description=third one"})

    def test_size_flags_description(self):
        out = harness.run(["nbdinfo", "--json", self.uri("disk")], timeout=20).stdout
        info = json.loads(out)
        exp = info["exports"][0]
        self.assertEqual(exp["export-name"], "disk")
        self.assertEqual(exp["export-size"], 64 * MiB)
        self.assertEqual(exp["description"], "the main disk")
        self.assertFalse(exp["is_read_only"])
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache"):
            self.assertTrue(exp[flag], flag)
        self.assertIn("base:allocation", exp["contexts"])

    def test_read_only_flags(self):
        info = json.loads(harness.run(["nbdinfo", "--json", self.uri("ro")], timeout=20).stdout)
        exp = info["exports"][0]
        self.assertEqual(exp["export-size"], 8 * MiB)
        self.assertTrue(exp["is_read_only"])
        self.assertFalse(exp["can_trim"])
        self.assertFalse(exp["can_zero"])

    def test_list_exports(self):
        out = harness.run(["nbdinfo", "--json", "--list", self.uri("")], timeout=20).stdout
        info = json.loads(out)
        by_name = {e["export-name"]: e for e in info["exports"]}
        self.assertEqual(set(by_name), {"disk", "ro", "third"})
        self.assertEqual(by_name["disk"].get("description"), "the main disk")
        self.assertEqual(by_name["third"].get("description"), "third one")
        self.assertEqual(by_name["ro"]["export-size"], 8 * MiB)

    def test_unknown_export_refused(self):
        p = harness.run(["nbdinfo", self.uri("nosuch")], timeout=20, check=False)
        self.assertNotEqual(p.returncode, 0)
        # The daemon still serves the others afterwards.
        harness.run(["nbdinfo", self.uri("disk")], timeout=20)

    def test_map_holes_and_data(self):
        out = harness.run(["nbdinfo", "--map", "--json", self.uri("disk")], timeout=20).stdout
        extents = json.loads(out)
        self.assertEqual(sum(e["length"] for e in extents), 64 * MiB)
        self.assertTrue(all(e["type"] & 1 for e in extents), extents)  # all hole at first

        h = self.connect(self.uri("disk"))
        h.pwrite(b"\x5a" * MiB, 4 * MiB)
        h.pwrite(b"\x33" * (2 * MiB), 32 * MiB)
        h.flush()

        extents = json.loads(harness.run(["nbdinfo", "--map", "--json", self.uri("disk")],
                                         timeout=20).stdout)
        self.assertEqual(sum(e["length"] for e in extents), 64 * MiB)
        data = [(e["offset"], e["offset"] + e["length"]) for e in extents if e["type"] & 1 == 0]
        # Each written range is inside some data extent; the start is still a hole.
        for lo, hi in ((4 * MiB, 5 * MiB), (32 * MiB, 34 * MiB)):
            self.assertTrue(any(a <= lo and hi <= b for a, b in data), (lo, hi, extents))
        first = extents[0]
        self.assertEqual(first["offset"], 0)
        self.assertTrue(first["type"] & 1, extents)
        self.assertTrue(any(e["type"] & 1 and e["offset"] >= 34 * MiB for e in extents), extents)


class BlockwayInfoTest(harness.DaemonTestCase):
    def test_json(self):
        img = harness.make_sparse_image(self.path("a.img"), 10 * MiB)
        self.serve({"a": img + ",description=desc A", "b": img + ",read-only=on"}, unix=True)
        out = harness.run([harness.BLOCKWAY, "info", "--json", self.uri("a")], timeout=20).stdout
        info = json.loads(out)
        self.assertEqual(info["size"], 10 * MiB)
        self.assertEqual(info["export"], "a")
        self.assertEqual(info["description"], "desc A")
        self.assertFalse(info["read_only"])
        self.assertTrue(info["can_flush"])
        self.assertTrue(info["can_trim"])
        self.assertTrue(info["base_allocation"])
        self.assertGreaterEqual(info["block_size"]["maximum"], info["block_size"]["preferred"])

        info = json.loads(harness.run([harness.BLOCKWAY, "info", "--json", self.unix_uri("b")],
                                      timeout=20).stdout)
        self.assertEqual(info["size"], 10 * MiB)
        self.assertTrue(info["read_only"])
        self.assertFalse(info["can_trim"])

        text = harness.run([harness.BLOCKWAY, "info", self.uri("a")], timeout=20).stdout.decode()
        self.assertIn(str(10 * MiB), text)

    def test_unreachable_fails(self):
        port = harness.free_port()
        p = harness.run([harness.BLOCKWAY, "info", "nbd://127.0.0.1:%d/x" % port],
                        timeout=20, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertTrue(p.stderr.strip(), "no error message")


@unittest.skipUnless(harness.have("qemu-img") and harness.have("qemu-io"), "qemu tools missing")
class QemuTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.src = harness.make_random_image(self.path("src.img"), 16 * MiB, seed=3)
        self.copy = self.path("copy.img")
        with open(self.src, "rb") as a, open(self.copy, "wb") as b:
            b.write(a.read())
        self.serve({"disk": self.copy})

    def test_info_and_compare(self):
        info = json.loads(harness.run(["qemu-img", "info", "--output=json", "-f", "raw",
                                       self.uri("disk")], timeout=30).stdout)
        self.assertEqual(info["virtual-size"], 16 * MiB)
        harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", self.src,
                     self.uri("disk")], timeout=60)
        # After a change through the export, compare must notice it.
        h = self.connect(self.uri("disk"))
        h.pwrite(b"\xff" * 4096, 8 * MiB)
        h.flush()
        p = harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", self.src,
                         self.uri("disk")], timeout=60, check=False)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)

    def test_qemu_io_pattern(self):
        out = harness.run(["qemu-io", "-f", "raw", self.uri("disk"),
                           "-c", "write -P 0xab 0 1M",
                           "-c", "read -P 0xab 0 1M",
                           "-c", "write -z 2M 1M",
                           "-c", "read -P 0 2M 1M",
                           "-c", "flush"], timeout=60).stdout.decode()
        self.assertNotIn("Pattern verification failed", out)
        self.assertNotIn("error", out.lower())
        self.assertEqual(harness.read_file(self.copy, 0, MiB), b"\xab" * MiB)
        self.assertEqual(harness.read_file(self.copy, 2 * MiB, MiB), bytes(MiB))
        # Bytes outside the writes are untouched.
        self.assertEqual(harness.read_file(self.copy, MiB, MiB),
                         harness.read_file(self.src, MiB, MiB))

    def test_qemu_io_detects_wrong_pattern(self):
        # Guards the test above: a mismatching pattern must be reported.
        out = harness.run(["qemu-io", "-f", "raw", self.uri("disk"),
                           "-c", "write -P 0xab 0 64k", "-c", "read -P 0xcd 0 64k"],
                          timeout=60, check=False)
        self.assertIn("Pattern verification failed", (out.stdout + out.stderr).decode())


@unittest.skipUnless(harness.have("nbdcopy"), "nbdcopy missing")
class NbdCopyTest(harness.DaemonTestCase):
    def test_round_trip_64m(self):
        size = 64 * MiB
        src = harness.make_random_image(self.path("src.img"), size, seed=11)
        target = harness.make_sparse_image(self.path("target.img"), size)
        out = self.path("out.img")
        self.serve({"t": target})
        harness.run(["nbdcopy", src, self.uri("t")], timeout=120)
        self.assertTrue(filecmp.cmp(src, target, shallow=False), "export image differs after copy in")
        harness.run(["nbdcopy", self.uri("t"), out], timeout=120)
        harness.run(["cmp", src, out], timeout=60)

    def test_copy_between_exports_over_unix_socket(self):
        src = harness.make_random_image(self.path("src.img"), 8 * MiB, seed=12)
        dst = harness.make_sparse_image(self.path("dst.img"), 8 * MiB)
        self.serve({"src": src + ",read-only=on", "dst": dst}, unix=True, tcp=False)
        harness.run(["nbdcopy", self.unix_uri("src"), self.unix_uri("dst")], timeout=60)
        harness.run(["cmp", src, dst], timeout=30)


class TransportTest(harness.DaemonTestCase):
    @unittest.skipUnless(harness.ipv6_loopback_available(), "no IPv6 loopback")
    def test_ipv6(self):
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=5)
        port = harness.free_port(harness.socket.AF_INET6, "::1")
        self.start_daemon(["--listen", "[::1]:%d" % port,
                           "--export", "v6=file://" + img])
        uri = "nbd://[::1]:%d/v6" % port
        info = json.loads(harness.run(["nbdinfo", "--json", uri], timeout=20).stdout)
        self.assertEqual(info["exports"][0]["export-size"], 4 * MiB)
        h = self.connect(uri)
        self.assertEqual(h.pread(4096, 4096), harness.read_file(img, 4096, 4096))

    def test_unix_socket(self):
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=6)
        d = self.serve({"u": img}, unix=True, tcp=False)
        h = self.connect(self.unix_uri("u"))
        self.assertEqual(h.get_size(), 4 * MiB)
        self.assertEqual(h.pread(MiB, MiB), harness.read_file(img, MiB, MiB))
        h.pwrite(b"U" * 512, 0, nbd.CMD_FLAG_FUA)
        self.assertEqual(harness.read_file(img, 0, 512), b"U" * 512)
        close_and_forget(h)
        d.stop()
        self.assertFalse(os.path.exists(self.sock), "socket file left behind after shutdown")

    def test_tcp_and_unix_at_once(self):
        img = harness.make_random_image(self.path("a.img"), 2 * MiB, seed=8)
        self.serve({"x": img}, unix=True, tcp=True)
        a = self.connect(self.uri("x"))
        b = self.connect(self.unix_uri("x"))
        a.pwrite(b"A" * 4096, 8192)
        a.flush()
        self.assertEqual(b.pread(4096, 8192), b"A" * 4096)
        self.assertTrue(a.can_multi_conn())

    def test_stdio_mode(self):
        img = harness.make_random_image(self.path("s.img"), 3 * MiB, seed=9)
        h = nbd.NBD()
        self.addCleanup(harness.close_handle, h)
        h.set_export_name("x")
        h.connect_command([harness.BLOCKWAYD, "--log-level", "off", "--stdio", "x=file://" + img])
        self.assertEqual(h.get_size(), 3 * MiB)
        self.assertEqual(h.pread(65536, 12345), harness.read_file(img, 12345, 65536))
        h.pwrite(b"S" * 1000, 100)
        h.flush()
        self.assertEqual(harness.read_file(img, 100, 1000), b"S" * 1000)
        h.shutdown()
        # The daemon exits once its single client has left; no stray process remains.
        harness.wait_until(lambda: not _blockwayd_children_serving(img), 10,
                           what="the --stdio daemon to exit")


class HandshakeVariantsTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.a = harness.make_random_image(self.path("a.img"), 2 * MiB, seed=13)
        self.b = harness.make_random_image(self.path("b.img"), 3 * MiB, seed=14)

    def test_empty_name_single_export(self):
        self.serve({"only": self.a})
        h = self.connect("nbd://127.0.0.1:%d" % self.port)
        self.assertEqual(h.get_size(), 2 * MiB)

    def test_empty_name_needs_default_with_several_exports(self):
        self.serve({"a": self.a, "b": self.b})
        h = nbd.NBD()
        self.addCleanup(harness.close_handle, h)
        with self.assertRaises(nbd.Error):
            h.connect_uri("nbd://127.0.0.1:%d" % self.port)

    def test_default_export(self):
        self.serve({"a": self.a, "b": self.b}, extra=["--default-export", "b"])
        h = self.connect("nbd://127.0.0.1:%d" % self.port)
        self.assertEqual(h.get_size(), 3 * MiB)
        self.assertEqual(h.pread(4096, 0), harness.read_file(self.b, 0, 4096))

    def test_opt_export_name_without_fixed_newstyle(self):
        # Handshake flags 0: libnbd falls back to NBD_OPT_EXPORT_NAME, and the
        # server sends the 124 zero bytes that NO_ZEROES would have saved.
        self.serve({"a": self.a, "b": self.b})
        for flags in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES):
            h = nbd.NBD()
            self.addCleanup(harness.close_handle, h)
            h.set_handshake_flags(flags)
            h.connect_uri(self.uri("b"))
            self.assertEqual(h.get_size(), 3 * MiB)
            self.assertFalse(h.get_structured_replies_negotiated())
            self.assertEqual(h.pread(8192, MiB), harness.read_file(self.b, MiB, 8192))
            h.shutdown()

    def test_option_mode_list_info_go(self):
        self.serve({"a": self.a + ",description=first", "b": self.b})
        h = nbd.NBD()
        self.addCleanup(harness.close_handle, h)
        h.set_opt_mode(True)
        h.set_full_info(True)
        h.connect_uri(self.uri("a"))
        listed = {}
        self.assertEqual(h.opt_list(lambda name, desc: listed.__setitem__(name, desc) or 0), 2)
        self.assertEqual(listed, {"a": "first", "b": ""})
        h.set_export_name("b")
        h.opt_info()
        self.assertEqual(h.get_size(), 3 * MiB)
        h.set_export_name("nosuch")
        with self.assertRaises(nbd.Error):
            h.opt_info()
        h.set_export_name("a")
        h.opt_go()
        self.assertEqual(h.get_size(), 2 * MiB)
        self.assertEqual(h.get_export_description(), "first")
        self.assertEqual(h.pread(4096, 0), harness.read_file(self.a, 0, 4096))

    def test_many_connections(self):
        self.serve({"a": self.a})
        hs = [self.connect(self.uri("a")) for _ in range(100)]
        for i, h in enumerate(hs):
            off = (i * 4096) % (2 * MiB)
            self.assertEqual(h.pread(512, off), harness.read_file(self.a, off, 512))


def close_and_forget(h):
    harness.close_handle(h)


def _blockwayd_children_serving(img):
    """True if one of *our* children is still a blockwayd serving img."""
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != me or " Z " in stat.rsplit(")", 1)[1][:3]:
                continue
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read()
            if b"--stdio" in cmd and img.encode() in cmd:
                return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return False


class GrowingFileTest(harness.DaemonTestCase):
    def test_a_grown_file_reaches_new_clients(self):
        """`truncate -s` of an uncached file export while it is served: a
        client that connects after (NBD_OPT_GO, NBD_OPT_INFO and the old
        NBD_OPT_EXPORT_NAME) sees the new size, reads zeroes in the new space
        and writes there; a client connected before keeps its size and keeps
        working. A shrink is reported, not followed. A cached export keeps the
        size it opened with until the daemon starts again."""
        img = harness.make_random_image(self.path("img"), 8 * MiB, seed=23)
        cached_img = harness.make_random_image(self.path("cached.img"), 8 * MiB, seed=24)
        daemon = self.serve({"disk": img, "cached": cached_img + ",cache=" + self.path("cache")})
        early = self.connect(self.uri("disk"))
        self.assert_grown_file_reaches_new_clients(img, self.uri("disk"), early, daemon.log_path)
        with self.assertRaises(nbd.Error):  # past the size the early client was told
            early.pread(4096, 8 * MiB)
        # The old handshake (no fixed newstyle: NBD_OPT_EXPORT_NAME) follows too.
        os.truncate(img, 32 * MiB)
        old = nbd.NBD()
        self.addCleanup(harness.close_handle, old)
        old.set_handshake_flags(0)
        old.connect_uri(self.uri("disk"))
        self.assertEqual(old.get_size(), 32 * MiB)
        # A shrink is reported, not followed: the export keeps what it served.
        os.truncate(img, 16 * MiB)
        self.assertEqual(self.connect(self.uri("disk")).get_size(), 32 * MiB)
        self.assertIn("the image is %d bytes, smaller than the %d served" % (16 * MiB, 32 * MiB), daemon.log(tail=None))
        # Cached: the size it opened with, and nothing logged per connection.
        os.truncate(cached_img, 24 * MiB)
        self.assertEqual(self.connect(self.uri("cached")).get_size(), 8 * MiB)
        self.assertNotIn("export 'cached': the image grew", daemon.log(tail=None))


if __name__ == "__main__":
    unittest.main()
