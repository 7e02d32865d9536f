"""The Debian package: built by CPack from the build tree under test, it holds
the binaries, the sample configuration as a conffile, the systemd unit and
the docs, declares its library dependencies, and what it installs runs: the
packaged daemon starts on the packaged configuration and serves an export.

The package is extracted into a temporary root (dpkg-deb -x), not installed:
a test must not change the machine it runs on.
"""

import gzip
import os
import re
import shutil
import subprocess
import unittest

from harness import BLOCKWAYD, Daemon, DaemonTestCase, free_port, make_random_image, run as run_bytes, MiB


BUILD_DIR = os.path.dirname(os.path.abspath(BLOCKWAYD))


def run(cmd, **kw):
    """harness.run with the output as text."""
    p = run_bytes(cmd, **kw)
    p.stdout = p.stdout.decode(errors="replace")
    p.stderr = p.stderr.decode(errors="replace")
    return p


class DebianPackage(DaemonTestCase):
    @classmethod
    def setUpClass(cls):
        if not shutil.which("cpack") or not shutil.which("dpkg-deb"):
            raise unittest.SkipTest("cpack or dpkg-deb missing")
        if not os.path.exists(os.path.join(BUILD_DIR, "CPackConfig.cmake")):
            raise unittest.SkipTest("no CPackConfig.cmake in %s" % BUILD_DIR)
        import tempfile
        cls.out = tempfile.mkdtemp(prefix="bw-pkg-", dir="/tmp")
        # Its own output and staging directory: parallel builds of the package
        # (release and sanitizer trees) never share one.
        r = run(["cpack", "--config", os.path.join(BUILD_DIR, "CPackConfig.cmake"), "-G", "DEB",
                 "-B", cls.out], timeout=600, cwd=BUILD_DIR)
        debs = [f for f in os.listdir(cls.out) if f.endswith(".deb")]
        assert len(debs) == 1, "cpack made %r:\n%s" % (debs, r.stdout)
        cls.deb = os.path.join(cls.out, debs[0])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.out, ignore_errors=True)

    def field(self, name):
        return run(["dpkg-deb", "-f", self.deb, name]).stdout.strip()

    def test_control_fields_and_dependencies(self):
        self.assertEqual(self.field("Package"), "blockway")
        self.assertRegex(self.field("Version"), r"^\d+\.\d+\.\d+")
        depends = self.field("Depends")
        for lib in ("libnbd0", "libsqlite3-0", "libstdc++6"):
            self.assertIn(lib, depends, "dpkg-shlibdeps did not list %s" % lib)
        conffiles = run(["dpkg-deb", "-I", self.deb, "conffiles"]).stdout.split()
        self.assertEqual(conffiles, ["/etc/blockway/blockwayd.toml"],
                         "the configuration must be a conffile, or upgrades overwrite the operator's edits")

    def test_contents(self):
        listing = run(["dpkg-deb", "-c", self.deb]).stdout
        for path in ("./usr/sbin/blockwayd", "./usr/bin/blockway", "./etc/blockway/blockwayd.toml",
                     "./lib/systemd/system/blockwayd.service", "./usr/share/doc/blockway/README.md",
                     "./usr/share/bash-completion/completions/blockway",
                     "./lib/systemd/system/blockwayd.socket", "./usr/share/man/man8/blockwayd.8.gz",
                     "./usr/share/man/man5/blockwayd.toml.5.gz", "./usr/share/man/man1/blockway.1.gz"):
            self.assertIn(path, listing)
        for script in ("postinst", "prerm", "postrm"):
            body = run(["dpkg-deb", "-I", self.deb, script]).stdout
            self.assertTrue(body.startswith("#!/bin/sh"), script)
            self.assertEqual(subprocess.run(["sh", "-n"], input=body, text=True).returncode, 0,
                             "%s is not valid sh" % script)
        # Purge must not delete caches: they may hold data the remote lacks.
        postrm = run(["dpkg-deb", "-I", self.deb, "postrm"]).stdout
        self.assertNotIn("rm -rf", postrm)

    def test_unit_points_at_the_installed_paths(self):
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        with open(os.path.join(root, "lib/systemd/system/blockwayd.service")) as f:
            unit = f.read()
        self.assertIn("ExecStart=/usr/sbin/blockwayd --config /etc/blockway/blockwayd.toml", unit)
        self.verify_unit(root, "blockwayd.service")

    def verify_unit(self, root, unit):
        if shutil.which("systemd-analyze"):
            r = subprocess.run(["systemd-analyze", "verify", "--root=" + root, unit], capture_output=True, text=True)
            self.assertNotIn("bad-setting", r.stderr)

    def test_socket_unit_matches_the_packaged_listeners(self):
        """Each ListenStream= of blockwayd.socket must be a listen address of
        the packaged configuration, or the daemon refuses to start."""
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        with open(os.path.join(root, "lib/systemd/system/blockwayd.socket")) as f:
            streams = re.findall(r"(?m)^ListenStream=(.+)$", f.read())
        with open(os.path.join(root, "etc/blockway/blockwayd.toml")) as f:
            listen = re.search(r"(?m)^listen = \[(.*)\]", f.read()).group(1)
        configured = re.findall(r'"([^"]+)"', listen)
        self.assertTrue(streams)
        for s in streams:
            self.assertIn("unix:" + s if s.startswith("/") else s, configured)
        with open(os.path.join(root, "lib/systemd/system/blockwayd.service")) as f:
            unit = f.read()
        self.assertIn("Type=notify", unit)
        self.assertIn("WatchdogSec=", unit)
        self.verify_unit(root, "blockwayd.socket")

    def test_man_pages_render_without_warnings(self):
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        pages = {"blockwayd": "usr/share/man/man8/blockwayd.8.gz",
                 "blockwayd.toml": "usr/share/man/man5/blockwayd.toml.5.gz",
                 "blockway": "usr/share/man/man1/blockway.1.gz"}
        text = {}
        for name, rel in pages.items():
            page = os.path.join(root, rel)
            with gzip.open(page, "rt") as f:
                source = f.read()
            g = subprocess.run(["groff", "-ww", "-z", "-man", "-Tutf8"], input=source, capture_output=True,
                               text=True)
            self.assertEqual((g.returncode, g.stderr), (0, ""), "groff warns about " + rel)
            m = subprocess.run(["man", "--warnings=w", "-l", page], capture_output=True, text=True,
                               env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0", LANG="C.UTF-8"))
            self.assertEqual((m.returncode, m.stderr), (0, ""), "man -l " + rel)
            text[name] = re.sub(r".\x08", "", m.stdout)  # no overstrike (bold, underline)
            self.assertIn("\nNAME\n", text[name])
        # Generated from the same tables as --help: every flag is documented.
        help_text = run([os.path.join(root, "usr/sbin/blockwayd"), "--help"]).stdout
        flags = re.findall(r"(?m)^  (--[a-z-]+)", help_text)
        self.assertIn("--log-format", flags)
        for flag in flags:
            self.assertIn(flag, text["blockwayd"])
            self.assertIn(flag, text["blockwayd.toml"])
        for cmd in ("prefetch start|pause|resume|status NAME", "detach NAME [--force]"):
            self.assertIn(cmd, text["blockway"])
        for section in ("SYSTEMD", "SOCKET ACTIVATION", "LOGGING", "EXIT STATUS", "EXPORT OPTIONS"):
            self.assertIn(section, text["blockwayd"])

    def test_packaged_daemon_serves_with_the_packaged_config(self):
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        blockwayd = os.path.join(root, "usr/sbin/blockwayd")
        blockway = os.path.join(root, "usr/bin/blockway")
        self.assertIn("blockway", run([blockway, "--version"]).stdout.lower())
        img = self.path("disk.img")
        make_random_image(img, 4 * MiB, seed=9)
        port = free_port()
        d = Daemon(self.tmp, [])
        d.args = [blockwayd, "--config", os.path.join(root, "etc/blockway/blockwayd.toml"),
                  "--listen", "127.0.0.1:%d" % port, "--data-dir", self.path("data"),
                  "--export", "disk=file://" + img, "--pid-file", d.pid_file]
        self.addCleanup(d.cleanup)
        d.start()
        out = self.path("copy.img")
        run(["nbdcopy", "nbd://127.0.0.1:%d/disk" % port, out], timeout=60)
        with open(img, "rb") as a, open(out, "rb") as b:
            self.assertEqual(a.read(), b.read())
        d.stop()


if __name__ == "__main__":
    unittest.main()
