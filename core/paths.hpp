// The default places blockwayd and blockway agree on: the data directory and
// the control socket.
//
// Pure functions of the user id and the environment; no threads.
#pragma once

#include <string>

namespace blockway::core {

// The default data directory: systemd's $STATE_DIRECTORY when set (the
// service's StateDirectory=), else /var/lib/blockway for root, else
// $XDG_DATA_HOME/blockway or ~/.local/share/blockway.
std::string default_data_dir();

// The default control socket, the same for blockwayd and blockway:
// control.sock in systemd's $RUNTIME_DIRECTORY when set (the service's
// RuntimeDirectory=, /run/blockway in the packaged unit), else
// /run/blockway/control.sock for root, else $XDG_RUNTIME_DIR/blockway/
// control.sock, else control.sock in default_data_dir().
std::string default_control_socket();

}  // namespace blockway::core
