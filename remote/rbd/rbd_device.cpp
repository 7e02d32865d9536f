// RbdDevice's data path: requests handed to librbd's asynchronous API and
// their completions, the watchdog that bounds them, sequential read runs,
// block status, resize notifications and reconnect. Opening, locking and
// closing sessions and the cluster's health are in rbd_session.cpp; the
// thread model is in rbd_device.hpp.
#include "remote/rbd/rbd_device.hpp"

#include "core/logging.hpp"
#include "core/task.hpp"
#include "remote/backend.hpp"
#include "remote/common/completion.hpp"

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/intrusive/list.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <vector>

namespace blockway::remote::rbd {
namespace {

std::string errno_text(int negative) { return std::strerror(negative < 0 ? -negative : negative); }

// Largest range one block-status call asks librbd about: it may answer less.
constexpr uint64_t kMaxStatusBytes = 1ull << 30;

}  // namespace

// One request librbd works on. Owned by librbd's completion callback (which
// always frees it, however late); the watchdog only touches it while it is
// linked, under Inflight::mutex.
struct RbdDevice::Request : boost::intrusive::list_base_hook<> {
  std::shared_ptr<Inflight> inflight;
  SessionRef session;  // the session it was submitted on: open while librbd holds the request
  const char* what = "";
  boost::asio::any_io_executor executor;
  std::unique_ptr<common::Completion> done;  // null once the caller has been answered (timed out)
  std::chrono::steady_clock::time_point deadline;
  std::unique_ptr<std::byte[]> bounce;  // a read's data, until it is copied to `dest`
  std::span<std::byte> dest;            // the caller's buffer: only written while `done` is set
  // A sequential run (see the header): a read widened to run_length bytes
  // from run_offset (its own caller's range first), which later readers of a
  // range inside it join while it is in flight, if no write started since
  // (run_epoch). 0: a plain request.
  uint64_t run_offset = 0;
  uint64_t run_length = 0;
  uint64_t run_epoch = 0;
  std::vector<Joined> joined;  // under Inflight::mutex until the request leaves
  // Parts still in librbd (a long read is sent in parts, see the header),
  // and the first failure among them (a negative errno).
  std::atomic<uint64_t> parts{1};
  std::atomic<int> error{0};

  // n parts are done (left librbd, or were never sent), with result r:
  // whether they were the last.
  bool parts_done(uint64_t n, int r) {
    if (r < 0) {
      int none = 0;
      error.compare_exchange_strong(none, r, std::memory_order_acq_rel);
    }
    return parts.fetch_sub(n, std::memory_order_acq_rel) == n;
  }
};

// A reader answered by a run another read started (see Request).
struct RbdDevice::Joined {
  std::span<std::byte> dest;  // the caller's buffer: alive while `done` is set
  uint64_t at = 0;            // where its range starts in the run
  std::unique_ptr<common::Completion> done;
  boost::asio::any_io_executor executor;
};

struct RbdDevice::Inflight {
  std::string spec;  // for logs
  std::mutex mutex;
  std::condition_variable changed;              // the watchdog's: stop
  std::chrono::milliseconds tick{1000};         // how often an idle watchdog looks at the list
  std::condition_variable drained;              // shutdown's: no request left in librbd
  boost::intrusive::list<Request> list;         // not yet answered, oldest (earliest deadline) first
  uint64_t in_librbd = 0;                       // submitted and not yet completed by librbd
  uint64_t abandoned = 0;                       // of those, answered with ETIMEDOUT already
  bool wedged = false;                          // a request passed its deadline since the last reopen
  bool stop = false;
  std::vector<Request*> runs;                   // runs in flight that readers may still join
  struct End {
    uint64_t offset = 0;  // where a recent read ended
    uint32_t streak = 0;  // how many reads in a row ended there, each where the one before ended
  };
  std::array<End, 32> ends{};
  size_t next_end = 0;

  // r left librbd: unlinks it and returns what answers its caller (null if
  // the watchdog did already) and the readers that joined it.
  std::unique_ptr<common::Completion> leave(Request& r, std::vector<Joined>& joined) {
    std::unique_ptr<common::Completion> done;
    {
      std::lock_guard lock(mutex);
      if (r.is_linked()) list.erase(list.iterator_to(r));
      if (r.run_length) drop_run(r);
      done = std::move(r.done);
      joined = std::move(r.joined);
      --in_librbd;
      if (!done) --abandoned;
      if (in_librbd > 0) return done;
    }
    drained.notify_all();
    return done;
  }
  void drop_run(Request& r) {  // under mutex
    if (auto it = std::find(runs.begin(), runs.end(), &r); it != runs.end()) runs.erase(it);
  }
  // Whether a read from `offset` continues a stream of at least two reads,
  // each starting where the one before ended (one adjacent read may be
  // chance); records where this one ends. Under mutex.
  bool sequential(uint64_t offset, uint64_t end) {
    uint32_t streak = 0;
    if (offset != 0) {
      const auto it = std::find_if(ends.begin(), ends.end(), [offset](const End& e) { return e.offset == offset; });
      if (it != ends.end()) streak = it->streak + 1;
    }
    ends[next_end++ % ends.size()] = {end, streak};
    return streak >= 2;
  }
};

RbdDevice::RbdDevice(std::string uri, RbdTarget target, bool read_only, RbdOptions options,
                     boost::asio::thread_pool& blocking)
    : uri_(std::move(uri)), target_(std::move(target)), options_(options), blocking_(blocking),
      inflight_(std::make_shared<Inflight>()) {
  inflight_->spec = target_.spec();
  inflight_->tick = std::clamp<std::chrono::milliseconds>(deadline() / 8, std::chrono::milliseconds(10),
                                                          std::chrono::milliseconds(1000));
  auto session = new_session();
  try {
    open_session(*session, read_only, nullptr);
  } catch (...) {
    session->close_bound = kCloseBound;  // the only reference: closed here
    throw;
  }
  // Runs only where no other client writes the image: a snapshot, or an
  // image whose exclusive lock this gateway holds.
  runs_ = !target_.snap.empty() || session->locked;
  session_.store(std::move(session), std::memory_order_release);
  {
    std::lock_guard lock(watcher_->mutex);
    watcher_->device = this;
  }
  watchdog_ = std::thread([inflight = inflight_] { watch(inflight); });
}

RbdDevice::~RbdDevice() { shutdown(); }


void RbdDevice::stop_watchdog() noexcept {
  {
    std::lock_guard lock(inflight_->mutex);
    inflight_->stop = true;
  }
  inflight_->changed.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

void RbdDevice::shutdown() noexcept {
  // Every caller has been answered by now (the daemon waits for its
  // requests, and the watchdog answers each within its deadline); what may
  // remain are requests librbd still holds after they timed out.
  {
    std::lock_guard lock(watcher_->mutex);  // waits for a resize callback running now
    watcher_->device = nullptr;
  }
  uint64_t left = 0;
  {
    std::unique_lock lock(inflight_->mutex);
    inflight_->drained.wait_for(lock, kCloseBound, [this] { return inflight_->in_librbd == 0; });
    left = inflight_->in_librbd;
  }
  stop_watchdog();
  // Sessions that librbd still holds requests on (this one, or one a reopen
  // replaced) stay open until librbd lets go of them, or until the process
  // exits: closing them would wait for those requests.
  auto session = session_.exchange(nullptr, std::memory_order_acq_rel);
  if (left > 0)
    core::logger("rbd")->warn("{}: {} request(s) still inside librbd after {} s; their image and cluster "
                              "connection stay open until librbd answers them (closing would wait for them)",
                              target_.spec(), left, kCloseBound.count());
  // Nobody can take a new reference now: if ours is the last, the close
  // runs here, bounded; else where the last one goes, without waiting.
  if (session && session.use_count() == 1) session->close_bound = kCloseBound;
  session.reset();
}

core::Geometry RbdDevice::geometry() const noexcept {
  core::Geometry g = geometry_;
  g.size = size_.load(std::memory_order_acquire);
  return g;
}

void RbdDevice::set_resize_handler(ResizeHandler handler) {
  std::lock_guard lock(resize_mutex_);
  resize_handler_ = std::move(handler);
}

void RbdDevice::on_update(void* arg) {
  auto& w = *static_cast<Watcher*>(arg);
  std::lock_guard lock(w.mutex);
  if (!w.device) return;
  // Holds the session while it asks: a reopen may replace it meanwhile.
  if (auto session = w.device->session_.load(std::memory_order_acquire)) w.device->check_size(session->image);
}

void RbdDevice::check_size(rbd_image_t image) {
  auto log = core::logger("rbd");
  uint64_t now = 0;
  if (const int r = rbd_get_size(image, &now); r < 0) {
    log->error("{}: the image changed, but its size cannot be read: {}", target_.spec(), errno_text(r));
    return;
  }
  const uint64_t served = size_.load(std::memory_order_acquire);
  std::lock_guard lock(resize_mutex_);
  std::string problem;
  if (now < served) {
    problem = "the image shrank to " + std::to_string(now) + " bytes while served; the export keeps " +
              std::to_string(served) + " bytes (requests past the image's end fail): grow it back, or remove the "
              "export before shrinking";
  } else if (now > served) {
    const std::string refused =
        resize_handler_ ? resize_handler_(served, now) : std::string("this front end cannot grow an export");
    if (refused.empty()) {
      size_.store(now, std::memory_order_release);
      log->info("{}: the image grew from {} to {} bytes; the export grows (new clients see the new size, connected "
                "NBD clients keep the size they were told)",
                target_.spec(), served, now);
    } else {
      problem = "the image grew to " + std::to_string(now) + " bytes; the export keeps " + std::to_string(served) +
                " bytes: " + refused;
    }
  }
  if (problem == size_problem_) return;
  if (!problem.empty()) log->error("{}: {}", target_.spec(), problem);
  else log->info("{}: the image is {} bytes again, as served", target_.spec(), now);
  size_problem_ = std::move(problem);
}

core::Capabilities RbdDevice::capabilities() const noexcept {
  core::Capabilities c;
  c.read_only = read_only_;
  c.flush = core::Support::native;
  c.fua = core::Support::none;  // CheckedDevice: write, then flush
  c.trim = read_only_ ? core::Support::none : core::Support::native;
  c.zero = read_only_ ? core::Support::none : core::Support::native;
  c.extents = core::Support::native;
  // One image handle serves every connection: a flush covers them all.
  c.multi_conn = true;
  return c;
}

std::string RbdDevice::describe() const { return "rbd:" + target_.spec(); }

void RbdDevice::on_complete(rbd_completion_t c, void* arg) {
  auto* raw = static_cast<Request*>(arg);
  const ssize_t r = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  if (raw->parts_done(1, r < 0 ? static_cast<int>(r) : 0)) finish(std::unique_ptr<Request>(raw));
}

void RbdDevice::finish(std::unique_ptr<Request> req) {
  const int r = req->error.load(std::memory_order_acquire);
  Inflight& in = *req->inflight;
  std::vector<Joined> joined;
  auto done = in.leave(*req, joined);
  if (!done) {
    core::logger("rbd")->info("{}: a {} that timed out came back from librbd ({})", in.spec, req->what,
                              r < 0 ? errno_text(r) : std::string("done"));
    return;
  }
  int err = -r;
  // Fenced because our own reopen took the lock from this session: a lost
  // session (retried on the new one), not another gateway's doing.
  if (err == ESHUTDOWN && req->session->replaced->load(std::memory_order_acquire)) err = ENOTCONN;
  // The callers still wait for this, so their buffers are alive: the
  // request's own, and those of the readers that joined its run (at their
  // place in it).
  if (err == 0 && req->bounce) std::memcpy(req->dest.data(), req->bounce.get(), req->dest.size());
  for (auto& j : joined) {
    if (err == 0) std::memcpy(j.dest.data(), req->bounce.get() + j.at, j.dest.size());
    common::post_completion(j.executor, std::move(j.done), err);
  }
  common::post_completion(req->executor, std::move(done), err);
}

void RbdDevice::watch(const std::shared_ptr<Inflight>& inflight) {
  Inflight& in = *inflight;
  std::unique_lock lock(in.mutex);
  while (!in.stop) {
    if (in.list.empty()) {
      // Not woken per request (a futex wake and a context switch per read
      // when the list runs empty often): a request linked now is looked at
      // within a tick, well inside its deadline.
      in.changed.wait_for(lock, in.tick);
      continue;
    }
    Request& oldest = in.list.front();
    // A copy: wait_until reads its time point after the wait, when on_complete
    // may have freed `oldest`.
    const auto deadline = oldest.deadline;
    if (std::chrono::steady_clock::now() < deadline) {
      in.changed.wait_until(lock, deadline);
      continue;
    }
    in.list.pop_front();
    ++in.abandoned;
    in.wedged = true;
    const char* what = oldest.what;
    const uint64_t abandoned = in.abandoned;
    common::post_completion(oldest.executor, std::move(oldest.done), ETIMEDOUT);
    if (oldest.run_length) {
      in.drop_run(oldest);
      for (auto& j : oldest.joined) common::post_completion(j.executor, std::move(j.done), ETIMEDOUT);
      oldest.joined.clear();
    }
    lock.unlock();
    core::logger("rbd")->warn("{}: a {} got no answer from librbd by its deadline; failed with ETIMEDOUT and left "
                              "to librbd ({} such request(s) still inside it)",
                              in.spec, what, abandoned);
    lock.lock();
  }
}

template <class Start>
core::Task<std::error_code> RbdDevice::submit(const char* what, Start start, std::span<std::byte> read_into,
                                              uint64_t read_offset) {
  co_return co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
      [this, what, &start, read_into, read_offset](auto handler) {
        auto req = std::make_unique<Request>();
        req->inflight = inflight_;
        req->what = what;
        req->executor = boost::asio::get_associated_executor(handler);
        req->done = std::make_unique<common::CompletionOf<decltype(handler)>>(std::move(handler));
        Inflight& in = *inflight_;
        req->session = session_.load(std::memory_order_acquire);
        if (!req->session) {  // after shutdown
          auto ex = req->executor;
          common::post_completion(ex, std::move(req->done), ENOTCONN);
          return;
        }
        uint64_t length = read_into.size();
        {
          const uint64_t epoch = write_epoch_.load();
          std::lock_guard lock(in.mutex);
          if (!read_into.empty()) {
            // Join a run in flight that covers this read, or start one if
            // this read continues an earlier one (see the header).
            const uint64_t end = read_offset + length;
            const bool seq = in.sequential(read_offset, end);
            for (Request* run : in.runs) {
              if (run->run_epoch == epoch && read_offset >= run->run_offset &&
                  end <= run->run_offset + run->run_length) {
                run->joined.push_back(
                    {read_into, read_offset - run->run_offset, std::move(req->done), req->executor});
                return;
              }
            }
            if (seq && runs_ && length < kRunBytes && writes_in_flight_.load() == 0) {
              const uint64_t run_end =
                  std::min(read_offset / kRunBytes * kRunBytes + kRunBytes, size_.load(std::memory_order_acquire));
              if (run_end > end) {
                req->run_offset = read_offset;
                req->run_length = length = run_end - read_offset;
                req->run_epoch = epoch;
              }
            }
          }
          req->deadline = std::chrono::steady_clock::now() + deadline();
          in.list.push_back(*req);
          ++in.in_librbd;
          if (req->run_length) in.runs.push_back(req.get());
        }
        // Linked: the watchdog may answer it from here on; joiners only add
        // themselves to it.
        if (!read_into.empty()) {
          req->bounce = std::make_unique_for_overwrite<std::byte[]>(length);
          req->dest = read_into;
        }
        char* target = reinterpret_cast<char*>(req->bounce.get());
        rbd_image_t image = req->session->image;
        // A long read in 2 MiB-aligned parts (see the header); anything
        // else in one.
        uint64_t count = 1;
        if (length > kPartBytes)
          count = (read_offset + length - 1) / kPartBytes - read_offset / kPartBytes + 1;
        req->parts.store(count, std::memory_order_relaxed);
        Request* raw = req.release();  // on_complete owns it from here, or we do again below
        uint64_t sent = 0;
        int r = 0;
        for (uint64_t at = read_offset, end = read_offset + length; sent < count; ++sent) {
          const uint64_t part = count == 1 ? length : std::min(end, at / kPartBytes * kPartBytes + kPartBytes) - at;
          rbd_completion_t c = nullptr;
          r = rbd_aio_create_completion(raw, &RbdDevice::on_complete, &c);
          if (r < 0) break;
          r = start(image, c, target + (at - read_offset), at, part);
          if (r < 0) {
            rbd_aio_release(c);
            break;
          }
          at += part;
        }
        if (sent == count) return;
        // Refused at once: librbd will not call on_complete for the parts
        // not sent; the last part back answers, which may be here.
        if (raw->parts_done(count - sent, r)) finish(std::unique_ptr<Request>(raw));
      },
      boost::asio::use_awaitable);
}

std::error_code RbdDevice::note(std::error_code ec, const char* what) {
  if (!ec) {
    connected_.store(true, std::memory_order_relaxed);
    return ec;
  }
  if (ec.value() == ESHUTDOWN) {
    // EBLOCKLISTED: another client broke our lock and the cluster fenced us.
    core::logger("rbd")->error("{}: {} failed: this client was blocklisted by the cluster (another gateway took "
                               "the image's lock?); the export fails with EIO",
                               target_.spec(), what);
    connected_.store(false, std::memory_order_relaxed);
    return core::errno_code(EIO);
  }
  if (core::is_connection_error(ec)) {
    connected_.store(false, std::memory_order_relaxed);
    core::logger("rbd")->debug("{}: {} failed: {}", target_.spec(), what, ec.message());
  }
  return ec;
}

core::Task<std::error_code> RbdDevice::read(std::span<std::byte> buf, uint64_t offset, core::IoFlags) {
  const auto ec = co_await submit(
      "read",
      [](rbd_image_t img, rbd_completion_t c, char* into, uint64_t at, uint64_t length) {
        return rbd_aio_read(img, at, length, into, c);
      },
      buf, offset);
  co_return note(ec, "read");
}

core::Task<std::error_code> RbdDevice::write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags) {
  if (read_only_) co_return core::errno_code(EROFS);
  // librbd copies the data at submission (rbd_disable_zero_copy_writes), so
  // a write abandoned at its deadline never reads the caller's buffer later.
  const WriteMark mark(*this);
  const auto ec = co_await submit("write", [&](rbd_image_t img, rbd_completion_t c, char*, uint64_t, uint64_t) {
    return rbd_aio_write(img, offset, buf.size(), reinterpret_cast<const char*>(buf.data()), c);
  });
  co_return note(ec, "write");
}

core::Task<std::error_code> RbdDevice::flush() {
  const auto ec = co_await submit("flush", [](rbd_image_t img, rbd_completion_t c, char*, uint64_t, uint64_t) {
    return rbd_aio_flush(img, c);
  });
  co_return note(ec, "flush");
}

core::Task<std::error_code> RbdDevice::trim(core::ByteRange range, core::IoFlags) {
  if (read_only_) co_return core::errno_code(EROFS);
  const WriteMark mark(*this);
  const auto ec = co_await submit("discard", [&](rbd_image_t img, rbd_completion_t c, char*, uint64_t, uint64_t) {
    return rbd_aio_discard(img, range.offset, range.length, c);
  });
  co_return note(ec, "discard");
}

core::Task<std::error_code> RbdDevice::zero(core::ByteRange range, core::IoFlags flags) {
  if (read_only_) co_return core::errno_code(EROFS);
  // librbd zeroes by discarding whole objects and writing zeroes at the
  // edges: always fast; NO_HOLE asks it to keep the range allocated.
  const int zero_flags = (flags & core::kNoHole) ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0;
  const WriteMark mark(*this);
  const auto ec = co_await submit("write-zeroes", [&](rbd_image_t img, rbd_completion_t c, char*, uint64_t, uint64_t) {
    return rbd_aio_write_zeroes(img, range.offset, range.length, c, zero_flags, 0);
  });
  co_return note(ec, "write-zeroes");
}

core::Task<std::error_code> RbdDevice::block_status(core::ByteRange range, core::ExtentList& out) {
  const uint64_t len = std::min(range.length, kMaxStatusBytes);
  struct Found {
    uint64_t offset;
    uint64_t length;
  };
  // The session is held until librbd answers (a reopen may replace it).
  // Built first, then awaited: GCC 12 destroys a lambda's captures in a
  // co_await'ed call twice.
  auto diff = [session = session_.load(std::memory_order_acquire), fast_diff = fast_diff_, off = range.offset, len] {
    std::pair<int, std::vector<Found>> res;
    if (!session) {
      res.first = -ENOTCONN;
      return res;
    }
    auto cb = [](uint64_t o, size_t l, int exists, void* arg) -> int {
      if (exists) static_cast<std::vector<Found>*>(arg)->push_back({o, l});
      return 0;
    };
    res.first = rbd_diff_iterate2(session->image, nullptr, off, len, 1, fast_diff ? 1 : 0, cb, &res.second);
    return res;
  };
  auto result = co_await core::offload(blocking_, diff);
  if (result.first < 0) co_return note(core::errno_code(-result.first), "block status");
  auto& found = result.second;
  std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) { return a.offset < b.offset; });
  uint64_t pos = range.offset;
  const uint64_t end = range.offset + len;
  auto add = [&out](uint64_t length, uint32_t flags) {
    if (length == 0) return;
    if (!out.empty() && out.back().flags == flags) {
      out.back().length += length;
    } else {
      out.push_back({length, flags});
    }
  };
  for (const auto& f : found) {
    const uint64_t b = std::max(f.offset, pos);
    const uint64_t e = std::min(f.offset + f.length, end);
    if (e <= b) continue;
    add(b - pos, core::kExtentHole | core::kExtentZero);
    add(e - b, 0);
    pos = e;
  }
  add(end - pos, core::kExtentHole | core::kExtentZero);
  co_return note({}, "block status");
}

core::Task<std::error_code> RbdDevice::reconnect() {
  // librbd keeps its own sessions to mons and OSDs and resends on its own;
  // what is left is to wait, bounded, until the mons answer again. But once
  // a request passed its deadline librbd may not answer this image again
  // (seen after an OSD op timeout: every later request waited), so then the
  // session is replaced by a fresh connection and image handle.
  bool wedged = false;
  {
    std::lock_guard lock(inflight_->mutex);
    wedged = std::exchange(inflight_->wedged, false);
  }
  int r = 0;
  if (wedged) {
    core::logger("rbd")->warn("{}: librbd left a request unanswered past its deadline; reopening the image on a "
                              "new cluster connection",
                              target_.spec());
    r = co_await core::offload(blocking_, [this] { return reopen(); });
    if (r < 0) {
      std::lock_guard lock(inflight_->mutex);
      inflight_->wedged = true;  // try again next time
    }
  } else {
    // Only `this` captured: GCC 12 destroys a lambda's captures in a
    // co_await'ed call twice (a shared_ptr captured here was released twice).
    r = co_await core::offload(blocking_, [this] {
      std::shared_ptr<Cluster> cluster;
      if (auto session = session_.load(std::memory_order_acquire)) cluster = session->cluster;
      return cluster ? cluster->ask_health() : -ENOTCONN;
    });
  }
  if (r < 0) co_return core::errno_code(-r == ETIMEDOUT ? ETIMEDOUT : ENOTCONN);
  generation_.fetch_add(1, std::memory_order_relaxed);
  connected_.store(true, std::memory_order_relaxed);
  co_return std::error_code{};
}

}  // namespace blockway::remote::rbd
