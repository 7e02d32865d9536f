"""Shared by the control-plane test modules: a daemon with a control socket,
and blockway run against it; CloneTestCase adds a clone of a random golden
image (test_snapshots.py, test_snapshot_exports.py)."""

import json
import os
import random
import socket
import struct
import subprocess

import harness
import remotes

EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_REFUSED, EXIT_PROTOCOL = 1, 2, 3, 4, 5, 6
EXIT_TIMED_OUT = 7

REP_ERR_UNKNOWN = 0x80000006


def go_from(port, export, source):
    """NBD_OPT_GO on `export` from source address `source` (127.0.0.2 and the
    like, for allow= rules): the reply type of its last reply (ACK, or an
    error)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    with s:
        harness.recv_exact(s, 18)
        s.sendall(struct.pack(">I", harness.FLAG_FIXED_NEWSTYLE | harness.FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", harness.IHAVEOPT, harness.OPT_GO, len(data)) + data)
        while True:
            _, _, rtype, rlen = struct.unpack(">QIII", harness.recv_exact(s, 20))
            harness.recv_exact(s, rlen)
            if rtype == harness.REP_ACK or rtype & 0x80000000:
                return rtype


NO_CONTROL = ("this daemon's cache offers no run-time control (ExportControl is not wired: "
              "the prefetch/detach work is not merged into this build)")


class ControlTestCase(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.data = self.path("data")
        self.csock = self.path("control.sock")

    # ---- helpers ----

    def bw(self, *args, expect=0, timeout=60, env_socket=False, input=None):
        """Runs blockway with --socket (or BLOCKWAY_SOCKET); asserts the exit code."""
        env = dict(os.environ)
        cmd = [harness.BLOCKWAY] + list(args)
        if env_socket:
            env["BLOCKWAY_SOCKET"] = self.csock
        elif "--socket" not in args:
            cmd += ["--socket", self.csock]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, env=env,
                           input=input)
        out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        if expect is not None:
            self.assertEqual(p.returncode, expect, "blockway %s: exit %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(args), p.returncode, out, err))
        return out, err

    def bwj(self, *args, expect=0):
        out, _ = self.bw(*(list(args) + ["--json"]), expect=expect)
        return json.loads(out)

    def start(self, exports, extra=(), name="blockwayd"):
        """exports: {name: 'URI[,options]'}."""
        args = ["--log-level", "debug", "--data-dir", self.data, "--control-socket", self.csock]
        self.port = harness.free_port()
        args += ["--listen", "127.0.0.1:%d" % self.port]
        for n, spec in exports.items():
            args += ["--export", "%s=%s" % (n, spec)]
        return self.start_daemon(args + list(extra), name)

    def nbdkit(self, img, name="nbdkit", filters=(), params=()):
        return remotes.started(self, remotes.Nbdkit(self.tmp, img, filters=filters, params=params, name=name))

    def raw(self, payload, read=True, timeout=10):
        """Sends raw bytes on the control socket; returns the response lines."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.csock)
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may hang up on a too-large line before reading all of it
            s.shutdown(socket.SHUT_WR)
            data = b""
            while read:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

    def has_cache_control(self, name):
        return self.bwj("stats", name)["cache"] is not None


class CloneTestCase(ControlTestCase):
    """A 16 MiB random golden image (file export "golden") and a clone "vm1"
    of it at 16 KiB granularity; the golden bytes are kept for models."""
    IMAGE = 16 * harness.MiB
    GOLDEN_SEED = 0  # each module sets its own, so the modules' images differ

    def setUp(self):
        super().setUp()
        self.golden = harness.make_random_image(self.path("golden.img"), self.IMAGE, seed=self.GOLDEN_SEED)
        with open(self.golden, "rb") as f:
            self.golden_bytes = f.read()
        self.overlays = self.path("overlays")

    def start_clone(self):
        return self.start({"golden": "file://" + self.golden,
                           "vm1": "clone:golden,granularity=16k,overlay=" + self.overlays})

    def write_random(self, model, count, seed, lo=0, hi=None):
        """count random writes of 512 B..64 KiB into vm1 within [lo, hi),
        applied to `model` too, then a flush."""
        hi = self.IMAGE if hi is None else hi
        rng = random.Random(seed)
        h = self.connect(self.uri("vm1"))
        for _ in range(count):
            n = rng.choice((512, 4096, 20000, 65536))
            off = rng.randrange(lo // 512, (hi - n) // 512) * 512
            data = rng.randbytes(n)
            h.pwrite(data, off)
            model[off:off + n] = data
        h.flush()
        harness.close_handle(h)
