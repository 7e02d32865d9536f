// Options: the one reader of settings given as text: export options
// (--export NAME=URI,KEY=VALUE or [[export]] keys), FUSE options, command-line
// flags and TOML values.
//
// Every kind of value has one parser here: sizes with binary suffixes
// ("64k", "32M", "1G", "2T"), seconds (decimals allowed: "30", "0.5"),
// booleans (on/off, true/false, yes/no, 1/0), whole numbers in a range, and
// choices from a list. A mistake is a ConfigError whose message names the
// option and quotes the value.
//
// An option is described once, by an OptionSpec: its name, the kind of value,
// its bounds and a one-line help text. The same spec validates the value and
// writes the option's line in --help, so the two cannot drift apart.
//
// Options (the class) holds a set of KEY=VALUE pairs given to several readers
// in turn (for an export: the backend, the RetryLayer, the cache). Each
// reader takes the options it knows, which removes them; finish() then
// reports what nobody took as an unknown option, the same way everywhere.
//
// Start-up and control plane only; no threads.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace blockway::core {

// A configuration mistake, with a message that names the setting. Thrown at
// start-up (the daemon exits with status 2) and by the control plane.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// --- One parser per kind of value. `what` names the setting in messages
// ("--max-inflight", "max-inflight", "export 'vm1': option chunk"). ---

// "4096", "64k", "32M", "1G", "2T" (binary units, either case).
uint64_t parse_size(std::string_view text, std::string_view what);
// on/off, true/false, yes/no, 1/0 (any case).
bool parse_bool(std::string_view text, std::string_view what);
// Seconds, decimals allowed ("30", "0.5", "1e3"), between min and max,
// rounded to the millisecond.
std::chrono::milliseconds parse_seconds(std::string_view text, std::string_view what, double min = 0,
                                        double max = std::numeric_limits<double>::infinity());
// A whole number from min to max in `base` (10, or 8 for file modes).
uint64_t parse_number(std::string_view text, std::string_view what, uint64_t min, uint64_t max, int base = 10);

// How an option's value is read, and shown in --help.
enum class OptionKind : uint8_t {
  text,     // any string
  flag,     // parse_bool
  size,     // parse_size, at most max (0: no bound)
  seconds,  // parse_seconds from min to max
  number,   // parse_number from min to max
  octal,    // parse_number in base 8 from min to max (file modes)
  choice,   // one of `choices`
};

struct OptionSpec {
  std::string_view name;  // "io-timeout"
  OptionKind kind = OptionKind::text;
  std::string_view help;  // one line for --help: what it does, its default
  double min = 0;         // seconds, number, octal: the smallest value
  double max = 0;         // seconds, number, octal: the largest; size: the largest (0: none)
  std::string_view value = {};  // the placeholder in --help ("DIR"); default by kind
  std::string_view unit = {};   // number: what it counts, for messages ("KiB"); default "a number"
  // choice: the accepted words. "WORD=OTHER" accepts WORD as another
  // spelling of OTHER without listing it (kept for old configurations).
  std::array<std::string_view, 4> choices = {};
  std::array<std::string_view, 2> aliases = {};  // other accepted spellings ("allow_other")

  // "io-timeout=SECONDS" (or "allow-other=on|off"), for --help.
  [[nodiscard]] std::string usage() const;
  // The help text with the accepted range and the aliases:
  // "... (default 30; 0.1-86400)".
  [[nodiscard]] std::string describe() const;
};

class Options {
 public:
  // `values` is emptied as readers take their options; it must outlive this.
  // `where` prefixes every message ("export 'vm1'", or "" for none); `noun`
  // is what the options are called in them ("option", "fuse option").
  explicit Options(std::map<std::string, std::string>& values, std::string where = {},
                   std::string noun = "option");

  // Whether the option (under its name or an alias) is given.
  [[nodiscard]] bool has(const OptionSpec& spec) const;

  // Each takes the option (removes it) and returns its value, or nullopt when
  // it is not given. Throws ConfigError naming it when the value is bad.
  std::optional<std::string> text(const OptionSpec& spec);
  std::optional<bool> flag(const OptionSpec& spec);
  std::optional<uint64_t> size(const OptionSpec& spec);
  std::optional<std::chrono::milliseconds> seconds(const OptionSpec& spec);
  std::optional<uint64_t> number(const OptionSpec& spec);  // number and octal
  std::optional<std::string> choice(const OptionSpec& spec);  // the listed word (synonyms resolved)

  // A ConfigError about `spec` for a check beyond its kind and bounds:
  // "export 'vm1': option 'chunk' must be a power of two".
  [[nodiscard]] ConfigError error(const OptionSpec& spec, const std::string& message) const;
  // "export 'vm1': option io-timeout", how messages name `spec`.
  [[nodiscard]] std::string what(const OptionSpec& spec) const;

  // Throws "unknown option 'KEY'" for the first option nobody took, listing
  // the ones that were asked for.
  void finish() const;
  [[nodiscard]] bool empty() const noexcept { return values_.empty(); }

 private:
  // Takes the raw value of `spec` (checking that it is given once), or nullopt.
  std::optional<std::string> take(const OptionSpec& spec);
  // "export 'vm1': ", or "" without a `where`.
  [[nodiscard]] std::string prefix() const;

  std::map<std::string, std::string>& values_;
  std::string where_;
  std::string noun_;
  void note_asked(std::string_view name) const;

  mutable std::vector<std::string> asked_;  // names asked for, for finish()'s message
};

}  // namespace blockway::core
