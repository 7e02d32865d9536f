"""blockway flatten: a clone copies every block it still reads from its base
into its own overlay, in the background, and then stands alone.

- flatten (paced) while a writer process writes the clone: the writer's
  blocks are never overwritten by base data; qemu-img compare agrees with a
  model image; the base's read-only hold is gone, `export remove BASE` works,
  and after a restart without the base (and without its remote) the clone
  opens from its overlay alone, with the same content, and takes writes;
- kill -9 mid-flatten (low --rate): after the restart the flatten resumes
  from the blocks still unallocated (it does not copy the image again) and
  completes, data right;
- refusals: unknown export, not a clone, snapshots present, snapshot create
  while it runs, cancel, bad --rate and option mixes.

Sizes are scaled for CI (FLATTEN_IMAGE_MIB, default 32).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import harness  # noqa: E402
import remotes  # noqa: E402

MiB = harness.MiB
IMAGE = int(os.environ.get("FLATTEN_IMAGE_MIB", "32")) * MiB

# A writer process: random writes of known data into the clone while the
# flatten runs, flushed; prints the model of what it wrote as JSON lines.
WRITER = r"""
import json, random, sys, time, nbd
uri, seed, seconds, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    off = rng.randrange(size // 512) * 512
    data = rng.randbytes(min(rng.choice((512, 4096, 20480, 65536)), size - off))
    h.pwrite(data, off)
    print(json.dumps([off, data.hex()]), flush=True)
    n += 1
    if n % 16 == 0:
        h.flush()
    time.sleep(0.005)
h.flush()
h.shutdown()
"""


class FlattenTest(control_common.ControlTestCase):
    def setUp(self):
        super().setUp()
        if not harness.have("nbdkit") or not harness.have("qemu-img"):
            self.skipTest("needs nbdkit and qemu-img")
        self.golden = harness.make_random_image(self.path("golden.img"), IMAGE, seed=1818)
        with open(self.golden, "rb") as f:
            self.golden_bytes = f.read()
        self.remote = remotes.Nbdkit(self.tmp, self.golden)
        remotes.started(self, self.remote)
        self.overlays = self.path("overlays")

    def start_base(self, with_base=True):
        exports = {"golden": self.remote.uri + ",cache=" + self.path("cache")} if with_base else {}
        return self.start(exports)

    def add_clone(self, name="vm1", granularity="16k"):
        out, _ = self.bw("clone", "golden", name, "--overlay", self.overlays, "--granularity", granularity)
        self.assertIn("a clone of 'golden'", out)

    def flatten_json(self, name="vm1"):
        return self.bwj("stats", name)["clone"]["flatten"]

    def write_model(self, model, h, rng, count):
        for _ in range(count):
            off = rng.randrange(IMAGE // 512 - 200) * 512
            data = rng.randbytes(rng.choice((512, 3000, 4096, 65536)))
            data = data[:len(data) // 512 * 512] or data[:512]
            h.pwrite(data, off)
            model[off:off + len(data)] = data

    def compare(self, model, name="vm1"):
        path = self.path("model.img")
        with open(path, "wb") as f:
            f.write(model)
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", path, self.uri(name)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        if p.returncode != 0:
            got = self.read_all(name)
            first = next(i for i in range(len(model)) if got[i] != model[i])
            end = first
            while end < len(model) and got[end] != model[end]:
                end += 1
            self.fail("qemu-img compare: %s; the clone differs from the model at [%d, %d), where it reads %s"
                      % (p.stdout.decode().strip(), first, end,
                         "the base" if got[first:end] == self.golden_bytes[first:end] else
                         "something else: %s, model %s, base %s" % (got[first:first + 8].hex(),
                                                                    model[first:first + 8].hex(),
                                                                    self.golden_bytes[first:first + 8].hex())))

    def read_all(self, name):
        h = self.connect(self.uri(name))
        out = b"".join(h.pread(4 * MiB, off) for off in range(0, IMAGE, 4 * MiB))
        h.shutdown()
        return out

    def test_flatten_under_writes_then_remove_base_and_restart_without_it(self):
        d = self.start_base()
        self.add_clone()
        model = bytearray(self.golden_bytes)
        h = self.connect(self.uri("vm1"))
        self.write_model(model, h, random.Random(5), 40)  # some blocks of its own (copy-ups too)
        h.zero(2 * MiB, 5 * MiB)  # (count, offset)
        model[5 * MiB:7 * MiB] = bytes(2 * MiB)
        h.flush()
        h.shutdown()
        fl = self.flatten_json()
        self.assertEqual(fl["state"], "none")
        self.assertLess(fl["done_bytes"], IMAGE)
        self.assertEqual(fl["total_bytes"], IMAGE)

        # Paced: about 6 s for the image, so the writer overlaps it and
        # --wait below follows it for a while.
        rate = IMAGE // 6 // 65536 * 65536
        out, _ = self.bw("flatten", "vm1", "--rate", str(rate))
        self.assertIn("flatten of clone 'vm1' started", out)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, self.uri("vm1"), "9", "2.5", str(IMAGE)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        fl = self.flatten_json()
        self.assertEqual(fl["state"], "running")
        self.assertEqual(fl["rate"], rate)
        # No snapshot while it runs; the base is still needed.
        _, err = self.bw("snapshot", "create", "vm1", "s1", expect=control_common.EXIT_REFUSED)
        self.assertIn("a flatten of clone 'vm1' is running", err)
        _, err = self.bw("export", "remove", "golden", expect=control_common.EXIT_REFUSED)
        self.assertIn("is the base of clone(s) 'vm1'", err)
        out, err = writer.communicate(timeout=120)
        self.assertEqual(writer.returncode, 0, err.decode(errors="replace"))
        writes = [json.loads(line) for line in out.decode().splitlines()]
        self.assertGreater(len(writes), 20)
        for off, hexdata in writes:
            data = bytes.fromhex(hexdata)
            model[off:off + len(data)] = data

        # --wait follows it to the end (exit 0), with progress lines.
        out, _ = self.bw("flatten", "vm1", "--wait", "--timeout", "120", timeout=150)
        self.assertIn("clone 'vm1' is flattened", out)
        self.assertRegex(out.splitlines()[0], r"^vm1: flatten (running|done) ")
        st = self.bwj("stats", "vm1")
        fl = st["clone"]["flatten"]
        self.assertEqual(fl["state"], "done")
        self.assertEqual(fl["done_bytes"], IMAGE)
        self.assertGreater(fl["copied_bytes"], 0)
        self.assertLess(fl["copied_bytes"], IMAGE, "the clone's own blocks are not copied")
        self.assertEqual(st["clone"]["allocated_bytes"], IMAGE)
        golden = self.bwj("stats", "golden")
        self.assertEqual(golden["base_of_clones"], 0)
        self.compare(model)
        out, _ = self.bw("flatten", "vm1")
        self.assertIn("already flattened", out)
        out, _ = self.bw("stats", "vm1")
        self.assertIn("flatten:   done, 32.0 MiB of 32.0 MiB" if IMAGE == 32 * MiB else "flatten:   done", out)

        # The base can go now; the clone keeps its content.
        self.bw("export", "remove", "golden")
        self.compare(model)
        d.stop()
        # Restart without the base, and without its remote.
        self.remote.close()
        self.start_base(with_base=False)
        st = self.bwj("stats", "vm1")
        self.assertEqual(st["clone"]["flatten"]["state"], "done")
        self.assertEqual(st["clone"]["base"], "golden")
        self.compare(model)
        h = self.connect(self.uri("vm1"))
        h.pwrite(b"\x5a" * 4096, 8192)
        model[8192:8192 + 4096] = b"\x5a" * 4096
        h.flush()
        h.shutdown()
        self.compare(model)
        # Its overlay is a plain raw image of the whole clone.
        with open(os.path.join(self.overlays, "vm1.img"), "rb") as f:
            self.assertEqual(f.read(), bytes(model))

    def test_kill9_mid_flatten_resumes_and_completes(self):
        d = self.start_base()
        self.add_clone(granularity="64k")
        model = bytearray(self.golden_bytes)
        h = self.connect(self.uri("vm1"))
        self.write_model(model, h, random.Random(11), 30)
        h.flush()
        h.shutdown()
        # 4 MiB/s: far from done when killed, past a commit (every 8 MiB).
        self.bw("flatten", "vm1", "--rate", "4M")
        harness.wait_until(lambda: self.flatten_json()["copied_bytes"] >= 10 * MiB, 30,
                           what="10 MiB flattened")
        os.kill(d.pid, signal.SIGKILL)
        d.wait(10)
        self.start_base()
        fl = self.flatten_json()
        self.assertEqual(fl["state"], "running", "the flatten resumes after kill -9")
        self.assertEqual(fl["rate"], 4 * MiB)
        held = fl["done_bytes"]
        self.assertGreaterEqual(held, 8 * MiB, "the commits before the kill are kept")
        self.assertLess(held, IMAGE)
        # Faster now, and followed to the end.
        out, _ = self.bw("flatten", "vm1", "--rate", "unlimited", "--wait", "--timeout", "120", timeout=150)
        self.assertIn("is flattened", out)
        fl = self.flatten_json()
        self.assertEqual(fl["state"], "done")
        self.assertLessEqual(fl["copied_bytes"], IMAGE - 8 * MiB, "it went on from where it was, not from the start")
        self.compare(model)
        self.bw("export", "remove", "golden")
        self.compare(model)

    def test_refusals_and_cancel(self):
        mport = harness.free_port()
        self.start({"golden": self.remote.uri + ",cache=" + self.path("cache")}, ["--metrics", str(mport)])
        self.add_clone()
        _, err = self.bw("flatten", "nothere", expect=control_common.EXIT_UNKNOWN)
        self.assertIn("no export named 'nothere'", err)
        _, err = self.bw("flatten", "golden", expect=control_common.EXIT_REFUSED)
        self.assertIn("is not a clone", err)
        _, err = self.bw("flatten", "vm1", "--rate", "10", expect=control_common.EXIT_USAGE)
        self.assertIn("at least 64k", err)
        _, err = self.bw("flatten", "vm1", "--rate", "fast", expect=control_common.EXIT_USAGE)
        self.bw("flatten", "vm1", "--timeout", "5", expect=control_common.EXIT_USAGE)
        self.bw("flatten", "vm1", "--cancel", "--rate", "1M", expect=control_common.EXIT_USAGE)
        self.bw("flatten", expect=control_common.EXIT_USAGE)
        _, err = self.bw("flatten", "vm1", "--cancel", expect=control_common.EXIT_REFUSED)
        self.assertIn("no flatten of clone 'vm1' is running", err)

        # Snapshots present: refused, naming them.
        self.bw("snapshot", "create", "vm1", "before")
        _, err = self.bw("flatten", "vm1", expect=control_common.EXIT_REFUSED)
        self.assertIn("has snapshot(s) 'before'", err)
        self.bw("snapshot", "delete", "vm1", "before")

        # Cancel: it stops, what it copied stays, the base stays needed.
        self.bw("flatten", "vm1", "--rate", "1M")
        harness.wait_until(lambda: self.flatten_json()["copied_bytes"] > 0, 20, what="a flatten under way")
        # --wait --timeout gives up waiting (exit 7); the flatten goes on.
        _, err = self.bw("flatten", "vm1", "--wait", "--timeout", "1.5", expect=control_common.EXIT_TIMED_OUT)
        self.assertIn("it goes on in the daemon", err)
        self.assertEqual(self.flatten_json()["state"], "running")
        # --rate while it runs changes its pace; without --rate it keeps it.
        out, _ = self.bw("flatten", "vm1", "--rate", "2M")
        self.assertIn("now at 2 MiB/s", out)
        out, _ = self.bw("flatten", "vm1")
        self.assertIn("is running", out)
        self.assertEqual(self.flatten_json()["rate"], 2 * MiB)
        out, _ = self.bw("flatten", "vm1", "--status")
        self.assertRegex(out, r"^vm1: flatten running .* rate 2\.0 MiB/s")
        out, _ = self.bw("stats", "vm1")
        self.assertIn("flatten:   running", out)
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=10) as r:
            metrics = r.read().decode()
        self.assertIn('blockway_overlay_flatten_state{export="vm1",base="golden"} 1', metrics)
        self.assertIn('blockway_overlay_flatten_rate{export="vm1",base="golden"} 2097152', metrics)
        out, _ = self.bw("flatten", "vm1", "--cancel")
        self.assertIn("cancelled", out)
        fl = self.bwj("flatten", "vm1", "--status")
        self.assertEqual(fl["state"], "cancelled")
        copied = fl["done_bytes"]
        time.sleep(1.5)
        self.assertEqual(self.bwj("flatten", "vm1", "--status")["done_bytes"], copied, "a cancelled flatten stays put")
        self.assertEqual(self.bwj("stats", "golden")["base_of_clones"], 1)
        _, err = self.bw("export", "remove", "golden", expect=control_common.EXIT_REFUSED)
        self.assertIn("or flatten them", err)
        # Started again (unlimited), followed to the end.
        self.bw("flatten", "vm1", "--wait", "--timeout", "120", timeout=150)
        self.assertEqual(self.bwj("stats", "golden")["base_of_clones"], 0)
        self.compare(bytearray(self.golden_bytes))
        # A snapshot of a flattened clone is fine, and it stays standalone.
        self.bw("snapshot", "create", "vm1", "after")
        self.bw("export", "remove", "golden")
        self.compare(bytearray(self.golden_bytes), "vm1@after")


if __name__ == "__main__":
    unittest.main()
