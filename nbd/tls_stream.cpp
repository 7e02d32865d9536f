#include "nbd/tls_stream.hpp"

#include <boost/asio/as_tuple.hpp>
#include <gnutls/x509.h>

#include <stdexcept>

namespace blockway::nbd {
namespace asio = boost::asio;
using core::Task;

namespace {

class TlsCategory : public std::error_category {
 public:
  const char* name() const noexcept override { return "gnutls"; }
  std::string message(int code) const override { return gnutls_strerror(-code); }
};

std::error_code tls_error(int rc) { return {-rc, tls_category()}; }

bool again(long rc) { return rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED; }

}  // namespace

const std::error_category& tls_category() noexcept {
  static const TlsCategory category;
  return category;
}

TlsStream::TlsStream(const TlsContext& context, Descriptor& in, Descriptor& out) : in_(in), out_(out) {
  if (int rc = gnutls_init(&session_, GNUTLS_SERVER | GNUTLS_NONBLOCK); rc < 0)
    throw std::runtime_error(std::string("TLS session: ") + gnutls_strerror(rc));
  if (int rc = context.configure(session_); rc < 0) {
    gnutls_deinit(session_);
    throw std::runtime_error(std::string("TLS session: ") + gnutls_strerror(rc));
  }
  boost::system::error_code ignored;
  in_.non_blocking(true, ignored);
  out_.non_blocking(true, ignored);
  gnutls_transport_set_int2(session_, in_.native_handle(), out_.native_handle());
  gnutls_handshake_set_timeout(session_, 0);  // the handshake deadline is the server's
}

TlsStream::~TlsStream() { gnutls_deinit(session_); }

Task<std::error_code> TlsStream::wait(bool for_write) {
  auto [ec] = co_await (for_write ? out_ : in_)
                  .async_wait(for_write ? Descriptor::wait_write : Descriptor::wait_read,
                              asio::as_tuple(asio::use_awaitable));
  co_return std::error_code(ec);
}

Task<std::error_code> TlsStream::handshake() {
  for (;;) {
    const int rc = gnutls_handshake(session_);
    if (rc == GNUTLS_E_SUCCESS) break;
    if (!again(rc) && gnutls_error_is_fatal(rc)) co_return tls_error(rc);
    if (again(rc)) {
      if (auto ec = co_await wait(gnutls_record_get_direction(session_) == 1)) co_return ec;
    }
  }
  find_peer_name();
  co_return std::error_code{};
}

Task<std::pair<std::error_code, size_t>> TlsStream::read_some(std::span<std::byte> buf) {
  for (;;) {
    const ssize_t n = gnutls_record_recv(session_, buf.data(), buf.size());
    if (n > 0) co_return std::pair{std::error_code{}, static_cast<size_t>(n)};
    if (n == 0) co_return std::pair{std::error_code(boost::system::error_code(asio::error::eof)), size_t{0}};
    if (again(n)) {
      if (auto ec = co_await wait(false)) co_return std::pair{ec, size_t{0}};
      continue;
    }
    // Alerts that are only warnings (a TLS 1.3 key update is handled inside).
    if (!gnutls_error_is_fatal(static_cast<int>(n))) continue;
    co_return std::pair{tls_error(static_cast<int>(n)), size_t{0}};
  }
}

Task<std::error_code> TlsStream::read_exact(std::span<std::byte> buf) {
  while (!buf.empty()) {
    auto [ec, n] = co_await read_some(buf);
    if (ec) co_return ec;
    buf = buf.subspan(n);
  }
  co_return std::error_code{};
}

std::error_code TlsStream::queue(const void* data, size_t size) {
  // Corked: GnuTLS copies into its record buffer and returns the full size.
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = gnutls_record_send(session_, p, size);
    if (n < 0) return tls_error(static_cast<int>(n));
    p += n;
    size -= static_cast<size_t>(n);
  }
  return {};
}

Task<std::error_code> TlsStream::uncork() {
  for (;;) {
    const int rc = gnutls_record_uncork(session_, 0);
    if (rc >= 0) co_return std::error_code{};
    if (!again(rc)) co_return tls_error(rc);
    if (auto ec = co_await wait(true)) co_return ec;
  }
}

void TlsStream::find_peer_name() {
  if (gnutls_auth_get_type(session_) == GNUTLS_CRD_PSK) {
    if (const char* user = gnutls_psk_server_get_username(session_)) peer_name_ = user;
    peer_psk_ = true;
    return;
  }
  // Only a certificate the handshake verified names the client.
  if (gnutls_certificate_type_get(session_) != GNUTLS_CRT_X509) return;
  unsigned count = 0;
  const gnutls_datum_t* certs = gnutls_certificate_get_peers(session_, &count);
  unsigned status = 0;
  if (!certs || count == 0 || gnutls_certificate_verify_peers2(session_, &status) < 0 || status != 0) return;
  gnutls_x509_crt_t crt = nullptr;
  if (gnutls_x509_crt_init(&crt) < 0) return;
  if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) >= 0) {
    char name[256];
    size_t size = sizeof name;
    if (gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, name, &size) >= 0)
      peer_name_.assign(name, size);
  }
  gnutls_x509_crt_deinit(crt);
}

std::string TlsStream::description() const {
  const char* v = gnutls_protocol_get_name(gnutls_protocol_get_version(session_));
  const char* c = gnutls_cipher_get_name(gnutls_cipher_get(session_));
  std::string out = std::string(v ? v : "TLS") + " " + (c ? c : "?");
  if (gnutls_auth_get_type(session_) == GNUTLS_CRD_PSK) out += " PSK";
  return out;
}

}  // namespace blockway::nbd
