// The backend registry: one entry per backend, found by scheme; which ones
// get a RetryLayer; what an unknown scheme or a non-URI is told.
#include "remote/registry.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>

namespace blockway::remote {
namespace {

using ::testing::HasSubstr;

std::string error_of(const std::string& uri) {
  return test::what_of<BackendError>([&] { (void)backend_for(uri); });
}

TEST(Registry, EverySchemeHasOneBackend) {
  const auto schemes = supported_schemes();
  for (const char* s : {"file", "nbd", "nbd+unix", "nbds", "nbds+unix", "iscsi", "nfs", "aoe"})
    EXPECT_NE(std::find(schemes.begin(), schemes.end(), s), schemes.end()) << s;
  EXPECT_EQ(std::set<std::string>(schemes.begin(), schemes.end()).size(), schemes.size()) << "a scheme twice";
  EXPECT_EQ(backend_for("nbd+unix:///x?socket=/s").name, "nbd");
  EXPECT_EQ(backend_for("nbds://h/x?tls-certificates=/d").name, "nbd");
  EXPECT_EQ(backend_for("NFS://h/x.img").name, "nfs") << "schemes are case-insensitive";
}

TEST(Registry, NetworkBackendsGetARetryLayerFilesDoNot) {
  for (const auto& b : backends()) {
    EXPECT_TRUE(b.check != nullptr) << b.name;
    EXPECT_NE(b.open_local == nullptr, b.open_remote == nullptr) << b.name << ": exactly one open";
    EXPECT_FALSE(b.uri_forms.empty()) << b.name;
    EXPECT_FALSE(b.summary.empty()) << b.name;
    EXPECT_EQ(b.retry(), b.name != "file") << b.name;
    for (const auto& o : b.options) EXPECT_FALSE(o.help.empty()) << b.name << " " << o.name;
  }
}

TEST(Registry, UnknownSchemesAndNonUrisAreRefusedWithTheKnownOnes) {
  const auto msg = error_of("iscsix://127.0.0.1/iqn.x/1");
  EXPECT_THAT(msg, HasSubstr("unknown scheme 'iscsix'"));
  EXPECT_THAT(msg, HasSubstr("nfs://"));
  EXPECT_THAT(error_of("/var/lib/x.img"), HasSubstr("not a URI"));
}

TEST(Registry, CheckGoesToTheBackendOfTheScheme) {
  std::map<std::string, std::string> values{{"colour", "red"}};
  core::Options options(values);
  EXPECT_NO_THROW(check("file:///x.img", options));
  EXPECT_EQ(values.size(), 1u) << "file:// takes no options";
  EXPECT_THROW(check("file://host/x.img", options), BackendError);
}

}  // namespace
}  // namespace blockway::remote
