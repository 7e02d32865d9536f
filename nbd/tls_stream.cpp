#include "nbd/tls_stream.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/write.hpp>
#include <gnutls/x509.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace blockway::nbd {
namespace asio = boost::asio;
using core::Task;

namespace {

// One read takes what a busy socket holds; a flush starts once this much is
// encrypted, so the client decrypts one part while we encrypt the next.
constexpr size_t kInBuffer = 256u << 10;
constexpr size_t kFlushAt = 256u << 10;
constexpr size_t kMaxRecord = 16384;  // TLS's largest plaintext record
constexpr size_t kRecordHeader = 5;   // type, version, length

class TlsCategory : public std::error_category {
 public:
  const char* name() const noexcept override { return "gnutls"; }
  std::string message(int code) const override { return gnutls_strerror(-code); }
};

std::error_code tls_error(int rc) { return {-rc, tls_category()}; }

bool again(long rc) { return rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED; }

// Asio's transfer_all hands at most 64 KiB to each write; take all at once.
std::size_t whole_transfer(const boost::system::error_code& ec, std::size_t) {
  return ec ? 0 : std::size_t{1} << 30;
}

}  // namespace

const std::error_category& tls_category() noexcept {
  static const TlsCategory category;
  return category;
}

TlsStream::TlsStream(const TlsContext& context, Descriptor& in, Descriptor& out)
    : in_(in), out_(out), in_buf_(new std::byte[kInBuffer]), stage_(new std::byte[kMaxRecord]) {
  if (int rc = gnutls_init(&session_, GNUTLS_SERVER | GNUTLS_NONBLOCK); rc < 0)
    throw std::runtime_error(std::string("TLS session: ") + gnutls_strerror(rc));
  if (int rc = context.configure(session_); rc < 0) {
    gnutls_deinit(session_);
    throw std::runtime_error(std::string("TLS session: ") + gnutls_strerror(rc));
  }
  boost::system::error_code ignored;
  in_.non_blocking(true, ignored);
  out_.non_blocking(true, ignored);
  gnutls_transport_set_ptr(session_, this);
  gnutls_transport_set_pull_function(session_, &TlsStream::pull);
  gnutls_transport_set_pull_timeout_function(session_, &TlsStream::pull_timeout);
  gnutls_transport_set_vec_push_function(session_, &TlsStream::push);
  gnutls_handshake_set_timeout(session_, 0);  // the handshake deadline is the server's
}

TlsStream::~TlsStream() { gnutls_deinit(session_); }

ssize_t TlsStream::pull(void* p, void* data, size_t size) {
  auto* self = static_cast<TlsStream*>(p);
  if (self->in_head_ == self->in_tail_) {
    const ssize_t n = ::read(self->in_.native_handle(), self->in_buf_.get(), kInBuffer);
    if (n <= 0) {
      if (n < 0) gnutls_transport_set_errno(self->session_, errno);
      return n;
    }
    self->in_head_ = 0;
    self->in_tail_ = static_cast<size_t>(n);
  }
  const size_t n = std::min(size, self->in_tail_ - self->in_head_);
  std::memcpy(data, self->in_buf_.get() + self->in_head_, n);
  self->in_head_ += n;
  return static_cast<ssize_t>(n);
}

int TlsStream::pull_timeout(void* p, unsigned ms) {
  auto* self = static_cast<TlsStream*>(p);
  if (self->in_head_ != self->in_tail_) return 1;
  pollfd fd{self->in_.native_handle(), POLLIN, 0};
  return ::poll(&fd, 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : static_cast<int>(ms));
}

ssize_t TlsStream::push(void* p, const giovec_t* iov, int count) {
  auto* self = static_cast<TlsStream*>(p);
  if (self->write_error_) {
    gnutls_transport_set_errno(self->session_, EPIPE);
    return -1;
  }
  size_t total = 0;
  for (int i = 0; i < count; ++i) {
    const auto* b = static_cast<const std::byte*>(iov[i].iov_base);
    self->out_pending_.insert(self->out_pending_.end(), b, b + iov[i].iov_len);
    total += iov[i].iov_len;
  }
  return static_cast<ssize_t>(total);
}

Task<std::error_code> TlsStream::flush() {
  flushing_ = true;
  while (!out_pending_.empty() && !write_error_) {
    out_sending_.swap(out_pending_);
    auto [ec, n] = co_await asio::async_write(out_, asio::buffer(out_sending_), whole_transfer,
                                              asio::as_tuple(asio::use_awaitable));
    out_sending_.clear();
    if (ec) write_error_ = ec;
  }
  out_pending_.clear();  // after an error nothing more can leave
  flushing_ = false;
  co_return write_error_;
}

Task<std::error_code> TlsStream::wait_readable() {
  auto [ec] = co_await in_.async_wait(Descriptor::wait_read, asio::as_tuple(asio::use_awaitable));
  co_return std::error_code(ec);
}

Task<std::error_code> TlsStream::handshake() {
  for (;;) {
    const int rc = gnutls_handshake(session_);
    // Our push never blocks: what the step produced (or an alert) goes out now.
    if (!out_pending_.empty()) {
      if (auto ec = co_await flush()) co_return ec;
    }
    if (rc == GNUTLS_E_SUCCESS) break;
    if (!again(rc) && gnutls_error_is_fatal(rc)) co_return tls_error(rc);
    if (again(rc)) {
      if (auto ec = co_await wait_readable()) co_return ec;
    }
  }
  record_size_ = std::clamp<size_t>(gnutls_record_get_max_size(session_), 512, kMaxRecord);
  find_peer_name();
  co_return std::error_code{};
}

bool TlsStream::record_buffered() const noexcept {
  // Decrypted bytes of a record the last receive did not take, or a whole
  // record in our buffer (GnuTLS pulls a record's header, then its body, so
  // in_head_ sits on a record boundary between receives; if it ever does
  // not, a receive finds the record incomplete and says AGAIN: one more
  // read() that returns EAGAIN, no wrong data).
  if (gnutls_record_check_pending(session_) > 0) return true;
  const size_t avail = in_tail_ - in_head_;
  if (avail < kRecordHeader) return false;
  const auto* h = in_buf_.get() + in_head_;
  const size_t length = (std::to_integer<size_t>(h[3]) << 8) | std::to_integer<size_t>(h[4]);
  return avail >= kRecordHeader + length;
}

Task<std::pair<std::error_code, size_t>> TlsStream::read_some(std::span<std::byte> buf) {
  // A receive returns one record at most; a client's small records (a
  // request header, a 4 KiB write's payload, libnbd sends each in its own)
  // that already arrived are taken in the same call, so the session parses
  // a batch of requests per wake-up as it does in plaintext.
  size_t got = 0;
  for (;;) {
    const ssize_t n = gnutls_record_recv(session_, buf.data() + got, buf.size() - got);
    // A key update answered inside the receive waits in out_pending_; the
    // writer sends it with its next batch if it is flushing, else we do.
    if (!out_pending_.empty() && !flushing_) {
      if (auto ec = co_await flush()) co_return std::pair{ec, got};
    }
    if (n > 0) {
      got += static_cast<size_t>(n);
      if (got < buf.size() && record_buffered()) continue;
      co_return std::pair{std::error_code{}, got};
    }
    if (got > 0) co_return std::pair{std::error_code{}, got};  // the next call sees the end or the error
    if (n == 0) co_return std::pair{std::error_code(boost::system::error_code(asio::error::eof)), size_t{0}};
    if (again(n)) {
      if (auto ec = co_await wait_readable()) co_return std::pair{ec, size_t{0}};
      continue;
    }
    // Alerts that are only warnings.
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

std::error_code TlsStream::send_record(const std::byte* data, size_t size) {
  // Our push takes everything, so GnuTLS never returns AGAIN here.
  while (size > 0) {
    const ssize_t n = gnutls_record_send(session_, data, size);
    if (n < 0) return write_error_ ? write_error_ : tls_error(static_cast<int>(n));
    data += n;
    size -= static_cast<size_t>(n);
  }
  return {};
}

Task<std::error_code> TlsStream::write_pieces() {
  // Small pieces (headers, short payloads) are gathered into one record;
  // a large payload is encrypted in place from its own buffer once the
  // gathered bytes have been topped up to a full record.
  for (const auto& piece : pieces_) {
    const auto* p = static_cast<const std::byte*>(piece.data());
    size_t n = piece.size();
    while (n > 0) {
      size_t used;
      std::error_code ec;
      if (stage_len_ == 0 && n >= record_size_) {
        used = std::min(n - n % record_size_, 16 * record_size_);  // then a flush check
        ec = send_record(p, used);
      } else {
        used = std::min(n, record_size_ - stage_len_);
        std::memcpy(stage_.get() + stage_len_, p, used);
        stage_len_ += used;
        if (stage_len_ == record_size_) {
          ec = send_record(stage_.get(), stage_len_);
          stage_len_ = 0;
        }
      }
      if (ec) co_return ec;
      p += used;
      n -= used;
      if (out_pending_.size() >= kFlushAt && !flushing_) {
        if (auto fec = co_await flush()) co_return fec;
      }
    }
  }
  if (stage_len_ > 0) {
    const size_t len = stage_len_;
    stage_len_ = 0;
    if (auto ec = send_record(stage_.get(), len)) co_return ec;
  }
  if (flushing_) co_return write_error_;  // the reader is writing; it takes ours too
  co_return co_await flush();
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
      peer_names_.emplace_back(name, size);
    // Subject alternative names a cert: rule may name; IP addresses and
    // other kinds are left out (an address rule checks the real peer).
    for (unsigned i = 0;; ++i) {
      size = sizeof name;
      const int type = gnutls_x509_crt_get_subject_alt_name(crt, i, name, &size, nullptr);
      if (type == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) break;
      if (type == GNUTLS_E_SHORT_MEMORY_BUFFER) continue;  // longer than any name we accept
      if (type < 0) break;
      if (type == GNUTLS_SAN_DNSNAME || type == GNUTLS_SAN_RFC822NAME || type == GNUTLS_SAN_URI)
        peer_names_.emplace_back(name, size);
    }
    if (!peer_names_.empty()) peer_name_ = peer_names_.front();
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
