"""The control plane and the blockway command against a running daemon:
status, stats, flush, errors and exit codes, the raw socket, run-time exports.

Every subcommand runs against real daemons with file and nbdkit remotes,
cached and not; --json output is parsed; exit codes are checked for every
kind of error; the raw socket is fed malformed, huge and unknown requests;
run-time exports survive a restart. The cache commands are in
test_control_cache.py.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MiB  # noqa: E402
import remotes  # noqa: E402
from control_common import (  # noqa: E402
    ControlTestCase, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_REFUSED)


class StatusAndStats(ControlTestCase):
    def test_status_list_stats_with_file_and_nbdkit_remotes(self):
        plain = harness.make_random_image(self.path("plain.img"), 4 * MiB, seed=1)
        remote_img = harness.make_random_image(self.path("remote.img"), 8 * MiB, seed=2)
        k = self.nbdkit(remote_img)
        self.start({"plain": "file://" + plain,
                    "ro": "file://%s,ro,description=read only" % plain,
                    "cached": "file://%s,cache=%s" % (plain, self.path("cache")),
                    "net": k.uri,
                    "netcached": "%s,cache=%s,mode=writeback" % (k.uri, self.path("cache"))})
        st = os.stat(self.csock)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600, "the control socket is owner-only")
        self.assertEqual(st.st_uid, os.geteuid())

        status = self.bwj("status")
        byname = {e["name"]: e for e in status["exports"]}
        self.assertEqual(sorted(byname), ["cached", "net", "netcached", "plain", "ro"])
        self.assertEqual(byname["plain"]["size"], 4 * MiB)
        self.assertEqual(byname["net"]["size"], 8 * MiB)
        self.assertFalse(byname["plain"]["read_only"])
        self.assertTrue(byname["ro"]["read_only"])
        self.assertEqual(byname["ro"]["description"], "read only")
        self.assertEqual(byname["plain"]["mode"], "direct")
        self.assertIsNone(byname["plain"]["cache"])
        self.assertEqual(byname["plain"]["remote"], {"kind": "local", "connected": True})
        self.assertEqual(byname["net"]["remote"]["kind"], "network")
        self.assertTrue(byname["net"]["remote"]["connected"])
        self.assertEqual(byname["net"]["uri"], k.uri)
        self.assertIn("cache(", byname["netcached"]["backend"])
        for e in byname.values():
            self.assertEqual(e["clients"], 0)
            self.assertEqual(e["io"]["reads"], 0)
        if byname["netcached"]["cache"] is not None:
            self.assertEqual(byname["netcached"]["mode"], "writeback")
            self.assertEqual(byname["netcached"]["present_bytes"], 0)
            self.assertEqual(byname["netcached"]["prefetch"]["state"], "idle")
        self.assertEqual(status["pid"], self.daemon_pid())

        # Live counters, without a shutdown.
        h = self.connect(self.uri("net"))
        self.assertEqual(h.pread(65536, 0), harness.read_file(remote_img, 0, 65536))
        h.pwrite(b"\x42" * 4096, 8192)
        h.flush()
        s = self.bwj("stats", "net")
        self.assertEqual(s["io"]["reads"], 1)
        self.assertEqual(s["io"]["bytes_read"], 65536)
        self.assertEqual(s["io"]["writes"], 1)
        self.assertEqual(s["io"]["bytes_written"], 4096)
        self.assertEqual(s["io"]["flushes"], 1)
        self.assertEqual(s["clients"], 1)
        self.assertEqual(self.bwj("status", "--socket", self.csock)["exports"][1]["clients"], 1)

        # Text forms name every export and field.
        out, _ = self.bw("status")
        self.assertIn("NAME", out)
        for n in byname:
            self.assertIn(n, out)
        self.assertIn("direct,ro", out)
        out, _ = self.bw("stats", "net", env_socket=True)
        self.assertIn("1 reads (64.0 KiB)", out)
        self.assertIn("connected", out)
        out, _ = self.bw("export", "list")
        self.assertIn(k.uri, out)
        names, _ = self.bw("export", "list", "--names")
        self.assertEqual(names.split(), sorted(byname))
        lst = self.bwj("export", "list")
        self.assertEqual([e["name"] for e in lst["exports"]], sorted(byname))

        # Remote health follows the remote.
        k.kill()
        self.assertRaises(Exception, h.pread, 4096, 0)
        harness.wait_until(lambda: not self.bwj("stats", "net")["remote"]["connected"], 20,
                           what="status to report the remote down")
        out, _ = self.bw("status")
        self.assertIn("DOWN", out)

    def daemon_pid(self):
        with open(os.path.join(self.tmp, "blockwayd.pid")) as f:
            return int(f.read())

    def test_flush(self):
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        self.start({"a": "file://" + img, "ro": "file://%s,ro" % img})
        h = self.connect(self.uri("a"))
        h.pwrite(b"x" * 4096, 0)
        out, _ = self.bw("flush", "a")
        self.assertIn("flushed", out)
        self.assertEqual(self.bwj("stats", "a")["io"]["flushes"], 1)
        self.assertEqual(self.bwj("flush", "a"), {})
        out, _ = self.bw("flush", "ro")
        self.assertIn("read-only", out)
        self.bw("flush", "nope", expect=EXIT_UNKNOWN)
        # Clients are counted per connection, and uncounted when they leave.
        h2 = self.connect(self.uri("a"))
        self.assertEqual(self.bwj("stats", "a")["clients"], 2)
        h.shutdown()
        h2.shutdown()
        harness.wait_until(lambda: self.bwj("stats", "a")["clients"] == 0, 10, what="clients to reach 0")

    def test_bash_completion(self):
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        self.start({"alpha": "file://" + img, "beta": "file://" + img})
        completion = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "../../packaging/blockway.bash-completion")
        script = ('source %s; COMP_WORDS=(blockway detach ""); COMP_CWORD=2; _blockway; echo "${COMPREPLY[@]}";'
                  'COMP_WORDS=(blockway prefetch start a); COMP_CWORD=3; _blockway; echo "${COMPREPLY[@]}"'
                  % completion)
        env = dict(os.environ, PATH=os.path.dirname(os.path.abspath(harness.BLOCKWAY)) + ":" + os.environ["PATH"],
                   BLOCKWAY_SOCKET=self.csock)
        p = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE, env=env, timeout=30)
        self.assertEqual(p.stdout.decode().splitlines(), ["alpha beta", "alpha"])


class Errors(ControlTestCase):
    def test_exit_codes_and_messages(self):
        # No daemon at all.
        _, err = self.bw("status", expect=EXIT_NO_DAEMON)
        self.assertIn("not running", err)
        self.assertIn(self.csock, err)
        _, err = self.bw("stats", "x", expect=EXIT_NO_DAEMON, env_socket=True)
        self.assertIn("not running", err)

        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        self.start({"a": "file://" + img})
        _, err = self.bw("stats", "nope", expect=EXIT_UNKNOWN)
        self.assertIn("no export named 'nope'", err)
        for args in (["prefetch", "start", "nope"], ["detach", "nope"], ["mode", "nope", "writeback"],
                     ["flush", "nope"], ["export", "remove", "nope"], ["prefetch", "status", "nope"]):
            self.bw(*args, expect=EXIT_UNKNOWN)
        # Cache commands on an export without a cache are refused, clearly.
        for args in (["prefetch", "start", "a"], ["prefetch", "pause", "a"], ["prefetch", "resume", "a"],
                     ["prefetch", "status", "a"], ["prefetch", "rate", "a", "50M"], ["prefetch", "a", "--wait"],
                     ["detach", "a"], ["detach", "a", "--force"], ["mode", "a", "writeback"]):
            _, err = self.bw(*args, expect=EXIT_REFUSED)
            self.assertIn("has no cache", err)
        # Usage errors.
        for args in (["stats"], ["stats", "a", "b"], ["status", "--bogus"], ["export"], ["export", "frob"],
                     ["export", "add", "x"], ["prefetch"], ["prefetch", "rate", "a", "fast"],
                     ["prefetch", "pause", "a", "--wait"], ["mode", "a"], ["detach"], ["flush"],
                     ["status", "--socket"]):
            _, err = self.bw(*args, expect=EXIT_USAGE)
            self.assertTrue(err.strip(), "a usage error says what is wrong: %r" % (args,))
        _, err = self.bw("mode", "a", "local", expect=EXIT_USAGE)
        self.assertIn("detach", err)
        _, err = self.bw("frobnicate", expect=EXIT_USAGE)
        self.assertIn("unknown command", err)
        # --help on every subcommand, exit 0, without a daemon being needed.
        for args in (["status"], ["stats"], ["export"], ["export", "add"], ["prefetch"], ["prefetch", "start"],
                     ["detach"], ["mode"], ["flush"], ["info"]):
            out, _ = self.bw(*(args + ["--help"]), expect=0, env_socket=True)
            self.assertIn("Usage: blockway", out)
        out, _ = self.bw("--help", expect=0, env_socket=True)
        for word in ("status", "export add", "prefetch", "detach", "mode", "flush", "stats", "Exit codes"):
            self.assertIn(word, out)
        # The global form of --socket.
        out, _ = self.bw("--socket", self.csock, "export", "list", "--names", expect=0)
        self.assertEqual(out.split(), ["a"])
        # Permission: a non-root user cannot talk to the root-only socket.
        if os.geteuid() == 0:
            # The directory lets anyone reach the socket: only its mode stops them.
            os.chmod(self.tmp, 0o755)
            p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                harness.BLOCKWAY, "status", "--socket", self.csock],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            self.assertEqual(p.returncode, EXIT_NO_DAEMON, p.stderr)
            self.assertIn(b"permission denied", p.stderr)

    def test_bad_requests_on_the_raw_socket(self):
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        d = self.start({"a": "file://" + img})
        cases = [
            (b"{not json\n", "bad-request"),
            (b"[1,2,3]\n", "bad-request"),
            (b"{}\n", "bad-request"),
            (b'{"cmd": 42}\n', "bad-request"),
            (b'{"cmd": "reboot"}\n', "unknown-command"),
            (b'{"cmd": "stats"}\n', "bad-request"),
            (b'{"cmd": "stats", "name": ["a"]}\n', "bad-request"),
            (b'{"cmd": "stats", "name": "zz"}\n', "unknown-export"),
            (b'{"cmd": "export-add", "name": "b"}\n', "bad-request"),
            (b'{"cmd": "export-remove", "name": "a", "force": 1}\n', "bad-request"),
            (b'{"cmd": "prefetch-rate", "name": "a", "rate": "1Q"}\n', "bad-request"),
            (b"\xff\xfe\x00garbage\n", "bad-request"),
        ]
        for payload, code in cases:
            replies = self.raw(payload)
            self.assertEqual(len(replies), 1, payload)
            self.assertFalse(replies[0]["ok"], payload)
            self.assertEqual(replies[0]["error"]["code"], code, payload)
            self.assertTrue(replies[0]["error"]["message"])
        # Several requests on one connection, answered in order, with ids.
        replies = self.raw(b'{"cmd":"list","id":1}\n{"cmd":"nope","id":2}\n\n{"cmd":"status","id":3}\n')
        self.assertEqual([r["id"] for r in replies], [1, 2, 3])
        self.assertEqual([r["ok"] for r in replies], [True, False, True])
        # A huge line (4 MiB without a newline): one error, the connection is closed.
        replies = self.raw(b'{"cmd":"status","pad":"' + b"x" * (4 * MiB))
        self.assertEqual(len(replies), 1)
        self.assertEqual(replies[0]["error"]["code"], "too-large")
        # Many clients at once, some idle and connected the whole time.
        idle = [socket.socket(socket.AF_UNIX) for _ in range(20)]
        for s in idle:
            s.connect(self.csock)
            self.addCleanup(s.close)
        results = []

        def client():
            try:
                results.append(self.raw(b'{"cmd":"status"}\n' * 5))
            except Exception as e:  # noqa: BLE001
                results.append(e)
        threads = [threading.Thread(target=client) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(len(results), 30)
        for r in results:
            self.assertIsInstance(r, list, r)
            self.assertEqual(len(r), 5)
            self.assertTrue(all(x["ok"] for x in r))
        # The daemon is still fine and serves NBD.
        self.assertTrue(d.running())
        h = self.connect(self.uri("a"))
        self.assertEqual(h.pread(4096, 0), b"\0" * 4096)
        self.assertEqual(self.bwj("stats", "a")["name"], "a")
        # Idle control clients do not hold up shutdown.
        d.stop()
        self.assertFalse(os.path.exists(self.csock), "the daemon removes its control socket")

    def test_live_socket_is_never_taken_over_stale_one_is_replaced(self):
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        d1 = self.start({"a": "file://" + img}, name="first")
        d2 = harness.Daemon(self.tmp, ["--listen", "127.0.0.1:%d" % harness.free_port(), "--data-dir",
                                       self.path("data2"), "--control-socket", self.csock,
                                       "--export", "b=file://" + img], name="second")
        self.addCleanup(d2.cleanup)
        with self.assertRaises(AssertionError) as ctx:
            d2.start()
        self.assertIn("another blockwayd is running on %s (pid %d)" % (self.csock, d1.pid), str(ctx.exception))
        self.assertEqual(self.bwj("export", "list")["exports"][0]["name"], "a", "the first daemon keeps it")
        # kill -9 leaves the socket file behind; the next daemon replaces it.
        d1.send_signal(signal.SIGKILL)
        d1.wait(10)
        self.assertTrue(os.path.exists(self.csock))
        self.bw("status", expect=EXIT_NO_DAEMON)
        d3 = harness.Daemon(self.tmp, ["--listen", "127.0.0.1:%d" % harness.free_port(), "--data-dir",
                                       self.path("data3"), "--control-socket", self.csock,
                                       "--export", "c=file://" + img], name="third")
        self.addCleanup(d3.cleanup)
        d3.start()
        self.assertEqual(self.bwj("export", "list")["exports"][0]["name"], "c")
        self.assertEqual(stat.S_IMODE(os.stat(self.csock).st_mode), 0o600)

    def stale_socket(self, path):
        """A socket file nobody listens on, as a kill -9 leaves it."""
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()

    def test_two_daemons_started_at_once_one_gets_the_socket(self):
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        for round_ in range(4):
            if round_ % 2 == 0:
                self.stale_socket(self.csock)  # both would find it stale and replace it
            daemons = []
            for i in range(2):
                d = harness.Daemon(self.tmp, ["--listen", "127.0.0.1:%d" % harness.free_port(), "--data-dir",
                                              self.path("data%d" % i), "--control-socket", self.csock,
                                              "--export", "e%d=file://%s" % (i, img)], name="r%d-d%d" % (round_, i))
                self.addCleanup(d.cleanup)
                daemons.append(d)
            errors = [None, None]

            def start(i):
                try:
                    daemons[i].start(ready_timeout=30)
                except AssertionError as e:
                    errors[i] = str(e)

            threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            self.assertEqual(sorted(e is None for e in errors), [False, True],
                             "round %d: exactly one daemon starts: %s" % (round_, errors))
            winner = errors.index(None)
            loser = 1 - winner
            self.assertIn("another blockwayd is running on %s (pid %d)" % (self.csock, daemons[winner].pid),
                          errors[loser])
            names = [e["name"] for e in self.bwj("export", "list")["exports"]]
            self.assertEqual(names, ["e%d" % winner], "the socket is the winner's")
            self.assertTrue(os.path.exists(self.csock + ".lock"))
            daemons[winner].stop()
            self.assertFalse(os.path.exists(self.csock), "the daemon removes its control socket")
            self.assertFalse(os.path.exists(self.csock + ".lock"), "and its lock file")

    def test_kill_inside_listen_leaves_nothing_behind(self):
        # strace kills the daemon (SIGKILL) at its renameat2(): inside
        # listen(), after the socket was bound in its private directory.
        if not harness.have("strace"):
            self.skipTest("strace is not installed")
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        rundir = self.path("run")
        os.mkdir(rundir)
        csock = os.path.join(rundir, "control.sock")
        args = ["--listen", "127.0.0.1:%d" % harness.free_port(), "--data-dir", self.data,
                "--control-socket", csock, "--export", "a=file://" + img]
        p = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=renameat2",
                            "-e", "inject=renameat2:signal=SIGKILL", harness.BLOCKWAYD] + args,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        left = sorted(os.listdir(rundir))
        if p.returncode != -signal.SIGKILL and p.returncode != 128 + signal.SIGKILL:
            self.skipTest("strace could not stop the daemon at renameat2 (exit %d): %s"
                          % (p.returncode, p.stdout.decode(errors="replace")[-2000:]))
        private = [n for n in left if n.startswith(".control-")]
        self.assertEqual(len(private), 1, "killed inside listen(): %s" % left)
        self.assertEqual(os.listdir(os.path.join(rundir, private[0])), ["s"])
        # Someone else's directory by that pattern, not named in the lock file:
        # left alone.
        os.mkdir(os.path.join(rundir, ".control-zzzzzz"))
        d = self.start_daemon(args, name="after-kill")
        self.assertEqual(sorted(os.listdir(rundir)), [".control-zzzzzz", "control.sock", "control.sock.lock"])
        self.assertIn("removed %s" % os.path.join(rundir, private[0]), d.log())
        out, _ = self.bw("export", "list", "--names", "--socket", csock)
        self.assertEqual(out.split(), ["a"])

    def test_control_socket_from_the_config_file(self):
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        conf = self.path("bw.toml")
        other = self.path("run/other.sock")
        with open(conf, "w") as f:
            f.write('listen = ["127.0.0.1:%d"]\ndata-dir = "%s"\n[control]\nsocket = "%s"\nmode = "0660"\n'
                    '[[export]]\nname = "a"\nuri = "file://%s"\n' % (harness.free_port(), self.data, other, img))
        self.start_daemon(["--config", conf])
        self.assertEqual(stat.S_IMODE(os.stat(other).st_mode), 0o660)
        out, _ = self.bw("export", "list", "--names", "--socket", other)
        self.assertEqual(out.split(), ["a"])
        with open(conf, "a") as f:
            f.write("[control]\nbogus = 1\n")
        p = subprocess.run([harness.BLOCKWAYD, "--config", conf], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=30)
        self.assertEqual(p.returncode, 2)
        # "off": no control socket at all.
        d = harness.Daemon(self.tmp, ["--listen", "127.0.0.1:%d" % harness.free_port(), "--data-dir", self.data,
                                      "--control-socket", "off", "--export", "b=file://" + img], name="nocontrol")
        self.addCleanup(d.cleanup)
        d.start()
        self.assertNotIn("control socket", d.full_log())


    def test_control_group_flag(self):
        import grp
        img = harness.make_sparse_image(self.path("a.img"), 4 * MiB)
        # A group this process may give its socket: any as root, else its own.
        group = grp.getgrnam("daemon") if os.geteuid() == 0 else grp.getgrgid(os.getgid())
        help_text = subprocess.run([harness.BLOCKWAYD, "--help"], stdout=subprocess.PIPE, timeout=30).stdout.decode()
        self.assertIn("--control-group GROUP", help_text)
        conf = self.path("bw.toml")
        with open(conf, "w") as f:
            f.write('[control]\ngroup = "%s"\n' % grp.getgrgid(os.getgid()).gr_name)
        base = ["--listen", "127.0.0.1:%d" % harness.free_port(), "--data-dir", self.data,
                "--control-socket", self.csock, "--export", "a=file://" + img]
        # The flag wins over [control] group; with a group the mode is 0660.
        d = self.start_daemon(base + ["--config", conf, "--control-group", group.gr_name])
        st = os.stat(self.csock)
        self.assertEqual((st.st_gid, stat.S_IMODE(st.st_mode)), (group.gr_gid, 0o660))
        self.assertEqual(self.bwj("export", "list")["exports"][0]["name"], "a")
        d.stop()
        # By number too.
        d = self.start_daemon(base + ["--control-group=%d" % group.gr_gid], name="bynumber")
        self.assertEqual(os.stat(self.csock).st_gid, group.gr_gid)
        d.stop()
        # A group that does not exist, or none at all: exit 2 before anything starts.
        for extra, message in ((["--control-group", "no-such-group-here"],
                                "--control-group 'no-such-group-here': no such group"),
                               (["--control-group="], "--control-group is empty"),
                               (["--control-group"], "--control-group needs a value")):
            p = subprocess.run([harness.BLOCKWAYD] + base + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=30)
            self.assertEqual(p.returncode, 2, extra)
            self.assertIn(message, p.stderr.decode())
            self.assertFalse(os.path.exists(self.csock))


class RuntimeExports(ControlTestCase):
    def test_add_remove_persist_across_restart(self):
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=3)
        remote_img = harness.make_random_image(self.path("r.img"), 8 * MiB, seed=4)
        k = self.nbdkit(remote_img)
        d = self.start({"base": "file://" + img})
        r = self.bwj("export", "add", "added", "file://" + img, "ro,description=added at run time")
        self.assertEqual(r["name"], "added")
        self.assertTrue(r["read_only"])
        out, _ = self.bw("export", "add", "net=%s,cache=%s,mode=writethrough" % (k.uri, self.path("cache")))
        self.assertIn("export 'net' added", out)
        # Served at once.
        self.assertEqual(self.connect(self.uri("added")).pread(4096, 4096), harness.read_file(img, 4096, 4096))
        self.assertEqual(self.connect(self.uri("net")).pread(8192, MiB), harness.read_file(remote_img, MiB, 8192))
        # Refusals and failures.
        _, err = self.bw("export", "add", "added", "file://" + img, expect=EXIT_REFUSED)
        self.assertIn("already exists", err)
        _, err = self.bw("export", "add", "base", "file://" + img, expect=EXIT_REFUSED)
        _, err = self.bw("export", "add", "missing", "file://" + self.path("nope.img"), expect=EXIT_FAILED)
        self.assertIn("cannot add export 'missing'", err)
        _, err = self.bw("export", "add", "badopt", "file://" + img, "frob=1", expect=EXIT_FAILED)
        self.assertIn("frob", err)
        _, err = self.bw("export", "add", "badscheme", "gopher://x/y", expect=EXIT_FAILED)
        _, err = self.bw("export", "add", "down", "nbd://127.0.0.1:%d/" % harness.free_port(),
                         "retry-timeout=1", expect=EXIT_FAILED)
        names = [e["name"] for e in self.bwj("export", "list")["exports"]]
        self.assertEqual(names, ["added", "base", "net"], "failed adds leave nothing behind")

        # Restart with the same data directory: the run-time exports come back.
        d.stop()
        d = self.start({"base": "file://" + img})
        names = [e["name"] for e in self.bwj("export", "list")["exports"]]
        self.assertEqual(names, ["added", "base", "net"])
        st = self.bwj("stats", "added")
        self.assertTrue(st["read_only"])
        self.assertEqual(st["description"], "added at run time")
        self.assertEqual(self.connect(self.uri("net")).pread(4096, 0), harness.read_file(remote_img, 0, 4096))

        # Remove one run-time export and the configured one; restart again.
        out, _ = self.bw("export", "remove", "added")
        self.assertIn("removed", out)
        out, _ = self.bw("export", "remove", "base")
        self.assertIn("configuration", out, "removing a configured export says it comes back")
        self.assertEqual([e["name"] for e in self.bwj("export", "list")["exports"]], ["net"])
        import nbd
        with self.assertRaises(nbd.Error):
            self.connect(self.uri("added"))
        d.stop()
        self.start({"base": "file://" + img})
        self.assertEqual([e["name"] for e in self.bwj("export", "list")["exports"]], ["base", "net"])

    def start_with_saved_export_gone(self, seed):
        """A daemon with export 'base', which saved a run-time export 'late'
        whose image then went away (moved to IMG.away). Returns (daemon,
        img, base)."""
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=seed)
        base = harness.make_sparse_image(self.path("base.img"), MiB)
        d = self.start({"base": "file://" + base})
        self.bw("export", "add", "late", "file://" + img)
        d.stop()
        os.rename(img, img + ".away")
        return self.start({"base": "file://" + base}), img, base

    def test_saved_export_that_cannot_open_is_skipped_and_kept(self):
        d, img, base = self.start_with_saved_export_gone(seed=6)
        listed = {e["name"]: e for e in self.bwj("export", "list")["exports"]}
        self.assertEqual(sorted(listed), ["base", "late"])
        self.assertTrue(listed["late"]["state"].startswith("failed: "), listed["late"])
        self.assertIn("export 'late' added at run time cannot be opened", d.log())
        d.stop()
        os.rename(img + ".away", img)
        self.start({"base": "file://" + base})
        self.assertEqual([e["name"] for e in self.bwj("export", "list")["exports"]], ["base", "late"])
        self.assertEqual(self.connect(self.uri("late")).pread(4096, 0), harness.read_file(img, 0, 4096))

    def test_saved_export_that_cannot_open_opens_once_its_image_is_back(self):
        d, img, base = self.start_with_saved_export_gone(seed=8)
        os.rename(img + ".away", img)
        harness.wait_until(lambda: self.states().get("late") == "open", 30, interval=0.5, what="'late' to open")
        self.assertRegex(d.log(), r"export 'late': .* opened at attempt \d+")
        self.assertEqual(self.connect(self.uri("late")).pread(MiB, MiB), harness.read_file(img, MiB, MiB))
        # Still a run-time export: saved, and open at the next start.
        d.stop()
        self.start({"base": "file://" + base})
        self.assertEqual(self.states(), {"base": "open", "late": "open"})

    def states(self):
        return {e["name"]: e["state"] for e in self.bwj("export", "list")["exports"]}

    def test_export_whose_remote_is_down_at_start_opens_once_it_is_back(self):
        """One configured export whose remote is down (and its clone) does not
        stop the daemon: the others are served, the two are listed as failed
        and retried in the background, and served once the remote is up."""
        import nbd
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=11)
        remote_img = harness.make_random_image(self.path("r.img"), 8 * MiB, seed=12)
        port = harness.free_port()
        d = self.start({"a": "file://" + img, "b": "nbd://127.0.0.1:%d/" % port, "c": "clone:b"})
        self.assertIn("export 'b' cannot be opened; serving the others and retrying it", d.log())
        st = {e["name"]: e for e in self.bwj("status")["exports"]}
        self.assertEqual(st["a"]["state"], "open")
        for name in ("b", "c"):
            self.assertTrue(st[name]["state"].startswith("failed: "), st[name])
            self.assertTrue(st[name]["configured"], st[name])
        self.assertIn("Connection refused", st["b"]["error"])
        self.assertIn("its base export 'b'", st["c"]["error"])
        self.assertEqual(self.connect(self.uri("a")).pread(4096, 0), harness.read_file(img, 0, 4096))
        with self.assertRaises(nbd.Error):
            self.connect(self.uri("b"))
        remotes.started(self, remotes.Nbdkit(self.tmp, remote_img, port=port))
        harness.wait_until(lambda: set(self.states().values()) == {"open"}, 30, interval=0.5,
                           what="'b' and 'c' to open")
        self.assertEqual(self.connect(self.uri("b")).pread(8192, MiB), harness.read_file(remote_img, MiB, 8192))
        c = self.connect(self.uri("c"))
        self.assertEqual(c.pread(8192, 3 * MiB), harness.read_file(remote_img, 3 * MiB, 8192))
        before = harness.read_file(remote_img, 0, 4096)
        c.pwrite(b"\x5a" * 4096, 0)  # into the clone's overlay, not the remote
        self.assertEqual(c.pread(4096, 0), b"\x5a" * 4096)
        self.assertEqual(harness.read_file(remote_img, 0, 4096), before)
        d.stop()

    def retrying_on_a_hung_remote(self, seed):
        """A daemon with export 'a' and export 'b' whose nbdkit was down at
        the start, then came up frozen (SIGSTOP: the kernel accepts its
        connections, nothing answers the handshake) with 'b' io-timeout=20:
        returned once the background retry of 'b' is connected and waiting
        on it. Returns (daemon, img)."""
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=seed)
        remote_img = harness.make_random_image(self.path("r.img"), 4 * MiB, seed=seed + 1)
        port = harness.free_port()
        d = self.start({"a": "file://" + img, "b": "nbd://127.0.0.1:%d/,io-timeout=20" % port})
        # After the first retry (2 s), the next is 4 s away: time to start
        # nbdkit and freeze it before that one connects.
        harness.wait_until(lambda: self.failed_attempts("b") >= 2, 15, interval=0.1, what="the first retry")
        k = remotes.started(self, remotes.Nbdkit(self.tmp, remote_img, port=port))
        frozen = k.frozen()
        frozen.__enter__()
        self.addCleanup(frozen.__exit__, None, None, None)

        def retry_connected():
            out = subprocess.run(["ss", "-Htn", "state", "established", "( dport = :%d )" % port],
                                 stdout=subprocess.PIPE, check=True).stdout.decode()
            return bool(out.strip())
        harness.wait_until(retry_connected, 15, interval=0.1, what="the retry of 'b' to connect")
        return d, img

    def test_a_clone_named_before_its_failed_base_opens_right_after_it(self):
        """The retries go in name order: 'aclone' is tried before its base
        'base' in the round that opens 'base', and must not wait for the
        next round (4 s, 8 s ... up to a minute later) to follow it."""
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=19)
        remote_img = harness.make_random_image(self.path("r.img"), 8 * MiB, seed=20)
        port = harness.free_port()
        d = self.start({"z": "file://" + img, "base": "nbd://127.0.0.1:%d/" % port, "aclone": "clone:base"})
        harness.wait_until(lambda: self.failed_attempts("base") >= 3, 20, interval=0.1, what="two retries")
        remotes.started(self, remotes.Nbdkit(self.tmp, remote_img, port=port))
        harness.wait_until(lambda: self.states()["base"] == "open", 20, interval=0.1, what="'base' to open")
        harness.wait_until(lambda: self.states()["aclone"] == "open", 2, interval=0.1,
                           what="'aclone' to open right after its base")
        self.assertEqual(self.connect(self.uri("aclone")).pread(8192, MiB), harness.read_file(remote_img, MiB, 8192))
        d.stop()

    def failed_attempts(self, name):
        return {e["name"]: e.get("attempts", 0) for e in self.bwj("status")["exports"]}[name]

    def test_a_retry_on_a_hung_remote_gives_way_to_export_add_and_remove(self):
        """A background retry must not hold export-add or export-remove for
        the remote's io-timeout (they waited 20 s here)."""
        d, img = self.retrying_on_a_hung_remote(seed=15)
        began = time.monotonic()
        self.bw("export", "add", "x", "file://" + img)
        self.assertLess(time.monotonic() - began, 5, "export add waited for the retry")
        st = {e["name"]: e for e in self.bwj("status")["exports"]}
        self.assertEqual(st["x"]["state"], "open")
        self.assertTrue(st["b"]["state"].startswith("failed: "), st["b"])
        self.assertNotIn("abandoned", st["b"]["error"], "an abandoned retry is not a reason")
        self.assertEqual(st["b"]["attempts"], 2, "nor an attempt")
        self.assertEqual(self.connect(self.uri("x")).pread(4096, 0), harness.read_file(img, 0, 4096))
        began = time.monotonic()
        out, _ = self.bw("export", "remove", "b")
        self.assertLess(time.monotonic() - began, 5, "export remove waited for the retry")
        self.assertIn("export 'b'", out)
        self.assertEqual(self.states(), {"a": "open", "x": "open"})
        d.stop()

    def test_sigterm_during_a_retry_on_a_hung_remote_stops_at_once(self):
        d, _ = self.retrying_on_a_hung_remote(seed=17)
        began = time.monotonic()
        d.stop(timeout=40)
        self.assertLess(time.monotonic() - began, 5, "the stop waited for the retry's handshake:\n" + d.log())
        self.assertNotIn("opened at attempt", d.full_log())

    def test_a_saved_export_named_like_a_failed_configured_one_is_not_served_beside_it(self):
        """`export add b` while the configured 'b' has failed serves the
        added one; at the next start the configuration's 'b' is the one (the
        saved one was opened too, and 'b' was listed twice: open and
        failed, with blockway_exports_failed 1 for a served name)."""
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=21)
        remote_img = harness.make_random_image(self.path("r.img"), 8 * MiB, seed=22)
        port = harness.free_port()
        config = {"a": "file://" + img, "b": "nbd://127.0.0.1:%d/" % port}
        d = self.start(config)
        self.bw("export", "add", "b", "file://" + img)
        self.assertEqual(self.states(), {"a": "open", "b": "open"})
        d.stop()
        d = self.start(config)
        listed = [(e["name"], e["state"].split(":")[0]) for e in self.bwj("status")["exports"]]
        self.assertEqual(sorted(listed), [("a", "open"), ("b", "failed")])
        self.assertIn("export 'b' added at run time is also defined in the configuration: serving the "
                      "configuration's (nbd://127.0.0.1:%d/, which failed to open" % port, d.log())
        remotes.started(self, remotes.Nbdkit(self.tmp, remote_img, port=port))
        harness.wait_until(lambda: self.states() == {"a": "open", "b": "open"}, 30, interval=0.5,
                           what="the configured 'b' to open")
        self.assertEqual(self.connect(self.uri("b")).get_size(), 8 * MiB)
        d.stop()

    def test_failed_configured_export_is_removed_until_the_next_start(self):
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=13)
        self.start({"a": "file://" + img, "b": "file://" + self.path("later.img")})
        self.assertTrue(self.states()["b"].startswith("failed: "))
        out, _ = self.bw("export", "remove", "b")
        self.assertIn("back at the next start", out)
        self.assertEqual(self.states(), {"a": "open"})
        # No longer retried: its image appearing now changes nothing.
        harness.make_random_image(self.path("later.img"), 4 * MiB, seed=14)
        time.sleep(2.5)
        self.assertEqual(self.states(), {"a": "open"})
        # A daemon with nothing it could open still refuses to start.
        os.unlink(self.path("later.img"))
        self.start_refused("b=file://" + self.path("later.img"), "later.img")

    def test_failed_saved_export_shows_in_status_and_export_remove_drops_it(self):
        d, img, base = self.start_with_saved_export_gone(seed=7)
        # status, export list and stats show it, with the reason.
        st = {e["name"]: e for e in self.bwj("status")["exports"]}
        self.assertEqual(st["base"]["state"], "open")
        self.assertTrue(st["late"]["state"].startswith("failed: "), st["late"])
        self.assertIn("a.img", st["late"]["state"])
        out, _ = self.bw("status")
        self.assertRegex(out, r"(?m)^late +failed: .*a\.img")
        out, _ = self.bw("export", "list")
        self.assertRegex(out, r"(?m)^late +failed +- +- +file://")
        out, _ = self.bw("export", "list", "--names")
        self.assertEqual(out.split(), ["base", "late"], "completion offers it for export remove")
        out, _ = self.bw("stats", "late")
        self.assertIn("state:     failed: ", out)
        # Other commands say why they cannot act on it.
        _, err = self.bw("flush", "late", expect=EXIT_REFUSED)
        self.assertIn("failed: ", err)
        # export remove forgets it, at once and across a restart.
        out, _ = self.bw("export", "remove", "late")
        self.assertIn("removed", out)
        self.assertEqual([e["name"] for e in self.bwj("export", "list")["exports"]], ["base"])
        self.bw("export", "remove", "late", expect=EXIT_UNKNOWN)
        d.stop()
        os.rename(img + ".away", img)
        d = self.start({"base": "file://" + base})
        self.assertEqual([e["name"] for e in self.bwj("export", "list")["exports"]], ["base"])
        self.assertNotIn("late", d.full_log())
        # A failed one can also be replaced by adding it again (once it opens).
        self.bw("export", "add", "late", "file://" + img)
        d.stop()
        os.rename(img, img + ".away")
        self.start({"base": "file://" + base})
        os.rename(img + ".away", img)
        # The background retry may open it first: then the add finds it there.
        _, err = self.bw("export", "add", "late", "file://" + img, expect=None)
        if "already exists" not in err:
            self.assertEqual(err, "")
        st = {e["name"]: e for e in self.bwj("status")["exports"]}
        self.assertEqual(st["late"]["state"], "open")
        self.assertEqual(len(self.bwj("status")["exports"]), 2)

    def test_remove_with_connected_clients(self):
        img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=5)
        d = self.start({"a": "file://" + img})
        h = self.connect(self.uri("a"))
        _, err = self.bw("export", "remove", "a", expect=EXIT_REFUSED)
        self.assertIn("1 client connection", err)
        self.assertIn("force", err)
        out, _ = self.bw("export", "remove", "a", "--force")
        self.assertIn("closes when", out)
        # The connected client keeps working; a new one cannot open it.
        self.assertEqual(h.pread(4096, 0), harness.read_file(img, 0, 4096))
        h.pwrite(b"\x07" * 4096, 0)
        h.flush()
        import nbd
        with self.assertRaises(nbd.Error):
            self.connect(self.uri("a"))
        h.shutdown()
        # Re-adding the same image under the same name works once it is closed.
        self.bw("export", "add", "a", "file://" + img)
        self.assertEqual(self.connect(self.uri("a")).pread(4096, 0), b"\x07" * 4096)
        d.stop()


if __name__ == "__main__":
    unittest.main()
