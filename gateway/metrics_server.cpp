#include "gateway/metrics_server.hpp"

#include "core/logging.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>


namespace blockway::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using asio::ip::tcp;
using core::ListenAddress;
using core::Task;

namespace {

constexpr size_t kMaxHeaderBytes = 8 * 1024;
constexpr auto kIdleTimeout = std::chrono::seconds(60);
constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace

MetricsServer::MetricsServer(asio::io_context& ctx, const MetricsCollector& collector)
    : ctx_(ctx), collector_(collector), acceptor_(ctx, "metrics", "metrics") {}

MetricsServer::~MetricsServer() = default;

std::string MetricsServer::listen(const ListenAddress& address) {
  const std::string where = "metrics " + address.to_string();
  boost::system::error_code ec;
  tcp::resolver resolver(ctx_);
  auto results = resolver.resolve(address.host.empty() ? "0.0.0.0" : address.host, std::to_string(address.port),
                                  tcp::resolver::passive | tcp::resolver::numeric_service, ec);
  if (ec || results.empty()) throw std::runtime_error(where + ": " + (ec ? ec.message() : "no such address"));
  const tcp::endpoint ep = results.begin()->endpoint();
  auto acceptor = std::make_unique<tcp::acceptor>(ctx_);
  acceptor->open(ep.protocol(), ec);
  if (!ec) acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor->bind(ep, ec);
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) throw std::runtime_error(where + ": " + ec.message() + core::privileged_port_hint(address.port, ec.value()));
  const auto bound = acceptor->local_endpoint();
  port_ = bound.port();
  acceptor_.start(
      std::move(acceptor), [this](std::shared_ptr<Socket> socket) { return serve(std::move(socket)); },
      [this](Socket& socket) {
        boost::system::error_code ec;
        const auto peer = socket.remote_endpoint(ec);
        return !ec && admit(peer);
      });
  const std::string host = bound.address().to_string();
  return (bound.address().is_v6() ? "[" + host + "]" : host) + ":" + std::to_string(port_);
}

void MetricsServer::stop() { acceptor_.stop(); }

bool MetricsServer::admit(const tcp::endpoint&) const { return true; }

Task<void> MetricsServer::serve(std::shared_ptr<Socket> socket) {
  auto log = core::logger("metrics");
  beast::flat_buffer buffer(kMaxHeaderBytes);
  // Closing the socket on timeout: a client that keeps a connection open
  // without asking anything holds no more than a descriptor for a minute.
  asio::steady_timer idle(ctx_);
  while (!acceptor_.stopped()) {
    http::request_parser<http::empty_body> parser;
    parser.header_limit(kMaxHeaderBytes);
    parser.body_limit(0);
    idle.expires_after(kIdleTimeout);
    idle.async_wait([weak = std::weak_ptr<Socket>(socket)](const boost::system::error_code& ec) {
      if (ec) return;
      if (auto s = weak.lock()) {
        boost::system::error_code ignored;
        s->close(ignored);
      }
    });
    auto [ec, n] = co_await http::async_read(*socket, buffer, parser, asio::as_tuple(asio::use_awaitable));
    (void)n;
    idle.cancel();
    http::response<http::string_body> res;
    bool keep_alive = false;
    if (ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::operation_aborted ||
        ec == asio::error::connection_reset || ec == asio::error::bad_descriptor)
      break;
    if (ec) {
      // Malformed, too large or with a body: say so once and hang up, since
      // the rest of the stream cannot be trusted to start a request.
      res.version(11);
      res.result(ec == http::error::header_limit || ec == http::error::body_limit
                     ? http::status::request_header_fields_too_large
                     : http::status::bad_request);
      if (ec == http::error::body_limit) res.result(http::status::payload_too_large);
      res.set(http::field::content_type, "text/plain; charset=utf-8");
      res.body() = std::string("bad request: ") + ec.message() + "\n";
      log->debug("metrics: bad request: {}", ec.message());
    } else {
      const auto& req = parser.get();
      res.version(req.version());
      keep_alive = req.keep_alive();
      std::string_view target(req.target().data(), req.target().size());
      target = target.substr(0, target.find('?'));
      res.set(http::field::content_type, "text/plain; charset=utf-8");
      if (target != "/metrics") {
        res.result(http::status::not_found);
        res.body() = "not found: this server has only /metrics\n";
      } else if (req.method() != http::verb::get && req.method() != http::verb::head) {
        res.result(http::status::method_not_allowed);
        res.set(http::field::allow, "GET, HEAD");
        res.body() = "method not allowed: use GET\n";
      } else {
        res.result(http::status::ok);
        res.set(http::field::content_type, kContentType);
        res.body() = collector_.render();
        if (req.method() == http::verb::head) {
          res.content_length(res.body().size());
          res.body().clear();
          res.keep_alive(keep_alive);
          auto [wec, wn] = co_await http::async_write(*socket, res, asio::as_tuple(asio::use_awaitable));
          (void)wn;
          if (wec || !keep_alive) break;
          continue;
        }
      }
    }
    res.keep_alive(keep_alive);
    res.prepare_payload();
    auto [wec, wn] = co_await http::async_write(*socket, res, asio::as_tuple(asio::use_awaitable));
    (void)wn;
    if (wec || !keep_alive) break;
  }
  boost::system::error_code ignored;
  socket->shutdown(tcp::socket::shutdown_both, ignored);
  socket->close(ignored);
}

}  // namespace blockway::gateway
