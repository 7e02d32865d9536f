// RbdTarget: what an rbd:// URI names, and the words of what it refuses.
#include "remote/rbd/rbd_uri.hpp"

#include "remote/backend.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace blockway::remote::rbd {
namespace {

using ::testing::HasSubstr;

TEST(RbdUri, PoolAndImage) {
  const auto t = RbdTarget::parse("rbd://rbd/disk");
  EXPECT_EQ(t.id, "admin");
  EXPECT_EQ(t.pool, "rbd");
  EXPECT_EQ(t.ns, "");
  EXPECT_EQ(t.image, "disk");
  EXPECT_EQ(t.snap, "");
  EXPECT_EQ(t.lock, LockMode::on);
  EXPECT_EQ(t.spec(), "rbd/disk");
}

TEST(RbdUri, EveryPart) {
  const auto t = RbdTarget::parse(
      "RBD://gw@my_pool/tenant%2D1/vm.disk@before-upgrade?conf=/etc/ceph/x.conf&keyring=/k/gw.keyring");
  EXPECT_EQ(t.id, "gw");
  EXPECT_EQ(t.pool, "my_pool");
  EXPECT_EQ(t.ns, "tenant-1");
  EXPECT_EQ(t.image, "vm.disk");
  EXPECT_EQ(t.snap, "before-upgrade");
  EXPECT_EQ(t.conf, "/etc/ceph/x.conf");
  EXPECT_EQ(t.keyring, "/k/gw.keyring");
  EXPECT_EQ(t.lock, LockMode::off) << "a snapshot is read-only and takes no lock";
  EXPECT_EQ(t.spec(), "my_pool/tenant-1/vm.disk@before-upgrade");
}

TEST(RbdUri, LockModes) {
  EXPECT_EQ(RbdTarget::parse("rbd://p/i?exclusive=off").lock, LockMode::off);
  EXPECT_EQ(RbdTarget::parse("rbd://p/i?exclusive=break").lock, LockMode::take_over);
  EXPECT_EQ(RbdTarget::parse("rbd://p/i?exclusive=on").lock, LockMode::on);
  EXPECT_EQ(RbdTarget::parse("rbd://p/i@s?exclusive=off").lock, LockMode::off);
  EXPECT_FALSE(RbdTarget::parse("rbd://p/i").rbd_cache) << "off unless asked for";
  EXPECT_EQ(RbdTarget::parse("rbd://p/i?rbd_cache=on").rbd_cache, true);
  EXPECT_EQ(RbdTarget::parse("rbd://p/i?rbd_cache=true").rbd_cache, true);
  EXPECT_EQ(RbdTarget::parse("rbd://p/i?rbd_cache=off&exclusive=off").rbd_cache, false);
  EXPECT_EQ(RbdTarget::parse("rbd://p/i?rbd_cache=false").rbd_cache, false);
}

void expect_refused(const std::string& uri, const std::string& words) {
  try {
    (void)RbdTarget::parse(uri);
    ADD_FAILURE() << uri << " accepted";
  } catch (const BackendError& e) {
    EXPECT_THAT(e.what(), HasSubstr(words)) << uri;
    EXPECT_THAT(e.what(), HasSubstr("'" + uri + "'")) << "the message quotes the URI";
  }
}

TEST(RbdUri, RefusesWithAReason) {
  expect_refused("nbd://p/i", "does not start with rbd://");
  expect_refused("rbd://pool", "names no image");
  expect_refused("rbd://pool/", "empty path component");
  expect_refused("rbd://a/b/c/d", "too many path components");
  expect_refused("rbd://@p/i", "empty or malformed user ID");
  expect_refused("rbd://client.admin@p/i", "without 'client.'");
  expect_refused("rbd://p/i@", "empty snapshot name");
  expect_refused("rbd://p/@s", "names no image");
  expect_refused("rbd://p/i%4", "malformed percent escape");
  expect_refused("rbd://p/i%00x", "malformed percent escape");
  expect_refused("rbd://p/i?conf=relative.conf", "absolute path for conf=");
  expect_refused("rbd://p/i?keyring=", "absolute path for keyring=");
  expect_refused("rbd://p/i?exclusive=yes", "exclusive='yes' (expected on, off or break)");
  expect_refused("rbd://p/i?rbd_cache=writeback", "rbd_cache='writeback' (expected on or off)");
  expect_refused("rbd://p/i?rbd_cache=", "rbd_cache='' (expected on or off)");
  expect_refused("rbd://p/i?secret=abc", "unknown parameter 'secret'");
  expect_refused("rbd://p/i?conf", "malformed query parameter");
  expect_refused("rbd://p/i@s?exclusive=on", "exclusive lock on a snapshot");
  expect_refused("rbd://p/i#x", "fragment");
}

}  // namespace
}  // namespace blockway::remote::rbd
