"""Clones: eight copy-on-write clones of one golden image on an nbdkit remote
(1 ms read delay, every request logged), used at once by eight clients.

- fio (nbd engine) writes and verifies its own random data in each clone
  while python clients read base data elsewhere; every clone then reads
  back its own writes and the golden image everywhere else, the base is
  unchanged, and the remote was asked for each byte at most once in total
  (the base's one cache serves every clone);
- kill -9 while all eight write and flush: after a restart (the clones come
  back from the catalogue) every flushed write is there in every clone;
- the base is read-only while it has clones, and cannot be removed;
- the overlay file is a plain raw image of the clone's writes, and
  qemu-img compare agrees with a model image of the clone.

Sizes are scaled for CI (CLONES_IMAGE_MIB, default 32); bench/clones.sh is
where the full-size runs belong.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import harness  # noqa: E402
import remotes  # noqa: E402

MiB = harness.MiB
IMAGE = int(os.environ.get("CLONES_IMAGE_MIB", "32")) * MiB
CLONES = 8
SLICE = IMAGE // CLONES  # clone i writes inside its own slice (so base data stays elsewhere)


def intervals_read(log):
    """(offset, count) of every Read in nbdkit's request log."""
    import re
    return [(int(o, 0), int(c, 0)) for o, c in re.findall(r" Read id=\d+ offset=(\S+) count=(\S+)", log)]


class ClonesTest(control_common.ControlTestCase):
    def setUp(self):
        super().setUp()
        if not harness.have("nbdkit") or not harness.have("fio"):
            self.skipTest("needs nbdkit and fio")
        self.golden = harness.make_random_image(self.path("golden.img"), IMAGE, seed=18)
        with open(self.golden, "rb") as f:
            self.golden_bytes = f.read()
        # The log filter comes last (outermost): it sees every request blockway makes.
        self.remote = remotes.started(self, remotes.Nbdkit(self.tmp, self.golden, filters=["delay"],
                                                           params=["rdelay=1ms"], log_requests=True))
        self.overlays = self.path("overlays")

    def start_clones(self):
        exports = {"golden": self.remote.uri + ",cache=" + self.path("cache")}
        # Half the clones on the command line, half added at run time below.
        for i in range(CLONES // 2):
            exports["vm%d" % i] = "clone:golden,overlay=" + self.overlays
        d = self.start(exports)
        return d

    def add_runtime_clones(self):
        for i in range(CLONES // 2, CLONES):
            out, _ = self.bw("clone", "golden", "vm%d" % i, "--overlay", self.overlays, "--granularity", "16k")
            self.assertIn("a clone of 'golden'", out)

    def read_export(self, name, offset=0, length=IMAGE):
        h = self.connect(self.uri(name))
        out = bytearray()
        pos = offset
        while pos < offset + length:
            n = min(4 * MiB, offset + length - pos)
            out += h.pread(n, pos)
            pos += n
        h.shutdown()
        return bytes(out)

    def fio(self, i, size, verify=True, runtime=None):
        args = ["fio", "--name=vm%d" % i, "--ioengine=nbd", "--uri=" + self.uri("vm%d" % i),
                "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=%d" % size, "--offset=%d" % (i * SLICE),
                "--randseed=%d" % (1000 + i), "--output-format=json"]
        if verify:
            args += ["--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--verify_fatal=1"]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def test_eight_clones_share_one_base(self):
        self.start_clones()
        self.add_runtime_clones()
        status = self.bwj("status")
        by_name = {e["name"]: e for e in status["exports"]}
        self.assertTrue(by_name["golden"]["read_only"], "the base is read-only while it has clones")
        self.assertEqual(by_name["golden"]["base_of_clones"], CLONES)
        self.assertEqual(by_name["vm5"]["clone"]["base"], "golden")
        self.assertEqual(by_name["vm5"]["clone"]["granularity"], 16384)

        # Eight fio writers with verify, and base reads elsewhere, at once.
        fios = [self.fio(i, SLICE // 4) for i in range(CLONES)]
        errors = []

        def read_base(i):
            try:
                off = ((i + 1) % CLONES) * SLICE + SLICE // 2  # another clone's slice, never written
                got = self.read_export("vm%d" % i, off, SLICE // 2)
                if got != self.golden_bytes[off:off + SLICE // 2]:
                    errors.append("vm%d: base data differs" % i)
            except Exception as e:  # noqa: BLE001
                errors.append("vm%d: %r" % (i, e))

        readers = [threading.Thread(target=read_base, args=(i,)) for i in range(CLONES)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(120)
        for i, p in enumerate(fios):
            out, err = p.communicate(timeout=300)
            self.assertEqual(p.returncode, 0, "fio on vm%d:\n%s" % (i, err.decode(errors="replace")[-2000:]))
        self.assertEqual(errors, [])

        # Each clone: its own slice differs from the base where fio wrote,
        # every other slice is the golden image.
        for i in range(CLONES):
            img = self.read_export("vm%d" % i)
            for j in range(CLONES):
                lo, hi = j * SLICE, (j + 1) * SLICE
                if j == i:
                    self.assertNotEqual(img[lo:lo + SLICE // 4], self.golden_bytes[lo:lo + SLICE // 4])
                    self.assertEqual(img[lo + SLICE // 4:hi], self.golden_bytes[lo + SLICE // 4:hi],
                                     "vm%d: past fio's range it is the base" % i)
                else:
                    self.assertEqual(img[lo:hi], self.golden_bytes[lo:hi], "vm%d slice %d" % (i, j))
        self.assertEqual(self.read_export("golden"), self.golden_bytes)
        with open(self.golden, "rb") as f:
            self.assertEqual(f.read(), self.golden_bytes, "the remote image was never written")

        # The remote: each byte read at most once, by all clones together.
        reads = intervals_read(self.remote.requests())
        self.assertTrue(reads)
        seen = bytearray(IMAGE // 4096)
        for off, count in reads:
            for b in range(off // 4096, (off + count + 4095) // 4096):
                self.assertEqual(seen[b], 0, "the remote was asked twice for offset %d" % (b * 4096))
                seen[b] = 1
        total = sum(c for _, c in reads)
        self.assertLessEqual(total, IMAGE)

        st = self.bwj("stats", "vm3")
        self.assertGreater(st["clone"]["allocated_bytes"], 0)
        self.assertGreater(st["clone"]["base_read_bytes"], 0)

        # The base refuses writes (with the reason in the log) and removal.
        import nbd
        h = self.connect(self.uri("golden"), strict=False)
        with self.assertRaises(nbd.Error):
            h.pwrite(b"x" * 4096, 0)
        _, err = self.bw("export", "remove", "golden", expect=control_common.EXIT_REFUSED)
        self.assertIn("is the base of clone(s)", err)

    def test_kill9_while_eight_clones_write_keeps_flushed_writes(self):
        import nbd
        d = self.start_clones()
        self.add_runtime_clones()
        flushed = [dict() for _ in range(CLONES)]  # offset -> bytes, after a flush returned
        stop = threading.Event()

        def writer(i):
            rng = random.Random(i)
            slots = list(range(SLICE // 4096))  # each 4 KiB slot written once: no overlaps
            rng.shuffle(slots)
            try:
                h = nbd.NBD()
                h.connect_uri(self.uri("vm%d" % i))
                pending = {}
                while not stop.is_set() and slots:
                    off = i * SLICE + slots.pop() * 4096 + rng.choice((0, 512, 1024))
                    n = rng.choice((512, 2048, 3072))
                    data = rng.randbytes(n)
                    h.pwrite(data, off)
                    pending[off] = data
                    if len(pending) >= 8:
                        h.flush()
                        flushed[i].update(pending)
                        pending = {}
            except Exception:  # noqa: BLE001 - the daemon dies under it
                pass

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(CLONES)]
        for t in threads:
            t.start()
        harness.wait_until(lambda: all(len(f) >= 40 for f in flushed), 60, what="flushed writes in every clone")
        os.kill(d.pid, signal.SIGKILL)
        d.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        snapshot = [dict(f) for f in flushed]
        # The runtime clones come back from the catalogue.
        self.start_clones()
        for i in range(CLONES):
            img = self.read_export("vm%d" % i, i * SLICE, SLICE)
            for off, data in snapshot[i].items():
                rel = off - i * SLICE
                self.assertEqual(img[rel:rel + len(data)], data,
                                 "vm%d: a flushed write at %d is lost after kill -9" % (i, off))
        st = self.bwj("stats", "vm0")
        self.assertTrue(st["clone"]["recovered"])

    def test_overlay_is_a_raw_image_and_qemu_img_compare_agrees(self):
        if not harness.have("qemu-img"):
            self.skipTest("needs qemu-img")
        d = self.start_clones()
        h = self.connect(self.uri("vm0"))
        model = bytearray(self.golden_bytes)
        rng = random.Random(7)
        for _ in range(50):
            off = rng.randrange(IMAGE // 512 - 64) * 512
            data = rng.randbytes(rng.choice((512, 4096, 65536)))
            h.pwrite(data, off)
            model[off:off + len(data)] = data
        h.zero(1 * MiB, 3 * MiB)
        model[3 * MiB:4 * MiB] = bytes(MiB)
        h.flush()
        h.shutdown()
        model_path = self.path("model.img")
        with open(model_path, "wb") as f:
            f.write(model)
        harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", model_path, self.uri("vm0")], timeout=120)
        # A standalone raw image of the clone (what README gives for export-image).
        if harness.have("nbdcopy"):
            standalone = self.path("vm0-standalone.img")
            harness.run(["nbdcopy", self.uri("vm0"), standalone], timeout=120)
            with open(standalone, "rb") as f:
                self.assertEqual(f.read(), bytes(model))
        d.stop()
        # The overlay: at every block the clone wrote, the clone's bytes.
        with open(os.path.join(self.overlays, "vm0.img"), "rb") as f:
            f.seek(3 * MiB)
            self.assertEqual(f.read(MiB), bytes(MiB))
            self.assertEqual(os.fstat(f.fileno()).st_size, IMAGE)
        # After a clean restart, still the same image.
        self.start_clones()
        harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", model_path, self.uri("vm0")], timeout=120)

    def test_bad_clone_specs_are_refused_clearly(self):
        self.start_refused("vm1=clone:nothere", "its base export 'nothere' does not exist")
        self.start_refused("vm1=clone:", "needs the name of its base export")
        self.start_refused("vm1=clone:golden,cache=/tmp/x", "a clone has no cache of its own")
        self.start_refused("vm1=file:///dev/null,granularity=4k", "overlay options")


if __name__ == "__main__":
    unittest.main()
