// The fixed-newstyle NBD handshake, as an explicit state machine over a
// Channel: greeting, client flags, then one option at a time until the client
// picks an export (EXPORT_NAME or GO), aborts, or breaks the protocol.
//
// Thread model: runs as one coroutine on the connection's io_context; reads
// the ExportTable through its own lock.
#pragma once

#include "core/export.hpp"
#include "core/logging.hpp"
#include "nbd/channel.hpp"
#include "nbd/tls_context.hpp"

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace blockway::nbd {

// The metadata contexts this server offers (NBD_OPT_*_META_CONTEXT).
enum class MetaContextKind : uint8_t {
  base_allocation,  // base:allocation (holes and zeroes)
  cache,            // blockway:cache (flag 1: present locally, 2: dirty), on cached exports
};

struct MetaContext {
  uint32_t id = 0;
  MetaContextKind kind = MetaContextKind::base_allocation;
  std::string name;
};

struct HandshakeOptions {
  uint32_t max_request_bytes = 32u << 20;
  // STARTTLS: offered when `tls` is set and the mode is not off.
  const TlsContext* tls = nullptr;
  TlsMode tls_mode = TlsMode::off;
  // Set while the server shuts down: options get NBD_REP_ERR_SHUTDOWN.
  const std::atomic<bool>* shutting_down = nullptr;
};

// Who is on the other end of a connection, for the log and access rules.
struct PeerInfo {
  std::string text;     // "127.0.0.1:40000", "[::1]:40000", "unix uid 1000", "stdio"
  std::string address;  // the IP address alone (empty on a Unix socket)
  bool unix_socket = false;
  std::optional<uid_t> uid;  // Unix socket: SO_PEERCRED
  std::optional<gid_t> gid;
  std::vector<gid_t> groups;  // Unix socket: SO_PEERGROUPS (supplementary groups)
  std::string listener;  // the name of the listener it came in on, if it has one
};

struct Negotiated {
  std::shared_ptr<core::Export> exp;
  bool structured_replies = false;
  bool no_zeroes = false;
  std::vector<MetaContext> contexts;  // selected for exp
  uint16_t transmission_flags = 0;
  bool tls = false;
  std::string tls_peer_name;  // PSK identity or verified certificate CN
  bool tls_psk = false;       // tls_peer_name is a PSK identity
  std::vector<std::string> tls_cert_names;  // verified certificate: CN, then SANs
};

// The transmission flags an export advertises.
uint16_t transmission_flags(const core::Capabilities& caps, bool structured_replies) noexcept;

// Runs the handshake. Returns the negotiated export, or nullopt when the
// client aborted, disconnected, or violated the protocol (the caller closes).
core::Task<std::optional<Negotiated>> negotiate(Channel& channel, const core::ExportTable& exports,
                                                   const HandshakeOptions& options, const PeerInfo& peer);

}  // namespace blockway::nbd
