"""Access profiles travel: a clone's reads of its base are recorded in the
base's profile (first-read order), `blockway profile export` writes it to a
file, `blockway profile import` gives it to a second daemon's export of the
same image (another data and cache directory: another host), whose hot-first
prefetch then fetches those chunks first (the order is read from nbdkit's log
filter at the shared remote); size and identity mismatches and damaged files
are refused with their exit codes; a detached export exports its profile but
refuses drop and import. `blockway cache drop --keep-profile`
empties a cache (refused while data is dirty), keeps the profile, and hot-first
prefetch follows it again.
"""

import json
import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import harness  # noqa: E402
import remotes  # noqa: E402
from control_common import EXIT_FAILED, EXIT_REFUSED  # noqa: E402
from harness import MiB  # noqa: E402

CHUNK = 64 * 1024
SIZE = 16 * MiB
# Chunks read in this order (none is a sample of the image identity, i * 16,
# nor what a sequential prefetch would start a run with).
ORDER = [203, 37, 150, 91, 117, 69, 250, 13]
WRITTEN = 230  # a chunk written (and later read) apart from ORDER's runs


def read_starts(log_text):
    """Offsets of the reads in an nbdkit log filter's text, in order."""
    return [int(o, 0) for o in re.findall(r" Read id=\d+ offset=(\S+) count=\S+", log_text)]


@unittest.skipUnless(harness.have("nbdkit") and harness.have("nbdinfo"), "nbdkit or nbdinfo missing")
class ProfileTest(control_common.ControlTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_random_image(self.path("golden.img"), SIZE, seed=11)
        self.kit = remotes.started(self, remotes.Nbdkit(self.tmp, self.img, log_requests=True))

    def log_mark(self):
        return len(self.kit.requests())

    def reads_since(self, mark):
        return read_starts(self.kit.requests()[mark:])

    def read_in_order(self, export, order=ORDER):
        h = self.connect(self.uri(export))
        for c in order:
            self.assertEqual(h.pread(4096, c * CHUNK), harness.read_file(self.img, c * CHUNK, 4096))
        h.shutdown()

    def start_second(self, exports):
        """A second daemon (its own data dir, caches and control socket):
        another host's view of the same remote."""
        args = ["--log-level", "debug", "--data-dir", self.path("data2"),
                "--control-socket", self.path("control2.sock")]
        port = harness.free_port()
        args += ["--listen", "127.0.0.1:%d" % port]
        for n, spec in exports.items():
            args += ["--export", "%s=%s" % (n, spec)]
        return self.start_daemon(args, "blockwayd2"), port

    def bw2(self, *args, expect=0):
        return self.bw(*(list(args) + ["--socket", self.path("control2.sock")]), expect=expect)

    def prefetch_hot_first_and_check(self, bw, export, mark, expected=ORDER):
        """Starts a hot-first prefetch and checks that its first remote reads
        begin at the profiled chunks, in the profile's order. The remote
        session has several connections, which can reorder requests issued
        together: a rate limit of 1 MiB/s makes the prefetch issue one run
        (4 chunks) every 250 ms until those reads are seen; then it runs
        unlimited to the end."""
        bw("prefetch", "rate", export, "1M")
        bw("prefetch", "start", export, "--order", "hot-first")
        harness.wait_until(lambda: len(self.reads_since(mark)) >= len(expected), 30, interval=0.05,
                           what="the prefetch's first %d reads" % len(expected))
        bw("prefetch", "rate", export, "0")
        bw("prefetch", export, "--wait")
        starts = self.reads_since(mark)
        self.assertEqual(starts[:len(expected)], [c * CHUNK for c in expected],
                         "hot-first fetched the profiled chunks first, in order (read starts, in chunks: %s)"
                         % [s // CHUNK for s in starts])

    def test_clone_reads_teach_the_base_and_the_profile_travels(self):
        self.start({"golden": "%s,cache=%s,chunk=64k" % (self.kit.uri, self.path("cache1")),
                    "vm1": "clone:golden"})
        # A clone's reads reach the base's cache: recorded in the base's profile.
        self.read_in_order("vm1")
        show = self.bwj("profile", "show", "golden")
        self.assertEqual(show["chunk_size"], CHUNK)
        self.assertEqual(show["sessions"][0]["first"][:len(ORDER)], ORDER, show)
        self.assertEqual(show["chunks"], len(ORDER), show)
        out, _ = self.bw("profile", "show", "golden")
        self.assertIn("%d distinct chunks" % len(ORDER), out)
        # A clone has no profile of its own: the error names its base.
        _, err = self.bw("profile", "show", "vm1", expect=EXIT_REFUSED)
        self.assertIn("base 'golden'", err)

        path = self.path("golden.profile")
        out, _ = self.bw("profile", "export", "golden", path)
        self.assertIn("written to " + path, out)
        with open(path) as f:
            doc = json.load(f)
        self.assertEqual(doc["format"], "blockway-access-profile")
        self.assertEqual(doc["version"], 1)
        self.assertEqual((doc["size"], doc["chunk_size"]), (SIZE, CHUNK))
        self.assertEqual(doc["sessions"][0][:len(ORDER)], ORDER)
        self.assertRegex(doc["identity"]["sha256"], r"^[0-9a-f]{64}$")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        # An existing file is not overwritten without --force.
        _, err = self.bw("profile", "export", "golden", path, expect=EXIT_REFUSED)
        self.assertIn("exists", err)
        self.bw("profile", "export", "golden", path, "--force")

        # Another "host": its own daemon and cache over the same remote; plus
        # an image of another size and one of the same size but other bytes.
        small = harness.make_random_image(self.path("small.img"), 8 * MiB, seed=12)
        other = harness.make_random_image(self.path("other.img"), SIZE, seed=13)
        kit_small = remotes.started(self, remotes.Nbdkit(self.tmp, small, name="nbdkit-small"))
        kit_other = remotes.started(self, remotes.Nbdkit(self.tmp, other, name="nbdkit-other"))
        self.start_second({"golden": "%s,cache=%s,chunk=64k" % (self.kit.uri, self.path("cache2")),
                           "small": "%s,cache=%s" % (kit_small.uri, self.path("cache3")),
                           "other": "%s,cache=%s" % (kit_other.uri, self.path("cache4")),
                           "golden32": "%s,cache=%s,chunk=32k" % (self.kit.uri, self.path("cache5"))})
        _, err = self.bw2("profile", "import", "small", path, expect=EXIT_REFUSED)
        self.assertIn("is of an image of %d bytes" % SIZE, err)
        _, err = self.bw2("profile", "import", "small", path, "--force", expect=EXIT_REFUSED)
        self.assertIn("not the same image", err)
        _, err = self.bw2("profile", "import", "other", path, expect=EXIT_REFUSED)
        self.assertIn("is of another image", err)
        self.assertEqual(self.bwj("profile", "show", "other", "--socket", self.path("control2.sock"))["sessions"],
                         [], "a refused import stores nothing")
        out, _ = self.bw2("profile", "import", "other", path, "--force")
        self.assertIn("identity differs, forced", out)

        # Another chunk size: each 64 KiB chunk becomes its two 32 KiB ones, in order.
        out, _ = self.bw2("profile", "import", "golden32", path)
        self.assertIn("converted from chunks of 64 KiB", out)
        show = self.bwj("profile", "show", "golden32", "--socket", self.path("control2.sock"))
        self.assertEqual(show["sessions"][0]["first"], [n for c in ORDER for n in (2 * c, 2 * c + 1)], show)

        out, _ = self.bw2("profile", "import", "golden", path)
        self.assertIn("imported into export 'golden'", out)
        show = self.bwj("profile", "show", "golden", "--socket", self.path("control2.sock"))
        self.assertEqual(show["sessions"][0]["first"][:len(ORDER)], ORDER, show)
        # The import read the identity's samples; the prefetch's reads follow.
        self.prefetch_hot_first_and_check(self.bw2, "golden", self.log_mark())

    def test_damaged_profile_files_are_refused(self):
        self.start({"golden": "%s,cache=%s,chunk=64k" % (self.kit.uri, self.path("cache1"))})
        self.read_in_order("golden")
        path = self.path("p.json")
        self.bw("profile", "export", "golden", path)
        with open(path) as f:
            text = f.read()
        doc = json.loads(text)

        def refused(content, needle):
            bad = self.path("bad.json")
            with open(bad, "w") as f:
                f.write(content)
            _, err = self.bw("profile", "import", "golden", bad, expect=EXIT_FAILED)
            self.assertIn(needle, err)

        refused(text[:len(text) // 2], "not complete JSON")
        refused("", "not complete JSON")
        changed = dict(doc, sessions=[[ORDER[1]] + doc["sessions"][0][1:]] + doc["sessions"][1:])
        refused(json.dumps(changed), "checksum does not match")
        refused(json.dumps(dict(doc, format="something")), "format")
        refused(json.dumps(dict(doc, version=2)), "format version is 2")
        refused(json.dumps(dict(doc, sessions=[[SIZE // CHUNK]])), "is not a chunk of an image")
        refused("[" * 100000, "nests deeper")
        _, err = self.bw("profile", "import", "golden", self.path("missing.json"), expect=EXIT_FAILED)
        self.assertIn("no profile file", err)
        # The file as written imports (into the export it came from).
        self.bw("profile", "import", "golden", path)

    def test_cache_drop_keeps_the_profile_and_refuses_dirty_data(self):
        self.start({"golden": "%s,cache=%s,chunk=64k,mode=writeback,writeback-delay=3600"
                    % (self.kit.uri, self.path("cache1"))})
        self.read_in_order("golden")
        h = self.connect(self.uri("golden"))
        h.pwrite(b"\x5a" * 4096, WRITTEN * CHUNK)
        _, err = self.bw("cache", "drop", "golden", "--keep-profile", expect=EXIT_REFUSED)
        self.assertIn("are not on", err)
        self.assertIn("blockway flush golden", err)
        self.bw("flush", "golden")
        out, _ = self.bw("cache", "drop", "golden", "--keep-profile")
        self.assertIn("access profile kept", out)
        self.assertEqual(self.bwj("stats", "golden")["cache"]["present_bytes"], 0)
        self.assertEqual([e for e in harness.nbd_map(self.uri("golden"), "blockway:cache") if e[2] & 1], [],
                         "nothing present after the drop")
        # The profile survives, and the data reads back right (the flushed write from the remote).
        show = self.bwj("profile", "show", "golden")
        self.assertEqual(show["sessions"][0]["first"][:len(ORDER)], ORDER, show)
        mark = self.log_mark()
        self.assertEqual(h.pread(4096, WRITTEN * CHUNK), b"\x5a" * 4096)
        self.assertIn(WRITTEN * CHUNK, self.reads_since(mark), "a dropped chunk is fetched again")
        h.shutdown()
        # Dropped again: the read above is the newest session, ORDER the one
        # before; hot-first follows both, newest first.
        self.bw("cache", "drop", "golden", "--keep-profile")
        self.assertEqual([s["first"] for s in self.bwj("profile", "show", "golden")["sessions"][:2]],
                         [[WRITTEN], ORDER])
        self.prefetch_hot_first_and_check(self.bw, "golden", self.log_mark(), [WRITTEN] + ORDER)

        # A running prefetch is refused; without --keep-profile the profile goes.
        self.bw("cache", "drop", "golden", "--keep-profile")
        self.bw("prefetch", "rate", "golden", "256k")
        self.bw("prefetch", "start", "golden")
        _, err = self.bw("cache", "drop", "golden", expect=EXIT_REFUSED)
        self.assertIn("prefetch pause golden", err)
        self.bw("prefetch", "pause", "golden")
        out, _ = self.bw("cache", "drop", "golden")
        self.assertIn("access profile forgotten", out)
        self.assertEqual(self.bwj("profile", "show", "golden")["sessions"], [])

    def test_a_detached_export_refuses_drop_and_import_but_exports(self):
        self.start({"golden": "%s,cache=%s,chunk=64k" % (self.kit.uri, self.path("cache1"))})
        self.read_in_order("golden")
        self.bw("prefetch", "golden", "--wait")
        self.bw("detach", "golden")
        path = self.path("p.json")
        self.bw("profile", "export", "golden", path)
        with open(path) as f:
            self.assertEqual(json.load(f)["sessions"][0][:len(ORDER)], ORDER)
        _, err = self.bw("cache", "drop", "golden", "--keep-profile", expect=EXIT_REFUSED)
        self.assertIn("is detached", err)
        _, err = self.bw("profile", "import", "golden", path, expect=EXIT_REFUSED)
        self.assertIn("is detached", err)
        # The image still reads right: nothing was dropped.
        h = self.connect(self.uri("golden"))
        self.assertEqual(h.pread(4096, ORDER[0] * CHUNK), harness.read_file(self.img, ORDER[0] * CHUNK, 4096))
        h.shutdown()


if __name__ == "__main__":
    unittest.main()
