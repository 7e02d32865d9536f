"""Snapshots of clones: `blockway snapshot create|list|delete` and `blockway
revert`, driven the way a user would, over a clone of a file export.

- snapshot, write, revert, compare with qemu-img compare; the snapshots and
  the reverted content survive kill -9 and a restart;
- delete a middle snapshot and the newest one while fio writes and verifies
  in the clone and a reader checks a region no one writes: reads stay right
  throughout, fio verifies, and the snapshot above holds the merged content;
- kill -9 in the middle of snapshot/revert/delete: after a restart the chain
  is the old or the new one, and the content matches it;
- refusals: a non-clone, bad or taken names, revert past a later snapshot,
  revert with a client connected (unless --force).
"""

import os
import random
import signal
import subprocess
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import harness  # noqa: E402

MiB = harness.MiB
IMAGE = control_common.CloneTestCase.IMAGE


class SnapshotsTest(control_common.CloneTestCase):
    GOLDEN_SEED = 18

    def no_clients(self):
        """Waits until the daemon has seen every connection of the test close."""
        harness.wait_until(lambda: self.bwj("stats", "vm1").get("clients", 0) == 0, 10, what="no clients")

    def revert(self, snap):
        self.no_clients()
        return self.bw("revert", "vm1", snap)

    def names(self):
        return [s["name"] for s in self.bwj("snapshot", "list", "vm1")["snapshots"]]

    def compare(self, model, what):
        path = self.path("model.img")
        with open(path, "wb") as f:
            f.write(model)
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", path, self.uri("vm1")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        self.assertEqual(p.returncode, 0, "%s: qemu-img compare: %s" % (what, p.stdout.decode(errors="replace")))

    def read_all(self, name="vm1", offset=0, length=IMAGE):
        h = self.connect(self.uri(name))
        out = h.pread(length, offset)
        h.shutdown()
        return out

    def test_snapshot_write_revert_compare_and_restart(self):
        if not harness.have("qemu-img"):
            self.skipTest("needs qemu-img")
        d = self.start_clone()
        model = bytearray(self.golden_bytes)
        self.write_random(model, 40, 1)
        at_s1 = bytes(model)
        out, _ = self.bw("snapshot", "create", "vm1", "s1")
        self.assertIn("snapshot 's1' of clone 'vm1' taken", out)
        self.write_random(model, 40, 2)
        self.compare(model, "after writes on top of s1")
        self.bw("snapshot", "create", "vm1", "s2")
        at_s2 = bytes(model)
        self.write_random(model, 40, 3)
        self.assertEqual(self.names(), ["s1", "s2"])
        st = self.bwj("stats", "vm1")["clone"]
        self.assertEqual(st["snapshots"], 2)
        self.assertGreater(st["snapshot_bytes"], 0)
        out, _ = self.bw("snapshot", "list", "vm1")
        self.assertIn("s1", out)

        # Revert with a client connected: refused unless forced.
        h = self.connect(self.uri("vm1"))
        _, err = self.bw("revert", "vm1", "s2", expect=control_common.EXIT_REFUSED)
        self.assertIn("client connection", err)
        h.shutdown()
        self.no_clients()
        _, err = self.bw("revert", "vm1", "s1", expect=control_common.EXIT_REFUSED)
        self.assertIn("delete the later snapshot(s) 's2'", err)
        out, _ = self.revert("s2")
        self.assertIn("reverted to snapshot 's2'", out)
        self.compare(bytearray(at_s2), "revert to s2")
        self.assertEqual(self.read_all("golden"), self.golden_bytes)

        # kill -9: the chain and the reverted content are in the catalogue.
        os.kill(d.pid, signal.SIGKILL)
        d.wait(10)
        self.start_clone()
        self.assertEqual(self.names(), ["s1", "s2"])
        self.compare(bytearray(at_s2), "revert to s2, after kill -9")
        self.bw("snapshot", "delete", "vm1", "s2")
        self.revert("s1")
        self.compare(bytearray(at_s1), "revert to s1")
        self.bw("snapshot", "delete", "vm1", "s1")
        self.assertEqual(self.names(), [])
        self.compare(bytearray(at_s1), "after deleting every snapshot")
        with open(self.golden, "rb") as f:
            self.assertEqual(f.read(), self.golden_bytes, "the base image was never written")

    def test_delete_middle_snapshot_under_fio_load(self):
        if not harness.have("fio"):
            self.skipTest("needs fio")
        self.start_clone()
        model = bytearray(self.golden_bytes)
        half = IMAGE // 2
        # Three levels of writes all over the clone.
        for i, name in enumerate(("s1", "s2", "s3")):
            self.write_random(model, 60, 10 + i)
            self.bw("snapshot", "create", "vm1", name)
        at_s3 = bytes(model)
        # fio writes and verifies the first half; a reader checks the second.
        fio = subprocess.Popen(
            ["fio", "--name=load", "--ioengine=nbd", "--uri=" + self.uri("vm1"), "--rw=randwrite", "--bs=4k",
             "--iodepth=8", "--size=%d" % half, "--offset=0", "--randseed=5", "--verify=crc32c",
             "--verify_state_save=0", "--do_verify=1", "--verify_fatal=1", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        errors, reads = [], [0]
        stop = threading.Event()

        def reader():
            try:
                h = self.connect(self.uri("vm1"))
                while not stop.is_set():
                    if h.pread(half, half) != at_s3[half:]:
                        errors.append("a read of the unwritten half differs during the merge")
                    reads[0] += 1
                h.shutdown()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        t = threading.Thread(target=reader)
        t.start()
        harness.wait_until(lambda: reads[0] >= 1, 30, what="a first read")
        self.bw("snapshot", "delete", "vm1", "s2")  # middle: merged into s3
        self.bw("snapshot", "delete", "vm1", "s3")  # newest: merged into the top, under fio's writes
        harness.wait_until(lambda: reads[0] >= 3, 30, what="reads after the deletes")
        out, err = fio.communicate(timeout=300)
        stop.set()
        t.join(60)
        self.assertEqual(fio.returncode, 0, "fio verify failed:\n" + err.decode(errors="replace")[-2000:])
        self.assertEqual(errors, [])
        self.assertEqual(self.names(), ["s1"])
        self.assertEqual(self.read_all(offset=half, length=half), at_s3[half:])

    def test_merged_snapshot_keeps_the_content_of_the_one_above(self):
        self.start_clone()
        model = bytearray(self.golden_bytes)
        self.write_random(model, 50, 20)
        self.bw("snapshot", "create", "vm1", "a")
        self.write_random(model, 50, 21)
        self.bw("snapshot", "create", "vm1", "b")
        at_b = bytes(model)
        self.write_random(model, 50, 22)
        self.bw("snapshot", "delete", "vm1", "a")  # merged into b
        self.assertEqual(self.read_all(), bytes(model))
        self.revert("b")
        self.assertEqual(self.read_all(), at_b)

    def test_kill9_during_snapshot_revert_delete_leaves_old_or_new(self):
        model = bytearray(self.golden_bytes)
        d = self.start_clone()
        snaps, chain = {}, []
        rng = random.Random(3)
        for round_ in range(6):
            self.write_random(model, 10, 100 + round_)  # flushed, on top of the chain
            before = tuple(chain)
            kind = ("create", "delete", "revert")[round_ % 3] if chain else "create"
            if kind == "create":
                name = "k%d" % round_
                cmd, after, content = ["snapshot", "create", "vm1", name], before + (name,), bytes(model)
            elif kind == "delete":
                cmd, after, content = (["snapshot", "delete", "vm1", chain[0]], tuple(chain[1:]), bytes(model))
            else:
                cmd, after, content = ["revert", "vm1", chain[-1]], before, snaps[chain[-1]]
            self.no_clients()
            p = subprocess.Popen([harness.BLOCKWAY] + cmd + ["--socket", self.csock],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            threading.Event().wait(rng.uniform(0, 0.03))
            os.kill(d.pid, signal.SIGKILL)
            d.wait(10)
            p.wait(30)
            d = self.start_clone()
            now = tuple(self.names())
            what = "kill -9 during %s" % " ".join(cmd)
            self.assertIn(now, (before, after), what)
            got = self.read_all()
            self.assertIn(got, (bytes(model), content), what + ": the content is neither the old nor the new")
            if kind == "create" and now == after:
                snaps[name] = bytes(model)
            model, chain = bytearray(got), list(now)
        for name in reversed(chain):  # every snapshot left still holds its content
            self.revert(name)
            self.assertEqual(self.read_all(), snaps[name], "snapshot %s after the kills" % name)
            self.bw("snapshot", "delete", "vm1", name)

    def test_refusals_are_clear(self):
        self.start_clone()
        _, err = self.bw("snapshot", "create", "golden", "x", expect=control_common.EXIT_REFUSED)
        self.assertIn("is not a clone", err)
        _, err = self.bw("snapshot", "create", "nothere", "x", expect=control_common.EXIT_UNKNOWN)
        _, err = self.bw("snapshot", "create", "vm1", "a/b", expect=control_common.EXIT_USAGE)
        self.assertIn("snapshot name 'a/b'", err)
        self.bw("snapshot", "create", "vm1", "x")
        _, err = self.bw("snapshot", "create", "vm1", "x", expect=control_common.EXIT_REFUSED)
        self.assertIn("already has a snapshot 'x'", err)
        _, err = self.bw("snapshot", "delete", "vm1", "y", expect=control_common.EXIT_REFUSED)
        self.assertIn("has no snapshot 'y'", err)
        self.bw("snapshot", "frobnicate", "vm1", expect=control_common.EXIT_USAGE)
        self.bw("snapshot", "list", "vm1", "extra", expect=control_common.EXIT_USAGE)
        self.bw("revert", "vm1", expect=control_common.EXIT_USAGE)


if __name__ == "__main__":
    unittest.main()
