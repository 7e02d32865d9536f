#include "fuse/operations.hpp"

#include "core/buffer_pool.hpp"
#include "fuse/inode_table.hpp"
#include "fuse/mount.hpp"
#include "fuse/reader.hpp"
#include "fuse/request.hpp"

#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <memory>
#include <mutex>
#include <vector>

namespace blockway::fuse {

namespace {

using core::ByteRange;
using core::ExtentList;
using core::IoBuffer;
using core::Task;

constexpr double kAttrTimeout = 1.0;

Handle& handle_of(const fuse_file_info* fi) noexcept { return *reinterpret_cast<Handle*>(fi->fh); }

std::shared_ptr<Node> find(Mount& mount, fuse_ino_t ino, const fuse_file_info* fi) {
  if (fi && fi->fh) return handle_of(fi).node;
  return mount.inodes().find(ino);
}

struct stat attr_of(const FuseOptions& options, const Node& n) {
  struct stat st{};
  st.st_ino = n.ino;
  // fuse-uid=, fuse-gid=, fuse-mode= of the export over the mount's, as they
  // are now (blockway access may change them at any time: read once).
  const auto file = n.exp->file().resolve(options.uid, options.gid, options.mode, n.read_only);
  st.st_mode = S_IFREG | file.mode;
  st.st_nlink = 1;
  st.st_uid = file.uid;
  st.st_gid = file.gid;
  const uint64_t size = n.size();
  st.st_size = static_cast<off_t>(size);
  st.st_blksize = 4096;
  st.st_blocks = static_cast<blkcnt_t>((size + 511) / 512);
  st.st_atim = to_timespec(n.created_ns);
  st.st_mtim = to_timespec(n.mtime_ns.load(std::memory_order_relaxed));
  st.st_ctim = to_timespec(std::max(n.created_ns, n.mtime_ns.load(std::memory_order_relaxed)));
  return st;
}

struct stat root_attr(const Mount& mount) {
  struct stat st{};
  st.st_ino = FUSE_ROOT_ID;
  st.st_mode = S_IFDIR | 0755;
  st.st_nlink = 2;
  st.st_uid = mount.options().uid;
  st.st_gid = mount.options().gid;
  st.st_atim = st.st_mtim = st.st_ctim = to_timespec(mount.mounted_ns());
  return st;
}

// An export whose allow= names users or groups: only those see its file
// (and root, whom file permissions do not stop either). The caller's groups
// are those its thread holds (read from /proc, see caller_groups).
bool restricted(const Node& node) {
  const auto policy = node.exp->access.load();
  return policy && !policy->allows_local_user(core::AccessClient{});
}

// The supplementary groups of the calling thread, from the "Groups:" line of
// /proc/TID/task/TID/status (FUSE's pid is the caller's thread id). Not
// libfuse's fuse_req_getgroups: it runs strstr over a buffer it did not
// terminate (a heap overflow AddressSanitizer reports with libfuse 3.14).
// Empty if the caller is gone.
std::vector<gid_t> caller_groups(pid_t tid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/task/%d/status", static_cast<int>(tid), static_cast<int>(tid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  std::string status;
  char chunk[4096];
  for (ssize_t n; (n = ::read(fd, chunk, sizeof chunk)) > 0;) status.append(chunk, static_cast<size_t>(n));
  ::close(fd);
  std::vector<gid_t> groups;
  const size_t at = status.find("\nGroups:");
  if (at == std::string::npos) return groups;
  const char* p = status.c_str() + at + std::strlen("\nGroups:");
  for (;;) {
    char* end = nullptr;
    const unsigned long g = std::strtoul(p, &end, 10);
    if (end == p) break;  // no number: the line ended (strtoul may skip the newline, but the next line starts with a name)
    groups.push_back(static_cast<gid_t>(g));
    p = end;
    if (*p == '\n') break;
  }
  return groups;
}

// caller_groups() for the last few callers, each kept for a second: reading
// /proc costs ~12 us of CPU here, once per lookup/getattr of a restricted
// file (their kernel caches are off), so `ls -l` paid it per file. Keyed by
// tid, uid and gid: a tid reused by another user misses. Groups a thread
// changes itself (that needs CAP_SETGID) count within the second, as the
// kernel's attribute caches of other files do.
std::vector<gid_t> cached_caller_groups(pid_t tid, uid_t uid, gid_t gid) {
  struct Entry {
    pid_t tid = 0;
    uid_t uid = 0;
    gid_t gid = 0;
    std::chrono::steady_clock::time_point at;
    std::vector<gid_t> groups;
  };
  struct Cache {
    std::mutex mutex;
    std::array<Entry, 16> entries;
    size_t next = 0;
  };
  static constexpr auto kKeep = std::chrono::seconds(1);
  static auto* const cache = new Cache;  // never destroyed: FUSE threads may outlive statics
  const auto now = std::chrono::steady_clock::now();
  {
    std::lock_guard lock(cache->mutex);
    for (const auto& e : cache->entries)
      if (e.tid == tid && e.uid == uid && e.gid == gid && e.tid != 0 && now - e.at < kKeep) return e.groups;
  }
  auto groups = caller_groups(tid);
  std::lock_guard lock(cache->mutex);
  cache->entries[cache->next++ % cache->entries.size()] = Entry{tid, uid, gid, now, groups};
  return groups;
}

bool visible(fuse_req_t req, const Node& node) {
  const auto policy = node.exp->access.load();
  if (!policy || policy->allows_local_user(core::AccessClient{})) return true;
  const fuse_ctx* ctx = fuse_req_ctx(req);
  if (ctx->uid == 0) return true;
  core::AccessClient caller{.uid = ctx->uid, .gid = ctx->gid};
  caller.groups = cached_caller_groups(ctx->pid, ctx->uid, ctx->gid);
  return policy->allows_local_user(caller);
}

// An uncached file:// image that grew is followed when the kernel asks for
// the file's attributes (at most once a second: kAttrTimeout) or opens it,
// as it is when an NBD client connects: one stat of the image.
void follow_size(const Node& node) {
  if (node.exp->follow_size) node.exp->follow_size();
}

void reply_entry(fuse_req_t req, const Mount& mount, const Node& node) {
  follow_size(node);
  fuse_entry_param e{};
  e.ino = node.ino;
  e.generation = 1;
  e.attr = attr_of(mount.options(), node);
  // The kernel's caches are shared by every caller: a restricted file is
  // looked up again for each of them.
  e.attr_timeout = e.entry_timeout = restricted(node) ? 0.0 : kAttrTimeout;
  fuse_reply_entry(req, &e);
}

// ---------------------------------------------------------------- metadata

void op_init(void* userdata, fuse_conn_info* conn) {
  auto& mount = *static_cast<Mount*>(userdata);
  conn->max_write = kMaxIo;
  conn->max_read = kMaxIo;  // must match the max_read mount option
  conn->max_readahead = std::min<unsigned>(conn->max_readahead, kMaxIo);
  // Payloads go to a device buffer, not to an fd: splicing would add a copy.
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  // Every write reaches the export before write(2) returns: the export's
  // write mode, not the kernel's page cache, decides what a flush means.
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
  // Let readahead and async direct I/O keep many requests in flight.
  conn->max_background = 64;
  conn->congestion_threshold = 48;
  conn->time_gran = 1;
  try {
    mount.log().debug("FUSE session started (protocol {}.{}, max_write {})", conn->proto_major, conn->proto_minor,
                      conn->max_write);
  } catch (...) {  // called from libfuse's C code: nothing may escape
  }
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  auto& mount = mount_of(req);
  if (parent != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
  auto node = mount.inodes().lookup(name);
  if (!node || !visible(req, *node)) return (void)fuse_reply_err(req, ENOENT);
  reply_entry(req, mount, *node);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto& mount = mount_of(req);
  if (ino == FUSE_ROOT_ID) {
    const auto st = root_attr(mount);
    return (void)fuse_reply_attr(req, &st, kAttrTimeout);
  }
  auto node = find(mount, ino, fi);
  if (!node || !visible(req, *node)) return (void)fuse_reply_err(req, ENOENT);
  follow_size(*node);
  const auto st = attr_of(mount.options(), *node);
  fuse_reply_attr(req, &st, restricted(*node) ? 0.0 : kAttrTimeout);
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi) {
  auto& mount = mount_of(req);
  if (ino == FUSE_ROOT_ID) return (void)fuse_reply_err(req, EPERM);
  auto node = find(mount, ino, fi);
  if (!node) return (void)fuse_reply_err(req, ENOENT);
  // Owner and mode come from the configuration.
  if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) return (void)fuse_reply_err(req, EPERM);
  // An export has the size of its image: truncating to that size is a no-op,
  // any other size cannot be honoured.
  if ((to_set & FUSE_SET_ATTR_SIZE) && static_cast<uint64_t>(attr->st_size) != node->size())
    return (void)fuse_reply_err(req, node->read_only ? EROFS : EINVAL);
  if (to_set & FUSE_SET_ATTR_MTIME_NOW)
    node->mtime_ns.store(now_ns(), std::memory_order_relaxed);
  else if (to_set & FUSE_SET_ATTR_MTIME)
    node->mtime_ns.store(attr->st_mtim.tv_sec * 1000000000LL + attr->st_mtim.tv_nsec, std::memory_order_relaxed);
  const auto st = attr_of(mount.options(), *node);
  fuse_reply_attr(req, &st, kAttrTimeout);
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  auto& mount = mount_of(req);
  if (ino != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
  const auto files = mount.inodes().list();
  std::vector<std::pair<std::string, struct stat>> entries;
  entries.reserve(files.size() + 2);
  struct stat dir{};
  dir.st_ino = FUSE_ROOT_ID;
  dir.st_mode = S_IFDIR;
  entries.emplace_back(".", dir);
  entries.emplace_back("..", dir);
  for (const auto& [name, file_ino] : files) {
    if (auto node = mount.inodes().find(file_ino); !node || !visible(req, *node)) continue;
    struct stat st{};
    st.st_ino = file_ino;
    st.st_mode = S_IFREG;
    entries.emplace_back(name, st);
  }
  std::vector<char> buf(size);
  size_t used = 0;
  for (size_t i = static_cast<size_t>(std::max<off_t>(off, 0)); i < entries.size(); ++i) {
    const size_t need = fuse_add_direntry(req, buf.data() + used, size - used, entries[i].first.c_str(),
                                          &entries[i].second, static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto& mount = mount_of(req);
  if (ino == FUSE_ROOT_ID) return (void)fuse_reply_err(req, EISDIR);
  auto node = find(mount, ino, nullptr);
  if (!node || !visible(req, *node)) return (void)fuse_reply_err(req, ENOENT);
  if ((fi->flags & O_ACCMODE) != O_RDONLY && node->read_only) return (void)fuse_reply_err(req, EROFS);
  follow_size(*node);
  // No memory for the handle or its entry: ENOMEM from Guarded, nothing held.
  Handle* h = mount.inodes().open(std::move(node));
  fi->fh = reinterpret_cast<uint64_t>(h);
  fi->direct_io = mount.options().direct_io ? 1 : 0;
  fi->keep_cache = 0;  // opening again shows what NBD clients wrote meanwhile
  // O_TRUNC arrives here (libfuse asks for atomic_o_trunc by default) and is
  // ignored, as a block device ignores it: a shell's `> FILE` overwrites from
  // the start and the file keeps its size and its other bytes.
  if (fuse_reply_open(req, fi) != 0) mount.inodes().release(h);  // the opener was interrupted: no release will come
}

void op_release(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  mount_of(req).inodes().release(&handle_of(fi));
  fuse_reply_err(req, 0);
}

void op_statfs(fuse_req_t req, fuse_ino_t) {
  const auto totals = mount_of(req).inodes().totals();
  struct statvfs st{};
  st.f_bsize = 4096;
  st.f_frsize = 4096;
  st.f_blocks = (totals.bytes + 4095) / 4096;
  st.f_files = totals.files + 1;
  st.f_namemax = 255;
  fuse_reply_statfs(req, &st);
}

// ---------------------------------------------------------------- data

// Reads off a device's grid are widened by its BlockSizeLayer. One that
// reaches into a partial final block the device refuses fails with EIO, not
// short: the kernel takes a short read for the end of the file and would
// shrink the file's cached size. (Buffered readers still get every byte
// before that block: the kernel reads page by page after a failure.)
Task<void> do_read(fuse_req_t req, std::shared_ptr<Node> node, size_t n, uint64_t off) {
  IoBuffer buf(n);
  const std::error_code ec = co_await node->device().read(buf.span().first(n), off, 0);
  if (ec)
    fuse_reply_err(req, fuse_errno(ec));
  else
    fuse_reply_buf(req, reinterpret_cast<const char*>(buf.data()), n);
}

void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  auto node = handle_of(fi).node;
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  const auto offset = static_cast<uint64_t>(off);
  const uint64_t end = node->size();
  if (offset >= end || size == 0) return (void)fuse_reply_buf(req, nullptr, 0);  // end of file
  const size_t n = static_cast<size_t>(std::min<uint64_t>(size, end - offset));
  spawn(req, do_read(req, std::move(node), n, offset), n);
}

// A write on a device with min_block > 1 goes through its BlockSizeLayer
// (off the grid: read-modify-written; on it: ordered against those). When
// the device refuses the partial final block, the write is short up to it.
Task<void> do_write(fuse_req_t req, std::shared_ptr<Node> node, IoBuffer owner, const std::byte* data, size_t n,
                    uint64_t off, core::IoFlags flags) {
  const std::span<const std::byte> payload(data, n);
  core::BlockSizeLayer::Written done;
  if (node->blocks) {
    done = co_await node->blocks->write_some(payload, off, flags);
  } else {
    done.ec = co_await node->exp->device->write(payload, off, flags);
    done.written = n;
  }
  owner.reset();
  if (done.ec) {
    fuse_reply_err(req, fuse_errno(done.ec));
    co_return;
  }
  node->mtime_ns.store(now_ns(), std::memory_order_relaxed);
  fuse_reply_write(req, done.written);
}

void op_write(fuse_req_t req, fuse_ino_t, const char* data, size_t size, off_t off, fuse_file_info* fi) {
  auto& h = handle_of(fi);
  auto node = h.node;
  if (node->read_only) return (void)fuse_reply_err(req, EROFS);
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  const auto offset = static_cast<uint64_t>(off);
  if (size == 0) return (void)fuse_reply_write(req, 0);
  // The file cannot grow: like a block device, a write at the end has no space.
  const uint64_t end = node->size();
  if (offset >= end) return (void)fuse_reply_err(req, ENOSPC);
  const size_t n = static_cast<size_t>(std::min<uint64_t>(size, end - offset));
  IoBuffer owner;
  const std::byte* payload = reinterpret_cast<const std::byte*>(data);
  auto* reader = Reader::current;
  if (reader && reader->holds(data)) {
    owner = reader->take_buffer();  // zero copy: the reader gets a fresh buffer
  } else {
    owner = IoBuffer(n);
    std::memcpy(owner.data(), data, n);
    payload = owner.data();
  }
  // O_SYNC/O_DSYNC opens make every write durable before it is acknowledged.
  const core::IoFlags flags = (fi->flags & O_DSYNC) ? core::kFua : 0;
  h.wrote.store(true, std::memory_order_relaxed);
  // Read-modify-writes are placed like any transfer; writes on the grid as writes.
  const bool on_grid = node->on_grid(offset, n);
  spawn(req, do_write(req, std::move(node), std::move(owner), payload, n, offset, flags), n, on_grid);
}

Task<void> do_flush(fuse_req_t req, std::shared_ptr<Node> node) {
  const std::error_code ec = co_await node->exp->device->flush();
  fuse_reply_err(req, fuse_errno(ec));
}

// close(): flushes only if this file description wrote since its last flush,
// as an NBD client's disconnect does; a failed flush reaches close() as EIO.
void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  auto& h = handle_of(fi);
  if (!h.wrote.exchange(false, std::memory_order_acq_rel)) return (void)fuse_reply_err(req, 0);
  spawn(req, do_flush(req, h.node));
}

// fsync and fdatasync: the export's FLUSH (its write mode decides how far the
// data goes: the remote for writethrough/writeback, the local cache for
// writeback-local, the disk for a file).
void op_fsync(fuse_req_t req, fuse_ino_t, int /*datasync*/, fuse_file_info* fi) {
  auto& h = handle_of(fi);
  h.wrote.store(false, std::memory_order_relaxed);
  spawn(req, do_flush(req, h.node));
}

// Off the grid, partial blocks at the edges get zeroes written into them and
// the whole blocks between are zeroed (or deallocated) by the device.
Task<void> do_zero(fuse_req_t req, std::shared_ptr<Node> node, ByteRange range, core::IoFlags flags) {
  const std::error_code ec = co_await node->device().zero(range, flags);
  if (!ec) node->mtime_ns.store(now_ns(), std::memory_order_relaxed);
  fuse_reply_err(req, fuse_errno(ec));
}

void op_fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len, fuse_file_info* fi) {
  auto& h = handle_of(fi);
  const auto& node = h.node;
  constexpr int kKnown = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
  if (mode & ~kKnown) return (void)fuse_reply_err(req, EOPNOTSUPP);
  if (node->read_only) return (void)fuse_reply_err(req, EROFS);
  if (off < 0 || len <= 0 || off > LLONG_MAX - len) return (void)fuse_reply_err(req, EINVAL);
  const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
  uint64_t start = static_cast<uint64_t>(off);
  uint64_t end = start + static_cast<uint64_t>(len);
  if (const uint64_t size = node->size(); end > size) {
    if (!keep_size) return (void)fuse_reply_err(req, ENOSPC);  // the file cannot grow
    end = size;
  }
  if (start >= end || !(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)))
    return (void)fuse_reply_err(req, 0);  // plain allocation: the image already has its size
  h.wrote.store(true, std::memory_order_relaxed);
  // PUNCH_HOLE promises zeroes afterwards, which an advisory TRIM does not:
  // it is WRITE_ZEROES that may deallocate (the file backend punches a hole).
  // ZERO_RANGE keeps the range allocated: WRITE_ZEROES with NO_HOLE.
  const core::IoFlags flags = (mode & FALLOC_FL_PUNCH_HOLE) ? 0 : core::kNoHole;
  spawn(req, do_zero(req, node, ByteRange{start, end - start}, flags));
}

// Block status from `from` on (a BlockSizeLayer asks the device from its
// grid and cuts the answer back to `from`).
Task<void> do_lseek(fuse_req_t req, std::shared_ptr<Node> node, uint64_t from, int whence) {
  const uint64_t size = node->size();
  uint64_t pos = from;
  while (pos < size) {
    ExtentList extents;
    std::error_code ec = co_await node->device().block_status(ByteRange{pos, size - pos}, extents);
    if (!ec && extents.empty()) ec = core::errno_code(EIO);
    if (ec) {
      fuse_reply_err(req, fuse_errno(ec));
      co_return;
    }
    for (const auto& e : extents) {
      const bool hole = e.flags & core::kExtentHole;
      if ((whence == SEEK_DATA ? !hole : hole) && pos + e.length > from) {
        fuse_reply_lseek(req, static_cast<off_t>(std::max(pos, from)));
        co_return;
      }
      if (e.length == 0) {  // a device bug: do not loop forever
        fuse_reply_err(req, EIO);
        co_return;
      }
      pos = std::min(size, pos + e.length);
      if (pos >= size) break;
    }
  }
  // No data after pos; the end of the file is an implicit hole.
  if (whence == SEEK_DATA)
    fuse_reply_err(req, ENXIO);
  else
    fuse_reply_lseek(req, static_cast<off_t>(size));
}

void op_lseek(fuse_req_t req, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
  auto node = handle_of(fi).node;
  if (whence != SEEK_DATA && whence != SEEK_HOLE) return (void)fuse_reply_err(req, EINVAL);
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  if (static_cast<uint64_t>(off) >= node->size()) return (void)fuse_reply_err(req, ENXIO);
  spawn(req, do_lseek(req, std::move(node), static_cast<uint64_t>(off), whence));
}

}  // namespace

const fuse_lowlevel_ops& operations() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o{};
    o.init = op_init;
    o.lookup = Guarded<op_lookup>::call;
    o.getattr = Guarded<op_getattr>::call;
    o.setattr = Guarded<op_setattr>::call;
    o.readdir = Guarded<op_readdir>::call;
    o.open = Guarded<op_open>::call;
    o.release = Guarded<op_release>::call;
    o.read = Guarded<op_read>::call;
    o.write = Guarded<op_write>::call;
    o.flush = Guarded<op_flush>::call;
    o.fsync = Guarded<op_fsync>::call;
    o.fallocate = Guarded<op_fallocate>::call;
    o.lseek = Guarded<op_lseek>::call;
    o.statfs = Guarded<op_statfs>::call;
    return o;
  }();
  return ops;
}

}  // namespace blockway::fuse
