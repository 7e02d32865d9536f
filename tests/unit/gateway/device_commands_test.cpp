// Kernel device options ([[device]], blockway connect) and the record the
// catalogue keeps.
#include "gateway/device_commands.hpp"

#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace blockway::gateway {
namespace {

using core::ConfigError;
using ::testing::HasSubstr;
using test::what_of;

TEST(DeviceOptions, Defaults) {
  const auto o = parse_device_options({}, "x");
  EXPECT_FALSE(o.index.has_value());
  EXPECT_EQ(o.connections, 0u);
  EXPECT_FALSE(o.read_only);
  EXPECT_FALSE(o.rotational);
  EXPECT_EQ(o.dead_conn_timeout_s, 120u);
  EXPECT_EQ(o.timeout_s, 5u);
}

TEST(DeviceOptions, EveryKey) {
  const auto o = parse_device_options({{"device", "/dev/nbd4"},
                                       {"connections", "3"},
                                       {"read-only", "on"},
                                       {"rotational", "true"},
                                       {"dead-conn-timeout", "600"},
                                       {"timeout", "30"}},
                                      "x");
  EXPECT_EQ(o.index, 4u);
  EXPECT_EQ(o.connections, 3u);
  EXPECT_TRUE(o.read_only);
  EXPECT_TRUE(o.rotational);
  EXPECT_EQ(o.dead_conn_timeout_s, 600u);
  EXPECT_EQ(o.timeout_s, 30u);
}

TEST(DeviceOptions, ErrorsNameWhereAndWhat) {
  EXPECT_THAT(what_of<ConfigError>([] { parse_device_options({{"device", "/dev/sda"}}, "[[device]] export 'a'"); }),
              HasSubstr("[[device]] export 'a': device '/dev/sda' is not an NBD device"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_device_options({{"connections", "0"}}, "w"); }),
              HasSubstr("connections"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_device_options({{"connections", "65"}}, "w"); }),
              HasSubstr("connections"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_device_options({{"dead-conn-timeout", "0"}}, "w"); }),
              HasSubstr("dead-conn-timeout"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_device_options({{"timeout", "soon"}}, "w"); }), HasSubstr("timeout"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_device_options({{"read-only", "maybe"}}, "w"); }),
              HasSubstr("read-only"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_device_options({{"speed", "1"}}, "w"); }),
              HasSubstr("unknown option 'speed'"));
}

TEST(DeviceRecord, RoundTripsThroughTheCatalogueJson) {
  nbd::DeviceRecord r;
  r.index = 7;
  r.export_name = "vm1";
  r.size = 1ull << 30;
  r.block_size = 4096;
  r.flags = 1 | 2 | 4 | 8;
  r.options.connections = 2;
  r.options.rotational = true;
  r.options.dead_conn_timeout_s = 300;
  r.options.timeout_s = 9;
  const auto j = device_json(r);
  EXPECT_EQ(j["device"], "/dev/nbd7");
  EXPECT_TRUE(j["read_only"].get<bool>());
  const auto back = device_from_json(Json::parse(j.dump()));
  EXPECT_EQ(back.index, 7u);
  EXPECT_EQ(back.options.index, 7u);
  EXPECT_EQ(back.export_name, "vm1");
  EXPECT_EQ(back.size, r.size);
  EXPECT_EQ(back.block_size, 4096u);
  EXPECT_EQ(back.flags, r.flags);
  EXPECT_EQ(back.options.connections, 2u);
  EXPECT_TRUE(back.options.read_only);
  EXPECT_TRUE(back.options.rotational);
  EXPECT_EQ(back.options.dead_conn_timeout_s, 300u);
  EXPECT_EQ(back.options.timeout_s, 9u);
  EXPECT_THROW(device_from_json(Json::parse(R"({"index": 1})")), Json::exception);
}

}  // namespace
}  // namespace blockway::gateway
