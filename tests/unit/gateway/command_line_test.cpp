// blockwayd's command line: the flags, and --help, which must list what the
// tables that validate configurations accept: every flag, every backend's
// schemes and URI forms, every export option (generic, cache, each backend's,
// retry-timeout for those with a RetryLayer), every FUSE option, every exit
// code.
#include "gateway/command_line.hpp"

#include "cache/cache_config.hpp"
#include "cache/overlay_config.hpp"
#include "core/qos_layer.hpp"
#include "core/retry_layer.hpp"
#include "fuse/fuse_front_end.hpp"
#include "remote/registry.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace blockway::gateway {
namespace {

using ::testing::HasSubstr;

// The part of --help from `heading` to the next empty line.
std::string section(const std::string& help, const std::string& heading) {
  const auto at = help.find(heading);
  if (at == std::string::npos) return {};
  return help.substr(at, help.find("\n\n", at) - at);
}

TEST(Usage, ListsEveryFlag) {
  const std::string help = usage();
  for (const auto& [name, value] : flags()) {
    std::string expected(name);
    if (!value.empty()) (expected += ' ') += value;
    EXPECT_THAT(help, HasSubstr(expected)) << name;
  }
}

TEST(Usage, ListsEveryRegisteredSchemeAndUriForm) {
  const std::string uris = section(usage(), "Export URIs");
  ASSERT_FALSE(uris.empty());
  for (const auto& scheme : remote::supported_schemes()) EXPECT_THAT(uris, HasSubstr(scheme + "://")) << scheme;
  for (const auto& b : remote::backends())
    for (auto form : b.uri_forms) EXPECT_THAT(uris, HasSubstr(std::string(form))) << b.name;
}

TEST(Usage, ListsEveryExportOptionUnderItsBackend) {
  const std::string options = section(usage(), "Export options");
  ASSERT_FALSE(options.empty());
  for (const auto& o : ExportConfig::generic_options()) EXPECT_THAT(options, HasSubstr(o.usage())) << o.name;
  for (const auto& o : cache::CacheConfig::options()) EXPECT_THAT(options, HasSubstr(o.usage())) << o.name;
  for (const auto& o : cache::OverlayConfig::options()) EXPECT_THAT(options, HasSubstr(o.usage())) << o.name;
  for (const auto& o : core::QosLimits::options()) EXPECT_THAT(options, HasSubstr(o.usage())) << o.name;
  for (const auto& b : remote::backends()) {
    const std::string heading = "  " + std::string(b.schemes.front()) + "://";
    const auto at = options.find(heading);
    if (b.options.empty() && !b.retry()) {
      EXPECT_EQ(at, std::string::npos) << b.name << " has no options of its own";
      continue;
    }
    ASSERT_NE(at, std::string::npos) << b.name;
    // Its lines: up to the next heading (two spaces, then a word).
    std::string own;
    for (size_t line = options.find('\n', at) + 1; line != 0 && line < options.size();) {
      const size_t end = options.find('\n', line);
      const std::string text = options.substr(line, end - line);
      if (!text.starts_with("    ") && !text.empty()) break;
      own += text + "\n";
      line = end == std::string::npos ? 0 : end + 1;
    }
    for (const auto& o : b.options) EXPECT_THAT(own, HasSubstr(o.usage())) << b.name << " " << o.name;
    const bool retry = own.find(core::RetryOptions::kTimeoutOption.usage()) != std::string::npos;
    EXPECT_EQ(retry, b.retry()) << b.name << ": retry-timeout exactly where a RetryLayer goes";
  }
}

TEST(Usage, ListsEveryFuseOptionAndExitCode) {
  const std::string help = usage();
  const std::string fuse = section(help, "FUSE options");
  for (const auto& o : fuse::FuseOptions::options()) EXPECT_THAT(fuse, HasSubstr(o.usage())) << o.name;
  const std::string exits = section(help, "Exit codes");
  for (int code : {kExitStopped, kExitFatal, kExitConfig})
    EXPECT_THAT(exits, HasSubstr("\n  " + std::to_string(code) + "  ")) << code;
}

TEST(CommandLine, FlagsTakeTheirValueEitherWay) {
  const auto line = parse_command_line({"--listen", "127.0.0.1:1", "--threads=3", "--export", "a=file:///x.img,ro",
                                        "--handshake-timeout", "2.5"});
  EXPECT_EQ(line.action, CommandLine::Action::run);
  ASSERT_EQ(line.listen.size(), 1u);
  EXPECT_EQ(line.config.threads, 3u);
  ASSERT_EQ(line.config.exports.size(), 1u);
  EXPECT_TRUE(line.config.exports[0].read_only);
  EXPECT_EQ(line.config.handshake_timeout, std::chrono::milliseconds(2500));
  EXPECT_EQ(parse_command_line({"--remote-bandwidth", "100M"}).config.remote_bandwidth, 100u << 20);
  EXPECT_EQ(parse_command_line({}).config.remote_bandwidth, 0u);
  EXPECT_EQ(parse_command_line({"-h"}).action, CommandLine::Action::help);
  EXPECT_EQ(parse_command_line({"--version"}).action, CommandLine::Action::version);
}

TEST(CommandLine, MetricsFlagWinsOverTheFile) {
  const std::string path = "/tmp/blockway-cl-metrics-" + std::to_string(::getpid()) + ".toml";
  std::ofstream(path) << "[metrics]\nlisten = \"127.0.0.1:9333\"\n[[export]]\nname = \"a\"\nuri = \"file:///x.img\"\n";
  auto config = [&](std::vector<std::string> extra) {
    std::vector<std::string> args{"--config", path};
    args.insert(args.end(), extra.begin(), extra.end());
    return effective_config(parse_command_line(args));
  };
  EXPECT_EQ(config({}).metrics->to_string(), "127.0.0.1:9333");
  EXPECT_EQ(config({"--metrics", "9444"}).metrics->to_string(), "127.0.0.1:9444");
  EXPECT_FALSE(config({"--metrics", "off"}).metrics);
  EXPECT_FALSE(effective_config(parse_command_line({})).metrics);  // off unless asked for
  std::remove(path.c_str());
}

TEST(CommandLine, MistakesAreConfigErrorsNamingTheFlag) {
  auto error = [](std::vector<std::string> args) {
    try {
      (void)parse_command_line(args);
    } catch (const core::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(error({"--frob"}), HasSubstr("unknown argument '--frob'"));
  EXPECT_THAT(error({"--listen"}), HasSubstr("--listen needs a value"));
  EXPECT_THAT(error({"--threads", "many"}), HasSubstr("--threads='many'"));
  EXPECT_THAT(error({"--max-inflight", "lots"}), HasSubstr("--max-inflight='lots'"));
  EXPECT_THAT(error({"--shutdown-timeout", "soon"}), HasSubstr("--shutdown-timeout='soon'"));
  EXPECT_THAT(error({"--control-socket="}), HasSubstr("needs a path"));
  EXPECT_THAT(error({"--remote-bandwidth", "fast"}), HasSubstr("--remote-bandwidth='fast': expected a size"));
}

}  // namespace
}  // namespace blockway::gateway
