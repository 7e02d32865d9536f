"""Test certificates and PSK files made with GnuTLS's certtool and psktool
(gnutls-bin), fresh for each test run: nothing secret is kept in the repo.

make_pki(root) returns a dict of directories in the layout nbdkit, qemu and
libnbd expect (ca-cert.pem, server-cert.pem, server-key.pem, client-*.pem)."""

import os
import subprocess


def _certtool(*args, cwd):
    subprocess.run(["certtool", *args], cwd=cwd, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _key(path, cwd):
    _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", path, cwd=cwd)


def _ca(d, name):
    os.makedirs(d, exist_ok=True)
    _key("ca-key.pem", d)
    _write(os.path.join(d, "ca.info"), "cn = %s\nca\ncert_signing_key\nexpiration_days = 3650\n" % name)
    _certtool("--generate-self-signed", "--load-privkey", "ca-key.pem", "--template", "ca.info",
              "--outfile", "ca-cert.pem", cwd=d)


def _leaf(ca_dir, out_dir, prefix, cn, role, expired=False, names=""):
    """prefix-key.pem and prefix-cert.pem in out_dir, signed by ca_dir's CA."""
    os.makedirs(out_dir, exist_ok=True)
    _key(os.path.join(out_dir, prefix + "-key.pem"), out_dir)
    dates = ('activation_date = "2020-01-01 00:00:00"\nexpiration_date = "2021-01-01 00:00:00"\n'
             if expired else "expiration_days = 3650\n")
    extra = "dns_name = localhost\nip_address = 127.0.0.1\nip_address = ::1\n" if role == "server" else names
    tmpl = os.path.join(out_dir, prefix + ".info")
    _write(tmpl, "cn = %s\n%stls_www_%s\nencryption_key\nsigning_key\n%s" % (cn, extra, role, dates))
    _certtool("--generate-certificate", "--load-ca-certificate", os.path.join(ca_dir, "ca-cert.pem"),
              "--load-ca-privkey", os.path.join(ca_dir, "ca-key.pem"),
              "--load-privkey", prefix + "-key.pem", "--template", tmpl,
              "--outfile", prefix + "-cert.pem", cwd=out_dir)


def _copy_ca(ca_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(ca_dir, "ca-cert.pem")) as f:
        _write(os.path.join(out_dir, "ca-cert.pem"), f.read())


def make_pki(root):
    """Directories:
    server        the server's (ca-cert, server-cert, server-key)
    server-expired  the same CA, a server certificate that expired in 2021
    client        CA + client certificate CN=alice
    client-nocert CA only (a client without a certificate)
    client-expired  CA + an expired client certificate
    client-otherca  another CA's certificate as ca-cert.pem, and a client
                    certificate that other CA signed
    client-san    CA + client certificate CN=carol with subject alternative
                  names DNS vm7.example.org, email ops@example.org, URI
                  spiffe://example.org/vm7, IP 127.0.0.9"""
    ca = os.path.join(root, "ca")
    other = os.path.join(root, "other-ca")
    _ca(ca, "blockway test CA")
    _ca(other, "someone else's CA")
    dirs = {k: os.path.join(root, k) for k in
            ("server", "server-expired", "client", "client-nocert", "client-expired", "client-otherca",
              "client-san")}
    for k in ("server", "server-expired", "client", "client-nocert", "client-expired", "client-san"):
        _copy_ca(ca, dirs[k])
    _copy_ca(other, dirs["client-otherca"])
    _leaf(ca, dirs["server"], "server", "localhost", "server")
    _leaf(ca, dirs["server-expired"], "server", "localhost", "server", expired=True)
    _leaf(ca, dirs["client"], "client", "alice", "client")
    _leaf(ca, dirs["client-expired"], "client", "alice", "client", expired=True)
    _leaf(other, dirs["client-otherca"], "client", "alice", "client")
    _leaf(ca, dirs["client-san"], "client", "carol", "client",
          names="dns_name = vm7.example.org\nemail = ops@example.org\nuri = spiffe://example.org/vm7\n"
                "ip_address = 127.0.0.9\n")
    return dirs


def make_psk(path, *users):
    """A psktool key file with a fresh random key for each user."""
    for u in users:
        subprocess.run(["psktool", "-u", u, "-p", path], check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path
