// TlsStream: one connection's GnuTLS session over the socket's fd in
// non-blocking mode. GnuTLS reads and writes through our own transport
// functions, not the socket: the pull side reads the socket in large chunks
// into a buffer here (GnuTLS's own pull does two small recv calls per record,
// one for the header, one for the body), and the push side appends the
// encrypted records to an output buffer that one coroutine writes to the
// socket in large writes (GnuTLS's own push is one sendmsg per record). A
// reply's header and the first bytes of its payload share one record; small
// replies of one batch share records too. When GnuTLS would block on input,
// the coroutine waits for readability with Asio.
//
// Thread model: owned by one Channel on one io_context; one reader and one
// writer coroutine at a time may use it (GnuTLS allows one concurrent sender
// and one receiver per session). Records GnuTLS sends from inside a receive
// (a TLS 1.3 key update) join the output buffer; the reader writes them out
// if no writer is flushing.
#pragma once

#include "core/task.hpp"
#include "nbd/tls_context.hpp"

#include <boost/asio/buffer.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

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

  // Sends the buffers in order, in as few records and socket writes as the
  // sizes allow. Returns once every byte has been handed to the socket.
  template <class Buffers>
  core::Task<std::error_code> write_all(const Buffers& buffers) {
    pieces_.clear();
    for (auto it = boost::asio::buffer_sequence_begin(buffers); it != boost::asio::buffer_sequence_end(buffers);
         ++it)
      pieces_.emplace_back(*it);
    co_return co_await write_pieces();
  }

  // Who the client proved to be: its PSK identity, or the names in its
  // verified certificate (tls-verify-peer): the common name first, then the
  // subject alternative names (DNS, email, URI); empty if neither.
  [[nodiscard]] const std::string& peer_name() const noexcept { return peer_name_; }
  [[nodiscard]] const std::vector<std::string>& peer_names() const noexcept { return peer_names_; }
  [[nodiscard]] bool peer_is_psk() const noexcept { return peer_psk_; }
  // "TLS1.3 AES-256-GCM" and the like, for the log.
  [[nodiscard]] std::string description() const;

 private:
  static ssize_t pull(void* self, void* data, size_t size);
  static int pull_timeout(void* self, unsigned ms);
  static ssize_t push(void* self, const giovec_t* iov, int count);

  core::Task<std::error_code> write_pieces();
  std::error_code send_record(const std::byte* data, size_t size);
  core::Task<std::error_code> flush();
  core::Task<std::error_code> wait_readable();
  [[nodiscard]] bool record_buffered() const noexcept;
  void find_peer_name();

  Descriptor& in_;
  Descriptor& out_;
  gnutls_session_t session_ = nullptr;
  // Ciphertext read from the socket that GnuTLS has not pulled yet.
  std::unique_ptr<std::byte[]> in_buf_;
  size_t in_head_ = 0;
  size_t in_tail_ = 0;
  // Records pushed by GnuTLS and not yet written; flush() swaps it with
  // out_sending_ so a push during an asynchronous write never moves the
  // bytes being written.
  std::vector<std::byte> out_pending_;
  std::vector<std::byte> out_sending_;
  bool flushing_ = false;
  std::error_code write_error_;
  // write_all's buffers, and plaintext gathered into one record.
  std::vector<boost::asio::const_buffer> pieces_;
  std::unique_ptr<std::byte[]> stage_;
  size_t stage_len_ = 0;
  size_t record_size_ = 0;
  std::string peer_name_;
  std::vector<std::string> peer_names_;
  bool peer_psk_ = false;
};

}  // namespace blockway::nbd
