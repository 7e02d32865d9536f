"""The control plane and the blockway command against a running daemon.

Every subcommand runs against real daemons with file and nbdkit remotes,
cached and not; --json output is parsed; exit codes are checked for every
kind of error; the raw socket is fed malformed, huge and unknown requests;
run-time exports survive a restart. The cache-control commands (prefetch,
detach, mode) need the cache's ExportControl: where a cached export offers
none (a build without it), those tests skip and say so.
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

EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_UNKNOWN, EXIT_REFUSED, EXIT_PROTOCOL = 1, 2, 3, 4, 5, 6
EXIT_TIMED_OUT = 7

NO_CONTROL = ("this daemon's cache offers no run-time control (ExportControl is not wired: "
              "the prefetch/detach work is not merged into this build)")


class ControlTestCase(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.data = self.path("data")
        self.csock = self.path("control.sock")

    # ---- helpers ----

    def bw(self, *args, expect=0, timeout=60, env_socket=False, input=None):
        """Runs blockway with --socket (or BLOCKWAY_SOCKET); asserts the exit code."""
        env = dict(os.environ)
        cmd = [harness.BLOCKWAY] + list(args)
        if env_socket:
            env["BLOCKWAY_SOCKET"] = self.csock
        elif "--socket" not in args:
            cmd += ["--socket", self.csock]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, env=env,
                           input=input)
        out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        if expect is not None:
            self.assertEqual(p.returncode, expect, "blockway %s: exit %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(args), p.returncode, out, err))
        return out, err

    def bwj(self, *args, expect=0):
        out, _ = self.bw(*(list(args) + ["--json"]), expect=expect)
        return json.loads(out)

    def start(self, exports, extra=(), name="blockwayd"):
        """exports: {name: 'URI[,options]'}."""
        args = ["--log-level", "debug", "--data-dir", self.data, "--control-socket", self.csock]
        self.port = harness.free_port()
        args += ["--listen", "127.0.0.1:%d" % self.port]
        for n, spec in exports.items():
            args += ["--export", "%s=%s" % (n, spec)]
        return self.start_daemon(args + list(extra), name)

    def nbdkit(self, img, name="nbdkit", filters=(), params=()):
        return remotes.started(self, remotes.Nbdkit(self.tmp, img, filters=filters, params=params, name=name))

    def raw(self, payload, read=True, timeout=10):
        """Sends raw bytes on the control socket; returns the response lines."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.csock)
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may hang up on a too-large line before reading all of it
            s.shutdown(socket.SHUT_WR)
            data = b""
            while read:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

    def has_cache_control(self, name):
        return self.bwj("stats", name)["cache"] is not None


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
        self.assertNotIn("control socket", d.log())


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
        self.assertNotIn("late", d.log())
        # A failed one can also be replaced by adding it again (once it opens).
        self.bw("export", "add", "late", "file://" + img)
        d.stop()
        os.rename(img, img + ".away")
        self.start({"base": "file://" + base})
        os.rename(img + ".away", img)
        self.bw("export", "add", "late", "file://" + img)
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


class CacheControl(ControlTestCase):
    """prefetch, detach and mode on cached exports over an nbdkit remote."""

    def setup_cached(self, size=32 * MiB):
        self.remote_img = harness.make_random_image(self.path("remote.img"), size, seed=9)
        self.k = self.nbdkit(self.remote_img)
        cache = self.path("cache")
        d = self.start({"vm": "%s,cache=%s,chunk=256k" % (self.k.uri, cache),
                        "other": "%s,cache=%s,chunk=256k" % (self.k.uri, cache),
                        "plain": "file://" + self.remote_img})
        if not self.has_cache_control("vm"):
            self.skipTest(NO_CONTROL)
        self.daemon = d
        return d

    def test_prefetch_wait_progress_bar_under_a_terminal(self):
        self.setup_cached()
        out, _ = self.bw("prefetch", "rate", "vm", "8M")
        self.assertIn("8.0 MiB/s", out)
        self.assertEqual(self.bwj("prefetch", "status", "vm")["rate_limit"], 8 * MiB)
        # script(1) gives blockway a pseudo-terminal: the bar is redrawn in place.
        cmd = "%s prefetch vm --wait --socket %s" % (harness.BLOCKWAY, self.csock)
        p = subprocess.run(["script", "-qfec", cmd, "/dev/null"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=120)
        out = p.stdout.decode(errors="replace")
        self.assertEqual(p.returncode, 0, out)
        self.assertIn("\r", out)
        frames = [f for f in out.split("\r") if "%" in f]
        self.assertGreater(len(frames), 2, "several redraws while it runs:\n" + out)
        self.assertIn("MB/s", out)
        self.assertIn("ETA", out)
        self.assertIn("[#", out)
        self.assertIn("100.0%", out)
        self.assertIn("complete", out)
        st = self.bwj("prefetch", "status", "vm")
        self.assertEqual(st["state"], "done")
        self.assertEqual(st["present_bytes"], 32 * MiB)
        self.assertEqual(self.bwj("stats", "vm")["present_bytes"], 32 * MiB)
        self.daemon.stop()

    def test_prefetch_plain_lines_pause_resume_rate(self):
        self.setup_cached()
        self.bw("prefetch", "rate", "other", "4M")
        out, _ = self.bw("prefetch", "start", "other")
        self.assertIn("started", out)
        self.bw("prefetch", "start", "other", expect=EXIT_REFUSED)  # already running
        self.bw("prefetch", "pause", "other")
        harness.wait_until(lambda: self.bwj("prefetch", "status", "other")["state"] == "paused", 10,
                           what="paused")
        time.sleep(0.5)  # copies already in flight when it paused may still land
        done1 = self.bwj("prefetch", "status", "other")["done_bytes"]
        self.assertLess(done1, 32 * MiB)
        time.sleep(1)
        self.assertEqual(self.bwj("prefetch", "status", "other")["done_bytes"], done1, "paused means no progress")
        out, _ = self.bw("status")
        self.assertIn("paused", out)
        self.bw("prefetch", "resume", "other")
        self.bw("prefetch", "rate", "other", "0")
        # Not a terminal: plain progress lines, then the end.
        out, _ = self.bw("prefetch", "other", "--wait", timeout=120)
        lines = out.splitlines()
        self.assertNotIn("\r", out)
        self.assertTrue(any("MB/s" in line and "ETA" in line for line in lines), out)
        self.assertIn("complete", lines[-1])
        j = self.bwj("prefetch", "other", "--wait")
        self.assertEqual(j["state"], "done")
        out, _ = self.bw("prefetch", "status", "other")
        self.assertIn("done", out)
        self.daemon.stop()

    def test_prefetch_wait_timeout(self):
        self.setup_cached(size=16 * MiB)
        self.bw("prefetch", "rate", "other", "1M")
        for bad in (["--timeout", "0"], ["--timeout", "soon"], ["--timeout", "-1"], ["--timeout", "1e300"]):
            _, err = self.bw("prefetch", "other", "--wait", *bad, expect=EXIT_USAGE)
            self.assertIn("--timeout", err)
        _, err = self.bw("prefetch", "status", "other", "--timeout", "1", expect=EXIT_USAGE)
        self.assertIn("goes with --wait", err)
        t0 = time.monotonic()
        out, err = self.bw("prefetch", "other", "--wait", "--timeout", "1.5", expect=EXIT_TIMED_OUT)
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 1.4)
        self.assertLess(elapsed, 10)
        self.assertIn("not complete after 1.5 s", err)
        self.assertIn("goes on", err)
        self.assertEqual(self.bwj("prefetch", "status", "other")["state"], "running", "only the waiting stopped")
        self.bw("prefetch", "rate", "other", "0")
        j = self.bwj("prefetch", "other", "--wait", "--timeout", "120")
        self.assertEqual(j["state"], "done")
        self.daemon.stop()

    def test_detach_and_mode(self):
        self.setup_cached(size=8 * MiB)
        # Missing chunks: refused, even with force, with a clear message.
        _, err = self.bw("detach", "vm", expect=EXIT_REFUSED)
        self.assertIn("not present", err)
        self.bw("detach", "vm", "--force", expect=EXIT_REFUSED)
        self.bw("mode", "vm", "writeback")
        self.assertEqual(self.bwj("stats", "vm")["mode"], "writeback")
        self.bw("mode", "vm", "writethrough")
        self.bw("prefetch", "vm", "--wait", timeout=120)
        out, _ = self.bw("detach", "vm")
        st = self.bwj("stats", "vm")
        self.assertTrue(st["cache"]["detached"])
        self.assertEqual(st["remote"]["kind"], "detached")
        self.k.kill()
        h = self.connect(self.uri("vm"))
        self.assertEqual(h.pread(65536, MiB), harness.read_file(self.remote_img, MiB, 65536))
        _, err = self.bw("mode", "vm", "writeback", expect=EXIT_REFUSED)
        out, _ = self.bw("status")
        self.assertIn("detached", out)
        self.daemon.stop()


class RunTimeSettings(ControlTestCase):
    """blockway mode / prefetch rate outlive a restart until the configuration changes."""

    def catalogue(self, sql):
        import sqlite3
        with sqlite3.connect(os.path.join(self.data, "catalogue.db")) as db:
            return db.execute(sql).fetchall()

    def test_mode_and_rate_persist_until_the_configuration_changes(self):
        img = harness.make_random_image(self.path("vm.img"), 4 * MiB, seed=11)
        rt_img = harness.make_random_image(self.path("rt.img"), 4 * MiB, seed=12)
        cache = self.path("cache")

        def start(mode="writethrough", rate=None):
            spec = "file://%s,cache=%s,chunk=256k,mode=%s" % (img, cache, mode)
            if rate:
                spec += ",prefetch-rate=" + rate
            return self.start({"vm": spec})

        def state(name):
            st = self.bwj("stats", name)
            return st["mode"], st["prefetch"]["rate_limit"]

        d = start()
        if not self.has_cache_control("vm"):
            self.skipTest(NO_CONTROL)
        self.bw("mode", "vm", "writeback")
        self.bw("prefetch", "rate", "vm", "3M")
        self.bw("export", "add", "rt", "file://" + rt_img, "cache=%s,chunk=256k,mode=writethrough" % cache)
        self.bw("mode", "rt", "writeback-local")
        self.bw("prefetch", "rate", "rt", "2M")
        d.stop()

        # Same configuration: the run-time changes win.
        d = start()
        self.assertEqual(state("vm"), ("writeback", 3 * MiB))
        self.assertEqual(state("rt"), ("writeback-local", 2 * MiB))
        self.assertIn("set at run time; the configuration says writethrough", d.log())
        d.stop()
        # A run-time export's saved options carry its changes.
        (options,), = self.catalogue("SELECT options FROM runtime_exports WHERE name = 'rt'")
        self.assertIn("mode=writeback-local", options)
        self.assertIn("prefetch-rate=2097152", options)
        self.assertEqual(options.count("mode="), 1, options)

        # The configuration's mode changed since: it wins, the saved mode is
        # dropped; the rate (its configured value unchanged) still applies.
        d = start(mode="writeback-local")
        self.assertEqual(state("vm"), ("writeback-local", 3 * MiB))
        self.assertIn("the configuration's mode changed from writethrough to writeback-local", d.log())
        # Setting the configured value again at run time drops the saved one.
        self.bw("prefetch", "rate", "vm", "0")
        d.stop()
        self.assertEqual(self.catalogue("SELECT key FROM runtime_settings WHERE name = 'vm'"), [])
        d = start(mode="writeback-local", rate="5M")
        self.assertEqual(state("vm"), ("writeback-local", 5 * MiB))
        d.stop()


    def test_a_run_time_settings_table_it_cannot_read_stops_the_start(self):
        import sqlite3
        img = harness.make_random_image(self.path("vm.img"), 4 * MiB, seed=16)
        os.makedirs(self.data)
        with sqlite3.connect(os.path.join(self.data, "catalogue.db")) as db:
            db.execute("CREATE TABLE runtime_settings (name TEXT, key TEXT, value TEXT)")  # no config_value
            db.execute("INSERT INTO runtime_settings VALUES ('vm', 'mode', 'writeback')")
        p = subprocess.run([harness.BLOCKWAYD, "--data-dir", self.data, "--control-socket", "off", "--listen",
                            "127.0.0.1:%d" % harness.free_port(), "--export",
                            "vm=file://%s,cache=%s,chunk=256k" % (img, self.path("cache"))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        err = p.stderr.decode(errors="replace")
        self.assertEqual(p.returncode, 2, err)
        self.assertIn("export 'vm': catalogue %s/catalogue.db: cannot read the run-time settings: "
                      "no such column: config_value" % self.data, err)

    def saved_mode(self, name, configured):
        """The mode the catalogue would apply at the next start."""
        rows = self.catalogue("SELECT value FROM runtime_settings WHERE name = '%s' AND key = 'mode'" % name)
        if rows:
            return rows[0][0]
        rows = self.catalogue("SELECT options FROM runtime_exports WHERE name = '%s'" % name)
        for (options,) in rows:
            for item in options.split(","):
                if item.startswith("mode="):
                    return item[len("mode="):]
        return configured

    def start_cached_vm(self, seed):
        """A daemon with export 'vm', a cached file export (256k chunks,
        writethrough) whose cache takes run-time control. Returns (daemon,
        its spec, the image, the cache directory)."""
        img = harness.make_random_image(self.path("vm.img"), 4 * MiB, seed=seed)
        cache = self.path("cache")
        spec = "file://%s,cache=%s,chunk=256k,mode=writethrough" % (img, cache)
        d = self.start({"vm": spec})
        if not self.has_cache_control("vm"):
            self.skipTest(NO_CONTROL)
        return d, spec, img, cache

    def test_concurrent_mode_switches_are_saved_in_the_order_they_took_effect(self):
        import random
        d, spec, _, cache = self.start_cached_vm(seed=13)
        rt_img = harness.make_random_image(self.path("rt.img"), 4 * MiB, seed=14)
        self.bw("export", "add", "rt", "file://" + rt_img, "cache=%s,chunk=256k,mode=writethrough" % cache)
        modes = ["writethrough", "writeback", "writeback-local"]
        rng = random.Random(5)
        for round_ in range(20):
            for name in ("vm", "rt"):
                wanted = [rng.choice(modes) for _ in range(16)]
                threads = [threading.Thread(target=self.bw, args=("mode", name, m)) for m in wanted]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                in_effect = self.bwj("stats", name)["mode"]
                self.assertEqual(self.saved_mode(name, "writethrough"), in_effect,
                                 "round %d, export %s: the saved mode is not the one in effect" % (round_, name))
        before = {n: self.bwj("stats", n)["mode"] for n in ("vm", "rt")}
        d.stop()
        self.start({"vm": spec})
        self.assertEqual({n: self.bwj("stats", n)["mode"] for n in ("vm", "rt")}, before)

    def test_export_remove_forgets_the_run_time_settings(self):
        d, spec, img, cache = self.start_cached_vm(seed=15)
        self.bw("mode", "vm", "writeback")
        self.bw("prefetch", "rate", "vm", "3M")
        self.assertEqual(len(self.catalogue("SELECT key FROM runtime_settings WHERE name = 'vm'")), 2)
        self.bw("export", "remove", "vm")
        self.assertEqual(self.catalogue("SELECT key FROM runtime_settings WHERE name = 'vm'"), [])
        self.assertIn("its 2 run-time setting(s) are forgotten", d.log())
        # Added again at run time under the same name: its own options apply.
        self.bw("export", "add", "vm", "file://" + img, "cache=%s,chunk=256k,mode=writethrough" % cache)
        st = self.bwj("stats", "vm")
        self.assertEqual((st["mode"], st["prefetch"]["rate_limit"]), ("writethrough", 0))
        self.bw("export", "remove", "vm")
        d.stop()
        # Back from the configuration at the next start: the configuration's values.
        self.start({"vm": spec})
        st = self.bwj("stats", "vm")
        self.assertEqual((st["mode"], st["prefetch"]["rate_limit"]), ("writethrough", 0))


class FuseMountAtRunTime(ControlTestCase):
    """`blockway mount DIR` / `blockway unmount`: the FUSE front end started and
    stopped through the control plane; exports added at run time appear."""

    def mounted(self, d):
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == d for line in f)

    def test_mount_unmount_and_exports_added_at_run_time(self):
        if not os.path.exists("/dev/fuse"):
            self.skipTest("no /dev/fuse")
        a = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=5)
        b = harness.make_random_image(self.path("b.img"), 2 * MiB, seed=6)
        d = self.start({"a": "file://" + a})
        mnt = self.path("mnt")
        self.addCleanup(lambda: subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL))
        out, _ = self.bw("mount", mnt)
        self.assertIn(mnt, out)
        self.assertTrue(self.mounted(mnt))
        self.assertEqual(os.listdir(mnt), ["a"])
        with open(os.path.join(mnt, "a"), "rb") as f, open(a, "rb") as g:
            self.assertEqual(f.read(), g.read())
        # A second mount is refused while the first one lives.
        _, err = self.bw("mount", self.path("other"), expect=5)
        self.assertIn("already mounted at " + mnt, err)
        # An export added at run time appears in the mount.
        self.bw("export", "add", "b", "file://" + b)
        harness.wait_until(lambda: sorted(os.listdir(mnt)) == ["a", "b"], 10, what="b in the mount")
        self.assertEqual(os.path.getsize(os.path.join(mnt, "b")), 2 * MiB)
        self.assertEqual(self.bwj("unmount")["mountpoint"], mnt)
        harness.wait_until(lambda: not self.mounted(mnt), 10, what="the unmount")
        _, err = self.bw("unmount", expect=5)
        self.assertIn("not mounted", err)
        # NBD keeps serving, and the front end mounts again.
        h = self.connect(self.uri("a"))
        self.assertEqual(h.pread(4096, 0), harness.read_file(a, 0, 4096))
        harness.close_handle(h)
        self.bw("mount", mnt)
        self.assertEqual(sorted(os.listdir(mnt)), ["a", "b"])
        d.stop()
        self.assertFalse(self.mounted(mnt), "SIGTERM must unmount")

    def test_mount_errors(self):
        self.start({})
        out, _ = self.bw("mount", "--help")
        self.assertIn("Usage: blockway mount DIR", out)
        req = self.raw(b'{"cmd":"mount","dir":"relative/path"}\n')
        self.assertFalse(req[0]["ok"])
        self.assertEqual(req[0]["error"]["code"], "bad-request")
        self.assertIn("absolute", req[0]["error"]["message"])
        # A file where the directory should be.
        f = self.path("file")
        open(f, "w").close()
        _, err = self.bw("mount", f, expect=1)
        self.assertIn(f, err)


if __name__ == "__main__":
    unittest.main()
