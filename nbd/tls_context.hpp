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
  // A GnuTLS priority string (gnutls_priority_init(3)): the protocol
  // versions, key exchanges and ciphers offered, in order; empty means
  // kDefaultTlsPriority. With a PSK file the PSK key exchanges are added.
  std::string priority;
};

// NORMAL with the server's order over the client's and AES-128-GCM first:
// the same cipher suites as NORMAL (AES-256-GCM and ChaCha20-Poly1305 stay
// offered), but a client that lists AES-256-GCM first (libnbd, qemu: GnuTLS's
// NORMAL does) gets AES-128-GCM, which costs less CPU per byte on both sides
// (see BENCHMARKS.md, "NBD over TLS"); TLS 1.3 requires every client to
// support it.
extern const char* const kDefaultTlsPriority;

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
