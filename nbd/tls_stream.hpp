// TlsStream: one connection's GnuTLS session, run directly on the socket's
// fd in non-blocking mode; when GnuTLS would block, the coroutine waits for
// readiness with Asio (no extra buffer between the socket and GnuTLS). Replies
// are written corked, so a reply header and its payload leave in full-size
// records with one sendmsg per batch.
//
// Thread model: owned by one Channel on one io_context; one reader and one
// writer coroutine at a time may use it (GnuTLS allows one concurrent sender
// and one receiver per session).
#pragma once

#include "core/task.hpp"
#include "nbd/tls_context.hpp"

#include <boost/asio/buffer.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <utility>

namespace blockway::nbd {

// GnuTLS error codes (negative) as std::error_code, with gnutls_strerror text.
const std::error_category& tls_category() noexcept;

class TlsStream {
 public:
  using Descriptor = boost::asio::posix::stream_descriptor;

  // A server session over `in` and `out` (the same descriptor for a socket).
  // Both are switched to non-blocking mode. Throws std::runtime_error.
  TlsStream(const TlsContext& context, Descriptor& in, Descriptor& out);
  ~TlsStream();
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  // The TLS handshake; an error means the client was not admitted.
  core::Task<std::error_code> handshake();
  core::Task<std::pair<std::error_code, size_t>> read_some(std::span<std::byte> buf);
  core::Task<std::error_code> read_exact(std::span<std::byte> buf);

  template <class Buffers>
  core::Task<std::error_code> write_all(const Buffers& buffers) {
    gnutls_record_cork(session_);
    for (auto it = boost::asio::buffer_sequence_begin(buffers); it != boost::asio::buffer_sequence_end(buffers);
         ++it) {
      const boost::asio::const_buffer b(*it);
      if (auto ec = queue(b.data(), b.size())) {
        (void)gnutls_record_uncork(session_, 0);
        co_return ec;
      }
    }
    co_return co_await uncork();
  }

  // Who the client proved to be: its PSK identity, or the common name of its
  // verified certificate (tls-verify-peer); empty if neither.
  [[nodiscard]] const std::string& peer_name() const noexcept { return peer_name_; }
  [[nodiscard]] bool peer_is_psk() const noexcept { return peer_psk_; }
  // "TLS1.3 AES-256-GCM" and the like, for the log.
  [[nodiscard]] std::string description() const;

 private:
  std::error_code queue(const void* data, size_t size);
  core::Task<std::error_code> uncork();
  core::Task<std::error_code> wait(bool for_write);
  void find_peer_name();

  Descriptor& in_;
  Descriptor& out_;
  gnutls_session_t session_ = nullptr;
  std::string peer_name_;
  bool peer_psk_ = false;
};

}  // namespace blockway::nbd
