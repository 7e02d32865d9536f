#!/usr/bin/env python3
"""blockway trace against a running daemon: a trace of known libnbd I/O
whose summary's counts, cache hits/misses and offsets are checked exactly;
a trace of a real fio run, turned into PNGs by bench/trace_plot.py; a trace
of an export that is removed while it runs; bad input."""

import json
import os
import subprocess
import sys
import threading
import time
import unittest

import control_common
import harness

MiB = harness.MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TraceTest(control_common.ControlTestCase):
    def trace_in_background(self, name, seconds, path, *extra):
        """Runs `blockway trace` in a thread; returns (thread, result dict)."""
        result = {}

        def run():
            result["out"], result["err"] = self.bw("trace", name, "--seconds", str(seconds), path, *extra,
                                                   expect=None, timeout=seconds + 60)
        t = threading.Thread(target=run)
        t.start()
        self.addCleanup(t.join, 120)
        # The trace is attached once trace-start returned: its file has its header.
        harness.wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, 10,
                           what="the trace to start")
        return t, result

    def summary(self, path, *extra):
        out, _ = self.bw("trace", "--summary", path, "--json", *extra)
        return json.loads(out)

    def test_known_io_counts_cache_outcomes_and_offsets(self):
        img = harness.make_random_image(self.path("remote.img"), 16 * MiB)
        self.k = self.nbdkit(img)
        self.start({"vm": "%s,cache=%s,chunk=64k" % (self.k.uri, self.path("cache"))})
        h = self.connect("nbd://127.0.0.1:%d/vm" % self.port, strict=False)
        path = self.path("t.csv")
        t, res = self.trace_in_background("vm", 3, path)
        for i in range(5):
            h.pread(4096, 2 * MiB + i * MiB)      # 5 misses, 1 MiB apart (no readahead)
        h.pread(4096, 2 * MiB)                    # a hit
        for i in range(4):
            h.pwrite(b"w" * 8192, 12 * MiB + i * 8192)
        h.flush()
        with self.assertRaises(Exception):
            h.pread(4096, 16 * MiB)               # beyond the end: EINVAL
        t.join(60)
        self.assertIn("traced 'vm'", res["out"], res)
        self.assertIn(", 0 dropped", res["out"])
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertTrue(lines[0].startswith("# blockway trace v1 export=vm size=16777216 started="), lines[0])
        self.assertEqual(lines[1], "start_ns,op,offset,length,latency_ns,cache,error")
        self.assertTrue(lines[-1].startswith("# end: 12 records, 0 dropped"), lines[-1])
        rows = [line.split(",") for line in lines[2:-1]]
        self.assertEqual([r[1] for r in rows], ["read"] * 6 + ["write"] * 4 + ["flush", "read"])
        self.assertEqual([int(r[2]) for r in rows[:6]], [2 * MiB + i * MiB for i in range(5)] + [2 * MiB])
        self.assertEqual([r[5] for r in rows[:6]], ["miss"] * 5 + ["hit"])
        self.assertEqual(rows[-1][2:4], [str(16 * MiB), "4096"])
        self.assertEqual(rows[-1][6], "22")  # EINVAL
        starts = [int(r[0]) for r in rows]
        self.assertEqual(starts, sorted(starts))
        self.assertTrue(all(int(r[4]) > 0 for r in rows[:11]))
        s = self.summary(path)
        self.assertEqual(s["records"], 12)
        r, w, f = s["ops"]["read"], s["ops"]["write"], s["ops"]["flush"]
        self.assertEqual((r["count"], r["bytes"], r["errors"], r["cache_hits"], r["cache_misses"]),
                         (7, 7 * 4096, 1, 1, 5))
        self.assertEqual((w["count"], w["bytes"], w["errors"]), (4, 4 * 8192, 0))
        self.assertEqual(f["count"], 1)
        lat = r["latency_ns"]
        self.assertTrue(lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"], lat)
        self.assertEqual(lat["max"], max(int(x[4]) for x in rows if x[1] == "read"))
        # Hottest 1 MiB regions: 12 MiB (4 writes), then 2 MiB (2 reads), then
        # 3..6 MiB and 16 MiB (1 each) by offset.
        hot = [(g["offset"], g["requests"]) for g in s["hottest_regions"]]
        self.assertEqual(hot, [(12 * MiB, 4), (2 * MiB, 2), (3 * MiB, 1), (4 * MiB, 1), (5 * MiB, 1),
                               (6 * MiB, 1), (16 * MiB, 1)])
        s = self.summary(path, "--region", "4M", "--top", "2")
        self.assertEqual([(g["offset"], g["requests"]) for g in s["hottest_regions"]], [(12 * MiB, 4), (0, 3)])
        text, _ = self.bw("trace", "--summary", path)
        self.assertIn("p99.9 ms", text)
        self.assertIn("hottest regions (1.0 MiB each)", text)

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_run_summary_and_plots(self):
        img = harness.make_sparse_image(self.path("a.img"), 64 * MiB)
        self.start({"a": "file://" + img})
        path = self.path("fio.csv")
        t, res = self.trace_in_background("a", 4, path)
        p = subprocess.run(["fio", "--name=t", "--ioengine=nbd", "--uri=nbd://127.0.0.1:%d/a" % self.port,
                            "--rw=randrw", "--bs=4k", "--iodepth=8", "--size=64m", "--number_ios=1000",
                            "--randseed=7", "--output-format=json", "--output=" + self.path("fio.json")],
                           capture_output=True, timeout=120, cwd=self.tmp)
        self.assertEqual(p.returncode, 0, p.stderr.decode())
        with open(self.path("fio.json")) as f:
            job = json.load(f)["jobs"][0]
        t.join(60)
        self.assertIn("0 dropped", res["out"], res)
        s = self.summary(path)
        self.assertEqual(s["ops"]["read"]["count"], job["read"]["total_ios"])
        self.assertEqual(s["ops"]["write"]["count"], job["write"]["total_ios"])
        self.assertEqual(s["ops"]["read"]["count"] + s["ops"]["write"]["count"], 1000)
        self.assertEqual(s["ops"]["read"]["bytes"], job["read"]["io_bytes"])
        plot = subprocess.run([sys.executable, os.path.join(REPO, "bench", "trace_plot.py"), path,
                               self.path("fio")], capture_output=True, timeout=120)
        if plot.returncode != 0 and b"No module named 'matplotlib'" in plot.stderr:
            self.skipTest("python3-matplotlib missing")
        self.assertEqual(plot.returncode, 0, plot.stderr.decode())
        for suffix in ("-heatmap.png", "-latency.png"):
            with open(self.path("fio") + suffix, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            self.assertGreater(os.path.getsize(self.path("fio") + suffix), 5000)

    def test_an_export_that_goes_away_ends_the_trace(self):
        img = harness.make_sparse_image(self.path("a.img"), 8 * MiB)
        self.start({"keep": "file://" + img})
        self.bw("export", "add", "gone", "file://" + harness.make_sparse_image(self.path("b.img"), 8 * MiB))
        h = self.connect("nbd://127.0.0.1:%d/gone" % self.port)
        path = self.path("gone.csv")
        t, res = self.trace_in_background("gone", 30, path)
        for i in range(3):
            h.pread(4096, i * 4096)
        harness.close_handle(h)
        started = time.monotonic()
        self.bw("export", "remove", "gone")
        t.join(60)
        self.assertLess(time.monotonic() - started, 10)  # not the 30 s asked for
        self.assertIn("export 'gone' was removed", res["err"], res)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual([x.split(",")[1] for x in lines[2:-1]], ["read"] * 3)
        self.assertIn("export 'gone' was removed", lines[-1])
        # The daemon goes on: the other export traces fine, and completion offers it.
        completion = os.path.join(REPO, "packaging", "blockway.bash-completion")
        script = 'source %s; COMP_WORDS=(blockway trace ""); COMP_CWORD=2; _blockway; echo "${COMPREPLY[@]}"' % completion
        env = dict(os.environ, PATH=os.path.dirname(os.path.abspath(harness.BLOCKWAY)) + ":" + os.environ["PATH"],
                   BLOCKWAY_SOCKET=self.csock)
        p = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE, env=env, timeout=30)
        self.assertEqual(p.stdout.decode().split(), ["keep"])
        self.bw("trace", "keep", "--seconds", "0.3", self.path("keep.csv"))

    def test_bad_input(self):
        img = harness.make_sparse_image(self.path("a.img"), 1 * MiB)
        self.start({"a": "file://" + img})
        _, err = self.bw("trace", "nope", "--seconds", "1", self.path("x.csv"), expect=control_common.EXIT_UNKNOWN)
        self.assertIn("no export named 'nope'", err)
        _, err = self.bw("trace", "a", self.path("x.csv"), expect=control_common.EXIT_USAGE)
        self.assertIn("--seconds N is required", err)
        _, err = self.bw("trace", "a", "--seconds", "soon", self.path("x.csv"), expect=control_common.EXIT_USAGE)
        self.assertIn("--seconds", err)
        _, err = self.bw("trace", "a", "--seconds", "1", "--capacity", "0", self.path("x.csv"),
                         expect=control_common.EXIT_USAGE)
        self.assertIn("--capacity", err)
        _, err = self.bw("trace", "a", "--seconds", "1", "/nonexistent/dir/x.csv", expect=control_common.EXIT_FAILED)
        self.assertIn("cannot create /nonexistent/dir/x.csv", err)
        bad = self.path("bad.csv")
        with open(bad, "w") as f:
            f.write("hello\n")
        _, err = self.bw("trace", "--summary", bad, expect=control_common.EXIT_FAILED)
        self.assertIn("not a blockway trace", err)
        with open(bad, "w") as f:
            f.write("# blockway trace v1 export=a size=1\nstart_ns,op,offset,length,latency_ns,cache,error\n"
                    "1,read,0,4096,5,hit,0\n2,teleport,0,1,1,-,0\n")
        _, err = self.bw("trace", "--summary", bad, expect=control_common.EXIT_FAILED)
        self.assertIn("line 4: unknown operation 'teleport'", err)
        _, err = self.bw("trace", "--summary", bad, "--region", "0", expect=control_common.EXIT_USAGE)
        self.assertIn("--region", err)
        # A small capacity with nobody reading fast enough: records dropped and counted, not lost silently.
        path = self.path("small.csv")
        t, res = self.trace_in_background("a", 1, path, "--capacity", "4")
        h = self.connect("nbd://127.0.0.1:%d/a" % self.port)
        for i in range(64):
            h.pread(512, 0)
        t.join(60)
        with open(path) as f:
            last = f.read().splitlines()[-1]
        written, dropped = int(last.split()[2]), int(last.split()[4])
        self.assertEqual(written + dropped, 64, last)
        self.assertGreater(dropped, 0, last)


if __name__ == "__main__":
    unittest.main()
