// The registry of backends: a URI scheme chooses the BlockDevice that opens it.
//
// Thread model: open_device() and check_device() run at start-up or from the
// control plane, never on the data path; they may block (connecting, opening).
#pragma once

#include "core/block_device.hpp"
#include "core/event_loops.hpp"
#include "remote/backend.hpp"

#include <boost/asio/thread_pool.hpp>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace blockway::remote {

struct OpenRequest {
  std::string uri;
  bool read_only = false;
  // Backend options from the export's configuration. A backend erases the
  // keys it uses; what is left belongs to someone else or is a mistake.
  std::map<std::string, std::string>* options = nullptr;
  boost::asio::thread_pool* blocking = nullptr;
  // The daemon's event loops, for backends that keep sessions on them.
  core::EventLoops* loops = nullptr;
};

// Validates the URI and options without touching the remote. Throws BackendError.
void check_device(const OpenRequest& request);
// Opens the device. Throws BackendError with a message that names the URI.
std::unique_ptr<core::BlockDevice> open_device(const OpenRequest& request);
// The schemes that open_device() accepts, for messages and --help.
std::vector<std::string> supported_schemes();

}  // namespace blockway::remote
