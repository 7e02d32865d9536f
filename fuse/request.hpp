// How a FUSE request is served: the errno a reply carries, the loop a
// request's coroutine runs on, and the guard that keeps exceptions out of
// libfuse's C frames.
//
// Thread model: the low-level handlers run on the reader loop that read the
// request (Reader::current); spawn() starts a coroutine there or on another
// loop, and the coroutine replies from whichever thread it completes on
// (fuse_reply_* writes one message to /dev/fuse and is safe from any
// thread). Every request in flight is counted on its Mount until it replied.
#pragma once

#include "core/task.hpp"
#include "fuse/libfuse.hpp"

#include <cstddef>
#include <system_error>

namespace blockway::fuse {

class Mount;

// errno for a FUSE reply from a device error: the values a file's user can act
// on pass through; anything else (timeouts, lost connections) is EIO.
int fuse_errno(std::error_code ec) noexcept;

// The mount a request belongs to (the session's userdata).
Mount& mount_of(fuse_req_t req) noexcept;

// Starts `task`, which replies to req as its last step, and counts it in
// flight until it completes. bytes: the request's payload (large ones are
// served on another loop); write: it is a write (placed differently, see
// the .cpp). If it escapes with an exception it has not replied yet: it gets
// ENOMEM or EIO.
void spawn(fuse_req_t req, core::Task<void> task, size_t bytes = 0, bool write = false);

// errno for an exception that reached the edge of a request: ENOMEM for an
// allocation that failed, EIO for anything else. Call only inside a catch.
int errno_of_current_exception() noexcept;
// Logs the exception being handled. Call only inside a catch.
void log_exception(fuse_req_t req, const char* where) noexcept;

// Runs an op with no exception escaping into libfuse's C frames (undefined
// behaviour). Every op replies as its last step and nothing after a reply
// throws, so an exception means no reply was sent: it gets ENOMEM or EIO.
// A try block costs nothing until something throws.
template <auto Op>
struct Guarded;
template <class... Args, void (*Op)(fuse_req_t, Args...)>
struct Guarded<Op> {
  static void call(fuse_req_t req, Args... args) noexcept {
    try {
      Op(req, args...);
    } catch (...) {
      log_exception(req, "an operation");
      fuse_reply_err(req, errno_of_current_exception());
    }
  }
};

}  // namespace blockway::fuse
