"""NBD over TLS (STARTTLS) with real clients: nbdinfo and nbdcopy over
nbds:// with X.509 certificates and with PSK, qemu-img and qemu-io with a
tls-creds-x509 object, TLS on a Unix socket; refusals: a plaintext client
against --tls=require, a wrong CA, an expired certificate, a wrong PSK, a
client certificate missing or from another CA under --tls-verify-peer; the
STARTTLS injection pattern; per-export tls=require under --tls=on; the
cipher chosen by the default and by given priority strings (--tls-priority,
[tls] priority); and the configuration's mistakes. Certificates are made afresh (tls_certs.py)."""

import filecmp
import os
import random
import select
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import remotes  # noqa: E402
import tls_certs  # noqa: E402
from harness import MiB  # noqa: E402

OPT_LIST = 3
OPT_STARTTLS = 5
REP_SERVER = 2
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNSUP = 0x80000001

PKI = None
PKI_ROOT = None


def setUpModule():
    global PKI, PKI_ROOT
    PKI_ROOT = tempfile.mkdtemp(prefix="bw-pki-", dir="/tmp")
    PKI = tls_certs.make_pki(PKI_ROOT)
    PKI["psk"] = tls_certs.make_psk(os.path.join(PKI_ROOT, "keys.psk"), "alice", "bob")
    # The same identity with another key: a client that knows the wrong secret.
    PKI["psk-wrong"] = tls_certs.make_psk(os.path.join(PKI_ROOT, "wrong.psk"), "alice")


def tearDownModule():
    shutil.rmtree(PKI_ROOT, ignore_errors=True)


def nbds(port, export, certs=None, psk_user=None, psk_file=None):
    if psk_user:
        return "nbds://%s@localhost:%d/%s?tls-psk-file=%s" % (psk_user, port, export, psk_file)
    return "nbds://localhost:%d/%s?tls-certificates=%s" % (port, export, certs)


def fails(cmd, timeout=30):
    p = harness.run(cmd, timeout=timeout, check=False)
    return p.returncode != 0, (p.stdout + p.stderr).decode(errors="replace")


def option(sock, opt, data=b""):
    sock.sendall(struct.pack(">QII", harness.IHAVEOPT, opt, len(data)) + data)


def option_reply(sock):
    magic, opt, rtype, rlen = struct.unpack(">QIII", harness.recv_exact(sock, 20))
    assert magic == harness.OPT_REPLY_MAGIC, "bad option reply magic"
    return opt, rtype, harness.recv_exact(sock, rlen)


def greet(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    harness.recv_exact(s, 18)
    s.sendall(struct.pack(">I", harness.FLAG_FIXED_NEWSTYLE | harness.FLAG_NO_ZEROES))
    return s


class TlsTestCase(harness.DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_random_image(self.path("disk.img"), 16 * MiB, seed=3)

    def serve_tls(self, mode="require", certs=None, psk=None, extra=(), exports=None, unix=False):
        args = ["--tls=" + mode]
        if certs:
            args += ["--tls-certificates", certs]
        if psk:
            args += ["--tls-psk", psk]
        return self.serve(exports or {"disk": self.img}, extra=args + list(extra), unix=unix)


class X509Test(TlsTestCase):
    def setUp(self):
        super().setUp()
        self.d = self.serve_tls(certs=PKI["server"])

    def test_nbdinfo_and_nbdcopy(self):
        uri = nbds(self.port, "disk", certs=PKI["client-nocert"])
        out = harness.run(["nbdinfo", uri], timeout=30).stdout.decode()
        self.assertIn("export-size: %d" % (16 * MiB), out)
        # Write a new image through TLS, read it back through TLS.
        src = harness.make_random_image(self.path("src.img"), 16 * MiB, seed=11)
        harness.run(["nbdcopy", src, uri], timeout=60)
        harness.run(["nbdcopy", uri, self.path("back.img")], timeout=60)
        self.assertTrue(filecmp.cmp(src, self.path("back.img"), shallow=False))
        self.assertTrue(filecmp.cmp(src, self.img, shallow=False))
        self.assertIn("TLS with", self.d.log())

    def test_qemu_img_and_qemu_io(self):
        obj = "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % PKI["client-nocert"]
        opts = "driver=nbd,host=localhost,port=%d,export=disk,tls-creds=tls0" % self.port
        out = harness.run(["qemu-img", "info", "--object", obj, "--image-opts", opts], timeout=30).stdout.decode()
        self.assertIn("virtual size: 16 MiB", out)
        harness.run(["qemu-io", "--object", obj, "--image-opts", opts,
                     "-c", "write -P 0xab 1M 1M", "-c", "read -P 0xab 1M 1M"], timeout=30)
        self.assertEqual(harness.read_file(self.img, MiB, MiB), b"\xab" * MiB)

    def test_plaintext_refused(self):
        bad, out = fails(["nbdinfo", self.uri("disk")])
        self.assertTrue(bad, out)
        self.assertIn("TLS", out)
        # Every option but STARTTLS (and ABORT) gets NBD_REP_ERR_TLS_REQD.
        s = greet(self.port)
        with s:
            option(s, OPT_LIST)
            self.assertEqual(option_reply(s)[1], REP_ERR_TLS_REQD)
            name = b"disk"
            option(s, harness.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
            self.assertEqual(option_reply(s)[1], REP_ERR_TLS_REQD)
            # NBD_OPT_EXPORT_NAME cannot carry an error: the server hangs up.
            option(s, 1, name)
            self.assertEqual(s.recv(100), b"")

    def test_wrong_ca_refused(self):
        bad, out = fails(["nbdinfo", nbds(self.port, "disk", certs=PKI["client-otherca"])])
        self.assertTrue(bad, out)
        harness.run(["nbdinfo", nbds(self.port, "disk", certs=PKI["client-nocert"])], timeout=30)

    def test_starttls_injection_not_acted_on(self):
        # The client pipelines a plaintext NBD_OPT_LIST right behind
        # STARTTLS, before its TLS handshake: the server must not answer it
        # (in plaintext or inside TLS). The bytes reach GnuTLS as a broken
        # record and the handshake fails.
        s = greet(self.port)
        with s:
            option(s, OPT_STARTTLS)
            option(s, OPT_LIST)  # injected
            opt, rtype, _ = option_reply(s)
            self.assertEqual((opt, rtype), (OPT_STARTTLS, harness.REP_ACK))
            ctx = ssl.create_default_context(cafile=os.path.join(PKI["server"], "ca-cert.pem"))
            ctx.check_hostname = False
            with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
                t = ctx.wrap_socket(s, server_hostname="localhost")
                # Should the handshake somehow pass, no LIST reply may follow.
                t.settimeout(2)
                data = t.recv(20)
                self.assertEqual(data, b"")
                raise ConnectionError("closed")
        harness.wait_until(lambda: "TLS handshake with" in self.d.log(), 10, what="the failed handshake logged")
        self.assertNotIn("option 3", self.d.full_log().split("TLS handshake with")[-1])
        # The daemon serves proper clients afterwards.
        harness.run(["nbdinfo", nbds(self.port, "disk", certs=PKI["client-nocert"])], timeout=30)

    def test_real_starttls_then_list(self):
        # The same client, well behaved: TLS first, then LIST is answered.
        s = greet(self.port)
        with s:
            option(s, OPT_STARTTLS)
            self.assertEqual(option_reply(s)[1], harness.REP_ACK)
            ctx = ssl.create_default_context(cafile=os.path.join(PKI["server"], "ca-cert.pem"))
            ctx.check_hostname = False
            t = ctx.wrap_socket(s, server_hostname="localhost")
            self.addCleanup(t.close)
            option(t, OPT_LIST)
            opt, rtype, data = option_reply(t)
            self.assertEqual((opt, rtype), (OPT_LIST, REP_SERVER))
            self.assertEqual(data[4:8], b"disk")
            self.assertEqual(option_reply(t)[1], harness.REP_ACK)
            # A second STARTTLS inside TLS is refused, the session goes on.
            option(t, OPT_STARTTLS)
            self.assertEqual(option_reply(t)[1], 0x80000003)


def tls_go(port, export):
    """STARTTLS, then NBD_OPT_GO (simple replies) inside TLS: a TLS socket."""
    s = greet(port)
    option(s, OPT_STARTTLS)
    assert option_reply(s)[1] == harness.REP_ACK
    ctx = ssl.create_default_context(cafile=os.path.join(PKI["server"], "ca-cert.pem"))
    ctx.check_hostname = False
    t = ctx.wrap_socket(s, server_hostname="localhost")
    name = export.encode()
    option(t, harness.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _opt, rtype, _data = option_reply(t)
        assert not rtype & 0x80000000, "NBD_OPT_GO failed: %#x" % rtype
        if rtype == harness.REP_ACK:
            return t


class TlsPipelineTest(TlsTestCase):
    """Many requests in flight over one TLS connection, of sizes that start
    and end anywhere in a TLS record (1 byte to 1 MiB), against a model: the
    server gathers small replies into shared records and splits large ones,
    and reads the socket in large chunks holding several requests."""

    def setUp(self):
        super().setUp()
        self.d = self.serve_tls(certs=PKI["server"])

    def exchange(self, t, pieces, pending, model, deadline):
        """Sends `pieces` (each send() is one TLS record or more) and checks
        the replies."""
        pieces = [memoryview(p) for p in pieces]
        pos = 0
        inbuf = bytearray()
        while pending:
            self.assertLess(time.monotonic(), deadline, "replies overdue: %d pending" % len(pending))
            progress = False
            while pieces and pos == len(pieces[0]):
                pieces.pop(0)
                pos = 0
            if pieces:
                try:
                    pos += t.send(pieces[0][pos:pos + (256 << 10)])
                    progress = True
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
            try:
                data = t.recv(1 << 20)
                if not data:
                    raise ConnectionError("server closed with %d replies pending" % len(pending))
                inbuf += data
                progress = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            while len(inbuf) >= 16:
                magic, error, cookie = struct.unpack(">IIQ", inbuf[:16])
                self.assertEqual(magic, harness.SIMPLE_REPLY_MAGIC)
                self.assertIn(cookie, pending)
                cmd, off, length = pending[cookie]
                self.assertEqual(error, 0, "request %r failed" % (pending[cookie],))
                need = 16 + (length if cmd == harness.CMD_READ else 0)
                if len(inbuf) < need:
                    break
                if cmd == harness.CMD_READ:
                    self.assertEqual(bytes(inbuf[16:need]), bytes(model[off:off + length]),
                                     "read %d+%d differs from the model" % (off, length))
                del inbuf[:need]
                del pending[cookie]
            if not progress and t.pending() == 0:
                select.select([t], [t] if pieces else [], [], 0.5)

    def test_random_pipelined_requests_against_model(self):
        rng = random.Random(int(os.environ.get("BW_SEED", "14")))
        size = 16 * MiB
        with open(self.img, "rb") as f:
            model = bytearray(f.read())
        t = tls_go(self.port, "disk")
        self.addCleanup(t.close)
        t.setblocking(False)
        deadline = time.monotonic() + 60
        cookie = 0
        for batch in range(40):
            # Ranges of one batch do not overlap: the server may answer them
            # in any order. Odd batches go out as one stream cut into full
            # records; even ones with each request header and payload in
            # records of their own, as libnbd sends them (the server takes
            # the small records that already arrived in one receive).
            taken, wire, pending = [], [], {}
            for _ in range(rng.randint(1, 48)):
                kind = rng.random()
                length = (rng.randint(1, 600) if kind < 0.4 else rng.randint(600, 40000) if kind < 0.8
                          else rng.randint(40000, 1 * MiB))
                off = rng.randrange(0, size - length)
                if any(off < e and b < off + length for b, e in taken):
                    continue
                taken.append((off, off + length))
                cookie += 1
                if rng.random() < 0.5:
                    data = rng.randbytes(length)
                    model[off:off + length] = data
                    wire += [harness.request(harness.CMD_WRITE, off, length, cookie), data]
                    pending[cookie] = (harness.CMD_WRITE, off, length)
                else:
                    wire.append(harness.request(harness.CMD_READ, off, length, cookie))
                    pending[cookie] = (harness.CMD_READ, off, length)
            self.exchange(t, wire if batch % 2 == 0 else [b"".join(wire)], pending, model, deadline)
        t.setblocking(True)
        t.sendall(harness.request(harness.CMD_DISC, 0, 0, cookie + 1))
        with open(self.img, "rb") as f:
            self.assertTrue(f.read() == model, "the image differs from the model")


class ExpiredServerCertTest(TlsTestCase):
    def test_expired_server_certificate_refused(self):
        self.serve_tls(certs=PKI["server-expired"])
        bad, out = fails(["nbdinfo", nbds(self.port, "disk", certs=PKI["client-nocert"])])
        self.assertTrue(bad, out)
        self.assertRegex(out.lower(), "expired|verif|certificate")


class VerifyPeerTest(TlsTestCase):
    def setUp(self):
        super().setUp()
        self.d = self.serve_tls(certs=PKI["server"], extra=["--tls-verify-peer"])

    def test_client_certificates(self):
        harness.run(["nbdinfo", nbds(self.port, "disk", certs=PKI["client"])], timeout=30)
        self.assertIn("client 'alice'", self.d.log())
        for name in ("client-nocert", "client-expired", "client-otherca"):
            bad, out = fails(["nbdinfo", nbds(self.port, "disk", certs=PKI[name])])
            self.assertTrue(bad, name + ": " + out)
        # The refused ones are logged with the peer: the daemon may log the
        # last one after nbdinfo has already given up (seen under ASan).
        harness.wait_until(lambda: self.d.full_log().count("TLS handshake with 127.0.0.1:") >= 3, timeout=15,
                           what="three refused TLS handshakes in the log")


class PskTest(TlsTestCase):
    def setUp(self):
        super().setUp()
        self.d = self.serve_tls(psk=PKI["psk"], unix=True)

    def test_nbdinfo_nbdcopy_psk(self):
        uri = nbds(self.port, "disk", psk_user="alice", psk_file=PKI["psk"])
        harness.run(["nbdinfo", uri], timeout=30)
        harness.run(["nbdcopy", uri, self.path("back.img")], timeout=60)
        self.assertTrue(filecmp.cmp(self.img, self.path("back.img"), shallow=False))
        self.assertIn("client 'alice'", self.d.log())

    def test_wrong_psk_and_unknown_identity_refused(self):
        bad, out = fails(["nbdinfo", nbds(self.port, "disk", psk_user="alice", psk_file=PKI["psk-wrong"])])
        self.assertTrue(bad, out)
        bad, out = fails(["nbdinfo", nbds(self.port, "disk", psk_user="carol", psk_file=PKI["psk"])])
        self.assertTrue(bad, out)

    def test_unix_socket(self):
        uri = "nbds+unix://alice@/disk?socket=%s&tls-psk-file=%s" % (self.sock, PKI["psk"])
        out = harness.run(["nbdinfo", uri], timeout=30).stdout.decode()
        self.assertIn("export-size: %d" % (16 * MiB), out)
        bad, out = fails(["nbdinfo", self.unix_uri("disk")])
        self.assertTrue(bad, out)


class PriorityTest(TlsTestCase):
    """--tls-priority / [tls] priority: the cipher the server picks, as the
    daemon logs it for each connection ("TLS with PEER: TLS1.3 AES-128-GCM")."""

    def negotiated(self, d, uri):
        before = d.full_log().count("TLS with ")
        harness.run(["nbdinfo", uri], timeout=30)
        harness.wait_until(lambda: d.full_log().count("TLS with ") > before, 10, what="the TLS log line")
        return d.log().split("TLS with ")[-1].splitlines()[0].split(": ", 1)[1]

    def test_default_prefers_aes_128_gcm(self):
        # nbdinfo (libnbd, GnuTLS NORMAL) lists AES-256-GCM first; the
        # server's order wins.
        d = self.serve_tls(certs=PKI["server"], psk=PKI["psk"])
        self.assertIn("priority the default", d.log())
        self.assertRegex(self.negotiated(d, nbds(self.port, "disk", certs=PKI["client-nocert"])),
                         r"^TLS1\.3 AES-128-GCM$")
        self.assertRegex(self.negotiated(d, nbds(self.port, "disk", psk_user="bob", psk_file=PKI["psk"])),
                         r"^TLS1\.3 AES-128-GCM PSK, client 'bob'")
        # qemu's client too, with data through it.
        obj = "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % PKI["client-nocert"]
        opts = "driver=nbd,host=localhost,port=%d,export=disk,tls-creds=tls0" % self.port
        harness.run(["qemu-io", "--object", obj, "--image-opts", opts,
                     "-c", "write -P 0x5a 2M 1M", "-c", "read -P 0x5a 2M 1M"], timeout=30)
        self.assertRegex(d.log().split("TLS with ")[-1].splitlines()[0], r": TLS1\.3 AES-128-GCM")

    def test_given_priorities(self):
        # NORMAL alone: the client's choice (libnbd: AES-256-GCM with a
        # certificate, ChaCha20-Poly1305 with PSK, at a tenth of AES-GCM's speed).
        for priority, cert, psk in (("NORMAL", r"^TLS1\.3 AES-256-GCM$", r"^TLS1\.3 \S+ PSK"),
                                    ("NORMAL:%SERVER_PRECEDENCE:-CIPHER-ALL:+CHACHA20-POLY1305",
                                     r"^TLS1\.3 CHACHA20-POLY1305$", r"^TLS1\.3 CHACHA20-POLY1305 PSK"),
                                    ("NORMAL:-VERS-TLS1.3", r"^TLS1\.2 ", r"^TLS1\.2 \S+ PSK")):
            d = self.serve_tls(certs=PKI["server"], psk=PKI["psk"], extra=["--tls-priority", priority])
            self.assertIn("priority '%s'" % priority, d.log())
            self.assertRegex(self.negotiated(d, nbds(self.port, "disk", certs=PKI["client-nocert"])), cert)
            # The PSK key exchanges are added to a given string.
            self.assertRegex(self.negotiated(d, nbds(self.port, "disk", psk_user="alice", psk_file=PKI["psk"])), psk)
            d.stop()

    def test_config_file_and_the_flag_over_it(self):
        port = harness.free_port()
        with open(self.path("b.toml"), "w") as f:
            f.write('listen = ["127.0.0.1:%d"]\n[tls]\nmode = "require"\ncertificates = "%s"\n'
                    'priority = "NORMAL:%%SERVER_PRECEDENCE:-CIPHER-ALL:+CHACHA20-POLY1305"\n'
                    '[[export]]\nname = "d"\nuri = "file://%s"\n' % (port, PKI["server"], self.img))
        uri = "nbds://localhost:%d/d?tls-certificates=%s" % (port, PKI["client-nocert"])
        d = self.start_daemon(["--config", self.path("b.toml")])
        self.assertRegex(self.negotiated(d, uri), r"^TLS1\.3 CHACHA20-POLY1305")
        d.stop()
        d = self.start_daemon(["--config", self.path("b.toml"), "--tls-priority", "NORMAL"])
        self.assertRegex(self.negotiated(d, uri), r"^TLS1\.3 AES-256-GCM")


class TlsOnTest(TlsTestCase):
    """--tls=on: plaintext allowed, except for an export with tls=require."""

    def setUp(self):
        super().setUp()
        self.secret = harness.make_random_image(self.path("secret.img"), 4 * MiB, seed=5)
        self.d = self.serve_tls(mode="on", certs=PKI["server"],
                                exports={"open": self.img, "secret": self.secret + ",tls=require"})

    def list_names(self, uri):
        import json
        out = harness.run(["nbdinfo", "--json", "--list", uri], timeout=30).stdout
        return {e["export-name"] for e in json.loads(out)["exports"]}

    def test_selective(self):
        harness.run(["nbdinfo", self.uri("open")], timeout=30)
        bad, out = fails(["nbdinfo", self.uri("secret")])
        self.assertTrue(bad, out)
        harness.run(["nbdinfo", nbds(self.port, "secret", certs=PKI["client-nocert"])], timeout=30)
        # LIST in plaintext does not show what needs TLS.
        self.assertEqual(self.list_names(self.uri("")), {"open"})
        self.assertEqual(self.list_names(nbds(self.port, "", certs=PKI["client-nocert"])), {"open", "secret"})


class RemoteTlsTest(harness.DaemonTestCase):
    """nbds:// and nbds+unix:// remotes against nbdkit --tls=require."""

    def setUp(self):
        super().setUp()
        self.remote_img = harness.make_random_image(self.path("remote.img"), 8 * MiB, seed=9)

    def nbdkit(self, *tls_args, sock=None):
        return remotes.started(self, remotes.Nbdkit(self.tmp, self.remote_img, sock=sock,
                                                    server_args=["--tls=require", *tls_args]))

    def roundtrip(self, uri):
        """Serves uri as export 'r', writes through it, reads it back."""
        self.serve_remote(uri)
        local = self.uri("r")
        harness.run(["nbdcopy", local, self.path("got.img")], timeout=60)
        self.assertTrue(filecmp.cmp(self.remote_img, self.path("got.img"), shallow=False))
        src = harness.make_random_image(self.path("new.img"), 8 * MiB, seed=21)
        harness.run(["nbdcopy", src, local], timeout=60)
        self.assertTrue(filecmp.cmp(src, self.remote_img, shallow=False))

    def test_certificates(self):
        peer = self.nbdkit("--tls-certificates=" + PKI["server"])
        self.roundtrip("nbds://localhost:%d/?tls-certificates=%s" % (peer.port, PKI["client-nocert"]))

    def test_psk_over_unix_socket(self):
        sock = self.path("nbdkit.sock")
        self.nbdkit("--tls-psk=" + PKI["psk"], sock=sock)
        self.roundtrip("nbds+unix://bob@/?socket=%s&tls-psk-file=%s" % (sock, PKI["psk"]))

    def test_refused(self):
        peer = self.nbdkit("--tls-certificates=" + PKI["server"])
        base = "nbds://localhost:%d/" % peer.port
        # Plaintext against --tls=require, and a CA that did not sign nbdkit's certificate.
        self.start_refused("r=nbd://127.0.0.1:%d/" % peer.port, "cannot connect")
        self.start_refused("r=%s?tls-certificates=%s" % (base, PKI["client-otherca"]), "cannot connect")
        # Mistakes found without connecting.
        self.start_refused("r=%s?tls-certificates=%s" % (base, self.path("nodir")), "is not a directory")
        self.start_refused("r=%s?tls-psk-file=%s" % (base, self.path("no.psk")), "cannot be read")
        self.start_refused("r=nbds://alice@localhost:%d/" % peer.port, "PSK identity")
        self.start_refused("r=%s?tls=on" % base, "unknown query parameter 'tls'")
        self.start_refused("r=nbd://localhost:%d/?tls-certificates=%s" % (peer.port, PKI["client"]),
                           "takes no query parameters")
        self.start_refused("r=%s?tls-verify-peer=maybe" % base, "true or false")


class ConfigTest(harness.DaemonTestCase):
    def refused(self, args, *needles):
        p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                         "--export", "d=file://" + self.path("x.img")] + args, timeout=30, check=False)
        out = (p.stdout + p.stderr).decode(errors="replace")
        self.assertEqual(p.returncode, 2, out)
        for n in needles:
            self.assertIn(n, out)

    def test_mistakes(self):
        harness.make_sparse_image(self.path("x.img"), MiB)
        self.refused(["--tls=maybe", "--tls-psk", PKI["psk"]], "maybe", "off, on or require")
        self.refused(["--tls=require"], "--tls-certificates")
        self.refused(["--tls-certificates", PKI["server"]], "tls is off")
        self.refused(["--tls=on", "--tls-certificates", self.path("nowhere")], "server-cert.pem is missing")
        with open(self.path("bad.psk"), "w") as f:
            f.write("alice:nothex\n")
        self.refused(["--tls=on", "--tls-psk", self.path("bad.psk")], "bad.psk:1", "psktool")
        self.refused(["--tls=on", "--tls-psk", self.path("nofile.psk")], "cannot be read")
        self.refused(["--tls=on", "--tls-psk", PKI["psk"], "--tls-verify-peer"], "tls-verify-peer")
        self.refused(["--tls=on", "--tls-psk", PKI["psk"], "--tls-priority", "NORMAL:+NO-SUCH-CIPHER"],
                     "TLS priority 'NORMAL:+NO-SUCH-CIPHER'", "at '+NO-SUCH-CIPHER'")
        self.refused(["--tls=on", "--tls-psk", PKI["psk"], "--tls-priority", "NONE"],
                     "TLS priority 'NONE': No or insufficient priorities were set")
        # Taken by GnuTLS, but no key exchange is left for TLS 1.2 and 1.3 is off.
        self.refused(["--tls=on", "--tls-certificates", PKI["server"], "--tls-priority", "NORMAL:-KX-ALL:-VERS-TLS1.3"],
                     "TLS priority 'NORMAL:-KX-ALL:-VERS-TLS1.3': it enables no cipher suite")
        self.refused(["--tls=on", "--tls-psk", PKI["psk"], "--tls-priority", ""], "--tls-priority needs")
        self.refused(["--tls-priority", "NORMAL"], "a TLS priority is given but tls is off")
        p = harness.run([harness.BLOCKWAYD, "--listen", "127.0.0.1:%d" % harness.free_port(),
                         "--export", "d=file://%s,tls=require" % self.path("x.img")], timeout=30, check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("TLS is off", (p.stdout + p.stderr).decode())

    def test_config_file(self):
        img = harness.make_random_image(self.path("x.img"), MiB, seed=2)
        port = harness.free_port()
        with open(self.path("b.toml"), "w") as f:
            f.write('listen = ["127.0.0.1:%d"]\n[tls]\nmode = "require"\ncertificates = "%s"\n'
                    'psk = "%s"\n[[export]]\nname = "d"\nuri = "file://%s"\n' % (port, PKI["server"], PKI["psk"], img))
        self.start_daemon(["--config", self.path("b.toml")])
        harness.run(["nbdinfo", nbds(port, "d", certs=PKI["client-nocert"])], timeout=30)
        harness.run(["nbdinfo", nbds(port, "d", psk_user="bob", psk_file=PKI["psk"])], timeout=30)
        bad, out = fails(["nbdinfo", "nbd://127.0.0.1:%d/d" % port])
        self.assertTrue(bad, out)


if __name__ == "__main__":
    unittest.main()
