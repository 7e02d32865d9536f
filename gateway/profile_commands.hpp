// Access-profile commands of the control plane: profile-show, profile-export,
// profile-import (the first-read order hot-first prefetch follows, moved to
// another host's export of the same image) and cache-drop (empty a cache,
// optionally keeping that profile).
//
// The profile file is JSON, written and read by the daemon at an absolute
// path on its host (like export-image): format and version, the image's size
// and chunk size, an identity of the image (SHA-256 of its size, its first
// 64 KiB and 15 blocks of 4 KiB spread evenly over it: see README), the
// remote it was taken from (informational, without credentials), the
// sessions' chunk numbers in first-read order (newest session first) and a
// SHA-256 of those numbers, so a damaged file is refused. Import checks the
// size (always) and the identity (unless forced) against the export, and
// converts chunk numbers when the two caches' chunk sizes differ.
//
// Thread model: handlers run on the control plane's event loop; the file is
// read and written on the blocking pool; the image's identity is read
// through the export's cache (CacheLayer::read_unrecorded), which neither
// records it in the profile nor bypasses dirty data.
#pragma once

#include "core/export.hpp"
#include "gateway/control_protocol.hpp"

#include <boost/asio/thread_pool.hpp>

namespace blockway::gateway {

void add_profile_commands(ControlDispatcher& dispatcher, core::ExportTable& exports,
                          boost::asio::thread_pool& blocking);

}  // namespace blockway::gateway
