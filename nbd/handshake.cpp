#include "nbd/handshake.hpp"

#include "core/logging.hpp"
#include "nbd/protocol.hpp"

#include <algorithm>
#include <array>
#include <string_view>

namespace blockway::nbd {
namespace {

using core::Task;

// Option payloads above this are discarded unread (NBD_REP_ERR_TOO_BIG):
// the largest legitimate one is a meta-context query list.
constexpr uint32_t kMaxOptionLength = 64u << 10;
// A client that keeps sending options without choosing an export is cut off.
constexpr unsigned kMaxOptions = 4096;

// The contexts an export offers: every export has base:allocation; cached
// exports also describe their cache.
std::vector<MetaContext> offered_contexts(const core::Export& exp) {
  std::vector<MetaContext> all{{1, MetaContextKind::base_allocation, "base:allocation"}};
  if (exp.cache_status) all.push_back({2, MetaContextKind::cache, "blockway:cache"});
  return all;
}

// Contexts matched by one query: exact name, or "namespace:" for all of it.
std::vector<MetaContext> match_query(const core::Export& exp, std::string_view query, bool allow_wildcard) {
  std::vector<MetaContext> out;
  for (const auto& c : offered_contexts(exp)) {
    const bool exact = query == c.name;
    const bool wildcard = allow_wildcard && query.ends_with(':') && std::string_view(c.name).starts_with(query);
    if (exact || wildcard) out.push_back(c);
  }
  return out;
}

class Handshake {
 public:
  Handshake(Channel& ch, const core::ExportTable& exports, const HandshakeOptions& opts, const PeerInfo& peer)
      : ch_(ch), exports_(exports), opts_(opts), peer_(peer), log_(core::logger("nbd")) {}

  Task<std::optional<Negotiated>> run();

 private:
  // Sends one option reply; false if the client is gone.
  Task<bool> reply(uint32_t option, uint32_t type, std::span<const std::byte> data = {});
  Task<bool> reply_error(uint32_t option, uint32_t type, std::string_view message) {
    return reply(option, type, std::as_bytes(std::span(message.data(), message.size())));
  }
  // Reads or discards the option payload; false if the client is gone.
  Task<bool> read_payload(uint32_t length);
  Task<bool> send_info(uint32_t option, const core::Export& exp, bool want_name, bool want_description);
  Task<bool> handle_info(uint32_t option, std::optional<Negotiated>& result);
  Task<bool> handle_meta_context(uint32_t option);
  Task<bool> handle_starttls(uint32_t option, uint32_t length, bool& fatal);
  // The export may not be used before TLS (--tls=require, or its tls=require).
  // allow= and listen=: may this client see the export (LIST)? admit() also
  // logs and counts a refusal.
  [[nodiscard]] bool visible(const core::Export& exp) const {
    const auto policy = exp.access.load();
    if (!policy) return true;
    core::AccessClient c{.address = peer_.address, .uid = peer_.uid, .gid = peer_.gid, .groups = peer_.groups,
                         .listener = peer_.listener};
    if (state_.tls_psk)
      c.psk_name = state_.tls_peer_name;
    else
      c.cert_names = state_.tls_cert_names;
    return policy->allows(c);
  }
  bool admit(core::Export& exp) {
    if (visible(exp)) return true;
    // Counted and logged once per connection and export: a client asks
    // about one export with several options (meta contexts, then GO).
    if (std::find(denied_.begin(), denied_.end(), exp.name) != denied_.end()) return false;
    if (denied_.size() < 16) denied_.push_back(exp.name);
    exp.denied.fetch_add(1, std::memory_order_relaxed);
    log_->warn("access to export '{}' denied to {}{}", exp.name, peer_.text,
               state_.tls_peer_name.empty() ? "" : " (TLS " + std::string(state_.tls_psk ? "PSK" : "certificate") +
                                                       " '" + state_.tls_peer_name + "')");
    return false;
  }
  [[nodiscard]] bool needs_tls(const core::Export& exp) const {
    return !state_.tls && (opts_.tls_mode == TlsMode::require || exp.tls_required);
  }
  [[nodiscard]] bool shutting_down() const {
    return opts_.shutting_down && opts_.shutting_down->load(std::memory_order_relaxed);
  }

  Channel& ch_;
  const core::ExportTable& exports_;
  const HandshakeOptions& opts_;
  const PeerInfo& peer_;
  std::shared_ptr<spdlog::logger> log_;
  std::vector<std::byte> payload_;
  bool fixed_ = false;
  Negotiated state_;
  std::string contexts_for_;  // the export the selected contexts belong to
  std::vector<std::string> denied_;  // exports this client was refused (counted once)
};

Task<bool> Handshake::reply(uint32_t option, uint32_t type, std::span<const std::byte> data) {
  std::array<std::byte, 20> head;
  put64(head.data(), kOptReplyMagic);
  put32(head.data() + 8, option);
  put32(head.data() + 12, type);
  put32(head.data() + 16, static_cast<uint32_t>(data.size()));
  std::array<boost::asio::const_buffer, 2> bufs{boost::asio::buffer(head),
                                                 boost::asio::buffer(data.data(), data.size())};
  co_return !co_await ch_.write_all(bufs);
}

Task<bool> Handshake::read_payload(uint32_t length) {
  if (length <= kMaxOptionLength) {
    payload_.resize(length);
    co_return !co_await ch_.read_exact(payload_);
  }
  // Too big to keep: drain it through a small buffer so memory stays bounded.
  payload_.clear();
  std::array<std::byte, 4096> scratch;
  while (length > 0) {
    const uint32_t n = std::min<uint32_t>(length, scratch.size());
    if (co_await ch_.read_exact(std::span(scratch).first(n))) co_return false;
    length -= n;
  }
  co_return true;
}

Task<bool> Handshake::send_info(uint32_t option, const core::Export& exp, bool want_name,
                                bool want_description) {
  const auto geo = exp.device->geometry();
  const auto caps = exp.device->capabilities();
  std::array<std::byte, 12> info;
  put16(info.data(), kInfoExport);
  put64(info.data() + 2, geo.size);
  put16(info.data() + 10, transmission_flags(caps, state_.structured_replies));
  if (!co_await reply(option, kRepInfo, info)) co_return false;

  const auto send_string = [&](uint16_t type, const std::string& s) -> Task<bool> {
    std::vector<std::byte> data(2 + s.size());
    put16(data.data(), type);
    std::memcpy(data.data() + 2, s.data(), s.size());
    co_return co_await reply(option, kRepInfo, data);
  };
  if (want_name && !co_await send_string(kInfoName, exp.name)) co_return false;
  if (want_description && !exp.description.empty() &&
      !co_await send_string(kInfoDescription, exp.description))
    co_return false;

  // Block sizes are always sent: clients that did not ask may ignore them.
  const uint32_t min = geo.min_block;
  const uint32_t preferred = std::max(geo.preferred_block, min);
  const uint32_t max = opts_.max_request_bytes / min * min;
  std::array<std::byte, 14> bs;
  put16(bs.data(), kInfoBlockSize);
  put32(bs.data() + 2, min);
  put32(bs.data() + 6, preferred);
  put32(bs.data() + 10, max);
  co_return co_await reply(option, kRepInfo, bs);
}

Task<bool> Handshake::handle_info(uint32_t option, std::optional<Negotiated>& result) {
  const auto& p = payload_;
  if (p.size() < 6) co_return co_await reply_error(option, kRepErrInvalid, "option too short");
  const uint32_t name_len = get32(p.data());
  if (name_len > kMaxString || p.size() < 6ull + name_len)
    co_return co_await reply_error(option, kRepErrInvalid, "bad export name length");
  const std::string name(reinterpret_cast<const char*>(p.data() + 4), name_len);
  const uint16_t nreq = get16(p.data() + 4 + name_len);
  if (p.size() != 6ull + name_len + 2ull * nreq)
    co_return co_await reply_error(option, kRepErrInvalid, "option length does not match its requests");
  bool want_name = false, want_description = false;
  for (uint16_t i = 0; i < nreq; ++i) {
    const uint16_t type = get16(p.data() + 6 + name_len + 2 * i);
    want_name |= type == kInfoName;
    want_description |= type == kInfoDescription;
  }
  auto exp = exports_.find(name);
  // A refused client hears what it would for a name that does not exist:
  // the export's existence is not for it to learn.
  if (!exp || !admit(*exp)) co_return co_await reply_error(option, kRepErrUnknown, "no export named '" + name + "'");
  if (needs_tls(*exp)) co_return co_await reply_error(option, kRepErrTlsReqd, "export requires TLS: use STARTTLS");
  if (exp->follow_size) exp->follow_size();  // a grown file: this client sees its new size
  if (!co_await send_info(option, *exp, want_name, want_description)) co_return false;
  if (!co_await reply(option, kRepAck)) co_return false;
  if (option == kOptGo) {
    if (contexts_for_ != exp->name) state_.contexts.clear();  // selected for another export
    state_.exp = exp;
    state_.transmission_flags = transmission_flags(exp->device->capabilities(), state_.structured_replies);
    result = state_;
  }
  co_return true;
}

Task<bool> Handshake::handle_meta_context(uint32_t option) {
  if (!state_.structured_replies)
    co_return co_await reply_error(option, kRepErrInvalid, "negotiate structured replies first");
  const auto& p = payload_;
  if (p.size() < 8) co_return co_await reply_error(option, kRepErrInvalid, "option too short");
  const uint32_t name_len = get32(p.data());
  if (name_len > kMaxString || p.size() < 8ull + name_len)
    co_return co_await reply_error(option, kRepErrInvalid, "bad export name length");
  const std::string name(reinterpret_cast<const char*>(p.data() + 4), name_len);
  const uint32_t nqueries = get32(p.data() + 4 + name_len);
  std::vector<std::string_view> queries;
  size_t pos = 8 + name_len;
  for (uint32_t i = 0; i < nqueries; ++i) {
    if (p.size() - pos < 4) co_return co_await reply_error(option, kRepErrInvalid, "truncated query");
    const uint32_t len = get32(p.data() + pos);
    pos += 4;
    if (len > kMaxString || p.size() - pos < len)
      co_return co_await reply_error(option, kRepErrInvalid, "bad query length");
    queries.emplace_back(reinterpret_cast<const char*>(p.data() + pos), len);
    pos += len;
  }
  if (pos != p.size()) co_return co_await reply_error(option, kRepErrInvalid, "trailing bytes after queries");
  auto exp = exports_.find(name);
  if (!exp || !admit(*exp)) co_return co_await reply_error(option, kRepErrUnknown, "no export named '" + name + "'");
  if (needs_tls(*exp)) co_return co_await reply_error(option, kRepErrTlsReqd, "export requires TLS: use STARTTLS");

  const bool list = option == kOptListMetaContext;
  std::vector<MetaContext> found;
  if (queries.empty() && list) found = offered_contexts(*exp);
  for (auto q : queries) {
    if (q.find(':') == std::string_view::npos)
      co_return co_await reply_error(option, kRepErrInvalid, "a query must start with a namespace");
    for (auto& c : match_query(*exp, q, list))
      if (std::none_of(found.begin(), found.end(), [&](auto& f) { return f.id == c.id; })) found.push_back(c);
  }
  for (const auto& c : found) {
    std::vector<std::byte> data(4 + c.name.size());
    put32(data.data(), list ? 0 : c.id);
    std::memcpy(data.data() + 4, c.name.data(), c.name.size());
    if (!co_await reply(option, kRepMetaContext, data)) co_return false;
  }
  if (!list) {
    state_.contexts = found;
    contexts_for_ = exp->name;
  }
  co_return co_await reply(option, kRepAck);
}

Task<bool> Handshake::handle_starttls(uint32_t option, uint32_t length, bool& fatal) {
  if (!opts_.tls || opts_.tls_mode == TlsMode::off)
    co_return co_await reply_error(option, kRepErrUnsup, "TLS is not enabled on this server");
  if (state_.tls) co_return co_await reply_error(option, kRepErrInvalid, "TLS is already on");
  if (length != 0) co_return co_await reply_error(option, kRepErrInvalid, "NBD_OPT_STARTTLS takes no data");
  if (!co_await reply(option, kRepAck)) co_return false;
  if (auto ec = co_await ch_.start_tls(*opts_.tls)) {
    log_->warn("TLS handshake with {} failed: {}", peer_.text, ec.message());
    fatal = true;
    co_return false;
  }
  // Nothing negotiated in plaintext survives into TLS (the spec's rule):
  // the client starts over on the protected stream.
  const bool no_zeroes = state_.no_zeroes;
  state_ = Negotiated{};
  state_.no_zeroes = no_zeroes;
  state_.tls = true;
  state_.tls_peer_name = ch_.tls()->peer_name();
  state_.tls_psk = ch_.tls()->peer_is_psk();
  if (!state_.tls_psk) state_.tls_cert_names = ch_.tls()->peer_names();
  contexts_for_.clear();
  log_->info("TLS with {}: {}{}", peer_.text, ch_.tls()->description(),
             state_.tls_peer_name.empty() ? "" : ", client '" + state_.tls_peer_name + "'");
  co_return true;
}

Task<std::optional<Negotiated>> Handshake::run() {
  std::array<std::byte, 18> greeting;
  put64(greeting.data(), kNbdMagic);
  put64(greeting.data() + 8, kIHaveOpt);
  put16(greeting.data() + 16, kFlagFixedNewstyle | kFlagNoZeroes);
  if (co_await ch_.write_all(boost::asio::buffer(greeting))) co_return std::nullopt;

  std::array<std::byte, 4> cflags_raw;
  if (co_await ch_.read_exact(cflags_raw)) co_return std::nullopt;
  const uint32_t cflags = get32(cflags_raw.data());
  if (cflags & ~(kClientFixedNewstyle | kClientNoZeroes)) {
    log_->debug("handshake: unknown client flags {:#x}, closing", cflags);
    co_return std::nullopt;
  }
  fixed_ = cflags & kClientFixedNewstyle;
  state_.no_zeroes = cflags & kClientNoZeroes;

  for (unsigned count = 0; count < kMaxOptions; ++count) {
    std::array<std::byte, 16> head;
    if (co_await ch_.read_exact(head)) co_return std::nullopt;
    if (get64(head.data()) != kIHaveOpt) {
      log_->debug("handshake: bad option magic, closing");
      co_return std::nullopt;
    }
    const uint32_t option = get32(head.data() + 8);
    const uint32_t length = get32(head.data() + 12);
    if (!co_await read_payload(length)) co_return std::nullopt;
    const bool too_big = length > kMaxOptionLength;
    log_->trace("handshake: option {} length {}", option, length);

    if (option == kOptExportName) {
      if (too_big || length > kMaxString) co_return std::nullopt;
      const std::string name(reinterpret_cast<const char*>(payload_.data()), payload_.size());
      auto exp = exports_.find(name);
      if (!exp || shutting_down() || !admit(*exp)) co_return std::nullopt;  // this option cannot carry an error
      if (needs_tls(*exp)) {
        log_->info("client {} asked for export '{}' without TLS, which it requires: closing", peer_.text, name);
        co_return std::nullopt;
      }
      if (contexts_for_ != exp->name) state_.contexts.clear();
      state_.exp = exp;
      state_.transmission_flags = transmission_flags(exp->device->capabilities(), state_.structured_replies);
      if (exp->follow_size) exp->follow_size();
      std::array<std::byte, 10 + 124> reply{};
      put64(reply.data(), exp->device->geometry().size);
      put16(reply.data() + 8, state_.transmission_flags);
      const size_t n = state_.no_zeroes ? 10 : reply.size();
      if (co_await ch_.write_all(boost::asio::buffer(reply.data(), n))) co_return std::nullopt;
      co_return state_;
    }
    if (!fixed_) co_return std::nullopt;  // plain newstyle knows no other option
    if (option == kOptAbort) {
      co_await reply(option, kRepAck);
      co_return std::nullopt;
    }
    bool ok = true;
    std::optional<Negotiated> result;
    if (!state_.tls && opts_.tls_mode == TlsMode::require && option != kOptStartTls && !too_big) {
      ok = co_await reply_error(option, kRepErrTlsReqd, "server requires TLS: use STARTTLS");
    } else if (too_big) {
      ok = co_await reply_error(option, kRepErrTooBig, "option data too large");
    } else if (shutting_down()) {
      ok = co_await reply_error(option, kRepErrShutdown, "server is shutting down");
    } else {
      switch (option) {
        case kOptList:
          if (length != 0) {
            ok = co_await reply_error(option, kRepErrInvalid, "NBD_OPT_LIST takes no data");
            break;
          }
          for (const auto& exp : exports_.list()) {
            if (needs_tls(*exp) || !visible(*exp)) continue;  // not for this client (now)
            std::vector<std::byte> data(4 + exp->name.size() + exp->description.size());
            put32(data.data(), static_cast<uint32_t>(exp->name.size()));
            std::memcpy(data.data() + 4, exp->name.data(), exp->name.size());
            std::memcpy(data.data() + 4 + exp->name.size(), exp->description.data(), exp->description.size());
            if (!(ok = co_await reply(option, kRepServer, data))) break;
          }
          if (ok) ok = co_await reply(option, kRepAck);
          break;
        case kOptStartTls: {
          bool fatal = false;
          ok = co_await handle_starttls(option, length, fatal);
          if (fatal) co_return std::nullopt;
          break;
        }
        case kOptInfo:
        case kOptGo:
          ok = co_await handle_info(option, result);
          break;
        case kOptStructuredReply:
          if (length != 0) {
            ok = co_await reply_error(option, kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
            break;
          }
          state_.structured_replies = true;
          ok = co_await reply(option, kRepAck);
          break;
        case kOptListMetaContext:
        case kOptSetMetaContext:
          ok = co_await handle_meta_context(option);
          break;
        default:
          ok = co_await reply_error(option, kRepErrUnsup, "unsupported option");
          break;
      }
    }
    if (!ok) co_return std::nullopt;
    if (result) co_return result;
  }
  log_->debug("handshake: too many options, closing");
  co_return std::nullopt;
}

}  // namespace

uint16_t transmission_flags(const core::Capabilities& caps, bool structured_replies) noexcept {
  using core::Support;
  uint16_t f = kFlagHasFlags | kFlagSendCache;
  if (caps.read_only) f |= kFlagReadOnly;
  if (caps.flush != Support::none) f |= kFlagSendFlush;
  if (caps.fua != Support::none) f |= kFlagSendFua;
  if (!caps.read_only && caps.trim != Support::none) f |= kFlagSendTrim;
  if (!caps.read_only && caps.zero != Support::none) f |= kFlagSendWriteZeroes | kFlagSendFastZero;
  if (structured_replies) f |= kFlagSendDf;
  if (caps.multi_conn) f |= kFlagCanMultiConn;
  return f;
}

Task<std::optional<Negotiated>> negotiate(Channel& channel, const core::ExportTable& exports,
                                          const HandshakeOptions& options, const PeerInfo& peer) {
  Handshake h(channel, exports, options, peer);
  co_return co_await h.run();
}

}  // namespace blockway::nbd
