#!/usr/bin/env python3
"""blockwayd under systemd, with the pieces systemd would give it played by
the test: a NOTIFY_SOCKET (a Python datagram socket) receiving READY=1,
STATUS=, STOPPING=1 and WATCHDOG=1; a SIGSTOPped daemon whose pings stop;
socket activation by systemd-socket-activate (systemd's own tool), with the
client connecting before the daemon is ready, and a client waiting in the
listen queue of a passed socket while the daemon restarts; journal priority prefixes
(JOURNAL_STREAM naming the pipe the test gives as stderr); --log-format json.
"""

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BLOCKWAYD, DaemonTestCase, free_port, have, kill_pid,  # noqa: E402
                     make_random_image, make_sparse_image, run, wait_until)

MiB = 1 << 20


class NotifySocket:
    """What systemd listens on: a datagram socket at a path or an abstract name."""

    def __init__(self, path=None, abstract=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.sock.bind("\0" + abstract)
            self.env = "@" + abstract
        else:
            self.sock.bind(path)
            self.env = path
        self.messages = []

    def receive(self, timeout):
        """The next datagram's lines as a dict, or None after `timeout`."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return None
        data = self.sock.recv(4096).decode()
        self.messages.append(data)
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def wait_for(self, key, timeout, value=None):
        """Receives until a message has `key` (equal to `value` if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.receive(max(0.0, deadline - time.monotonic()))
            if m is not None and key in m and (value is None or value(m[key])):
                return m
        raise AssertionError("no %s within %.0fs; got %r" % (key, timeout, self.messages[-10:]))

    def count(self, key, seconds):
        """How many messages with `key` arrive in `seconds`."""
        n = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            m = self.receive(max(0.0, deadline - time.monotonic()))
            if m is not None and key in m:
                n += 1
        return n

    def close(self):
        self.sock.close()


class SystemdCase(DaemonTestCase):
    def spawn(self, args, env=None, stderr=None, prefix=()):
        """blockwayd with extra environment, its output in a log file (or
        `stderr`); stopped by pid in cleanup."""
        log = open(self.path("daemon.log"), "wb")
        self.addCleanup(log.close)
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(list(prefix) + [BLOCKWAYD] + list(args), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=stderr if stderr is not None else subprocess.STDOUT, env=full_env)

        def stop():
            if p.poll() is None:
                kill_pid(p)
            p.wait(10)
        self.addCleanup(stop)
        return p

    def log(self):
        with open(self.path("daemon.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def notify_socket(self, abstract=False):
        n = NotifySocket(abstract="bw-test-%d-%d" % (os.getpid(), time.monotonic_ns()) if abstract else None,
                         path=None if abstract else self.path("notify.sock"))
        self.addCleanup(n.close)
        return n

    def image(self, size=64 * MiB):
        return make_sparse_image(self.path("disk.img"), size)


def nbdinfo_size(uri):
    out = run(["nbdinfo", "--size", uri], timeout=30).stdout
    return int(out.decode().strip())


class NotifyTest(SystemdCase):
    def run_notify(self, abstract):
        n = self.notify_socket(abstract)
        port = free_port()
        p = self.spawn(["--listen", "127.0.0.1:%d" % port, "--export", "vm1=file://" + self.image(),
                        "--control-socket", "off"], env={"NOTIFY_SOCKET": n.env})
        first = n.receive(10)
        self.assertIsNotNone(first, self.log())
        self.assertEqual(first.get("STATUS"), "opening exports")
        ready = n.wait_for("READY", 10)
        self.assertEqual(ready["READY"], "1")
        self.assertEqual(ready["STATUS"], "serving 1 export to 0 clients")
        # READY means the listener accepts and the export serves.
        self.assertEqual(nbdinfo_size("nbd://127.0.0.1:%d/vm1" % port), 64 * MiB)
        # The status is refreshed while a client stays connected.
        client = subprocess.Popen(["nbdsh", "-u", "nbd://127.0.0.1:%d/vm1" % port, "-c", "import time; time.sleep(15)"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (kill_pid(client), client.wait(10)))
        n.wait_for("STATUS", 15, value=lambda s: s == "serving 1 export to 1 client")
        p.send_signal(signal.SIGTERM)
        stopping = n.wait_for("STOPPING", 10)
        self.assertEqual(stopping["STOPPING"], "1")
        self.assertTrue(stopping["STATUS"].startswith("stopping: 1 client"), stopping)
        kill_pid(client)
        client.wait(10)
        self.assertEqual(p.wait(40), 0, self.log())
        self.assertNotIn("WATCHDOG=1", "".join(n.messages), "no WATCHDOG_USEC, no pings")

    def test_ready_status_stopping_on_a_path(self):
        self.run_notify(abstract=False)

    def test_ready_status_stopping_on_an_abstract_socket(self):
        self.run_notify(abstract=True)

    def test_status_shows_prefetch_progress(self):
        n = self.notify_socket()
        img = make_random_image(self.path("full.img"), 16 * MiB)
        os.mkdir(self.path("cache"))
        p = self.spawn(["--listen", "127.0.0.1:%d" % free_port(), "--control-socket", "off", "--export",
                        "vm1=file://%s,cache=%s,prefetch=sequential,prefetch-rate=1M" % (img, self.path("cache"))],
                       env={"NOTIFY_SOCKET": n.env})
        n.wait_for("READY", 10)
        m = n.wait_for("STATUS", 15, value=lambda s: "prefetch" in s)
        self.assertRegex(m["STATUS"], r"^serving 1 export to 0 clients; prefetch vm1 \d+\.\d%$")
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0, self.log())

    def test_without_notify_socket_nothing_changes(self):
        port = free_port()
        d = self.start_daemon(["--listen", "127.0.0.1:%d" % port, "--export", "vm1=file://" + self.image(),
                               "--control-socket", "off"])
        self.assertEqual(nbdinfo_size("nbd://127.0.0.1:%d/vm1" % port), 64 * MiB)
        d.stop()

    def test_bad_notify_socket_is_ignored_with_a_warning(self):
        port = free_port()
        p = self.spawn(["--listen", "127.0.0.1:%d" % port, "--export", "vm1=file://" + self.image(),
                        "--control-socket", "off"], env={"NOTIFY_SOCKET": "relative/path"})
        wait_until(lambda: "listening on" in self.log(), 10, what="listening")
        self.assertIn("NOTIFY_SOCKET 'relative/path' is not a socket path", self.log())
        self.assertEqual(nbdinfo_size("nbd://127.0.0.1:%d/vm1" % port), 64 * MiB)
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0, self.log())


class WatchdogTest(SystemdCase):
    def test_pings_stop_while_the_daemon_is_stopped(self):
        n = self.notify_socket()
        port = free_port()
        # 0.4 s: a ping every 0.1 s while every loop ticks.
        p = self.spawn(["--listen", "127.0.0.1:%d" % port, "--export", "vm1=file://" + self.image(),
                        "--control-socket", "off", "--threads", "2"],
                       env={"NOTIFY_SOCKET": n.env, "WATCHDOG_USEC": "400000"})
        n.wait_for("READY", 10)
        # About 10 a second are sent; fewer on a loaded machine.
        self.assertGreaterEqual(n.count("WATCHDOG", 1.0), 3, n.messages[-5:])
        os.kill(p.pid, signal.SIGSTOP)
        try:
            time.sleep(0.2)  # a ping sent just before the stop may be queued
            while n.receive(0) is not None:
                pass
            self.assertEqual(n.count("WATCHDOG", 1.5), 0, "a stopped daemon must not ping")
        finally:
            os.kill(p.pid, signal.SIGCONT)
        self.assertGreaterEqual(n.count("WATCHDOG", 1.0), 3, "pings resume after SIGCONT")
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0, self.log())
        self.assertIn("watchdog: every event loop checked every 100 ms", self.log())

    def test_watchdog_meant_for_another_process_is_not_honoured(self):
        n = self.notify_socket()
        p = self.spawn(["--listen", "127.0.0.1:%d" % free_port(), "--export", "vm1=file://" + self.image(),
                        "--control-socket", "off"],
                       env={"NOTIFY_SOCKET": n.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        n.wait_for("READY", 10)
        self.assertEqual(n.count("WATCHDOG", 1.0), 0)
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0, self.log())


@unittest.skipUnless(have("systemd-socket-activate"), "systemd-socket-activate missing")
class SocketActivationTest(SystemdCase):
    def activate(self, sockets, args, names=None, env=None):
        """blockwayd started by systemd-socket-activate on `sockets` (its -l
        arguments): it execs blockwayd at the first connection."""
        prefix = ["systemd-socket-activate"]
        for s in sockets:
            prefix += ["-l", s]
        if names:
            prefix += ["--fdname=" + ":".join(names)]
        for k, v in (env or {}).items():
            prefix += ["-E", "%s=%s" % (k, v)]
        p = self.spawn(args, prefix=prefix)
        wait_until(lambda: "Listening on" in self.log(), 10, what="systemd-socket-activate listening")
        return p

    def test_client_connects_before_the_daemon_is_ready(self):
        port = free_port()
        sock = self.path("nbd.sock")
        n = self.notify_socket()
        p = self.activate(["127.0.0.1:%d" % port, sock],
                          ["--export", "vm1=file://" + self.image(), "--control-socket", "off"],
                          names=["tcp", "unix"], env={"NOTIFY_SOCKET": n.env})
        # No daemon yet: this connection starts it, and is served once it is up.
        self.assertEqual(nbdinfo_size("nbd://127.0.0.1:%d/vm1" % port), 64 * MiB)
        n.wait_for("READY", 10)
        self.assertEqual(nbdinfo_size("nbd+unix:///vm1?socket=" + sock), 64 * MiB)
        log = self.log()
        self.assertIn("listening on 127.0.0.1:%d (socket passed by systemd: tcp)" % port, log)
        self.assertIn("listening on unix:%s (socket passed by systemd: unix)" % sock, log)
        # The daemon bound nothing else: the default 127.0.0.1:10809 is not added.
        self.assertNotIn(":10809", log)
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0, log)
        self.assertTrue(os.path.exists(sock), "the passed socket's file is its creator's to remove")

    def test_passed_socket_matched_to_a_configured_listener(self):
        passed, own = free_port(), free_port()
        cfg = self.path("blockwayd.toml")
        with open(cfg, "w") as f:
            f.write('listen = ["127.0.0.1:%d", "127.0.0.1:%d"]\n' % (passed, own))
            f.write('[control]\nsocket = "off"\n[[export]]\nname = "vm1"\nuri = "file://%s"\n' % self.image())
        p = self.activate(["127.0.0.1:%d" % passed], ["--config", cfg])
        self.assertEqual(nbdinfo_size("nbd://127.0.0.1:%d/vm1" % passed), 64 * MiB)
        wait_until(lambda: "listening on 127.0.0.1:%d\n" % own in self.log(), 10, what="own listener")
        self.assertEqual(nbdinfo_size("nbd://127.0.0.1:%d/vm1" % own), 64 * MiB)
        self.assertIn("listening on 127.0.0.1:%d (socket passed by systemd)" % passed, self.log())
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0, self.log())

    def test_passed_socket_matching_no_listener_is_refused(self):
        passed, configured = free_port(), free_port()
        p = self.activate(["127.0.0.1:%d" % passed],
                          ["--listen", "127.0.0.1:%d" % configured, "--export", "vm1=file://" + self.image(),
                           "--control-socket", "off"], names=["nbd"])
        with socket.create_connection(("127.0.0.1", passed), timeout=10):
            self.assertEqual(p.wait(20), 2)
        self.assertIn("socket 127.0.0.1:%d passed by systemd (nbd) matches no listen address" % passed, self.log())


class RestartTest(SystemdCase):
    """What systemd does across a restart, played by the test: it holds the
    listening socket and passes it to each new daemon as fd 3."""

    def start_on(self, listener, name, expect_exit=None):
        fd = listener.fileno()
        pid_file = self.path(name + ".pid")
        log = open(self.path(name + ".log"), "wb")
        self.addCleanup(log.close)
        move = "" if fd == 3 else "exec 3<&%d %d<&-; " % (fd, fd)  # to fd 3, where sd_listen_fds(3) looks
        script = move + 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd; exec "$@"'
        p = subprocess.Popen(["bash", "-c", script, "bash", BLOCKWAYD, "--export", "vm1=file://" + self.image(),
                              "--control-socket", "off", "--pid-file", pid_file],
                             pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def stop():
            if p.poll() is None:
                kill_pid(p)
            p.wait(10)
        self.addCleanup(stop)
        if expect_exit is not None:
            self.assertEqual(p.wait(20), expect_exit)
            with open(self.path(name + ".log")) as f:
                return f.read()
        wait_until(lambda: os.path.exists(pid_file) or p.poll() is not None, 10, what=name + " ready")
        if p.poll() is not None:
            with open(self.path(name + ".log")) as f:
                self.fail("%s exited with %d:\n%s" % (name, p.returncode, f.read()))
        return p

    def test_a_client_waits_through_a_restart(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        uri = "nbd://127.0.0.1:%d/vm1" % listener.getsockname()[1]
        first = self.start_on(listener, "first")
        self.assertEqual(nbdinfo_size(uri), 64 * MiB)
        first.send_signal(signal.SIGTERM)
        self.assertEqual(first.wait(40), 0)
        # No daemon now: the client's connection waits in the listen queue.
        client = subprocess.Popen(["nbdinfo", "--size", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: (kill_pid(client), client.wait(10)))
        time.sleep(0.5)
        self.assertIsNone(client.poll(), "the client must wait, not be refused")
        self.start_on(listener, "second")
        out, err = client.communicate(timeout=30)
        self.assertEqual(client.returncode, 0, err)
        self.assertEqual(int(out.decode().strip()), 64 * MiB)
        with open(self.path("second.log")) as f:
            self.assertIn("(socket passed by systemd: nbd)", f.read())


    def test_a_passed_socket_that_cannot_accept_is_refused(self):
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # a datagram socket; a stream one not listening
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", 0))
                log = self.start_on(s, "bad%d" % kind, expect_exit=2)
                self.assertIn("blockwayd: passed fd 3 is not a listening stream socket", log)


class JournalTest(SystemdCase):
    LINE = re.compile(r"^<([0-7])>(trace|debug|info |warning|error|critical) \[[\w.-]+\] ")

    def run_to_journal_pipe(self, args, matching=True, env=None):
        r, w = os.pipe()
        st = os.fstat(w)
        env = dict(env or {}, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino + (0 if matching else 1)))
        p = self.spawn(args, env=env, stderr=w)
        os.close(w)
        return p, r

    def read_all(self, fd, timeout=40):
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
        os.close(fd)
        return out.decode(errors="replace")

    def test_lines_carry_priorities_and_no_timestamp(self):
        port = free_port()
        p, r = self.run_to_journal_pipe(["--listen", "127.0.0.1:%d" % port, "--export",
                                         "vm1=file://" + self.image(), "--control-socket", "off",
                                         "--pid-file", self.path("pid")],
                                        env={"NOTIFY_SOCKET": "relative"})  # makes a warning
        wait_until(lambda: os.path.exists(self.path("pid")), 10, what="pid file")
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0)
        text = self.read_all(r)
        lines = text.splitlines()
        self.assertTrue(lines, "no output")
        for line in lines:
            m = self.LINE.match(line)
            self.assertIsNotNone(m, "not a journal line: %r" % line)
            self.assertEqual(m.group(1), {"info ": "6", "warning": "4", "error": "3", "debug": "7",
                                          "trace": "7", "critical": "2"}[m.group(2)], line)
        self.assertTrue(any(line.startswith("<6>info  [daemon] listening on") for line in lines), text)
        self.assertTrue(any(line.startswith("<4>warning [systemd] NOTIFY_SOCKET 'relative'") for line in lines), text)
        self.assertNotRegex(text, r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

    def test_configuration_error_is_priority_3(self):
        p, r = self.run_to_journal_pipe(["--export", "vm1=nosuch://x", "--control-socket", "off"])
        self.assertEqual(p.wait(20), 2)
        text = self.read_all(r)
        self.assertRegex(text, r"(?m)^<3>blockwayd: .*nosuch")

    def test_other_stderr_keeps_timestamps(self):
        p, r = self.run_to_journal_pipe(["--listen", "127.0.0.1:%d" % free_port(), "--export",
                                         "vm1=file://" + self.image(), "--control-socket", "off",
                                         "--pid-file", self.path("pid")], matching=False)
        wait_until(lambda: os.path.exists(self.path("pid")), 10, what="pid file")
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0)
        text = self.read_all(r)
        self.assertRegex(text, r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} info  \[daemon\] listening on")
        self.assertNotRegex(text, r"(?m)^<\d>")


class JsonLogTest(SystemdCase):
    def check_json_log(self, args, journal=False):
        pid_file = self.path("pid")
        env = {}
        r, w = os.pipe()
        if journal:
            st = os.fstat(w)
            env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        p = self.spawn(args + ["--pid-file", pid_file, "--control-socket", "off"], env=env, stderr=w)
        os.close(w)
        wait_until(lambda: os.path.exists(pid_file), 10, what="pid file")
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(40), 0)
        text = JournalTest.read_all(self, r)
        records = []
        for line in text.splitlines():
            if journal:
                self.assertRegex(line, r"^<[2-7]>\{")
                line = line[3:]
            rec = json.loads(line)
            self.assertEqual(set(rec), {"time", "level", "logger", "message", "pid", "thread"}, rec)
            self.assertRegex(rec["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
            self.assertIn(rec["level"], ("trace", "debug", "info", "warning", "error", "critical"))
            self.assertEqual(rec["pid"], p.pid)
            records.append(rec)
        self.assertTrue(any(r["logger"] == "daemon" and r["message"].startswith("listening on") for r in records),
                        text)
        return records

    def test_flag(self):
        records = self.check_json_log(["--log-format", "json", "--listen",
                                       "127.0.0.1:%d" % free_port(), "--export",
                                       'vm"1=file://' + self.image() + ',description=tab\there'])
        self.assertTrue(any("'vm\"1'" in r["message"] for r in records), "quotes survive the escaping")

    def test_config_file_and_journal(self):
        cfg = self.path("blockwayd.toml")
        with open(cfg, "w") as f:
            f.write('log-format = "json"\nlisten = ["127.0.0.1:%d"]\n' % free_port())
            f.write('[[export]]\nname = "vm1"\nuri = "file://%s"\n' % self.image())
        self.check_json_log(["--config", cfg], journal=True)

    def test_bad_format_is_refused(self):
        p = run([BLOCKWAYD, "--log-format", "xml"], check=False, timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"--log-format 'xml' is not one of text, json", p.stderr)
        cfg = self.path("bad.toml")
        with open(cfg, "w") as f:
            f.write('log-format = "yaml"\n')
        p = run([BLOCKWAYD, "--config", cfg], check=False, timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"log-format 'yaml' is not one of text, json", p.stderr)


class HelpManTest(unittest.TestCase):
    """blockwayd --help-man SECTION, what the build makes the man pages from."""

    def test_sections(self):
        for section, needle in (("options", b"*--log-format* _FORMAT_"), ("uris", b"*nbd://HOST[:PORT]/EXPORT*"),
                                ("export-options", b"*cache*=_DIR_"), ("fuse-options", b"*allow-other*"),
                                ("exit-status", b"*2*\n\ta configuration mistake")):
            p = run([BLOCKWAYD, "--help-man", section], timeout=20)
            self.assertIn(needle, p.stdout, section)

    def test_unknown_section_is_refused(self):
        p = run([BLOCKWAYD, "--help-man", "everything"], check=False, timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"--help-man 'everything' is not one of options, uris", p.stderr)
        p = run([BLOCKWAYD, "--help-man"], check=False, timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"--help-man needs a value", p.stderr)


if __name__ == "__main__":
    unittest.main()
