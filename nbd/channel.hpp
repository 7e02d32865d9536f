// Channel: the byte stream to one NBD client (a TCP or Unix socket, or
// stdin/stdout in --stdio mode), as one or two posix stream descriptors,
// in plaintext or, after start_tls(), through a TlsStream.
//
// Thread model: owned by one connection on one io_context; at most one read
// and one write outstanding at a time, as Asio requires.
#pragma once

#include "core/task.hpp"
#include "nbd/tls_stream.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include <array>
#include <memory>
#include <optional>
#include <span>
#include <system_error>

namespace blockway::nbd {

class Channel {
 public:
  using Descriptor = boost::asio::posix::stream_descriptor;

  // A socket: one descriptor both ways.
  explicit Channel(Descriptor both) : in_(std::move(both)) {}
  // Separate input and output (stdin/stdout).
  Channel(Descriptor in, Descriptor out) : in_(std::move(in)), out_(std::move(out)) {}

  [[nodiscard]] Descriptor& in() noexcept { return in_; }
  [[nodiscard]] Descriptor& out() noexcept { return out_ ? *out_ : in_; }
  [[nodiscard]] boost::asio::any_io_executor executor() { return in_.get_executor(); }

  core::Task<std::error_code> read_exact(std::span<std::byte> buf) {
    if (tls_) co_return co_await tls_->read_exact(buf);
    auto [ec, n] = co_await boost::asio::async_read(
        in_, boost::asio::buffer(buf.data(), buf.size()), whole_transfer,
        boost::asio::as_tuple(boost::asio::use_awaitable));
    co_return std::error_code(ec);
  }

  // Reads `first` whole and, in the same system calls (readv), whatever of
  // `then` the stream already holds by then, maybe nothing: -> the error and
  // how many bytes went to `then`. The session reads a large write's payload
  // straight into its buffer this way and picks up the next request's header
  // with it. Through TLS only `first` is read.
  core::Task<std::pair<std::error_code, size_t>> read_exact_then(std::span<std::byte> first,
                                                                 std::span<std::byte> then) {
    if (tls_) co_return std::pair{co_await tls_->read_exact(first), size_t{0}};
    const std::array<boost::asio::mutable_buffer, 2> bufs{boost::asio::buffer(first.data(), first.size()),
                                                          boost::asio::buffer(then.data(), then.size())};
    const size_t need = first.size();
    auto until_first_full = [need](const boost::system::error_code& ec, std::size_t done) -> std::size_t {
      return ec || done >= need ? 0 : std::size_t{1} << 30;
    };
    auto [ec, n] = co_await boost::asio::async_read(in_, bufs, until_first_full,
                                                    boost::asio::as_tuple(boost::asio::use_awaitable));
    if (n < need) co_return std::pair{std::error_code(ec ? ec : boost::asio::error::eof), size_t{0}};
    co_return std::pair{std::error_code{}, n - need};
  }

  // Whatever the stream has now, at least one byte.
  core::Task<std::pair<std::error_code, size_t>> read_some(std::span<std::byte> buf) {
    if (tls_) co_return co_await tls_->read_some(buf);
    auto [ec, n] = co_await in_.async_read_some(boost::asio::buffer(buf.data(), buf.size()),
                                                boost::asio::as_tuple(boost::asio::use_awaitable));
    co_return std::pair{std::error_code(ec), n};
  }

  template <class Buffers>
  core::Task<std::error_code> write_all(const Buffers& buffers) {
    if (tls_) co_return co_await tls_->write_all(buffers);
    auto [ec, n] = co_await boost::asio::async_write(
        out(), buffers, whole_transfer, boost::asio::as_tuple(boost::asio::use_awaitable));
    co_return std::error_code(ec);
  }

  // Runs the TLS handshake on this stream (after NBD_OPT_STARTTLS); from then
  // on every read and write goes through TLS. Nothing is buffered in
  // plaintext here, so bytes a client sent before the handshake are read by
  // GnuTLS as (broken) TLS records, never as NBD.
  core::Task<std::error_code> start_tls(const TlsContext& context) {
    try {
      tls_ = std::make_unique<TlsStream>(context, in_, out());
    } catch (const std::exception&) {
      co_return std::make_error_code(std::errc::protocol_error);
    }
    co_return co_await tls_->handshake();
  }
  [[nodiscard]] const TlsStream* tls() const noexcept { return tls_.get(); }

  // Cancels a pending read only (a write in progress goes on).
  void cancel_read() {
    boost::system::error_code ignored;
    in_.cancel(ignored);
  }
  // Cancels pending reads and writes; the stream stays open.
  void cancel() {
    boost::system::error_code ignored;
    in_.cancel(ignored);
    if (out_) out_->cancel(ignored);
  }
  // The TLS session stays until the Channel goes: a coroutine cancelled by
  // the close may still resume inside it.
  void close() {
    boost::system::error_code ignored;
    in_.close(ignored);
    if (out_) out_->close(ignored);
  }

 private:
  // Asio's default completion conditions (transfer_all, transfer_exactly)
  // hand at most 64 KiB to each read/writev, so a 256 KiB read reply took
  // four writev calls and as many trips through the reactor. Let each call
  // take as much as the socket accepts.
  static std::size_t whole_transfer(const boost::system::error_code& ec, std::size_t) {
    return ec ? 0 : std::size_t{1} << 30;
  }

  Descriptor in_;
  std::optional<Descriptor> out_;
  std::unique_ptr<TlsStream> tls_;
};

}  // namespace blockway::nbd
