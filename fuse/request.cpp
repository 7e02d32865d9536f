#include "fuse/request.hpp"

#include "fuse/mount.hpp"
#include "fuse/reader.hpp"

#include <boost/asio/co_spawn.hpp>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <exception>
#include <new>

namespace blockway::fuse {

namespace {

// Reads and writes at least this large are served on the next loop.
constexpr size_t kSpreadBytes = 128 * 1024;

void log_current(Mount& mount, const char* where) noexcept {
  try {
    try {
      throw;
    } catch (const std::exception& e) {
      mount.log().error("a FUSE request failed in {}: {}", where, e.what());
    } catch (...) {
      mount.log().error("a FUSE request failed in {} with an exception", where);
    }
  } catch (...) {  // logging needs memory too
  }
}

}  // namespace

int fuse_errno(std::error_code ec) noexcept {
  if (!ec) return 0;
  switch (ec.value()) {
    case EIO:
    case ENOSPC:
    case EROFS:
    case EINVAL:
    case EFBIG:
    case ENOMEM:
    case EOPNOTSUPP:
    case EDQUOT:
    case EPERM:
    case EACCES:
      return ec.value();
    default:
      return EIO;  // timeouts, lost connections, protocol errors: the file's user sees an I/O error
  }
}

Mount& mount_of(fuse_req_t req) noexcept { return *static_cast<Mount*>(fuse_req_userdata(req)); }

int errno_of_current_exception() noexcept {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return ENOMEM;
  } catch (...) {
    return EIO;
  }
}

void log_exception(fuse_req_t req, const char* where) noexcept { log_current(mount_of(req), where); }

// Large transfers go to the next loop round-robin, so their copies run on
// other cores while the reader takes the next request; small ones stay on
// the reader's loop, where a hop would cost more than the work.
//
// Large writes (`write`) are placed differently: the reader has already paid
// one copy of their payload (the kernel's, into the receive buffer), about
// half of what writing it into the image costs. Round-robin left the
// reader's core with 1.5 copies per byte against 0.5 on the other (2 loops)
// and capped sequential writes; keeping every write off the reader's loop
// capped them on the other core instead. So the reader serves one large write
// in 2L (a quarter with 2 loops: both cores then copy about as much).
void spawn(fuse_req_t req, core::Task<void> task, size_t bytes, bool write) {
  auto& mount = mount_of(req);
  mount.begin_request();
  auto* reader = Reader::current;
  auto& loops = mount.loops();
  const size_t count = loops.size();
  boost::asio::any_io_executor ex;
  if (reader && (bytes < kSpreadBytes || (write && (count == 1 || reader->take_write_turn(2 * count))))) {
    ex = reader->executor();
  } else {
    auto* ctx = &loops.next();
    if (write && reader && ctx == &reader->context()) ctx = &loops.next();
    ex = ctx->get_executor();
  }
  try {
    boost::asio::co_spawn(ex, std::move(task), [self = mount.shared_from_this(), req](std::exception_ptr e) {
      if (e) {
        try {
          std::rethrow_exception(e);
        } catch (...) {
          log_current(*self, "a coroutine");
          fuse_reply_err(req, errno_of_current_exception());
        }
      }
      self->end_request();
    });
  } catch (...) {
    // Not started (no memory for the handler): answer, then let go of it.
    fuse_reply_err(req, errno_of_current_exception());
    mount.end_request();
  }
}

}  // namespace blockway::fuse
