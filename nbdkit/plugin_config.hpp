// PluginConfig: the keys of `nbdkit blockway KEY=VALUE ...`, read with the
// option tables blockwayd reads an export's options with (the backend's, the
// RetryLayer's, the cache's, the QoS limits'), so the keys, the checks and
// the messages are the daemon's. The plugin's own keys (uri, name, data-dir,
// threads, log-level, read-only, description) have their table here.
//
// Thread model: nbdkit's .config and .config_complete, on its main thread,
// before any other thread runs.
#pragma once

#include "core/options.hpp"

#include <map>
#include <span>
#include <string>

namespace blockway::nbdkit {

struct PluginConfig {
  std::string uri;          // the remote, as in --export NAME=URI
  std::string name = "nbdkit";  // the export's name in the catalogue and in messages
  std::string data_dir;     // where the catalogue lives (default: the cache directory)
  std::string description;  // what NBD clients are told it is
  unsigned threads = 2;     // event loops
  std::string log_level = "warn";
  bool read_only = false;
  // The export options (backend, retry, cache, QoS), taken by the stack.
  std::map<std::string, std::string> options;

  // Records one KEY=VALUE from nbdkit's command line. Throws ConfigError on a
  // key given twice.
  void add(const std::string& key, const std::string& value);
  // Checks every key without touching the remote: the plugin's own, then the
  // export options the way the stack will take them. Throws ConfigError with
  // the daemon's message.
  void complete();
  // "export 'NAME'", how messages name the export.
  [[nodiscard]] std::string where() const { return "export '" + name + "'"; }

  // The plugin's own keys, for --help and --dump-plugin.
  static std::span<const core::OptionSpec> options_table();
  // nbdkit's `nbdkit blockway --help` text: every key of every table.
  static std::string help();

 private:
  std::map<std::string, std::string> own_;  // the plugin's own keys, until complete()
};

}  // namespace blockway::nbdkit
