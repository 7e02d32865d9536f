#include "remote/aoe/aoe_address.hpp"

#include "remote/backend.hpp"

#include <cctype>
#include <charconv>

namespace blockway::remote::aoe {
namespace {

constexpr const char* kForm = "use aoe://IFACE/SHELF.SLOT, e.g. aoe://eth1/0.1";

// A decimal number without sign, spaces or excess digits.
bool parse_decimal(const std::string& s, unsigned& out) {
  if (s.empty() || s.size() > 5) return false;
  for (char c : s)
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc{} && end == s.data() + s.size();
}

}  // namespace

bool valid_interface_name(const std::string& name) noexcept {
  if (name.empty() || name.size() > 15 || name == "." || name == "..") return false;
  for (char c : name) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '/' || c == ':' || std::isspace(u) || u < 0x21 || u == 0x7f) return false;
  }
  return true;
}

AoeAddress parse_address(const Uri& uri, const std::string& text) {
  const std::string where = "AoE URI '" + text + "'";
  if (uri.host.empty()) throw BackendError(where + " names no network interface; " + kForm);
  if (!uri.user.empty()) throw BackendError(where + " takes no user name; " + kForm);
  if (uri.port) throw BackendError(where + " takes no port; " + kForm);
  if (!uri.query.empty()) throw BackendError(where + " takes no query parameters; " + kForm);
  if (!valid_interface_name(uri.host))
    throw BackendError(where + ": '" + uri.host +
                       "' is not a valid network interface name (1 to 15 characters, no '/', ':' or spaces)");
  if (uri.path.size() < 2) throw BackendError(where + " names no shelf and slot; " + kForm);
  const std::string target = uri.path.substr(1);
  const auto dot = target.find('.');
  if (dot == std::string::npos || target.find('.', dot + 1) != std::string::npos)
    throw BackendError(where + ": '" + target + "' is not SHELF.SLOT; " + kForm);
  unsigned shelf = 0, slot = 0;
  const std::string shelf_text = target.substr(0, dot), slot_text = target.substr(dot + 1);
  if (!parse_decimal(shelf_text, shelf) || shelf > kMaxShelf)
    throw BackendError(where + ": shelf '" + shelf_text + "' is not a number from 0 to " +
                       std::to_string(kMaxShelf) + " (65535 is the broadcast shelf)");
  if (!parse_decimal(slot_text, slot) || slot > kMaxSlot)
    throw BackendError(where + ": slot '" + slot_text + "' is not a number from 0 to " + std::to_string(kMaxSlot) +
                       " (255 is the broadcast slot)");
  return AoeAddress{uri.host, static_cast<uint16_t>(shelf), static_cast<uint8_t>(slot)};
}

}  // namespace blockway::remote::aoe
