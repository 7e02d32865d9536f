// ClientAcceptor: the accept loop the daemon's small servers share (the
// control socket and the metrics endpoint). It accepts until stop(), pauses
// 100 ms after a failed accept (out of descriptors, EMFILE, fails at once
// again: it must not spin), drops a connection that admit() refuses, keeps
// weak references to the live connections so that stop() can close them,
// and hands each admitted connection to serve() in its own coroutine.
//
// Thread model: the acceptor, the loop and every connection run on one
// io_context (the daemon's loop 0); stop() may be called from any thread: it
// posts there. stopped() is read on that io_context only.
#pragma once

#include "core/logging.hpp"
#include "core/task.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <utility>

namespace blockway::gateway {

template <class Protocol>
class ClientAcceptor {
 public:
  using Socket = typename Protocol::socket;
  using Acceptor = typename Protocol::acceptor;
  using Serve = std::function<core::Task<void>(std::shared_ptr<Socket>)>;
  // Decides, before anything is read, whether a connection is served.
  using Admit = std::function<bool(Socket&)>;

  // `logger` and `what` name the server in the warning of a failed accept.
  ClientAcceptor(boost::asio::io_context& ctx, std::string logger, std::string what)
      : ctx_(ctx), logger_(std::move(logger)), what_(std::move(what)) {}
  ClientAcceptor(const ClientAcceptor&) = delete;
  ClientAcceptor& operator=(const ClientAcceptor&) = delete;

  // Starts accepting on a bound, listening acceptor.
  void start(std::unique_ptr<Acceptor> acceptor, Serve serve, Admit admit = {}) {
    acceptor_ = std::move(acceptor);
    serve_ = std::move(serve);
    admit_ = std::move(admit);
    boost::asio::co_spawn(ctx_, accept_loop(), boost::asio::detached);
  }

  // Stops accepting and closes every live connection.
  void stop() {
    boost::asio::post(ctx_, [this] {
      stopped_ = true;
      boost::system::error_code ignored;
      if (acceptor_) acceptor_->close(ignored);
      for (auto& w : clients_)
        if (auto s = w.lock()) s->close(ignored);
      clients_.clear();
    });
  }

  [[nodiscard]] bool stopped() const noexcept { return stopped_; }
  [[nodiscard]] Acceptor* acceptor() const noexcept { return acceptor_.get(); }

 private:
  core::Task<void> accept_loop() {
    namespace asio = boost::asio;
    auto log = core::logger(logger_);
    while (!stopped_) {
      auto [ec, socket] = co_await acceptor_->async_accept(asio::as_tuple(asio::use_awaitable));
      if (stopped_) {
        // An accept that completed just before stop(): that client would
        // keep the server busy after the drain.
        boost::system::error_code ignored;
        socket.close(ignored);
        co_return;
      }
      if (ec) {
        if (ec == asio::error::operation_aborted) co_return;
        log->warn("{}: accept failed: {}", what_, ec.message());
        asio::steady_timer pause(ctx_, std::chrono::milliseconds(100));
        co_await pause.async_wait(asio::use_awaitable);
        continue;
      }
      if (admit_ && !admit_(socket)) {
        boost::system::error_code ignored;
        socket.close(ignored);
        continue;
      }
      auto client = std::make_shared<Socket>(std::move(socket));
      // Forget clients that have gone, so the list stays as long as the live ones.
      clients_.remove_if([](const std::weak_ptr<Socket>& w) { return w.expired(); });
      clients_.push_back(client);
      asio::co_spawn(ctx_, serve_(client), asio::detached);
    }
  }

  boost::asio::io_context& ctx_;
  const std::string logger_, what_;
  std::unique_ptr<Acceptor> acceptor_;
  Serve serve_;
  Admit admit_;
  std::list<std::weak_ptr<Socket>> clients_;
  bool stopped_ = false;
};

}  // namespace blockway::gateway
