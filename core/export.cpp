#include "core/export.hpp"

#include <mutex>
#include <stdexcept>

namespace blockway::core {

void ExportTable::add(std::shared_ptr<Export> exp) {
  if (exp->name.empty() || exp->name.size() > 4096)
    throw std::invalid_argument("export name must be 1 to 4096 bytes");
  {
    std::unique_lock lock(mutex_);
    auto [it, inserted] = exports_.emplace(exp->name, exp);
    if (!inserted) throw std::invalid_argument("export '" + exp->name + "' is defined twice");
  }
  notify(exp, ExportEvent::added);
}

std::shared_ptr<Export> ExportTable::remove(const std::string& name) {
  std::shared_ptr<Export> exp;
  {
    std::unique_lock lock(mutex_);
    auto it = exports_.find(name);
    if (it == exports_.end()) return nullptr;
    exp = it->second;
    exports_.erase(it);
  }
  notify(exp, ExportEvent::removed);
  return exp;
}

uint64_t ExportTable::subscribe(ExportObserver observer) {
  std::lock_guard lock(observers_mutex_);
  const uint64_t id = next_observer_++;
  observers_.emplace(id, std::move(observer));
  return id;
}

void ExportTable::unsubscribe(uint64_t id) {
  std::lock_guard lock(observers_mutex_);
  observers_.erase(id);
}

void ExportTable::notify(const std::shared_ptr<Export>& exp, ExportEvent event) {
  std::lock_guard lock(observers_mutex_);
  for (const auto& [id, observer] : observers_) observer(exp, event);
}

std::shared_ptr<Export> ExportTable::find(const std::string& name) const {
  std::shared_lock lock(mutex_);
  const std::string& key = name.empty() ? default_name_ : name;
  if (key.empty()) return exports_.size() == 1 ? exports_.begin()->second : nullptr;
  auto it = exports_.find(key);
  return it == exports_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<Export>> ExportTable::list() const {
  std::shared_lock lock(mutex_);
  std::vector<std::shared_ptr<Export>> out;
  out.reserve(exports_.size());
  for (const auto& [name, exp] : exports_) out.push_back(exp);
  return out;
}

void ExportTable::set_default(std::string name) {
  std::unique_lock lock(mutex_);
  default_name_ = std::move(name);
}

}  // namespace blockway::core
