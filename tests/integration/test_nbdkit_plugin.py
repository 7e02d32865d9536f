"""The nbdkit plugin (nbdkit-blockway-plugin.so): blockway's export stack
served by nbdkit, driven by real clients (nbdcopy, nbdinfo, fio, libnbd).

- `nbdkit --dump-plugin` and `--help` describe it; bad keys make nbdkit exit
  non-zero with the message blockwayd gives for the same mistake;
- nbdcopy in and out through the plugin over a file, and the capabilities
  nbdinfo sees equal what blockwayd reports for the same stack;
- a file that grows while served reaches new connections (uncached);
- fio verify through a cache in writeback-local over an nbdkit remote, read
  back by a second nbdkit on the same cache after a clean stop;
- under nbdkit's cow filter (the image stays untouched) and retry filter
  (the remote is killed and restarted while a read waits);
- the cache's SIGKILL crash test (tests/integration/crash_common.py) with
  nbdkit killed instead of blockwayd: flushed writes survive.

The plugin is found beside blockwayd (BLOCKWAYD's directory) unless
BLOCKWAY_NBDKIT_PLUGIN names it. nbdkit sets PR_SET_PDEATHSIG(SIGTERM), so
every nbdkit here is started from the test's main thread.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crash_common  # noqa: E402
import harness  # noqa: E402
import remotes  # noqa: E402
from test_fio import fio  # noqa: E402

MiB = harness.MiB
PLUGIN = os.environ.get("BLOCKWAY_NBDKIT_PLUGIN",
                        os.path.join(os.path.dirname(harness.BLOCKWAYD), "nbdkit-blockway-plugin.so"))


# A stand-in for the Swift demangler ASan looks up when it initialises. nbdkit
# is not instrumented, so the preloaded ASan runtime initialises lazily, at
# the first malloc: that is inside libp11-kit's constructor (linked by
# nbdkit through gnutls), within newlocale(), which holds glibc's setlocale
# write lock. ASan's start-up then dlsym()s "swift_demangle"; the failed
# lookup's dlerror() translates its message (dcgettext), taking that lock's
# read side and "unlocking" it, which leaves the lock's reader count at -1.
# The next message translated (any strerror, as in every failed open) and
# libp11-kit's destructor (freelocale, a write lock) then wait forever: nbdkit
# hung at exit after a failed open, with its own file plugin as with ours.
# With the symbol there the lookup succeeds and nothing is translated.
_SHIM_SOURCE = ("#include <stddef.h>\n"
                "char *swift_demangle(const char *m, size_t l, char *o, size_t *ol, unsigned f)\n"
                "{ (void)m; (void)l; (void)o; (void)ol; (void)f; return NULL; }\n")
_shim = []


def asan_swift_demangle_shim():
    """The shim as a shared object, built once per test process."""
    if not _shim:
        import tempfile
        d = tempfile.mkdtemp(prefix="bw-asan-shim-")
        src, so = os.path.join(d, "shim.c"), os.path.join(d, "swift_demangle_shim.so")
        with open(src, "w") as f:
            f.write(_SHIM_SOURCE)
        harness.run(["cc", "-shared", "-fPIC", "-o", so, src], timeout=60)
        _shim.append(so)
    return _shim[0]


def nbdkit_env(plugin=PLUGIN):
    """The environment nbdkit needs for `plugin`: in the sanitizer build the
    plugin links libasan, whose runtime must come first in the process, so it
    is preloaded (with libstdc++, and the shim above) (nbdkit itself is not
    instrumented, so its own allocations left at exit are not checked for
    leaks)."""
    env = dict(os.environ)
    ldd = subprocess.run(["ldd", plugin], capture_output=True, text=True).stdout
    m = re.search(r"libasan\.so\S* => (\S+)", ldd)
    if m:
        # libstdc++ too: ASan resolves the real __cxa_throw when it starts,
        # and nbdkit (C) loads libstdc++ only with the plugin, so a throw in
        # the plugin would hit ASan's "real___cxa_throw != 0" check.
        cxx = re.search(r"libstdc\+\+\.so\S* => (\S+)", ldd)
        env["LD_PRELOAD"] = " ".join([m.group(1)] + ([cxx.group(1)] if cxx else []) + [asan_swift_demangle_shim()])
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":detect_leaks=0"
    return env


class PluginServer(remotes.PeerProcess):
    """nbdkit running the blockway plugin on a Unix socket, in the foreground."""

    def __init__(self, workdir, params, filters=(), name="nbdkit-bw", server_args=()):
        self.sock = os.path.join(workdir, name + ".sock")
        self.log_path = os.path.join(workdir, name + ".log")
        self.params = list(params)
        self.filters = list(filters)
        self.server_args = list(server_args)

    def start(self, timeout=20.0):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        args = (["nbdkit", "-f", "-U", self.sock] + self.server_args + ["--filter=" + f for f in self.filters]
                + [PLUGIN] + self.params)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=nbdkit_env())
        return self._wait_ready(self._listens, timeout, "nbdkit with the blockway plugin")

    def _listens(self):
        import socket
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.sock)
            return True
        except OSError:
            return False

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock


def nbdkit_run(params, command, filters=(), timeout=120, server_args=()):
    """`nbdkit -U - [filters] PLUGIN params --run command`: the CompletedProcess."""
    args = (["nbdkit", "-U", "-"] + list(server_args) + ["--filter=" + f for f in filters]
            + [PLUGIN] + list(params) + ["--run", command])
    return harness.run(args, timeout=timeout, check=False, env=nbdkit_env())


def capabilities(uri):
    """nbdinfo --json's view of the one export at `uri`."""
    p = harness.run(["nbdinfo", "--json", uri], timeout=30)
    info = json.loads(p.stdout)["exports"][0]
    keys = ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
            "can_multi_conn", "can_cache", "block_size_minimum", "block_size_preferred")
    return {k: info.get(k) for k in keys}


@unittest.skipUnless(os.path.exists(PLUGIN) and harness.have("nbdkit"), "the plugin or nbdkit is missing")
class PluginTest(harness.DaemonTestCase):
    def serve(self, params, filters=(), name="nbdkit-bw", server_args=()):
        return remotes.started(self, PluginServer(self.tmp, params, filters, name, server_args))

    def test_dump_plugin_and_help_describe_it(self):
        p = harness.run(["nbdkit", "--dump-plugin", PLUGIN], timeout=30, env=nbdkit_env())
        lines = dict(line.split("=", 1) for line in p.stdout.decode().splitlines() if "=" in line)
        self.assertEqual(lines["name"], "blockway")
        self.assertEqual(lines["api_version"], "2")
        self.assertEqual(lines["thread_model"], "parallel")
        self.assertEqual(lines["magic_config_key"], "uri")
        for cb in ("has_after_fork", "has_cleanup", "has_extents", "has_cache", "has_block_size", "has_can_fast_zero"):
            self.assertEqual(lines.get(cb), "1", cb)
        schemes = lines["blockway_schemes"].split(",")
        for s in ("file", "nbd", "nbd+unix", "iscsi", "nfs", "aoe", "rbd"):
            self.assertIn(s, schemes)
        self.assertEqual(lines["blockway_write_modes"], "writethrough,writeback,writeback-local")
        for key in ("uri", "cache", "mode", "prefetch", "auto-detach", "data-dir"):
            self.assertIn(key, lines["blockway_keys"].split(","))
        out = harness.run(["nbdkit", PLUGIN, "--help"], timeout=30, env=nbdkit_env()).stdout.decode()
        for needle in ("uri=URI", "mode=", "retry-timeout=SECONDS", "qos-read-iops=N", "prefetch="):
            self.assertIn(needle, out)

    def test_bad_options_are_refused_with_the_daemons_messages(self):
        img = harness.make_random_image(self.path("img"), MiB)
        cases = [
            ([], "the image to serve is missing"),
            (["file://" + img, "mode=writeback"], "option 'mode' needs a cache directory"),
            (["file://" + img, "cache=" + self.path("c"), "mode=fast"],
             "mode 'fast' is not writethrough, writeback or writeback-local"),
            (["file://" + img, "bogus=1"], "unknown option 'bogus'"),
            (["gopher://x/y"], "unknown scheme 'gopher'"),
            (["file://" + img, "threads=0"], "threads"),
            (["file://" + img, "cache=" + self.path("c"), "chunk=5"], "chunk"),
            (["nbd://127.0.0.1:1/x", "retry-timeout=soon"], "retry-timeout"),
            (["file://" + img, "uri=file://" + img], "given twice"),
        ]
        for params, needle in cases:
            p = nbdkit_run(params, "true", timeout=60)
            err = p.stderr.decode(errors="replace")
            self.assertNotEqual(p.returncode, 0, "nbdkit accepted %r:\n%s" % (params, err))
            self.assertIn(needle, err, "for %r" % (params,))
        # The same mistake in blockwayd gives the same message.
        self.start_refused("r=file://%s,cache=%s,mode=fast" % (img, self.path("c")),
                           "mode 'fast' is not writethrough, writeback or writeback-local")

    def test_a_remote_that_cannot_be_opened_fails_each_connection_with_the_reason(self):
        """A remote that cannot be opened is found after nbdkit forks (the
        stack's threads must start there). nbdkit keeps serving and each
        connection fails with our message, so `nbdkit --run CMD` ends with
        CMD's failure instead of hanging (CMD's connection would wait forever
        on the captive parent's socket if the server ended). Each case is
        bounded by a timeout, so a hang fails the test."""
        img = harness.make_random_image(self.path("img"), MiB)
        blocker = self.path("a-file")
        with open(blocker, "w") as f:
            f.write("not a directory\n")
        port = harness.free_port()  # nothing listens there
        cases = [
            (["file://" + self.path("missing.img")],
             "cannot open %s: No such file or directory" % self.path("missing.img")),
            (["nbd://127.0.0.1:%d/x" % port, "retry-timeout=1"], "cannot connect to 'nbd://127.0.0.1:%d/x'" % port),
            (["file://" + img, "cache=" + blocker + "/cache", "data-dir=" + self.path("d")],
             "cannot create cache directory " + blocker),
            (["file://" + img, "cache=" + self.path("c"), "data-dir=" + blocker + "/d"],
             "cannot create data directory " + blocker),
        ]
        for i, (params, needle) in enumerate(cases):
            with self.subTest(params=params):
                try:
                    p = nbdkit_run(params, "nbdinfo --size $uri", timeout=60)
                except subprocess.TimeoutExpired:
                    self.fail("nbdkit --run did not end within 60 s with %r" % (params,))
                err = p.stderr.decode(errors="replace")
                self.assertNotEqual(p.returncode, 0, err)
                self.assertIn(needle, err)
                self.assertIn("serving anyway", err)
                self.assertNotIn("AddressSanitizer", err)

    def test_a_remote_that_comes_up_later_is_served_from_then_on(self):
        """Started while its NBD remote is down: connections fail with the
        reason; once the remote is up, the next connection opens the stack
        and is served."""
        img = harness.make_random_image(self.path("remote.img"), 4 * MiB, seed=31)
        port = harness.free_port()
        server = remotes.started(self, PluginServer(self.tmp, ["nbd://127.0.0.1:%d/" % port, "retry-timeout=1"]))
        p = harness.run(["nbdinfo", "--size", server.uri], timeout=60, check=False)
        self.assertNotEqual(p.returncode, 0)
        with open(server.log_path, errors="replace") as f:
            self.assertIn("cannot connect to 'nbd://127.0.0.1:%d/'" % port, f.read())
        remotes.started(self, remotes.Nbdkit(self.tmp, img, port=port))
        h = self.connect(server.uri)
        self.assertEqual(h.get_size(), 4 * MiB)
        self.assertEqual(h.pread(MiB, MiB), harness.read_file(img, MiB, MiB))
        h.pwrite(b"\x77" * 4096, 0)
        h.flush()
        self.assertEqual(harness.read_file(img, 0, 4096), b"\x77" * 4096)
        h.shutdown()
        self.assertIsNone(server.proc.poll(), "nbdkit is still serving")

    def test_connections_to_a_hung_remote_share_one_open_attempt(self):
        """A remote that accepts and never answers (a frozen nbdkit),
        io-timeout=3: 6 clients connecting at once are refused within about
        one io-timeout each (those that waited for another's attempt take
        its reason; they queued one attempt each, the last waiting 18 s).
        Once the remote answers, the next client is served."""
        img = harness.make_random_image(self.path("remote.img"), 4 * MiB, seed=33)
        remote = remotes.started(self, remotes.Nbdkit(self.tmp, img))
        with remote.frozen():
            server = remotes.started(self, PluginServer(self.tmp, [remote.uri, "io-timeout=3"]))
            results = {}

            def client(i):
                began = time.monotonic()
                p = harness.run(["nbdinfo", "--size", server.uri], timeout=120, check=False)
                results[i] = (p.returncode, time.monotonic() - began)
            threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, (rc, took) in sorted(results.items()):
                self.assertNotEqual(rc, 0)
                self.assertLess(took, 8.5, "client %d waited %.1f s: %r" % (i, took, results))
            with open(server.log_path, errors="replace") as f:
                self.assertIn("no answer to the handshake within 3000 ms", f.read())
        h = self.connect(server.uri)
        self.assertEqual(h.pread(4096, MiB), harness.read_file(img, MiB, 4096))
        h.shutdown()

    def test_nbdcopy_in_and_out_over_a_file(self):
        src = harness.make_random_image(self.path("src.img"), 48 * MiB, seed=16)
        dst = self.path("dst.img")
        with open(dst, "wb") as f:
            f.truncate(48 * MiB)
        out = self.path("out.img")
        p = nbdkit_run(["file://" + dst], "nbdcopy %s $uri && nbdcopy $uri %s" % (src, out))
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        harness.run(["cmp", src, dst])
        harness.run(["cmp", src, out])

    def test_a_grown_file_reaches_new_connections(self):
        """`truncate -s` of the image while nbdkit serves it, uncached: a
        connection made after sees the new size (nbdkit asks the plugin per
        connection) and reads zeroes in the new space and writes there; a
        connection made before keeps the size it was told and keeps working.
        A shrink is not taken. A cached stack keeps the size it opened with,
        as blockwayd's cached exports do."""
        img = harness.make_random_image(self.path("img"), 8 * MiB, seed=21)
        server = self.serve(["file://" + img, "data-dir=" + self.path("d"), "log-level=info"])
        self.assert_grown_file_reaches_new_clients(img, server.uri, self.connect(server.uri), server.log_path)
        # A shrink is reported, not followed: the stack keeps what it served.
        os.truncate(img, 16 * MiB)
        self.assertEqual(self.connect(server.uri).get_size(), 24 * MiB)
        with open(server.log_path) as f:
            self.assertIn("the image is %d bytes, smaller than the %d served" % (16 * MiB, 24 * MiB), f.read())
        # Cached: the size it opened with, and no message per connection.
        cached_img = harness.make_random_image(self.path("cached.img"), 8 * MiB, seed=22)
        cached = self.serve(["file://" + cached_img, "cache=" + self.path("cache"), "data-dir=" + self.path("d2"),
                             "log-level=info"], name="cached")
        self.assertEqual(self.connect(cached.uri).get_size(), 8 * MiB)  # the stack is open
        os.truncate(cached_img, 24 * MiB)
        self.assertEqual(self.connect(cached.uri).get_size(), 8 * MiB)
        with open(cached.log_path) as f:
            self.assertNotIn("grew", f.read())

    def test_capabilities_are_the_stacks(self):
        """What nbdinfo sees through nbdkit equals what blockwayd reports for
        the same stack: a writable file, a read-only one, a cached NBD remote."""
        img = harness.make_random_image(self.path("img"), 8 * MiB)
        remote = remotes.started(self, remotes.Nbdkit(self.tmp, self.path("img")))
        cases = [
            ("file://" + img, []),
            ("file://" + img, ["read-only=on"]),
            (remote.uri, ["cache=" + self.path("cache"), "mode=writeback", "chunk=64k"]),
        ]
        for i, (uri, params) in enumerate(cases):
            with self.subTest(uri=uri, params=params):
                server = self.serve([uri] + params + ["data-dir=" + self.path("d%d" % i)], name="p%d" % i)
                plugin = capabilities(server.uri)
                server.stop()
                d = self.serve_remote(uri, ",".join(params), name="bw%d" % i)
                daemon = capabilities("nbd://127.0.0.1:%d/r" % self.port)
                d.stop()
                if plugin["is_read_only"]:
                    # nbdkit's server never offers FUA on a read-only export;
                    # blockwayd's does (a FUA that is never used). Not the plugin's.
                    self.assertFalse(plugin.pop("can_fua"))
                    daemon.pop("can_fua")
                self.assertEqual(plugin, daemon)

    @unittest.skipUnless(harness.have("fio"), "fio missing")
    def test_fio_verify_through_a_writeback_local_cache_over_an_nbd_remote(self):
        remote_img = harness.make_random_image(self.path("remote.img"), 32 * MiB, seed=3)
        remote = remotes.started(self, remotes.Nbdkit(self.tmp, remote_img))
        params = [remote.uri, "cache=" + self.path("cache"), "mode=writeback-local", "chunk=64k",
                  "name=vm1", "threads=2"]
        server = self.serve(params)
        args = ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=24m", "--offset=4m",
                "--verify=crc32c", "--verify_fatal=1"]
        fio(self, server.uri, *args, "--do_verify=0", timeout=180)
        server.stop()  # SIGTERM: .cleanup flushes and closes the cache
        self.assertFalse(server.running())
        # The catalogue knows the export and its cache; a fresh nbdkit on the
        # same cache (remote unchanged underneath) reads fio's data back.
        server = self.serve(params, name="nbdkit-bw2")
        _, result, _ = fio(self, server.uri, *args, "--verify_only", timeout=180, name="verify")
        self.assertGreater(sum(j["read"]["io_bytes"] for j in result["jobs"]), 0)

    def test_cow_filter_keeps_the_image_untouched(self):
        img = harness.make_random_image(self.path("img"), 8 * MiB, seed=5)
        with open(img, "rb") as f:
            before = f.read()
        script = self.path("client.py")
        with open(script, "w") as f:
            f.write("import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                    "h.pwrite(b'\\xab' * 65536, 1 << 20)\nh.flush()\n"
                    "assert h.pread(65536, 1 << 20) == b'\\xab' * 65536\n"
                    "open(%r, 'wb').write(h.pread(8 << 20, 0))\n" % self.path("seen.img"))
        p = nbdkit_run(["file://" + img, "cache=" + self.path("cache"), "data-dir=" + self.path("d")],
                       "/usr/bin/python3 %s \"$uri\"" % script, filters=["cow"])
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        with open(img, "rb") as f:
            self.assertEqual(f.read(), before, "the cow filter let a write reach the image")
        with open(self.path("seen.img"), "rb") as f:
            seen = f.read()
        self.assertEqual(seen[:1 << 20], before[:1 << 20])
        self.assertEqual(seen[1 << 20:(1 << 20) + 65536], b"\xab" * 65536)
        self.assertEqual(seen[(1 << 20) + 65536:], before[(1 << 20) + 65536:])

    def read_across_restart(self, h, remote, server, down):
        """With `remote` killed: reads 64 KiB at 4 MiB through handle h in a
        thread, starts the remote again (same port) after `down` seconds and
        asserts that the read returned without error. Returns (data, seconds
        the read took)."""
        result = {}

        def read():
            t0 = time.monotonic()
            try:
                result["data"] = h.pread(65536, 4 * MiB)
            except Exception as e:  # noqa: BLE001 - reported below
                result["error"] = e
            result["seconds"] = time.monotonic() - t0
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(down)
        remote.start()  # same port, main thread (PR_SET_PDEATHSIG)
        reader.join(60)
        self.assertFalse(reader.is_alive(), "the read did not return")
        self.assertNotIn("error", result, "%r\n%s" % (result.get("error"), server.log()))
        return result["data"], result["seconds"]

    def test_retry_filter_over_a_remote_restart(self):
        """The remote dies: our RetryLayer gives up after retry-timeout=1 with
        EIO, nbdkit's retry filter reopens the plugin and tries again, and once
        the remote is back the read returns the right bytes."""
        img = harness.make_random_image(self.path("img"), 8 * MiB, seed=7)
        with open(img, "rb") as f:
            data = f.read()
        remote = remotes.started(self, remotes.Nbdkit(self.tmp, img))
        server = self.serve([remote.uri, "retry-timeout=1", "io-timeout=2"], filters=["retry"],
                            server_args=["-v"])
        h = self.connect(server.uri)
        self.assertEqual(h.pread(65536, 0), data[:65536])
        remote.kill()
        got, seconds = self.read_across_restart(h, remote, server, 2.5)
        self.assertEqual(got, data[4 * MiB:4 * MiB + 65536])
        self.assertGreater(seconds, 2.0)
        self.assertRegex(server.log(), r"retry \d+: waiting", "the retry filter never retried")
        harness.close_handle(h)

    def remote_connections(self, remote):
        """Established TCP connections to `remote`'s port (the plugin's)."""
        out = harness.run(["ss", "-tnH", "state", "established", "( dport = :%d )" % remote.port],
                          timeout=30).stdout.decode()
        return len([line for line in out.splitlines() if line.strip()])

    def run_model_rounds(self, handles, model, rng, rounds=30, per_round=24):
        """Rounds of concurrent writes and reads spread over `handles` (each
        its own client connection, so nbdkit hands them to several worker
        threads): in a round the ranges written are pairwise distinct and
        none is read in the same round; across rounds they overlap at random.
        Every read is checked against `model` (a bytearray), which the
        writes update. Reads of 1 MiB go to the loops' connections (over
        256 KiB), the others to the worker's own: both paths mix."""
        import nbd
        size = len(model)
        for rnd in range(rounds):
            taken = []
            ops = []
            for _ in range(per_round):
                for _try in range(20):
                    length = rng.choice((512, 4096, 8192, 65536, 262144, 1 << 20, rng.randrange(1, 512) * 512))
                    offset = rng.randrange(0, (size - length) // 512 + 1) * 512
                    if all(offset + length <= a or b <= offset for a, b in taken):
                        break
                else:
                    continue
                taken.append((offset, offset + length))
                ops.append(("w" if rng.random() < 0.5 else "r", offset, length, rng.choice(handles)))
            pending, cookies = [], []
            for kind, offset, length, h in ops:
                if kind == "w":
                    data = rng.randbytes(length)
                    model[offset:offset + length] = data
                    cookies.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)))
                else:
                    buf = nbd.Buffer(length)
                    pending.append((buf, offset, length))
                    cookies.append((h, h.aio_pread(buf, offset)))
            for h, cookie in cookies:  # raises if the command failed
                while not h.aio_command_completed(cookie):
                    h.poll(5000)
            for buf, offset, length in pending:
                self.assertEqual(bytes(buf.to_bytearray()), bytes(model[offset:offset + length]),
                                 "round %d: read of %d bytes at %d differs from the model" % (rnd, length, offset))

    def test_worker_threads_own_remote_connections_against_a_model(self):
        """Uncached over an NBD remote with multi-conn: each nbdkit worker
        thread uses a remote connection of its own (more connections than
        threads=2 loops make). Randomized concurrent writes and reads from 3
        clients x 8 nbdkit threads match a model; one FLUSH on one client
        then makes every worker connection's writes durable on the remote:
        the remote (nbdkit's cache filter in writeback mode, which writes to
        its file only on a flush) has them in its file after the plugin is
        killed with SIGKILL, and did not before the flush."""
        import random
        size = 16 * MiB
        img = harness.make_random_image(self.path("remote.img"), size, seed=16)
        with open(img, "rb") as f:
            original = f.read()
        remote = remotes.started(self, remotes.Nbdkit(self.tmp, img, filters=["cache"],
                                                      params=["cache=writeback"]))
        self.assertTrue(capabilities(remote.uri)["can_multi_conn"])
        server = self.serve([remote.uri, "threads=2", "name=m"], server_args=["--threads", "8"])
        handles = [self.connect(server.uri) for _ in range(3)]
        model = bytearray(original)
        rng = random.Random(1616)
        self.run_model_rounds(handles, model, rng, rounds=60)
        self.assertGreater(self.remote_connections(remote), 2,
                           "the worker threads did not open connections of their own")
        with open(img, "rb") as f:
            self.assertNotEqual(f.read(), bytes(model), "the remote wrote back before any flush: the test "
                                "could not tell a lost flush")
        handles[0].flush()
        server.kill()
        with open(img, "rb") as f:
            self.assertEqual(f.read(), bytes(model), "a flush did not reach every worker connection's writes")
        fresh = self.connect(remote.uri)
        self.assertEqual(fresh.pread(size, 0), bytes(model))

    def test_worker_threads_use_the_loops_connections_on_a_remote_that_limits_connections(self):
        """A remote that takes 2 connections (nbdkit's limit filter): the
        loops' 2 connections are open, every worker's own is refused. The
        workers' requests go to the loops' connections instead of failing
        (they failed with EIO after retry-timeout, the refused connection
        opened again after each reconnect), with nbdkit --threads 1 and 64;
        the refusal is warned about once, not per worker."""
        import random
        size = 8 * MiB
        img = harness.make_random_image(self.path("img"), size, seed=23)
        with open(img, "rb") as f:
            model = bytearray(f.read())
        remote = remotes.started(self, remotes.Nbdkit(self.tmp, img, filters=["limit"], params=["limit=2"]))
        self.assertTrue(capabilities(remote.uri)["can_multi_conn"])
        rng = random.Random(23)
        for threads in (1, 64):
            with self.subTest(threads=threads):
                harness.wait_until(lambda: self.remote_connections(remote) == 0, 10, interval=0.1,
                                   what="the last server's connections to close")
                server = self.serve([remote.uri, "threads=2", "retry-timeout=3", "name=l%d" % threads],
                                    name="nbdkit-bw-%d" % threads, server_args=["--threads", str(threads)])
                handles = [self.connect(server.uri) for _ in range(3)]
                began = time.monotonic()
                self.run_model_rounds(handles, model, rng, rounds=10)
                self.assertLess(time.monotonic() - began, 30)
                handles[0].flush()
                for h in handles:
                    h.shutdown()
                server.stop()
                with open(server.log_path, errors="replace") as f:
                    log = f.read()
                self.assertEqual(log.count("cannot open a connection for a caller's thread"), 1, log[-3000:])
                with open(img, "rb") as f:
                    self.assertEqual(f.read(), bytes(model))

    def test_worker_threads_connections_come_back_after_a_remote_restart(self):
        """The remote restarts while the worker threads hold connections of
        their own: a read waiting in our RetryLayer returns the right bytes
        once the remote is back (the worker's lost connection is opened
        again after the reconnect), and concurrent writes and reads on every
        worker then match a model."""
        import random
        size = 8 * MiB
        img = harness.make_random_image(self.path("img"), size, seed=21)
        with open(img, "rb") as f:
            model = bytearray(f.read())
        remote = remotes.started(self, remotes.Nbdkit(self.tmp, img))
        server = self.serve([remote.uri, "threads=2", "retry-timeout=30", "io-timeout=5"],
                            server_args=["--threads", "4"])
        handles = [self.connect(server.uri) for _ in range(2)]
        rng = random.Random(21)
        self.run_model_rounds(handles, model, rng, rounds=5)
        before = self.remote_connections(remote)
        self.assertGreater(before, 2)
        remote.kill()
        got, _ = self.read_across_restart(handles[0], remote, server, 1.5)
        self.assertEqual(got, bytes(model[4 * MiB:4 * MiB + 65536]))
        self.run_model_rounds(handles, model, rng, rounds=10)
        self.assertGreater(self.remote_connections(remote), 2)
        # Writes acknowledged before the restart and never flushed: the first
        # flush says so once (RetryLayer's rule, on the workers' connections
        # too), the next one succeeds.
        import nbd
        with self.assertRaises(nbd.Error) as cm:
            handles[1].flush()
        self.assertEqual(cm.exception.errnum, errno.EIO)
        handles[1].flush()
        with open(img, "rb") as f:
            self.assertEqual(f.read(), bytes(model))

    def test_worker_threads_keep_the_loops_connections_without_multi_conn_or_with_a_count(self):
        """A remote that does not offer multi-conn, or connections=N: the
        loops' connections serve every request (1 without multi-conn, N
        when counted), and the data still matches a model."""
        import random
        size = 8 * MiB
        for case, filters, params, plugin_params, want in (
                ("no multi-conn", ["multi-conn"], ["multi-conn-mode=disable"], [], 1),
                ("connections=2", [], [], ["connections=2"], 2)):
            with self.subTest(case):
                img = harness.make_random_image(self.path("remote-%d.img" % want), size, seed=want)
                with open(img, "rb") as f:
                    model = bytearray(f.read())
                remote = remotes.started(self, remotes.Nbdkit(self.tmp, img, filters=filters, params=params,
                                                              name="remote-%d" % want))
                server = self.serve([remote.uri, "threads=2"] + plugin_params, name="nbdkit-bw-%d" % want,
                                    server_args=["--threads", "8"])
                handles = [self.connect(server.uri) for _ in range(2)]
                self.run_model_rounds(handles, model, random.Random(want), rounds=10)
                self.assertEqual(self.remote_connections(remote), want, case)
                handles[0].flush()
                server.kill()
                with open(img, "rb") as f:
                    self.assertEqual(f.read(), bytes(model), case)


class PluginCrashRun(crash_common.CrashRun):
    """crash_common's rounds with nbdkit and the plugin in blockwayd's place."""

    def start(self):
        self.starts += 1
        self.server = PluginServer(self.workdir, [
            "file://" + self.remote, "cache=" + os.path.join(self.workdir, "cache"), "mode=" + self.mode,
            "chunk=64k", "name=disk", "data-dir=" + os.path.join(self.workdir, "data")],
            name="nbdkit-%d" % self.starts)
        self.server.start()
        self.daemon = self.server

    def uri(self):
        return self.server.uri

    def kill(self):
        if self.daemon is not None:
            self.server.kill()


@unittest.skipUnless(os.path.exists(PLUGIN) and harness.have("nbdkit"), "the plugin or nbdkit is missing")
class PluginCrashTest(harness.DaemonTestCase):
    ROUNDS = int(os.environ.get("PLUGIN_CRASH_ROUNDS", "3"))

    def crash(self, mode):
        run = PluginCrashRun(self.tmp, mode, size=8 << 20)
        self.addCleanup(run.kill)
        problems = run.run(self.ROUNDS, max_delay=1.0)
        self.assertEqual(problems, [], "\n".join(problems) + "\n" + run.server.log())

    def test_kill_9_writeback_local(self):
        self.crash("writeback-local")

    def test_kill_9_writethrough(self):
        self.crash("writethrough")


if __name__ == "__main__":
    unittest.main()
