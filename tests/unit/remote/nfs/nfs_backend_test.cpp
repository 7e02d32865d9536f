// The nfs:// backend: what check() accepts without a network, and how it
// takes its options.
#include "remote/nfs/nfs_backend.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

namespace blockway::remote::nfs {
namespace {

using ::testing::HasSubstr;

TEST(NfsBackend, CheckValidatesWithoutConnectingAndTakesItsOptions) {
  std::map<std::string, std::string> values{{"connections", "4"}, {"io-timeout", "2.5"}, {"keepalive", "0"}};
  core::Options options(values, "export 'n'");
  const std::string uri = "nfs://192.0.2.1/export/disk.img?version=4";  // TEST-NET: nothing answers there
  EXPECT_NO_THROW(kBackend.check(uri, options));
  EXPECT_TRUE(values.empty()) << "check() takes the options it knows";

  values = {{"connections", "65"}};
  try {
    kBackend.check(uri, options);
    FAIL() << "connections=65 accepted";
  } catch (const core::ConfigError& e) {
    EXPECT_THAT(e.what(), HasSubstr("export 'n': option connections='65'"));
  }
  values = {{"io-timeout", "0"}};
  EXPECT_THROW(kBackend.check(uri, options), core::ConfigError);
  values = {{"inflight-kib", "x"}};
  EXPECT_THROW(kBackend.check(uri, options), core::ConfigError);
  values.clear();
  EXPECT_THROW(kBackend.check("nfs://192.0.2.1/", options), BackendError);
}

}  // namespace
}  // namespace blockway::remote::nfs
