#include "cache/cache_config.hpp"

#include "core/options.hpp"

#include <bit>

namespace blockway::cache {

std::string to_string(WriteMode mode) {
  switch (mode) {
    case WriteMode::writethrough: return "writethrough";
    case WriteMode::writeback: return "writeback";
    case WriteMode::writeback_local: return "writeback-local";
  }
  return "?";
}

std::optional<CacheConfig> CacheConfig::take_from(std::map<std::string, std::string>& options,
                                                  const std::string& export_name) {
  using core::ConfigError;
  const std::string where = "export '" + export_name + "': ";
  auto take = [&](const char* key) -> std::optional<std::string> {
    auto it = options.find(key);
    if (it == options.end()) return std::nullopt;
    auto v = it->second;
    options.erase(it);
    return v;
  };
  auto dir = take("cache");
  auto mode = take("mode");
  auto chunk = take("chunk");
  auto prealloc = take("preallocate");
  auto readahead = take("readahead");
  auto capacity = take("capacity");
  auto wb_delay = take("writeback-delay");
  auto prefetch = take("prefetch");
  auto prefetch_rate = take("prefetch-rate");
  auto auto_detach = take("auto-detach");
  if (!dir) {
    const std::pair<const char*, bool> given[] = {
        {"mode", mode.has_value()}, {"chunk", chunk.has_value()}, {"preallocate", prealloc.has_value()},
        {"readahead", readahead.has_value()}, {"capacity", capacity.has_value()},
        {"writeback-delay", wb_delay.has_value()}, {"prefetch", prefetch.has_value()},
        {"prefetch-rate", prefetch_rate.has_value()}, {"auto-detach", auto_detach.has_value()}};
    for (const auto& [key, present] : given)
      if (present) throw ConfigError(where + "option '" + key + "' needs a cache directory (cache=DIR)");
    return std::nullopt;
  }
  CacheConfig c;
  c.dir = *dir;
  if (c.dir.empty() || c.dir.front() != '/') throw ConfigError(where + "cache= needs an absolute directory path");
  if (mode) {
    if (*mode == "writethrough")
      c.mode = WriteMode::writethrough;
    else if (*mode == "writeback")
      c.mode = WriteMode::writeback;
    else if (*mode == "writeback-local")
      c.mode = WriteMode::writeback_local;
    else
      throw ConfigError(where + "mode '" + *mode + "' is not writethrough, writeback or writeback-local");
  }
  if (chunk) {
    c.chunk_size = core::parse_size(*chunk, where + "chunk");
    if (c.chunk_size < 4096 || c.chunk_size > (16u << 20) || !std::has_single_bit(c.chunk_size))
      throw ConfigError(where + "chunk must be a power of two between 4k and 16M");
  }
  if (prealloc) c.preallocate = core::parse_bool(*prealloc, where + "preallocate");
  if (capacity) {
    c.capacity = core::parse_size(*capacity, where + "capacity");
    if (c.capacity != 0 && c.capacity < 64 * c.chunk_size)
      throw ConfigError(where + "capacity must be 0 (unlimited) or at least 64 chunks (" +
                        std::to_string(64 * c.chunk_size) + " bytes)");
  }
  if (wb_delay) {
    const auto v = core::parse_size(*wb_delay, where + "writeback-delay");
    if (v > 3600) throw ConfigError(where + "writeback-delay must be at most 3600 seconds");
    c.writeback_delay = std::chrono::milliseconds(v * 1000);
  }
  if (readahead) {
    const auto v = core::parse_size(*readahead, where + "readahead");
    if (v > (64u << 20)) throw ConfigError(where + "readahead must be at most 64M");
    c.readahead_chunks = static_cast<uint32_t>(v / c.chunk_size);
  }
  if (prefetch) {
    if (*prefetch == "off") {
      c.prefetch_auto = false;
    } else if (*prefetch == "sequential" || *prefetch == "on") {
      c.prefetch_auto = true;
      c.prefetch_order = core::PrefetchOrder::sequential;
    } else if (*prefetch == "hot-first") {
      c.prefetch_auto = true;
      c.prefetch_order = core::PrefetchOrder::hot_first;
    } else {
      throw ConfigError(where + "prefetch '" + *prefetch + "' is not off, sequential or hot-first");
    }
  }
  if (prefetch_rate) c.prefetch_rate = core::parse_size(*prefetch_rate, where + "prefetch-rate");
  if (auto_detach) c.auto_detach = core::parse_bool(*auto_detach, where + "auto-detach");
  return c;
}

}  // namespace blockway::cache
