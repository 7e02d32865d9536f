"""The SIGKILL crash test shared by test_crash.py (quick) and
bench/crash_soak.py (hundreds of rounds).

A client writes 4 KiB-aligned random data with random FLUSH and FUA to a
cached export, logging what was acknowledged; blockwayd is killed with
SIGKILL at a random moment; it restarts on the same cache and catalogue;
then every acknowledged-and-flushed write must read back (or a later
acknowledged one), never-written blocks must read as the remote's bytes,
two reads must agree, and in writethrough and writeback the remote file
must hold every flushed write too.
"""

import os
import random
import signal
import struct
import subprocess
import threading

import harness

BLOCK = 4096


def block_data(wid, block):
    """The content write `wid` puts in `block`: named, so it can be identified."""
    head = struct.pack("<QQ", wid, block)
    fill = bytes([(wid * 7 + block) % 251 + 1]) * (BLOCK - len(head))
    return head + fill


def identify(data, block, original):
    """Write id of a block's bytes; 0 = the remote's original; -1 = anything else."""
    if data == original:
        return 0
    wid, b = struct.unpack("<QQ", data[:16])
    if b == block and data == block_data(wid, block):
        return wid
    return -1


class Model:
    def __init__(self, nblocks):
        self.durable = [0] * nblocks        # last write made durable (flush / FUA)
        self.pending = [[] for _ in range(nblocks)]
        self.rdurable = [0] * nblocks       # the remote's view (not reset by a crash)
        self.rpending = [[] for _ in range(nblocks)]
        self.certain = [True] * nblocks

    def wrote(self, wid, first, n, acked, fua):
        for b in range(first, first + n):
            self.pending[b].append(wid)
            self.rpending[b].append(wid)
            self.certain[b] = acked
            if acked and fua:
                self.durable[b] = self.rdurable[b] = wid
                self.pending[b] = []
                self.rpending[b] = []

    def flushed(self):
        for b in range(len(self.durable)):
            if not self.certain[b]:
                continue
            latest = self.pending[b][-1] if self.pending[b] else self.durable[b]
            self.durable[b] = self.rdurable[b] = latest
            self.pending[b] = []
            self.rpending[b] = []

    def allowed(self, b):
        return {self.durable[b], *self.pending[b]}

    def remote_allowed(self, b):
        return {self.rdurable[b], *self.rpending[b]}

    def recovered(self, b, wid):
        self.durable[b] = wid
        self.pending[b] = []
        self.certain[b] = True
        if wid != self.rdurable[b]:
            self.rpending[b].append(wid)


class CrashRun:
    """Rounds of write / SIGKILL / restart / verify for one write mode."""

    def __init__(self, workdir, mode, size=8 << 20, seed=None, log=print, remote_uri=None):
        self.workdir = workdir
        self.mode = mode
        self.size = size
        self.nblocks = size // BLOCK
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.log = log
        self.remote = os.path.join(workdir, "remote.img")
        harness.make_random_image(self.remote, size, seed=self.seed)
        with open(self.remote, "rb") as f:
            img = f.read()
        self.original = [img[i * BLOCK:(i + 1) * BLOCK] for i in range(self.nblocks)]
        self.model = Model(self.nblocks)
        self.next_id = 1
        self.daemon = None
        self.starts = 0

    def where(self, rnd):
        return "mode %s, seed %d, round %d (workdir %s)" % (self.mode, self.seed, rnd, self.workdir)

    def start(self):
        self.starts += 1
        self.port = harness.free_port()
        spec = "disk=file://%s,cache=%s,mode=%s,chunk=64k" % (
            self.remote, os.path.join(self.workdir, "cache"), self.mode)
        args = ["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port,
                "--data-dir", os.path.join(self.workdir, "data"), "--export", spec]
        self.daemon = harness.Daemon(self.workdir, args, name="bw-%d" % self.starts)
        self.daemon.start(ready_timeout=20)

    def uri(self):
        return "nbd://127.0.0.1:%d/disk" % self.port

    def kill(self):
        if self.daemon is not None:
            harness.kill_pid(self.daemon.proc)
            try:
                self.daemon.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.daemon.cleanup()

    def connect(self):
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri())
        return h

    def client(self, h, stop):
        """Random writes, FLUSH and FUA until the connection dies."""
        import nbd
        m = self.model
        while not stop.is_set():
            r = self.rng.random()
            if r < 0.15:
                try:
                    h.flush()
                except Exception:
                    return
                m.flushed()
                continue
            first = self.rng.randrange(self.nblocks)
            n = min(self.nblocks - first, self.rng.choice((1, 1, 2, 3, 8, 16, 40)))
            wid = self.next_id
            self.next_id += 1
            buf = b"".join(block_data(wid, b) for b in range(first, first + n))
            fua = self.rng.random() < 0.15
            try:
                h.pwrite(buf, first * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
            except Exception:
                m.wrote(wid, first, n, acked=False, fua=fua)
                return
            m.wrote(wid, first, n, acked=True, fua=fua)

    def read_all(self, h):
        out = []
        step = 1 << 20
        for off in range(0, self.size, step):
            out.append(h.pread(step, off))
        return b"".join(out)

    def first_disallowed(self, image, allowed, on_allowed=None):
        """The first block of image that holds a write allowed(block) does not
        allow, as (block, write), or None; on_allowed(block, write) is called
        for each block before it."""
        for b in range(self.nblocks):
            got = identify(image[b * BLOCK:(b + 1) * BLOCK], b, self.original[b])
            if got not in allowed(b):
                return b, got
            if on_allowed:
                on_allowed(b, got)
        return None

    def verify(self, rnd):
        """Returns a list of problems (empty when every invariant holds)."""
        problems = []
        m = self.model
        if self.mode in ("writethrough", "writeback"):
            with open(self.remote, "rb") as f:
                rimg = f.read()
            bad = self.first_disallowed(rimg, m.remote_allowed)
            if bad:
                b, got = bad
                problems.append("remote block %d holds write %d; flushed write %d, later %r"
                                % (b, got, m.rdurable[b], m.rpending[b][-5:]))
        h = self.connect()
        try:
            img = self.read_all(h)
            again = self.read_all(h)
        finally:
            harness.close_handle(h)
        if img != again:
            problems.append("two reads after the restart differ (flip-flop)")
        bad = self.first_disallowed(img, m.allowed, m.recovered)
        if bad:
            b, got = bad
            problems.append("block %d reads as write %d; flushed write %d, later %r"
                            % (b, got, m.durable[b], m.pending[b][-5:]))
        return [p + "; " + self.where(rnd) for p in problems]

    def round(self, rnd, max_delay=1.5):
        """One round: returns a list of problems."""
        h = self.connect()
        stop = threading.Event()
        delay = self.rng.uniform(0.05, max_delay)
        killer = threading.Timer(delay, lambda: harness.kill_pid(self.daemon.proc, signal.SIGKILL))
        killer.start()
        try:
            self.client(h, stop)
        finally:
            stop.set()
            killer.join()
            harness.close_handle(h)
        self.kill()
        self.start()
        return self.verify(rnd)

    def run(self, rounds, max_delay=1.5):
        self.start()
        try:
            for rnd in range(rounds):
                problems = self.round(rnd, max_delay)
                if problems:
                    return problems
            return []
        finally:
            self.kill()
