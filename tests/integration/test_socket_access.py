#!/usr/bin/env python3
"""NBD Unix sockets with socket-mode, socket-user and socket-group (issue
14): `stat` shows the mode and owner asked for; a real client (nbdinfo over
nbd+unix://) run by setpriv as another uid is refused by the mode and let in
through the group or as the owner; the settings from a TOML file; a
supplementary group of the client's process matched by allow=group:
(SO_PEERGROUPS); bad values refused at start with a clear error.

The other identities are a uid and gids that no account uses (the machine's
/etc/passwd and /etc/group are left alone), plus nobody/nogroup.
"""

import os
import stat
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import BLOCKWAYD, MiB  # noqa: E402

UID = 64123  # no account has these
GID = 64124
OTHER_GID = 64125


def as_user(uid, gid, groups=()):
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % gid,
            "--groups=" + ",".join(str(g) for g in groups) if groups else "--clear-groups"]


class SocketAccessTest(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        os.chmod(self.tmp, 0o755)  # other uids must reach the socket's directory
        self.img = harness.make_random_image(self.path("a.img"), 1 * MiB, seed=3)
        self.sock = self.path("nbd.sock")

    def start(self, extra, exports=None):
        args = ["--log-level", "debug", "--listen", "unix:" + self.sock, "--control-socket", "off"]
        for name, spec in (exports or {"a": ""}).items():
            args += ["--export", "%s=file://%s%s" % (name, self.img, "," + spec if spec else "")]
        return self.start_daemon(args + list(extra))

    def opens(self, prefix=(), export="a"):
        p = harness.run(list(prefix) + ["nbdinfo", "nbd+unix:///%s?socket=%s" % (export, self.sock)],
                        timeout=30, check=False)
        return p.returncode == 0

    def test_mode_and_group(self):
        self.start(["--socket-mode", "0660", "--socket-group", str(GID)])
        st = os.lstat(self.sock)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), (0o660, 0, GID))
        self.assertTrue(self.opens())
        self.assertFalse(self.opens(as_user(UID, OTHER_GID)), "the mode keeps other users out")
        self.assertTrue(self.opens(as_user(UID, OTHER_GID, [GID])), "a supplementary group lets its members in")
        self.assertTrue(self.opens(as_user(UID, GID)), "so does the primary group")

    def test_group_alone_means_0660_and_owner(self):
        self.start(["--socket-group", "nogroup", "--socket-user", str(UID)])
        st = os.lstat(self.sock)
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), (0o660, UID, 65534))
        self.assertTrue(self.opens(as_user(UID, OTHER_GID)), "the owner")
        self.assertTrue(self.opens(as_user(UID + 1, 65534)), "the group")
        self.assertFalse(self.opens(as_user(UID + 1, OTHER_GID)))

    def test_owner_only(self):
        self.start(["--socket-mode", "600", "--socket-user", str(UID)])
        st = os.lstat(self.sock)
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid), (0o600, UID))
        self.assertTrue(self.opens(as_user(UID, OTHER_GID)))
        self.assertFalse(self.opens(as_user(UID + 1, OTHER_GID, [GID])))

    def test_from_config_file_with_supplementary_group_rule(self):
        conf = self.path("bw.toml")
        with open(conf, "w") as f:
            f.write('listen = ["unix:%s"]\nsocket-mode = 0o666\nsocket-user = "nobody"\nsocket-group = "%d"\n'
                    '[[export]]\nname = "a"\nuri = "file://%s"\nallow = ["group:%d"]\n'
                    % (self.sock, GID, self.img, OTHER_GID))
        self.start_daemon(["--config", conf, "--control-socket", "off"])
        st = os.lstat(self.sock)
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), (0o666, 65534, GID))
        # allow=group: sees the client process's own supplementary groups.
        self.assertTrue(self.opens(as_user(UID, GID, [OTHER_GID])))
        self.assertFalse(self.opens(as_user(UID, GID, [GID])))
        self.assertFalse(self.opens())  # root is not in the group either

    def refused(self, args, needle, conf=None):
        cmd = [BLOCKWAYD, "--export", "a=file://" + self.img, "--control-socket", "off"] + list(args)
        if conf is not None:
            path = self.path("bad.toml")
            with open(path, "w") as f:
                f.write(conf)
            cmd += ["--config", path]
        p = harness.run(cmd, timeout=30, check=False)
        out = p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")
        self.assertEqual(p.returncode, 2, "%s:\n%s" % (args, out))
        self.assertIn(needle, out)
        self.assertFalse(os.path.exists(self.sock), "nothing was bound")

    def test_bad_values_refused(self):
        unix = ["--listen", "unix:" + self.sock]
        for mode in ("999", "rw", "01777", "", "-1"):
            self.refused(unix + ["--socket-mode", mode], "--socket-mode '%s' is not a file mode" % mode)
        self.refused(unix + ["--socket-user", "no-such-user-here"], "--socket-user 'no-such-user-here': no such user")
        self.refused(unix + ["--socket-group", "no-such-group"], "--socket-group 'no-such-group': no such group")
        self.refused(["--listen", "127.0.0.1:%d" % harness.free_port(), "--socket-mode", "0600"],
                     "apply to Unix listeners, and none is configured")
        self.refused(unix, "socket-mode 4096 is not a file mode", conf="socket-mode = 0o10000\n")
        self.refused(unix, "socket-mode 'u+rw' is not a file mode", conf='socket-mode = "u+rw"\n')
        self.refused(unix, "socket-group 'nosuch': no such group", conf='socket-group = "nosuch"\n')


if __name__ == "__main__":
    unittest.main()
