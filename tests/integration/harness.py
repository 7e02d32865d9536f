"""Shared helpers for blockway's integration tests.

The tests drive the real daemon (env BLOCKWAYD) with real clients: Debian's
python3-libnbd bindings, nbdinfo, nbdcopy, qemu-img, qemu-io and fio. Every
process a test starts is tracked by pid and stopped by pid in cleanup; every
wait has a deadline.
"""

import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest

BLOCKWAYD = os.environ.get("BLOCKWAYD", "/work/main/build/blockwayd")
BLOCKWAY = os.environ.get("BLOCKWAY", "/work/main/build/blockway")

MiB = 1 << 20

# NBD wire constants (NBD protocol document, doc/proto.md).
NBD_MAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2


def have(tool):
    return shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin") is not None


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    """A TCP port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def make_random_image(path, size, seed=1, chunk=4 * MiB):
    """Writes `size` bytes of seeded pseudo-random data to `path`."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n
    return path


def make_sparse_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def read_file(path, offset, length):
    """Reads bytes straight from the backing file (bypassing the daemon)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read_direct(path, offset, length):
    """Reads bytes of the backing file with O_DIRECT (offset and length in
    whole 4 KiB blocks): what the file holds, not what a cache of ours kept."""
    import mmap
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def run(cmd, timeout=60, check=True, env=None, input=None, cwd=None):
    """Runs a command with a timeout; on failure raises with its output."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, env=env, input=input, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            "command failed (exit %d): %s\nstdout:\n%s\nstderr:\n%s" % (
                proc.returncode, " ".join(map(str, cmd)),
                proc.stdout.decode(errors="replace")[-4000:],
                proc.stderr.decode(errors="replace")[-4000:]))
    return proc


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def rss_kib(pid):
    """VmRSS of a process in KiB, from /proc/PID/status."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def freeze(pid, timeout=10.0):
    """SIGSTOPs pid and returns once every one of its threads has stopped.

    kill() returns before a multi-threaded process is stopped: one thread is
    woken to start the group stop, and on a busy machine the others may still
    answer a request meanwhile (a server "hung" this way answered a read
    77 us later in 1 of 4 runs under load)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                    states.append(f.read().rsplit(") ", 1)[1][0])
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
        if states and all(s in "tT" for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError("pid %d did not stop within %.0fs (thread states %s)" % (pid, timeout, states))
        time.sleep(0.005)


@contextlib.contextmanager
def frozen(pid):
    """Holds pid stopped (see freeze) for the with-block, then SIGCONTs it."""
    freeze(pid)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def kill_pid(proc, sig=signal.SIGKILL):
    """Signals a process we started, by its pid, if it is still running."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


class Daemon:
    """One blockwayd process started by a test."""

    def __init__(self, workdir, args, name="blockwayd", prefix=()):
        """prefix: a command that execs blockwayd (nsenter into a peer's
        network namespace), so the pid stays blockwayd's."""
        self.workdir = workdir
        self.pid_file = os.path.join(workdir, name + ".pid")
        self.log_path = os.path.join(workdir, name + ".log")
        self.args = list(prefix) + [BLOCKWAYD] + list(args) + ["--pid-file", self.pid_file]
        # The test's own catalogue unless it names one (or a configuration,
        # or $STATE_DIRECTORY at start): without it every test's caches met
        # in the host's /var/lib/blockway (two tests at once, -j2, both
        # naming an export 'r', shared one record).
        self.own_data_dir = "--data-dir" not in args and "--config" not in args
        self.proc = None
        self._log = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self, ready_timeout=10.0):
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)
        self._log = open(self.log_path, "wb")
        args = self.args
        if self.own_data_dir and "STATE_DIRECTORY" not in os.environ:
            args = args + ["--data-dir", os.path.join(self.workdir, "data")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("blockwayd exited with %d before it was ready:\n%s"
                                     % (self.proc.returncode, self.log()))
            try:
                with open(self.pid_file) as f:
                    content = f.read().strip()
                if content:
                    if int(content) != self.proc.pid:
                        raise AssertionError("pid file says %s, process is %d"
                                             % (content, self.proc.pid))
                    return self
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        kill_pid(self.proc)
        self.proc.wait(5)
        raise AssertionError("blockwayd not ready within %.0fs:\n%s" % (ready_timeout, self.log()))

    def log(self, tail=8000):
        """The daemon's output: its last `tail` characters (for failure
        messages), or all of it with tail=None."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return text if tail is None else text[-tail:]

    def full_log(self):
        """All of the daemon's output: what an assertNotIn must search (a
        tail would let an early line go unseen)."""
        return self.log(tail=None)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        assert self.running(), "daemon is not running:\n" + self.log()
        os.kill(self.proc.pid, sig)

    def wait(self, timeout):
        """Waits for exit; returns the exit code or raises after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("blockwayd (pid %d) did not exit within %.0fs:\n%s"
                                 % (self.proc.pid, timeout, self.log()))

    def stop(self, sig=signal.SIGTERM, timeout=40.0, expect_rc=0):
        """Graceful stop; asserts the exit code and that the pid file is handled."""
        self.send_signal(sig)
        rc = self.wait(timeout)
        if expect_rc is not None and rc != expect_rc:
            raise AssertionError("blockwayd exited with %d, expected %d:\n%s"
                                 % (rc, expect_rc, self.log()))
        if rc == 0 and os.path.exists(self.pid_file):
            raise AssertionError("blockwayd exited 0 but left its pid file behind")
        return rc

    def cleanup(self):
        if self.proc is not None:
            kill_pid(self.proc)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self._log:
            self._log.close()
            self._log = None


class DaemonTestCase(unittest.TestCase):
    """Gives each test a temp dir and stops every daemon it started."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="bw-it-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def start_daemon(self, args, name="blockwayd", ready_timeout=10.0, prefix=()):
        d = Daemon(self.tmp, args, name, prefix)
        self.addCleanup(d.cleanup)
        d.start(ready_timeout)
        return d

    def serve_remote(self, uri, options="", name="blockwayd", ready_timeout=20.0, unix=False, prefix=()):
        """blockwayd exporting `uri` (plus `options`) as export 'r', on a free
        loopback port or (unix) a Unix socket: sets self.port or self.sock."""
        self.port = self.sock = None
        if unix:
            self.sock = self.path(name + ".sock")
            listen = "unix:" + self.sock
        else:
            self.port = free_port()
            listen = "127.0.0.1:%d" % self.port
        spec = "r=" + uri + ("," + options if options else "")
        return self.start_daemon(["--log-level", "debug", "--listen", listen, "--export", spec],
                                 name=name, ready_timeout=ready_timeout, prefix=prefix)

    def start_refused(self, spec, *needles, timeout=60, prefix=()):
        """Runs blockwayd with `--export spec`; asserts that it exits 2 and
        that its output names every needle. Returns the output."""
        p = run(list(prefix) + [BLOCKWAYD, "--listen", "127.0.0.1:%d" % free_port(), "--export", spec],
                timeout=timeout, check=False)
        out = p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")
        self.assertEqual(p.returncode, 2, "blockwayd --export %s:\n%s" % (spec, out))
        for n in needles:
            self.assertIn(n, out)
        return out

    def serve(self, exports, extra=(), unix=False, tcp=True, name="blockwayd"):
        """Starts a daemon on a free loopback port; exports is {name: spec}.

        spec is 'PATH' or 'PATH,opt=val,...'. Sets self.port / self.sock.
        """
        args = ["--log-level", "debug"]
        self.port = None
        self.sock = None
        if tcp:
            self.port = free_port()
            args += ["--listen", "127.0.0.1:%d" % self.port]
        if unix:
            self.sock = self.path(name + ".sock")
            args += ["--listen", "unix:" + self.sock]
        for ename, spec in exports.items():
            p, _, opts = spec.partition(",")
            args += ["--export", "%s=file://%s%s" % (ename, p, "," + opts if opts else "")]
        args += list(extra)
        return self.start_daemon(args, name)

    def uri(self, export):
        return "nbd://127.0.0.1:%d/%s" % (self.port, export)

    def unix_uri(self, export):
        return "nbd+unix:///%s?socket=%s" % (export, self.sock)

    def connect(self, uri, strict=True, structured=True):
        import nbd
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        if not structured:
            h.set_request_structured_replies(False)
        h.connect_uri(uri)
        self.addCleanup(close_handle, h)
        return h


    def assert_grown_file_reaches_new_clients(self, img, uri, early, log_path):
        """The 8 MiB image file `img`, served uncached at `uri` (handle `early`
        connected before), grows to 24 MiB: a client that connects after sees
        the new size, reads zeroes in the new space and writes there; `early`
        keeps its size and keeps working; the server's log (`log_path`) says
        so. Returns the handle connected after."""
        first = read_file(img, 0, 8 * MiB)
        self.assertEqual(early.get_size(), 8 * MiB)
        os.truncate(img, 24 * MiB)
        size = run(["nbdinfo", "--size", uri], timeout=30).stdout.decode().strip()
        self.assertEqual(size, str(24 * MiB))
        late = self.connect(uri)
        self.assertEqual(late.get_size(), 24 * MiB)
        self.assertEqual(early.get_size(), 8 * MiB, "NBD cannot tell a connected client: it keeps its size")
        self.assertEqual(late.pread(MiB, 12 * MiB), bytes(MiB), "the new space reads as zeroes")
        tail = os.urandom(MiB)
        late.pwrite(tail, 23 * MiB)
        late.flush()
        self.assertEqual(read_file(img, 23 * MiB, MiB), tail)
        self.assertEqual(early.pread(MiB, 7 * MiB), first[7 * MiB:])
        self.assertEqual(late.pread(8 * MiB, 0), first)
        with open(log_path, errors="replace") as f:
            self.assertIn("the image grew from %d to %d bytes" % (8 * MiB, 24 * MiB), f.read())
        return late

    def assert_requests_fail_with_eio_in_time(self, h, retry_timeout, slack=5.0, flush=True, early_writes=False):
        """With the remote gone: a read, a write and (unless flush is False: a
        backend that has nothing to flush need not ask the remote) a flush on
        handle h each fail with EIO, no sooner than retry_timeout (less half a
        second) and no later than retry_timeout + slack seconds. early_writes:
        the remote's client acknowledges a write before the remote answers
        (librbd's write-around cache): the write succeeds at once and the
        flush sent right after it must fail with EIO, no later than
        retry_timeout + slack (it waits for the write, which may fail
        sooner); then the read."""
        import nbd
        ops = [lambda: h.pread(4096, 0), lambda: h.pwrite(b"x" * 4096, 0), h.flush][:3 if flush else 2]
        if early_writes:
            start = time.monotonic()
            h.pwrite(b"x" * 4096, 0)
            self.assertLess(time.monotonic() - start, retry_timeout, "the write waited for the remote")
            ops = [h.flush, ops[0]]
        for op in ops:
            start = time.monotonic()
            with self.assertRaises(nbd.Error) as cm:
                op()
            took = time.monotonic() - start
            self.assertEqual(cm.exception.errnum, errno.EIO)
            if not (early_writes and op is h.flush):
                self.assertGreater(took, retry_timeout - 0.5)
            self.assertLess(took, retry_timeout + slack,
                            "a request waited %.1fs with retry-timeout=%g" % (took, retry_timeout))


def close_handle(h):
    try:
        if h.aio_is_ready() or h.aio_is_processing():
            h.shutdown()
    except Exception:
        pass
    try:
        h.close()
    except Exception:
        pass


# ---- a hand-written NBD client for what libnbd will not send -----------------

def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def raw_connect(port, export, timeout=10.0, host="127.0.0.1"):
    """Fixed-newstyle handshake with NBD_OPT_GO, no structured replies.

    Returns (socket, size, transmission_flags).
    """
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
        assert magic == NBD_MAGIC and opt == IHAVEOPT, "bad greeting"
        s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = tflags = None
        while True:
            rmagic, ropt, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
            assert rmagic == OPT_REPLY_MAGIC and ropt == OPT_GO, "bad option reply"
            payload = recv_exact(s, rlen)
            if rtype == REP_ACK:
                break
            if rtype & 0x80000000:
                raise AssertionError("NBD_OPT_GO failed: %#x %r" % (rtype, payload))
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                size, tflags = struct.unpack(">QH", payload[2:12])
        return s, size, tflags
    except BaseException:
        s.close()
        raise


def request(cmd, offset, length, cookie=1, flags=0):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def read_simple_reply(sock):
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC, "bad reply magic %#x" % magic
    return error, cookie


def nbd_map(uri, context=None):
    """[(offset, length, type)] as `nbdinfo --map[=context]` prints them:
    base:allocation by default (type 1 hole, 2 zero), or e.g.
    blockway:cache (1 present, 2 dirty)."""
    p = run(["nbdinfo", "--map=" + context if context else "--map", uri], timeout=30)
    out = []
    for line in p.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def type_at(extents, offset):
    """The type of the extent that holds offset."""
    for off, length, t in extents:
        if off <= offset < off + length:
            return t
    raise AssertionError("offset %d not in the map %r" % (offset, extents))


class FlushingWriter(threading.Thread):
    """A thread that writes `count` blocks of distinct contents through the
    NBD handle h, block i at base + (i % span) * block, and flushes after
    every 8th and at the end. `durable` collects the (offset, data) a
    successful flush covered, in order; `errors` the (kind, i, errno) of the
    writes and flushes that failed. stop() ends it early."""

    def __init__(self, h, count, block, base=0, span=None, pause=0.002):
        super().__init__()
        self.h, self.count, self.block, self.base = h, count, block, base
        self.span = span or count
        self.pause = pause
        self.durable, self.errors = [], []
        self._stop_event = threading.Event()

    def stop(self):
        self._stop_event.set()

    def _flush(self, i, pending):
        import nbd
        try:
            self.h.flush()
            self.durable.extend(pending)
        except nbd.Error as e:
            self.errors.append(("flush", i, e.errnum))

    def run(self):
        import nbd
        pending = []
        for i in range(self.count):
            if self._stop_event.is_set():
                break
            off = self.base + (i % self.span) * self.block
            data = struct.pack(">Q", i + 1) * (self.block // 8)
            try:
                self.h.pwrite(data, off)
                pending.append((off, data))
            except nbd.Error as e:
                self.errors.append(("write", i, e.errnum))
            if i % 8 == 7:
                self._flush(i, pending)
                pending = []
            time.sleep(self.pause)
        self._flush(-1, pending)


def wait_until(pred, timeout, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))
