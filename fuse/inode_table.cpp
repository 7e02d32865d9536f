#include "fuse/inode_table.hpp"

#include "core/logging.hpp"

#include <algorithm>

namespace blockway::fuse {

int64_t now_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

timespec to_timespec(int64_t ns) noexcept {
  return timespec{static_cast<time_t>(ns / 1000000000LL), static_cast<long>(ns % 1000000000LL)};
}

bool representable_name(const std::string& name) noexcept {
  return !name.empty() && name.size() <= 255 && name != "." && name != ".." &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

InodeTable::InodeTable(std::shared_ptr<spdlog::logger> log) : log_(std::move(log)) {}

InodeTable::~InodeTable() { release_all(); }

void InodeTable::add(const std::shared_ptr<core::Export>& exp) {
  if (!representable_name(exp->name)) {
    log_->warn("export '{}' has a name that cannot be a file name; not shown in the FUSE mount", exp->name);
    return;
  }
  auto node = std::make_shared<Node>();
  node->ino = next_ino_++;
  node->name = exp->name;
  node->exp = exp;
  const auto geometry = exp->device->geometry();
  node->read_only = exp->device->capabilities().read_only;
  // Requests off the device's grid are widened or read-modify-written there;
  // its log names the file as the front end's own messages do.
  if (geometry.min_block > 1)
    node->blocks = std::make_unique<core::BlockSizeLayer>(exp->device, "FUSE: " + exp->name, log_);
  node->created_ns = now_ns();
  node->mtime_ns.store(node->created_ns, std::memory_order_relaxed);
  by_ino_[node->ino] = node;
  by_name_[node->name] = std::move(node);
}

void InodeTable::reset(const std::vector<std::shared_ptr<core::Export>>& exports) {
  std::lock_guard lock(mutex_);
  by_name_.clear();
  by_ino_.clear();
  for (const auto& exp : exports) add(exp);
}

bool InodeTable::apply(const std::shared_ptr<core::Export>& exp, core::ExportEvent event) {
  std::lock_guard lock(mutex_);
  if (event == core::ExportEvent::added) {
    if (by_name_.count(exp->name)) return false;
    add(exp);
    return true;
  }
  auto it = by_name_.find(exp->name);
  if (it == by_name_.end() || it->second->exp != exp) return false;
  by_ino_.erase(it->second->ino);
  by_name_.erase(it);
  return true;
}

std::shared_ptr<Node> InodeTable::find(fuse_ino_t ino) const {
  std::lock_guard lock(mutex_);
  auto it = by_ino_.find(ino);
  return it == by_ino_.end() ? nullptr : it->second;
}

std::shared_ptr<Node> InodeTable::lookup(const std::string& name) const {
  std::lock_guard lock(mutex_);
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

std::vector<std::pair<std::string, fuse_ino_t>> InodeTable::list() const {
  std::lock_guard lock(mutex_);
  std::vector<std::pair<std::string, fuse_ino_t>> out;
  out.reserve(by_name_.size());
  for (const auto& [name, node] : by_name_) out.emplace_back(name, node->ino);
  return out;
}

InodeTable::Totals InodeTable::totals() const {
  std::lock_guard lock(mutex_);
  Totals t;
  for (const auto& [name, node] : by_name_) t.bytes += node->size();
  t.files = by_name_.size();
  return t;
}

Handle* InodeTable::open(std::shared_ptr<Node> node) {
  // Owned here until the set holds it: an insert that throws (no memory)
  // frees it.
  auto owned = std::make_unique<Handle>(std::move(node));
  {
    std::lock_guard lock(mutex_);
    handles_.insert(owned.get());
  }
  return owned.release();  // now the set's (freed by release() or release_all())
}

void InodeTable::release(Handle* h) noexcept {
  {
    std::lock_guard lock(mutex_);
    handles_.erase(h);
  }
  delete h;
}

void InodeTable::release_all() noexcept {
  std::unordered_set<Handle*> open;
  {
    std::lock_guard lock(mutex_);
    open.swap(handles_);
  }
  for (auto* h : open) delete h;
}

}  // namespace blockway::fuse
