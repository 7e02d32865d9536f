#!/usr/bin/env python3
"""blockwayd with least privilege (issue 14): the daemon run by setpriv as an
unprivileged user with no capability at all serves a file export over TCP
and a Unix socket and answers the control socket; each feature that needs a
capability runs with that one capability and nothing else (AoE with
CAP_NET_RAW against vblade, a port below 1024 with CAP_NET_BIND_SERVICE,
FUSE as root bounded to CAP_SYS_ADMIN), read back from /proc/PID/status;
without it the error names the capability. The packaged unit: its exposure
score from `systemd-analyze security --offline=true` under a bound, its
sandbox and capability properties read back, each drop-in example merged
onto it giving exactly the capability it documents, and the sysusers.d and
tmpfiles.d files applied to a scratch root.

The unprivileged identity is a uid and gid that no account uses (the
machine's /etc/passwd is left alone); the packaged user is checked in the
scratch root.
"""

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
from harness import BLOCKWAY, MiB, DaemonTestCase, free_port, make_random_image, run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(REPO, "packaging", "blockwayd.service")
DROPINS = os.path.join(REPO, "packaging", "examples", "blockwayd.service.d")
# The packaged unit's exposure is 1.5 (systemd 252); a change that loosens
# the sandbox noticeably fails here.
EXPOSURE_BOUND = 2.0

CAP_NET_BIND_SERVICE, CAP_NET_RAW, CAP_SYS_ADMIN = 10, 13, 21


def unused_id():
    """A number that is neither a uid nor a gid on this machine."""
    for n in range(64000, 65000):
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            return n
    raise unittest.SkipTest("no unused uid/gid")


UID = unused_id()


def setpriv(caps=(), uid=UID):
    """A command prefix that runs the rest as `uid` (and gid) with no
    supplementary groups, no new privileges, and exactly `caps` (names
    without CAP_) as permitted, effective and ambient capabilities, bounded
    to them."""
    bound = "-all" + "".join(",+" + c for c in caps)
    cmd = ["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups", "--no-new-privs",
           "--inh-caps=" + bound, "--bounding-set=" + bound]
    if caps:
        cmd.append("--ambient-caps=" + ",".join("+" + c for c in caps))
    return cmd


def proc_status(pid):
    """{field: value} of /proc/PID/status."""
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cap_mask(*bits):
    return sum(1 << b for b in bits)


class Unprivileged(DaemonTestCase):
    def setUp(self):
        super().setUp()
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            self.skipTest("needs root and setpriv")
        os.chown(self.tmp, UID, UID)
        self.data = self.path("data")

    def own(self, path):
        os.chown(path, UID, UID)
        return path

    def assert_identity(self, pid, uid, caps):
        st = proc_status(pid)
        self.assertEqual(st["Uid"].split(), [str(uid)] * 4, st["Uid"])
        self.assertEqual(st["Gid"].split(), [str(uid)] * 4, st["Gid"])
        want = "%016x" % cap_mask(*caps)
        for field in ("CapPrm", "CapEff", "CapBnd"):
            self.assertEqual(st[field], want, "%s of blockwayd: %s" % (field, st[field]))
        self.assertEqual(st["NoNewPrivs"], "1")
        return st

    def test_no_capability_serves_file_export_tcp_unix_and_control(self):
        img = self.own(make_random_image(self.path("disk.img"), 8 * MiB, seed=14))
        port = free_port()
        sock = self.path("nbd.sock")
        ctl = self.path("control.sock")
        d = self.start_daemon(["--listen", "127.0.0.1:%d" % port, "--listen", "unix:" + sock,
                               "--data-dir", self.data, "--control-socket", ctl, "--export", "disk=file://" + img],
                              prefix=setpriv())
        st = self.assert_identity(d.pid, UID, ())
        self.assertEqual(st["CapAmb"], "0" * 16)
        # Written through the unprivileged daemon, read back over the Unix socket.
        src = make_random_image(self.path("src.img"), 8 * MiB, seed=15)
        run(["nbdcopy", src, "nbd://127.0.0.1:%d/disk" % port], timeout=120)
        out = self.path("out.img")
        run(["nbdcopy", "nbd+unix:///disk?socket=" + sock, out], timeout=120)
        with open(src, "rb") as a, open(out, "rb") as b, open(img, "rb") as c:
            data = a.read()
            self.assertEqual(b.read(), data)
            self.assertEqual(c.read(), data)
        # Its control socket belongs to it; the operator's blockway command reaches it.
        self.assertEqual(os.stat(ctl).st_uid, UID)
        status = run([BLOCKWAY, "--socket", ctl, "status"]).stdout.decode()
        self.assertIn("disk", status)
        d.stop()

    def test_systemd_directories_are_the_defaults(self):
        """As under the packaged unit: $STATE_DIRECTORY holds the data and
        $RUNTIME_DIRECTORY the control socket."""
        state, runtime = self.path("state"), self.path("runtime")
        for d in (state, runtime):
            os.mkdir(d)
            os.chown(d, UID, UID)
        img = self.own(make_random_image(self.path("disk.img"), MiB, seed=3))
        env = dict(os.environ, STATE_DIRECTORY=state, RUNTIME_DIRECTORY=runtime)
        port = free_port()
        d = harness.Daemon(self.tmp, ["--listen", "127.0.0.1:%d" % port, "--export", "disk=file://" + img],
                           prefix=setpriv())
        self.addCleanup(d.cleanup)
        old = dict(os.environ)
        os.environ.update(env)
        try:
            d.start()
        finally:
            os.environ.clear()
            os.environ.update(old)
        ctl = os.path.join(runtime, "control.sock")
        self.assertTrue(os.path.exists(ctl), os.listdir(runtime))
        self.assertIn("disk", run([BLOCKWAY, "--socket", ctl, "status"]).stdout.decode())
        run([BLOCKWAY, "--socket", ctl, "export", "add", "extra", "file://" + img, "read-only=true"])
        d.stop()
        # The run-time export was persisted in $STATE_DIRECTORY.
        self.assertTrue(os.listdir(state), "nothing written to STATE_DIRECTORY")

    def low_port(self):
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            start = int(f.read())
        for port in range(min(start, 1024) - 1, 600, -1):
            if not remotes.port_open(port):
                try:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue
        self.skipTest("no free port below ip_unprivileged_port_start")

    def test_low_port_needs_cap_net_bind_service(self):
        port = self.low_port()
        args = ["--listen", "127.0.0.1:%d" % port, "--data-dir", self.data, "--export",
                "disk=file://" + self.own(make_random_image(self.path("disk.img"), MiB, seed=5))]
        p = run(setpriv() + [harness.BLOCKWAYD] + args, check=False, timeout=30)
        out = p.stdout.decode() + p.stderr.decode()
        self.assertNotEqual(p.returncode, 0, out)
        self.assertIn("Permission denied", out)
        self.assertIn("need CAP_NET_BIND_SERVICE", out)
        self.assertIn("AmbientCapabilities=CAP_NET_BIND_SERVICE", out)
        # With that one capability it serves.
        d = self.start_daemon(args, prefix=setpriv(["net_bind_service"]))
        self.assert_identity(d.pid, UID, (CAP_NET_BIND_SERVICE,))
        self.assertEqual(proc_status(d.pid)["CapAmb"], "%016x" % cap_mask(CAP_NET_BIND_SERVICE))
        info = run(["nbdinfo", "--size", "nbd://127.0.0.1:%d/disk" % port]).stdout.decode().strip()
        self.assertEqual(info, str(MiB))
        d.stop()

    @unittest.skipUnless(remotes.can_make_netns() and harness.have("vblade"), "needs ip netns and vblade")
    def test_aoe_with_cap_net_raw_only(self):
        net = remotes.started(self, remotes.AoeNet())
        img = harness.make_sparse_image(self.path("target.img"), 16 * MiB)
        vblade = remotes.started(self, remotes.Vblade(self.tmp, net, img))
        port = free_port()
        args = ["--listen", "127.0.0.1:%d" % port, "--data-dir", self.data, "--export", "d=" + vblade.uri]
        # Without the capability: refused, naming it (as the user the unit runs as).
        p = run(setpriv() + [harness.BLOCKWAYD] + args, check=False, timeout=60)
        out = p.stdout.decode() + p.stderr.decode()
        self.assertNotEqual(p.returncode, 0, out)
        self.assertIn("needs CAP_NET_RAW (or root) for aoe://", out)
        d = self.start_daemon(args, prefix=setpriv(["net_raw"]), ready_timeout=30)
        self.assert_identity(d.pid, UID, (CAP_NET_RAW,))
        src = make_random_image(self.path("src.img"), 16 * MiB, seed=16)
        run(["nbdcopy", src, "nbd://127.0.0.1:%d/d" % port], timeout=120)
        run(["cmp", src, img])
        d.stop()

    @unittest.skipUnless(os.path.exists("/dev/fuse") and harness.have("fusermount3"), "needs /dev/fuse")
    def test_fuse_as_root_bounded_to_cap_sys_admin(self):
        """What the fuse.conf drop-in grants: root, but no capability except
        CAP_SYS_ADMIN (no CAP_DAC_OVERRIDE: the image is root's own)."""
        os.chown(self.tmp, 0, 0)
        img = make_random_image(self.path("disk.img"), 4 * MiB, seed=6)
        mnt = self.path("mnt")
        os.mkdir(mnt)
        prefix = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all,+sys_admin"]
        d = self.start_daemon(["--listen", "127.0.0.1:%d" % free_port(), "--data-dir", self.data,
                               "--export", "disk=file://" + img, "--fuse-mount", mnt], prefix=prefix)
        self.addCleanup(subprocess.run, ["fusermount3", "-u", "-z", mnt], capture_output=True)
        st = proc_status(d.pid)
        for field in ("CapPrm", "CapEff", "CapBnd"):
            self.assertEqual(st[field], "%016x" % cap_mask(CAP_SYS_ADMIN), field)
        harness.wait_until(lambda: os.path.exists(os.path.join(mnt, "disk")), 10, what="the FUSE file")
        with open(os.path.join(mnt, "disk"), "rb") as a, open(img, "rb") as b:
            self.assertEqual(a.read(), b.read())
        d.stop()


def unit_properties(*texts):
    """{key: value} of the [Service] section of a unit and its drop-ins, in
    order: a later assignment replaces an earlier one, except the list
    settings systemd merges (an empty assignment resets them)."""
    merged_lists = {"SystemCallFilter", "RestrictAddressFamilies", "DeviceAllow", "ReadWritePaths"}
    props = {}
    for text in texts:
        section = None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]":
                continue
            key, value = line.split("=", 1)
            if key in merged_lists and value and key in props and props[key]:
                props[key] = props[key] + " " + value
            else:
                props[key] = value
    return props


def read(path):
    with open(path) as f:
        return f.read()


@unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze missing")
class PackagedUnit(unittest.TestCase):
    def exposure(self, *texts):
        """systemd-analyze's overall exposure of the unit made of texts."""
        d = tempfile.mkdtemp(prefix="bw-unit-")
        self.addCleanup(shutil.rmtree, d, ignore_errors=True)
        path = os.path.join(d, "blockwayd.service")
        with open(path, "w") as f:
            f.write("\n".join(texts))
        p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", path],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for blockwayd.service: (\d+\.\d+)", p.stdout)
        if not m and "offline" in p.stderr:
            self.skipTest("this systemd-analyze has no --offline")
        self.assertTrue(m, p.stdout + p.stderr)
        return float(m.group(1)), p.stdout

    def test_exposure_score_is_within_the_bound(self):
        score, report = self.exposure(read(UNIT))
        print("packaged unit exposure: %.1f" % score, file=sys.stderr)
        self.assertLessEqual(score, EXPOSURE_BOUND, report)
        # Every capability is gone, not only the dangerous ones.
        self.assertNotRegex(report, r"(?m)^✗ CapabilityBoundingSet=")
        self.assertNotRegex(report, r"(?m)^✗ (User=|NoNewPrivileges=|ProtectSystem=|PrivateTmp=)")

    def test_sandbox_and_capability_properties(self):
        p = unit_properties(read(UNIT))
        expected = {"User": "blockway", "Group": "blockway", "CapabilityBoundingSet": "",
                    "AmbientCapabilities": "", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                    "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                    "StateDirectory": "blockway", "CacheDirectory": "blockway", "RuntimeDirectory": "blockway",
                    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}
        for key, value in expected.items():
            self.assertEqual(p.get(key), value, key)
        # ProtectSystem=strict leaves writable only what the unit names.
        self.assertNotIn("ReadWritePaths", p)

    def test_each_drop_in_adds_exactly_its_capability(self):
        base = read(UNIT)
        expected = {"aoe.conf": "CAP_NET_RAW", "low-port.conf": "CAP_NET_BIND_SERVICE",
                    "fuse.conf": "CAP_SYS_ADMIN", "images.conf": ""}
        self.assertEqual(sorted(os.listdir(DROPINS)), sorted(expected))
        base_score, _ = self.exposure(base)
        for name, cap in expected.items():
            dropin = read(os.path.join(DROPINS, name))
            p = unit_properties(base, dropin)
            self.assertEqual(p["CapabilityBoundingSet"], cap, name)
            self.assertEqual(p["AmbientCapabilities"], cap if name != "fuse.conf" else "", name)
            score, report = self.exposure(base, dropin)
            print("with %s: exposure %.1f" % (name, score), file=sys.stderr)
            self.assertGreaterEqual(score, base_score, name)
        self.assertIn("AF_PACKET", unit_properties(base, read(os.path.join(DROPINS, "aoe.conf")))
                      ["RestrictAddressFamilies"])
        fuse = unit_properties(base, read(os.path.join(DROPINS, "fuse.conf")))
        self.assertEqual((fuse["User"], fuse["ProtectSystem"], fuse["PrivateMounts"]), ("root", "no", "no"))
        self.assertIn("/dev/fuse", fuse["DeviceAllow"])
        self.assertIn("@mount", fuse["SystemCallFilter"])

    @unittest.skipUnless(shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles"),
                         "systemd-sysusers or systemd-tmpfiles missing")
    def test_sysusers_and_tmpfiles_make_the_user_and_its_directories(self):
        root = tempfile.mkdtemp(prefix="bw-root-")
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        for d in ("etc", "var/lib", "var/cache", "run"):
            os.makedirs(os.path.join(root, d))
        run(["systemd-sysusers", "--root=" + root, os.path.join(REPO, "packaging", "blockway.sysusers")])
        entry = [l for l in read(os.path.join(root, "etc/passwd")).splitlines() if l.startswith("blockway:")]
        self.assertEqual(len(entry), 1, read(os.path.join(root, "etc/passwd")))
        name, _, uid, gid, _, home, shell = entry[0].split(":")
        self.assertLess(int(uid), 1000, "not a system user")
        self.assertEqual((home, shell), ("/var/lib/blockway", "/usr/sbin/nologin"))
        run(["systemd-tmpfiles", "--root=" + root, "--create", os.path.join(REPO, "packaging", "blockway.tmpfiles")])
        for d in ("var/lib/blockway", "var/cache/blockway", "run/blockway"):
            st = os.stat(os.path.join(root, d))
            self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o7777), (int(uid), int(gid), 0o750), d)


if __name__ == "__main__":
    unittest.main()
