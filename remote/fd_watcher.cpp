#include "remote/fd_watcher.hpp"

#include <boost/asio/error.hpp>

namespace blockway::remote {

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

void FdWatcher::arm() {
  auto client = client_.lock();
  if (!client) return;
  const int fd = client->watched_fd();
  if (fd != fd_) {
    stop();
    if (fd < 0) return;
    boost::system::error_code ec;
    sd_.assign(fd, ec);
    if (ec) {
      // Cannot watch this fd: let the library find out on its own.
      client->service(POLLERR);
      return;
    }
    fd_ = fd;
  }
  if (fd_ < 0) return;
  const short wanted = client->wanted_events();
  const unsigned epoch = epoch_;
  if ((wanted & POLLIN) && !read_pending_) {
    read_pending_ = true;
    sd_.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                   [self = shared_from_this(), epoch](const boost::system::error_code& ec) {
                     if (epoch == self->epoch_) self->on_ready(false, ec);
                   });
  }
  if ((wanted & POLLOUT) && !write_pending_) {
    write_pending_ = true;
    sd_.async_wait(boost::asio::posix::stream_descriptor::wait_write,
                   [self = shared_from_this(), epoch](const boost::system::error_code& ec) {
                     if (epoch == self->epoch_) self->on_ready(true, ec);
                   });
  }
}

void FdWatcher::on_ready(bool write, const boost::system::error_code& ec) {
  (write ? write_pending_ : read_pending_) = false;
  if (ec == boost::asio::error::operation_aborted) return;
  auto client = client_.lock();
  if (!client) return;
  const short event = write ? POLLOUT : POLLIN;
  if (ec) {
    client->service(POLLERR);
  } else if (client->wanted_events() & event) {
    // The library may have changed its mind since the wait was armed (a
    // write wait fires late after the queue drained): only service what it
    // still wants.
    client->service(event);
  }
  arm();
}

}  // namespace blockway::remote
