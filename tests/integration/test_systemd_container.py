#!/usr/bin/env python3
"""The packaged unit under a real systemd as PID 1 (issues 14 and 16): what
test_least_privilege.py reads from the unit's text and systemd-analyze's
offline view is checked here on the daemon systemd really started.

This machine is a container whose PID 1 is not systemd, so the test boots
one: systemd-nspawn --boot runs the host's own systemd on an overlay of the
host's / (the upper layer a tmpfs of the test's: everything written in the
container vanishes with it), with a private network (loopback only) and no
machined (--register=no --keep-unit). It boots to basic.target, not
multi-user.target: the services the host has enabled (postgres, ceph,
ganesha...) are not started. The .deb built from the tree under test is
installed with dpkg -i (its postinst makes the blockway user, reloads and
enables the units), blockwayd.socket is started as sockets.target would at
boot, and the first client starts blockwayd.service. Checked on that
daemon: systemd-analyze security's exposure level (online, from PID 1),
its identity, capabilities, no_new_privs and seccomp from /proc/PID/status,
ProtectSystem=strict (a write outside the unit's directories fails with
EROFS, even for root in the daemon's mount namespace; a file export outside
them is served read-only until the packaged images.conf drop-in names its
directory), ProtectHome, PrivateTmp, the low-port.conf drop-in granting
exactly CAP_NET_BIND_SERVICE, and that it serves (nbdinfo, nbdcopy). Before
the install a blockwayd run as root leaves a catalogue, a run-time export
and its image in /var/lib/blockway, as a version that ran as root would:
after the upgrade the packaged daemon serves that export and writes there.

Commands in the container run through nsenter into its PID 1's namespaces.
One boot serves every test (about 5 s); the container is powered off and
the overlay unmounted at the end, by the pids and mounts the test made.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from test_least_privilege import cap_mask, proc_status  # noqa: E402
from test_package import build_package  # noqa: E402

MiB = harness.MiB
# The packaged unit's exposure as systemd 252 computes it for the running
# unit is 1.5, as offline (test_least_privilege.EXPOSURE_BOUND).
EXPOSURE_BOUND = 2.0
CAP_NET_BIND_SERVICE = 10
BOOT_TIMEOUT = 90
PKG_DIR = "/run/bw-pkg"  # where the container sees the .deb (bind-mounted read-only)
# Where the container sees the tree's own binaries (bind-mounted read-only):
# the overlay shows the host's root filesystem only, not /tmp or other
# mounts, and a checkout may live in any of them (CI clones into /tmp).
TREE_BIN_DIR = "/run/bw-tree-bin"
DROPIN_DIR = "/etc/systemd/system/blockwayd.service.d"
DOC_DROPINS = "/usr/share/doc/blockway/examples/blockwayd.service.d"
# A blockwayd run as root with the packaged defaults' data directory: it
# persists the export 'old' (an image beside the catalogue) and stops.
ROOT_DAEMON = r"""
set -e
rm -rf /var/lib/blockway /var/cache/blockway /etc/blockway /run/blockway
mkdir -p /var/lib/blockway
head -c 1048576 /dev/urandom > /var/lib/blockway/old.img
(@BLOCKWAYD@ --data-dir /var/lib/blockway --listen unix:/run/bw-old.sock --control-socket /run/bw-old.ctl \
    --pid-file /run/bw-old.pid > /root/bw-old.log 2>&1 &)
i=0; while [ ! -e /run/bw-old.pid ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
@BLOCKWAY@ --socket /run/bw-old.ctl export add old file:///var/lib/blockway/old.img
pid=$(cat /run/bw-old.pid); kill $pid
i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
! kill -0 $pid 2>/dev/null
test "$(stat -c %U /var/lib/blockway/catalogue.db)" = root
"""


def missing():
    """Why this machine cannot boot the container, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "nsenter", "cpack", "dpkg-deb"):
        if not shutil.which(tool):
            return "%s missing (systemd-nspawn: apt-get install systemd-container)" % tool
    if not os.path.exists("/lib/systemd/systemd"):
        return "no systemd to boot"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "no overlayfs"
    return None


class Container:
    """A booted systemd-nspawn container over an overlay of the host's /."""

    def __init__(self, work, pkg_dir):
        self.work = work
        self.name = "bw-test-%d" % os.getpid()
        self.tmpfs = os.path.join(work, "layer")
        self.root = os.path.join(work, "root")
        self.log_path = os.path.join(work, "boot.log")
        self.pkg_dir = pkg_dir
        self.proc = None
        self.leader = None
        self.mounted = []

    def start(self):
        os.mkdir(self.tmpfs)
        os.mkdir(self.root)
        harness.run(["mount", "-t", "tmpfs", "-o", "size=2G,mode=0755", "bw-layer", self.tmpfs])
        self.mounted.append(self.tmpfs)
        upper, workdir = os.path.join(self.tmpfs, "upper"), os.path.join(self.tmpfs, "work")
        os.mkdir(upper)
        os.mkdir(workdir)
        harness.run(["mount", "-t", "overlay", "bw-root", "-o",
                     "lowerdir=/,upperdir=%s,workdir=%s" % (upper, workdir), self.root])
        self.mounted.append(self.root)
        log = open(self.log_path, "wb")
        # --keep-unit and --register=no: no machined or system bus on the host.
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", self.root, "-M", self.name, "--private-network",
             "--register=no", "--keep-unit", "--console=read-only", "--bind-ro=%s:%s" % (self.pkg_dir, PKG_DIR),
             "--bind-ro=%s:%s" % (os.path.dirname(os.path.abspath(harness.BLOCKWAYD)), TREE_BIN_DIR),
             "--boot", "--", "systemd.unit=basic.target"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.leader = self.leader or self.child_of_nspawn()
            if self.leader:
                p = subprocess.run(self.enter() + ["systemctl", "is-system-running"], capture_output=True,
                                   text=True, timeout=30)
                state = p.stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise AssertionError("systemd did not boot within %d s (state %r, nspawn %s):\n%s"
                             % (BOOT_TIMEOUT, state, self.proc.poll(), self.boot_log()[-4000:]))

    def child_of_nspawn(self):
        """The container's PID 1 as the host sees it: nspawn's child."""
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                children = f.read().split()
        except FileNotFoundError:
            return None
        return int(children[0]) if len(children) == 1 else None

    def enter(self, pid=None, namespaces=("-a",)):
        return ["nsenter", "-t", str(pid or self.leader)] + list(namespaces)

    def sh(self, script, check=True, timeout=60):
        """`sh -c script` in the container, as root: (rc, stdout + stderr)."""
        p = subprocess.run(self.enter() + ["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                            "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"})
        if check and p.returncode != 0:
            raise AssertionError("in the container: %s\nexit %d:\n%s" % (script, p.returncode, p.stdout))
        return p.returncode, p.stdout

    def out(self, script, timeout=60):
        return self.sh(script, timeout=timeout)[1]

    def boot_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            # nspawn's SIGTERM asks the container's systemd to power off.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                harness.kill_pid(self.proc)
                self.proc.wait(10)
        for m in reversed(self.mounted):
            if subprocess.run(["umount", m], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", m], capture_output=True)
        self.mounted = []


@unittest.skipIf(missing(), missing())
class PackagedUnitUnderSystemd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pkg_out, deb = build_package("DEB", ".deb")  # skips a sanitizer tree
        cls.deb = os.path.join(PKG_DIR, os.path.basename(deb))
        cls.work = tempfile.mkdtemp(prefix="bw-nspawn-", dir="/tmp")
        cls.c = Container(cls.work, cls.pkg_out)
        try:
            cls.c.start()
            # An upgrade from a version that ran as root: a catalogue, an
            # export added at run time and its image in /var/lib/blockway,
            # all root's (made by the tree's own binaries, bind-mounted at
            # TREE_BIN_DIR; BLOCKWAY must sit beside BLOCKWAYD, as in a build
            # tree). Whatever the host has
            # there is hidden first.
            in_tree = lambda path: os.path.join(TREE_BIN_DIR, os.path.basename(path))  # noqa: E731
            cls.c.out(ROOT_DAEMON.replace("@BLOCKWAYD@", in_tree(harness.BLOCKWAYD))
                      .replace("@BLOCKWAY@", in_tree(harness.BLOCKWAY)))
            # As an operator would: dpkg -i, the socket unit up as at boot, an
            # image in the state directory (the daemon's own) added at run time.
            cls.install_log = cls.c.out("DEBIAN_FRONTEND=noninteractive dpkg -i --no-triggers %s 2>&1" % cls.deb,
                                        timeout=180)
            cls.c.out("cp /etc/blockway/blockwayd.toml /root/ && systemctl start blockwayd.socket")
            cls.c.out("truncate -s 16M /var/lib/blockway/disk.img && chown blockway: /var/lib/blockway/disk.img")
            # The first connection starts the daemon (socket activation).
            cls.first_list = cls.c.sh("nbdinfo --list nbd://127.0.0.1", check=False)[1]
            cls.c.out("blockway export add disk file:///var/lib/blockway/disk.img")
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.c.stop()
        finally:
            shutil.rmtree(cls.work, ignore_errors=True)
            shutil.rmtree(cls.pkg_out, ignore_errors=True)

    def main_pid(self):
        """blockwayd's pid as the host sees it (the container's is in NSpid)."""
        pid = int(self.c.out("systemctl show -P MainPID blockwayd.service").strip())
        self.assertNotEqual(pid, 0, self.c.out("systemctl status --no-pager blockwayd.service; true"))
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = proc_status(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
            ns = status.get("NSpid", "").split()
            if len(ns) == 2 and int(ns[1]) == pid and status.get("Name") == "blockwayd" \
                    and self.in_container(int(entry)):
                return int(entry)
        self.fail("no host pid for the container's pid %d" % pid)

    def in_container(self, pid):
        try:
            return os.readlink("/proc/%d/ns/pid" % pid) == os.readlink("/proc/%d/ns/pid" % self.c.leader)
        except FileNotFoundError:
            return False

    def test_installed_by_dpkg_and_started_by_socket_activation(self):
        self.assertNotIn("error", self.install_log.lower(), self.install_log)
        self.assertRegex(self.c.out("getent passwd blockway"), r"^blockway:x:\d+:\d+:.*:/var/lib/blockway:/usr/sbin/nologin")
        self.assertEqual(self.c.out("systemctl is-enabled blockwayd.service blockwayd.socket").split(),
                         ["enabled", "enabled"])
        self.assertIn("protocol: newstyle-fixed", self.first_list, "the first client is answered")
        show = self.c.out("systemctl show -p ActiveState -p SubState -p Type -p TriggeredBy -p StatusText "
                          "-p WatchdogUSec -p NRestarts blockwayd.service")
        props = dict(line.split("=", 1) for line in show.splitlines())
        self.assertEqual((props["ActiveState"], props["SubState"], props["Type"]), ("active", "running", "notify"))
        self.assertEqual(props["TriggeredBy"], "blockwayd.socket")
        self.assertEqual(props["WatchdogUSec"], "30s")
        self.assertRegex(props["StatusText"], r"^serving \d+ exports? to \d+ clients?$")
        journal = self.c.out("journalctl -u blockwayd.service --no-pager -o cat")
        self.assertIn("listening on 127.0.0.1:10809 (socket passed by systemd: blockwayd.socket)", journal)
        self.assertIn("listening on unix:/run/blockway/nbd.sock (socket passed by systemd: blockwayd.socket)",
                      journal)

    def test_upgrade_from_a_daemon_that_ran_as_root(self):
        """What the root daemon left in /var/lib/blockway is the blockway
        user's after the install: the packaged daemon serves its run-time
        export 'old' and writes its catalogue (it could not, with a
        read-only database error, before the postinst's chown -R)."""
        owners = self.c.out("find /var/lib/blockway /var/cache/blockway -printf '%u %p\\n'").splitlines()
        self.assertEqual([o for o in owners if not o.startswith("blockway ")], [])
        self.assertIn("old", self.c.out("blockway status"))
        self.assertEqual(self.c.out("nbdinfo --size nbd://127.0.0.1/old").strip(), str(MiB))
        self.c.out("nbdsh -u nbd://127.0.0.1/old -c 'h.pwrite(b\"y\" * 512, 0); h.flush()'")
        self.assertEqual(self.c.out("head -c 512 /var/lib/blockway/old.img"), "y" * 512)

    def test_serves_over_tcp_and_the_unix_socket(self):
        self.assertEqual(self.c.out("nbdinfo --size nbd://127.0.0.1:10809/disk").strip(), str(16 * MiB))
        # Written over TCP, read back over the packaged Unix socket and from the file.
        self.c.out("head -c 4194304 /dev/urandom > /root/src && nbdcopy /root/src nbd://127.0.0.1/disk && "
                   "nbdcopy 'nbd+unix:///disk?socket=/run/blockway/nbd.sock' /root/out")
        self.c.out("cmp -n 4194304 /root/src /root/out && cmp -n 4194304 /root/src /var/lib/blockway/disk.img")
        # The export added at run time was persisted in the state directory.
        self.assertTrue(self.c.out("ls /var/lib/blockway").split())

    def test_exposure_level(self):
        report = self.c.out("systemd-analyze security --no-pager blockwayd.service")
        m = re.search(r"Overall exposure level for blockwayd.service: (\d+\.\d+)", report)
        self.assertTrue(m, report)
        print("exposure under systemd: %s" % m.group(1), file=sys.stderr)
        self.assertLessEqual(float(m.group(1)), EXPOSURE_BOUND, report)
        for setting in ("User=", "NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=", "CapabilityBoundingSet=",
                        "ProtectHome=", "PrivateDevices="):
            self.assertNotRegex(report, r"(?m)^✗ %s" % re.escape(setting), report)

    def test_identity_capabilities_and_filters(self):
        pid = self.main_pid()
        st = proc_status(pid)
        uid, gid = self.c.out("id -u blockway; id -g blockway").split()
        self.assertEqual(st["Uid"].split(), [uid] * 4)
        self.assertEqual(st["Gid"].split(), [gid] * 4)
        self.assertNotEqual(uid, "0")
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(st[field], "0" * 16, "%s of blockwayd: %s" % (field, st[field]))
        self.assertEqual(st["NoNewPrivs"], "1")
        self.assertEqual(st["Seccomp"], "2", "SystemCallFilter= installs a seccomp filter")

    def test_protect_system_strict_home_and_private_tmp(self):
        pid = self.main_pid()
        in_daemon = self.c.enter(pid, ["-m"])

        def touch(path):
            return subprocess.run(in_daemon + ["touch", path], capture_output=True, text=True, timeout=30)

        # Root itself, in the daemon's mount namespace: the system is read-only.
        for path in ("/etc/bw-probe", "/usr/bw-probe", "/var/bw-probe", "/bw-probe"):
            r = touch(path)
            self.assertNotEqual(r.returncode, 0, path)
            self.assertIn("Read-only file system", r.stderr, path)
        # ...but for the unit's own directories.
        for path in ("/var/lib/blockway/probe", "/var/cache/blockway/probe", "/run/blockway/probe"):
            r = touch(path)
            self.assertEqual(r.returncode, 0, "%s: %s" % (path, r.stderr))
            subprocess.run(in_daemon + ["rm", path], timeout=30)
        # ProtectHome=yes: /root and /home are empty and inaccessible.
        self.c.out("touch /root/visible-to-root")
        r = subprocess.run(in_daemon + ["ls", "/root"], capture_output=True, text=True, timeout=30)
        self.assertNotIn("visible-to-root", r.stdout + r.stderr)
        # PrivateTmp=yes: the daemon's /tmp is its own, not the system's.
        self.c.out("touch /tmp/system-tmp-file")
        r = subprocess.run(in_daemon + ["ls", "-A", "/tmp"], capture_output=True, text=True, timeout=30)
        self.assertEqual((r.returncode, r.stdout), (0, ""), r.stderr)
        with open("/proc/%d/mountinfo" % pid) as f:  # fields: id parent dev root mount-point ...
            tmp_roots = [line.split()[3] for line in f if line.split()[4] == "/tmp"]
        self.assertTrue(tmp_roots, "no /tmp mount in the daemon's namespace")
        self.assertRegex(tmp_roots[-1], r"^/systemd-private-\w+-blockwayd\.service-\w+/tmp$")

    def test_image_outside_the_unit_directories_needs_the_images_drop_in(self):
        """An export of /srv/images/a.img (writable by everyone): the sandbox
        makes it read-only, and the daemon says so; the packaged images.conf
        drop-in, installed as its comment says, makes it writable."""
        self.c.out("mkdir -p /srv/images && truncate -s 8M /srv/images/a.img && chmod 0666 /srv/images/a.img")
        self.c.out("blockway export add a file:///srv/images/a.img")
        self.addCleanup(self.c.out, "blockway export remove a")
        info = self.c.out("nbdinfo nbd://127.0.0.1/a")
        self.assertIn("is_read_only: true", info)
        rc, out = self.c.sh("nbdsh -u nbd://127.0.0.1/a -c 'h.pwrite(b\"x\" * 512, 0)'", check=False)
        self.assertNotEqual(rc, 0, out)
        journal = self.c.out("journalctl -u blockwayd.service --no-pager -o cat")
        self.assertIn("/srv/images/a.img: Read-only file system: serving it read-only", journal)
        # The drop-in from the package's examples.
        self.c.out("mkdir -p %s && cp %s/images.conf %s/" % (DROPIN_DIR, DOC_DROPINS, DROPIN_DIR))
        self.addCleanup(self.restart_without_dropins)
        self.c.out("systemctl daemon-reload && systemctl restart blockwayd.service")
        # The run-time export came back with the restart (the state directory).
        self.assertIn("is_read_only: false", self.c.out("nbdinfo nbd://127.0.0.1/a"))
        self.c.out("nbdsh -u nbd://127.0.0.1/a -c 'h.pwrite(b\"x\" * 512, 0); h.flush()'")
        self.assertEqual(self.c.out("head -c 512 /srv/images/a.img"), "x" * 512)

    def restart_without_dropins(self):
        self.c.out("rm -rf %s && cp /root/blockwayd.toml /etc/blockway/ && systemctl daemon-reload && "
                   "systemctl reset-failed blockwayd.service blockwayd.socket && systemctl start blockwayd.socket && "
                   "systemctl restart blockwayd.service" % DROPIN_DIR)

    def test_low_port_drop_in_grants_exactly_cap_net_bind_service(self):
        """A listener on port 809 added to the packaged configuration (the
        daemon binds it itself: it is not one of blockwayd.socket's): with
        the packaged low-port.conf drop-in the daemon has that one capability
        and serves on it; without, it fails to start naming the capability."""
        self.c.out("sed -i 's|^listen = \\[|listen = [\"127.0.0.1:809\", |' /etc/blockway/blockwayd.toml")
        self.assertIn('"127.0.0.1:809"', self.c.out("grep '^listen' /etc/blockway/blockwayd.toml"))
        self.c.out("mkdir -p %s && cp %s/low-port.conf %s/" % (DROPIN_DIR, DOC_DROPINS, DROPIN_DIR))
        self.addCleanup(self.restart_without_dropins)
        self.c.out("systemctl daemon-reload && systemctl restart blockwayd.service")
        self.assertEqual(self.c.out("nbdinfo --size nbd://127.0.0.1:809/disk").strip(), str(16 * MiB))
        st = proc_status(self.main_pid())
        want = "%016x" % cap_mask(CAP_NET_BIND_SERVICE)
        for field in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(st[field], want, "%s with low-port.conf: %s" % (field, st[field]))
        # Without the drop-in the same listener is refused, naming the capability.
        self.c.out("rm %s/low-port.conf && systemctl daemon-reload" % DROPIN_DIR)
        rc, _ = self.c.sh("systemctl restart blockwayd.service", check=False)
        self.assertNotEqual(rc, 0)
        journal = self.c.out("journalctl -u blockwayd.service --no-pager -o cat -n 30")
        self.assertIn("need CAP_NET_BIND_SERVICE", journal)

if __name__ == "__main__":
    unittest.main()
