#include "core/options.hpp"

#include <algorithm>
#include <cassert>
#include <cctype>
#include <charconv>
#include <cmath>

namespace blockway::core {
namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// "0.1", "86400", "4294967294": a bound as people write it.
std::string number_text(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc{} ? std::string(buf, end) : std::to_string(v);
}

// "64M" for bounds of sizes that are a whole number of a binary unit.
std::string size_text(uint64_t v) {
  static constexpr std::pair<uint64_t, char> units[] = {{1ull << 40, 'T'}, {1ull << 30, 'G'}, {1ull << 20, 'M'},
                                                        {1ull << 10, 'k'}};
  for (auto [unit, suffix] : units)
    if (v >= unit && v % unit == 0) return std::to_string(v / unit) + suffix;
  return std::to_string(v);
}

// "0644": a file mode as people write it.
std::string octal_text(uint64_t v) {
  if (v == 0) return "0";
  // The leading 0 goes into the buffer: GCC 12 at -O3 warns (-Wrestrict, a
  // false positive) on "0" + std::string.
  char buf[32] = {'0'};
  auto r = std::to_chars(buf + 1, buf + sizeof buf, v, 8);
  return std::string(buf, r.ptr);
}

[[noreturn]] void bad_value(std::string_view what, std::string_view text, const std::string& expected) {
  throw ConfigError(std::string(what) + "='" + std::string(text) + "': expected " + expected);
}

// The listed choices: not empty, not a "WORD=OTHER" synonym.
bool listed(std::string_view choice) { return !choice.empty() && choice.find('=') == std::string_view::npos; }

std::string choices_text(const OptionSpec& spec, std::string_view sep, std::string_view last) {
  std::string out;
  size_t n = 0;
  for (auto c : spec.choices) n += listed(c);
  size_t i = 0;
  for (auto c : spec.choices) {
    if (!listed(c)) continue;
    if (i > 0) out += i + 1 == n ? last : sep;
    out += c;
    ++i;
  }
  return out;
}

std::string_view default_placeholder(OptionKind kind) {
  switch (kind) {
    case OptionKind::text: return "TEXT";
    case OptionKind::flag: return "on|off";
    case OptionKind::size: return "SIZE";
    case OptionKind::seconds: return "SECONDS";
    case OptionKind::number: return "N";
    case OptionKind::octal: return "MODE";
    case OptionKind::choice: return {};
  }
  return "VALUE";
}

}  // namespace

uint64_t parse_size(std::string_view text, std::string_view what) {
  static const std::string expected = "a size in bytes, or with a binary suffix k, M, G or T (64k, 32M)";
  std::string_view digits = text;
  uint64_t mult = 1;
  if (!digits.empty()) {
    switch (std::tolower(static_cast<unsigned char>(digits.back()))) {
      case 'k': mult = 1ull << 10; break;
      case 'm': mult = 1ull << 20; break;
      case 'g': mult = 1ull << 30; break;
      case 't': mult = 1ull << 40; break;
      default: break;
    }
  }
  if (mult != 1) digits.remove_suffix(1);
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
  if (ec == std::errc::result_out_of_range || (ec == std::errc{} && v > UINT64_MAX / mult))
    throw ConfigError(std::string(what) + "='" + std::string(text) + "': the size is too large");
  if (digits.empty() || ec != std::errc{} || end != digits.data() + digits.size()) bad_value(what, text, expected);
  return v * mult;
}

bool parse_bool(std::string_view text, std::string_view what) {
  const auto t = lower(text);
  if (t == "on" || t == "true" || t == "yes" || t == "1") return true;
  if (t == "off" || t == "false" || t == "no" || t == "0") return false;
  bad_value(what, text, "on or off (or true/false, yes/no, 1/0)");
}

std::chrono::milliseconds parse_seconds(std::string_view text, std::string_view what, double min, double max) {
  double seconds = -1;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), seconds);
  const bool ok = !text.empty() && ec == std::errc{} && end == text.data() + text.size() && std::isfinite(seconds);
  if (!ok || !(seconds >= min && seconds <= max)) {
    if (std::isinf(max)) bad_value(what, text, "seconds from " + number_text(min) + " (decimals allowed)");
    bad_value(what, text, "seconds from " + number_text(min) + " to " + number_text(max));
  }
  return std::chrono::milliseconds(static_cast<int64_t>(std::llround(seconds * 1000)));
}

uint64_t parse_number(std::string_view text, std::string_view what, uint64_t min, uint64_t max, int base) {
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v, base);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || v < min || v > max) {
    if (base == 8) bad_value(what, text, "an octal number from " + octal_text(min) + " to " + octal_text(max));
    bad_value(what, text, "a number from " + std::to_string(min) + " to " + std::to_string(max));
  }
  return v;
}

std::string OptionSpec::usage() const {
  std::string placeholder(value.empty() ? default_placeholder(kind) : value);
  if (kind == OptionKind::choice && value.empty()) placeholder = choices_text(*this, "|", "|");
  return std::string(name) + "=" + placeholder;
}

std::string OptionSpec::describe() const {
  std::string extra;
  switch (kind) {
    case OptionKind::seconds:
    case OptionKind::number: extra = number_text(min) + "-" + number_text(max); break;
    case OptionKind::octal:
      extra = octal_text(static_cast<uint64_t>(min)) + "-" + octal_text(static_cast<uint64_t>(max));
      break;
    case OptionKind::size:
      if (max > 0) extra = "at most " + size_text(static_cast<uint64_t>(max));
      break;
    default: break;
  }
  std::string also;
  for (auto a : aliases)
    if (!a.empty()) also += (also.empty() ? "also " : ", ") + std::string(a);
  if (!also.empty()) extra += (extra.empty() ? "" : "; ") + also;
  std::string out(help);
  if (extra.empty()) return out;
  // "... (default 30)" becomes "... (default 30; 0.1-86400)".
  if (!out.empty() && out.back() == ')') return out.substr(0, out.size() - 1) + "; " + extra + ")";
  return out + " (" + extra + ")";
}

Options::Options(std::map<std::string, std::string>& values, std::string where, std::string noun)
    : values_(values), where_(std::move(where)), noun_(std::move(noun)) {}

void Options::note_asked(std::string_view name) const {
  if (std::find(asked_.begin(), asked_.end(), name) == asked_.end()) asked_.emplace_back(name);
}

bool Options::has(const OptionSpec& spec) const {
  note_asked(spec.name);
  if (values_.contains(std::string(spec.name))) return true;
  return std::any_of(spec.aliases.begin(), spec.aliases.end(),
                     [&](std::string_view a) { return !a.empty() && values_.contains(std::string(a)); });
}

std::string Options::what(const OptionSpec& spec) const { return prefix() + noun_ + " " + std::string(spec.name); }

std::string Options::prefix() const { return where_.empty() ? std::string() : where_ + ": "; }

ConfigError Options::error(const OptionSpec& spec, const std::string& message) const {
  return ConfigError(prefix() + noun_ + " '" + std::string(spec.name) + "' " + message);
}

std::optional<std::string> Options::take(const OptionSpec& spec) {
  note_asked(spec.name);
  std::optional<std::string> value;
  std::string given;
  auto take_key = [&](std::string_view key) {
    if (key.empty()) return;
    auto it = values_.find(std::string(key));
    if (it == values_.end()) return;
    if (value)
      throw ConfigError(prefix() + noun_ + " '" + std::string(key) + "' given twice (also as '" + given + "')");
    given = it->first;
    value = std::move(it->second);
    values_.erase(it);
  };
  take_key(spec.name);
  for (auto a : spec.aliases) take_key(a);
  return value;
}

std::optional<std::string> Options::text(const OptionSpec& spec) {
  assert(spec.kind == OptionKind::text);
  return take(spec);
}

std::optional<bool> Options::flag(const OptionSpec& spec) {
  assert(spec.kind == OptionKind::flag);
  auto v = take(spec);
  if (!v) return std::nullopt;
  return parse_bool(*v, what(spec));
}

std::optional<uint64_t> Options::size(const OptionSpec& spec) {
  assert(spec.kind == OptionKind::size);
  auto v = take(spec);
  if (!v) return std::nullopt;
  const uint64_t n = parse_size(*v, what(spec));
  if (spec.max > 0 && static_cast<double>(n) > spec.max)
    bad_value(what(spec), *v, "a size of at most " + size_text(static_cast<uint64_t>(spec.max)));
  return n;
}

std::optional<std::chrono::milliseconds> Options::seconds(const OptionSpec& spec) {
  assert(spec.kind == OptionKind::seconds);
  auto v = take(spec);
  if (!v) return std::nullopt;
  return parse_seconds(*v, what(spec), spec.min, spec.max);
}

std::optional<uint64_t> Options::number(const OptionSpec& spec) {
  assert(spec.kind == OptionKind::number || spec.kind == OptionKind::octal);
  auto v = take(spec);
  if (!v) return std::nullopt;
  const auto min = static_cast<uint64_t>(spec.min), max = static_cast<uint64_t>(spec.max);
  if (spec.kind == OptionKind::octal) return parse_number(*v, what(spec), min, max, 8);
  if (!spec.unit.empty()) {
    uint64_t n = 0;
    auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
    if (v->empty() || ec != std::errc{} || end != v->data() + v->size() || n < min || n > max)
      bad_value(what(spec), *v, std::string(spec.unit) + " from " + std::to_string(min) + " to " + std::to_string(max));
    return n;
  }
  return parse_number(*v, what(spec), min, max);
}

std::optional<std::string> Options::choice(const OptionSpec& spec) {
  assert(spec.kind == OptionKind::choice);
  auto v = take(spec);
  if (!v) return std::nullopt;
  for (auto c : spec.choices) {
    if (listed(c) && c == *v) return v;
    if (const auto eq = c.find('='); eq != std::string_view::npos && c.substr(0, eq) == *v)
      return std::string(c.substr(eq + 1));
  }
  throw ConfigError(prefix() + std::string(spec.name) + " '" + *v + "' is not " + choices_text(spec, ", ", " or "));
}

void Options::finish() const {
  if (values_.empty()) return;
  std::string message = prefix() + "unknown " + noun_ + " '" + values_.begin()->first + "'";
  if (!asked_.empty()) {
    std::string known;
    for (const auto& a : asked_) known += (known.empty() ? "" : ", ") + a;
    message += " (known: " + known + ")";
  }
  throw ConfigError(message);
}

}  // namespace blockway::core
