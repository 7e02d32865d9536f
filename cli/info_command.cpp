// blockway info URI: what an NBD export offers, read with libnbd.
#include "cli/command.hpp"

#include <fmt/format.h>
#include <libnbd.h>

#include <cstdio>
#include <memory>
#include <string>

namespace blockway::cli {
namespace {

struct HandleDeleter {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20)
          out += fmt::format("\\u{:04x}", c);
        else
          out += c;
    }
  }
  return out;
}

}  // namespace

int info_command(const std::vector<std::string>& args) {
  bool json = false;
  std::string uri;
  for (const auto& a : args) {
    if (a == "--json") {
      json = true;
    } else if (a == "--help" || a == "-h") {
      std::puts("Usage: blockway info [--json] URI\n\nConnects to an NBD export and prints its size, "
                "transmission flags and block sizes.");
      return 0;
    } else if (uri.empty()) {
      uri = a;
    } else {
      std::fprintf(stderr, "blockway info: unexpected argument '%s'\n", a.c_str());
      return 2;
    }
  }
  if (uri.empty()) {
    std::fputs("blockway info: missing URI (e.g. nbd://localhost/demo)\n", stderr);
    return 2;
  }
  std::unique_ptr<nbd_handle, HandleDeleter> h(nbd_create());
  if (!h) {
    std::fprintf(stderr, "blockway info: %s\n", nbd_get_error());
    return 1;
  }
  nbd_set_full_info(h.get(), true);
  nbd_add_meta_context(h.get(), "base:allocation");
  if (nbd_connect_uri(h.get(), uri.c_str()) == -1) {
    std::fprintf(stderr, "blockway info: cannot connect to %s: %s\n", uri.c_str(), nbd_get_error());
    return 1;
  }
  const int64_t size = nbd_get_size(h.get());
  std::string name, description;
  if (char* n = nbd_get_canonical_export_name(h.get())) {
    name = n;
    free(n);
  } else if (char* n2 = nbd_get_export_name(h.get())) {
    name = n2;
    free(n2);
  }
  if (char* d = nbd_get_export_description(h.get())) {
    description = d;
    free(d);
  }
  struct Flag {
    const char* name;
    int value;
  };
  const Flag flags[] = {
      {"read_only", nbd_is_read_only(h.get())},   {"can_flush", nbd_can_flush(h.get())},
      {"can_fua", nbd_can_fua(h.get())},          {"can_trim", nbd_can_trim(h.get())},
      {"can_zero", nbd_can_zero(h.get())},        {"can_fast_zero", nbd_can_fast_zero(h.get())},
      {"can_cache", nbd_can_cache(h.get())},      {"can_df", nbd_can_df(h.get())},
      {"can_multi_conn", nbd_can_multi_conn(h.get())},
      {"base_allocation", nbd_can_meta_context(h.get(), "base:allocation")},
  };
  const int64_t bmin = nbd_get_block_size(h.get(), LIBNBD_SIZE_MINIMUM);
  const int64_t bpref = nbd_get_block_size(h.get(), LIBNBD_SIZE_PREFERRED);
  const int64_t bmax = nbd_get_block_size(h.get(), LIBNBD_SIZE_MAXIMUM);
  nbd_shutdown(h.get(), 0);

  if (json) {
    std::string out = fmt::format("{{\"uri\": \"{}\", \"export\": \"{}\", \"description\": \"{}\", \"size\": {}",
                                  json_escape(uri), json_escape(name), json_escape(description), size);
    for (const auto& f : flags) out += fmt::format(", \"{}\": {}", f.name, f.value > 0 ? "true" : "false");
    out += fmt::format(", \"block_size\": {{\"minimum\": {}, \"preferred\": {}, \"maximum\": {}}}}}", bmin, bpref, bmax);
    std::puts(out.c_str());
    return 0;
  }
  fmt::print("export:      {}\n", name.empty() ? "(default)" : name);
  if (!description.empty()) fmt::print("description: {}\n", description);
  fmt::print("size:        {} bytes ({:.2f} GiB)\n", size, static_cast<double>(size) / (1ull << 30));
  fmt::print("block size:  minimum {}, preferred {}, maximum {}\n", bmin, bpref, bmax);
  for (const auto& f : flags) fmt::print("{:<16} {}\n", f.name, f.value > 0 ? "yes" : "no");
  return 0;
}

}  // namespace blockway::cli
