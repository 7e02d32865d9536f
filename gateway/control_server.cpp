#include "gateway/control_server.hpp"

#include "gateway/logging.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

namespace blockway::gateway {

namespace asio = boost::asio;
using stream = asio::local::stream_protocol;

ControlServer::ControlServer(asio::io_context& ctx, const ControlDispatcher& dispatcher)
    : ctx_(ctx), dispatcher_(dispatcher) {}

ControlServer::~ControlServer() {
  if (path_.empty()) return;
  struct stat st {};
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) ::unlink(path_.c_str());
}

bool ControlServer::is_live(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  asio::io_context probe_ctx;
  stream::socket probe(probe_ctx);
  boost::system::error_code ec;
  probe.connect(stream::endpoint(path), ec);
  return !ec;
}

void ControlServer::listen(const std::string& path, mode_t mode) {
  const std::string where = "control socket " + path;
  if (path.empty() || path.front() != '/') throw std::runtime_error(where + ": needs an absolute path");
  if (path.size() >= 108) throw std::runtime_error(where + ": path is too long for a Unix socket");
  std::error_code fs_ec;
  const auto dir = std::filesystem::path(path).parent_path();
  if (!std::filesystem::exists(dir, fs_ec)) {
    std::filesystem::create_directories(dir, fs_ec);
    if (fs_ec) throw std::runtime_error(where + ": cannot create " + dir.string() + ": " + fs_ec.message());
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) throw std::runtime_error(where + ": the path exists and is not a socket");
    // Left behind by a crash, or in use by a running daemon: only a stale one
    // may be replaced.
    if (is_live(path)) throw std::runtime_error(where + ": another daemon is listening there");
    ::unlink(path.c_str());
  }
  auto acceptor = std::make_unique<stream::acceptor>(ctx_);
  boost::system::error_code ec;
  acceptor->open(stream(), ec);
  if (!ec) {
    // Bind under a strict umask so the socket is never reachable by others,
    // not even between bind() and chmod().
    const mode_t old = ::umask(0177);
    acceptor->bind(stream::endpoint(path), ec);
    ::umask(old);
  }
  if (!ec && ::chmod(path.c_str(), mode) != 0) ec.assign(errno, boost::system::system_category());
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) throw std::runtime_error(where + ": " + ec.message());
  struct stat mine {};
  ::lstat(path.c_str(), &mine);
  path_ = path;
  dev_ = mine.st_dev;
  ino_ = mine.st_ino;
  acceptor_ = std::move(acceptor);
  asio::co_spawn(ctx_, accept_loop(), asio::detached);
}

void ControlServer::stop() {
  asio::post(ctx_, [this] {
    stopped_ = true;
    boost::system::error_code ignored;
    if (acceptor_) acceptor_->close(ignored);
    for (auto& w : clients_)
      if (auto s = w.lock()) s->close(ignored);
    clients_.clear();
  });
}

Task<void> ControlServer::accept_loop() {
  auto log = logger("control");
  while (!stopped_) {
    auto [ec, socket] = co_await acceptor_->async_accept(asio::as_tuple(asio::use_awaitable));
    if (stopped_) {
      // An accept that completed just before stop(): that client would keep
      // the loop busy after the drain.
      boost::system::error_code ignored;
      socket.close(ignored);
      co_return;
    }
    if (ec) {
      if (ec == asio::error::operation_aborted) co_return;
      log->warn("control socket: accept failed: {}", ec.message());
      // Out of descriptors (EMFILE) fails at once again: do not spin.
      asio::steady_timer pause(ctx_, std::chrono::milliseconds(100));
      co_await pause.async_wait(asio::use_awaitable);
      continue;
    }
    auto client = std::make_shared<Socket>(std::move(socket));
    // Forget clients that have gone, so the list stays as long as the live ones.
    clients_.remove_if([](const std::weak_ptr<Socket>& w) { return w.expired(); });
    clients_.push_back(client);
    asio::co_spawn(ctx_, serve(client), asio::detached);
  }
}

Task<void> ControlServer::serve(std::shared_ptr<Socket> socket) {
  std::string buffer;
  while (true) {
    auto dyn = asio::dynamic_buffer(buffer, kMaxControlRequest + 1);
    auto [ec, n] = co_await asio::async_read_until(*socket, dyn, '\n', asio::as_tuple(asio::use_awaitable));
    std::string line;
    bool last = false;
    if (ec == asio::error::not_found) {
      // No newline within the limit: answer once and hang up, since the rest
      // of the line cannot be told apart from the next request.
      std::string reply = ControlDispatcher::error_line(
          "too-large", E2BIG, "request line is longer than " + std::to_string(kMaxControlRequest) + " bytes");
      reply += '\n';
      auto [wec, wn] = co_await asio::async_write(*socket, asio::buffer(reply), asio::as_tuple(asio::use_awaitable));
      (void)wec;
      (void)wn;
      break;
    } else if (ec == asio::error::eof && !buffer.empty()) {
      line = std::move(buffer);  // a last request without its newline
      buffer.clear();
      last = true;
    } else if (ec) {
      break;
    } else {
      line = buffer.substr(0, n - 1);
      buffer.erase(0, n);
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) {
      if (last) break;
      continue;
    }
    std::string reply = co_await dispatcher_.handle(line);
    reply += '\n';
    auto [wec, wn] = co_await asio::async_write(*socket, asio::buffer(reply), asio::as_tuple(asio::use_awaitable));
    (void)wn;
    if (wec || last) break;
  }
  boost::system::error_code ignored;
  socket->close(ignored);
}

}  // namespace blockway::gateway
