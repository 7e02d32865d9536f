// Daemon: turns a DaemonConfig into running exports and front ends, and runs
// them until SIGTERM/SIGINT (or, in --stdio mode, until the client leaves).
//
// Thread model: constructed and run on the main thread, which becomes event
// loop 0 inside run(); signal handling happens on loop 0.
#pragma once

#include "gateway/config.hpp"

namespace blockway::gateway {

// Returns the process exit code. Throws ConfigError for configuration
// mistakes found while starting.
int run_daemon(DaemonConfig config);

}  // namespace blockway::gateway
