#!/usr/bin/env python3
"""The metrics endpoint (--metrics, [metrics]) against a running daemon:
the exposition passes promtool, its values are the ones `blockway stats
--json` reports after known I/O, a real Prometheus server scrapes it and
answers a query, malformed HTTP gets errors while the daemon keeps serving,
and bad addresses stop the start."""

import json
import os
import re
import socket
import subprocess
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

import control_common
import harness
import remotes

MiB = harness.MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(name, frozenset(labels)): value} of an exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        labels = frozenset(LABEL.findall(m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def value(samples, name, **labels):
    key = (name, frozenset(labels.items()))
    assert key in samples, "no sample %s%s" % (name, labels)
    return samples[key]


def http_raw(port, payload, timeout=10):
    """Sends raw bytes; returns everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


class MetricsTest(control_common.ControlTestCase):
    def start_metrics(self, exports, extra=()):
        self.mport = harness.free_port()
        d = self.start(exports, ["--metrics", str(self.mport)] + list(extra))
        self.assertIn("metrics on http://127.0.0.1:%d/metrics" % self.mport, d.log())
        return d

    def scrape(self, path="/metrics"):
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.mport, path), timeout=10) as r:
            self.assertEqual(r.status, 200)
            self.assertEqual(r.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
            return r.read().decode()

    def known_io(self):
        """On export 'vm' (cached, over nbdkit): 5 reads of 4 KiB, 3 writes of
        8 KiB, 1 flush, 1 read beyond the end (rejected)."""
        h = self.connect("nbd://127.0.0.1:%d/vm" % self.port, strict=False)
        for i in range(5):
            h.pread(4096, i * MiB)  # apart: no sequential readahead
        for i in range(3):
            h.pwrite(b"\x5a" * 8192, 8 * MiB + i * 8192)
        h.flush()
        with self.assertRaises(Exception):
            h.pread(4096, 64 * MiB)
        return h

    def test_values_match_stats_and_pass_promtool(self):
        img = harness.make_random_image(self.path("remote.img"), 16 * MiB)
        self.k = self.nbdkit(img)
        plain = harness.make_sparse_image(self.path("plain.img"), 4 * MiB)
        self.start_metrics({"vm": "%s,cache=%s,chunk=64k" % (self.k.uri, self.path("cache")),
                            "plain": "file://" + plain})
        h = self.known_io()
        h.pread(4096, 0)  # a hit: chunk 0 is present now
        text = self.scrape()
        p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout.decode() + p.stderr.decode())
        s = parse(text)
        st = self.bwj("stats", "vm")
        io = st["io"]
        self.assertEqual((io["reads"], io["writes"], io["flushes"], io["errors"]), (6, 3, 1, 1))
        self.assertEqual(value(s, "blockway_export_requests_total", export="vm", op="read"), io["reads"])
        self.assertEqual(value(s, "blockway_export_requests_total", export="vm", op="write"), io["writes"])
        self.assertEqual(value(s, "blockway_export_requests_total", export="vm", op="flush"), io["flushes"])
        self.assertEqual(value(s, "blockway_export_bytes_total", export="vm", op="read"), io["bytes_read"])
        self.assertEqual(value(s, "blockway_export_bytes_total", export="vm", op="write"), io["bytes_written"])
        self.assertEqual(io["bytes_read"], 6 * 4096)
        self.assertEqual(io["bytes_written"], 3 * 8192)
        self.assertEqual(value(s, "blockway_export_errors_total", export="vm", op="read"), 1)
        self.assertEqual(value(s, "blockway_export_errors_total", export="vm", op="write"), 0)
        # The histogram counts every accepted request once, cumulatively.
        for op, n in (("read", 6), ("write", 3), ("flush", 1)):
            self.assertEqual(value(s, "blockway_export_request_duration_seconds_count", export="vm", op=op), n)
            self.assertEqual(value(s, "blockway_export_request_duration_seconds_bucket", export="vm", op=op,
                                   le="+Inf"), n)
            self.assertGreater(value(s, "blockway_export_request_duration_seconds_sum", export="vm", op=op), 0)
        c = st["cache"]
        self.assertEqual((c["hits"], c["misses"]), (1, 5))
        for metric, key in (("blockway_cache_hits_total", "hits"), ("blockway_cache_misses_total", "misses"),
                            ("blockway_cache_present_bytes", "present_bytes"),
                            ("blockway_cache_dirty_bytes", "dirty_bytes"),
                            ("blockway_cache_fetched_bytes_total", "bytes_fetched"),
                            ("blockway_cache_written_back_bytes_total", "bytes_written_back"),
                            ("blockway_cache_evictions_total", "evictions")):
            self.assertEqual(value(s, metric, export="vm"), c[key], metric)
        self.assertEqual(value(s, "blockway_cache_mode", export="vm", mode=c["mode"]), 1)
        self.assertEqual(value(s, "blockway_prefetch_done_bytes", export="vm"), st["prefetch"]["done_bytes"])
        self.assertEqual(value(s, "blockway_prefetch_state", export="vm", state=st["prefetch"]["state"]), 1)
        self.assertEqual(value(s, "blockway_remote_connected", export="vm"), 1)
        self.assertEqual(value(s, "blockway_remote_reconnects_total", export="vm"), st["remote"]["reconnects"])
        self.assertEqual(value(s, "blockway_export_clients", export="vm"), 1)
        self.assertEqual(value(s, "blockway_export_clients", export="plain"), 0)
        self.assertEqual(value(s, "blockway_clients"), 1)
        self.assertEqual(value(s, "blockway_exports"), 2)
        self.assertEqual(value(s, "blockway_export_size_bytes", export="vm"), 16 * MiB)
        self.assertEqual(value(s, "blockway_export_requests_total", export="plain", op="read"), 0)
        # The sample Grafana dashboard queries only names this daemon serves.
        with open(os.path.join(REPO, "packaging", "grafana-dashboard.json")) as f:
            dash = json.load(f)
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        used = set(re.findall(r"blockway_[a-z_]+", " ".join(exprs)))
        self.assertGreater(len(used), 10)
        served = {name for name, _ in s}
        for name in used:
            self.assertIn(name, served, "the dashboard uses %s" % name)
        # No cache on 'plain': no cache families for it.
        self.assertNotIn(("blockway_cache_hits_total", frozenset({("export", "plain")})), s)
        harness.close_handle(h)
        harness.wait_until(lambda: value(parse(self.scrape()), "blockway_clients") == 0, 10,
                           what="the client count to drop")

    def test_failed_exports_are_counted_until_they_open(self):
        img = harness.make_sparse_image(self.path("a.img"), MiB)
        later = self.path("later.img")
        self.start_metrics({"a": "file://" + img, "b": "file://" + later})
        text = self.scrape()
        p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout.decode() + p.stderr.decode())
        s = parse(text)
        self.assertEqual(value(s, "blockway_exports"), 1)
        self.assertEqual(value(s, "blockway_exports_failed"), 1)
        self.assertGreaterEqual(value(s, "blockway_export_open_attempts", export="b"), 1)
        harness.make_sparse_image(later, MiB)
        harness.wait_until(lambda: value(parse(self.scrape()), "blockway_exports") == 2, 30, interval=0.5,
                           what="'b' to open")
        s = parse(self.scrape())
        self.assertEqual(value(s, "blockway_exports_failed"), 0)
        self.assertNotIn(("blockway_export_open_attempts", frozenset({("export", "b")})), s)

    def test_qos_counters_match_stats(self):
        """An export limited to 20 read IOPS with a 0.1 s burst: 10 reads in
        a row must wait, and the QoS families say what `stats --json` says."""
        img = harness.make_random_image(self.path("q.img"), 4 * MiB)
        self.start_metrics({"q": "file://%s,qos-read-iops=20,qos-write-bps=1M,qos-burst=0.1" % img})
        h = self.connect("nbd://127.0.0.1:%d/q" % self.port, strict=False)
        for i in range(10):
            h.pread(4096, i * 4096)
        s = parse(self.scrape())
        q = self.bwj("stats", "q")["qos"]
        self.assertGreater(q["read"]["delayed"], 0)
        for cls in ("read", "write"):
            self.assertEqual(value(s, "blockway_qos_limit_iops", export="q", **{"class": cls}), q[cls]["iops"])
            self.assertEqual(value(s, "blockway_qos_limit_bytes_per_second", export="q", **{"class": cls}),
                             q[cls]["bps"])
            self.assertEqual(value(s, "blockway_qos_delayed_requests_total", export="q", **{"class": cls}),
                             q[cls]["delayed"])
            self.assertAlmostEqual(value(s, "blockway_qos_delay_seconds_total", export="q", **{"class": cls}),
                                   q[cls]["delay_seconds"], places=6)
            self.assertEqual(value(s, "blockway_qos_queued_requests", export="q", **{"class": cls}), 0)
        self.assertEqual((q["read"]["iops"], q["write"]["bps"]), (20, MiB))
        # 10 reads at 20/s from a 2-operation bucket take at least 0.35 s of waiting in all.
        self.assertGreater(q["read"]["delay_seconds"], 0.3)

    def test_a_real_prometheus_scrapes_and_answers_a_query(self):
        img = harness.make_sparse_image(self.path("a.img"), 8 * MiB)
        self.start_metrics({"a": "file://" + img})
        h = self.connect("nbd://127.0.0.1:%d/a" % self.port)
        for i in range(7):
            h.pwrite(b"x" * 4096, i * 4096)
        web = harness.free_port()
        cfg = self.path("prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: blockway\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % self.mport)
        log = open(self.path("prometheus.log"), "wb")
        self.addCleanup(log.close)
        prom = subprocess.Popen(["prometheus", "--config.file=" + cfg, "--storage.tsdb.path=" + self.path("tsdb"),
                                 "--web.listen-address=127.0.0.1:%d" % web], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.addCleanup(lambda: (harness.kill_pid(prom), prom.wait(10)))
        query = 'blockway_export_requests_total{export="a",op="write"}'
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (web, urllib.parse.urlencode({"query": query}))
        got = []

        def answered():
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.load(r)
            except (urllib.error.URLError, ConnectionError, OSError):
                return False
            got[:] = body["data"]["result"]
            return bool(got)
        harness.wait_until(answered, 60, interval=0.5, what="Prometheus to answer the query")
        self.assertEqual(body_value(got), 7.0)
        self.assertEqual(got[0]["metric"]["job"], "blockway")
        # Its own view of the target: up.
        with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/targets" % web, timeout=5) as r:
            targets = json.load(r)["data"]["activeTargets"]
        self.assertEqual(targets[0]["health"], "up", targets)

    def test_bad_requests_get_errors_and_the_daemon_keeps_serving(self):
        img = harness.make_sparse_image(self.path("a.img"), 1 * MiB)
        self.start_metrics({"a": "file://" + img})
        r = http_raw(self.mport, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(r.startswith(b"HTTP/1.1 404 "), r)
        r = http_raw(self.mport, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(r.startswith(b"HTTP/1.1 405 "), r)
        self.assertIn(b"Allow: GET, HEAD", r)
        r = http_raw(self.mport, b"this is not http\r\n\r\n")
        self.assertTrue(r.startswith(b"HTTP/1.1 400 "), r)
        r = http_raw(self.mport, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n")
        self.assertTrue(r.startswith(b"HTTP/1.1 431 "), r)
        r = http_raw(self.mport, b"PUT /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        self.assertTrue(r.startswith(b"HTTP/1.1 413 "), r)
        # HEAD: the length of the body, no body.
        r = http_raw(self.mport, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(r.startswith(b"HTTP/1.1 200 "), r)
        self.assertTrue(r.endswith(b"\r\n\r\n"), r)
        # Keep-alive: two requests on one connection, both answered.
        with socket.create_connection(("127.0.0.1", self.mport), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        self.assertEqual(data.count(b"HTTP/1.1 200 OK"), 2, data[:300])
        self.assertEqual(data.count(b"# TYPE blockway_exports gauge"), 2)
        # A client that connects and says nothing does not hold up others.
        idle = socket.create_connection(("127.0.0.1", self.mport), timeout=10)
        self.addCleanup(idle.close)
        self.assertIn("blockway_exports 1", self.scrape())
        self.assertIn("blockway_exports 1", self.scrape("/metrics?format=text"))

    def test_config_file_default_port_and_refusals(self):
        img = harness.make_sparse_image(self.path("a.img"), 1 * MiB)
        self.mport = harness.free_port()
        conf = self.path("b.toml")
        with open(conf, "w") as f:
            f.write('[metrics]\nlisten = "127.0.0.1:%d"\n\n[[export]]\nname = "a"\nuri = "file://%s"\n'
                    % (self.mport, img))
        d = self.start({}, ["--config", conf])
        self.assertIn("blockway_export_size_bytes{export=\"a\"} 1048576", self.scrape())
        # --metrics off wins over the file.
        d.stop()
        d = self.start({}, ["--config", conf, "--metrics", "off"])
        with self.assertRaises(urllib.error.URLError):
            self.scrape()
        d.stop()
        # A bare host: the default port 9110 (only checked in the log line if the port is free).
        if not remotes.port_open(9110):
            d = self.start({"a": "file://" + img}, ["--metrics", "127.0.0.1"])
            self.assertIn("metrics on http://127.0.0.1:9110/metrics", d.log())
            d.stop()
        for spec, needle in (("unix:/tmp/x.sock", "the metrics endpoint listens on TCP only"),
                             ("0", "port 0 is not a port"), ("127.0.0.1:http", "is not a valid number"),
                             ("", "metrics address is empty")):
            p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(), "--export",
                             "a=file://" + img, "--metrics", spec, "--control-socket", "off"], check=False)
            out = p.stderr.decode() + p.stdout.decode()
            self.assertEqual(p.returncode, 2, out)
            self.assertIn(needle, out)
        # A port in use: the start fails naming it.
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(), "--export",
                             "a=file://" + img, "--metrics", str(port), "--control-socket", "off"], check=False)
            out = p.stderr.decode() + p.stdout.decode()
            self.assertEqual(p.returncode, 2, out)
            self.assertIn("metrics 127.0.0.1:%d" % port, out)
        with open(conf, "w") as f:
            f.write('[metrics]\nport = 9\n')
        p = harness.run([harness.BLOCKWAYD, "--config", conf], check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown setting 'metrics.port'", p.stderr.decode() + p.stdout.decode())


def body_value(result):
    return float(result[0]["value"][1])


if __name__ == "__main__":
    unittest.main()
