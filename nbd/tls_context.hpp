// TlsContext: the server's TLS credentials (X.509 directory and/or PSK file)
// loaded once at start-up, shared by every connection's TlsSession.
//
// Thread model: immutable after construction; GnuTLS credentials may be used
// by sessions on every event-loop thread at once. Construction throws
// std::runtime_error naming the file that is missing or wrong.
#pragma once

#include <gnutls/gnutls.h>

#include <string>
#include <string_view>

namespace blockway::nbd {

// --tls: off (STARTTLS unsupported), on (offered; exports without
// tls=require may be used in plaintext), require (nothing but STARTTLS and
// ABORT before TLS).
enum class TlsMode { off, on, require };

// "off", "on", "require"; std::invalid_argument otherwise.
TlsMode parse_tls_mode(std::string_view text);
const char* to_string(TlsMode mode) noexcept;

struct TlsSettings {
  TlsMode mode = TlsMode::off;
  // A directory with ca-cert.pem, server-cert.pem, server-key.pem (the
  // layout of nbdkit and qemu); ca-crl.pem is used when present.
  std::string certificates_dir;
  // A psktool key file ("identity:hexkey" lines).
  std::string psk_file;
  // Ask for and verify a client certificate against ca-cert.pem.
  bool verify_peer = false;
};

class TlsContext {
 public:
  explicit TlsContext(const TlsSettings& settings);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  // Sets credentials, priorities and client verification on a new server
  // session; returns a GnuTLS error code (0 on success).
  [[nodiscard]] int configure(gnutls_session_t session) const noexcept;
  [[nodiscard]] const TlsSettings& settings() const noexcept { return settings_; }

 private:
  TlsSettings settings_;
  gnutls_certificate_credentials_t x509_ = nullptr;
  gnutls_psk_server_credentials_t psk_ = nullptr;
  gnutls_priority_t priority_ = nullptr;
};

}  // namespace blockway::nbd
