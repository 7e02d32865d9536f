#include "cache/cache_config.hpp"

#include <bit>

namespace blockway::cache {
namespace {

using core::OptionKind;
using core::OptionSpec;

const OptionSpec kCache{.name = "cache",
                        .kind = OptionKind::text,
                        .help = "keep a local cache of the image in this directory (absolute path)",
                        .value = "DIR"};
const OptionSpec kMode{.name = "mode",
                       .kind = OptionKind::choice,
                       .help = "when a write is acknowledged (default writethrough; see README)",
                       .choices = {"writethrough", "writeback", "writeback-local"}};
const OptionSpec kChunk{.name = "chunk",
                        .kind = OptionKind::size,
                        .help = "cache unit, a power of two from 4k to 16M (default 64k)"};
const OptionSpec kPreallocate{.name = "preallocate",
                              .kind = OptionKind::flag,
                              .help = "allocate the whole cache file at start (default off)"};
const OptionSpec kReadahead{.name = "readahead",
                            .kind = OptionKind::size,
                            .help = "fetched ahead of a sequential miss (default 16 chunks; 0: none)",
                            .max = 64u << 20};
const OptionSpec kCapacity{.name = "capacity",
                           .kind = OptionKind::size,
                           .help = "bytes of the image to keep, evicting clean chunks (default 0: all)"};
const OptionSpec kWritebackDelay{.name = "writeback-delay",
                                 .kind = OptionKind::seconds,
                                 .help = "how long dirty data waits before write-back starts (default 5)",
                                 .min = 0,
                                 .max = 3600};
const OptionSpec kPrefetch{.name = "prefetch",
                           .kind = OptionKind::choice,
                           .help = "copy the whole image into the cache from the start (default off)",
                           .choices = {"off", "sequential", "hot-first", "on=sequential"}};
const OptionSpec kPrefetchRate{.name = "prefetch-rate",
                               .kind = OptionKind::size,
                               .help = "bytes per second the prefetch may copy (default 0: no limit)"};
const OptionSpec kAutoDetach{.name = "auto-detach",
                             .kind = OptionKind::flag,
                             .help = "run from the cache alone once every chunk is in it (default off)"};

const OptionSpec kAll[] = {kCache,    kMode,           kChunk,    kPreallocate,  kReadahead,
                           kCapacity, kWritebackDelay, kPrefetch, kPrefetchRate, kAutoDetach};

}  // namespace

std::string to_string(WriteMode mode) {
  switch (mode) {
    case WriteMode::writethrough: return "writethrough";
    case WriteMode::writeback: return "writeback";
    case WriteMode::writeback_local: return "writeback-local";
  }
  return "?";
}

std::span<const core::OptionSpec> CacheConfig::options() { return kAll; }

std::optional<CacheConfig> CacheConfig::take_from(core::Options& options) {
  const auto dir = options.text(kCache);
  if (!dir) {
    for (const auto& spec : kAll)
      if (options.has(spec))
        throw options.error(spec, "needs a cache directory (cache=DIR)");
    return std::nullopt;
  }
  CacheConfig c;
  c.dir = *dir;
  if (c.dir.empty() || c.dir.front() != '/') throw options.error(kCache, "needs an absolute directory path");
  if (auto mode = options.choice(kMode)) {
    if (*mode == "writeback")
      c.mode = WriteMode::writeback;
    else if (*mode == "writeback-local")
      c.mode = WriteMode::writeback_local;
  }
  if (auto chunk = options.size(kChunk)) {
    c.chunk_size = *chunk;
    if (c.chunk_size < 4096 || c.chunk_size > (16u << 20) || !std::has_single_bit(c.chunk_size))
      throw options.error(kChunk, "must be a power of two between 4k and 16M");
  }
  if (auto prealloc = options.flag(kPreallocate)) c.preallocate = *prealloc;
  if (auto capacity = options.size(kCapacity)) {
    c.capacity = *capacity;
    if (c.capacity != 0 && c.capacity < 64 * c.chunk_size)
      throw options.error(kCapacity, "must be 0 (unlimited) or at least 64 chunks (" +
                                         std::to_string(64 * c.chunk_size) + " bytes)");
  }
  if (auto delay = options.seconds(kWritebackDelay)) c.writeback_delay = *delay;
  if (auto readahead = options.size(kReadahead)) c.readahead_chunks = static_cast<uint32_t>(*readahead / c.chunk_size);
  if (auto prefetch = options.choice(kPrefetch)) {
    c.prefetch_auto = *prefetch != "off";
    c.prefetch_order = *prefetch == "hot-first" ? core::PrefetchOrder::hot_first : core::PrefetchOrder::sequential;
  }
  if (auto rate = options.size(kPrefetchRate)) c.prefetch_rate = *rate;
  if (auto detach = options.flag(kAutoDetach)) c.auto_detach = *detach;
  return c;
}

}  // namespace blockway::cache
