"""The NFS backend (nfs://) against nfs-ganesha (VFS FSAL), NFSv3 and NFSv4.

One ganesha for the whole module: rpcbind and port 2049 are global, so this
file is the only NFS integration test and ctest runs it under the
"nfs-ganesha" resource lock. rpcbind is started only if none answers, and
then stopped again (by pid); ganesha runs from its own config in a temp dir
and is stopped by pid.
"""

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402
from test_fio import fio  # noqa: E402

try:
    import nbd  # Debian's python3-libnbd
except ImportError:  # pragma: no cover
    nbd = None

PSEUDO = "/bwexport"
RO_PSEUDO = "/bwro"


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Ganesha(harness.PeerProcess):
    """nfs-ganesha with two VFS exports (read-write and read-only)."""

    def __init__(self, workdir, lease=None):
        self.workdir = workdir
        self.export_dir = os.path.join(workdir, "export")
        self.ro_dir = os.path.join(workdir, "roexport")
        os.makedirs(self.export_dir, exist_ok=True)
        os.makedirs(self.ro_dir, exist_ok=True)
        self.conf = os.path.join(workdir, "ganesha.conf")
        self.log_path = os.path.join(workdir, "ganesha.log")
        self.pid_file = os.path.join(workdir, "ganesha.pid")
        with open(self.conf, "w") as f:
            f.write("""
NFS_CORE_PARAM { Protocols = 3, 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; }
NFSv4 { Graceless = true; %s}
EXPORT { Export_Id = 1; Path = %s; Pseudo = %s; Access_Type = RW;
         Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; FSAL { Name = VFS; } }
EXPORT { Export_Id = 2; Path = %s; Pseudo = %s; Access_Type = RO;
         Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; FSAL { Name = VFS; } }
""" % ("Lease_Lifetime = %d; " % lease if lease else "", self.export_dir, PSEUDO, self.ro_dir, RO_PSEUDO))
        self.proc = None

    def start(self, timeout=60.0):
        if port_open(2049):
            raise AssertionError("port 2049 is taken: another NFS server runs here")
        self.proc = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", self.conf, "-L", self.log_path, "-p", self.pid_file],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        probes = ["nfs://127.0.0.1" + self.export_dir, "nfs://127.0.0.1%s?version=4" % PSEUDO]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("ganesha exited with %d:\n%s" % (self.proc.returncode, self.log()))
            ok = True
            for uri in probes:
                p = subprocess.run(["nfs-ls", uri], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   timeout=10)
                ok = ok and p.returncode == 0
            if ok:
                return self
            time.sleep(0.3)
        self.kill()
        raise AssertionError("ganesha did not answer within %.0fs:\n%s" % (timeout, self.log()))


    def kill(self, sig=signal.SIGKILL):
        super().kill(sig)
        self.proc = None

    def stop(self):
        self.kill(signal.SIGTERM)

    def v3_uri(self, name, ro=False):
        return "nfs://127.0.0.1%s/%s" % (self.ro_dir if ro else self.export_dir, name)

    def v4_uri(self, name, ro=False):
        return "nfs://127.0.0.1%s/%s?version=4" % (RO_PSEUDO if ro else PSEUDO, name)

    def uri(self, version, name, ro=False):
        return self.v4_uri(name, ro) if version == 4 else self.v3_uri(name, ro)

    def file(self, name):
        return os.path.join(self.export_dir, name)


SERVER = None
RPCBIND = None
WORKDIR = None


def setUpModule():
    global SERVER, RPCBIND, WORKDIR
    for tool in ("ganesha.nfsd", "rpcbind", "nfs-ls"):
        if not harness.have(tool):
            raise unittest.SkipTest(tool + " missing")
    WORKDIR = tempfile.mkdtemp(prefix="bw-nfs-", dir="/tmp")
    if not port_open(111):
        RPCBIND = subprocess.Popen(["rpcbind", "-w", "-f"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not port_open(111):
            if time.monotonic() > deadline or RPCBIND.poll() is not None:
                raise AssertionError("rpcbind did not start")
            time.sleep(0.05)
    SERVER = Ganesha(WORKDIR).start()


def tearDownModule():
    if SERVER is not None:
        SERVER.stop()
    if RPCBIND is not None and RPCBIND.poll() is None:
        os.kill(RPCBIND.pid, signal.SIGTERM)
        try:
            RPCBIND.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(RPCBIND.pid, signal.SIGKILL)
    if WORKDIR:
        shutil.rmtree(WORKDIR, ignore_errors=True)


def random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


class NfsTestCase(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        if SERVER.proc is None or SERVER.proc.poll() is not None:
            SERVER.start()  # a previous test may have left it dead

    def image(self, name, size, random=True):
        path = SERVER.file(name)
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        if random:
            return random_file(path, size)
        return harness.make_sparse_image(path, size)

    def serve(self, uri, options="", name="blockwayd"):
        self.port = harness.free_port()
        spec = "r=" + uri + ("," + options if options else "")
        return self.start_daemon(["--log-level", "debug", "--listen", "127.0.0.1:%d" % self.port,
                                  "--export", spec], name=name, ready_timeout=60)

    def connect(self):
        h = nbd.NBD()
        h.connect_uri(self.uri("r"))
        return h

    def refused(self, spec, *needles):
        p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                         "--export", spec], timeout=60, check=False)
        out = p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")
        self.assertEqual(p.returncode, 2, out)
        for n in needles:
            self.assertIn(n, out)
        return out


@unittest.skipUnless(nbd is not None and harness.have("nbdcopy"), "libnbd tools missing")
class DataPathTest(NfsTestCase):
    SIZE = 256 * MiB

    def copy_in_and_out(self, version):
        img = self.image("v%d.img" % version, self.SIZE)
        daemon = self.serve(SERVER.uri(version, "v%d.img" % version))
        out = self.path("out.img")
        harness.run(["nbdcopy", self.uri("r"), out], timeout=300)
        harness.run(["cmp", img, out], timeout=120)
        os.unlink(out)
        src = random_file(self.path("src.img"), self.SIZE)
        p = harness.run(["nbdcopy", src, self.uri("r")], timeout=300, check=False)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace") + daemon.log())
        harness.run(["cmp", src, img], timeout=120)  # the server's file
        daemon.stop(timeout=60)

    def test_nbdcopy_256m_in_and_out_v3(self):
        self.copy_in_and_out(3)

    def test_nbdcopy_256m_in_and_out_v4(self):
        self.copy_in_and_out(4)

    def fio_verify(self, version):
        self.image("fio%d.img" % version, 64 * MiB, random=False)
        daemon = self.serve(SERVER.uri(version, "fio%d.img" % version))
        fio(self, self.uri("r"), "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=64M",
            "--io_size=48M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=0", timeout=300)
        daemon.stop(timeout=60)

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_randrw_qd16_v3(self):
        self.fio_verify(3)

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_randrw_qd16_v4(self):
        self.fio_verify(4)

    def test_flags_and_geometry(self):
        self.image("g.img", 8 * MiB)
        self.serve(SERVER.v4_uri("g.img") + ",connections=3")
        h = self.connect()
        self.assertEqual(h.get_size(), 8 * MiB)
        self.assertFalse(h.is_read_only())
        self.assertTrue(h.can_flush())
        self.assertTrue(h.can_fua())
        self.assertTrue(h.can_multi_conn())
        self.assertTrue(h.can_zero())  # emulated: NFS in libnfs 4.0 has no ALLOCATE/DEALLOCATE
        self.assertFalse(h.can_trim())
        # Zeroes and a write larger than the server's wsize land in the file.
        big = os.urandom(3 * MiB + 512)
        h.pwrite(big, 1 * MiB + 512)
        h.zero(65536, 4096)
        h.flush()
        self.assertEqual(harness.read_file(SERVER.file("g.img"), 1 * MiB + 512, len(big)), big)
        self.assertEqual(harness.read_file(SERVER.file("g.img"), 4096, 65536), b"\0" * 65536)
        self.assertEqual(h.pread(len(big), 1 * MiB + 512), big)

    def test_read_only_export_is_served_read_only(self):
        path = os.path.join(SERVER.ro_dir, "ro.img")
        random_file(path, 4 * MiB)
        self.addCleanup(os.unlink, path)
        for version in (3, 4):
            daemon = self.serve(SERVER.uri(version, "ro.img", ro=True), name="ro%d" % version)
            h = self.connect()
            self.assertTrue(h.is_read_only())
            self.assertEqual(h.pread(4096, 8192), harness.read_file(path, 8192, 4096))
            h.set_strict_mode(0)
            with self.assertRaises(nbd.Error) as cm:
                h.pwrite(b"x" * 4096, 0)
            self.assertEqual(cm.exception.errnum, errno.EPERM)
            h.shutdown()
            daemon.stop(timeout=60)

    @unittest.skipUnless(harness.have("strace"), "strace missing")
    def test_flush_and_fua_reach_the_server_as_commit(self):
        """FLUSH and FUA make ganesha fsync the file; plain writes do not.
        (A small FUA write on NFSv3 is a FILE_SYNC WRITE, a large one or any
        on NFSv4 is UNSTABLE plus COMMIT: both make the server sync.)"""
        for version in (3, 4):
            name = "flush%d.img" % version
            self.image(name, 4 * MiB, random=False)
            daemon = self.serve(SERVER.uri(version, name), name="flush%d" % version)
            h = self.connect()

            def traced(action):
                out = self.path("strace.out")
                st = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,sync_file_range",
                                       "-o", out, "-p", str(SERVER.proc.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(1.0)  # let strace attach to every thread
                    action()
                    time.sleep(0.5)
                finally:
                    os.kill(st.pid, signal.SIGINT)
                    st.wait(10)
                with open(out) as f:
                    text = f.read()
                os.unlink(out)
                return re.findall(r"\b(?:fsync|fdatasync|sync_file_range)\(", text)

            data = os.urandom(65536)
            self.assertEqual(traced(lambda: h.pwrite(data, 0)), [],
                             "a plain write made the server sync (stable writes?)")
            self.assertNotEqual(traced(h.flush), [], "FLUSH did not reach the server as COMMIT")
            self.assertEqual(harness.read_file(SERVER.file(name), 0, 65536), data)
            self.assertNotEqual(traced(lambda: h.pwrite(data, 65536, nbd.CMD_FLAG_FUA)), [],
                                "a FUA write was not committed")
            self.assertEqual(harness.read_file(SERVER.file(name), 65536, 65536), data)
            # Larger than one WRITE (wsize 1 MiB): written UNSTABLE, then committed.
            big = os.urandom(2 * MiB)
            self.assertNotEqual(traced(lambda: h.pwrite(big, MiB, nbd.CMD_FLAG_FUA)), [],
                                "a large FUA write was not committed")
            self.assertEqual(harness.read_file(SERVER.file(name), MiB, len(big)), big)
            h.shutdown()
            daemon.stop(timeout=60)

    def test_cached_export_over_nfs(self):
        img = self.image("cached.img", 32 * MiB)
        cache = self.path("cache")
        os.makedirs(cache)
        daemon = self.serve(SERVER.v3_uri("cached.img"), "cache=" + cache, name="cached")
        out = self.path("out.img")
        harness.run(["nbdcopy", self.uri("r"), out], timeout=120)
        harness.run(["cmp", img, out], timeout=60)
        h = self.connect()
        data = os.urandom(1 * MiB)
        h.pwrite(data, 5 * MiB)
        h.flush()
        self.assertEqual(harness.read_file(img, 5 * MiB, len(data)), data)  # writethrough
        self.assertTrue(os.path.exists(os.path.join(cache, "r.img")))
        h.shutdown()
        daemon.stop(timeout=60)


@unittest.skipUnless(nbd is not None, "python3-libnbd missing")
class OutageTest(NfsTestCase):
    def restart_mid_run(self, version):
        name = "restart%d.img" % version
        img = self.image(name, 32 * MiB, random=False)
        daemon = self.serve(SERVER.uri(version, name), "retry-timeout=60", name="restart%d" % version)
        h = self.connect()
        block = 65536
        expected = {}

        def write(i):
            data = os.urandom(block)
            h.pwrite(data, i * block)
            expected[i] = data

        for i in range(32):
            write(i)
        h.flush()
        for i in range(32, 40):  # acknowledged, not flushed
            write(i)
        SERVER.kill()
        restarter = threading.Timer(2.0, SERVER.start)
        restarter.start()
        try:
            start = time.monotonic()
            for i in range(40, 48):  # wait for the new session, then succeed
                write(i)
            self.assertGreater(time.monotonic() - start, 1.5)
        finally:
            restarter.join(90)
        try:
            h.flush()
        except nbd.Error as e:
            # Writes 32..39 went to a session that died before a flush:
            # reported once, then they are written again.
            self.assertEqual(e.errnum, errno.EIO)
            for i in range(32, 48):
                h.pwrite(expected[i], i * block)
            h.flush()
        for i, data in expected.items():
            self.assertEqual(harness.read_file(img, i * block, block), data, "block %d lost" % i)
        self.assertIn("reconnected", daemon.log())
        h.shutdown()
        daemon.stop(timeout=60)

    def test_server_restart_mid_run_v3(self):
        self.restart_mid_run(3)

    def test_server_restart_mid_run_v4(self):
        self.restart_mid_run(4)

    def test_server_down_past_retry_timeout_fails_with_eio(self):
        img = self.image("down.img", 8 * MiB)
        daemon = self.serve(SERVER.v4_uri("down.img"), "retry-timeout=3,io-timeout=2")
        h = self.connect()
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        SERVER.kill()
        self.assert_requests_fail_with_eio_in_time(h, retry_timeout=3, slack=6)
        self.assertTrue(daemon.running())
        SERVER.start()
        self.assertEqual(h.pread(4096, 4096), harness.read_file(img, 4096, 4096))
        h.shutdown()
        daemon.stop(timeout=60)

    def test_hung_server_hits_io_timeout(self):
        img = self.image("hung.img", 8 * MiB)
        daemon = self.serve(SERVER.v3_uri("hung.img"), "io-timeout=1,retry-timeout=2")
        h = self.connect()
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        with harness.frozen(SERVER.proc.pid):
            start = time.monotonic()
            with self.assertRaises(nbd.Error) as cm:
                h.pread(4096, 8192)
            took = time.monotonic() - start
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertLess(took, 8.0)
        self.assertIn("no reply within 1000 ms", daemon.log())
        self.assertEqual(h.pread(4096, 8192), harness.read_file(img, 8192, 4096))
        h.shutdown()
        daemon.stop(timeout=60)


@unittest.skipUnless(nbd is not None, "python3-libnbd missing")
class LeaseTest(NfsTestCase):
    def test_idle_v4_session_keeps_or_regains_its_lease(self):
        """libnfs 4.0 never renews its NFSv4 lease: the keepalive does, and
        without it an expired state is treated as a lost session."""
        SERVER.stop()
        self.addCleanup(SERVER.start)
        short = Ganesha(self.path("lease"), lease=2)
        self.addCleanup(short.stop)
        short.start()
        img = harness.make_sparse_image(os.path.join(short.export_dir, "lease.img"), 4 * MiB)
        for keepalive in ("0.5", "0"):
            daemon = self.serve(short.v4_uri("lease.img"), "keepalive=%s,connections=1" % keepalive,
                                name="lease" + keepalive)
            h = self.connect()
            h.pwrite(b"a" * 4096, 0)
            h.flush()
            time.sleep(7)  # over three leases of 2 s
            h.pwrite(b"b" * 4096, 4096)
            h.flush()
            self.assertEqual(harness.read_file(img, 0, 8192), b"a" * 4096 + b"b" * 4096)
            h.shutdown()
            daemon.stop(timeout=60)
            if keepalive == "0":
                self.assertIn("NFS4ERR_EXPIRED", daemon.log())  # the lease did run out
                self.assertIn("reconnected", daemon.log())
            else:
                self.assertNotIn("NFS4ERR", daemon.log())
                self.assertNotIn("reconnected", daemon.log())


class StartupErrorTest(NfsTestCase):
    def test_bad_uris(self):
        self.refused("r=nfs://127.0.0.1/", "names no image file")
        self.refused("r=nfs:///srv/disk.img", "names no server")
        self.refused("r=nfs://127.0.0.1/srv/", "ends in '/'")
        self.refused("r=nfs://127.0.0.1/srv/../disk.img", "'.' or '..'")
        self.refused("r=nfs://127.0.0.1/srv/disk.img?version=2", "version '2'")
        self.refused("r=nfs://127.0.0.1/srv/disk.img?uid=0", "unknown parameter 'uid'")
        self.refused("r=nfs://user@127.0.0.1/srv/disk.img", "names a user")
        self.refused("r=nfs://127.0.0.1/srv/disk.img,connections=0", "connections='0'")
        self.refused("r=nfs://127.0.0.1/srv/disk.img,io-timeout=x", "io-timeout='x'")
        self.refused("r=nfs://127.0.0.1/srv/disk.img,inflight-kib=-1", "inflight-kib='-1'")

    def test_wrong_export_path(self):
        self.refused("r=nfs://127.0.0.1/no/such/export/disk.img", "cannot mount '/no/such/export'",
                     "NFSv3")
        self.refused("r=nfs://127.0.0.1/no/such/export/disk.img?version=4",
                     "cannot mount '/no/such/export'", "NFSv4", "NOENT")

    def test_missing_file(self):
        for version in (3, 4):
            self.refused("r=" + SERVER.uri(version, "missing.img"), "cannot open '/missing.img'", "NOENT")

    def test_unreachable_server(self):
        port = harness.free_port()
        out = self.refused("r=nfs://127.0.0.1:%d%s/disk.img?version=4,io-timeout=5" % (port, PSEUDO),
                           "cannot mount '%s' from server 127.0.0.1:%d (NFSv4)" % (PSEUDO, port))
        self.assertIn("the connection failed", out)


if __name__ == "__main__":
    unittest.main()
