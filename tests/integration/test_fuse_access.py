#!/usr/bin/env python3
"""Who may see and open an export's file in the FUSE mount (issue 14):
fuse-uid=, fuse-gid= and fuse-mode= per export give the file its owner and
mode, which the kernel enforces (default_permissions) for callers run as
other uids by setpriv on a mount with allow-other; an export's allow= user:
and group: rules hide its file from everyone else (ENOENT on lookup, left
out of readdir), the caller's supplementary groups counting; the rules
changed at run time with `blockway access` apply at once and after a
restart; bad values refused at start. The owner, group and mode change at
run time too (`blockway access NAME --fuse-uid/--fuse-gid/--fuse-mode`):
stat shows them right after the command although the kernel had the old
ones cached, opens follow them, they survive a restart with the same
configuration and give way to a changed one, bad values change nothing,
a clone's snapshot files follow the clone, and a daemon without a FUSE
mount takes them for its next mount.

The other identities are a uid and gids that no account uses (the machine's
/etc/passwd and /etc/group are left alone).
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import BLOCKWAY, BLOCKWAYD, MiB  # noqa: E402
from test_fuse import FuseTestCase  # noqa: E402

UID = 64131  # no account has these
OTHER_UID = 64132
GID = 64133
OTHER_GID = 64134

# Run as the other user: what it sees in the mount and what each file does.
PROBE = r"""
import json, os, sys
mnt = sys.argv[1]
out = {"list": sorted(os.listdir(mnt)), "read": {}, "write": {}}
for name in sys.argv[2:]:
    for what, flags in (("read", os.O_RDONLY), ("write", os.O_WRONLY)):
        try:
            fd = os.open(os.path.join(mnt, name), flags)
            try:
                if what == "read":
                    os.pread(fd, 4096, 0)
            finally:
                os.close(fd)
            out[what][name] = 0
        except OSError as e:
            out[what][name] = e.errno
print(json.dumps(out))
"""


# Run as the other user: the whole file's sha256, or the errno of the open.
READ = r"""
import hashlib, json, sys
try:
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    print(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))
except OSError as e:
    print(json.dumps({"errno": e.errno}))
"""


def as_user(uid, gid, groups=()):
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % gid,
            "--groups=" + ",".join(str(g) for g in groups) if groups else "--clear-groups"]


class FuseAccessTest(FuseTestCase):
    def setUp(self):
        super().setUp()
        os.chmod(self.tmp, 0o755)  # other uids must reach the mount point
        self.img = harness.make_random_image(self.path("a.img"), 1 * MiB, seed=5)
        self.csock = self.path("control.sock")

    def start(self, exports):
        return self.fuse_daemon({n: "file://%s%s" % (self.img, "," + o if o else "") for n, o in exports.items()},
                                fuse_opts="allow-other",
                                extra=["--control-socket", self.csock, "--data-dir", self.path("data")])

    def probe(self, prefix, *names):
        p = harness.run(list(prefix) + [sys.executable, "-c", PROBE, self.mnt] + list(names), timeout=30)
        return json.loads(p.stdout)

    def bw(self, *args):
        harness.run([BLOCKWAY, "--socket", self.csock] + list(args), timeout=30)

    def test_owner_and_mode_enforced_by_the_kernel(self):
        self.start({"mine": "fuse-uid=%d,fuse-gid=%d,fuse-mode=0640" % (UID, GID),
                    "named": "fuse-uid=nobody,fuse-gid=nogroup,fuse-mode=600",
                    "ro": "read-only,fuse-mode=0666", "plain": ""})
        st = os.stat(self.file("mine"))
        self.assertEqual((st.st_mode & 0o7777, st.st_uid, st.st_gid), (0o640, UID, GID))
        st = os.stat(self.file("named"))
        self.assertEqual((st.st_mode & 0o7777, st.st_uid, st.st_gid), (0o600, 65534, 65534))
        self.assertEqual(os.stat(self.file("ro")).st_mode & 0o7777, 0o444)
        st = os.stat(self.file("plain"))  # the mount's defaults: the daemon's user, 0644
        self.assertEqual((st.st_mode & 0o7777, st.st_uid), (0o644, 0))
        files = ("mine", "named", "ro", "plain")
        owner = self.probe(as_user(UID, OTHER_GID), *files)
        self.assertEqual(owner["list"], sorted(files), "no allow= rules: everyone sees every file")
        self.assertEqual(owner["read"], {"mine": 0, "named": errno.EACCES, "ro": 0, "plain": 0})
        self.assertEqual(owner["write"], {"mine": 0, "named": errno.EACCES, "ro": errno.EACCES,
                                          "plain": errno.EACCES})
        group = self.probe(as_user(OTHER_UID, OTHER_GID, [GID]), "mine")
        self.assertEqual((group["read"]["mine"], group["write"]["mine"]), (0, errno.EACCES))
        other = self.probe(as_user(OTHER_UID, OTHER_GID), "mine")
        self.assertEqual((other["read"]["mine"], other["write"]["mine"]), (errno.EACCES, errno.EACCES))
        nobody = self.probe(as_user(65534, 65534), "named")
        self.assertEqual((nobody["read"]["named"], nobody["write"]["named"]), (0, 0))

    def test_allow_rules_hide_the_file(self):
        d = self.start({"u": "allow=user:%d" % UID, "g": "allow=group:%d 127.0.0.1" % GID,
                        "net": "allow=127.0.0.1", "open": "fuse-mode=0666"})
        everything = ["g", "net", "open", "u"]
        self.assertEqual(sorted(os.listdir(self.mnt)), everything, "root sees every file")
        user = self.probe(as_user(UID, OTHER_GID), *everything)
        self.assertEqual(user["list"], ["net", "open", "u"])
        self.assertEqual(user["read"], {"u": 0, "g": errno.ENOENT, "net": 0, "open": 0})
        member = self.probe(as_user(OTHER_UID, OTHER_GID, [GID]), "u", "g")
        self.assertEqual(member["list"], ["g", "net", "open"], "a supplementary group counts")
        self.assertEqual(member["read"], {"u": errno.ENOENT, "g": 0})
        primary = self.probe(as_user(OTHER_UID, GID), "g")
        self.assertEqual(primary["read"], {"g": 0})
        stranger = self.probe(as_user(OTHER_UID, OTHER_GID), "u", "g")
        self.assertEqual(stranger["list"], ["net", "open"])
        self.assertEqual(stranger["read"], {"u": errno.ENOENT, "g": errno.ENOENT})
        # The kernel's caches are shared: a file one user just looked up
        # stays hidden from the next one.
        self.assertEqual(self.probe(as_user(UID, OTHER_GID), "u")["read"]["u"], 0)
        self.assertEqual(self.probe(as_user(OTHER_UID, OTHER_GID), "u")["read"]["u"], errno.ENOENT)

        # Changed at run time: at once, and kept over a restart.
        self.bw("access", "u", "--allow", "user:%d" % OTHER_UID)
        self.assertEqual(self.probe(as_user(UID, OTHER_GID), "u")["read"]["u"], errno.ENOENT)
        self.assertEqual(self.probe(as_user(OTHER_UID, OTHER_GID), "u")["read"]["u"], 0)
        d.stop()
        self.start({"u": "allow=user:%d" % UID, "g": "allow=group:%d 127.0.0.1" % GID,
                    "net": "allow=127.0.0.1", "open": "fuse-mode=0666"})
        self.assertEqual(self.probe(as_user(OTHER_UID, OTHER_GID), "u")["read"]["u"], 0)
        self.assertEqual(self.probe(as_user(UID, OTHER_GID), "u")["list"], ["net", "open"])

    # ------------------------------------------------ owner and mode at run time

    def read_as(self, prefix, name):
        p = harness.run(list(prefix) + [sys.executable, "-c", READ, self.file(name)], timeout=60)
        return json.loads(p.stdout)

    def attrs(self, name):
        st = os.stat(self.file(name))
        return (st.st_mode & 0o7777, st.st_uid, st.st_gid)

    def bw_run(self, *args):
        return subprocess.run([BLOCKWAY, "--socket", self.csock] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)

    def image_digest(self):
        with open(self.img, "rb") as f:
            return {"sha256": hashlib.sha256(f.read()).hexdigest(), "size": MiB}

    def test_owner_and_mode_changed_at_run_time(self):
        spec = {"disk": "fuse-uid=0,fuse-gid=0,fuse-mode=0600", "plain": ""}
        d = self.start(spec)
        user = as_user(UID, OTHER_GID)
        denied = {"errno": errno.EACCES}
        self.assertEqual(self.attrs("disk"), (0o600, 0, 0))
        self.assertEqual(self.read_as(user, "disk"), denied)
        # The kernel holds the attributes it was just given (for a second):
        # the change must reach it before the command returns.
        out = self.bw_run("access", "disk", "--fuse-uid", str(UID), "--fuse-mode", "0600")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(self.attrs("disk"), (0o600, UID, 0), "stat right after the command")
        self.assertEqual(self.read_as(user, "disk"), self.image_digest())
        self.assertIn("FUSE file: fuse-uid %d, fuse-gid 0, fuse-mode 0600 (shown as owner %d, group 0, mode 0600 in %s)"
                      % (UID, UID, self.mnt), out.stdout.decode())
        report = json.loads(self.bw_run("access", "disk", "--json").stdout)
        self.assertEqual((report["fuse_uid"], report["fuse_gid"], report["fuse_mode"]), (UID, 0, "0600"))
        self.assertEqual(report["fuse"], {"mountpoint": self.mnt, "uid": UID, "gid": 0, "mode": "0600"})
        plain = json.loads(self.bw_run("access", "plain", "--json").stdout)
        self.assertEqual((plain["fuse_uid"], plain["fuse_mode"], plain["fuse"]["mode"]), (None, None, "0644"))
        self.assertIn("fuse-uid the mount's", self.bw_run("access", "plain").stdout.decode())

        # Back to root: the user is refused again at once.
        self.assertEqual(self.read_as(user, "disk"), self.image_digest())  # cached as readable by it
        self.bw("access", "disk", "--fuse-uid", "0")
        self.assertEqual(self.attrs("disk"), (0o600, 0, 0))
        self.assertEqual(self.read_as(user, "disk"), denied)

        # A group by name; a member reads, a stranger does not.
        self.bw("access", "disk", "--fuse-gid", "nogroup", "--fuse-mode", "640")
        self.assertEqual(self.attrs("disk"), (0o640, 0, 65534))
        self.assertEqual(self.read_as(as_user(OTHER_UID, OTHER_GID, [65534]), "disk"), self.image_digest())
        self.assertEqual(self.read_as(as_user(OTHER_UID, OTHER_GID), "disk"), denied)
        # "" gives the mount's value back (mode=0644 by default): everyone reads.
        self.bw("access", "disk", "--fuse-mode", "")
        self.assertEqual(self.attrs("disk"), (0o644, 0, 65534))
        self.assertEqual(self.read_as(as_user(OTHER_UID, OTHER_GID), "disk"), self.image_digest())

        # Kept over a restart with the same configuration.
        self.bw("access", "disk", "--fuse-uid", str(UID), "--fuse-mode", "0600")
        d.stop()
        d = self.start(spec)
        self.assertEqual(self.attrs("disk"), (0o600, UID, 65534))
        self.assertEqual(self.read_as(user, "disk"), self.image_digest())
        self.assertIn("set at run time", d.log())
        # A configuration that says something else now wins, and the saved
        # change is forgotten.
        d.stop()
        d = self.start(dict(spec, disk="fuse-uid=0,fuse-gid=0,fuse-mode=0640"))
        self.assertEqual(self.attrs("disk"), (0o640, 0, 0))
        self.assertEqual(self.read_as(user, "disk"), denied)
        self.assertIn("the configuration's FUSE owner and mode changed", d.log())
        d.stop()
        self.start(dict(spec, disk="fuse-uid=0,fuse-gid=0,fuse-mode=0640"))
        self.assertEqual(self.attrs("disk"), (0o640, 0, 0))

    def test_export_added_at_run_time_keeps_its_change(self):
        d = self.start({"plain": ""})
        self.bw("export", "add", "late", "file://" + self.img, "fuse-gid=nogroup")
        harness.wait_until(lambda: "late" in os.listdir(self.mnt), 10, what="late in the mount")
        self.assertEqual(self.attrs("late"), (0o644, 0, 65534))
        self.bw("access", "late", "--fuse-uid", str(UID), "--fuse-mode", "0600")
        self.assertEqual(self.attrs("late"), (0o600, UID, 65534))
        self.bw("access", "late", "--fuse-gid", "")  # the mount's again: the saved option goes
        self.assertEqual(self.attrs("late"), (0o600, UID, 0))
        self.assertEqual(self.read_as(as_user(UID, OTHER_GID), "late"), self.image_digest())
        d.stop()
        self.start({"plain": ""})
        self.assertEqual(self.attrs("late"), (0o600, UID, 0))
        self.assertEqual(self.read_as(as_user(OTHER_UID, OTHER_GID), "late"), {"errno": errno.EACCES})

    def test_bad_run_time_values_change_nothing(self):
        self.start({"disk": "fuse-mode=0600"})
        for args, needle in ((["--fuse-uid", "no-such-user-here"],
                              "export 'disk': option fuse-uid='no-such-user-here': no such user"),
                             (["--fuse-gid", "no-such-group"], "export 'disk': option fuse-gid='no-such-group': no such group"),
                             (["--fuse-mode", "0999"], "export 'disk': option fuse-mode"),
                             (["--fuse-mode", "01777"], "export 'disk': option fuse-mode"),
                             (["--fuse-mode", "rw"], "export 'disk': option fuse-mode"),
                             # one bad value: the good one is not taken either
                             (["--fuse-uid", str(UID), "--fuse-mode", "0800"], "export 'disk': option fuse-mode"),
                             (["--fuse-uid", str(UID), "--allow", "user:no-such-user-here"], "no-such-user-here")):
            p = self.bw_run("access", "disk", *args)
            self.assertEqual(p.returncode, 2, (args, p.stdout, p.stderr))
            self.assertIn(needle, p.stderr.decode(), args)
            self.assertEqual(self.attrs("disk"), (0o600, 0, 0), args)
        p = self.bw_run("access", "nothing-here", "--fuse-uid", "0")
        self.assertEqual(p.returncode, 4, p.stderr)
        self.assertIn("no export named 'nothing-here'", p.stderr.decode())
        p = self.bw_run("access", "disk", "--fuse-uid")
        self.assertEqual(p.returncode, 2, p.stderr)
        help_text = self.bw_run("access", "--help").stdout.decode()
        for option in ("--fuse-uid", "--fuse-gid", "--fuse-mode"):
            self.assertIn(option, help_text)

    def test_without_a_fuse_mount(self):
        conf = self.path("blockway.toml")
        with open(conf, "w") as f:
            f.write("[fuse]\nallow-other = true\n")  # options for a run-time mount; none made at start
        self.start_daemon(["--config", conf, "--listen", "127.0.0.1:%d" % harness.free_port(),
                           "--control-socket", self.csock, "--data-dir", self.path("data"),
                           "--export", "disk=file://" + self.img])
        p = self.bw_run("access", "disk", "--fuse-uid", str(UID), "--fuse-mode", "0400")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("no FUSE mount now: the file gets these when one is made", p.stdout.decode())
        report = json.loads(self.bw_run("access", "disk", "--json").stdout)
        self.assertEqual(report["fuse"], {"mountpoint": "", "uid": UID, "gid": 0, "mode": "0400"})
        self.bw("mount", self.mnt)
        self.addCleanup(lambda: self.bw_run("unmount"))
        self.assertEqual(self.attrs("disk"), (0o400, UID, 0))
        self.assertEqual(self.read_as(as_user(UID, OTHER_GID), "disk"), self.image_digest())

    def test_snapshot_files_follow_the_clone(self):
        overlays = self.path("overlays")
        exports = {"golden": "file://" + self.img, "vm1": "clone:golden,overlay=%s,fuse-mode=0600" % overlays}
        d = self.fuse_daemon(exports, fuse_opts="allow-other",
                             extra=["--control-socket", self.csock, "--data-dir", self.path("data")])
        self.bw("snapshot", "create", "vm1", "s1")
        harness.wait_until(lambda: "vm1@s1" in os.listdir(self.mnt), 10, what="vm1@s1 in the mount")
        self.assertEqual(self.attrs("vm1@s1"), (0o400, 0, 0))  # read-only: & 0444
        user = as_user(UID, OTHER_GID)
        self.assertEqual(self.read_as(user, "vm1@s1"), {"errno": errno.EACCES})
        self.bw("access", "vm1", "--fuse-uid", str(UID))
        self.assertEqual(self.attrs("vm1"), (0o600, UID, 0))
        self.assertEqual(self.attrs("vm1@s1"), (0o400, UID, 0))
        self.assertEqual(self.read_as(user, "vm1@s1"), self.image_digest())
        p = self.bw_run("access", "vm1@s1", "--fuse-uid", "0")
        self.assertEqual(p.returncode, 5, p.stderr)
        self.assertIn("export 'vm1@s1' is a snapshot of clone 'vm1': its FUSE file takes the clone's owner and mode",
                      p.stderr.decode())
        self.assertEqual(self.attrs("vm1@s1"), (0o400, UID, 0))
        d.stop()
        self.fuse_daemon(exports, fuse_opts="allow-other",
                         extra=["--control-socket", self.csock, "--data-dir", self.path("data")])
        harness.wait_until(lambda: "vm1@s1" in os.listdir(self.mnt), 10, what="vm1@s1 after the restart")
        self.assertEqual(self.attrs("vm1@s1"), (0o400, UID, 0))

    def test_bad_values_refused(self):
        for spec, needle in (("fuse-uid=no-such-user-here", "option fuse-uid='no-such-user-here': no such user"),
                             ("fuse-gid=no-such-group", "option fuse-gid='no-such-group': no such group"),
                             ("fuse-mode=0999", "fuse-mode"), ("fuse-mode=01777", "fuse-mode")):
            p = harness.run([BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                             "--export", "x=file://%s,%s" % (self.img, spec)], timeout=30, check=False)
            out = p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")
            self.assertEqual(p.returncode, 2, out)
            self.assertIn(needle, out)


if __name__ == "__main__":
    unittest.main()
