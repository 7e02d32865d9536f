#include "remote/common/fd_watcher.hpp"

#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>

namespace blockway::remote::common {

std::shared_ptr<FdWatcher> FdWatcher::create(const boost::asio::any_io_executor& ex,
                                             std::weak_ptr<Client> client) {
  return std::make_shared<FdWatcher>(Private{}, ex, std::move(client));
}

FdWatcher::FdWatcher(Private, const boost::asio::any_io_executor& ex, std::weak_ptr<Client> client)
    : sd_(ex), client_(std::move(client)) {}

FdWatcher::~FdWatcher() {
  // Never close the library's fd.
  if (sd_.is_open()) (void)sd_.release();
}

void FdWatcher::stop() {
  ++epoch_;
  read_pending_ = false;
  write_pending_ = false;
  // release() cancels the pending waits (their handlers see a stale epoch)
  // and takes the fd out of the reactor without closing it.
  if (sd_.is_open()) (void)sd_.release();
  fd_ = -1;
}

void FdWatcher::detach() {
  stop();
  client_.reset();
}

void FdWatcher::kick_soon() {
  if (kick_posted_) return;
  kick_posted_ = true;
  // Not tied to an epoch: after a stop() in between, arm() starts again on
  // the client's current fd, as kick() would; after detach() it does nothing.
  boost::asio::post(sd_.get_executor(), [self = shared_from_this()] {
    self->kick_posted_ = false;
    self->arm();
  });
}

void FdWatcher::arm() {
  // Asio waits are edge-triggered (epoll EPOLLET, no speculative check for
  // async_wait), while these libraries expect level-triggered poll(): libnbd
  // reads exactly one reply per notification and may leave more in the
  // socket, and an edge that arrived while no wait was queued is gone. So
  // before queueing a wait, ask poll() with a zero timeout whether the fd is
  // already ready, and service it at once if so. Bounded, then yield.
  //
  // Writes are the exception, once per arm(): a library that wants POLLOUT
  // has bytes queued (a command just submitted) and the socket almost always
  // has room, so it is serviced straight away instead of after a poll() that
  // says so: one syscall less per command. That is safe because a send that
  // finds the socket full gets EAGAIN and the library keeps the rest queued
  // (libnbd, libiscsi, libnfs all do; the connections are established before
  // they are watched, so POLLOUT never means "connect finished" here). The
  // next round polls as before and queues a wait if it is still full.
  bool wrote_blind = false;
  for (int round = 0; round < 64; ++round) {
    auto client = client_.lock();
    if (!client) return;
    const int fd = client->watched_fd();
    if (fd != fd_) {
      stop();
      if (fd < 0) return;
      boost::system::error_code ec;
      sd_.assign(fd, ec);
      if (ec) {
        client->service(POLLERR);  // cannot watch it: let the library find out
        return;
      }
      fd_ = fd;
    }
    if (fd_ < 0) return;
    const short wanted = client->wanted_events();
    short check = 0;
    if ((wanted & POLLIN) && !read_pending_) check |= POLLIN;
    if ((wanted & POLLOUT) && !write_pending_) check |= POLLOUT;
    if (check == 0) return;
    if ((check & POLLOUT) && !wrote_blind) {
      wrote_blind = true;
      client->service(POLLOUT);
      continue;
    }
    pollfd p{fd_, check, 0};
    if (::poll(&p, 1, 0) > 0 && p.revents != 0) {
      const bool readable = (check & POLLIN) && (p.revents & (POLLIN | POLLHUP | POLLERR));
      client->service(readable ? POLLIN : POLLOUT);  // errors surface through recv/send
      continue;
    }
    const unsigned epoch = epoch_;
    if (check & POLLIN) {
      read_pending_ = true;
      sd_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                     [self = shared_from_this(), epoch](const boost::system::error_code& ec) {
                       if (epoch == self->epoch_) self->on_ready(false, ec);
                     });
    }
    if (check & POLLOUT) {
      write_pending_ = true;
      sd_.async_wait(boost::asio::posix::stream_descriptor::wait_write,
                     [self = shared_from_this(), epoch](const boost::system::error_code& ec) {
                       if (epoch == self->epoch_) self->on_ready(true, ec);
                     });
    }
    return;
  }
  // Still busy after many rounds: let other work on this loop run first.
  boost::asio::post(sd_.get_executor(), [self = shared_from_this(), epoch = epoch_] {
    if (epoch == self->epoch_) self->arm();
  });
}

void FdWatcher::on_ready(bool write, const boost::system::error_code& ec) {
  (write ? write_pending_ : read_pending_) = false;
  if (ec == boost::asio::error::operation_aborted) return;
  if (ec) {
    if (auto client = client_.lock()) client->service(POLLERR);
  }
  // No service straight from the edge: it may be stale (the data it announced
  // was already consumed after a level check). A spurious notify_read is not
  // harmless in libnbd: in the middle of sending a write payload it pauses
  // the payload to read a reply that is not coming, and both ends wait for
  // each other. arm() services only what poll() reports ready right now.
  arm();
}

}  // namespace blockway::remote::common
