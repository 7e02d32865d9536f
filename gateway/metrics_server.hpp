// MetricsServer: GET /metrics over HTTP/1.1 (Boost.Beast), for Prometheus.
//
// One TCP listener (loopback unless configured otherwise). Requests are
// bounded (8 KiB of headers, no body), connections keep alive and idle ones
// are closed after 60 s. GET and HEAD of /metrics (a query string is
// ignored) answer 200 with the text exposition; any other path is 404, any
// other method 405 (with Allow), and a request that does not parse 400,
// after which that connection closes; the server keeps serving.
//
// Access rules: every accepted connection passes admit() before its first
// request is read; today it admits everyone who can reach the address (the
// security issue's allow-list goes there).
//
// Thread model: the acceptor and every connection run on one event loop
// (the daemon's loop 0); render() of the collector runs there too (it never
// blocks). stop() may be called from any thread: it posts to that loop.
#pragma once

#include "core/listen_address.hpp"
#include "core/task.hpp"
#include "gateway/client_acceptor.hpp"
#include "gateway/metrics.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <memory>
#include <string>

namespace blockway::gateway {

class MetricsServer {
 public:
  MetricsServer(boost::asio::io_context& ctx, const MetricsCollector& collector);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Binds and starts accepting; returns the bound address ("127.0.0.1:9110").
  // Throws std::runtime_error naming the address.
  std::string listen(const core::ListenAddress& address);
  // Stops accepting and closes every connection.
  void stop();
  [[nodiscard]] uint16_t port() const noexcept { return port_; }

 private:
  using Socket = boost::asio::ip::tcp::socket;
  core::Task<void> serve(std::shared_ptr<Socket> socket);
  // The access check (security issue 14 adds its rules here).
  [[nodiscard]] bool admit(const boost::asio::ip::tcp::endpoint& peer) const;

  boost::asio::io_context& ctx_;
  const MetricsCollector& collector_;
  ClientAcceptor<boost::asio::ip::tcp> acceptor_;
  uint16_t port_ = 0;
};

}  // namespace blockway::gateway
