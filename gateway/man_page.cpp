#include "gateway/man_page.hpp"

#include "cache/cache_config.hpp"
#include "cache/overlay_config.hpp"
#include "core/options.hpp"
#include "core/retry_layer.hpp"
#include "fuse/fuse_front_end.hpp"
#include "gateway/command_line.hpp"
#include "gateway/config.hpp"
#include "remote/registry.hpp"

#include <span>

namespace blockway::gateway {

namespace {

// One definition: the term in bold (its placeholder underlined), the text
// indented under it. Line breaks in the help become spaces: scdoc fills.
// `sep` goes between them: " " for a flag, "=" for an option.
void term(std::string& out, std::string_view name, std::string_view value, std::string_view help,
          std::string_view sep = " ") {
  out += "*" + scdoc_escape(name) + "*";
  if (!value.empty()) out += std::string(sep) + "_" + scdoc_escape(value) + "_";
  out += "\n";
  std::string text = scdoc_escape(help);
  for (auto& c : text)
    if (c == '\n') c = ' ';
  out += "\t" + text + "\n\n";
}

void options(std::string& out, std::span<const core::OptionSpec> specs) {
  for (const auto& s : specs) {
    const std::string usage = s.usage();  // "io-timeout=SECONDS"
    const auto eq = usage.find('=');
    term(out, usage.substr(0, eq), eq == std::string::npos ? "" : usage.substr(eq + 1), s.describe(), "=");
  }
}

std::string join_schemes(const remote::Backend& b) {
  std::string out;
  for (auto s : b.schemes) out += (out.empty() ? "" : " and ") + std::string(s) + "://";
  return out;
}

}  // namespace

std::string scdoc_escape(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '\\' || c == '*' || c == '_') out += '\\';
    out += c;
  }
  return out;
}

std::string man_section(std::string_view section) {
  std::string out;
  if (section == "options") {
    for (const auto& f : flag_help()) term(out, f.name, f.value, f.help);
  } else if (section == "uris") {
    for (const auto& b : remote::backends()) {
      for (size_t i = 0; i + 1 < b.uri_forms.size(); ++i) out += "*" + scdoc_escape(b.uri_forms[i]) + "*++\n";
      term(out, b.uri_forms.back(), "", b.summary);
    }
    term(out, "clone:BASE", "", "a copy-on-write clone of the export BASE (see the overlay options)");
  } else if (section == "export-options") {
    out += "## Every export\n\n";
    options(out, ExportConfig::generic_options());
    out += "## With a cache (cache=DIR)\n\n";
    options(out, cache::CacheConfig::options());
    out += "## A clone (clone:BASE)\n\n";
    options(out, cache::OverlayConfig::options());
    for (const auto& b : remote::backends()) {
      if (b.options.empty() && !b.retry()) continue;
      out += "## " + scdoc_escape(join_schemes(b)) + "\n\n";
      options(out, b.options);
      if (b.retry()) options(out, std::span(&core::RetryOptions::kTimeoutOption, 1));
    }
  } else if (section == "fuse-options") {
    options(out, fuse::FuseOptions::options());
  } else if (section == "exit-status") {
    for (const auto& [code, meaning] : exit_codes()) term(out, std::to_string(code), "", meaning);
  } else {
    throw core::ConfigError("--help-man '" + std::string(section) +
                            "' is not one of options, uris, export-options, fuse-options, exit-status");
  }
  while (out.ends_with("\n\n")) out.pop_back();
  return out;
}

}  // namespace blockway::gateway
