// The generated parts of the man pages blockwayd(8) and blockwayd.toml(5), in
// scdoc, from the tables that --help and the option readers use (the flags,
// the backends' URI forms and options, the cache, export and FUSE options, the
// exit codes), so that the pages cannot drift from what the daemon accepts.
// The build (packaging/man/) puts them into the hand-written pages.
//
// Start-up only (blockwayd --help-man SECTION), main thread.
#pragma once

#include <string>
#include <string_view>

namespace blockway::gateway {

// "options", "uris", "export-options", "fuse-options" or "exit-status".
// Throws core::ConfigError for another name.
std::string man_section(std::string_view section);

// `text` with scdoc's markup characters escaped (\, *, _).
std::string scdoc_escape(std::string_view text);

}  // namespace blockway::gateway
