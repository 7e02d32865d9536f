"""blockwayd's aoe:// backend against vblade, the reference AoE target.

Each test builds its own network: a namespace with vblade on one end of a
veth pair, blockwayd on the other end in the host namespace. Names carry the
pid and a counter so parallel runs do not collide; everything is deleted in
cleanup and every process is stopped by its pid.
"""

import errno
import itertools
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402
from test_fio import fio  # noqa: E402

import nbd  # noqa: E402

AOE_ETHERTYPE = 0x88A2
SHELF, SLOT = 3, 7
_names = itertools.count()


def can_make_netns():
    if os.geteuid() != 0 or not harness.have("ip") or not harness.have("vblade"):
        return False
    name = "bwchk%d" % os.getpid()
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    if p.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True


HAVE_NETNS = can_make_netns()


class AoeNet:
    """A network namespace joined to the host by a veth pair."""

    def __init__(self, test, mtu=1500):
        n = next(_names)
        tag = "%d%d" % (os.getpid() % 100000, n)
        self.ns = "bwaoe" + tag
        self.host_if = "bwh" + tag   # blockwayd's end, in the host namespace
        self.peer_if = "bwp" + tag   # vblade's end, in the namespace
        test.addCleanup(self.delete)
        harness.run(["ip", "netns", "add", self.ns])
        harness.run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if])
        harness.run(["ip", "link", "set", self.peer_if, "netns", self.ns])
        harness.run(["ip", "link", "set", self.host_if, "mtu", str(mtu), "up"])
        self.ns_run(["ip", "link", "set", self.peer_if, "mtu", str(mtu), "up"])
        self.ns_run(["ip", "link", "set", "lo", "up"])

    def ns_run(self, cmd, **kw):
        return harness.run(["ip", "netns", "exec", self.ns] + list(cmd), **kw)

    def delete(self):
        # Deleting the host end removes the pair; deleting the namespace
        # removes anything left in it.
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def mac(self, ifname, in_ns):
        cmd = ["cat", "/sys/class/net/%s/address" % ifname]
        out = (self.ns_run(cmd) if in_ns else harness.run(cmd)).stdout.decode().strip()
        return bytes(int(x, 16) for x in out.split(":"))


class Vblade(harness.PeerProcess):
    """vblade serving IMG as SHELF.SLOT inside the namespace."""

    def __init__(self, test, net, img, sync=False, read_only=False):
        self.test = test
        self.net = net
        self.img = img
        self.sync = sync
        self.read_only = read_only
        self.proc = None
        self.log_path = os.path.join(test.tmp, "vblade-%s.log" % net.ns)
        test.addCleanup(self.kill)

    def start(self, timeout=10.0):
        args = ["ip", "netns", "exec", self.net.ns, "vblade"]
        if self.sync:
            args.append("-s")   # O_SYNC: vblade's FLUSH does not sync by itself
        if self.read_only:
            args.append("-r")
        args += [str(SHELF), str(SLOT), self.net.peer_if, self.img]
        log = open(self.log_path, "ab")
        # `ip netns exec` execs vblade: this pid is vblade's.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("vblade exited with %d:\n%s" % (self.proc.returncode, self.log()))
            if re.search(r"pid %d: e%d\.%d" % (self.proc.pid, SHELF, SLOT), self.log()):
                return self
            time.sleep(0.02)
        raise AssertionError("vblade did not start within %.0fs:\n%s" % (timeout, self.log()))


def aoe_uri(net):
    return "aoe://%s/%d.%d" % (net.host_if, SHELF, SLOT)


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


@unittest.skipUnless(HAVE_NETNS, "needs root, ip netns and vblade")
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
        self.net = AoeNet(self, mtu=mtu)
        self.img = harness.make_sparse_image(self.path("target.img"), size)
        self.vblade = Vblade(self, self.net, self.img, sync=sync, read_only=read_only).start()

    def serve_aoe(self, opts="", name="blockwayd", extra=()):
        self.port = harness.free_port()
        spec = "d=" + aoe_uri(self.net) + ("," + opts if opts else "")
        args = ["--log-level", "info", "--listen", "127.0.0.1:%d" % self.port, "--export", spec] + list(extra)
        return self.start_daemon(args, name=name, ready_timeout=20)

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

    def test_nbdcopy_256m_in_and_out(self):
        self.setup_target()
        d = self.serve_aoe()
        self.copy_in_out()
        self.assertIn("2 sectors per frame at MTU 1500", d.log())

    def test_nbdcopy_256m_at_mtu_9000(self):
        self.setup_target(mtu=9000)
        d = self.serve_aoe()
        self.copy_in_out()
        self.assertIn("17 sectors per frame at MTU 9000", d.log())

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_randrw_qd16(self):
        self.setup_target(size=64 * MiB)
        self.serve_aoe()
        _, result, _ = fio(self, self.uri("d"), "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=64M",
                           "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--io_size=32M",
                           timeout=240)
        job = result["jobs"][0]
        self.assertGreater(job["write"]["io_bytes"], 4 * MiB)
        self.assertGreater(job["read"]["io_bytes"], 4 * MiB)

    def test_flush_and_fua_reach_the_file(self):
        """A FLUSH is sent to the target as an ATA flush command and answered;
        the data is in vblade's file (-s: written O_SYNC) when it returns."""
        self.setup_target(size=16 * MiB, sync=True)
        self.serve_aoe()
        # ETH_P_ALL: only such taps see frames the host sends, not just those it receives.
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.addCleanup(sniff.close)
        sniff.bind((self.net.host_if, 0))
        sniff.settimeout(0.2)
        h = self.connect(self.uri("d"))
        h.pwrite(b"\xa5" * 65536, 1 * MiB)
        h.flush()
        self.assertEqual(harness.read_file(self.img, 1 * MiB, 65536), b"\xa5" * 65536)
        h.pwrite(b"\x5a" * 4096, 3 * MiB, nbd.CMD_FLAG_FUA)
        self.assertEqual(harness.read_file(self.img, 3 * MiB, 4096), b"\x5a" * 4096)
        # The wire: blockwayd's outgoing ATA FLUSH CACHE (vblade offers no EXT) and vblade's answer.
        flush_cmds = {0xE7, 0xEA}
        seen_request = seen_answer = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (seen_request and seen_answer):
            try:
                frame = sniff.recv(9100)
            except socket.timeout:
                h.flush()
                continue
            if len(frame) < 14 + 22 or frame[12:14] != b"\x88\xa2" or frame[14 + 5] != 0:
                continue
            if frame[14 + 13] in flush_cmds and not frame[14] & 0x08:
                seen_request = True
            if seen_request and frame[14] & 0x08 and not frame[14 + 13] & 0x01:
                seen_answer = True  # a response without ERR (status is DRDY)
        self.assertTrue(seen_request, "no ATA flush frame went to the target")
        self.assertTrue(seen_answer, "the target did not answer the flush")

    def test_unaligned_request_is_refused_and_export_stays_usable(self):
        self.setup_target(size=16 * MiB)
        self.serve_aoe()
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

    def _writer(self, h, base, count, block, durable, errors, stop):
        """Writes `count` blocks with distinct contents, flushing every 8;
        records which ones a successful flush covered."""
        pending = []
        for i in range(count):
            if stop.is_set():
                break
            off = base + i * block
            data = struct.pack(">Q", i + 1) * (block // 8)
            try:
                h.pwrite(data, off)
                pending.append((off, data))
            except nbd.Error as e:
                errors.append(("write", i, e.errnum))
            if i % 8 == 7:
                try:
                    h.flush()
                    durable.extend(pending)
                except nbd.Error as e:
                    errors.append(("flush", i, e.errnum))
                pending = []
            time.sleep(0.002)
        try:
            h.flush()
            durable.extend(pending)
        except nbd.Error as e:
            errors.append(("flush", -1, e.errnum))

    def _run_outage(self, opts, outage, count=1500):
        self.setup_target(size=64 * MiB, sync=True)
        d = self.serve_aoe(opts)
        h = self.connect(self.uri("d"))
        durable, errors, stop = [], [], threading.Event()
        t = threading.Thread(target=self._writer, args=(h, 0, count, 16384, durable, errors, stop))
        t.start()
        try:
            harness.wait_until(lambda: len(durable) >= 80, 30, what="writes before the outage")
            self.vblade.kill()
            before = len(durable)
            time.sleep(outage)
            self.vblade.start()
            t.join(240)
            self.assertFalse(t.is_alive(), "writer hung")
        finally:
            stop.set()
            t.join(30)
        self.assertGreater(len(durable), before + 100, "I/O did not resume after the target restarted")
        with open(self.img, "rb") as f:
            for off, data in durable:
                f.seek(off)
                self.assertEqual(f.read(len(data)), data, "flushed write at %d lost" % off)
        # And a read through the daemon agrees with the file.
        self.assertEqual(h.pread(65536, 0), harness.read_file(self.img, 0, 65536))
        return d, errors

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

    def test_target_gone_fails_with_eio_after_deadline(self):
        self.setup_target(size=16 * MiB)
        d = self.serve_aoe("io-timeout=0.5,retry-timeout=2")
        h = self.connect(self.uri("d"))
        h.pwrite(b"x" * 4096, 0)
        self.vblade.kill()
        start = time.monotonic()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(4096, 0)
        took = time.monotonic() - start
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertLess(took, 10, "the request was not bounded by its deadline")
        # The target comes back: the next request rediscovers it.
        self.vblade.start()
        self.assertEqual(h.pread(4096, 0), b"x" * 4096)
        self.assertTrue(d.running())

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
        self.assertNotIn("AoE error", d.log())  # the forged error answer was not taken for ours

    # --- start-up errors --------------------------------------------------------

    def test_startup_errors_are_clear(self):
        self.net = AoeNet(self)
        out = self.start_failure("aoe://%s/0.255" % self.net.host_if)
        self.assertIn("slot '255' is not a number from 0 to 254", out)
        out = self.start_failure("aoe://%s/1" % self.net.host_if)
        self.assertIn("is not SHELF.SLOT", out)
        out = self.start_failure("aoe://nosuch%d/0.1" % os.getpid())
        self.assertIn("no network interface 'nosuch%d'" % os.getpid(), out)
        # The interface exists but nobody serves SHELF.SLOT on it.
        start = time.monotonic()
        out = self.start_failure(aoe_uri(self.net) + ",discover-timeout=1")
        self.assertLess(time.monotonic() - start, 15)
        self.assertIn("no AoE target answered Query Config for shelf %d slot %d on %s"
                      % (SHELF, SLOT, self.net.host_if), out)
        harness.run(["ip", "link", "set", self.net.host_if, "down"])
        out = self.start_failure(aoe_uri(self.net))
        self.assertIn("network interface %s is down" % self.net.host_if, out)

    @unittest.skipUnless(harness.have("setpriv"), "setpriv missing")
    def test_missing_cap_net_raw_is_explained(self):
        self.net = AoeNet(self)
        out = self.start_failure(aoe_uri(self.net),
                                 argv_prefix=["setpriv", "--inh-caps=-all", "--bounding-set=-net_raw"])
        self.assertIn("needs CAP_NET_RAW (or root) for aoe://", out)
        self.assertIn("setcap cap_net_raw+ep", out)
        self.assertIn("AmbientCapabilities=CAP_NET_RAW", out)


if __name__ == "__main__":
    unittest.main()
