"""Exports as kernel block devices (blockway connect/disconnect/devices,
[[device]], restart without I/O errors), inside a TCG guest (guest.py): the
host kernel here has no nbd module.

One guest boot runs every step (a boot costs ~15 s under TCG); each step's
output comes back on the serial console between @@BEGIN NAME and @@END NAME
RC markers and is checked here.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import guest  # noqa: E402
import harness  # noqa: E402

BLOCKWAYD = os.environ.get("BLOCKWAYD", "")
BLOCKWAY = os.environ.get("BLOCKWAY", "")

GUEST_SCRIPT = r"""
set -u
step() {
  name=$1; shift
  "$@" > /tmp/step.out 2>&1
  rc=$?
  echo "@@BEGIN $name"; cat /tmp/step.out; echo "@@END $name $rc"
  return 0
}
wait_file() { i=0; while [ ! -e "$1" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -e "$1" ]; }
wait_gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; ! kill -0 "$1" 2>/dev/null; }
start() {
  rm -f /run/bw.pid
  blockwayd --config /tmp/bw.toml --pid-file /run/bw.pid >> /tmp/daemon.log 2>&1 &
  echo $! > /run/bw.daemon
  wait_file /run/bw.pid
}
bw() { blockway --socket /run/bw.sock "$@"; }
mkdir -p /tmp/data /mnt
dd if=/dev/zero of=/tmp/vm1.img bs=1M count=0 seek=192 2>/dev/null
dd if=/dev/zero of=/tmp/cfg.img bs=1M count=0 seek=16 2>/dev/null
dd if=/dev/urandom of=/tmp/ro.img bs=1M count=8 2>/dev/null
cat > /tmp/bw.toml <<'EOF'
data-dir = "/tmp/data"
listen = ["unix:/run/nbd.sock"]
threads = 2
[control]
socket = "/run/bw.sock"
[[export]]
name = "vm1"
uri = "file:///tmp/vm1.img"
[[export]]
name = "cfg"
uri = "file:///tmp/cfg.img"
[[export]]
name = "ro"
uri = "file:///tmp/ro.img"
read-only = true
[[device]]
export = "cfg"
device = "/dev/nbd5"
rotational = true
EOF
step start start
step config_device bw devices --json
step cfg_rotational cat /sys/block/nbd5/queue/rotational
step connect bw connect vm1 /dev/nbd0
step size blockdev --getsize64 /dev/nbd0
step sector blockdev --getss /dev/nbd0
step rotational cat /sys/block/nbd0/queue/rotational
step discard cat /sys/block/nbd0/queue/discard_max_bytes
step mkfs mkfs.ext4 -q -F /dev/nbd0
step mount mount -t ext4 /dev/nbd0 /mnt
step fio_fs fio --name=fs --filename=/mnt/f --size=16M --rw=randwrite --bs=4k --ioengine=psync --verify=crc32c --do_verify=1 --fsync=64
step busy bw disconnect /dev/nbd0
step remove_attached bw export remove vm1
step umount umount /mnt
step fsck_after e2fsck -fn /dev/nbd0
step disconnect bw disconnect /dev/nbd0
step after_disconnect bw devices --json
step ro_connect bw connect ro /dev/nbd1
step ro_getro blockdev --getro /dev/nbd1
step ro_write dd if=/dev/zero of=/dev/nbd1 bs=4096 count=1 oflag=direct conv=fsync
step ro_read sh -c 'dd if=/dev/nbd1 bs=1M count=8 2>/dev/null | md5sum; md5sum < /tmp/ro.img'
step forced_ro_connect bw connect vm1 /dev/nbd2 --read-only
step forced_ro_getro blockdev --getro /dev/nbd2
step forced_ro_write dd if=/dev/zero of=/dev/nbd2 bs=4096 count=1 oflag=direct
step forced_ro_disconnect bw disconnect /dev/nbd2
step unknown_export bw connect nosuch
step busy_device bw connect vm1 /dev/nbd5
step bad_device bw connect vm1 /dev/sda
step on_demand bw connect vm1 /dev/nbd20
step on_demand_disconnect bw disconnect /dev/nbd20
# A daemon without CAP_SYS_ADMIN: the kernel refuses, the message says why.
mkdir -p /tmp/nobody && chown 65534 /tmp/nobody
su nobody -s /bin/sh -c 'blockwayd --data-dir /tmp/nobody --listen unix:/tmp/nobody/n.sock \
    --control-socket /tmp/nobody/c.sock --export ro=file:///tmp/ro.img,read-only=on \
    --pid-file /tmp/nobody/pid > /tmp/nobody/log 2>&1 &'
wait_file /tmp/nobody/pid
step no_permission blockway --socket /tmp/nobody/c.sock connect ro
kill -TERM $(cat /tmp/nobody/pid)
step bad_option bw connect vm1 --connections 0
step not_attached bw disconnect /dev/nbd4
# Restart in the middle of fio verify: SIGTERM, then SIGKILL.
for sig in TERM KILL; do
  step "r_connect_$sig" bw connect vm1 /dev/nbd3 --timeout 2 --dead-conn-timeout 120
  dmesg -c > /dev/null
  fio --name=r --filename=/dev/nbd3 --size=24M --rw=randwrite --bs=4k --ioengine=libaio --iodepth=8 --direct=1 \
      --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 &
  fio_pid=$!
  sleep 3
  step "r_alive_$sig" kill -0 $fio_pid
  t0=$(cut -d' ' -f1 /proc/uptime)
  kill -$sig $(cat /run/bw.daemon)
  step "r_stopped_$sig" wait_gone $(cat /run/bw.daemon)
  step "r_restart_$sig" start
  t1=$(cut -d' ' -f1 /proc/uptime)
  wait $fio_pid
  rc=$?
  echo "@@BEGIN r_fio_$sig"; cat /tmp/fio.out; echo "restart took $t0 -> $t1"; echo "@@END r_fio_$sig $rc"
  step "r_dmesg_$sig" sh -c 'dmesg | grep -i "I/O error" | wc -l'
  step "r_devices_$sig" bw devices --json
  step "r_disconnect_$sig" bw disconnect /dev/nbd3
done
echo "@@BEGIN daemon_log"; tail -n 60 /tmp/daemon.log; echo "@@END daemon_log 0"
kill -TERM $(cat /run/bw.daemon)
wait_gone $(cat /run/bw.daemon)
"""


def sections(text):
    """{name: (rc, output)} from the console's @@BEGIN/@@END markers."""
    out = {}
    for m in re.finditer(r"^@@BEGIN (\S+)\n(.*?)^@@END \1 (\d+)$", text, re.S | re.M):
        out[m.group(1)] = (int(m.group(3)), m.group(2))
    return out


def devices_json(text):
    return json.loads(text[text.index("{"):])["devices"]


@unittest.skipUnless(BLOCKWAYD and BLOCKWAY, "BLOCKWAYD and BLOCKWAY must name the binaries")
@unittest.skipIf(guest.missing_tools(), "missing for the guest: %s" % " ".join(guest.missing_tools()))
@unittest.skipUnless(shutil.which("fio") and shutil.which("mkfs.ext4") and shutil.which("e2fsck"),
                     "fio and e2fsprogs are needed in the guest")
class KernelDevices(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The sanitizer build's daemons (two at once here) need more memory.
        asan = "libasan" in subprocess.run(["ldd", BLOCKWAYD], stdout=subprocess.PIPE, text=True).stdout
        g = guest.Guest({"blockwayd": BLOCKWAYD, "blockway": BLOCKWAY, "fio": shutil.which("fio"),
                         "mkfs.ext4": shutil.which("mkfs.ext4"), "e2fsck": shutil.which("e2fsck")},
                        memory_mb=2560 if asan else 1024)
        _, cls.console, cls.seconds = g.run(GUEST_SCRIPT, timeout=900, smp=2)
        cls.s = sections(cls.console)
        sys.stderr.write("\nguest: image build %.1f s, run %.1f s\n" % (g.build_seconds, cls.seconds))

    def step(self, name, rc=0):
        self.assertIn(name, self.s, "step %s did not run; console tail:\n%s" % (name, self.console[-4000:]))
        got_rc, out = self.s[name]
        if rc is not None:
            self.assertEqual(got_rc, rc, "step %s: rc %d, output:\n%s" % (name, got_rc, out))
        return out

    def failed(self, name):
        got_rc, out = self.s.get(name, (None, ""))
        self.assertIsNotNone(got_rc, "step %s did not run" % name)
        self.assertNotEqual(got_rc, 0, "step %s should have failed:\n%s" % (name, out))
        return out

    def test_config_device(self):
        self.step("start")
        devs = devices_json(self.step("config_device"))
        self.assertEqual([(d["device"], d["export"]) for d in devs], [("/dev/nbd5", "cfg")])
        self.assertEqual(devs[0]["size"], 16 << 20)
        self.assertTrue(devs[0]["rotational"])
        self.assertEqual(self.step("cfg_rotational").strip(), "1")

    def test_device_is_a_plain_disk(self):
        self.assertIn("/dev/nbd0", self.step("connect"))
        self.assertEqual(self.step("size").strip(), str(192 << 20))
        self.assertEqual(self.step("sector").strip(), "512")
        self.assertEqual(self.step("rotational").strip(), "0")
        self.assertNotEqual(self.step("discard").strip(), "0", "trim is offered by the file backend")

    def test_filesystem_and_fio_verify(self):
        self.step("mkfs")
        self.step("mount")
        out = self.step("fio_fs")
        self.assertIn("err= 0", out)
        self.step("umount")
        self.step("fsck_after")

    def test_disconnect(self):
        out = self.failed("busy")
        self.assertIn("in use", out)
        self.step("disconnect")
        self.assertEqual([d["device"] for d in devices_json(self.step("after_disconnect"))], ["/dev/nbd5"])
        self.assertIn("not attached", self.failed("not_attached"))

    def test_device_made_on_demand(self):
        # An index past the module's nbds_max: the kernel adds the device.
        self.assertIn("/dev/nbd20", self.step("on_demand"))
        self.step("on_demand_disconnect")

    def test_export_removal_refused_while_attached(self):
        out = self.failed("remove_attached")
        self.assertIn("/dev/nbd0", out)

    def test_read_only(self):
        self.step("ro_connect")
        self.assertEqual(self.step("ro_getro").strip(), "1")
        self.failed("ro_write")
        sums = self.step("ro_read").split()
        self.assertEqual(sums[0], sums[2], "the device reads the image")
        self.step("forced_ro_connect")
        self.assertEqual(self.step("forced_ro_getro").strip(), "1")
        self.failed("forced_ro_write")
        self.step("forced_ro_disconnect")

    def test_clear_errors(self):
        self.assertIn("no export named 'nosuch'", self.failed("unknown_export"))
        self.assertIn("already attached", self.failed("busy_device"))
        self.assertIn("not an NBD device", self.failed("bad_device"))
        self.assertIn("needs root or CAP_SYS_ADMIN", self.failed("no_permission"))
        self.assertIn("connections", self.failed("bad_option"))

    def check_restart(self, sig):
        self.step("r_connect_" + sig)
        self.step("r_alive_" + sig)
        self.step("r_stopped_" + sig)
        self.step("r_restart_" + sig)
        out = self.step("r_fio_" + sig)
        self.assertIn("err= 0", out)
        self.assertEqual(self.step("r_dmesg_" + sig).strip(), "0", "I/O errors in the guest's kernel log")
        devs = {d["device"]: d for d in devices_json(self.step("r_devices_" + sig))}
        self.assertIn("/dev/nbd3", devs)
        self.step("r_disconnect_" + sig)

    def test_restart_sigterm(self):
        self.check_restart("TERM")

    def test_restart_sigkill(self):
        self.check_restart("KILL")


class HostWithoutNbd(control_common.ControlTestCase):
    """On this host (no nbd module): the errors a user meets first."""

    def setUp(self):
        super().setUp()
        if os.path.exists("/sys/module/nbd"):
            self.skipTest("this host has the nbd module")
        img = self.path("a.img")
        harness.make_sparse_image(img, 1 << 20)
        self.start({"a": "file://" + img})

    def test_no_module(self):
        _, err = self.bw("connect", "a", expect=control_common.EXIT_REFUSED)
        self.assertIn("load the nbd module (modprobe nbd)", err)
        self.assertEqual(self.bwj("devices")["devices"], [])

    def test_bad_arguments(self):
        _, err = self.bw("connect", "a", "/dev/sda", expect=control_common.EXIT_USAGE)
        self.assertIn("not an NBD device", err)
        _, err = self.bw("connect", "a", "--connections", "65", expect=control_common.EXIT_USAGE)
        self.assertIn("connections", err)
        _, err = self.bw("connect", "a", "--dead-conn-timeout", "0", expect=control_common.EXIT_USAGE)
        self.assertIn("dead-conn-timeout", err)
        _, err = self.bw("connect", "nosuch", expect=control_common.EXIT_UNKNOWN)
        self.assertIn("no export named 'nosuch'", err)
        _, err = self.bw("disconnect", "/dev/nbd0", expect=control_common.EXIT_REFUSED)
        self.assertIn("not attached by this daemon", err)
        _, err = self.bw("disconnect", expect=control_common.EXIT_USAGE)

    def test_config_device_refused_at_start(self):
        img = self.path("b.img")
        harness.make_sparse_image(img, 1 << 20)
        cfg = self.path("b.toml")
        with open(cfg, "w") as f:
            f.write('[[export]]\nname = "b"\nuri = "file://%s"\n[[device]]\nexport = "b"\nconnections = 2\n' % img)
        p = harness.run([harness.BLOCKWAYD, "--config", cfg, "--data-dir", self.path("d2"), "--control-socket",
                         "off", "--listen", "unix:" + self.path("b.sock")], timeout=30, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("[[device]] export 'b'", p.stderr.decode())
        with open(cfg, "w") as f:
            f.write('[[device]]\nexport = "b"\nspeed = 3\n')
        p = harness.run([harness.BLOCKWAYD, "--config", cfg, "--data-dir", self.path("d3"), "--control-socket", "off"],
                        timeout=30, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("unknown option 'speed'", p.stderr.decode())


if __name__ == "__main__":
    unittest.main()
