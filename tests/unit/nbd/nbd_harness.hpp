// Test harness for the NBD front end: the server side (nbd::negotiate and
// optionally nbd::Session) runs on its own io_context thread over one end of
// a socketpair; the test drives the other end with blocking reads and writes,
// encoding NBD messages by hand.
#pragma once

#include "core/export.hpp"
#include "nbd/handshake.hpp"
#include "nbd/protocol.hpp"
#include "nbd/session.hpp"
#include "tests/support/memory_device.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace blockway::test {

using Bytes = std::vector<std::byte>;

// ---------------------------------------------------------------- encoding

inline void append(Bytes& out, const void* p, size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n);
}
inline void append16(Bytes& out, uint16_t v) {
  std::byte b[2];
  nbd::put16(b, v);
  append(out, b, 2);
}
inline void append32(Bytes& out, uint32_t v) {
  std::byte b[4];
  nbd::put32(b, v);
  append(out, b, 4);
}
inline void append64(Bytes& out, uint64_t v) {
  std::byte b[8];
  nbd::put64(b, v);
  append(out, b, 8);
}
inline void append_str(Bytes& out, const std::string& s) { append(out, s.data(), s.size()); }
inline std::string to_string(const Bytes& b, size_t from = 0) {
  return std::string(reinterpret_cast<const char*>(b.data()) + from, b.size() - from);
}

// IHAVEOPT + option + length + payload.
inline Bytes option(uint32_t opt, const Bytes& payload = {}) {
  Bytes out;
  append64(out, nbd::kIHaveOpt);
  append32(out, opt);
  append32(out, static_cast<uint32_t>(payload.size()));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

// NBD_OPT_INFO / NBD_OPT_GO payload.
inline Bytes info_payload(const std::string& name, const std::vector<uint16_t>& requests = {}) {
  Bytes p;
  append32(p, static_cast<uint32_t>(name.size()));
  append_str(p, name);
  append16(p, static_cast<uint16_t>(requests.size()));
  for (auto r : requests) append16(p, r);
  return p;
}

// NBD_OPT_{LIST,SET}_META_CONTEXT payload.
inline Bytes meta_payload(const std::string& name, const std::vector<std::string>& queries) {
  Bytes p;
  append32(p, static_cast<uint32_t>(name.size()));
  append_str(p, name);
  append32(p, static_cast<uint32_t>(queries.size()));
  for (const auto& q : queries) {
    append32(p, static_cast<uint32_t>(q.size()));
    append_str(p, q);
  }
  return p;
}

inline Bytes request(uint16_t type, uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t length,
                     const Bytes& payload = {}, uint32_t magic = nbd::kRequestMagic) {
  // Sized once and copied into: GCC 12 at -O3 took insert() of an empty
  // payload for an out-of-bounds access (-Warray-bounds).
  Bytes out(nbd::kRequestHeaderSize + payload.size());
  nbd::RequestHeader{magic, flags, type, cookie, offset, length}.encode(out.data());
  std::copy(payload.begin(), payload.end(), out.begin() + nbd::kRequestHeaderSize);
  return out;
}

// ---------------------------------------------------------------- blocking client I/O

// Every read gives up after this long, so a broken server fails a test instead of hanging it.
inline constexpr int kIoTimeoutSeconds = 5;

inline bool send_all(int fd, const Bytes& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Exactly n bytes, or nullopt on EOF, error or timeout.
inline std::optional<Bytes> recv_exact(int fd, size_t n) {
  Bytes out(n);
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::recv(fd, out.data() + done, n - done, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return std::nullopt;
    done += static_cast<size_t>(r);
  }
  return out;
}

// True when the server closed the connection (EOF), false on data or timeout.
inline bool closed_by_peer(int fd) {
  std::byte b;
  while (true) {
    const ssize_t r = ::recv(fd, &b, 1, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) return true;
    if (r < 0 && errno == ECONNRESET) return true;
    return false;
  }
}

struct OptionReply {
  uint64_t magic = 0;
  uint32_t option = 0;
  uint32_t type = 0;
  Bytes data;
};

// Reads the `len` bytes of a payload into out (none when len is 0); false
// when the connection ends first.
inline bool recv_payload(int fd, size_t len, Bytes& out) {
  if (len == 0) return true;
  auto data = recv_exact(fd, len);
  if (!data) return false;
  out = std::move(*data);
  return true;
}

inline std::optional<OptionReply> read_option_reply(int fd) {
  auto head = recv_exact(fd, 20);
  if (!head) return std::nullopt;
  OptionReply r;
  r.magic = nbd::get64(head->data());
  r.option = nbd::get32(head->data() + 8);
  r.type = nbd::get32(head->data() + 12);
  const uint32_t len = nbd::get32(head->data() + 16);
  if (len > (1u << 20)) return std::nullopt;
  if (!recv_payload(fd, len, r.data)) return std::nullopt;
  return r;
}

// One transmission-phase reply: simple, or one structured chunk.
struct Reply {
  bool structured = false;
  uint32_t error = 0;  // simple replies
  uint16_t flags = 0;  // structured chunks
  uint16_t type = 0;
  uint64_t cookie = 0;
  Bytes payload;  // structured: chunk payload; simple: data (for reads)
};

// Reads one reply; a simple reply to a successful read carries `read_length` data bytes.
inline std::optional<Reply> read_reply(int fd, uint32_t read_length = 0) {
  auto magic_raw = recv_exact(fd, 4);
  if (!magic_raw) return std::nullopt;
  const uint32_t magic = nbd::get32(magic_raw->data());
  Reply r;
  if (magic == nbd::kSimpleReplyMagic) {
    auto rest = recv_exact(fd, 12);
    if (!rest) return std::nullopt;
    r.error = nbd::get32(rest->data());
    r.cookie = nbd::get64(rest->data() + 4);
    if (r.error == 0 && !recv_payload(fd, read_length, r.payload)) return std::nullopt;
    return r;
  }
  if (magic != nbd::kStructuredReplyMagic) return std::nullopt;
  auto rest = recv_exact(fd, 16);
  if (!rest) return std::nullopt;
  r.structured = true;
  r.flags = nbd::get16(rest->data());
  r.type = nbd::get16(rest->data() + 2);
  r.cookie = nbd::get64(rest->data() + 4);
  const uint32_t len = nbd::get32(rest->data() + 12);
  if (len > (64u << 20)) return std::nullopt;
  if (!recv_payload(fd, len, r.payload)) return std::nullopt;
  return r;
}

// ---------------------------------------------------------------- exports

struct TestExport {
  std::shared_ptr<core::Export> exp;
  MemoryDevice* mem = nullptr;  // owned by exp->device
};

inline TestExport make_export(const std::string& name, core::Geometry geo, core::Capabilities caps,
                              bool read_only = false, const std::string& description = "") {
  auto mem = std::make_unique<MemoryDevice>(geo, caps);
  TestExport t;
  t.mem = mem.get();
  t.exp = std::make_shared<core::Export>();
  t.exp->name = name;
  t.exp->description = description;
  t.exp->uri = "memory:" + name;
  t.exp->device = std::make_shared<core::CheckedDevice>(std::move(mem), read_only);
  return t;
}

// ---------------------------------------------------------------- server side

class ServerHarness {
 public:
  // Runs negotiate() and, if `limits` is given and the handshake succeeds, a Session.
  ServerHarness(const core::ExportTable& table, nbd::HandshakeOptions hopts,
                std::optional<nbd::SessionLimits> limits = std::nullopt)
      : table_(table), hopts_(hopts), limits_(limits) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw std::runtime_error("socketpair");
    client_ = sv[0];
    timeval tv{kIoTimeoutSeconds, 0};
    ::setsockopt(client_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(client_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    channel_.emplace(nbd::Channel::Descriptor(io_, sv[1]));
    boost::asio::co_spawn(io_, serve(this), [this](std::exception_ptr e) {
      std::lock_guard lock(mutex_);
      if (e) {
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& ex) {
          server_error_ = ex.what();
        }
      }
      done_ = true;
      cv_.notify_all();
    });
    thread_ = std::thread([this] { io_.run(); });
  }

  ~ServerHarness() {
    if (client_ >= 0) ::shutdown(client_, SHUT_RDWR);
    if (!wait_done()) io_.stop();
    thread_.join();
    if (client_ >= 0) ::close(client_);
  }
  ServerHarness(const ServerHarness&) = delete;
  ServerHarness& operator=(const ServerHarness&) = delete;

  [[nodiscard]] int client() const { return client_; }

  // Waits until the server coroutine has finished (negotiate failed, or the session ended).
  bool wait_done(std::chrono::milliseconds timeout = std::chrono::seconds(kIoTimeoutSeconds)) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [this] { return done_; });
  }
  // Waits until negotiate() has returned.
  bool wait_negotiated(std::chrono::milliseconds timeout = std::chrono::seconds(kIoTimeoutSeconds)) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [this] { return negotiated_done_; });
  }
  // The handshake's result, once wait_negotiated() returned true.
  std::optional<nbd::Negotiated> negotiated() {
    std::lock_guard lock(mutex_);
    return negotiated_;
  }
  std::string server_error() {
    std::lock_guard lock(mutex_);
    return server_error_;
  }
  boost::asio::io_context& io() { return io_; }
  // Runs fn(session) on the server's io thread, where the Session lives, and
  // waits for it; false when there is no session or the thread did not run it.
  bool on_session(const std::function<void(nbd::Session&)>& fn) {
    auto ran = std::make_shared<std::promise<bool>>();  // shared: outlives a timed-out wait
    auto result = ran->get_future();
    boost::asio::post(io_, [this, fn, ran] {
      if (session_) fn(*session_);
      ran->set_value(session_ != nullptr);
    });
    if (result.wait_for(std::chrono::seconds(kIoTimeoutSeconds)) != std::future_status::ready) return false;
    return result.get();
  }

 private:
  static core::Task<void> serve(ServerHarness* h) {
    auto result = co_await nbd::negotiate(*h->channel_, h->table_, h->hopts_, h->peer_);
    {
      std::lock_guard lock(h->mutex_);
      h->negotiated_ = result;
      h->negotiated_done_ = true;
    }
    h->cv_.notify_all();
    if (result && h->limits_) {
      h->session_ = std::make_shared<nbd::Session>(*h->channel_, std::move(*result), *h->limits_);
      co_await h->session_->run();
    }
    h->channel_->close();
    // As nbd::Server does: unflushed writes are flushed once the client is gone.
    if (h->session_) co_await h->session_->flush_if_dirty();
  }

  boost::asio::io_context io_;
  const core::ExportTable& table_;
  nbd::PeerInfo peer_{.text = "test client"};
  nbd::HandshakeOptions hopts_;
  std::optional<nbd::SessionLimits> limits_;
  std::optional<nbd::Channel> channel_;
  std::shared_ptr<nbd::Session> session_;
  int client_ = -1;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  bool negotiated_done_ = false;
  std::optional<nbd::Negotiated> negotiated_;
  std::string server_error_;
  std::thread thread_;
};

// ---------------------------------------------------------------- client side handshake

// Reads the greeting and sends the client flags; false if the greeting is wrong.
inline bool client_start(int fd, uint32_t client_flags = nbd::kClientFixedNewstyle | nbd::kClientNoZeroes) {
  auto g = recv_exact(fd, 18);
  if (!g || nbd::get64(g->data()) != nbd::kNbdMagic || nbd::get64(g->data() + 8) != nbd::kIHaveOpt)
    return false;
  Bytes flags;
  append32(flags, client_flags);
  return send_all(fd, flags);
}

// Sends one option and collects replies up to and including the first ACK or error.
inline std::vector<OptionReply> exchange(int fd, uint32_t opt, const Bytes& payload = {}) {
  std::vector<OptionReply> out;
  if (!send_all(fd, option(opt, payload))) return out;
  while (auto r = read_option_reply(fd)) {
    out.push_back(*r);
    if (r->type == nbd::kRepAck || (r->type & nbd::kRepErrBit)) break;
  }
  return out;
}

// Full client handshake up to GO: optional structured replies and base:allocation.
inline bool client_go(int fd, const std::string& name, bool structured, bool meta) {
  if (!client_start(fd)) return false;
  if (structured) {
    auto r = exchange(fd, nbd::kOptStructuredReply);
    if (r.size() != 1 || r[0].type != nbd::kRepAck) return false;
  }
  if (meta) {
    auto r = exchange(fd, nbd::kOptSetMetaContext, meta_payload(name, {"base:allocation"}));
    if (r.empty() || r.back().type != nbd::kRepAck) return false;
  }
  auto r = exchange(fd, nbd::kOptGo, info_payload(name));
  return !r.empty() && r.back().type == nbd::kRepAck;
}

}  // namespace blockway::test
