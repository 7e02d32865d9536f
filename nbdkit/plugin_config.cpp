#include "nbdkit/plugin_config.hpp"

#include "cache/cache_config.hpp"
#include "core/logging.hpp"
#include "core/qos_layer.hpp"
#include "core/retry_layer.hpp"
#include "remote/registry.hpp"
#include "stack/export_stack.hpp"

namespace blockway::nbdkit {

using core::ConfigError;
using core::OptionKind;
using core::OptionSpec;

namespace {

const OptionSpec kOwn[] = {
    {.name = "uri",
     .kind = OptionKind::text,
     .help = "the image to serve, as in blockwayd --export NAME=URI (file://, nbd://, iscsi://, nfs://, aoe://, "
             "rbd://, ...); the key may be left out: nbdkit blockway URI",
     .value = "URI"},
    {.name = "name",
     .kind = OptionKind::text,
     .help = "the export's name in the cache's catalogue and in messages (default nbdkit)",
     .value = "NAME"},
    {.name = "data-dir",
     .kind = OptionKind::text,
     .help = "where the catalogue (catalogue.db) lives (default: the cache directory)",
     .value = "DIR"},
    {.name = "threads",
     .kind = OptionKind::number,
     .help = "event-loop threads of the stack: remote sessions, the cache's background work, and requests over a network remote without a cache (default 2)",
     .min = 1,
     .max = 64},
    {.name = "log-level",
     .kind = OptionKind::choice,
     .help = "blockway's log level on stderr (default warn)",
     .choices = {"debug", "info", "warn", "error"}},
    {.name = "read-only",
     .kind = OptionKind::flag,
     .help = "serve the export read-only (default off; nbdkit -r does the same)",
     .aliases = {"ro", "readonly"}},
    {.name = "description",
     .kind = OptionKind::text,
     .help = "what NBD clients are told it is",
     .value = "TEXT"},
};
const OptionSpec& kUri = kOwn[0];
const OptionSpec& kName = kOwn[1];
const OptionSpec& kDataDir = kOwn[2];
const OptionSpec& kThreads = kOwn[3];
const OptionSpec& kLogLevel = kOwn[4];
const OptionSpec& kReadOnly = kOwn[5];
const OptionSpec& kDescription = kOwn[6];

bool is_own(const std::string& key) {
  for (const auto& s : kOwn) {
    if (key == s.name) return true;
    for (auto a : s.aliases)
      if (!a.empty() && key == a) return true;
  }
  return false;
}

void entries(std::string& out, std::span<const OptionSpec> specs) {
  for (const auto& s : specs) out += s.usage() + "\n    " + s.describe() + "\n";
}

}  // namespace

std::span<const OptionSpec> PluginConfig::options_table() { return kOwn; }

void PluginConfig::add(const std::string& key, const std::string& value) {
  auto& into = is_own(key) ? own_ : options;
  if (!into.emplace(key, value).second) throw ConfigError("option " + key + " is given twice");
}

void PluginConfig::complete() {
  core::Options own(own_, "nbdkit blockway");
  if (auto v = own.text(kName)) {
    if (v->empty()) throw own.error(kName, "must not be empty");
    name = *v;
  }
  if (auto v = own.text(kUri)) uri = *v;
  if (auto v = own.text(kDataDir)) data_dir = *v;
  if (auto v = own.number(kThreads)) threads = static_cast<unsigned>(*v);
  if (auto v = own.choice(kLogLevel)) log_level = *v;
  if (auto v = own.flag(kReadOnly)) read_only = *v;
  if (auto v = own.text(kDescription)) description = *v;
  own.finish();
  if (uri.empty())
    throw ConfigError("nbdkit blockway: the image to serve is missing: give uri=URI (or the URI alone), e.g. "
                      "file:///var/lib/images/vm.img or nbd://host/name");
  // The export options, read the way the stack reads them, on a copy: the
  // stack takes them again when it opens.
  auto copy = options;
  core::Options o(copy, where());
  const auto layers = stack::check(uri, o);
  o.finish();
  if (data_dir.empty() && layers.cache) data_dir = layers.cache->dir;
}

std::string PluginConfig::help() {
  std::string out = "The plugin's own keys:\n";
  entries(out, kOwn);
  out += "Every export option of blockwayd --export NAME=URI,KEY=VALUE:\n";
  entries(out, core::QosLimits::options());
  out += "with a cache (cache=DIR):\n";
  entries(out, cache::CacheConfig::options());
  for (const auto& b : remote::backends()) {
    if (b.options.empty() && !b.retry()) continue;
    out += std::string(b.name) + " backend:\n";
    entries(out, b.options);
    if (b.retry()) entries(out, std::span(&core::RetryOptions::kTimeoutOption, 1));
  }
  return out;
}

}  // namespace blockway::nbdkit
