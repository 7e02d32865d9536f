#include "core/user_lookup.hpp"

#include <grp.h>
#include <pwd.h>

#include <cerrno>
#include <charconv>
#include <string>
#include <vector>

namespace blockway::core {
namespace {

// A decimal id; (id_t)-1 is "no change" to chown, never an owner.
std::optional<unsigned> id_number(std::string_view s) {
  unsigned v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc{} || end != s.data() + s.size() || v == static_cast<unsigned>(-1))
    return std::nullopt;
  return v;
}

// getpwnam_r / getgrnam_r with a buffer grown on ERANGE (large groups).
template <typename Entry, typename Lookup>
const Entry* lookup_by_name(const std::string& name, Entry& entry, std::vector<char>& buf, Lookup fn) {
  buf.resize(16384);
  for (;;) {
    Entry* found = nullptr;
    const int rc = fn(name.c_str(), &entry, buf.data(), buf.size(), &found);
    if (rc == ERANGE && buf.size() < (1u << 24)) {
      buf.resize(buf.size() * 4);
      continue;
    }
    return rc == 0 ? found : nullptr;
  }
}

}  // namespace

std::optional<uid_t> find_user(std::string_view name_or_id) {
  if (name_or_id.empty()) return std::nullopt;
  passwd pw{};
  std::vector<char> buf;
  if (auto* found = lookup_by_name(std::string(name_or_id), pw, buf, ::getpwnam_r)) return found->pw_uid;
  return id_number(name_or_id);
}

std::optional<gid_t> find_group(std::string_view name_or_id) {
  if (name_or_id.empty()) return std::nullopt;
  group gr{};
  std::vector<char> buf;
  if (auto* found = lookup_by_name(std::string(name_or_id), gr, buf, ::getgrnam_r)) return found->gr_gid;
  return id_number(name_or_id);
}

}  // namespace blockway::core
