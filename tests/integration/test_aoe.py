"""blockwayd's aoe:// backend against vblade, the reference AoE target:
what is particular to AoE (MTU, retransmission, rediscovery, stray frames,
ATA errors, capabilities). The cases every backend shares are in
test_conformance.py.

Each test builds its own network (remotes.AoeNet): a namespace with vblade
on one end of a veth pair, blockwayd on the other end in the host namespace.
"""

import errno
import os
import re
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
from harness import MiB  # noqa: E402

import nbd  # noqa: E402

SHELF, SLOT = remotes.AOE_SHELF, remotes.AOE_SLOT


def ignored_counts(log):
    m = re.search(r"ignored (\d+) \(short (\d+), malformed (\d+), foreign (\d+), stale (\d+)\)", log)
    assert m, "no AoE counters in the log:\n" + log[-3000:]
    return dict(zip(["ignored", "short", "malformed", "foreign", "stale"], map(int, m.groups())))


# Runs inside the namespace: sends AoE frames the initiator must ignore, from
# vblade's side of the link, addressed to blockwayd's end.
INJECTOR = r"""
import os, socket, struct, sys, time
ifname, dst_hex, vblade_hex, shelf, slot, seconds = sys.argv[1:7]
dst, vmac = bytes.fromhex(dst_hex), bytes.fromhex(vblade_hex)
shelf, slot, seconds = int(shelf), int(slot), float(seconds)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
stranger = bytes.fromhex("02deadbeef01")
def aoe(src, flags, err, sh, sl, cmd, tag, rest=b"", ver=1):
    return dst + src + struct.pack(">HBBHBBI", 0x88A2, ver << 4 | flags, err, sh, sl, cmd, tag) + rest
ata_ok = struct.pack("BBBB6sH", 0x40, 0, 0, 0x40, bytes(6), 0) + os.urandom(1024)
frames = [
    dst + vmac + struct.pack(">H", 0x88A2) + b"\x18\x00\x00",             # short: no full header
    aoe(vmac, 8, 0, shelf, slot, 0, 5, ata_ok, ver=2),                       # unknown version
    aoe(stranger, 8, 0, shelf, slot, 0, 1, ata_ok),                          # foreign MAC
    aoe(vmac, 8, 0, shelf + 1, slot, 0, 1, ata_ok),                          # other shelf
    aoe(vmac, 8, 0, shelf, slot + 1, 0, 1, ata_ok),                          # other slot
    aoe(vmac, 0, 0, shelf, slot, 0, 1, ata_ok),                              # a request, not a response
    aoe(vmac, 8, 0, shelf, slot, 0, 0x3ff, ata_ok),                          # tag never used
    aoe(vmac, 12, 2, shelf, slot, 0, 0xfffffbff, b""),                       # error answer, unknown tag
    aoe(vmac, 8, 0, shelf, slot, 1, 0x12345, bytes(8)),                      # config answer nobody asked
    dst + vmac + struct.pack(">H", 0x88A2) + os.urandom(200),                # noise
]
# Duplicates: real answers of vblade, seen on this side of the link, sent
# again 20 ms later, when their tags are done or reused.
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sniff.bind((ifname, 0))
sniff.setblocking(False)
captured = []
sent = replayed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for f in frames:
        s.send(f)
        sent += 1
    for _ in range(64):
        try:
            f = sniff.recv(9100)
        except BlockingIOError:
            break
        if len(f) >= 36 and f[12:14] == b"\x88\xa2" and f[6:12] == vmac and f[14] == 0x18 and f[19] == 0 and len(captured) < 256:
            captured.append((time.monotonic(), f))
    now = time.monotonic()
    while captured and now - captured[0][0] > 0.02:
        s.send(captured.pop(0)[1])
        replayed += 1
    time.sleep(0.002)
print(sent, replayed)
"""


@unittest.skipUnless(remotes.can_make_netns() and harness.have("vblade"), "needs root, ip netns and vblade")
class AoeTest(harness.DaemonTestCase):

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.shared = tempfile.mkdtemp(prefix="bw-aoe-", dir="/tmp")
        cls.src = harness.make_random_image(os.path.join(cls.shared, "src.img"), 256 * MiB, seed=4)

    @classmethod
    def tearDownClass(cls):
        import shutil
        shutil.rmtree(cls.shared, ignore_errors=True)

    def setup_target(self, size=256 * MiB, mtu=1500, sync=False, read_only=False):
        self.net = remotes.started(self, remotes.AoeNet(mtu=mtu))
        self.img = harness.make_sparse_image(self.path("target.img"), size)
        self.vblade = remotes.started(self, remotes.Vblade(self.tmp, self.net, self.img, sync=sync,
                                                           read_only=read_only))

    def serve_aoe(self, opts="", name="blockwayd", extra=()):
        self.port = harness.free_port()
        spec = "d=" + self.vblade.uri + ("," + opts if opts else "")
        args = ["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port, "--export", spec] + list(extra)
        return self.start_daemon(args, name=name, ready_timeout=20)

    def aoe_uri(self):
        return "aoe://%s/%d.%d" % (self.net.host_if, SHELF, SLOT)

    def start_failure(self, spec, argv_prefix=()):
        """Runs blockwayd with one export that must fail to open; returns its output."""
        port = harness.free_port()
        cmd = list(argv_prefix) + [harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % port, "--export", "d=" + spec]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        out = p.stdout.decode(errors="replace")
        self.assertNotEqual(p.returncode, 0, "blockwayd started with %s:\n%s" % (spec, out))
        return out

    def copy_in_out(self):
        uri = self.uri("d")
        harness.run(["nbdcopy", self.src, uri], timeout=300)
        harness.run(["cmp", self.src, self.img])
        out = self.path("out.img")
        harness.run(["nbdcopy", uri, out], timeout=300)
        harness.run(["cmp", self.src, out])

    # --- data ---------------------------------------------------------------

    def test_nbdcopy_256m_at_mtu_9000(self):
        self.setup_target(mtu=9000)
        d = self.serve_aoe()
        self.copy_in_out()
        self.assertIn("17 sectors per frame at MTU 9000", d.log())

    def test_unaligned_request_is_refused_and_export_stays_usable(self):
        self.setup_target(size=16 * MiB)
        d = self.serve_aoe()
        self.assertIn("2 sectors per frame at MTU 1500", d.log())
        h = self.connect(self.uri("d"), strict=False)
        self.assertEqual(h.get_block_size(nbd.SIZE_MINIMUM), 512)
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(b"z" * 100, 1)
        self.assertEqual(cm.exception.errnum, errno.EINVAL)
        h.pwrite(b"y" * 512, 512)
        self.assertEqual(h.pread(512, 512), b"y" * 512)

    # --- failures -------------------------------------------------------------

    def test_target_error_maps_to_eio(self):
        """vblade -r fails writes with ATA status ERR: the client gets EIO,
        the session stays up and reads keep working."""
        self.setup_target(size=16 * MiB, read_only=True)
        with open(self.img, "r+b") as f:
            f.write(b"r" * 4096)
        d = self.serve_aoe()
        h = self.connect(self.uri("d"))
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(b"w" * 4096, 0)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertEqual(h.pread(4096, 0), b"r" * 4096)
        d.stop()
        self.assertRegex(d.log(), r"errors [1-9]\d*, session timeouts 0")

    def _run_outage(self, opts, outage, count=1500):
        """A writer (harness.FlushingWriter) runs while vblade is killed and
        restarted `outage` seconds later; what a flush covered is in the file."""
        self.setup_target(size=64 * MiB, sync=True)
        d = self.serve_aoe(opts)
        h = self.connect(self.uri("d"))
        w = harness.FlushingWriter(h, count, 16384)
        w.start()
        try:
            harness.wait_until(lambda: len(w.durable) >= 80, 30, what="writes before the outage")
            self.vblade.kill()
            before = len(w.durable)
            time.sleep(outage)
            self.vblade.start()
            w.join(240)
            self.assertFalse(w.is_alive(), "writer hung")
        finally:
            w.stop()
            w.join(30)
        self.assertGreater(len(w.durable), before + 100, "I/O did not resume after the target restarted")
        with open(self.img, "rb") as f:
            for off, data in w.durable:
                f.seek(off)
                self.assertEqual(f.read(len(data)), data, "flushed write at %d lost" % off)
        # And a read through the daemon agrees with the file.
        self.assertEqual(h.pread(65536, 0), harness.read_file(self.img, 0, 65536))
        return d, w.errors

    def test_target_restart_short_outage_resumes_transparently(self):
        """vblade killed and back within the frame give-up time: retransmission
        carries the I/O over, no request fails."""
        d, errors = self._run_outage("io-timeout=20", outage=1.5)
        self.assertEqual(errors, [])
        d.stop()
        self.assertRegex(d.log(), r"retransmitted [1-9]")
        self.assertRegex(d.log(), r"session timeouts 0;")

    def test_target_restart_long_outage_rediscovers(self):
        """vblade gone longer than io-timeout: the session drops (ETIMEDOUT),
        RetryLayer rediscovers it once vblade is back, I/O resumes; only a
        flush covering writes of the dead session may report EIO."""
        d, errors = self._run_outage("io-timeout=1,retry-timeout=60", outage=3)
        # One sticky EIO per dropped session at most (on a loaded machine a
        # 1 s io-timeout can drop a session spuriously too); writes never fail.
        for kind, _i, err in errors:
            self.assertEqual((kind, err), ("flush", errno.EIO), errors)
        self.assertLessEqual(len(errors), 3, errors)
        d.stop()
        log = d.log()
        self.assertRegex(log, r"session timeouts [1-9]")
        self.assertIn("AoE session closed", log)
        self.assertIn("rediscovered", log)

    def test_foreign_malformed_and_duplicate_frames_are_ignored(self):
        self.setup_target(size=64 * MiB)
        d = self.serve_aoe()
        script = self.path("inject.py")
        with open(script, "w") as f:
            f.write(INJECTOR)
        dst = self.net.mac(self.net.host_if, in_ns=False).hex()
        vmac = self.net.mac(self.net.peer_if, in_ns=True).hex()
        inject = subprocess.Popen(["ip", "netns", "exec", self.net.ns, "/usr/bin/python3", script,
                                   self.net.peer_if, dst, vmac, str(SHELF), str(SLOT), "4"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(harness.kill_pid, inject)
        src = self.path("src64.img")
        harness.make_random_image(src, 64 * MiB, seed=9)
        uri = self.uri("d")
        deadline = time.monotonic() + 4
        rounds = 0
        while time.monotonic() < deadline or rounds == 0:
            harness.run(["nbdcopy", src, uri], timeout=120)
            harness.run(["cmp", src, self.img])
            out = self.path("out.img")
            harness.run(["nbdcopy", uri, out], timeout=120)
            harness.run(["cmp", src, out])
            rounds += 1
        out, err = inject.communicate(timeout=30)
        self.assertEqual(inject.returncode, 0, err.decode())
        sent, replayed = map(int, out.split())
        self.assertGreater(sent, 100)
        self.assertGreater(replayed, 50, "the injector caught too few of vblade's answers to replay")
        d.stop()
        counts = ignored_counts(d.log())
        print("injected %d, replayed %d, daemon counted %r" % (sent, replayed, counts), file=sys.stderr)
        for kind in ("short", "malformed", "foreign", "stale"):
            self.assertGreater(counts[kind], 0, "no %s frames counted: %r" % (kind, counts))
        # Replayed answers carry tags that are done: they count as stale, never as answers.
        self.assertGreater(counts["stale"], replayed // 2, (counts, replayed))
        self.assertNotIn("AoE error", d.full_log())  # the forged error answer was not taken for ours

    # --- start-up errors --------------------------------------------------------

    def test_interface_down_is_explained(self):
        # Malformed URIs and a target nobody serves: test_conformance.py.
        self.net = remotes.started(self, remotes.AoeNet())
        harness.run(["ip", "link", "set", self.net.host_if, "down"])
        out = self.start_failure(self.aoe_uri())
        self.assertIn("network interface %s is down" % self.net.host_if, out)

    @unittest.skipUnless(harness.have("setpriv"), "setpriv missing")
    def test_missing_cap_net_raw_is_explained(self):
        self.net = remotes.started(self, remotes.AoeNet())
        out = self.start_failure(self.aoe_uri(),
                                 argv_prefix=["setpriv", "--inh-caps=-all", "--bounding-set=-net_raw"])
        self.assertIn("needs CAP_NET_RAW (or root) for aoe://", out)
        self.assertIn("setcap cap_net_raw+ep", out)
        self.assertIn("AmbientCapabilities=CAP_NET_RAW", out)


if __name__ == "__main__":
    unittest.main()
