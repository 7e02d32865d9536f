// FdWatcher::kick_soon(): commands queued in one loop turn are serviced with
// one call, after the handlers already queued ran, never from inside
// kick_soon() itself. A real socket pair stands in for the library's fd.
#include "remote/common/fd_watcher.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <gtest/gtest.h>

#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <vector>

namespace blockway::remote::common {
namespace {

// A "library" with `queued` commands to send: wants POLLOUT while any are
// queued and sends them all on one service call.
struct FakeLibrary : FdWatcher::Client {
  int fd = -1;
  int queued = 0;
  std::vector<int> sent_per_call;  // how many each service(POLLOUT) sent
  int watched_fd() override { return fd; }
  short wanted_events() override { return queued > 0 ? POLLOUT : 0; }
  void service(short revents) override {
    if (revents & POLLOUT) {
      sent_per_call.push_back(queued);
      queued = 0;
    }
  }
};

class FdWatcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds_), 0);
    lib_ = std::make_shared<FakeLibrary>();
    lib_->fd = fds_[0];
    watcher_ = FdWatcher::create(io_.get_executor(), lib_);
  }
  void TearDown() override {
    watcher_->detach();
    io_.run();
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  boost::asio::io_context io_;
  int fds_[2] = {-1, -1};
  std::shared_ptr<FakeLibrary> lib_;
  std::shared_ptr<FdWatcher> watcher_;
};

TEST_F(FdWatcherTest, KickSoonServicesOneTurnsCommandsWithOneCall) {
  // Three "requests" handled in one turn, each queueing a command and kicking.
  for (int i = 0; i < 3; ++i)
    boost::asio::post(io_, [this] {
      ++lib_->queued;
      watcher_->kick_soon();
      EXPECT_TRUE(lib_->sent_per_call.empty());  // not from inside kick_soon()
    });
  io_.poll();
  io_.restart();  // poll() ran out of work: the context counts as stopped
  EXPECT_EQ(lib_->sent_per_call, (std::vector<int>{3}));

  // A later turn gets its own call.
  boost::asio::post(io_, [this] {
    ++lib_->queued;
    watcher_->kick_soon();
  });
  io_.poll();
  EXPECT_EQ(lib_->sent_per_call, (std::vector<int>{3, 1}));
}

TEST_F(FdWatcherTest, KickServicesAtOnceEachTime) {
  // The plain kick() for comparison: one call per command.
  for (int i = 0; i < 3; ++i) {
    ++lib_->queued;
    watcher_->kick();
  }
  EXPECT_EQ(lib_->sent_per_call, (std::vector<int>{1, 1, 1}));
}

TEST_F(FdWatcherTest, KickSoonAfterDetachDoesNothing) {
  ++lib_->queued;
  watcher_->kick_soon();
  watcher_->detach();
  io_.poll();
  EXPECT_TRUE(lib_->sent_per_call.empty());
}

}  // namespace
}  // namespace blockway::remote::common
