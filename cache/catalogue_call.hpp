// catalogue_call(): a catalogue update (MetaStore throws on SQLite errors)
// moved to the blocking pool, its exception turned into EIO on the data path.
//
// Thread model: the caller resumes on its own executor; `call` runs on the
// pool and must only touch what the caller keeps alive across the await.
#pragma once

#include "core/block_device.hpp"
#include "core/logging.hpp"
#include "core/task.hpp"

#include <boost/asio/thread_pool.hpp>

#include <cerrno>
#include <exception>
#include <system_error>

namespace blockway::cache {

// Runs `call` on the blocking pool; EIO, logged, if it throws.
template <class F>
core::Task<std::error_code> catalogue_call(boost::asio::thread_pool& pool, F call) {
  co_return co_await core::offload(pool, [&call]() -> std::error_code {
    try {
      call();
      return {};
    } catch (const std::exception& e) {
      core::logger("cache")->error("{}", e.what());
      return core::errno_code(EIO);
    }
  });
}

}  // namespace blockway::cache
