#include "cache/direct_writer.hpp"

#include "core/block_device.hpp"
#include "core/shared_event.hpp"

#include <fcntl.h>
#include <linux/aio_abi.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace blockway::cache {
namespace {

// At most this many writes in flight; past it write() says EAGAIN (the
// caller writes through the page cache instead).
constexpr size_t kMaxInFlight = 256;

long io_setup(unsigned n, aio_context_t* ctx) { return ::syscall(SYS_io_setup, n, ctx); }
long io_destroy(aio_context_t ctx) { return ::syscall(SYS_io_destroy, ctx); }
long io_submit(aio_context_t ctx, long n, iocb** cbs) { return ::syscall(SYS_io_submit, ctx, n, cbs); }
long io_getevents(aio_context_t ctx, long min_nr, long nr, io_event* events, timespec* timeout) {
  return ::syscall(SYS_io_getevents, ctx, min_nr, nr, events, timeout);
}

struct Op {
  iocb cb{};
  size_t len = 0;
  core::SharedEvent done;
};

}  // namespace

struct DirectWriter::State {
  int fd = -1;
  aio_context_t ctx = 0;
  int completions = -1;  // eventfd the kernel counts completions on (IOCB_FLAG_RESFD)
  int stopping = -1;     // eventfd stop_reaper() wakes the reaper with
  std::mutex mutex;
  std::unordered_map<Op*, std::shared_ptr<Op>> inflight;
  std::atomic<bool> stop{false};
  std::thread reaper;

  // Takes the completions io_getevents returns (waiting up to `wait`, for
  // at least min_nr) and either sets their events or, if `drop`, frees them
  // unset. Returns how many it took.
  long reap(long min_nr, std::chrono::milliseconds wait, bool drop) {
    io_event ev[64];
    timespec ts{static_cast<time_t>(wait.count() / 1000), static_cast<long>(wait.count() % 1000) * 1000000};
    const long n = io_getevents(ctx, min_nr, 64, ev, &ts);
    if (n <= 0) return 0;
    for (long i = 0; i < n; ++i) {
      std::shared_ptr<Op> op;
      {
        std::lock_guard lock(mutex);
        auto it = inflight.find(reinterpret_cast<Op*>(static_cast<uintptr_t>(ev[i].data)));
        if (it == inflight.end()) continue;
        op = std::move(it->second);
        inflight.erase(it);
      }
      if (drop) continue;  // freed here, out of the lock: its waiters with it
      const std::error_code ec = ev[i].res < 0 ? core::errno_code(static_cast<int>(-ev[i].res))
                                 : static_cast<size_t>(ev[i].res) != op->len ? core::errno_code(EIO)
                                                                             : std::error_code{};
      op->done.set(ec);
    }
    return n;
  }
  size_t in_flight() {
    std::lock_guard lock(mutex);
    return inflight.size();
  }
  // Waits up to 10 s for every write in flight to end (setting or dropping).
  void drain(bool drop) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (in_flight() > 0 && std::chrono::steady_clock::now() < until) reap(1, std::chrono::milliseconds(100), drop);
  }
  // Sleeps until the kernel completes a write or stop_reaper() says stop:
  // an idle cache costs no wake-ups.
  void reap_until_stopped() {
    while (!stop.load(std::memory_order_relaxed)) {
      pollfd p[2] = {{completions, POLLIN, 0}, {stopping, POLLIN, 0}};
      if (::poll(p, 2, -1) < 0) continue;  // EINTR
      if (p[1].revents != 0) break;
      uint64_t count = 0;
      [[maybe_unused]] const ssize_t r = ::read(completions, &count, sizeof count);
      while (reap(0, std::chrono::milliseconds(0), false) > 0) {
      }
    }
  }
  void stop_reaper() {
    stop.store(true);
    const uint64_t one = 1;
    if (stopping >= 0) {
      [[maybe_unused]] const ssize_t r = ::write(stopping, &one, sizeof one);
    }
    if (reaper.joinable()) reaper.join();
  }
  ~State() {
    stop_reaper();
    drain(false);
    if (ctx) io_destroy(ctx);  // waits for (or cancels) anything still in flight
    if (fd >= 0) ::close(fd);
    if (completions >= 0) ::close(completions);
    if (stopping >= 0) ::close(stopping);
    std::lock_guard lock(mutex);
    inflight.clear();
  }
};

std::unique_ptr<DirectWriter> DirectWriter::open(const std::string& path, std::string& why) {
  auto st = std::make_shared<State>();
  st->fd = ::open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
  if (st->fd < 0) {
    why = std::string("O_DIRECT: ") + std::strerror(errno);
    return nullptr;
  }
  if (io_setup(kMaxInFlight, &st->ctx) != 0) {
    why = std::string("io_setup: ") + std::strerror(errno);
    st->ctx = 0;
    return nullptr;
  }
  st->completions = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  st->stopping = ::eventfd(0, EFD_CLOEXEC);
  if (st->completions < 0 || st->stopping < 0) {
    why = std::string("eventfd: ") + std::strerror(errno);
    return nullptr;
  }
  st->reaper = std::thread([s = st.get()] { s->reap_until_stopped(); });
  return std::unique_ptr<DirectWriter>(new DirectWriter(std::move(st)));
}

DirectWriter::~DirectWriter() = default;

core::Task<std::error_code> DirectWriter::write(std::span<const std::byte> bytes, uint64_t offset) {
  auto op = std::make_shared<Op>();
  op->len = bytes.size();
  op->cb.aio_data = reinterpret_cast<uintptr_t>(op.get());
  op->cb.aio_lio_opcode = IOCB_CMD_PWRITE;
  op->cb.aio_fildes = static_cast<uint32_t>(st_->fd);
  op->cb.aio_buf = reinterpret_cast<uintptr_t>(bytes.data());
  op->cb.aio_nbytes = bytes.size();
  op->cb.aio_offset = static_cast<int64_t>(offset);
  op->cb.aio_flags = IOCB_FLAG_RESFD;
  op->cb.aio_resfd = static_cast<uint32_t>(st_->completions);
  {
    std::lock_guard lock(st_->mutex);
    if (st_->inflight.size() >= kMaxInFlight) co_return core::errno_code(EAGAIN);
    st_->inflight.emplace(op.get(), op);
  }
  iocb* list[1] = {&op->cb};
  if (const long r = io_submit(st_->ctx, 1, list); r != 1) {
    const int e = r < 0 ? errno : EAGAIN;
    std::lock_guard lock(st_->mutex);
    st_->inflight.erase(op.get());
    co_return core::errno_code(e);
  }
  // Not owning the write while waiting: an abandon() frees it, and this
  // frame with it (see SharedEvent::wait_unowned).
  core::SharedEvent* done = &op->done;
  auto waiting = core::SharedEvent::wait_unowned(std::shared_ptr<core::SharedEvent>(std::move(op), done));
  co_return co_await std::move(waiting);
}

void DirectWriter::abandon() noexcept {
  st_->stop_reaper();
  st_->drain(true);
}

}  // namespace blockway::cache
