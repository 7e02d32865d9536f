"""The control plane's cache and mount commands against a running daemon:
prefetch (progress, pause, resume, rate, timeout), detach, write mode, the
run-time settings they persist, and FUSE mounts added at run time.

The cache-control commands need the cache's ExportControl: where a cached
export offers none (a build without it), those tests skip and say so.
"""

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
from control_common import (  # noqa: E402
    ControlTestCase, EXIT_USAGE, EXIT_REFUSED, EXIT_TIMED_OUT, NO_CONTROL)


class CacheControl(ControlTestCase):
    """prefetch, detach and mode on cached exports over an nbdkit remote."""

    def setup_cached(self, size=32 * MiB):
        self.remote_img = harness.make_random_image(self.path("remote.img"), size, seed=9)
        self.k = self.nbdkit(self.remote_img)
        cache = self.path("cache")
        d = self.start({"vm": "%s,cache=%s,chunk=256k" % (self.k.uri, cache),
                        "other": "%s,cache=%s,chunk=256k" % (self.k.uri, cache),
                        "plain": "file://" + self.remote_img})
        if not self.has_cache_control("vm"):
            self.skipTest(NO_CONTROL)
        self.daemon = d
        return d

    def test_prefetch_wait_progress_bar_under_a_terminal(self):
        self.setup_cached()
        out, _ = self.bw("prefetch", "rate", "vm", "8M")
        self.assertIn("8.0 MiB/s", out)
        self.assertEqual(self.bwj("prefetch", "status", "vm")["rate_limit"], 8 * MiB)
        # script(1) gives blockway a pseudo-terminal: the bar is redrawn in place.
        cmd = "%s prefetch vm --wait --socket %s" % (harness.BLOCKWAY, self.csock)
        p = subprocess.run(["script", "-qfec", cmd, "/dev/null"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=120)
        out = p.stdout.decode(errors="replace")
        self.assertEqual(p.returncode, 0, out)
        self.assertIn("\r", out)
        frames = [f for f in out.split("\r") if "%" in f]
        self.assertGreater(len(frames), 2, "several redraws while it runs:\n" + out)
        self.assertIn("MB/s", out)
        self.assertIn("ETA", out)
        self.assertIn("[#", out)
        self.assertIn("100.0%", out)
        self.assertIn("complete", out)
        st = self.bwj("prefetch", "status", "vm")
        self.assertEqual(st["state"], "done")
        self.assertEqual(st["present_bytes"], 32 * MiB)
        self.assertEqual(self.bwj("stats", "vm")["present_bytes"], 32 * MiB)
        self.daemon.stop()

    def test_prefetch_plain_lines_pause_resume_rate(self):
        self.setup_cached()
        self.bw("prefetch", "rate", "other", "4M")
        out, _ = self.bw("prefetch", "start", "other")
        self.assertIn("started", out)
        self.bw("prefetch", "start", "other", expect=EXIT_REFUSED)  # already running
        self.bw("prefetch", "pause", "other")
        harness.wait_until(lambda: self.bwj("prefetch", "status", "other")["state"] == "paused", 10,
                           what="paused")
        time.sleep(0.5)  # copies already in flight when it paused may still land
        done1 = self.bwj("prefetch", "status", "other")["done_bytes"]
        self.assertLess(done1, 32 * MiB)
        time.sleep(1)
        self.assertEqual(self.bwj("prefetch", "status", "other")["done_bytes"], done1, "paused means no progress")
        out, _ = self.bw("status")
        self.assertIn("paused", out)
        self.bw("prefetch", "resume", "other")
        self.bw("prefetch", "rate", "other", "0")
        # Not a terminal: plain progress lines, then the end.
        out, _ = self.bw("prefetch", "other", "--wait", timeout=120)
        lines = out.splitlines()
        self.assertNotIn("\r", out)
        self.assertTrue(any("MB/s" in line and "ETA" in line for line in lines), out)
        self.assertIn("complete", lines[-1])
        j = self.bwj("prefetch", "other", "--wait")
        self.assertEqual(j["state"], "done")
        out, _ = self.bw("prefetch", "status", "other")
        self.assertIn("done", out)
        self.daemon.stop()

    def test_prefetch_wait_timeout(self):
        self.setup_cached(size=16 * MiB)
        self.bw("prefetch", "rate", "other", "1M")
        for bad in (["--timeout", "0"], ["--timeout", "soon"], ["--timeout", "-1"], ["--timeout", "1e300"]):
            _, err = self.bw("prefetch", "other", "--wait", *bad, expect=EXIT_USAGE)
            self.assertIn("--timeout", err)
        _, err = self.bw("prefetch", "status", "other", "--timeout", "1", expect=EXIT_USAGE)
        self.assertIn("goes with --wait", err)
        t0 = time.monotonic()
        out, err = self.bw("prefetch", "other", "--wait", "--timeout", "1.5", expect=EXIT_TIMED_OUT)
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 1.4)
        self.assertLess(elapsed, 10)
        self.assertIn("not complete after 1.5 s", err)
        self.assertIn("goes on", err)
        self.assertEqual(self.bwj("prefetch", "status", "other")["state"], "running", "only the waiting stopped")
        self.bw("prefetch", "rate", "other", "0")
        j = self.bwj("prefetch", "other", "--wait", "--timeout", "120")
        self.assertEqual(j["state"], "done")
        self.daemon.stop()

    def test_detach_and_mode(self):
        self.setup_cached(size=8 * MiB)
        # Missing chunks: refused, even with force, with a clear message.
        _, err = self.bw("detach", "vm", expect=EXIT_REFUSED)
        self.assertIn("not present", err)
        self.bw("detach", "vm", "--force", expect=EXIT_REFUSED)
        self.bw("mode", "vm", "writeback")
        self.assertEqual(self.bwj("stats", "vm")["mode"], "writeback")
        self.bw("mode", "vm", "writethrough")
        self.bw("prefetch", "vm", "--wait", timeout=120)
        out, _ = self.bw("detach", "vm")
        st = self.bwj("stats", "vm")
        self.assertTrue(st["cache"]["detached"])
        self.assertEqual(st["remote"]["kind"], "detached")
        self.k.kill()
        h = self.connect(self.uri("vm"))
        self.assertEqual(h.pread(65536, MiB), harness.read_file(self.remote_img, MiB, 65536))
        _, err = self.bw("mode", "vm", "writeback", expect=EXIT_REFUSED)
        out, _ = self.bw("status")
        self.assertIn("detached", out)
        self.daemon.stop()


class RunTimeSettings(ControlTestCase):
    """blockway mode / prefetch rate outlive a restart until the configuration changes."""

    def catalogue(self, sql):
        import sqlite3
        with sqlite3.connect(os.path.join(self.data, "catalogue.db")) as db:
            return db.execute(sql).fetchall()

    def test_mode_and_rate_persist_until_the_configuration_changes(self):
        img = harness.make_random_image(self.path("vm.img"), 4 * MiB, seed=11)
        rt_img = harness.make_random_image(self.path("rt.img"), 4 * MiB, seed=12)
        cache = self.path("cache")

        def start(mode="writethrough", rate=None):
            spec = "file://%s,cache=%s,chunk=256k,mode=%s" % (img, cache, mode)
            if rate:
                spec += ",prefetch-rate=" + rate
            return self.start({"vm": spec})

        def state(name):
            st = self.bwj("stats", name)
            return st["mode"], st["prefetch"]["rate_limit"]

        d = start()
        if not self.has_cache_control("vm"):
            self.skipTest(NO_CONTROL)
        self.bw("mode", "vm", "writeback")
        self.bw("prefetch", "rate", "vm", "3M")
        self.bw("export", "add", "rt", "file://" + rt_img, "cache=%s,chunk=256k,mode=writethrough" % cache)
        self.bw("mode", "rt", "writeback-local")
        self.bw("prefetch", "rate", "rt", "2M")
        d.stop()

        # Same configuration: the run-time changes win.
        d = start()
        self.assertEqual(state("vm"), ("writeback", 3 * MiB))
        self.assertEqual(state("rt"), ("writeback-local", 2 * MiB))
        self.assertIn("set at run time; the configuration says writethrough", d.log())
        d.stop()
        # A run-time export's saved options carry its changes.
        (options,), = self.catalogue("SELECT options FROM runtime_exports WHERE name = 'rt'")
        self.assertIn("mode=writeback-local", options)
        self.assertIn("prefetch-rate=2097152", options)
        self.assertEqual(options.count("mode="), 1, options)

        # The configuration's mode changed since: it wins, the saved mode is
        # dropped; the rate (its configured value unchanged) still applies.
        d = start(mode="writeback-local")
        self.assertEqual(state("vm"), ("writeback-local", 3 * MiB))
        self.assertIn("the configuration's mode changed from writethrough to writeback-local", d.log())
        # Setting the configured value again at run time drops the saved one.
        self.bw("prefetch", "rate", "vm", "0")
        d.stop()
        self.assertEqual(self.catalogue("SELECT key FROM runtime_settings WHERE name = 'vm'"), [])
        d = start(mode="writeback-local", rate="5M")
        self.assertEqual(state("vm"), ("writeback-local", 5 * MiB))
        d.stop()


    def test_a_run_time_settings_table_it_cannot_read_stops_the_start(self):
        import sqlite3
        img = harness.make_random_image(self.path("vm.img"), 4 * MiB, seed=16)
        os.makedirs(self.data)
        with sqlite3.connect(os.path.join(self.data, "catalogue.db")) as db:
            db.execute("CREATE TABLE runtime_settings (name TEXT, key TEXT, value TEXT)")  # no config_value
            db.execute("INSERT INTO runtime_settings VALUES ('vm', 'mode', 'writeback')")
        p = subprocess.run([harness.BLOCKWAYD, "--data-dir", self.data, "--control-socket", "off", "--listen",
                            "127.0.0.1:%d" % harness.free_port(), "--export",
                            "vm=file://%s,cache=%s,chunk=256k" % (img, self.path("cache"))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        err = p.stderr.decode(errors="replace")
        self.assertEqual(p.returncode, 2, err)
        self.assertIn("export 'vm': catalogue %s/catalogue.db: cannot read the run-time settings: "
                      "no such column: config_value" % self.data, err)

    def saved_mode(self, name, configured):
        """The mode the catalogue would apply at the next start."""
        rows = self.catalogue("SELECT value FROM runtime_settings WHERE name = '%s' AND key = 'mode'" % name)
        if rows:
            return rows[0][0]
        rows = self.catalogue("SELECT options FROM runtime_exports WHERE name = '%s'" % name)
        for (options,) in rows:
            for item in options.split(","):
                if item.startswith("mode="):
                    return item[len("mode="):]
        return configured

    def start_cached_vm(self, seed):
        """A daemon with export 'vm', a cached file export (256k chunks,
        writethrough) whose cache takes run-time control. Returns (daemon,
        its spec, the image, the cache directory)."""
        img = harness.make_random_image(self.path("vm.img"), 4 * MiB, seed=seed)
        cache = self.path("cache")
        spec = "file://%s,cache=%s,chunk=256k,mode=writethrough" % (img, cache)
        d = self.start({"vm": spec})
        if not self.has_cache_control("vm"):
            self.skipTest(NO_CONTROL)
        return d, spec, img, cache

    def test_concurrent_mode_switches_are_saved_in_the_order_they_took_effect(self):
        import random
        d, spec, _, cache = self.start_cached_vm(seed=13)
        rt_img = harness.make_random_image(self.path("rt.img"), 4 * MiB, seed=14)
        self.bw("export", "add", "rt", "file://" + rt_img, "cache=%s,chunk=256k,mode=writethrough" % cache)
        modes = ["writethrough", "writeback", "writeback-local"]
        rng = random.Random(5)
        for round_ in range(20):
            for name in ("vm", "rt"):
                wanted = [rng.choice(modes) for _ in range(16)]
                threads = [threading.Thread(target=self.bw, args=("mode", name, m)) for m in wanted]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                in_effect = self.bwj("stats", name)["mode"]
                self.assertEqual(self.saved_mode(name, "writethrough"), in_effect,
                                 "round %d, export %s: the saved mode is not the one in effect" % (round_, name))
        before = {n: self.bwj("stats", n)["mode"] for n in ("vm", "rt")}
        d.stop()
        self.start({"vm": spec})
        self.assertEqual({n: self.bwj("stats", n)["mode"] for n in ("vm", "rt")}, before)

    def test_export_remove_forgets_the_run_time_settings(self):
        d, spec, img, cache = self.start_cached_vm(seed=15)
        self.bw("mode", "vm", "writeback")
        self.bw("prefetch", "rate", "vm", "3M")
        self.assertEqual(len(self.catalogue("SELECT key FROM runtime_settings WHERE name = 'vm'")), 2)
        self.bw("export", "remove", "vm")
        self.assertEqual(self.catalogue("SELECT key FROM runtime_settings WHERE name = 'vm'"), [])
        self.assertIn("its 2 run-time setting(s) are forgotten", d.log())
        # Added again at run time under the same name: its own options apply.
        self.bw("export", "add", "vm", "file://" + img, "cache=%s,chunk=256k,mode=writethrough" % cache)
        st = self.bwj("stats", "vm")
        self.assertEqual((st["mode"], st["prefetch"]["rate_limit"]), ("writethrough", 0))
        self.bw("export", "remove", "vm")
        d.stop()
        # Back from the configuration at the next start: the configuration's values.
        self.start({"vm": spec})
        st = self.bwj("stats", "vm")
        self.assertEqual((st["mode"], st["prefetch"]["rate_limit"]), ("writethrough", 0))


class FuseMountAtRunTime(ControlTestCase):
    """`blockway mount DIR` / `blockway unmount`: the FUSE front end started and
    stopped through the control plane; exports added at run time appear."""

    def mounted(self, d):
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == d for line in f)

    def test_mount_unmount_and_exports_added_at_run_time(self):
        if not os.path.exists("/dev/fuse"):
            self.skipTest("no /dev/fuse")
        a = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=5)
        b = harness.make_random_image(self.path("b.img"), 2 * MiB, seed=6)
        d = self.start({"a": "file://" + a})
        mnt = self.path("mnt")
        self.addCleanup(lambda: subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL))
        out, _ = self.bw("mount", mnt)
        self.assertIn(mnt, out)
        self.assertTrue(self.mounted(mnt))
        self.assertEqual(os.listdir(mnt), ["a"])
        with open(os.path.join(mnt, "a"), "rb") as f, open(a, "rb") as g:
            self.assertEqual(f.read(), g.read())
        # A second mount is refused while the first one lives.
        _, err = self.bw("mount", self.path("other"), expect=5)
        self.assertIn("already mounted at " + mnt, err)
        # An export added at run time appears in the mount.
        self.bw("export", "add", "b", "file://" + b)
        harness.wait_until(lambda: sorted(os.listdir(mnt)) == ["a", "b"], 10, what="b in the mount")
        self.assertEqual(os.path.getsize(os.path.join(mnt, "b")), 2 * MiB)
        self.assertEqual(self.bwj("unmount")["mountpoint"], mnt)
        harness.wait_until(lambda: not self.mounted(mnt), 10, what="the unmount")
        _, err = self.bw("unmount", expect=5)
        self.assertIn("not mounted", err)
        # NBD keeps serving, and the front end mounts again.
        h = self.connect(self.uri("a"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(a, 0, 4096))
        harness.close_handle(h)
        self.bw("mount", mnt)
        self.assertEqual(sorted(os.listdir(mnt)), ["a", "b"])
        d.stop()
        self.assertFalse(self.mounted(mnt), "SIGTERM must unmount")

    def test_mount_errors(self):
        self.start({})
        out, _ = self.bw("mount", "--help")
        self.assertIn("Usage: blockway mount DIR", out)
        req = self.raw(b'{"cmd":"mount","dir":"relative/path"}\n')
        self.assertFalse(req[0]["ok"])
        self.assertEqual(req[0]["error"]["code"], "bad-request")
        self.assertIn("absolute", req[0]["error"]["message"])
        # A file where the directory should be.
        f = self.path("file")
        open(f, "w").close()
        _, err = self.bw("mount", f, expect=1)
        self.assertIn(f, err)


if __name__ == "__main__":
    unittest.main()
