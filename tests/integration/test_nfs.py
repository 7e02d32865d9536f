"""The NFS backend (nfs://) against nfs-ganesha (VFS FSAL), NFSv3 and NFSv4:
what is particular to it (flags, read-only exports, large FUA writes, the
NFSv4 lease, export paths). The cases every backend shares are in
test_conformance.py.

One ganesha for the whole module, with its own rpcbind, in a network
namespace of its own (remotes.PrivateNfs): port 2049 and rpcbind's socket
stay free for anything else on the machine. blockwayd runs inside that
namespace too and its clients reach it on a Unix socket.
"""

import errno
import os
import shutil
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402
import remotes  # noqa: E402

try:
    import nbd  # Debian's python3-libnbd
except ImportError:  # pragma: no cover
    nbd = None

NFS = None      # the PrivateNfs: namespace, rpcbind, ganesha
SERVER = None   # its Ganesha
WORKDIR = None


def setUpModule():
    global NFS, SERVER, WORKDIR
    for tool in ("ganesha.nfsd", "rpcbind", "nfs-ls", "nsenter", "unshare"):
        if not harness.have(tool):
            raise unittest.SkipTest(tool + " missing")
    WORKDIR = tempfile.mkdtemp(prefix="bw-nfs-", dir="/tmp")
    NFS = remotes.PrivateNfs(WORKDIR)
    try:
        NFS.start()
    except BaseException:
        tearDownModule()
        raise
    SERVER = NFS.server


def tearDownModule():
    if NFS is not None:
        NFS.close()
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
    def image(self, name, size, random=True):
        path = SERVER.file(name)
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        if random:
            return random_file(path, size)
        return harness.make_sparse_image(path, size)

    def serve(self, uri, options="", name="blockwayd", nfs=None):
        """blockwayd in the namespace of nfs (default: the module's server)."""
        return self.serve_remote(uri, options, name=name, unix=True, ready_timeout=60,
                                 prefix=(nfs or NFS).prefix())

    def connect(self):
        h = nbd.NBD()
        h.connect_uri(self.unix_uri("r"))
        return h

    def refused(self, spec, *needles):
        return self.start_refused(spec, *needles, prefix=NFS.prefix())


@unittest.skipUnless(nbd is not None and harness.have("nbdcopy"), "libnbd tools missing")
class DataPathTest(NfsTestCase):
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
    def test_fua_write_larger_than_wsize_is_committed(self):
        """A FUA write larger than one WRITE (wsize 1 MiB) goes UNSTABLE in
        pieces, then COMMIT: ganesha syncs the file, on NFSv3 and NFSv4.
        (Small FUA writes and FLUSH: test_conformance.py.)"""
        for version in (3, 4):
            name = "flush%d.img" % version
            self.image(name, 4 * MiB, random=False)
            daemon = self.serve(SERVER.uri(version, name), name="flush%d" % version)
            h = self.connect()
            big = os.urandom(2 * MiB)
            with SERVER.flush_observer() as seen:
                h.pwrite(big, MiB, nbd.CMD_FLAG_FUA)
                self.assertGreater(seen.mark(), 0, "a large FUA write was not committed")
            self.assertEqual(harness.read_direct(SERVER.file(name), MiB, len(big)), big)
            h.shutdown()
            daemon.stop(timeout=60)

    def test_cached_export_over_nfs(self):
        img = self.image("cached.img", 32 * MiB)
        cache = self.path("cache")
        os.makedirs(cache)
        daemon = self.serve(SERVER.v3_uri("cached.img"), "cache=" + cache, name="cached")
        out = self.path("out.img")
        harness.run(["nbdcopy", self.unix_uri("r"), out], timeout=120)
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
class LeaseTest(NfsTestCase):
    def test_idle_v4_session_keeps_or_regains_its_lease(self):
        """libnfs 4.0 never renews its NFSv4 lease: the keepalive does, and
        without it an expired state is treated as a lost session."""
        nfs = remotes.started(self, remotes.PrivateNfs(self.path("lease"), lease=2))
        short = nfs.server
        img = harness.make_sparse_image(short.file("lease.img"), 4 * MiB)
        for keepalive in ("0.5", "0"):
            daemon = self.serve(short.v4_uri("lease.img"), "keepalive=%s,connections=1" % keepalive,
                                name="lease" + keepalive, nfs=nfs)
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
                self.assertNotIn("NFS4ERR", daemon.full_log())
                self.assertNotIn("reconnected", daemon.full_log())


class StartupErrorTest(NfsTestCase):
    """Malformed URIs and a server that is not there: test_conformance.py."""

    def test_bad_options(self):
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

if __name__ == "__main__":
    unittest.main()
