// The rbd:// backend: what check() accepts without a cluster, and how it
// takes its options.
#include "remote/rbd/rbd_backend.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

namespace blockway::remote::rbd {
namespace {

using ::testing::HasSubstr;

TEST(RbdBackend, CheckValidatesWithoutConnectingAndTakesItsOptions) {
  std::map<std::string, std::string> values{{"io-timeout", "2.5"}};
  core::Options options(values, "export 'r'");
  // No cluster exists behind this conf: check() must not try to reach one.
  const std::string uri = "rbd://gw@rbd/img?conf=/nonexistent/ceph.conf&keyring=/nonexistent/keyring";
  EXPECT_NO_THROW(kBackend.check(uri, options));
  EXPECT_TRUE(values.empty()) << "check() takes the options it knows";

  values = {{"io-timeout", "0"}};
  try {
    kBackend.check(uri, options);
    FAIL() << "io-timeout=0 accepted";
  } catch (const core::ConfigError& e) {
    EXPECT_THAT(e.what(), HasSubstr("export 'r': option io-timeout='0'"));
  }
  values.clear();
  EXPECT_THROW(kBackend.check("rbd://rbd", options), BackendError);
  EXPECT_TRUE(kBackend.retry()) << "a network backend: the RetryLayer bounds the wait on a dead cluster";
}

}  // namespace
}  // namespace blockway::remote::rbd
