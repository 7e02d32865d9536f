// InodeTable: the files of the mount (one Node per export, by name and by
// inode number) and the open files (Handle: one per open file description).
//
// Thread model: one mutex guards the maps and the set of open handles; it is
// taken by operations on any reader loop, by ExportTable observers on the
// thread that changed the exports, and by the mount's lifecycle (which may
// hold the mount's own mutex meanwhile: lock order mount, then table). A
// Node is immutable after creation apart from its mtime (atomic) and its
// BlockSizeLayer (thread-safe); operations hold it by shared_ptr, so a node
// removed from the table stays usable through handles opened before.
#pragma once

#include "core/block_size_layer.hpp"
#include "core/export.hpp"
#include "fuse/libfuse.hpp"

#include <atomic>
#include <cstdint>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace spdlog {
class logger;
}

namespace blockway::fuse {

// Now, in nanoseconds of CLOCK_REALTIME (file times).
int64_t now_ns() noexcept;
timespec to_timespec(int64_t ns) noexcept;

// Export names that can be a file name in the mount (no '/', not . or ..,
// at most 255 bytes).
bool representable_name(const std::string& name) noexcept;

// One export in the mount.
struct Node {
  fuse_ino_t ino = 0;
  std::string name;
  std::shared_ptr<core::Export> exp;
  bool read_only = false;
  // On the export's device when its min_block > 1, for requests off that
  // grid (and, so that they are ordered against those, for every write and
  // zero); null otherwise.
  std::unique_ptr<core::BlockSizeLayer> blocks;
  int64_t created_ns = 0;
  std::atomic<int64_t> mtime_ns{0};

  // The file's size: the export's as it is now, so a file follows its
  // export when it grows while served (a grown file:// image, an rbd resize,
  // a remote that grew); read once per request. Through a BlockSizeLayer
  // (min_block > 1) the size the file had when it appeared, which that layer
  // keeps.
  [[nodiscard]] uint64_t size() const noexcept {
    return blocks ? blocks->geometry().size : exp->device->geometry().size;
  }

  // Where reads, zeroes and block status go.
  [[nodiscard]] core::BlockDevice& device() const noexcept {
    return blocks ? static_cast<core::BlockDevice&>(*blocks) : *exp->device;
  }
  [[nodiscard]] bool on_grid(uint64_t offset, uint64_t length) const noexcept {
    return !blocks || blocks->on_grid(offset, length);
  }
};

// One open file description.
struct Handle {
  explicit Handle(std::shared_ptr<Node> n) : node(std::move(n)) {}
  std::shared_ptr<Node> node;
  std::atomic<bool> wrote{false};  // since the last flush through this handle
};

class InodeTable {
 public:
  explicit InodeTable(std::shared_ptr<spdlog::logger> log);
  ~InodeTable();
  InodeTable(const InodeTable&) = delete;
  InodeTable& operator=(const InodeTable&) = delete;

  // A fresh table of these exports (at mount time): new inode numbers.
  void reset(const std::vector<std::shared_ptr<core::Export>>& exports);
  // An export added or removed: true if the table changed.
  bool apply(const std::shared_ptr<core::Export>& exp, core::ExportEvent event);

  [[nodiscard]] std::shared_ptr<Node> find(fuse_ino_t ino) const;
  [[nodiscard]] std::shared_ptr<Node> lookup(const std::string& name) const;
  // (name, inode) of every file, by name.
  [[nodiscard]] std::vector<std::pair<std::string, fuse_ino_t>> list() const;
  struct Totals {
    uint64_t bytes = 0;
    size_t files = 0;
  };
  [[nodiscard]] Totals totals() const;

  // Open files: the kernel sends no RELEASE for those still open when a
  // session is cut off, so release_all() frees the rest when it ends.
  // open() throws std::bad_alloc (and then owns nothing).
  Handle* open(std::shared_ptr<Node> node);
  void release(Handle* h) noexcept;
  void release_all() noexcept;

 private:
  void add(const std::shared_ptr<core::Export>& exp);  // mutex_ held

  std::shared_ptr<spdlog::logger> log_;
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<Node>> by_name_;
  std::unordered_map<fuse_ino_t, std::shared_ptr<Node>> by_ino_;
  fuse_ino_t next_ino_ = FUSE_ROOT_ID + 1;
  std::unordered_set<Handle*> handles_;
};

}  // namespace blockway::fuse
