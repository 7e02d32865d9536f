// NfsTarget::parse: how nfs:// URIs split into server, mount path and file,
// and the messages for what is refused (no network involved).
#include "remote/nfs/nfs_uri.hpp"

#include "remote/backend.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>

namespace blockway::remote::nfs {
namespace {

using ::testing::HasSubstr;

std::string refusal(const std::string& uri) {
  return test::what_of<BackendError>([&] { NfsTarget::parse(uri); });
}

TEST(NfsUri, SplitsTheDirectoryToMountFromTheFile) {
  const auto t = NfsTarget::parse("nfs://srv.example/srv/export/vm/disk.img");
  EXPECT_EQ(t.server, "srv.example");
  EXPECT_FALSE(t.port.has_value());
  EXPECT_EQ(t.version, 3);
  EXPECT_EQ(t.mount_path, "/srv/export/vm");
  EXPECT_EQ(t.file, "/disk.img");
  EXPECT_EQ(t.libnfs_settings_url(), "nfs://srv.example/?version=3");
}

TEST(NfsUri, FileAtTheServerRoot) {
  const auto t = NfsTarget::parse("nfs://10.0.0.1/disk.img?version=4");
  EXPECT_EQ(t.mount_path, "/");
  EXPECT_EQ(t.file, "/disk.img");
  EXPECT_EQ(t.version, 4);
}

TEST(NfsUri, PortBecomesLibnfsNfsport) {
  const auto t = NfsTarget::parse("nfs://127.0.0.1:20049/export/a.img?version=4");
  ASSERT_TRUE(t.port.has_value());
  EXPECT_EQ(*t.port, 20049);
  EXPECT_EQ(t.libnfs_settings_url(), "nfs://127.0.0.1/?version=4&nfsport=20049");
}

TEST(NfsUri, Ipv6LiteralKeepsItsBracketsForLibnfs) {
  const auto t = NfsTarget::parse("nfs://[::1]/export/a.img");
  EXPECT_EQ(t.server, "::1");
  EXPECT_EQ(t.libnfs_settings_url(), "nfs://[::1]/?version=3");
}

TEST(NfsUri, PercentEscapesAreDecoded) {
  const auto t = NfsTarget::parse("nfs://h/exp/my%20disk.img");
  EXPECT_EQ(t.file, "/my disk.img");
}

TEST(NfsUri, RefusalsSayWhatIsWrong) {
  const std::map<std::string, std::string> cases{
      {"nfs://h", "names no image file"},
      {"nfs://h/", "names no image file"},
      {"nfs:///x/disk.img", "names no server"},
      {"nfs://h/x/", "ends in '/'"},
      {"nfs://h/x//disk.img", "empty path component"},
      {"nfs://h/x/./disk.img", "'.' or '..'"},
      {"nfs://h/../disk.img", "'.' or '..'"},
      {"nfs://h/x/disk.img?version=2", "version '2'"},
      {"nfs://h/x/disk.img?version=", "version ''"},
      {"nfs://h/x/disk.img?uid=0", "unknown parameter 'uid'"},
      {"nfs://me@h/x/disk.img", "names a user"},
      {"nfs://h/x/a%3Fb.img", "'?', '&' or '#'"},
      {"nbd://h/x/disk.img", "does not start with nfs://"},
  };
  for (const auto& [uri, needle] : cases) {
    const std::string msg = refusal(uri);
    EXPECT_THAT(msg, HasSubstr(needle)) << uri;
    EXPECT_THAT(msg, HasSubstr(uri)) << "the message quotes the URI";
    EXPECT_THAT(msg, HasSubstr("nfs://server[:port]/path/to/image")) << "the message shows the form";
  }
}

TEST(NfsUri, MalformedUriIsABackendError) {
  EXPECT_THAT(refusal("nfs://h:99999/x.img"), HasSubstr("99999"));
  EXPECT_THAT(refusal("nfs://h:0/x.img"), HasSubstr("bad port"));
  EXPECT_THAT(refusal("nfs://h/x%zz.img"), HasSubstr("percent"));
}

}  // namespace
}  // namespace blockway::remote::nfs
