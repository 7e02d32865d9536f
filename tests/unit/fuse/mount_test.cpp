// A mount's life, for real (root and /dev/fuse needed, else skipped):
// unmount ends it and a new mount can follow, and so does an unmount from
// outside; a hung mount at the directory
// blocks none of the front end's other calls, and fails the mount after
// mount_timeout; ending a detached session leaves alone whatever was
// mounted at the directory since.
#include "fuse/mount.hpp"

#include "tests/unit/fuse/fuse_mount_fixture.hpp"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <future>

namespace blockway::fuse {
namespace {

using test_support::FuseMount;
using test_support::listing;
using test_support::memory_export;
using test_support::mounted_as;
using namespace std::chrono_literals;

// A FUSE mount at dir whose server never answers (not even INIT): calls
// that touch it hang until `returned fd` is closed, then see ENOTCONN.
int mount_hung(const std::string& dir) {
  EXPECT_EQ(::mkdir(dir.c_str(), 0755), 0);
  const int hung = ::open("/dev/fuse", O_RDWR | O_CLOEXEC);
  EXPECT_GE(hung, 0);
  const std::string opts = "fd=" + std::to_string(hung) + ",rootmode=40000,user_id=0,group_id=0";
  EXPECT_EQ(::mount("bw-hung", dir.c_str(), "fuse", MS_NOSUID | MS_NODEV, opts.c_str()), 0) << std::strerror(errno);
  return hung;
}

TEST_F(FuseMount, UnmountEndsTheMountAndCanMountAgain) {
  table_.add(memory_export("a", 4096, nullptr));
  start();
  front_->unmount();
  ASSERT_TRUE(test::eventually([&] { return unmounted_.load(); }, 10s));
  EXPECT_FALSE(front_->active());
  EXPECT_EQ(listing(mnt_), std::set<std::string>{});
  unmounted_ = false;
  front_->mount(mnt_);
  EXPECT_EQ(listing(mnt_), (std::set<std::string>{"a"}));
  EXPECT_THROW(front_->mount(mnt_), std::runtime_error);  // already mounted
}

// Someone else unmounts the directory (umount, fusermount -u): the readers
// see the connection end, the session ends too, and the front end is idle
// and can mount again.
TEST_F(FuseMount, AMountUnmountedFromOutsideEndsItsSession) {
  table_.add(memory_export("a", 4096, nullptr));
  start();
  ASSERT_EQ(::umount2(mnt_.c_str(), 0), 0) << std::strerror(errno);
  ASSERT_TRUE(test::eventually([&] { return unmounted_.load(); }, 10s));
  EXPECT_FALSE(front_->active());
  EXPECT_EQ(front_->mountpoint(), "");
  unmounted_ = false;
  front_->mount(mnt_);
  EXPECT_EQ(listing(mnt_), (std::set<std::string>{"a"}));
}

// mount() finds a FUSE mount at the directory that answers nothing: its
// probes hang until that mount's connection ends. Meanwhile the front end's
// other calls return at once, a second mount() is refused, and the first
// then takes the stale mount's place.
TEST_F(FuseMount, AHungMountAtTheDirectoryBlocksNothingElse) {
  const int hung = mount_hung(mnt_);
  ASSERT_FALSE(HasFailure());
  table_.add(memory_export("a", 4096, nullptr));
  front_ = std::make_unique<FuseFrontEnd>(loops_, table_, FuseOptions{});
  front_->set_on_unmounted([&] { unmounted_ = true; });
  runner_ = std::thread([&] { loops_.run(); });
  std::atomic<bool> first_failed{false};
  std::thread first([&] {
    try {
      front_->mount(mnt_);
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
      first_failed = true;
    }
  });
  // Well inside the probes by now. (Not asked through active(): before the
  // fix that call itself waited for the hung mount.)
  std::this_thread::sleep_for(500ms);
  auto others = std::async(std::launch::async, [&] {
    EXPECT_TRUE(front_->active());
    EXPECT_EQ(front_->mountpoint(), "");
    front_->unmount();  // nothing to unmount yet
    EXPECT_THROW(front_->mount(mnt_), std::runtime_error);
  });
  const bool prompt = others.wait_for(3s) == std::future_status::ready;
  EXPECT_TRUE(prompt) << "the front end's calls waited for the hung mount";
  ::close(hung);  // the hung mount's connection ends: ENOTCONN, a stale mount
  others.get();
  first.join();
  ASSERT_FALSE(first_failed);
  EXPECT_EQ(front_->mountpoint(), mnt_);
  EXPECT_TRUE(test::eventually([&] { return listing(mnt_) == std::set<std::string>{"a"}; }, 5s));
}

// With mount_timeout, a hung mount at the directory fails mount() with a
// clear error once the time is up, instead of waiting for it (the daemon's
// start-up would hang). The probe left waiting changes nothing: once the
// hung mount's connection ends, a mount() succeeds.
TEST_F(FuseMount, AHungMountAtTheDirectoryFailsTheMountAfterTheTimeout) {
  const int hung = mount_hung(mnt_);
  ASSERT_FALSE(HasFailure());
  table_.add(memory_export("a", 4096, nullptr));
  front_ = std::make_unique<FuseFrontEnd>(loops_, table_, FuseOptions{.mount_timeout = 300ms});
  front_->set_on_unmounted([&] { unmounted_ = true; });
  runner_ = std::thread([&] { loops_.run(); });
  auto mounting = std::async(std::launch::async, [&]() -> std::string {
    try {
      front_->mount(mnt_);
      return "mounted";
    } catch (const std::runtime_error& e) {
      return e.what();
    }
  });
  const bool returned = mounting.wait_for(5s) == std::future_status::ready;
  if (!returned) ::close(hung);  // let the test end
  ASSERT_TRUE(returned) << "mount() waited for the hung mount";
  const std::string error = mounting.get();
  EXPECT_NE(error.find("did not answer within 300 ms"), std::string::npos) << error;
  EXPECT_NE(error.find(mnt_), std::string::npos) << error;
  EXPECT_FALSE(front_->active());
  ::close(hung);  // now a stale mount (ENOTCONN): detached by the next mount()
  unmounted_ = false;
  front_->mount(mnt_);
  EXPECT_EQ(front_->mountpoint(), mnt_);
  std::this_thread::sleep_for(200ms);  // the abandoned probe has woken up by now
  EXPECT_TRUE(mounted_as(mnt_, "fuse.blockway"));
  EXPECT_TRUE(test::eventually([&] { return listing(mnt_) == std::set<std::string>{"a"}; }, 5s));
}

// A file kept open across unmount(): the mount is detached at once and the
// session ends after shutdown_timeout. Something mounted at the directory
// meanwhile must stay mounted (libfuse's own unmount would umount2 the path
// once more, as root).
TEST_F(FuseMount, EndingADetachedSessionLeavesWhatIsMountedThereSince) {
  table_.add(memory_export("a", 4096, nullptr));
  start(FuseOptions{.shutdown_timeout = 300ms});
  const int fd = ::open((mnt_ + "/a").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  front_->unmount();
  ASSERT_TRUE(test::eventually([&] { return !mounted_as(mnt_, "fuse.blockway"); }, 5s));
  ASSERT_EQ(::mount("bw-tmpfs", mnt_.c_str(), "tmpfs", 0, "size=1m"), 0) << std::strerror(errno);
  ASSERT_TRUE(test::eventually([&] { return unmounted_.load(); }, 10s));
  EXPECT_TRUE(mounted_as(mnt_, "tmpfs")) << "the session's end unmounted the tmpfs mounted since";
  char c = 0;
  EXPECT_EQ(::pread(fd, &c, 1, 0), -1);  // the session is over
  ::close(fd);
  while (mounted_as(mnt_, "tmpfs") && ::umount2(mnt_.c_str(), MNT_DETACH) == 0) {
  }
}

}  // namespace
}  // namespace blockway::fuse
