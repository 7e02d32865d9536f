#include "nbd/tls_context.hpp"

#include <sys/stat.h>

#include <fstream>
#include <stdexcept>

namespace blockway::nbd {
namespace {

std::runtime_error tls_error(const std::string& what, int rc) {
  return std::runtime_error(what + ": " + gnutls_strerror(rc));
}

bool readable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// GnuTLS reads a PSK file lazily, on each handshake, and says nothing about
// a malformed one: check its shape up front so a mistake stops the start.
void check_psk_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("TLS PSK file " + path + ": cannot be read");
  std::string line;
  unsigned n = 0, entries = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    const auto colon = line.find(':');
    const std::string key = colon == std::string::npos ? "" : line.substr(colon + 1);
    if (colon == 0 || colon == std::string::npos || key.empty() || key.size() % 2 != 0 ||
        key.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
      throw std::runtime_error("TLS PSK file " + path + ":" + std::to_string(n) +
                               ": not an \"identity:hexkey\" line (make the file with psktool)");
    ++entries;
  }
  if (entries == 0) throw std::runtime_error("TLS PSK file " + path + ": no keys in it");
}

}  // namespace

const char* const kDefaultTlsPriority =
    "NORMAL:%SERVER_PRECEDENCE:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:+AES-256-CCM:"
    "+AES-128-CCM:+AES-256-CBC:+AES-128-CBC";

TlsMode parse_tls_mode(std::string_view text) {
  if (text == "off") return TlsMode::off;
  if (text == "on") return TlsMode::on;
  if (text == "require") return TlsMode::require;
  throw std::invalid_argument("'" + std::string(text) + "' is not a TLS mode (off, on or require)");
}

const char* to_string(TlsMode mode) noexcept {
  switch (mode) {
    case TlsMode::off: return "off";
    case TlsMode::on: return "on";
    case TlsMode::require: return "require";
  }
  return "?";
}

TlsContext::TlsContext(const TlsSettings& settings) : settings_(settings) {
  try {
    if (settings_.certificates_dir.empty() && settings_.psk_file.empty())
      throw std::runtime_error("TLS needs --tls-certificates DIR or --tls-psk FILE");
    if (!settings_.certificates_dir.empty()) {
      const std::string dir = settings_.certificates_dir;
      const std::string ca = dir + "/ca-cert.pem", cert = dir + "/server-cert.pem", key = dir + "/server-key.pem",
                        crl = dir + "/ca-crl.pem";
      for (const auto& f : {cert, key})
        if (!readable_file(f)) throw std::runtime_error("TLS certificates: " + f + " is missing");
      if (settings_.verify_peer && !readable_file(ca))
        throw std::runtime_error("TLS certificates: " + ca + " is missing (tls-verify-peer needs the CA)");
      if (int rc = gnutls_certificate_allocate_credentials(&x509_); rc < 0) throw tls_error("TLS", rc);
      if (readable_file(ca)) {
        if (int rc = gnutls_certificate_set_x509_trust_file(x509_, ca.c_str(), GNUTLS_X509_FMT_PEM); rc < 0)
          throw tls_error("TLS certificates: " + ca, rc);
      }
      if (readable_file(crl)) {
        if (int rc = gnutls_certificate_set_x509_crl_file(x509_, crl.c_str(), GNUTLS_X509_FMT_PEM); rc < 0)
          throw tls_error("TLS certificates: " + crl, rc);
      }
      if (int rc = gnutls_certificate_set_x509_key_file(x509_, cert.c_str(), key.c_str(), GNUTLS_X509_FMT_PEM); rc < 0)
        throw tls_error("TLS certificates: " + cert + " with " + key, rc);
    }
    if (!settings_.psk_file.empty()) {
      check_psk_file(settings_.psk_file);
      if (int rc = gnutls_psk_allocate_server_credentials(&psk_); rc < 0) throw tls_error("TLS", rc);
      if (int rc = gnutls_psk_set_server_credentials_file(psk_, settings_.psk_file.c_str()); rc < 0)
        throw tls_error("TLS PSK file " + settings_.psk_file, rc);
    }
    // PSK key exchanges are not in NORMAL: add them when a key file is given.
    const std::string given = settings_.priority.empty() ? kDefaultTlsPriority : settings_.priority;
    const std::string prio = psk_ ? given + ":+ECDHE-PSK:+DHE-PSK:+PSK" : given;
    const char* err_pos = nullptr;
    if (int rc = gnutls_priority_init(&priority_, prio.c_str(), &err_pos); rc < 0) {
      // err_pos points into prio at the keyword GnuTLS did not take.
      std::string where;
      if (err_pos && *err_pos) {
        const std::string rest(err_pos);
        where = " at '" + rest.substr(0, rest.find(':')) + "'";
      }
      throw std::runtime_error("TLS priority '" + given + "': " + gnutls_strerror(rc) + where);
    }
    // A string GnuTLS takes may still leave nothing to agree on ("NONE"):
    // every handshake would fail, so it stops the start instead.
    bool any_suite = false;
    for (unsigned i = 0, index = 0;; ++i) {
      const int rc = gnutls_priority_get_cipher_suite_index(priority_, i, &index);
      if (rc == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) break;
      if (rc >= 0) {
        any_suite = true;
        break;
      }
    }
    if (!any_suite) throw std::runtime_error("TLS priority '" + given + "': it enables no cipher suite");
  } catch (...) {
    if (priority_) gnutls_priority_deinit(priority_);
    if (x509_) gnutls_certificate_free_credentials(x509_);
    if (psk_) gnutls_psk_free_server_credentials(psk_);
    throw;
  }
}

TlsContext::~TlsContext() {
  if (priority_) gnutls_priority_deinit(priority_);
  if (x509_) gnutls_certificate_free_credentials(x509_);
  if (psk_) gnutls_psk_free_server_credentials(psk_);
}

int TlsContext::configure(gnutls_session_t session) const noexcept {
  if (int rc = gnutls_priority_set(session, priority_); rc < 0) return rc;
  if (x509_) {
    if (int rc = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, x509_); rc < 0) return rc;
    if (settings_.verify_peer) {
      gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE);
      // The handshake itself fails on a certificate the CA did not sign, or
      // one that expired or is not yet valid.
      gnutls_session_set_verify_cert(session, nullptr, 0);
    }
  }
  if (psk_) {
    if (int rc = gnutls_credentials_set(session, GNUTLS_CRD_PSK, psk_); rc < 0) return rc;
  }
  return 0;
}

}  // namespace blockway::nbd
