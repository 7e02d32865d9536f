// The iscsi:// entry of the backend registry (remote/registry.cpp): option
// parsing, validation without connecting, and opening.
//
// Options: sessions=N (1..64, default one per event loop), io-timeout=S
// (0.1..86400 s, default 30), initiator=IQN (the initiator name to log in
// with). Thread model: start-up only, may block while opening.
#pragma once

#include "remote/iscsi/iscsi_device.hpp"
#include "remote/registry.hpp"

namespace blockway::remote::iscsi {

// Parses the URI and the options this backend takes. Throws BackendError.
void check_iscsi(const OpenRequest& req);
IscsiOptions iscsi_options(const OpenRequest& req);
// check_iscsi(), then erases the options it used and connects.
std::unique_ptr<core::BlockDevice> open_iscsi(const OpenRequest& req);

}  // namespace blockway::remote::iscsi
