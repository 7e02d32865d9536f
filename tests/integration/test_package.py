"""The packages: the .deb and the .rpm, built by CPack from the build tree
under test. Each holds the binaries, the sample configuration as a conffile
(%config(noreplace) in the .rpm), the systemd unit and the docs, declares its
dependencies, and what it installs runs: the packaged daemon starts on the
packaged configuration and serves an export. The .rpm holds the same files
as the .deb (the unit in Fedora's directory) and follows the same rules.
The binaries are hardened (PIE, full RELRO, stack protector, _FORTIFY_SOURCE)
unless the tree was built with the sanitizers or -DBLOCKWAY_HARDENING=OFF.

Nothing is installed on the machine: the .deb is extracted into a temporary
root (dpkg-deb -x) and the .rpm installed into a scratch root with its own
database (rpm --root DIR -i --nodeps --noscripts: the Fedora libraries it
requires do not exist on Debian, and its scriptlets act on the real system).
"""

import gzip
import os
import re
import shutil
import subprocess
import tempfile
import unittest

from test_nbdkit_plugin import nbdkit_env
from harness import BLOCKWAYD, Daemon, DaemonTestCase, free_port, make_random_image, run as run_bytes, MiB


BUILD_DIR = os.path.dirname(os.path.abspath(BLOCKWAYD))
UNIT_DEB = "/lib/systemd/system/blockwayd.service"
UNIT_RPM = "/usr/lib/systemd/system/blockwayd.service"
DROPINS = tuple("/usr/share/doc/blockway/examples/blockwayd.service.d/" + n
                for n in ("aoe.conf", "fuse.conf", "images.conf", "low-port.conf"))


def run(cmd, **kw):
    """harness.run with the output as text."""
    p = run_bytes(cmd, **kw)
    p.stdout = p.stdout.decode(errors="replace")
    p.stderr = p.stderr.decode(errors="replace")
    return p


def build_package(generator, suffix, defines=()):
    """Runs cpack for one generator into a fresh directory: (dir, package).
    defines: cpack -D settings (BLOCKWAY_PACKAGE=nbdkit-plugin: the plugin's package)."""
    if not os.path.exists(os.path.join(BUILD_DIR, "CPackConfig.cmake")):
        raise unittest.SkipTest("no CPackConfig.cmake in %s" % BUILD_DIR)
    # Packages are made from the release tree only: a sanitizer tree's would
    # never ship, and packing its unoptimised binaries costs CI minutes
    # (over 2 of the ASan run's, for nothing the release run does not check).
    if cache_value("BLOCKWAY_SANITIZE") == "ON":
        raise unittest.SkipTest("packages are checked from the release build, not a sanitizer build")
    out = tempfile.mkdtemp(prefix="bw-pkg-", dir="/tmp")
    # Its own output and staging directory: parallel builds of the package
    # (release and sanitizer trees) never share one.
    r = run(["cpack", "--config", os.path.join(BUILD_DIR, "CPackConfig.cmake"), "-G", generator,
             "-B", out] + [a for d in defines for a in ("-D", d)], timeout=600, cwd=BUILD_DIR)
    made = [f for f in os.listdir(out) if f.endswith(suffix)]
    assert len(made) == 1, "cpack made %r:\n%s" % (made, r.stdout)
    return out, os.path.join(out, made[0])


def cache_value(name):
    with open(os.path.join(BUILD_DIR, "CMakeCache.txt")) as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split("=", 1)[1].strip()
    return ""


def deb_files(deb):
    """{path: (mode, type)} of the .deb's files, without its directories."""
    files = {}
    for line in run(["dpkg-deb", "-c", deb]).stdout.splitlines():
        perms, path = line.split()[0], line.split()[-1]
        if perms.startswith("d"):
            continue
        files[path.lstrip(".")] = perms
    return files


def serve_and_copy(test, blockwayd, config):
    """The packaged daemon, on the packaged configuration, serves an export
    that nbdcopy reads back byte for byte."""
    img = test.path("disk.img")
    make_random_image(img, 4 * MiB, seed=9)
    port = free_port()
    d = Daemon(test.tmp, [])
    d.args = [blockwayd, "--config", config, "--listen", "127.0.0.1:%d" % port,
              "--data-dir", test.path("data"), "--export", "disk=file://" + img, "--pid-file", d.pid_file]
    test.addCleanup(d.cleanup)
    d.start()
    out = test.path("copy.img")
    run(["nbdcopy", "nbd://127.0.0.1:%d/disk" % port, out], timeout=60)
    with open(img, "rb") as a, open(out, "rb") as b:
        test.assertEqual(a.read(), b.read())
    d.stop()


class DebianPackage(DaemonTestCase):
    @classmethod
    def setUpClass(cls):
        if not shutil.which("cpack") or not shutil.which("dpkg-deb"):
            raise unittest.SkipTest("cpack or dpkg-deb missing")
        cls.out, cls.deb = build_package("DEB", ".deb")

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
        files = deb_files(self.deb)
        for path in ("/usr/sbin/blockwayd", "/usr/bin/blockway", "/etc/blockway/blockwayd.toml",
                     UNIT_DEB, "/usr/share/doc/blockway/README.md",
                     "/usr/share/bash-completion/completions/blockway",
                     "/lib/systemd/system/blockwayd.socket", "/usr/share/man/man8/blockwayd.8.gz",
                     "/usr/share/man/man5/blockwayd.toml.5.gz", "/usr/share/man/man1/blockway.1.gz",
                     "/usr/lib/sysusers.d/blockway.conf", "/usr/lib/tmpfiles.d/blockway.conf") + DROPINS:
            self.assertIn(path, files)
        self.assertNotIn(UNIT_RPM, files, "the .deb's unit belongs in /lib (DEP17)")
        for script in ("postinst", "prerm", "postrm"):
            body = run(["dpkg-deb", "-I", self.deb, script]).stdout
            self.assertTrue(body.startswith("#!/bin/sh"), script)
            self.assertEqual(subprocess.run(["sh", "-n"], input=body, text=True).returncode, 0,
                             "%s is not valid sh" % script)
        # Purge must not delete caches: they may hold data the remote lacks.
        postrm = run(["dpkg-deb", "-I", self.deb, "postrm"]).stdout
        self.assertNotIn("rm -rf", postrm)
        # The unprivileged user the unit runs as, and its directories.
        postinst = run(["dpkg-deb", "-I", self.deb, "postinst"]).stdout
        self.assertIn("adduser --system --group --home /var/lib/blockway", postinst)
        self.assertIn("install -d -m 0750 -o blockway -g blockway /var/lib/blockway /var/cache/blockway", postinst)

    def test_packaged_unit_runs_unprivileged_in_a_sandbox(self):
        """The installed unit (test_least_privilege.py checks the source's in
        depth): the blockway user, no capability, exposure within the bound."""
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        with open(root + UNIT_DEB) as f:
            unit = f.read()
        lines = unit.splitlines()
        for line in ("User=blockway", "CapabilityBoundingSet=", "AmbientCapabilities=", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "PrivateTmp=yes"):
            self.assertIn(line, lines)
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", root + UNIT_DEB],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for blockwayd.service: (\d+\.\d+)", r.stdout)
        if m:
            self.assertLessEqual(float(m.group(1)), 2.0, r.stdout)
        with open(os.path.join(root, "usr/lib/sysusers.d/blockway.conf")) as f:
            self.assertRegex(f.read(), r"(?m)^u blockway - .* /var/lib/blockway /usr/sbin/nologin$")

    def test_unit_points_at_the_installed_paths(self):
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        with open(root + UNIT_DEB) as f:
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
        self.assertIn("blockway", run([os.path.join(root, "usr/bin/blockway"), "--version"]).stdout.lower())
        serve_and_copy(self, os.path.join(root, "usr/sbin/blockwayd"),
                       os.path.join(root, "etc/blockway/blockwayd.toml"))

    def test_binaries_are_hardened(self):
        # Hardened by blockway's own flags, or by a distribution's (scripts/package.sh).
        hardened = cache_value("BLOCKWAY_HARDENING") != "OFF" or "_FORTIFY_SOURCE" in cache_value("CMAKE_CXX_FLAGS")
        if cache_value("BLOCKWAY_SANITIZE") == "ON" or not hardened:
            self.skipTest("built with the sanitizers or without hardening")
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        for binary in ("usr/sbin/blockwayd", "usr/bin/blockway"):
            path = os.path.join(root, binary)
            header = run(["readelf", "-h", path]).stdout
            self.assertRegex(header, r"Type:\s+DYN", "%s is not PIE" % binary)
            dynamic = run(["readelf", "-d", path]).stdout
            self.assertRegex(dynamic, r"FLAGS_1\).*\bNOW\b.*\bPIE\b|FLAGS_1\).*\bPIE\b.*\bNOW\b",
                             "%s: no BIND_NOW/PIE flags" % binary)
            self.assertIn("GNU_RELRO", run(["readelf", "-l", path]).stdout, "%s: no RELRO" % binary)
            symbols = run(["readelf", "--dyn-syms", "-W", path]).stdout
            self.assertIn("__stack_chk_fail", symbols, "%s: no stack protector" % binary)
            self.assertRegex(symbols, r"__\w+_chk\b(?<!__stack_chk)", "%s: no _FORTIFY_SOURCE" % binary)


class RpmPackage(DaemonTestCase):
    @classmethod
    def setUpClass(cls):
        for tool in ("cpack", "rpmbuild", "rpm", "dpkg-deb"):
            if not shutil.which(tool):
                raise unittest.SkipTest("%s missing" % tool)
        cls.out, cls.rpm = build_package("RPM", ".rpm")
        cls.deb_out, cls.deb = build_package("DEB", ".deb")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.out, ignore_errors=True)
        shutil.rmtree(cls.deb_out, ignore_errors=True)

    def query(self, *what):
        return run(["rpm", "-qp", *what, self.rpm]).stdout

    def test_header_requires_and_provides(self):
        self.assertEqual(self.query("--qf", "%{NAME}").strip(), "blockway")
        self.assertRegex(self.query("--qf", "%{VERSION}-%{RELEASE}"), r"^\d+\.\d+\.\d+-1$")
        requires = self.query("--requires").split("\n")
        # Fedora/RHEL package names, beside the sonames rpmbuild reads off the ELF files.
        for package in ("fuse3-libs", "libnbd", "libiscsi", "libnfs", "sqlite-libs", "spdlog", "fmt",
                        "tomlplusplus", "systemd"):
            self.assertIn(package, [r.strip() for r in requires], "Requires lacks %s" % package)
        self.assertTrue(any(r.startswith("libnbd.so.0") for r in requires), requires)
        provides = self.query("--provides")
        self.assertRegex(provides, r"(?m)^blockway = \d+\.\d+\.\d+-1")

    def test_same_files_as_the_deb_with_the_same_modes(self):
        # Less the build-id links rpmbuild adds, as on Fedora (debuginfo lookup).
        listing = [l for l in self.query("--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]").splitlines()
                   if "/usr/lib/.build-id" not in l]
        rpm_files = {l.split(" ", 1)[1]: l.split(" ", 1)[0] for l in listing if not l.startswith("d")}
        rpm_dirs = {l.split(" ", 1)[1] for l in listing if l.startswith("d")}
        expected = {p.replace("/lib/systemd/", "/usr/lib/systemd/") if p.startswith("/lib/") else p: m
                    for p, m in deb_files(self.deb).items()}
        self.assertEqual(rpm_files, expected)
        # It owns its own directories only, never the system's.
        for d in rpm_dirs:
            self.assertTrue("blockway" in d, "the .rpm claims %s, which other packages own" % d)

    def test_configuration_is_config_noreplace(self):
        flags = self.query("--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]").splitlines()
        config = [l.split(" ", 1) for l in flags if "c" in l.split(" ", 1)[0]]
        self.assertEqual(config, [["cn", "/etc/blockway/blockwayd.toml"]],
                         "the configuration must be %config(noreplace)")
        self.assertEqual(self.query("--configfiles").split(), ["/etc/blockway/blockwayd.toml"])

    def test_scripts_follow_the_deb_rules(self):
        scripts = self.query("--scripts")
        parts = dict(re.findall(r"(?ms)^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts))
        self.assertEqual(sorted(parts), ["postinstall", "postuninstall", "preuninstall"], scripts)
        for name, body in parts.items():
            self.assertEqual(subprocess.run(["sh", "-n"], input=body, text=True).returncode, 0,
                             "%s is not valid sh" % name)
            self.assertNotIn("rm -rf", body, "caches must survive an erase")
        self.assertIn("install -d -m 0750 -o blockway -g blockway /var/lib/blockway", parts["postinstall"])
        # The blockway user: from the sysusers.d file, else useradd.
        self.assertIn("systemd-sysusers /usr/lib/sysusers.d/blockway.conf", parts["postinstall"])
        self.assertRegex(parts["postinstall"], r"useradd -r -g blockway -d /var/lib/blockway .*blockway")
        # The daemon is stopped on an erase ($1 = 0) only, never on an upgrade.
        self.assertRegex(parts["preuninstall"], r'if \[ "\$1" -eq 0 \].*\n.*--now blockwayd\.socket blockwayd\.service')

    def test_installs_into_a_scratch_root_and_serves(self):
        root = self.path("root")
        run(["rpm", "--root", root, "--initdb"], timeout=60)
        run(["rpm", "--root", root, "-i", "--nodeps", "--noscripts", self.rpm], timeout=120)
        self.assertEqual(run(["rpm", "--root", root, "-q", "blockway"]).stdout.strip().split("-")[0], "blockway")
        expected_modes = {"/usr/sbin/blockwayd": 0o755, "/usr/bin/blockway": 0o755,
                          "/etc/blockway/blockwayd.toml": 0o644, UNIT_RPM: 0o644,
                          "/usr/share/doc/blockway/README.md": 0o644,
                          "/usr/share/bash-completion/completions/blockway": 0o644,
                          "/usr/lib/sysusers.d/blockway.conf": 0o644, "/usr/lib/tmpfiles.d/blockway.conf": 0o644}
        for path, mode in expected_modes.items():
            st = os.stat(root + path)
            self.assertEqual(st.st_mode & 0o7777, mode, path)
            self.assertEqual((st.st_uid, st.st_gid), (0, 0), path)
        # The database in the scratch root agrees with the disk (rpm -V prints nothing).
        verify = run(["rpm", "--root", root, "-V", "--nodeps", "blockway"], check=False)
        self.assertEqual((verify.returncode, verify.stdout.strip()), (0, ""), verify.stderr)
        serve_and_copy(self, root + "/usr/sbin/blockwayd", root + "/etc/blockway/blockwayd.toml")


PLUGIN_NAME = "nbdkit-blockway-plugin.so"


def nbdkit_plugindir():
    return run(["pkg-config", "--variable=plugindir", "nbdkit"]).stdout.strip()


class NbdkitPluginPackage(DaemonTestCase):
    """nbdkit-plugin-blockway: the plugin alone, in nbdkit's plugin directory,
    depending on nbdkit; the blockway package does not hold it."""

    @classmethod
    def setUpClass(cls):
        for tool in ("cpack", "dpkg-deb", "nbdkit", "pkg-config"):
            if not shutil.which(tool):
                raise unittest.SkipTest("%s missing" % tool)
        if not os.path.exists(os.path.join(BUILD_DIR, PLUGIN_NAME)):
            raise unittest.SkipTest("the plugin is not built")
        cls.out, cls.deb = build_package("DEB", ".deb", ["BLOCKWAY_PACKAGE=nbdkit-plugin"])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.out, ignore_errors=True)

    def test_control_fields_and_contents(self):
        field = lambda name: run(["dpkg-deb", "-f", self.deb, name]).stdout.strip()  # noqa: E731
        self.assertEqual(field("Package"), "nbdkit-plugin-blockway")
        self.assertIn("nbdkit (>= 1.30)", field("Depends"))
        self.assertIn("libnbd0", field("Depends"))
        self.assertEqual(list(deb_files(self.deb)), [nbdkit_plugindir() + "/" + PLUGIN_NAME])
        for script in ("postinst", "prerm", "postrm", "conffiles"):
            self.assertNotEqual(run(["dpkg-deb", "-I", self.deb, script], check=False).returncode, 0,
                                "the plugin's package has the daemon's %s" % script)

    def test_packaged_plugin_serves(self):
        root = self.path("root")
        run(["dpkg-deb", "-x", self.deb, root])
        plugin = root + nbdkit_plugindir() + "/" + PLUGIN_NAME
        env = nbdkit_env(plugin)  # the sanitizer tree's plugin needs libasan preloaded
        dump = run(["nbdkit", "--dump-plugin", plugin], env=env).stdout
        self.assertIn("name=blockway", dump)
        self.assertIn("thread_model=parallel", dump)
        # Only nbdkit's entry point is exported: global (upper-case type) and
        # not a GNU unique object (u: a version script cannot hide those).
        symbols = [line.split() for line in run(["nm", "-D", "--defined-only", plugin]).stdout.splitlines()]
        self.assertEqual([s[2] for s in symbols if s[1].isupper()], ["plugin_init"])
        img = make_random_image(self.path("disk.img"), 4 * MiB, seed=9)
        out = self.path("copy.img")
        run(["nbdkit", "-U", "-", plugin, "file://" + img, "--run", "nbdcopy $uri " + out], timeout=60, env=env)
        with open(img, "rb") as a, open(out, "rb") as b:
            self.assertEqual(a.read(), b.read())

    def test_rpm_holds_the_same_file(self):
        if not shutil.which("rpmbuild") or not shutil.which("rpm"):
            self.skipTest("rpmbuild missing")
        out, rpm = build_package("RPM", ".rpm", ["BLOCKWAY_PACKAGE=nbdkit-plugin"])
        self.addCleanup(shutil.rmtree, out, True)
        self.assertEqual(run(["rpm", "-qp", "--qf", "%{NAME}", rpm]).stdout, "nbdkit-plugin-blockway")
        listing = [l for l in run(["rpm", "-qpl", rpm]).stdout.split() if "/usr/lib/.build-id" not in l]
        self.assertEqual(listing, [nbdkit_plugindir() + "/" + PLUGIN_NAME])
        self.assertIn("nbdkit-server >= 1.30", run(["rpm", "-qp", "--requires", rpm]).stdout)
        self.assertEqual(run(["rpm", "-qp", "--scripts", rpm]).stdout.strip(), "")

    def test_blockway_package_does_not_hold_it(self):
        out, deb = build_package("DEB", ".deb")
        self.addCleanup(shutil.rmtree, out, True)
        self.assertFalse([p for p in deb_files(deb) if "nbdkit" in p])


if __name__ == "__main__":
    unittest.main()
