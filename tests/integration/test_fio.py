"""fio's nbd engine (libnbd) against blockwayd, with data verification."""

import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402


def fio(test, uri, *args, timeout=120, check=True, name="job"):
    """Runs fio with its nbd engine; returns (returncode, parsed json or None, stderr)."""
    out = os.path.join(test.tmp, "fio-%s.json" % name)
    cmd = ["fio", "--name=" + name, "--ioengine=nbd", "--uri=" + uri,
           "--output-format=json", "--output=" + out] + list(args)
    # cwd: fio drops *-verify.state files where it runs.
    p = harness.run(cmd, timeout=timeout, check=False, cwd=test.tmp)
    result = None
    try:
        with open(out) as f:
            text = f.read()
        result = json.loads(text[text.index("{"):])
    except (FileNotFoundError, ValueError):
        pass
    if check:
        test.assertEqual(p.returncode, 0, "fio failed:\n%s\n%s" % (p.stderr.decode(errors="replace")[-3000:],
                                                                    (p.stdout or b"").decode()[-2000:]))
        test.assertIsNotNone(result, "fio wrote no JSON report")
        for job in result["jobs"]:
            test.assertEqual(job["error"], 0, "fio job %s reported error %d" % (job["jobname"], job["error"]))
    return p.returncode, result, p.stderr.decode(errors="replace")


def total(result, direction):
    return sum(j[direction]["io_bytes"] for j in result["jobs"])


@unittest.skipUnless(harness.have("fio"), "fio missing")
class FioTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_sparse_image(self.path("f.img"), 1024 * MiB)
        self.daemon = self.serve({"f": self.img}, extra=["--log-level", "info"])

    def test_randrw_4k_qd16_four_connections_verified(self):
        # Four jobs, four NBD connections, each on its own 256 MiB slice, so
        # every job can verify what it wrote.
        _, result, _ = fio(self, self.uri("f"), "--rw=randrw", "--bs=4k", "--iodepth=16",
                           "--numjobs=4", "--size=256M", "--offset_increment=256M",
                           "--verify=crc32c", "--verify_fatal=1", "--runtime=60",
                           timeout=150)
        self.assertEqual(len(result["jobs"]), 4)
        self.assertGreater(total(result, "write"), 256 * MiB)
        self.assertGreater(total(result, "read"), 256 * MiB)  # mixed reads plus verify reads
        self.assertTrue(self.daemon.running())
        self.daemon.stop(timeout=20)

    def test_mixed_sizes_verified(self):
        _, result, _ = fio(self, self.uri("f"), "--rw=randwrite",
                           "--bssplit=512/10:4k/40:64k/30:1m/15:4m/5", "--iodepth=8",
                           "--numjobs=2", "--size=128M", "--offset_increment=512M",
                           "--verify=md5", "--verify_fatal=1", "--do_verify=1",
                           "--runtime=60", timeout=150)
        self.assertGreaterEqual(total(result, "write"), 128 * MiB)
        self.assertGreaterEqual(total(result, "read"), 128 * MiB)

    def test_sequential_fua_and_flush(self):
        # fsync=N sends NBD flushes; the final verify reads everything back.
        _, result, _ = fio(self, self.uri("f"), "--rw=write", "--bs=1m", "--iodepth=4",
                           "--size=64M", "--fsync=8", "--verify=crc32c", "--verify_fatal=1",
                           "--do_verify=1", timeout=120)
        self.assertEqual(total(result, "write"), 64 * MiB)
        self.assertGreater(os.stat(self.img).st_blocks * 512, 60 * MiB)

    def test_written_data_survives_restart_and_corruption_is_caught(self):
        args = ["--rw=randwrite", "--bs=16k", "--iodepth=16", "--size=32M", "--offset=64M",
                "--verify=crc32c", "--verify_fatal=1"]
        fio(self, self.uri("f"), *args, "--do_verify=0", timeout=120)
        self.daemon.stop(timeout=20)
        # A new daemon over the same file: fio's verify-only pass must agree.
        self.daemon = self.serve({"f": self.img}, extra=["--log-level", "info"], name="second")
        _, result, _ = fio(self, self.uri("f"), *args, "--verify_only", timeout=120, name="verify")
        self.assertGreaterEqual(total(result, "read"), 32 * MiB)
        # The guard: corrupt one block behind the daemon's back and fio must notice.
        with open(self.img, "r+b") as f:
            f.seek(64 * MiB + 16 * 1024 * 100 + 100)
            f.write(b"\x00corrupt\xff" * 8)
        rc, _, err = fio(self, self.uri("f"), *args, "--verify_only", timeout=120,
                         check=False, name="corrupt")
        self.assertNotEqual(rc, 0, "fio did not notice a corrupted block; verification is not real")


if __name__ == "__main__":
    unittest.main()
