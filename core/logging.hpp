// Logging: one named spdlog logger per module, all writing to stderr (stdout
// may carry the NBD protocol in --stdio mode).
//
// Two line formats: text (time, level, logger, message) and json (one object
// a line: time, level, logger, message, pid, thread), for log shippers. When
// stderr is the systemd journal (JOURNAL_STREAM names stderr's device and
// inode), every line starts with its syslog priority ("<3>" for errors), which
// journald strips and stores, and text lines drop their own timestamp: the
// journal has one. Plain stderr, not sd_journal_send(): no libsystemd
// dependency, and the same stream works under any supervisor.
//
// Thread model: loggers are created once and are thread-safe (spdlog _mt
// sinks); init_logging() runs at start-up before other threads log.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>
#include <string_view>

namespace blockway::core {

enum class LogFormat { text, json };

// "text" or "json"; throws ConfigError naming `what` otherwise.
LogFormat parse_log_format(std::string_view text, std::string_view what);

// Sets the level of every logger, present and future ("trace" ... "off"),
// and the line format. `journal`: stderr goes to the journal (see
// stderr_is_journal()).
void init_logging(const std::string& level, LogFormat format = LogFormat::text, bool journal = false);
// The logger of a module ("nbd", "file", "daemon", ...), created on first use.
std::shared_ptr<spdlog::logger> logger(const std::string& module);

// Whether JOURNAL_STREAM ("DEV:INODE", set by systemd for a service whose
// stderr is the journal) names the file that fd 2 is.
[[nodiscard]] bool stderr_is_journal();

// The syslog priority of a level (err = 3 ... debug = 7; trace is debug).
[[nodiscard]] int syslog_priority(spdlog::level::level_enum level) noexcept;

// `text` as the contents of a JSON string (quotes, backslashes, control
// characters and invalid UTF-8 bytes escaped), appended to `out`.
void append_json_string(std::string& out, std::string_view text);

}  // namespace blockway::core
