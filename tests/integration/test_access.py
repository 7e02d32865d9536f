"""Per-export access control over NBD: allow= addresses (from 127.0.0.2 as
well as 127.0.0.1), TLS PSK identities and certificate names, Unix peer
users (a client run as another uid with setpriv); LIST filtered; listen= on
named listeners; denials logged, counted in stats --json and /metrics;
rules changed at run time with `blockway access` and kept over a restart;
mistakes in the rules refused at start."""

import json
import os
import shutil
import sys
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import control_common  # noqa: E402
import harness  # noqa: E402
import tls_certs  # noqa: E402
from harness import MiB  # noqa: E402

REP_ERR_UNKNOWN = control_common.REP_ERR_UNKNOWN
go_from = control_common.go_from


def listed(uri):
    out = harness.run(["nbdinfo", "--json", "--list", uri], timeout=30).stdout
    return {e["export-name"] for e in json.loads(out)["exports"]}


def opens(uri, prefix=()):
    return harness.run(list(prefix) + ["nbdinfo", uri], timeout=30, check=False).returncode == 0


class AccessTest(control_common.ControlTestCase):
    def setUp(self):
        super().setUp()
        self.img = harness.make_random_image(self.path("a.img"), 4 * MiB, seed=1)

    def exports(self, **rules):
        return {name: "file://%s%s" % (self.img, "," + r if r else "") for name, r in rules.items()}

    def test_addresses_list_denials_counted(self):
        self.metrics_port = harness.free_port()
        d = self.start(self.exports(one="allow=127.0.0.1", two="allow=127.0.0.2/32;10.0.0.0/8", anyone="",
                                    v6="allow=::1 fd00::/8", ro="read-only,allow=127.0.0.0/8"),
                       extra=["--metrics", str(self.metrics_port)])
        self.assertEqual(go_from(self.port, "one", "127.0.0.1"), harness.REP_ACK)
        self.assertEqual(go_from(self.port, "one", "127.0.0.2"), REP_ERR_UNKNOWN)
        self.assertEqual(go_from(self.port, "two", "127.0.0.2"), harness.REP_ACK)
        self.assertEqual(go_from(self.port, "two", "127.0.0.1"), REP_ERR_UNKNOWN)
        self.assertEqual(go_from(self.port, "ro", "127.0.0.3"), harness.REP_ACK)
        self.assertEqual(go_from(self.port, "v6", "127.0.0.1"), REP_ERR_UNKNOWN)
        # A real client: allowed, and refused as if the export did not exist.
        self.assertTrue(opens(self.uri("one")))
        p = harness.run(["nbdinfo", self.uri("two")], timeout=30, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("No such file or directory for export: two", p.stderr.decode())  # NBD_REP_ERR_UNKNOWN
        self.assertEqual(listed(self.uri("")), {"one", "anyone", "ro"})
        # Logged with the peer, counted per export.
        self.assertRegex(d.log(), r"access to export 'two' denied to 127\.0\.0\.1:\d+")
        self.assertEqual(self.bwj("stats", "two")["access"]["denied"], 2)
        self.assertEqual(self.bwj("stats", "one")["access"]["denied"], 1)
        self.assertEqual(self.bwj("stats", "two")["access"]["allow"], "127.0.0.2/32 10.0.0.0/8")
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port, timeout=10).read().decode()
        self.assertIn('blockway_export_access_denied_total{export="two"} 2', text)
        self.assertIn('blockway_export_access_denied_total{export="anyone"} 0', text)

    def test_runtime_change_is_kept_over_a_restart(self):
        d = self.start(self.exports(x=""))
        self.assertTrue(opens(self.uri("x")))
        out, _ = self.bw("access", "x", "--allow", "127.0.0.2")
        self.assertIn("allow '127.0.0.2'", out)
        self.assertFalse(opens(self.uri("x")))
        self.assertEqual(go_from(self.port, "x", "127.0.0.2"), harness.REP_ACK)
        self.bw("access", "x", "--allow", "300.1.1.1", expect=None)
        self.assertEqual(self.bwj("access", "x")["allow"], "127.0.0.2")  # a bad rule changes nothing
        d.stop()
        self.start(self.exports(x=""))
        self.assertFalse(opens(self.uri("x")), "the run-time rule is gone after a restart")
        self.assertEqual(self.bwj("access", "x")["denied"], 1)
        self.bw("access", "x", "--allow", "")
        self.assertTrue(opens(self.uri("x")))

    def test_named_listeners(self):
        inner = harness.free_port()
        self.start(self.exports(pub="", priv="listen=inner"), extra=["--listen", "inner=127.0.0.1:%d" % inner])
        self.assertFalse(opens(self.uri("priv")))
        self.assertTrue(opens("nbd://127.0.0.1:%d/priv" % inner))
        self.assertEqual(listed(self.uri("")), {"pub"})
        self.assertEqual(listed("nbd://127.0.0.1:%d/" % inner), {"pub", "priv"})
        # Moved at run time to the unnamed listener only: nowhere, since it has no name.
        self.bw("access", "priv", "--listen", "")
        self.assertTrue(opens(self.uri("priv")))

    def test_unix_peer_users(self):
        sock = self.path("nbd.sock")
        self.start(self.exports(rootonly="allow=user:root", nobody="allow=user:nobody", grp="allow=group:nogroup"),
                   extra=["--listen", "unix:" + sock])
        os.chmod(sock, 0o666)
        os.chmod(self.tmp, 0o755)
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        uri = "nbd+unix:///%s?socket=" + sock
        self.assertTrue(opens(uri % "rootonly"))
        self.assertFalse(opens(uri % "rootonly", as_nobody))
        self.assertTrue(opens(uri % "nobody", as_nobody))
        self.assertFalse(opens(uri % "nobody"))
        self.assertTrue(opens(uri % "grp", as_nobody))
        self.assertFalse(opens(uri % "grp"))
        # TCP clients have no user: an export with only user rules is closed to them.
        self.assertFalse(opens(self.uri("rootonly")))

    def test_tls_identities(self):
        pki_root = tempfile.mkdtemp(prefix="bw-pki-", dir="/tmp")
        self.addCleanup(shutil.rmtree, pki_root, ignore_errors=True)
        pki = tls_certs.make_pki(pki_root)
        psk = tls_certs.make_psk(os.path.join(pki_root, "keys.psk"), "alice", "bob")
        self.start(self.exports(a="allow=psk:alice", c="allow=cert:alice", dns="allow=cert:vm7.example.org",
                                email="allow=cert:ops@example.org", uri="allow=cert:spiffe://example.org/vm7",
                                cn="allow=cert:carol", ip="allow=cert:127.0.0.9", other="allow=cert:vm8.example.org"),
                   extra=["--tls=require", "--tls-psk", psk, "--tls-certificates", pki["server"],
                          "--tls-verify-peer"])
        base = "nbds://%s@localhost:%d/%s?tls-psk-file=" + psk
        self.assertTrue(opens(base % ("alice", self.port, "a")))
        self.assertFalse(opens(base % ("bob", self.port, "a")))
        self.assertFalse(opens(base % ("alice", self.port, "c")), "a PSK identity is not a certificate name")
        cert = "nbds://localhost:%d/%s?tls-certificates=" + pki["client"]
        self.assertTrue(opens(cert % (self.port, "c")))
        self.assertFalse(opens(cert % (self.port, "a")))
        self.assertFalse(opens(cert % (self.port, "dns")), "alice's certificate has no SAN vm7.example.org")
        # A certificate with subject alternative names: each DNS, email and
        # URI name counts, as does the CN; an IP SAN is not a name.
        san = "nbds://localhost:%d/%s?tls-certificates=" + pki["client-san"]
        for export in ("dns", "email", "uri", "cn"):
            self.assertTrue(opens(san % (self.port, export)), export)
        for export in ("ip", "other", "c", "a"):
            self.assertFalse(opens(san % (self.port, export)), export)

    def test_tls_required_export_refused_at_run_time_without_tls(self):
        d = self.start(self.exports(a=""))
        _, err = self.bw("export", "add", "t", "file://" + self.img, "tls=require", expect=2)
        self.assertIn("has tls=require but TLS is off on this daemon", err)
        self.assertNotIn("t", [e["name"] for e in self.bwj("status")["exports"]])
        # Added under TLS, then the daemon restarted without it: skipped with the reason.
        pki_root = tempfile.mkdtemp(prefix="bw-pki-", dir="/tmp")
        self.addCleanup(shutil.rmtree, pki_root, ignore_errors=True)
        psk = tls_certs.make_psk(os.path.join(pki_root, "keys.psk"), "alice")
        d.stop()
        d = self.start(self.exports(a=""), extra=["--tls=on", "--tls-psk", psk])
        self.bw("export", "add", "t", "file://" + self.img, "tls=require")
        d.stop()
        d = self.start(self.exports(a=""))
        self.assertIn("has tls=require but TLS is off on this daemon", d.log())
        self.assertFalse(opens(self.uri("t")))

    def test_bad_rules_refused(self):
        for spec, needle in (("allow=300.1.1.1", "not an IP address"), ("allow=10.0.0.0/33", "prefix length"),
                             ("allow=user:no-such-user-here", "no such user"), ("allow=cert:", "name is empty"),
                             ("listen=nowhere", "names no listener"), ("listen=1.2.3.4:5", "listener name")):
            self.start_refused("x=file://%s,%s" % (self.img, spec), needle)
        self.bw("access", "nosuch", expect=None)


if __name__ == "__main__":
    unittest.main()
