"""Snapshots of a clone served as read-only exports of their own (vm1@NAME),
driven the way a user would:

- a snapshot reads (nbdinfo, qemu-img compare, the FUSE mount) exactly as the
  clone was when it was taken, while the clone keeps writing under fio;
  writes to it are refused; it is back after kill -9 and a restart;
- deleting an older snapshot leaves the newer snapshot's export right;
- deleting a snapshot whose export has a client is refused unless forced,
  and forced, that client's reads fail and the export is gone;
- removing the clone removes its snapshot exports;
- a snapshot export serves under its clone's allow= rules, changed at run
  time (at once, and after a restart); its own are refused (exit 5);
- `blockway export-image` writes a clone's and a snapshot's full raw image,
  sparse where zero (qemu-img compare), with its refusals;
- a level file a crash left unused in the overlay directory is swept at start.
"""

import json
import os
import signal
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import harness  # noqa: E402

MiB = harness.MiB
IMAGE = control_common.CloneTestCase.IMAGE


class SnapshotExportsTest(control_common.CloneTestCase):
    GOLDEN_SEED = 81

    def copy(self, content, name):
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def compare(self, image, export, what):
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", image, self.uri(export)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        self.assertEqual(p.returncode, 0, "%s: qemu-img compare: %s" % (what, p.stdout.decode(errors="replace")))

    def export_names(self):
        return sorted(e["name"] for e in self.bwj("export", "list")["exports"])

    def test_snapshot_export_reads_the_frozen_state_while_the_clone_writes(self):
        for tool in ("qemu-img", "nbdinfo", "fio"):
            if not harness.have(tool):
                self.skipTest("needs " + tool)
        d = self.start_clone()
        model = bytearray(self.golden_bytes)
        self.write_random(model, 60, 1)
        out, _ = self.bw("snapshot", "create", "vm1", "before-upgrade")
        at_s1 = self.copy(bytes(model), "at_s1.img")
        self.assertIn("vm1@before-upgrade", self.export_names())
        out, _ = self.bw("snapshot", "list", "vm1")
        self.assertIn("served read-only as export 'vm1@before-upgrade'", out)
        info = json.loads(subprocess.run(["nbdinfo", "--json", self.uri("vm1@before-upgrade")],
                                         stdout=subprocess.PIPE, check=True, timeout=30).stdout)
        self.assertEqual(info["exports"][0]["export-size"], IMAGE)
        self.assertTrue(info["exports"][0]["is_read_only"])
        st = self.bwj("stats", "vm1@before-upgrade")
        self.assertEqual((st["snapshot_of"], st["mode"], st["read_only"]), ("vm1", "snapshot", True))

        # The clone goes on writing (fio verify over the whole image) while
        # the snapshot is compared with the copy taken when it was made.
        fio = subprocess.Popen(
            ["fio", "--name=load", "--ioengine=nbd", "--uri=" + self.uri("vm1"), "--rw=randwrite", "--bs=4k",
             "--iodepth=8", "--size=%d" % IMAGE, "--randseed=7", "--verify=crc32c", "--verify_state_save=0",
             "--do_verify=1", "--verify_fatal=1", "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.compare(at_s1, "vm1@before-upgrade", "snapshot export under fio writes")
        # A second snapshot in the middle of the writes; the first stays right.
        self.bw("snapshot", "create", "vm1", "s2")
        self.compare(at_s1, "vm1@before-upgrade", "snapshot export after a second snapshot")
        _, err = fio.communicate(timeout=300)
        self.assertEqual(fio.returncode, 0, "fio verify failed:\n" + err.decode(errors="replace")[-2000:])

        # Writes, trims and zeroes to a snapshot export are refused.
        h = self.connect(self.uri("vm1@before-upgrade"))
        self.assertTrue(h.is_read_only())
        for attempt in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.zero(4096, 0), lambda: h.trim(4096, 0)):
            with self.assertRaises(Exception):
                attempt()
        self.assertEqual(h.pread(4096, 0), harness.read_file(at_s1, 0, 4096))
        harness.close_handle(h)

        # s2 holds what the clone had when s2 was taken: read it back through
        # its export, then check it survives deleting the older snapshot
        # (merged into s2) and kill -9 with a restart.
        h = self.connect(self.uri("vm1@s2"))
        at_s2 = self.copy(h.pread(IMAGE, 0), "at_s2.img")
        harness.close_handle(h)
        harness.wait_until(lambda: self.bwj("stats", "vm1@before-upgrade").get("clients", 0) == 0, 10,
                           what="no clients")
        self.bw("snapshot", "delete", "vm1", "before-upgrade")
        self.assertNotIn("vm1@before-upgrade", self.export_names())
        self.compare(at_s2, "vm1@s2", "s2 after the older snapshot merged into it")
        os.kill(d.pid, signal.SIGKILL)
        d.wait(10)
        self.start_clone()
        self.assertIn("vm1@s2", self.export_names())
        self.compare(at_s2, "vm1@s2", "s2 after kill -9 and a restart")
        with open(self.golden, "rb") as f:
            self.assertEqual(f.read(), self.golden_bytes, "the base image was never written")

    def test_snapshot_export_in_the_fuse_mount(self):
        if not os.path.exists("/dev/fuse"):
            self.skipTest("no /dev/fuse")
        self.start_clone()
        model = bytearray(self.golden_bytes)
        self.write_random(model, 30, 2)
        mnt = self.path("mnt")
        self.addCleanup(lambda: subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL))
        self.bw("mount", mnt)
        self.bw("snapshot", "create", "vm1", "s1")
        harness.wait_until(lambda: "vm1@s1" in os.listdir(mnt), 10, what="vm1@s1 in the mount")
        self.write_random(bytearray(model), 30, 3)  # the clone changes; the snapshot does not
        with open(os.path.join(mnt, "vm1@s1"), "rb") as f:
            self.assertEqual(f.read(), bytes(model))
        with self.assertRaises(OSError):
            with open(os.path.join(mnt, "vm1@s1"), "r+b") as f:
                f.write(b"x")
        self.bw("snapshot", "delete", "vm1", "s1")
        harness.wait_until(lambda: "vm1@s1" not in os.listdir(mnt), 10, what="vm1@s1 gone from the mount")
        self.bw("unmount")

    def test_snapshot_export_follows_the_clones_access_rules(self):
        go_from = control_common.go_from
        ack, unknown = harness.REP_ACK, control_common.REP_ERR_UNKNOWN
        d = self.start_clone()
        self.bw("snapshot", "create", "vm1", "s1")
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.2"), ack)
        out, _ = self.bw("access", "vm1", "--allow", "127.0.0.1")
        self.assertIn("allow '127.0.0.1'", out)
        # At once: the snapshot export serves under the clone's new rule.
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.1"), ack)
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.2"), unknown)
        self.assertEqual(self.bwj("access", "vm1@s1")["allow"], "127.0.0.1")
        self.assertEqual(self.bwj("access", "vm1@s1")["denied"], 1)
        # Its own rules cannot be set: refused, naming the clone; nothing changes.
        for option in ("--allow", "--listen"):
            _, err = self.bw("access", "vm1@s1", option, "", expect=control_common.EXIT_REFUSED)
            self.assertIn("export 'vm1@s1' is a snapshot of clone 'vm1': it takes the clone's allow= and listen= "
                          "rules (change them on 'vm1')", err)
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.2"), unknown)
        # The clone's rule turned round: allowed and denied swap.
        self.bw("access", "vm1", "--allow", "127.0.0.2")
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.2"), ack)
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.1"), unknown)
        # After a restart (kill -9): the clone's saved rule, on the snapshot too.
        os.kill(d.pid, signal.SIGKILL)
        d.wait(10)
        self.start_clone()
        self.assertEqual(self.bwj("access", "vm1@s1")["allow"], "127.0.0.2")
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.2"), ack)
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.1"), unknown)
        p = harness.run(["nbdinfo", self.uri("vm1@s1")], timeout=30, check=False)  # a real client, from 127.0.0.1
        self.assertNotEqual(p.returncode, 0)
        # And after the restart a change still reaches it; "" lets everyone in.
        self.bw("access", "vm1", "--allow", "")
        self.assertEqual(go_from(self.port, "vm1@s1", "127.0.0.1"), ack)
        harness.run(["nbdinfo", self.uri("vm1@s1")], timeout=30)

    def test_delete_refused_while_served_unless_forced_and_clone_removal(self):
        self.start({"golden": "file://" + self.golden})
        self.bw("export", "add", "vm1", "clone:golden", "overlay=" + self.overlays)
        model = bytearray(self.golden_bytes)
        self.write_random(model, 20, 4)
        self.bw("snapshot", "create", "vm1", "s1")
        self.bw("snapshot", "create", "vm1", "s2")
        h = self.connect(self.uri("vm1@s1"))
        self.assertEqual(h.pread(IMAGE, 0), bytes(model))
        harness.wait_until(lambda: self.bwj("stats", "vm1@s1").get("clients", 0) == 1, 10, what="the client")
        _, err = self.bw("snapshot", "delete", "vm1", "s1", expect=control_common.EXIT_REFUSED)
        self.assertIn("snapshot export 'vm1@s1' has 1 client connection(s)", err)
        self.assertEqual(h.pread(4096, 0), bytes(model[:4096]))
        self.bw("snapshot", "delete", "vm1", "s1", "--force")
        with self.assertRaises(Exception):
            h.pread(4096, 0)  # its level is gone: the view fails rather than show other data
        harness.close_handle(h)
        self.assertNotIn("vm1@s1", self.export_names())
        h = self.connect(self.uri("vm1@s2"))
        self.assertEqual(h.pread(IMAGE, 0), bytes(model))
        harness.close_handle(h)
        # A clone's snapshot exports go with it; their clients count as its own.
        h = self.connect(self.uri("vm1@s2"))
        harness.wait_until(lambda: self.bwj("stats", "vm1@s2").get("clients", 0) == 1, 10, what="the client")
        _, err = self.bw("export", "remove", "vm1", expect=control_common.EXIT_REFUSED)
        self.assertIn("1 client connection(s)", err)
        harness.close_handle(h)
        harness.wait_until(lambda: self.bwj("stats", "vm1@s2").get("clients", 0) == 0, 10, what="no clients")
        self.bw("export", "remove", "vm1")
        self.assertEqual(self.export_names(), ["golden"])
        # Added again, the clone's snapshots are served again.
        self.bw("export", "add", "vm1", "clone:golden", "overlay=" + self.overlays)
        self.assertIn("vm1@s2", self.export_names())

    def test_export_image_of_a_clone_and_a_snapshot(self):
        if not harness.have("qemu-img"):
            self.skipTest("needs qemu-img")
        d = self.start_clone()
        model = bytearray(self.golden_bytes)
        self.write_random(model, 40, 5)
        h = self.connect(self.uri("vm1"))
        h.zero(8 * MiB, 4 * MiB)  # a zero region: a hole in the exported file
        h.flush()
        harness.close_handle(h)
        model[4 * MiB:12 * MiB] = bytes(8 * MiB)
        self.bw("snapshot", "create", "vm1", "s1")
        at_s1 = self.copy(bytes(model), "at_s1.img")
        self.write_random(model, 40, 6)
        now = self.copy(bytes(model), "now.img")

        out, _ = self.bw("export-image", "vm1", self.path("vm1.raw"))
        self.assertIn("export 'vm1' written to " + self.path("vm1.raw"), out)
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", now, self.path("vm1.raw")],
                       check=True, stdout=subprocess.DEVNULL, timeout=120)
        self.assertEqual(os.stat(self.path("vm1.raw")).st_size, IMAGE)
        r = self.bwj("export-image", "vm1@s1", self.path("s1.raw"))
        self.assertEqual((r["size"], r["data_bytes"]), (IMAGE, IMAGE - 8 * MiB))
        st = os.stat(self.path("s1.raw"))
        self.assertLessEqual(st.st_blocks * 512, IMAGE - 7 * MiB, "the zero region must be a hole")
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", at_s1, self.path("s1.raw")],
                       check=True, stdout=subprocess.DEVNULL, timeout=120)
        # Relative paths are the caller's; an existing file needs --force.
        _, err = self.bw("export-image", "vm1", self.path("vm1.raw"), expect=control_common.EXIT_REFUSED)
        self.assertIn("exists", err)
        self.bw("export-image", "vm1@s1", self.path("vm1.raw"), "--force")
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", at_s1, self.path("vm1.raw")],
                       check=True, stdout=subprocess.DEVNULL, timeout=120)
        _, err = self.bw("export-image", "nothere", self.path("x.raw"), expect=control_common.EXIT_UNKNOWN)
        self.assertFalse(os.path.exists(self.path("x.raw")))
        self.bw("export-image", "vm1", expect=control_common.EXIT_USAGE)
        _, err = self.bw("export-image", "vm1", self.path("no/such/dir/x.raw"), expect=control_common.EXIT_FAILED)
        self.assertIn("cannot create", err)

        # A level file made just before a crash, never recorded: swept at start.
        d.stop()
        stray = os.path.join(self.overlays, "vm1.9.img")
        with open(stray, "wb") as f:
            f.truncate(IMAGE)
        self.start_clone()
        self.assertFalse(os.path.exists(stray), "an unrecorded level file must be swept")
        self.compare(at_s1, "vm1@s1", "the snapshot after the sweep")
        self.compare(now, "vm1", "the clone after the sweep")


if __name__ == "__main__":
    unittest.main()
