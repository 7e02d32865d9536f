#include "cache/overlay_config.hpp"

#include <bit>

namespace blockway::cache {
namespace {

using core::OptionKind;
using core::OptionSpec;

const OptionSpec kOverlay{.name = "overlay",
                          .kind = OptionKind::text,
                          .help = "clone:BASE only: directory of the clone's overlay file (absolute path; "
                                  "default DATA-DIR/overlays)",
                          .value = "DIR"};
const OptionSpec kGranularity{.name = "granularity",
                              .kind = OptionKind::size,
                              .help = "clone:BASE only: overlay block, a power of two from 4k to 64k (default 64k)"};

const OptionSpec kAll[] = {kOverlay, kGranularity};

}  // namespace

std::optional<std::string> clone_base_of(const std::string& uri) {
  constexpr std::string_view kScheme = "clone:";
  if (uri.compare(0, kScheme.size(), kScheme) != 0) return std::nullopt;
  return uri.substr(kScheme.size());
}

std::span<const core::OptionSpec> OverlayConfig::options() { return kAll; }

bool OverlayConfig::given(const core::Options& options) {
  for (const auto& spec : kAll)
    if (options.has(spec)) return true;
  return false;
}

OverlayConfig OverlayConfig::take_from(core::Options& options, const std::string& default_dir) {
  OverlayConfig c;
  c.dir = options.text(kOverlay).value_or(default_dir);
  if (c.dir.empty() || c.dir.front() != '/') throw options.error(kOverlay, "needs an absolute directory path");
  if (auto g = options.size(kGranularity)) {
    c.granularity = *g;
    if (c.granularity < 4096 || c.granularity > (64u << 10) || !std::has_single_bit(c.granularity))
      throw options.error(kGranularity, "must be a power of two between 4k and 64k");
  }
  return c;
}

}  // namespace blockway::cache
