// Completion: a type-erased, move-only completion handler, for backends that
// park an awaiting coroutine's handler while a C library (libnbd, libiscsi,
// libnfs) or the AoE tag table works on its request. Boost 1.81's
// any_completion_handler recurses forever when moved, so it is not used.
//
// Thread model: none of its own; the owner calls complete() once, on the
// thread where the handler may run (backends post it to its executor).
#pragma once

#include <memory>
#include <system_error>
#include <utility>

namespace blockway::remote {

struct Completion {
  virtual ~Completion() = default;
  virtual void complete(std::error_code ec) = 0;
};

template <class H>
struct CompletionOf final : Completion {
  explicit CompletionOf(H&& h) : handler(std::move(h)) {}
  void complete(std::error_code ec) override { std::move(handler)(ec); }
  H handler;
};

}  // namespace blockway::remote
