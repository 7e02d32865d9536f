// Backend: what the registry (remote/registry.cpp) knows of one backend, and
// what every backend shares.
//
// Every backend has the same shape, in remote/NAME/NAME_backend.cpp:
//   check(uri, options)      validates the URI and takes its options without
//                            touching the network (a detached export checks
//                            its remote's settings this way);
//   open(uri, options, env)  the same, then connects and returns the device.
// Both take the options they know from `options` (core::Options removes what
// it reads), so whatever is left is an unknown option.
//
// A backend on this host (file://) opens a core::BlockDevice; a network
// backend opens a core::RemoteDevice, whose session can be lost: the stack
// builder puts a RetryLayer above it (and reads retry-timeout for it).
//
// Thread model: start-up and control plane only, never the data path; open()
// may block (connecting, logging in, discovering).
#pragma once

#include "core/block_device.hpp"
#include "core/event_loops.hpp"
#include "core/options.hpp"
#include "core/remote_device.hpp"
#include "remote/uri.hpp"

#include <boost/asio/thread_pool.hpp>

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace blockway::remote {

// A backend cannot be used as configured: a URI it does not take, or a
// remote that refuses or is not there when the export opens. A ConfigError:
// the daemon reports it like any configuration mistake (exit status 2 at
// start-up, an error answer to export-add).
struct BackendError : core::ConfigError {
  using core::ConfigError::ConfigError;
};

// What open() gets from the daemon besides the URI and the options.
struct OpenEnv {
  bool read_only = false;
  boost::asio::thread_pool* blocking = nullptr;
  core::EventLoops* loops = nullptr;  // for backends that keep sessions on them
};

using CheckFn = void (*)(const std::string& uri, core::Options& options);
using OpenLocalFn = std::unique_ptr<core::BlockDevice> (*)(const std::string& uri, core::Options& options,
                                                           const OpenEnv& env);
using OpenRemoteFn = std::unique_ptr<core::RemoteDevice> (*)(const std::string& uri, core::Options& options,
                                                             const OpenEnv& env);

struct Backend {
  std::string_view name;                      // "nfs"
  std::string_view summary;                   // one line for --help
  std::vector<std::string_view> schemes;      // the URI schemes it opens
  std::vector<std::string_view> uri_forms;    // for --help
  std::span<const core::OptionSpec> options;  // its export options
  CheckFn check = nullptr;
  // Exactly one is set: a device on this host, used as it is, or a network
  // session, which gets a RetryLayer above it.
  OpenLocalFn open_local = nullptr;
  OpenRemoteFn open_remote = nullptr;

  [[nodiscard]] bool retry() const noexcept { return open_remote != nullptr; }

  // A backend on this host (no RetryLayer) and a network backend.
  static Backend on_this_host(std::string_view name, std::string_view summary,
                              std::vector<std::string_view> schemes, std::vector<std::string_view> uri_forms,
                              std::span<const core::OptionSpec> options, CheckFn check, OpenLocalFn open) {
    return {name, summary, std::move(schemes), std::move(uri_forms), options, check, open, nullptr};
  }
  static Backend network(std::string_view name, std::string_view summary, std::vector<std::string_view> schemes,
                         std::vector<std::string_view> uri_forms, std::span<const core::OptionSpec> options,
                         CheckFn check, OpenRemoteFn open) {
    return {name, summary, std::move(schemes), std::move(uri_forms), options, check, nullptr, open};
  }
};

// `io-timeout`, as every network backend takes it: how long one request may
// go unanswered before the session is dropped.
constexpr core::OptionSpec io_timeout_option(std::string_view help) {
  return {.name = "io-timeout", .kind = core::OptionKind::seconds, .help = help, .min = 0.1, .max = 86400};
}

// How many sessions (connections) a network backend keeps: 1 to 64.
constexpr core::OptionSpec session_count_option(std::string_view name, std::string_view help) {
  return {.name = name, .kind = core::OptionKind::number, .help = help, .min = 1, .max = 64};
}

// A URI in the generic syntax (remote/uri.hpp). Throws BackendError quoting it.
Uri parse_uri(const std::string& text);

// The event loops a backend that keeps sessions on them needs; BackendError
// naming the URI if the daemon gave none.
core::EventLoops& loops_of(const OpenEnv& env, const std::string& uri_for_messages);

}  // namespace blockway::remote
