// RemoteDevice: a backend that reaches its image over a network session,
// which can be lost and re-established.
//
// Contract for implementations:
// - A lost or hung session makes the affected requests fail with a
//   connection error (is_connection_error() below); a request that gets no
//   answer within the backend's I/O timeout counts as hung: the backend
//   drops the session (failing every request in flight with ETIMEDOUT)
//   rather than wait forever.
// - reconnect() re-establishes the session; it is called by RetryLayer,
//   never concurrently with itself, while other requests may be running
//   (they fail fast with ENOTCONN until the session is back).
// - generation() increases every time a new session is established, so a
//   layer above can tell whether acknowledged-but-unflushed writes went to
//   a session that no longer exists.
//
// Thread model: as BlockDevice: any method may be called from any event-loop
// thread at any time.
#pragma once

#include "core/block_device.hpp"

#include <cerrno>
#include <functional>
#include <string>

namespace blockway::core {

class RemoteDevice : public BlockDevice {
 public:
  // What a backend does not offer (its capabilities say none, so CheckedDevice
  // emulates or skips it) needs no stub: trim, zero and block status fail
  // with EOPNOTSUPP; prefetch, being advisory, does nothing and succeeds.
  Task<std::error_code> trim(ByteRange, IoFlags) override { co_return errno_code(EOPNOTSUPP); }
  Task<std::error_code> zero(ByteRange, IoFlags) override { co_return errno_code(EOPNOTSUPP); }
  Task<std::error_code> block_status(ByteRange, ExtentList&) override { co_return errno_code(EOPNOTSUPP); }
  Task<std::error_code> prefetch(ByteRange) override { co_return std::error_code{}; }

  virtual Task<std::error_code> reconnect() = 0;
  // What the remote itself says of its health, for `blockway status` (a
  // Ceph cluster's "HEALTH_OK"); empty when it says nothing. Never blocks.
  [[nodiscard]] virtual std::string health_detail() const { return {}; }
  // The image's size changed under the export (a backend that watches its
  // image, e.g. rbd, saw it). The handler grows the layers above and returns
  // an empty string, or says why the export cannot take the new size (then
  // the backend keeps the old one). Set once, before requests; called on a
  // backend thread. Backends that never see a resize ignore it.
  using ResizeHandler = std::function<std::string(uint64_t old_size, uint64_t new_size)>;
  virtual void set_resize_handler(ResizeHandler) {}
  [[nodiscard]] virtual bool connected() const noexcept = 0;
  [[nodiscard]] virtual uint64_t generation() const noexcept = 0;
};

// Errors that mean "the session is gone or stuck", after which a retry on a
// new session may succeed.
[[nodiscard]] inline bool is_connection_error(std::error_code ec) noexcept {
  if (ec.category() != std::system_category() && ec.category() != std::generic_category()) return false;
  switch (ec.value()) {
    case ENOTCONN:
    case ECONNRESET:
    case ECONNREFUSED:
    case ECONNABORTED:
    case EPIPE:
    case ESHUTDOWN:
    case ETIMEDOUT:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENETDOWN:
    case EHOSTDOWN:
      return true;
    default:
      return false;
  }
}

// What a FLUSH returns when it succeeded on a new session, but writes the
// remote acknowledged on a session that died before a flush covered them may
// be lost there. Its value is EIO, so every front end reports it as an I/O
// error; its own category lets a layer that still holds those bytes (the
// cache) tell it from a plain EIO, write them again and flush once more.
const std::error_category& writes_lost_category() noexcept;
[[nodiscard]] inline std::error_code writes_lost_error() noexcept { return {EIO, writes_lost_category()}; }

}  // namespace blockway::core
