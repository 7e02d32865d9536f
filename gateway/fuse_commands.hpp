// The control commands of the FUSE front end: `mount` (every export as a
// file in {dir}) and `unmount`, so that `blockway mount DIR` and
// `blockway unmount` work at run time.
//
// Thread model: the handlers run on the control plane's event loop (loop 0);
// mount(2) and the statfs of whatever is at DIR run on the blocking pool.
#pragma once

#include "fuse/fuse_front_end.hpp"
#include "gateway/control_protocol.hpp"

#include <boost/asio/thread_pool.hpp>

#include <atomic>

namespace blockway::gateway {

// Adds "mount" and "unmount". `stopping` is set once SIGTERM/SIGINT came:
// then mount is refused. `fuse` and `stopping` must outlive the dispatcher.
void add_fuse_commands(ControlDispatcher& dispatcher, fuse::FuseFrontEnd& fuse, boost::asio::thread_pool& pool,
                       const std::atomic<bool>& stopping);

}  // namespace blockway::gateway
