// The plugin's keys: its own, the export options checked as the daemon
// checks them, and the messages nbdkit prints for a mistake.
#include "nbdkit/plugin_config.hpp"

#include "tests/support/temp_dir.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

namespace blockway::nbdkit {
namespace {

using core::ConfigError;
using ::testing::HasSubstr;
using test::what_of;

PluginConfig with(std::initializer_list<std::pair<const char*, const char*>> keys) {
  PluginConfig c;
  for (const auto& [k, v] : keys) c.add(k, v);
  return c;
}

TEST(PluginConfig, OwnKeysAndExportOptions) {
  auto c = with({{"uri", "file:///var/tmp/x.img"}, {"name", "vm1"}, {"threads", "3"}, {"log-level", "info"},
                 {"ro", "on"}, {"description", "a disk"}, {"cache", "/var/tmp/c"}, {"mode", "writeback-local"},
                 {"prefetch", "hot-first"}, {"qos-read-iops", "100"}});
  c.complete();
  EXPECT_EQ(c.uri, "file:///var/tmp/x.img");
  EXPECT_EQ(c.name, "vm1");
  EXPECT_EQ(c.threads, 3u);
  EXPECT_EQ(c.log_level, "info");
  EXPECT_TRUE(c.read_only);
  EXPECT_EQ(c.description, "a disk");
  EXPECT_EQ(c.data_dir, "/var/tmp/c");  // the catalogue beside the cache by default
  // The export options stay for the stack, which takes them again.
  EXPECT_EQ(c.options.size(), 4u);
  EXPECT_EQ(c.where(), "export 'vm1'");
}

TEST(PluginConfig, DataDirGivenWins) {
  auto c = with({{"uri", "file:///x"}, {"cache", "/var/tmp/c"}, {"data-dir", "/var/tmp/d"}});
  c.complete();
  EXPECT_EQ(c.data_dir, "/var/tmp/d");
}

TEST(PluginConfig, MistakesGetTheDaemonsMessages) {
  auto message = [](std::initializer_list<std::pair<const char*, const char*>> keys) {
    return what_of<ConfigError>([&] { with(keys).complete(); });
  };
  EXPECT_THAT(message({}), HasSubstr("the image to serve is missing"));
  EXPECT_THAT(message({{"uri", "gopher://h/x"}}), HasSubstr("unknown scheme 'gopher'"));
  EXPECT_THAT(message({{"uri", "file:///x"}, {"bogus", "1"}}), HasSubstr("unknown option 'bogus'"));
  EXPECT_THAT(message({{"uri", "file:///x"}, {"mode", "writeback"}}), HasSubstr("needs a cache directory"));
  EXPECT_THAT(message({{"uri", "file:///x"}, {"cache", "/c"}, {"mode", "fast"}}),
              HasSubstr("export 'nbdkit': mode 'fast' is not writethrough, writeback or writeback-local"));
  EXPECT_THAT(message({{"uri", "file:///x"}, {"threads", "0"}}), HasSubstr("threads"));
  EXPECT_THAT(message({{"uri", "file:///x"}, {"threads", "many"}}), HasSubstr("threads"));
  EXPECT_THAT(message({{"uri", "file:///x"}, {"log-level", "loud"}}), HasSubstr("log-level"));
  EXPECT_THAT(message({{"uri", "file:///x"}, {"name", ""}}), HasSubstr("must not be empty"));
  EXPECT_THAT(message({{"uri", "nbd://h/x"}, {"retry-timeout", "soon"}}), HasSubstr("retry-timeout"));
  // Server options are nbdkit's: not taken here.
  EXPECT_THAT(message({{"uri", "file:///x"}, {"allow", "127.0.0.1"}}), HasSubstr("unknown option 'allow'"));
  EXPECT_THAT(what_of<ConfigError>([] { with({{"uri", "file:///x"}, {"uri", "file:///y"}}); }),
              HasSubstr("given twice"));
}

TEST(PluginConfig, HelpListsEveryTable) {
  const auto help = PluginConfig::help();
  for (const char* needle : {"uri=URI", "data-dir=DIR", "mode=", "prefetch=", "qos-read-iops=N",
                             "retry-timeout=SECONDS", "io-timeout=SECONDS", "nbd backend", "iscsi backend"})
    EXPECT_THAT(help, HasSubstr(needle));
}

}  // namespace
}  // namespace blockway::nbdkit
