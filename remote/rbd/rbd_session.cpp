// RbdDevice's sessions: a session is one cluster connection (librados) and
// one image handle (librbd) with the image's exclusive lock and its watch;
// this file opens them (start-up and reopen), takes the lock, closes them
// when their last user lets go, and asks the cluster's health. The data
// path (requests, completions, the watchdog, reconnect) is rbd_device.cpp.
//
// Thread model (see rbd_device.hpp): open_session and take_lock run on the
// thread that builds the device (start-up, blocking) or on the blocking pool
// (reopen(), from reconnect()); a session closes on a thread of its own
// (close_session), bounded; Cluster::ask_health runs on the blocking pool,
// its result under the cluster's mutex, which health_detail() only reads.
#include "remote/rbd/rbd_device.hpp"

#include "core/logging.hpp"
#include "remote/backend.hpp"

#include <boost/asio/post.hpp>
#include <rbd/features.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace blockway::remote::rbd {
namespace {

std::string errno_text(int negative) { return std::strerror(negative < 0 ? -negative : negative); }

}  // namespace

RbdDevice::Cluster::~Cluster() {
  if (handle) rados_shutdown(handle);
}
RbdDevice::SessionRef RbdDevice::new_session() const {
  auto closer = [](Session* p) {
    std::unique_ptr<Session> s(p);
    const auto bound = s->close_bound;
    close_session(std::move(*s), bound);
  };
  SessionRef s(std::make_unique<Session>().release(), closer);
  s->spec = target_.spec();
  return s;
}

void RbdDevice::close_session(Session s, std::chrono::milliseconds bound) {
  // A replaced session no longer counts once nothing uses it: its close is
  // under way (and bounded by nothing but librbd: a close that hangs keeps
  // only its own thread).
  const bool retired = static_cast<bool>(s.retired_open);
  int still_open = 0;
  if (retired) still_open = s.retired_open->fetch_sub(1, std::memory_order_acq_rel) - 1;
  std::string spec = s.spec;
  if (retired)
    core::logger("rbd")->info("{}: closing the session a reopen replaced, now that nothing uses it ({} other "
                              "replaced session(s) still open)",
                              spec, still_open);
  // rbd_close releases the lock and flushes, rados_shutdown says goodbye:
  // both talk to the cluster, which may not answer.
  std::packaged_task<void()> task([s = std::move(s)]() mutable {
    if (s.image) {
      if (s.watcher) (void)rbd_update_unwatch(s.image, s.watch_handle);
      if (s.locked) (void)rbd_lock_release(s.image);
      (void)rbd_close(s.image);
    }
    if (s.ioctx) rados_ioctx_destroy(s.ioctx);
    s.cluster.reset();  // shut down now, or by the health refresh in flight
  });
  auto finished = task.get_future();
  std::thread closer(std::move(task));
  if (finished.wait_for(bound) == std::future_status::ready) {
    closer.join();
    return;
  }
  closer.detach();
  if (bound.count() > 0)
    core::logger("rbd")->warn("{}: closing the image took longer than {} ms (the cluster does not answer); not "
                              "waiting for it",
                              spec, bound.count());
}

void RbdDevice::open_session(Session& s, bool read_only, const Session* previous) {
  const bool reopen = previous != nullptr;
  const std::string where = "RBD image '" + target_.spec() + "' (" + uri_ + ")";
  auto fail = [&where](const std::string& what) { throw BackendError(where + ": " + what); };
  const std::string user = "client." + target_.id;
  s.cluster->spec = target_.spec();
  int r = rados_create2(&s.cluster->handle, "ceph", user.c_str(), 0);
  if (r < 0) fail("cannot create a RADOS client for " + user + ": " + errno_text(r));
  if (!target_.conf.empty()) {
    r = rados_conf_read_file(s.cluster->handle, target_.conf.c_str());
    if (r < 0) fail("cannot read the Ceph configuration " + target_.conf + ": " + errno_text(r));
  } else {
    r = rados_conf_read_file(s.cluster->handle, nullptr);
    if (r < 0) fail("no Ceph configuration found (/etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf); name one "
                    "with ?conf=PATH");
  }
  if (!target_.keyring.empty()) {
    if (::access(target_.keyring.c_str(), R_OK) != 0)
      fail("cannot read the keyring " + target_.keyring + ": " + errno_text(errno));
    r = rados_conf_set(s.cluster->handle, "keyring", target_.keyring.c_str());
    if (r < 0) fail("keyring " + target_.keyring + ": " + errno_text(r));
  }
  // Every wait on the cluster is bounded by io-timeout (see the header).
  const std::string seconds = std::to_string(std::max<int64_t>(1, (options_.io_timeout.count() + 999) / 1000));
  for (const char* name : {"rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"}) {
    r = rados_conf_set(s.cluster->handle, name, seconds.c_str());
    if (r < 0) fail(std::string("cannot set ") + name + ": " + errno_text(r));
  }
  // librbd's cache (see the header); its other settings are librbd's defaults,
  // as in qemu and rbd bench.
  r = rados_conf_set(s.cluster->handle, "rbd_cache", options_.rbd_cache ? "true" : "false");
  if (r < 0) fail(std::string("cannot set rbd_cache: ") + errno_text(r));
  // librbd copies a write's data at submission: a write abandoned at its
  // deadline (see the header) must not read the caller's buffer later.
  r = rados_conf_set(s.cluster->handle, "rbd_disable_zero_copy_writes", "true");
  if (r < 0) fail(std::string("cannot set rbd_disable_zero_copy_writes: ") + errno_text(r));
  r = rados_connect(s.cluster->handle);
  if (r < 0) {
    if (r == -EACCES || r == -EPERM || r == -EKEYREJECTED)
      fail("the cluster refused " + user + "'s key (" + errno_text(r) + "): check the keyring");
    if (r == -ENOENT)
      fail("no key for " + user + " (" + errno_text(r) + "): name the keyring with ?keyring=PATH");
    if (r == -ETIMEDOUT)
      fail("no answer from the mons within " + seconds + " s (io-timeout): is the cluster up, is mon host right?");
    fail("cannot connect to the cluster as " + user + ": " + errno_text(r));
  }
  if (char* addrs = nullptr; rados_getaddrs(s.cluster->handle, &addrs) == 0 && addrs) {
    s.address = addrs;
    rados_buffer_free(addrs);
  }
  r = rados_ioctx_create(s.cluster->handle, target_.pool.c_str(), &s.ioctx);
  if (r < 0) {
    s.ioctx = nullptr;
    if (r == -ENOENT) fail("the pool '" + target_.pool + "' does not exist");
    fail("cannot open the pool '" + target_.pool + "': " + errno_text(r));
  }
  rados_ioctx_set_namespace(s.ioctx, target_.ns.empty() ? nullptr : target_.ns.c_str());
  const char* snap = target_.snap.empty() ? nullptr : target_.snap.c_str();
  if (!reopen) read_only_ = read_only || snap != nullptr;
  r = read_only_ ? rbd_open_read_only(s.ioctx, target_.image.c_str(), &s.image, snap)
                 : rbd_open(s.ioctx, target_.image.c_str(), &s.image, nullptr);
  if (r == -EPERM && !read_only_ && !reopen) {
    // A key that may only read: serve the image read-only rather than refuse.
    r = rbd_open_read_only(s.ioctx, target_.image.c_str(), &s.image, nullptr);
    if (r >= 0) {
      read_only_ = true;
      core::logger("rbd")->warn("{}: {} may not write to the image; serving it read-only", target_.spec(), user);
    }
  }
  if (r < 0) {
    s.image = nullptr;
    if (r == -ENOENT && snap) fail("the image or its snapshot '" + target_.snap + "' does not exist");
    if (r == -ENOENT)
      fail("there is no image '" + target_.image + "' in pool '" + target_.pool + "'" +
           (target_.ns.empty() ? std::string() : " namespace '" + target_.ns + "'"));
    if (r == -EPERM || r == -EACCES) fail(user + " may not open the image (" + errno_text(r) + "): check its caps");
    fail("cannot open the image: " + errno_text(r));
  }

  uint64_t size = 0;
  rbd_image_info_t info{};
  if ((r = rbd_stat(s.image, &info, sizeof info)) < 0) fail("cannot stat the image: " + errno_text(r));
  size = info.size;
  uint64_t features = 0;
  (void)rbd_get_features(s.image, &features);
  uint64_t flags = 0;
  (void)rbd_get_flags(s.image, &flags);
  if (!reopen) {  // a reopen that finds a new size: check_size() (reopen())
    fast_diff_ = (features & RBD_FEATURE_FAST_DIFF) && !(flags & RBD_FLAG_FAST_DIFF_INVALID);
    geometry_.size = size;
    size_.store(size, std::memory_order_release);
  }
  if (!reopen) geometry_.min_block = 1;
  // The object size as the preferred block: a whole object per request is
  // what RADOS serves best (and what the prefetch should read).
  if (!reopen) {
    geometry_.preferred_block =
        static_cast<uint32_t>(std::clamp<uint64_t>(info.obj_size, 4096, core::kDefaultMaxTransfer));
    geometry_.max_transfer = core::kDefaultMaxTransfer;
  }

  if (!read_only_ && target_.lock != LockMode::off) {
    if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK))
      fail("the image lacks the exclusive-lock feature, so a second writer cannot be kept out; enable it (rbd "
           "feature enable " + target_.spec() + " exclusive-lock) or add exclusive=off to the URI");
    take_lock(s.image, previous);
    s.locked = true;
  }
  if (!snap) {
    // Resizes (see the header); a snapshot's size never changes.
    r = rbd_update_watch(s.image, &s.watch_handle, &RbdDevice::on_update, watcher_.get());
    if (r < 0)
      core::logger("rbd")->error("{}: cannot watch the image for changes ({}): a resize will not be seen until the "
                                 "export is added again",
                                 target_.spec(), errno_text(r));
    else
      s.watcher = watcher_;
  }
  (void)s.cluster->ask_health();  // for status from the start (bounded by io-timeout)
  core::logger("rbd")->info("{}: {} as {}, {} bytes, object size {}{}{}, librbd cache {}", target_.spec(),
                            reopen ? "reopened" : "opened", user, size, info.obj_size,
                            read_only_ ? ", read-only" : "", s.locked ? ", exclusive lock held" : "",
                            options_.rbd_cache ? "on" : "off");
}

namespace {

// Whether the lock owner `owner` (librbd names it by its address,
// "IP:PORT/NONCE") is the client whose addresses rados_getaddrs gave as
// `ours` ("[v2:IP:PORT/NONCE,...]", "any:IP:PORT/NONCE"...): by the nonce,
// which is drawn at random per client instance (the IP a client reports
// for itself may differ from the one the OSD recorded).
bool same_client(const std::string& owner, const std::string& ours) {
  const auto slash = owner.rfind('/');
  if (slash == std::string::npos || slash + 1 == owner.size()) return false;
  const std::string nonce = owner.substr(slash);  // "/NONCE"
  for (size_t at = ours.find(nonce); at != std::string::npos; at = ours.find(nonce, at + 1)) {
    const size_t end = at + nonce.size();
    if (end == ours.size() || ours[end] == ',' || ours[end] == ']') return true;
  }
  return false;
}

}  // namespace

void RbdDevice::take_lock(rbd_image_t image, const Session* previous) {
  const bool reopen = previous != nullptr;
  const std::string where = "RBD image '" + target_.spec() + "' (" + uri_ + ")";
  auto owners = [image] {
    rbd_lock_mode_t mode{};
    std::vector<char*> list(16);
    size_t count = list.size();
    std::vector<std::string> out;
    if (rbd_lock_get_owners(image, &mode, list.data(), &count) == 0) {
      for (size_t i = 0; i < count; ++i) out.emplace_back(list[i]);
      rbd_lock_get_owners_cleanup(list.data(), count);
    }
    return out;
  };
  // A reopen takes the lock back from this gateway's previous session, whose
  // requests librbd no longer answered: breaking it fences that session.
  if (target_.lock == LockMode::take_over || reopen) {
    for (const auto& owner : owners()) {
      if (reopen) {
        // Only our own previous session's lock: if another gateway holds
        // it, it took the image (exclusive=break), and this one yields.
        if (!same_client(owner, previous->address))
          throw BackendError(where + ": the exclusive lock is held by " + owner + ", not by this gateway's " +
                             "previous session (" + previous->address + "): another gateway took the image; " +
                             "not taking it back");
        // Marked before the break fences it (see Session::replaced).
        previous->replaced->store(true, std::memory_order_release);
      }
      core::logger("rbd")->warn("{}: breaking the exclusive lock of {} ({})", target_.spec(), owner,
                                reopen ? "our previous session" : "exclusive=break");
      const int r = rbd_lock_break(image, RBD_LOCK_MODE_EXCLUSIVE, owner.c_str());
      if (r < 0 && r != -ENOENT)
        throw BackendError(where + ": cannot break the lock of " + owner + ": " + errno_text(r));
    }
  }
  const int r = rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE);
  if (r < 0) {
    std::string holders;
    for (const auto& o : owners()) holders += (holders.empty() ? "" : ", ") + o;
    throw BackendError(where + ": cannot take the exclusive lock (" + errno_text(r) + ")" +
                       (holders.empty() ? std::string() : "; it is held by " + holders) +
                       ": another gateway or client writes this image; stop it, or add exclusive=break to "
                       "the URI to take the lock from it");
  }
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
  std::shared_ptr<Cluster> cluster;
  if (auto session = session_.load(std::memory_order_acquire)) cluster = session->cluster;
  if (!cluster) return "closed";
  std::string problem;
  {
    std::lock_guard lock(resize_mutex_);
    problem = size_problem_;
  }
  std::lock_guard lock(cluster->mutex);
  if (std::chrono::steady_clock::now() - cluster->at > kHealthMaxAge &&
      !cluster->refreshing.exchange(true, std::memory_order_acq_rel)) {
    boost::asio::post(blocking_, [cluster] {
      (void)cluster->ask_health();
      cluster->refreshing.store(false, std::memory_order_release);
    });
  }
  return problem.empty() ? cluster->health : cluster->health + "; " + problem;
}

int RbdDevice::reopen() {
  if (const int open = retired_open_->load(std::memory_order_acquire); open >= kMaxRetired) {
    core::logger("rbd")->error("{}: {} sessions replaced by earlier reopens still hold requests librbd has not "
                               "answered; not opening another cluster connection until one of them drains",
                               target_.spec(), open);
    return -ENOTCONN;
  }
  // The fresh session breaks the current one's lock (take_lock), and the
  // cluster then fails the current one's requests with EBLOCKLISTED: take_lock
  // marks it replaced just before, so that those are retried on the new
  // session instead of failing with EIO. A reopen that fails before that
  // leaves no mark, and one that finds another gateway holding the lock
  // leaves it alone.
  auto current = session_.load(std::memory_order_acquire);
  if (!current) return -ENOTCONN;  // shut down
  auto fresh = new_session();
  try {
    open_session(*fresh, read_only_, current.get());
  } catch (const BackendError& e) {
    core::logger("rbd")->warn("{}", e.what());
    return -ENOTCONN;  // fresh closes as it goes, without being waited for
  }
  current.reset();
  rbd_image_t image = fresh->image;
  auto old = session_.exchange(std::move(fresh), std::memory_order_acq_rel);
  if (old) {
    // Closed where its last user lets go (now, if nothing uses it).
    retired_open_->fetch_add(1, std::memory_order_acq_rel);
    old->retired_open = retired_open_;
    old.reset();
  }
  // The image may have been resized while librbd did not answer.
  std::lock_guard lock(watcher_->mutex);
  check_size(image);
  return 0;
}

}  // namespace blockway::remote::rbd
