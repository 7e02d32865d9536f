// prepare_mount_point: a missing directory is created, symlinks resolved, a
// file refused, and a live FUSE mount refused with a message naming it;
// mount_types reads the mount table.
// (Stale and hung mounts: mount_test.cpp.)
#include "fuse/mount_point.hpp"

#include "core/logging.hpp"
#include "tests/unit/fuse/fuse_mount_fixture.hpp"

#include <sys/mount.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

namespace blockway::fuse {
namespace {

using test_support::FuseMount;
using test_support::memory_export;
using namespace std::chrono_literals;

std::string prepare(const std::string& where) { return prepare_mount_point(where, 5s, *core::logger("fuse")); }

std::string error_of(const std::string& where) {
  try {
    prepare(where);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "no error";
}

class MountPoint : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bw-fuse-dir-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = std::filesystem::canonical(tmpl).string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(MountPoint, AMissingDirectoryIsCreatedAndLinksResolved) {
  EXPECT_EQ(prepare(dir_ + "/a/b/"), dir_ + "/a/b");
  EXPECT_TRUE(std::filesystem::is_directory(dir_ + "/a/b"));
  std::filesystem::create_directory_symlink(dir_ + "/a/b", dir_ + "/link");
  EXPECT_EQ(prepare(dir_ + "/link"), dir_ + "/a/b");
}

TEST_F(MountPoint, AFileIsNotADirectory) {
  std::ofstream(dir_ + "/file") << "x";
  const auto error = error_of(dir_ + "/file");
  EXPECT_NE(error.find(dir_ + "/file is not a directory"), std::string::npos) << error;
}

// Mount points are listed with spaces and such escaped (\040).
TEST_F(MountPoint, MountTypesAreReadFromTheMountTable) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root";
  const std::string dir = dir_ + "/with space";
  std::filesystem::create_directory(dir);
  EXPECT_TRUE(mount_types(dir).empty());
  ASSERT_EQ(::mount("bw-tmpfs", dir.c_str(), "tmpfs", 0, "size=1m"), 0) << std::strerror(errno);
  EXPECT_EQ(mount_types(dir), std::vector<std::string>{"tmpfs"});
  ASSERT_EQ(::umount2(dir.c_str(), MNT_DETACH), 0);
  EXPECT_TRUE(mount_types(dir).empty());
}

TEST_F(FuseMount, ALiveFuseMountIsRefused) {
  table_.add(memory_export("a", 4096, nullptr));
  start();
  const auto error = error_of(mnt_);
  EXPECT_NE(error.find(mnt_ + " is already a FUSE mount"), std::string::npos) << error;
}

}  // namespace
}  // namespace blockway::fuse
