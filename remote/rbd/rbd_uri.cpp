#include "remote/rbd/rbd_uri.hpp"

#include "remote/backend.hpp"

#include <cctype>
#include <vector>

namespace blockway::remote::rbd {
namespace {

constexpr const char* kForm =
    "rbd://[ID@]POOL[/NAMESPACE]/IMAGE[@SNAP][?conf=PATH&keyring=PATH&exclusive=on|off|break&rbd_cache=on|off]";

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decodes `in`; false on a malformed escape or a NUL byte (which
// librados' C strings cannot carry).
bool decode(std::string_view in, std::string& out) {
  out.clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out += in[i];
      continue;
    }
    if (i + 2 >= in.size()) return false;
    const int hi = hex_value(in[i + 1]);
    const int lo = hex_value(in[i + 2]);
    if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) return false;
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return true;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (true) {
    const size_t end = s.find(sep, start);
    parts.push_back(s.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  return parts;
}

}  // namespace

RbdTarget RbdTarget::parse(std::string_view text) {
  const std::string whole(text);
  auto fail = [&whole](const std::string& what) {
    throw BackendError("RBD URI '" + whole + "' " + what + "; use " + kForm);
  };
  constexpr std::string_view kScheme = "rbd://";
  if (text.size() < kScheme.size()) fail("does not start with rbd://");
  for (size_t i = 0; i < kScheme.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(text[i])) != kScheme[i]) fail("does not start with rbd://");
  std::string_view rest = text.substr(kScheme.size());
  std::string_view query;
  if (const auto q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  if (rest.find('#') != std::string_view::npos) fail("has a '#' fragment");

  RbdTarget t;
  const auto first_slash = rest.find('/');
  if (const auto at = rest.find('@'); at != std::string_view::npos && at < first_slash) {
    if (!decode(rest.substr(0, at), t.id) || t.id.empty()) fail("has an empty or malformed user ID before '@'");
    if (t.id.starts_with("client.")) fail("names the user as '" + t.id + "'; give the ID without 'client.'");
    rest = rest.substr(at + 1);
  }
  const auto parts = split(rest, '/');
  if (parts.size() < 2) fail("names no image (POOL/IMAGE)");
  if (parts.size() > 3) fail("has too many path components (POOL[/NAMESPACE]/IMAGE)");
  std::vector<std::string> decoded;
  for (const auto p : parts) {
    std::string d;
    if (p.empty()) fail("has an empty path component");
    if (!decode(p, d)) fail("has a malformed percent escape");
    decoded.push_back(std::move(d));
  }
  t.pool = decoded[0];
  if (decoded.size() == 3) t.ns = decoded[1];
  std::string image = decoded.back();
  if (const auto at = image.find('@'); at != std::string::npos) {
    t.snap = image.substr(at + 1);
    image.resize(at);
    if (t.snap.empty()) fail("has an empty snapshot name after '@'");
  }
  if (image.empty()) fail("names no image");
  t.image = std::move(image);

  bool lock_given = false;
  if (!query.empty()) {
    for (const auto kv : split(query, '&')) {
      const auto eq = kv.find('=');
      std::string key;
      std::string value;
      if (eq == std::string_view::npos || !decode(kv.substr(0, eq), key) || !decode(kv.substr(eq + 1), value))
        fail("has a malformed query parameter '" + std::string(kv) + "' (expected key=value)");
      if (key == "conf" || key == "keyring") {
        if (value.empty() || value.front() != '/') fail("needs an absolute path for " + key + "=");
        (key == "conf" ? t.conf : t.keyring) = value;
      } else if (key == "exclusive") {
        lock_given = true;
        if (value == "on") {
          t.lock = LockMode::on;
        } else if (value == "off") {
          t.lock = LockMode::off;
        } else if (value == "break") {
          t.lock = LockMode::take_over;
        } else {
          fail("has exclusive='" + value + "' (expected on, off or break)");
        }
      } else if (key == "rbd_cache") {
        if (value == "on" || value == "true") {
          t.rbd_cache = true;
        } else if (value == "off" || value == "false") {
          t.rbd_cache = false;
        } else {
          fail("has rbd_cache='" + value + "' (expected on or off)");
        }
      } else {
        fail("has the unknown parameter '" + key + "' (conf, keyring, exclusive and rbd_cache are taken)");
      }
    }
  }
  if (!t.snap.empty()) {
    if (lock_given && t.lock != LockMode::off) fail("asks for the exclusive lock on a snapshot, which is read-only");
    t.lock = LockMode::off;
  }
  return t;
}

std::string RbdTarget::spec() const {
  std::string s = pool + "/";
  if (!ns.empty()) s += ns + "/";
  s += image;
  if (!snap.empty()) s += "@" + snap;
  return s;
}

}  // namespace blockway::remote::rbd
