// export-image {name, path, force?}: writes a full standalone raw image of an
// export (a clone, a snapshot export CLONE@SNAP, or any other) to a file on
// the daemon's host, sparse where the image reads zero. The image is read
// through the export's own device, as a client would read it, so a clone's
// image holds its writes over its base; for a point-in-time copy of a clone
// that keeps writing, take a snapshot and export CLONE@SNAP.
//
// Thread model: the handler runs on the control plane's loop; reads go
// through the export's device, file writes run on the blocking pool.
#pragma once

#include "core/export.hpp"
#include "gateway/control_protocol.hpp"

#include <boost/asio/thread_pool.hpp>

namespace blockway::gateway {

void add_image_commands(ControlDispatcher& dispatcher, core::ExportTable& exports, boost::asio::thread_pool& blocking);

}  // namespace blockway::gateway
