// RbdDevice: an image (or a snapshot of one) in a Ceph cluster, through
// librbd.
//
// Start-up (blocking, on the calling thread): librados reads the conf, takes
// the keyring, connects to the mons (bounded by io-timeout through
// client_mount_timeout), opens the pool's I/O context and the image; a
// writable image takes its exclusive lock (exclusive=on|break, see
// rbd_uri.hpp). Every failure there is a BackendError that names the URI and
// says what the cluster said, so a wrong pool, image, key or conf stops the
// daemon with exit status 2. A key that may only read (EPERM on a read-write
// open) is served read-only, with a warning.
//
// Data path: librbd's asynchronous API only (rbd_aio_read/write/flush/
// discard/write_zeroes). Each request allocates one librbd completion whose
// callback, on a librbd thread, posts the result to the executor of the
// coroutine that issued it: no thread waits per request, no lock is taken
// beyond the in-flight list's (see Deadline) and the post. librbd is thread-safe, so every event loop submits
// directly; there is one rados client and one image handle per device.
// librbd's own cache is off unless the URI says rbd_cache=on: a write librbd
// acknowledges is then on the OSDs, and a flush is still passed down (it is
// cheap then) so that FLUSH reaches the cluster as the NBD spec asks. With
// rbd_cache=on (as qemu runs librbd with cache=writeback) librbd's
// write-around policy acknowledges a write once sent, before the OSDs answer
// (reads of its range wait for it; writethrough until the first flush), and
// FLUSH is rbd_aio_flush, which waits for the writes still in flight and
// fails if one of them failed. But librbd 16 reports a write that failed
// before the FLUSH was sent only to a later flush that finds writes in flight
// (librbd/cache/WriteAroundObjectDispatch: flush() passes straight down when
// nothing is in flight, and the error stays pending): such a FLUSH succeeds
// although the write is lost. That is why the default is off. FUA is a
// write followed by a flush (CheckedDevice emulates it). Block status comes from
// rbd_diff_iterate2 (fast with the fast-diff feature), which librbd offers
// only synchronously: it runs on the blocking pool.
//
// Sequential runs: a client that reads the image in order in small
// requests (a kernel's readahead through the NBD device or the FUSE file,
// fio --rw=read --bs=256k: 128-512 KiB, many in flight) would cost the OSD
// one op per request, where qemu's driver sends 2 MiB (nbdcopy takes the
// preferred block, the 4 MiB object, and is not widened). A read that continues a stream (it starts
// where a recent read ended, which started where the one before it ended)
// is widened to the end of its 2 MiB-aligned run (kRunBytes; never across
// an object boundary for objects of 2 MiB or more), and reads of a range
// inside a run still in flight join it instead of going to librbd: they
// are answered from its buffer when it completes. A run is joined only if
// no write, discard or write-zeroes started after it was sent
// (write_epoch_), and started only while none is in flight, so a read never
// returns data older than a write acknowledged before it was sent; runs
// are used only where no other client writes the image (a snapshot, or the
// exclusive lock held). Random reads are never widened.
//
// Long reads in parts: a read longer than kPartBytes (nbdcopy's 4 MiB
// preferred block, a 32 MiB request) goes to librbd as 2 MiB-aligned parts
// sent together, each its own librbd completion on the one request (and
// bounce buffer); the caller is answered when the last part is back. One
// whole-object read is one OSD op, served by one OSD thread from start to
// end; parts keep the OSD busy on several (qemu's driver sends 2 MiB
// requests, 8 in flight, for the same reason). The first failing part's
// error is the request's.
//
// Deadline: librbd's op timeouts do not bound every wait inside it (a
// request re-issued after a timeout, or one waiting for the exclusive lock
// librbd re-takes after its watch failed, can wait without bound), so each
// request also has a deadline of its own (1.5 x io-timeout). A
// watchdog thread fails a request past it with ETIMEDOUT and abandons it to
// librbd, whose completion may land later: a read goes through a bounce
// buffer the request owns (librbd may still write it; the caller's buffer
// is only copied into while the caller waits), a write's data is copied by
// librbd at submission (rbd_disable_zero_copy_writes), and everything the
// completion touches is owned by the request or shared with it. Shutdown
// waits for abandoned requests at most kCloseBound; if librbd still holds
// some, the image and the client are left open (rbd_close would wait for
// them) and the process exits with them; rbd_close and rados_shutdown run
// on a thread of their own and are abandoned past kCloseBound too.
//
// Sessions: a session (one cluster connection and the image opened on it)
// is shared by everything that uses it: each request in librbd, a block
// status on the blocking pool and a resize callback hold a reference to the
// session they started on. A reopen (see Failures) replaces the current
// session; the old one is closed, on a thread of its own, off the data path,
// as soon as its last user lets go (librbd answered or failed its last
// request). Sessions replaced but still held (requests librbd never answers)
// are bounded: with kMaxRetired of them open, a reopen is refused (logged)
// until one drains, so a gateway that rides out many outages keeps a bounded
// number of cluster connections (and librados threads).
//
// Failures: librbd resends its requests itself across OSD and mon restarts.
// rados_osd_op_timeout and rados_mon_op_timeout are set to io-timeout, so a
// request the cluster does not answer in time fails with ETIMEDOUT, which the
// RetryLayer above treats as a lost session: it calls reconnect(), which asks
// the mons for the cluster's health (bounded by io-timeout, on the blocking
// pool) and, when they answer, counts a new generation; the request is then
// issued again until retry-timeout. A client the cluster blocklisted (another
// gateway broke our lock) gets EBLOCKLISTED (ESHUTDOWN) from librbd: that is
// reported as EIO and logged, never retried.
//
// Resize: every session watches its image (rbd_update_watch). When the
// image grows, the resize handler the gateway set grows the export above
// (new clients see the new size; connected NBD clients keep theirs: NBD
// cannot tell them) or says why it cannot (a cache), and then the device
// keeps the old size. A shrink is refused while served: the export keeps
// its size, the error is logged and health_detail() reports it; requests
// past the image's new end fail in librbd.
//
// Thread model: any method may be called from any event-loop thread;
// librbd's completion callbacks run on librbd's threads and only post. The
// requests in flight are in one list under a mutex (held only to link,
// unlink, expire or join a run, never across a librbd call); the watchdog thread is the
// device's own, joined by the destructor.
// connected() and generation() are atomics; the last health string is under
// a small mutex never held across a co_await or a librados call. reconnect() runs on the
// blocking pool and is never concurrent with itself (RetryLayer's contract).
// The current session is an atomic shared_ptr: the data path loads it (no
// mutex), reopen() exchanges it; a session's closer runs where its last
// reference is dropped and only starts a thread there (never waits, except
// at shutdown for the last session, bounded by kCloseBound).
#pragma once

#include "core/remote_device.hpp"
#include "remote/rbd/rbd_uri.hpp"

#include <boost/asio/thread_pool.hpp>
#include <rados/librados.h>
#include <rbd/librbd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace blockway::remote::rbd {

struct RbdOptions {
  std::chrono::milliseconds io_timeout{30000};
  bool rbd_cache = false;  // librbd's own cache (rbd_cache=on|off; see the header)
};

class RbdDevice final : public core::RemoteDevice {
 public:
  // Connects and opens the image; throws BackendError.
  RbdDevice(std::string uri, RbdTarget target, bool read_only, RbdOptions options,
            boost::asio::thread_pool& blocking);
  ~RbdDevice() override;
  RbdDevice(const RbdDevice&) = delete;
  RbdDevice& operator=(const RbdDevice&) = delete;

  [[nodiscard]] core::Geometry geometry() const noexcept override;
  [[nodiscard]] core::Capabilities capabilities() const noexcept override;
  [[nodiscard]] std::string describe() const override;

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<std::error_code> trim(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> zero(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> block_status(core::ByteRange range, core::ExtentList& out) override;

  core::Task<std::error_code> reconnect() override;
  [[nodiscard]] bool connected() const noexcept override { return connected_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t generation() const noexcept override {
    return generation_.load(std::memory_order_relaxed);
  }
  // The cluster's health as the mons last said it ("HEALTH_OK", or
  // "unreachable: ..."); refreshed on the blocking pool when older than
  // kHealthMaxAge, so a status request never waits for the cluster.
  [[nodiscard]] std::string health_detail() const override;
  void set_resize_handler(ResizeHandler handler) override;

 private:
  struct Request;
  struct Joined;
  struct Inflight;  // the requests in flight; shared with librbd's callbacks, which may outlive the device
  static void on_complete(rbd_completion_t c, void* arg);
  // The last part of `req` left librbd (or was never sent): answers its
  // caller and the readers that joined it.
  static void finish(std::unique_ptr<Request> req);
  // Creates a completion, calls start(image, c, into, offset, length) (an
  // rbd_aio_* call) and awaits the result; librbd's negative errno becomes
  // an error_code. A read passes its destination: librbd then reads into a
  // bounce buffer (see the header). A read also passes its offset: it may
  // join a run, or start one; a long read goes to librbd in parts
  // (kPartBytes), one start() each.
  template <class Start>
  core::Task<std::error_code> submit(const char* what, Start start, std::span<std::byte> read_into = {},
                                     uint64_t read_offset = 0);
  // A write, discard or write-zeroes in flight (for its whole life): reads
  // from its start on join no run started before it.
  struct WriteMark {
    explicit WriteMark(RbdDevice& d) : device(d) {
      device.writes_in_flight_.fetch_add(1);
      device.write_epoch_.fetch_add(1);
    }
    ~WriteMark() { device.writes_in_flight_.fetch_sub(1); }
    WriteMark(const WriteMark&) = delete;
    WriteMark& operator=(const WriteMark&) = delete;
    RbdDevice& device;
  };
  // The watchdog thread: fails requests past their deadline.
  static void watch(const std::shared_ptr<Inflight>& inflight);
  void stop_watchdog() noexcept;
  // Notes what an error says about the cluster (connected, blocklisted).
  std::error_code note(std::error_code ec, const char* what);
  // The rados client and the cluster's last health, shared with a health
  // refresh in flight on the blocking pool (which may outlive the device:
  // the last owner shuts the client down).
  struct Cluster {
    rados_t handle = nullptr;
    std::string spec;  // for logs
    std::mutex mutex;  // guards health and at; never held across a librados call
    std::string health;
    std::chrono::steady_clock::time_point at{};
    std::atomic<bool> refreshing{false};  // a refresh is queued or running
    ~Cluster();
    // Asks the mons for the cluster's health (blocking, bounded by
    // rados_mon_op_timeout) and records it; 0 or a negative errno.
    int ask_health();
  };
  // What librbd's update watch calls back into: the device, until shutdown
  // clears it (a session left open at exit may still call back).
  struct Watcher {
    std::mutex mutex;  // held across a callback, so shutdown waits for one running
    RbdDevice* device = nullptr;
  };
  static void on_update(void* arg);
  // The image's header changed: a new size is taken (grow, when the export
  // above can), or refused and reported (shrink). Under Watcher::mutex.
  void check_size(rbd_image_t image);
  // One connection to the cluster and the image opened on it; reconnect()
  // replaces it whole after librbd stopped answering (see the header).
  struct Session {
    std::shared_ptr<Cluster> cluster = std::make_shared<Cluster>();
    rados_ioctx_t ioctx = nullptr;
    rbd_image_t image = nullptr;
    bool locked = false;
    std::shared_ptr<Watcher> watcher;  // set while the image is watched
    uint64_t watch_handle = 0;
    std::string spec;  // for logs
    // Set by the one that drops the last reference, before it does: how long
    // the close may be waited for there (0: not at all).
    std::chrono::milliseconds close_bound{0};
    // Set when a reopen replaced the session: the device's count of replaced
    // sessions still open, which the close decrements.
    std::shared_ptr<std::atomic<int>> retired_open;
    // The client's own addresses (rados_getaddrs), taken at open: a reopen
    // breaks the image's lock only when its holder is this session.
    std::string address;
    // Set by a reopen just before it breaks this session's lock; read by
    // completions on librbd's threads: the cluster then fences this session
    // (EBLOCKLISTED), which means "ask the new session", not "another
    // gateway took the image". A reopen that fails before it breaks the
    // lock leaves it unset, so a later break by another gateway still fails
    // the export at once.
    std::shared_ptr<std::atomic<bool>> replaced = std::make_shared<std::atomic<bool>>(false);
  };
  // A session that closes itself (close_session) when its last user lets go.
  using SessionRef = std::shared_ptr<Session>;
  SessionRef new_session() const;
  // Connects and opens the image into s (start-up, or a reopen after a
  // wedge: then `previous` is the session replaced, whose lock is taken
  // back); throws BackendError, leaving in s what to close.
  void open_session(Session& s, bool read_only, const Session* previous);
  // Takes the exclusive lock; a reopen breaks it only when `previous` holds
  // it (marking `previous` replaced first), never another gateway's.
  void take_lock(rbd_image_t image, const Session* previous);
  // Closes s on a thread of its own and waits for it at most `bound` (0: not
  // at all); a close still running then is left to finish on its own.
  static void close_session(Session s, std::chrono::milliseconds bound);
  // Replaces the session by a fresh one (blocking pool): 0 or a negative errno.
  int reopen();
  void shutdown() noexcept;

  std::string uri_;
  RbdTarget target_;
  RbdOptions options_;
  boost::asio::thread_pool& blocking_;
  // The current session (null after shutdown). Replaced sessions live as
  // long as something holds them (see the header).
  std::atomic<SessionRef> session_;
  // Replaced sessions not closed yet (shared with their closers).
  std::shared_ptr<std::atomic<int>> retired_open_ = std::make_shared<std::atomic<int>>(0);
  static constexpr int kMaxRetired = 4;
  bool read_only_ = false;
  core::Geometry geometry_;  // its size is size_
  std::atomic<uint64_t> size_{0};
  std::shared_ptr<Watcher> watcher_ = std::make_shared<Watcher>();
  mutable std::mutex resize_mutex_;  // guards resize_handler_ and size_problem_
  ResizeHandler resize_handler_;
  std::string size_problem_;  // why the image's size is not the export's, for status
  bool fast_diff_ = false;
  std::atomic<bool> connected_{true};
  std::atomic<uint64_t> generation_{1};
  std::shared_ptr<Inflight> inflight_;
  std::thread watchdog_;
  // Sequential runs (see the header): whether reads may share them, and
  // what tells a run that a write started after it.
  static constexpr uint64_t kRunBytes = 2u << 20;
  // Parts of a long read (see the header): 2 MiB-aligned, sent together.
  static constexpr uint64_t kPartBytes = 2u << 20;
  bool runs_ = false;
  std::atomic<uint64_t> write_epoch_{0};
  std::atomic<uint64_t> writes_in_flight_{0};

  // A request's deadline: 1.5 x io-timeout, so librbd's own op timeout
  // (= io-timeout) fails it first when it can.
  [[nodiscard]] std::chrono::milliseconds deadline() const noexcept { return options_.io_timeout * 3 / 2; }
  // The longest shutdown waits for librbd (abandoned requests, rbd_close).
  static constexpr std::chrono::seconds kCloseBound{5};

  static constexpr std::chrono::seconds kHealthMaxAge{5};
};

}  // namespace blockway::remote::rbd
