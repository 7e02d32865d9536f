#include "cache/cache_config.hpp"

#include "gateway/config.hpp"

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
  using gateway::ConfigError;
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
  if (!dir) {
    for (const char* k : {"mode", "chunk", "preallocate", "readahead"})
      if ((k == std::string("mode") && mode) || (k == std::string("chunk") && chunk) ||
          (k == std::string("preallocate") && prealloc) || (k == std::string("readahead") && readahead))
        throw ConfigError(where + "option '" + k + "' needs a cache directory (cache=DIR)");
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
    c.chunk_size = gateway::parse_size(*chunk, where + "chunk");
    if (c.chunk_size < 4096 || c.chunk_size > (16u << 20) || !std::has_single_bit(c.chunk_size))
      throw ConfigError(where + "chunk must be a power of two between 4k and 16M");
  }
  if (prealloc) c.preallocate = gateway::parse_bool(*prealloc, where + "preallocate");
  if (readahead) {
    const auto v = gateway::parse_size(*readahead, where + "readahead");
    if (v > (64u << 20)) throw ConfigError(where + "readahead must be at most 64M");
    c.readahead_chunks = static_cast<uint32_t>(v / c.chunk_size);
  }
  return c;
}

}  // namespace blockway::cache
