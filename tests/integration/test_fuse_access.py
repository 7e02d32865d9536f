#!/usr/bin/env python3
"""Who may see and open an export's file in the FUSE mount (issue 14):
fuse-uid=, fuse-gid= and fuse-mode= per export give the file its owner and
mode, which the kernel enforces (default_permissions) for callers run as
other uids by setpriv on a mount with allow-other; an export's allow= user:
and group: rules hide its file from everyone else (ENOENT on lookup, left
out of readdir), the caller's supplementary groups counting; the rules
changed at run time with `blockway access` apply at once and after a
restart; bad values refused at start.

The other identities are a uid and gids that no account uses (the machine's
/etc/passwd and /etc/group are left alone).
"""

import errno
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
