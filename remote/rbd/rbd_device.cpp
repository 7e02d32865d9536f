#include "remote/rbd/rbd_device.hpp"

#include "core/logging.hpp"
#include "core/task.hpp"
#include "remote/backend.hpp"
#include "remote/common/completion.hpp"

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/post.hpp>
#include <rbd/features.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

namespace blockway::remote::rbd {
namespace {

std::string errno_text(int negative) { return std::strerror(negative < 0 ? -negative : negative); }

// Largest range one block-status call asks librbd about: it may answer less.
constexpr uint64_t kMaxStatusBytes = 1ull << 30;

}  // namespace

struct RbdDevice::Request {
  boost::asio::any_io_executor executor;
  std::unique_ptr<common::Completion> done;
};

RbdDevice::RbdDevice(std::string uri, RbdTarget target, bool read_only, RbdOptions options,
                     boost::asio::thread_pool& blocking)
    : uri_(std::move(uri)), target_(std::move(target)), options_(options), blocking_(blocking) {
  try {
    connect_and_open(read_only);
  } catch (...) {
    shutdown();
    throw;
  }
}

RbdDevice::~RbdDevice() { shutdown(); }

RbdDevice::Cluster::~Cluster() {
  if (handle) rados_shutdown(handle);
}

void RbdDevice::shutdown() noexcept {
  if (image_) {
    if (locked_) (void)rbd_lock_release(image_);
    (void)rbd_close(image_);
    image_ = nullptr;
  }
  if (ioctx_) {
    rados_ioctx_destroy(ioctx_);
    ioctx_ = nullptr;
  }
  cluster_.reset();  // shut down now, or by the health refresh in flight
}

void RbdDevice::connect_and_open(bool read_only) {
  const std::string where = "RBD image '" + target_.spec() + "' (" + uri_ + ")";
  auto fail = [&where](const std::string& what) { throw BackendError(where + ": " + what); };
  const std::string user = "client." + target_.id;
  cluster_->spec = target_.spec();
  int r = rados_create2(&cluster_->handle, "ceph", user.c_str(), 0);
  if (r < 0) fail("cannot create a RADOS client for " + user + ": " + errno_text(r));
  if (!target_.conf.empty()) {
    r = rados_conf_read_file(cluster_->handle, target_.conf.c_str());
    if (r < 0) fail("cannot read the Ceph configuration " + target_.conf + ": " + errno_text(r));
  } else {
    r = rados_conf_read_file(cluster_->handle, nullptr);
    if (r < 0) fail("no Ceph configuration found (/etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf); name one "
                    "with ?conf=PATH");
  }
  if (!target_.keyring.empty()) {
    if (::access(target_.keyring.c_str(), R_OK) != 0)
      fail("cannot read the keyring " + target_.keyring + ": " + errno_text(errno));
    r = rados_conf_set(cluster_->handle, "keyring", target_.keyring.c_str());
    if (r < 0) fail("keyring " + target_.keyring + ": " + errno_text(r));
  }
  // Every wait on the cluster is bounded by io-timeout (see the header).
  const std::string seconds = std::to_string(std::max<int64_t>(1, (options_.io_timeout.count() + 999) / 1000));
  for (const char* name : {"rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"}) {
    r = rados_conf_set(cluster_->handle, name, seconds.c_str());
    if (r < 0) fail(std::string("cannot set ") + name + ": " + errno_text(r));
  }
  (void)rados_conf_set(cluster_->handle, "rbd_cache", "false");
  r = rados_connect(cluster_->handle);
  if (r < 0) {
    if (r == -EACCES || r == -EPERM || r == -EKEYREJECTED)
      fail("the cluster refused " + user + "'s key (" + errno_text(r) + "): check the keyring");
    if (r == -ENOENT)
      fail("no key for " + user + " (" + errno_text(r) + "): name the keyring with ?keyring=PATH");
    if (r == -ETIMEDOUT)
      fail("no answer from the mons within " + seconds + " s (io-timeout): is the cluster up, is mon host right?");
    fail("cannot connect to the cluster as " + user + ": " + errno_text(r));
  }
  r = rados_ioctx_create(cluster_->handle, target_.pool.c_str(), &ioctx_);
  if (r < 0) {
    ioctx_ = nullptr;
    if (r == -ENOENT) fail("the pool '" + target_.pool + "' does not exist");
    fail("cannot open the pool '" + target_.pool + "': " + errno_text(r));
  }
  rados_ioctx_set_namespace(ioctx_, target_.ns.empty() ? nullptr : target_.ns.c_str());
  const char* snap = target_.snap.empty() ? nullptr : target_.snap.c_str();
  read_only_ = read_only || snap != nullptr;
  r = read_only_ ? rbd_open_read_only(ioctx_, target_.image.c_str(), &image_, snap)
                 : rbd_open(ioctx_, target_.image.c_str(), &image_, nullptr);
  if (r == -EPERM && !read_only_) {
    // A key that may only read: serve the image read-only rather than refuse.
    r = rbd_open_read_only(ioctx_, target_.image.c_str(), &image_, nullptr);
    if (r >= 0) {
      read_only_ = true;
      core::logger("rbd")->warn("{}: {} may not write to the image; serving it read-only", target_.spec(), user);
    }
  }
  if (r < 0) {
    image_ = nullptr;
    if (r == -ENOENT && snap) fail("the image or its snapshot '" + target_.snap + "' does not exist");
    if (r == -ENOENT)
      fail("there is no image '" + target_.image + "' in pool '" + target_.pool + "'" +
           (target_.ns.empty() ? std::string() : " namespace '" + target_.ns + "'"));
    if (r == -EPERM || r == -EACCES) fail(user + " may not open the image (" + errno_text(r) + "): check its caps");
    fail("cannot open the image: " + errno_text(r));
  }

  uint64_t size = 0;
  rbd_image_info_t info{};
  if ((r = rbd_stat(image_, &info, sizeof info)) < 0) fail("cannot stat the image: " + errno_text(r));
  size = info.size;
  uint64_t features = 0;
  (void)rbd_get_features(image_, &features);
  uint64_t flags = 0;
  (void)rbd_get_flags(image_, &flags);
  fast_diff_ = (features & RBD_FEATURE_FAST_DIFF) && !(flags & RBD_FLAG_FAST_DIFF_INVALID);
  geometry_.size = size;
  geometry_.min_block = 1;
  // The object size as the preferred block: a whole object per request is
  // what RADOS serves best (and what the prefetch should read).
  geometry_.preferred_block =
      static_cast<uint32_t>(std::clamp<uint64_t>(info.obj_size, 4096, core::kDefaultMaxTransfer));
  geometry_.max_transfer = core::kDefaultMaxTransfer;

  if (!read_only_ && target_.lock != LockMode::off) {
    if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK))
      fail("the image lacks the exclusive-lock feature, so a second writer cannot be kept out; enable it (rbd "
           "feature enable " + target_.spec() + " exclusive-lock) or add exclusive=off to the URI");
    take_lock();
  }
  (void)cluster_->ask_health();  // for status from the start (bounded by io-timeout)
  core::logger("rbd")->info("{}: opened as {}, {} bytes, object size {}{}{}", target_.spec(), user, size,
                            info.obj_size, read_only_ ? ", read-only" : "", locked_ ? ", exclusive lock held" : "");
}

void RbdDevice::take_lock() {
  const std::string where = "RBD image '" + target_.spec() + "' (" + uri_ + ")";
  auto owners = [this] {
    rbd_lock_mode_t mode{};
    std::vector<char*> list(16);
    size_t count = list.size();
    std::vector<std::string> out;
    if (rbd_lock_get_owners(image_, &mode, list.data(), &count) == 0) {
      for (size_t i = 0; i < count; ++i) out.emplace_back(list[i]);
      rbd_lock_get_owners_cleanup(list.data(), count);
    }
    return out;
  };
  if (target_.lock == LockMode::take_over) {
    for (const auto& owner : owners()) {
      core::logger("rbd")->warn("{}: breaking the exclusive lock of {} (exclusive=break)", target_.spec(), owner);
      const int r = rbd_lock_break(image_, RBD_LOCK_MODE_EXCLUSIVE, owner.c_str());
      if (r < 0 && r != -ENOENT)
        throw BackendError(where + ": cannot break the lock of " + owner + ": " + errno_text(r));
    }
  }
  const int r = rbd_lock_acquire(image_, RBD_LOCK_MODE_EXCLUSIVE);
  if (r < 0) {
    std::string holders;
    for (const auto& o : owners()) holders += (holders.empty() ? "" : ", ") + o;
    throw BackendError(where + ": cannot take the exclusive lock (" + errno_text(r) + ")" +
                       (holders.empty() ? std::string() : "; it is held by " + holders) +
                       ": another gateway or client writes this image; stop it, or add exclusive=break to "
                       "the URI to take the lock from it");
  }
  locked_ = true;
}

core::Geometry RbdDevice::geometry() const noexcept { return geometry_; }

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
  std::unique_ptr<Request> req(static_cast<Request*>(arg));
  const ssize_t r = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  common::post_completion(req->executor, std::move(req->done), r < 0 ? static_cast<int>(-r) : 0);
}

template <class Start>
core::Task<std::error_code> RbdDevice::submit(Start start) {
  co_return co_await boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void(std::error_code)>(
      [this, &start](auto handler) {
        auto req = std::make_unique<Request>();
        req->executor = boost::asio::get_associated_executor(handler);
        req->done = std::make_unique<common::CompletionOf<decltype(handler)>>(std::move(handler));
        rbd_completion_t c = nullptr;
        int r = rbd_aio_create_completion(req.get(), &RbdDevice::on_complete, &c);
        if (r >= 0) {
          r = start(image_, c);
          if (r >= 0) {
            (void)req.release();  // on_complete owns it now
            return;
          }
          rbd_aio_release(c);
        }
        auto ex = req->executor;
        common::post_completion(ex, std::move(req->done), -r);
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
  const auto ec = co_await submit([&](rbd_image_t img, rbd_completion_t c) {
    return rbd_aio_read(img, offset, buf.size(), reinterpret_cast<char*>(buf.data()), c);
  });
  co_return note(ec, "read");
}

core::Task<std::error_code> RbdDevice::write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags) {
  if (read_only_) co_return core::errno_code(EROFS);
  const auto ec = co_await submit([&](rbd_image_t img, rbd_completion_t c) {
    return rbd_aio_write(img, offset, buf.size(), reinterpret_cast<const char*>(buf.data()), c);
  });
  co_return note(ec, "write");
}

core::Task<std::error_code> RbdDevice::flush() {
  const auto ec = co_await submit([](rbd_image_t img, rbd_completion_t c) { return rbd_aio_flush(img, c); });
  co_return note(ec, "flush");
}

core::Task<std::error_code> RbdDevice::trim(core::ByteRange range, core::IoFlags) {
  if (read_only_) co_return core::errno_code(EROFS);
  const auto ec = co_await submit([&](rbd_image_t img, rbd_completion_t c) {
    return rbd_aio_discard(img, range.offset, range.length, c);
  });
  co_return note(ec, "discard");
}

core::Task<std::error_code> RbdDevice::zero(core::ByteRange range, core::IoFlags flags) {
  if (read_only_) co_return core::errno_code(EROFS);
  // librbd zeroes by discarding whole objects and writing zeroes at the
  // edges: always fast; NO_HOLE asks it to keep the range allocated.
  const int zero_flags = (flags & core::kNoHole) ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0;
  const auto ec = co_await submit([&](rbd_image_t img, rbd_completion_t c) {
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
  auto result = co_await core::offload(blocking_, [this, off = range.offset, len] {
    std::pair<int, std::vector<Found>> res;
    auto cb = [](uint64_t o, size_t l, int exists, void* arg) -> int {
      if (exists) static_cast<std::vector<Found>*>(arg)->push_back({o, l});
      return 0;
    };
    res.first = rbd_diff_iterate2(image_, nullptr, off, len, 1, fast_diff_ ? 1 : 0, cb, &res.second);
    return res;
  });
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

int RbdDevice::Cluster::ask_health() {
  const char* cmd[] = {R"({"prefix": "health", "format": "json"})"};
  char* outbuf = nullptr;
  size_t outlen = 0;
  char* outs = nullptr;
  size_t outslen = 0;
  const int r = rados_mon_command(handle, cmd, 1, "", 0, &outbuf, &outlen, &outs, &outslen);
  std::string status;
  if (r >= 0 && outbuf) {
    const std::string json(outbuf, outlen);
    const auto at = json.find("\"status\":\"");
    if (at != std::string::npos) {
      const auto from = at + 10;
      status = json.substr(from, json.find('"', from) - from);
    }
  }
  rados_buffer_free(outbuf);
  rados_buffer_free(outs);
  if (r < 0) status = "unreachable: " + errno_text(r);
  if (status.empty()) status = "unknown";
  std::string before;
  {
    std::lock_guard lock(mutex);
    before = std::exchange(health, status);
    at = std::chrono::steady_clock::now();
  }
  if (before != status) core::logger("rbd")->info("{}: cluster health {}", spec, status);
  return r;
}

std::string RbdDevice::health_detail() const {
  Cluster& c = *cluster_;
  std::lock_guard lock(c.mutex);
  if (std::chrono::steady_clock::now() - c.at > kHealthMaxAge &&
      !c.refreshing.exchange(true, std::memory_order_acq_rel)) {
    boost::asio::post(blocking_, [cluster = cluster_] {
      (void)cluster->ask_health();
      cluster->refreshing.store(false, std::memory_order_release);
    });
  }
  return c.health;
}

core::Task<std::error_code> RbdDevice::reconnect() {
  // librbd keeps its own sessions to mons and OSDs and resends on its own;
  // what is left is to wait, bounded, until the mons answer again.
  const int r = co_await core::offload(blocking_, [cluster = cluster_] { return cluster->ask_health(); });
  if (r < 0) co_return core::errno_code(-r == ETIMEDOUT ? ETIMEDOUT : ENOTCONN);
  generation_.fetch_add(1, std::memory_order_relaxed);
  connected_.store(true, std::memory_order_relaxed);
  co_return std::error_code{};
}

}  // namespace blockway::remote::rbd
