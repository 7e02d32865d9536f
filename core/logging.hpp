// Logging: one named spdlog logger per module, all writing to stderr (stdout
// may carry the NBD protocol in --stdio mode).
//
// Thread model: loggers are created once and are thread-safe (spdlog _mt sinks).
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace blockway::core {

// Sets the level of every logger, present and future ("trace" ... "off").
void init_logging(const std::string& level);
// The logger of a module ("nbd", "file", "daemon", ...), created on first use.
std::shared_ptr<spdlog::logger> logger(const std::string& module);

}  // namespace blockway::core
