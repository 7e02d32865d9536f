#include "core/options.hpp"

#include <cctype>
#include <charconv>
#include <string>

namespace blockway::core {
namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

uint64_t parse_size(std::string_view text, std::string_view what) {
  if (text.empty()) throw ConfigError(std::string(what) + ": empty size");
  uint64_t mult = 1;
  switch (std::tolower(static_cast<unsigned char>(text.back()))) {
    case 'k': mult = 1ull << 10; break;
    case 'm': mult = 1ull << 20; break;
    case 'g': mult = 1ull << 30; break;
    case 't': mult = 1ull << 40; break;
    default: break;
  }
  if (mult != 1) text.remove_suffix(1);
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc{} || p != text.data() + text.size())
    throw ConfigError(std::string(what) + ": '" + std::string(text) + "' is not a valid number");
  if (v > UINT64_MAX / mult) throw ConfigError(std::string(what) + ": size is too large");
  return v * mult;
}

bool parse_bool(std::string_view text, std::string_view what) {
  const auto t = lower(text);
  if (t == "on" || t == "true" || t == "yes" || t == "1") return true;
  if (t == "off" || t == "false" || t == "no" || t == "0") return false;
  throw ConfigError(std::string(what) + ": '" + std::string(text) + "' is not on/off");
}

}  // namespace blockway::core
