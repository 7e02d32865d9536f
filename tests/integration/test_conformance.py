"""One conformance suite for every backend: the same cases run through
blockwayd against each kind of remote, with the real peer behind it.

  copy in and out    nbdcopy a random image in and out, cmp with the peer's file
  fio verify         randrw, 4k, QD16, verify=crc32c
  flush and FUA      reach the peer: the peer's own record says so (nbdkit's
                     log filter, strace of tgtd and ganesha, the ATA flush
                     frames to vblade -s, the daemon's own syncs for file://),
                     and the peer's file holds the data (read with O_DIRECT)
  peer restart       killed and restarted mid-run: nothing acknowledged by a
                     flush is lost, readers never see an error or wrong data
  peer gone          past retry-timeout requests fail with EIO, in time;
                     they work again once the peer is back
  peer hung          frozen (SIGSTOP): io-timeout ends the request with EIO;
                     it works again once the peer runs
  bad URIs           refused at start-up with exit code 2 and a clear message,
                     and so is a peer that is not there

A backend is one small fixture class, `class NAMEBackend(Backend)` (see
Backend below): it gets every case as NAMEConformance, and ctest runs it as
integration.test_conformance.name. Nothing else to add. Cases that
need a peer process skip for file://. Clients reach blockwayd on a Unix
socket, so the NFS fixture can run rpcbind, ganesha and blockwayd in a
network namespace of their own (no lock on port 2049).
"""

import errno
import os
import shutil
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
from harness import MiB  # noqa: E402
from test_fio import fio  # noqa: E402

import nbd  # noqa: E402


class Backend:
    """What the cases need to know about one backend. start() creates the
    peer's image (`self.image`, the file the peer serves) and starts the
    peer (`self.peer`, a remotes.PeerProcess; None for file://)."""

    has_peer = True          # a peer process that can be killed, restarted, frozen
    tools = ()               # the class skips when one is missing
    observer_tools = ()      # the flush case skips when one is missing
    needs_netns = False      # needs root and `ip netns`
    ready_timeout = 20.0     # for blockwayd to open the remote
    eio_options = "retry-timeout=3"
    eio_slack = 5.0          # seconds past retry-timeout a request may take to fail
    hung_log = r"no (?:reply|answer) within 1000 ms"  # what blockwayd logs for a hung peer
    reconnect_log = "reconnected"  # logged when a session comes back (None: not required)
    bad_uris = ()            # (URI, needle...): refused without a peer
    idle_flush_asks_peer = True  # a flush with nothing unflushed still goes to the peer

    peer = None
    image = None

    def __init__(self, test):
        self.test = test

    def start(self, size, seed=None, sync=False):
        """A peer serving an image of `size` bytes (random from `seed`, else
        sparse); sync: the peer makes each write durable, where it has such
        a switch (vblade -s)."""
        raise NotImplementedError

    def make_image(self, path, size, seed):
        if seed is None:
            return harness.make_sparse_image(path, size)
        return harness.make_random_image(path, size, seed=seed)

    def uri(self):
        raise NotImplementedError

    def prefix(self):
        """The command blockwayd runs under (to join the peer's network)."""
        return ()

    def unreachable(self):
        """(URI, needle...) of a remote that nobody serves."""
        raise NotImplementedError

    def flush_observer(self, daemon):
        return self.peer.flush_observer()

    def contents(self):
        """A local file that holds what the peer holds now (the peer's own
        file where it has one)."""
        return self.image


class FileBackend(Backend):
    has_peer = False
    observer_tools = ("strace",)
    bad_uris = (
        ("file://host/x.img", "names a host"),
        ("file://", "has no path"),
        ("file:///x.img?a=b", "takes no query parameters"),
        ("file:relative.img", "is not a URI"),
        ("bogus:///x.img", "unknown scheme 'bogus'", "file://", "nbd://", "iscsi://", "aoe://", "nfs://"),
    )

    def start(self, size, seed=None, sync=False):
        self.image = self.make_image(self.test.path("disk.img"), size, seed)
        return self

    def uri(self):
        return "file://" + self.image

    def unreachable(self):
        return ("file://" + self.test.path("missing.img"), "cannot open", "No such file or directory")

    def flush_observer(self, daemon):
        # The file is the peer: blockwayd syncs it (fdatasync for FLUSH, a
        # RWF_DSYNC write for FUA).
        return remotes.StraceFlushes(daemon.pid, self.test.path("blockwayd-strace.out"),
                                     syscalls="fsync,fdatasync,pwritev2",
                                     pattern=r"\b(?:fsync|fdatasync)\(|\bpwritev2\(.*RWF_DSYNC")


class NbdBackend(Backend):
    tools = ("nbdkit",)
    bad_uris = (
        ("nbd:///export", "names no host"),
        ("nbd+unix:///export", "has no socket"),
        ("nbd://127.0.0.1/x?tls=on", "takes no query"),
    )

    def start(self, size, seed=None, sync=False):
        self.image = self.make_image(self.test.path("remote.img"), size, seed)
        self.peer = remotes.started(self.test, remotes.Nbdkit(self.test.tmp, self.image, log_requests=True))
        return self

    def uri(self):
        return self.peer.uri

    def unreachable(self):
        port = harness.free_port()
        return ("nbd://127.0.0.1:%d/" % port, "cannot connect", str(port))


class IscsiBackend(Backend):
    tools = ("tgtd", "tgtadm")
    observer_tools = ("strace",)
    bad_uris = (
        ("iscsi:///%s/1" % remotes.IQN, "no host"),
        ("iscsi://127.0.0.1/%s" % remotes.IQN, "no LUN after the target name"),
        ("iscsi://127.0.0.1/disk1/1", "does not start with iqn., eui. or naa."),
        ("iscsi://127.0.0.1/%s/x" % remotes.IQN, "LUN 'x' is not a number"),
        ("iscsi://bob@127.0.0.1/%s/1" % remotes.IQN, "has no password"),
    )

    def start(self, size, seed=None, sync=False):
        self.image = self.make_image(self.test.path("lun.img"), size, seed)
        tgt = remotes.Tgt(self.test.tmp)
        tgt.luns.append((1, self.image, False))
        self.peer = remotes.started(self.test, tgt)
        return self

    def uri(self):
        return self.peer.uri()

    def unreachable(self):
        port = harness.free_port()
        return ("iscsi://127.0.0.1:%d/%s/1" % (port, remotes.IQN), "cannot log in", "Connection refused")


class Nfs3Backend(Backend):
    """ganesha and rpcbind in a network namespace of their own; blockwayd
    joins it (its clients come in on a Unix socket)."""

    version = 3
    tools = ("ganesha.nfsd", "rpcbind", "nfs-ls", "nsenter", "unshare")
    observer_tools = ("strace",)
    needs_netns = True
    ready_timeout = 60.0
    eio_options = "retry-timeout=3,io-timeout=2"
    eio_slack = 6.0
    bad_uris = (
        ("nfs://127.0.0.1/", "names no image file"),
        ("nfs:///srv/disk.img", "names no server"),
        ("nfs://127.0.0.1/srv/", "ends in '/'"),
        ("nfs://127.0.0.1/srv/../disk.img", "'.' or '..'"),
        ("nfs://127.0.0.1/srv/disk.img?version=2", "version '2'"),
        ("nfs://127.0.0.1/srv/disk.img?uid=0", "unknown parameter 'uid'"),
        ("nfs://user@127.0.0.1/srv/disk.img", "names a user"),
    )
    nfs = None

    def start(self, size, seed=None, sync=False):
        self.nfs = remotes.started(self.test, remotes.PrivateNfs(self.test.path("nfs")))
        self.peer = self.nfs.server
        self.image = self.make_image(self.peer.file("disk.img"), size, seed)
        return self

    def uri(self):
        return self.peer.uri(self.version, "disk.img")

    def prefix(self):
        return self.nfs.prefix() if self.nfs else ()

    def unreachable(self):
        # NFSv4 for both: NFSv3 asks the host's rpcbind (if one runs) for the
        # MOUNT service and so may reach another server than the port named.
        port = harness.free_port()
        return ("nfs://127.0.0.1:%d%s/disk.img?version=4,io-timeout=5" % (port, remotes.PSEUDO),
                "cannot mount '%s' from server 127.0.0.1:%d" % (remotes.PSEUDO, port), "the connection failed")


class Nfs4Backend(Nfs3Backend):
    version = 4


class AoeBackend(Backend):
    """vblade in a namespace joined to blockwayd's by a veth pair; with -s
    (O_SYNC) for the flush case, since its ATA FLUSH alone syncs nothing."""

    tools = ("vblade", "ip")
    needs_netns = True
    eio_options = "io-timeout=0.5,retry-timeout=3"
    hung_log = r"read failed: Connection timed out"
    reconnect_log = None  # a short outage is bridged by retransmission
    bad_uris = (
        ("aoe://lo/0.255", "slot '255' is not a number from 0 to 254"),
        ("aoe://lo/1", "is not SHELF.SLOT"),
        ("aoe://nosuch%d/0.1" % os.getpid(), "no network interface 'nosuch%d'" % os.getpid()),
    )

    def start(self, size, seed=None, sync=False):
        net = remotes.started(self.test, remotes.AoeNet())
        self.image = self.make_image(self.test.path("target.img"), size, seed)
        self.peer = remotes.started(self.test, remotes.Vblade(self.test.tmp, net, self.image, sync=sync))
        return self

    def uri(self):
        return self.peer.uri

    def unreachable(self):
        net = remotes.started(self.test, remotes.AoeNet())
        return ("aoe://%s/%d.%d,discover-timeout=1" % (net.host_if, remotes.AOE_SHELF, remotes.AOE_SLOT),
                "no AoE target answered Query Config for shelf %d slot %d on %s"
                % (remotes.AOE_SHELF, remotes.AOE_SLOT, net.host_if))


class RbdBackend(Backend):
    """An image in a one-node Ceph cluster (remotes.CephCluster), one cluster
    for the whole class (started by the first case, removed after the
    last); each case gets an image of its own. The peer that is killed,
    restarted and frozen is the OSD; librbd rides through a short outage
    itself (no reconnect), rados_osd_op_timeout (io-timeout) bounds a long one."""

    tools = ("ceph-mon", "ceph-osd", "rbd", "monmaptool", "ceph-authtool")
    ready_timeout = 60.0
    eio_options = "retry-timeout=3,io-timeout=1"
    eio_slack = 5.0
    hung_log = r"failed: Connection timed out; reconnecting"
    reconnect_log = None
    # librbd answers a flush with nothing in flight itself: with its cache
    # off, every write it acknowledged is already on the OSDs.
    idle_flush_asks_peer = False
    bad_uris = (
        ("rbd://rbd", "names no image (POOL/IMAGE)"),
        ("rbd://rbd/ns/img/x", "too many path components"),
        ("rbd://client.admin@rbd/img", "give the ID without 'client.'"),
        ("rbd://rbd/img?conf=ceph.conf", "needs an absolute path for conf="),
        ("rbd://rbd/img?exclusive=maybe", "exclusive='maybe' (expected on, off or break)"),
        ("rbd://rbd/img@snap?exclusive=on", "exclusive lock on a snapshot"),
    )
    cluster = None
    _images = 0

    @classmethod
    def _close_cluster(cls):
        if cls.cluster is not None:
            cls.cluster.close()
            shutil.rmtree(os.path.dirname(cls.cluster.dir), ignore_errors=True)
            cls.cluster = None

    def start(self, size, seed=None, sync=False):
        cls = type(self)
        if cls.cluster is None:
            cluster = remotes.CephCluster(tempfile.mkdtemp(prefix="bw-ceph-", dir="/tmp"))
            cls.cluster = cluster
            type(self.test).addClassCleanup(cls._close_cluster)
            cluster.start()
        c = cls.cluster
        cls._images += 1
        self.name = "img%d" % cls._images
        if seed is None:
            c.create_image(self.name, size)
        else:
            self.image = self.make_image(self.test.path("rbd-src.img"), size, seed)
            c.rbd("import", self.image, "rbd/" + self.name)
        self.peer = c.osd  # (images stay until the cluster goes: see test_rbd.py)
        self.test.addCleanup(self._osd_back)
        return self

    def _osd_back(self):
        """A case that failed half-way must not leave the OSD dead."""
        if not self.peer.running():
            self.peer.start()

    def uri(self):
        return self.cluster.uri(self.name)

    def contents(self):
        out = self.test.path("rbd-export-%d.img" % time.monotonic_ns())
        self.cluster.rbd("export", "--no-progress", "rbd/" + self.name, out)
        return out

    def flush_observer(self, daemon):
        return remotes.RbdFlushes(self.cluster, daemon.pid)

    def unreachable(self):
        conf = self.test.path("nomon.conf")
        with open(conf, "w") as f:
            f.write("[global]\nmon host = [v2:127.0.0.1:%d]\nauth client required = cephx\n" % harness.free_port())
        keyring = self.test.path("client.keyring")
        harness.run(["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "client.admin"])
        return ("rbd://rbd/img?conf=%s&keyring=%s,io-timeout=2" % (conf, keyring),
                "no answer from the mons within 2 s")


class ConformanceCases:
    """The cases; a subclass mixes in harness.DaemonTestCase and names its
    BACKEND. Not a TestCase itself, so it never runs without a backend."""

    BACKEND = None
    COPY_SIZE = 128 * MiB
    BLOCK = 64 * 1024

    def setUp(self):
        self.need_tools(self.BACKEND.tools)
        if self.BACKEND.needs_netns and not remotes.can_make_netns():
            self.skipTest("needs root and network namespaces")
        super().setUp()
        self.backend = self.BACKEND(self)

    def serve_backend(self, options=""):
        b = self.backend
        return self.serve_remote(b.uri(), options, unix=True, prefix=b.prefix(), ready_timeout=b.ready_timeout)

    def need_tools(self, tools):
        for tool in tools:
            if not harness.have(tool):
                self.skipTest(tool + " missing")

    def client(self):
        return self.connect(self.unix_uri("r"))

    def need_peer(self):
        if not self.backend.has_peer:
            self.skipTest("no peer process behind this backend")

    def need_bounded_outages(self):
        reason = getattr(self.backend, "outage_cases_skip", None)
        if reason:
            self.skipTest(reason)

    # ---- data ----

    def test_copy_in_and_out(self):
        b = self.backend.start(self.COPY_SIZE)
        src = harness.make_random_image(self.path("src.img"), self.COPY_SIZE, seed=7)
        daemon = self.serve_backend()
        uri = self.unix_uri("r")
        p = harness.run(["nbdcopy", "--flush", src, uri], timeout=300, check=False)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace") + daemon.log())
        harness.run(["cmp", src, b.contents()], timeout=120)  # the peer's file
        out = self.path("out.img")
        harness.run(["nbdcopy", uri, out], timeout=300)
        harness.run(["cmp", src, out], timeout=120)
        daemon.stop(timeout=60)

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_randrw_qd16(self):
        self.backend.start(64 * MiB)
        self.serve_backend()
        _, result, _ = fio(self, self.unix_uri("r"), "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=64M",
                           "--io_size=32M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=0",
                           timeout=240)
        job = result["jobs"][0]
        self.assertGreater(job["write"]["io_bytes"], 4 * MiB)
        self.assertGreater(job["read"]["io_bytes"], 4 * MiB)

    def test_flush_and_fua_reach_the_peer(self):
        self.need_tools(self.BACKEND.observer_tools)
        b = self.backend.start(16 * MiB, sync=True)
        daemon = self.serve_backend()
        h = self.client()
        self.assertTrue(h.can_flush())
        self.assertTrue(h.can_fua())
        plain, flushed, fua = os.urandom(self.BLOCK), os.urandom(self.BLOCK), os.urandom(4096)
        with b.flush_observer(daemon) as seen:
            h.pwrite(plain, 1 * MiB)
            after_write = seen.mark()
            h.pwrite(flushed, 2 * MiB)
            h.flush()
            after_flush = seen.mark()
            h.pwrite(fua, 3 * MiB, nbd.CMD_FLAG_FUA)
            after_fua = seen.mark()
        self.assertEqual(after_write, 0, "a plain write made the peer sync")
        self.assertGreater(after_flush, 0, "FLUSH did not reach the peer")
        self.assertGreater(after_fua, 0, "a FUA write did not reach the peer as FUA or with a flush")
        img = b.contents()
        self.assertEqual(harness.read_direct(img, 2 * MiB, self.BLOCK), flushed)
        self.assertEqual(harness.read_direct(img, 3 * MiB, 4096), fua)
        self.assertEqual(harness.read_direct(img, 1 * MiB, self.BLOCK), plain)

    # ---- the peer goes away ----

    def test_peer_restart_mid_run_loses_nothing_flushed(self):
        """A reader of flushed data and a writer that flushes every 8 blocks
        run while the peer is killed and restarted 1.5 s later. The reader
        sees no error and no wrong byte; writes never fail; a flush may fail
        (EIO, once per lost session) only for writes of the session that
        died; everything a successful flush covered is in the peer's file."""
        self.need_peer()
        b = self.backend.start(32 * MiB)
        block = self.BLOCK
        daemon = self.serve_backend("retry-timeout=60")
        h = self.client()
        base = {}
        for i in range(16):
            base[i * block] = bytes([i + 1]) * block
            h.pwrite(base[i * block], i * block)
        h.flush()

        stop = threading.Event()
        read_errors = []

        def reader():
            rh = nbd.NBD()
            try:
                rh.connect_uri(self.unix_uri("r"))
                n = 0
                while not stop.is_set():
                    off = (n % 16) * block
                    if rh.pread(block, off) != base[off]:
                        read_errors.append("wrong data at %d" % off)
                    n += 1
                rh.shutdown()
            except Exception as e:  # noqa: BLE001
                read_errors.append(repr(e))

        writer = harness.FlushingWriter(h, 4000, block, base=16 * block, span=400)
        threads = [threading.Thread(target=reader), writer]
        for t in threads:
            t.start()
        try:
            harness.wait_until(lambda: len(writer.durable) >= 32, 30, what="writes before the outage")
            b.peer.kill()
            time.sleep(1.5)
            before = len(writer.durable)
            b.peer.start()
            harness.wait_until(lambda: len(writer.durable) >= before + 64, 90, interval=0.1,
                               what="flushed writes after the restart")
        finally:
            stop.set()
            writer.stop()
            for t in threads:
                t.join(120)
        self.assertFalse(any(t.is_alive() for t in threads), "a client hung")
        self.assertEqual(read_errors, [])
        for kind, _i, err in writer.errors:
            self.assertEqual((kind, err), ("flush", errno.EIO), writer.errors)
        self.assertLessEqual(len(writer.errors), 3, writer.errors)
        latest = dict(writer.durable)  # the last flushed contents of each block
        img = b.contents()
        for off, data in list(base.items()) + list(latest.items()):
            self.assertEqual(harness.read_file(img, off, len(data)), data, "flushed data at %d lost" % off)
        if b.reconnect_log:
            self.assertIn(b.reconnect_log, daemon.log())
        daemon.stop(timeout=60)

    def test_peer_gone_past_retry_timeout_fails_with_eio_then_recovers(self):
        self.need_peer()
        self.need_bounded_outages()
        b = self.backend.start(16 * MiB, seed=5)
        daemon = self.serve_backend(b.eio_options)
        h = self.client()
        img = b.contents()
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        b.peer.kill()
        self.assert_requests_fail_with_eio_in_time(h, retry_timeout=3, slack=b.eio_slack, flush=b.idle_flush_asks_peer)
        self.assertTrue(daemon.running())
        b.peer.start()

        # With retry-timeout=3, a request that meets the session before it
        # reconnected may still fail (a loaded machine: a restarted OSD seen
        # by librados only after the mon's next map); the export recovers on
        # its own, with no restart.
        self.wait_reads_recover(h, img, 4096, 30, "reads after the peer came back")
        h.pwrite(b"\x5e" * 4096, 8192)
        h.flush()
        self.assertEqual(harness.read_file(b.contents(), 8192, 4096), b"\x5e" * 4096)
        daemon.stop(timeout=60)

    def test_hung_peer_hits_io_timeout_then_recovers(self):
        self.need_peer()
        self.need_bounded_outages()
        b = self.backend.start(16 * MiB, seed=6)
        daemon = self.serve_backend("io-timeout=1,retry-timeout=2")
        h = self.client()
        img = b.contents()
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        with b.peer.frozen():  # the peer stops answering, its sockets stay open
            start = time.monotonic()
            with self.assertRaises(nbd.Error) as cm:
                h.pread(4096, 8192)
            took = time.monotonic() - start
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertLess(took, 8.0)
        if b.hung_log:
            self.assertRegex(daemon.log(), b.hung_log)
        self.wait_reads_recover(h, img, 8192, 20, "reads after SIGCONT")

    def wait_reads_recover(self, h, img, offset, timeout, what):
        """Waits until a 4 KiB read at `offset` through handle h succeeds and
        returns the bytes of the image file `img` there."""
        def reads_ok():
            try:
                return h.pread(4096, offset) == harness.read_file(img, offset, 4096)
            except nbd.Error:
                return False
        harness.wait_until(reads_ok, timeout, interval=0.2, what=what)

    # ---- start-up ----

    def test_bad_uris_are_refused_at_startup(self):
        for uri, *needles in self.backend.bad_uris:
            with self.subTest(uri=uri):
                self.start_refused("r=" + uri, *needles)
        uri, *needles = self.backend.unreachable()
        start = time.monotonic()
        self.start_refused("r=" + uri, *needles)
        self.assertLess(time.monotonic() - start, 30)


# One test class per backend: NAMEConformance for each class NAMEBackend
# above (tests/CMakeLists.txt finds them by the same name, one ctest test each).
for _backend in [v for k, v in list(globals().items())
                 if k.endswith("Backend") and isinstance(v, type) and issubclass(v, Backend) and v is not Backend]:
    _name = _backend.__name__[:-len("Backend")] + "Conformance"
    globals()[_name] = type(_name, (ConformanceCases, harness.DaemonTestCase),
                            {"BACKEND": _backend, "__qualname__": _name})


if __name__ == "__main__":
    unittest.main()
