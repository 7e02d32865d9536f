#include "gateway/profile_commands.hpp"

#include "cache/cache_layer.hpp"
#include "core/buffer_pool.hpp"
#include "core/logging.hpp"
#include "core/task.hpp"
#include "gateway/output_file.hpp"
#include "remote/uri.hpp"

#include <fcntl.h>
#include <gnutls/crypto.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <set>
#include <utility>
#include <vector>

namespace blockway::gateway {
namespace {

using core::Task;

constexpr const char* kFormat = "blockway-access-profile";
constexpr int kVersion = 1;
constexpr const char* kIdentityMethod = "sha256-size-head64k-15x4k-v1";
// Bounds on what an import reads (a profile holds at most 4 + imported
// sessions of at most 65536 chunks each; this is far above).
constexpr off_t kMaxFileBytes = 64 << 20;
constexpr size_t kMaxSessions = 64;
constexpr uint64_t kMaxChunks = 1u << 22;

struct Context {
  core::ExportTable& exports;
  boost::asio::thread_pool& blocking;
};

struct Target {
  std::shared_ptr<core::Export> exp;  // keeps the cache alive
  cache::CacheLayer* cache = nullptr;
};

[[noreturn]] void fail(int err, const std::string& what) {
  throw ControlError("failed", err, what + ": " + std::strerror(err));
}

// The export and its cache, or the error that says why there is none.
Target find_cached(const Context& ctx, const std::string& name) {
  auto exp = name.empty() ? nullptr : ctx.exports.find(name);
  if (!exp || exp->name != name) throw ControlError("unknown-export", ENOENT, "no export named '" + name + "'");
  if (!exp->clone_of.empty())
    throw ControlError("no-cache", EINVAL,
                       "export '" + name + "' is a clone: its reads are recorded in the profile of its base '" +
                           exp->clone_of + "' (use that name)");
  if (!exp->snapshot_of.empty())
    throw ControlError("no-cache", EINVAL,
                       "export '" + name + "' is a snapshot of clone '" + exp->snapshot_of +
                           "': reads are recorded in the profile of the clone's base");
  auto* layer = dynamic_cast<cache::CacheLayer*>(exp->control);
  if (!layer)
    throw ControlError("no-cache", EINVAL, "export '" + name + "' has no cache (cache=DIR), so it has no access profile");
  return {std::move(exp), layer};
}

std::string hex(const unsigned char* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}

class Sha256 {
 public:
  Sha256() {
    if (gnutls_hash_init(&h_, GNUTLS_DIG_SHA256) != 0) throw ControlError("failed", EIO, "SHA-256 is not available");
  }
  ~Sha256() {
    if (h_) gnutls_hash_deinit(h_, nullptr);
  }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void add(const void* p, size_t n) { gnutls_hash(h_, p, n); }
  void add_u64(uint64_t v) {
    unsigned char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
    add(b, 8);
  }
  std::string done() {
    unsigned char out[32];
    gnutls_hash_deinit(h_, out);
    h_ = nullptr;
    return hex(out, sizeof out);
  }

 private:
  gnutls_hash_hd_t h_ = nullptr;
};

// The checksum of the sessions: each as its length and its chunk numbers,
// little-endian 64-bit words.
std::string sessions_checksum(const std::vector<std::vector<uint32_t>>& sessions) {
  Sha256 h;
  for (const auto& s : sessions) {
    h.add_u64(s.size());
    for (uint32_t c : s) h.add_u64(c);
  }
  return h.done();
}

// The image's identity: SHA-256 of its size, its first 64 KiB and 15 blocks
// of 4 KiB at i/16 of its size (i = 1..15), read as clients see the image
// (through the cache, not recorded in the profile).
Task<std::string> image_identity(const Target& t) {
  const uint64_t size = t.exp->device->geometry().size;
  const uint64_t block = std::max<uint64_t>(4096, t.exp->device->geometry().min_block);
  std::vector<std::pair<uint64_t, uint64_t>> samples;
  samples.emplace_back(0, std::min<uint64_t>(std::max<uint64_t>(64 << 10, block), size));
  for (uint64_t i = 1; i < 16; ++i) {
    const uint64_t off = size * i / 16 / block * block;
    if (off < size) samples.emplace_back(off, std::min(block, size - off));
  }
  Sha256 h;
  h.add_u64(size);
  for (const auto& [off, len] : samples) {
    if (len == 0) continue;
    core::IoBuffer buf(len);
    if (auto ec = co_await t.cache->read_unrecorded(buf.span(), off))
      throw ControlError("failed", ec.value(), "reading export '" + t.exp->name + "' at " + std::to_string(off) +
                                                   " for its identity: " + ec.message());
    h.add(buf.data(), len);
  }
  co_return h.done();
}

std::string utc_now() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

uint64_t distinct_chunks(const std::vector<std::vector<uint32_t>>& sessions) {
  std::set<uint32_t> all;
  for (const auto& s : sessions) all.insert(s.begin(), s.end());
  return all.size();
}

Json sessions_summary(const std::vector<std::vector<uint32_t>>& sessions, uint64_t chunk_size) {
  Json list = Json::array();
  for (const auto& s : sessions) {
    Json first = Json::array();
    for (size_t i = 0; i < s.size() && i < 16; ++i) first.push_back(s[i]);
    list.push_back({{"chunks", s.size()}, {"bytes", s.size() * chunk_size}, {"first", std::move(first)}});
  }
  return list;
}

// ---- profile-show --------------------------------------------------------------------------------

Task<Json> profile_show(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_cached(*ctx, arg_string(req, "name"));
  auto [ec, p] = co_await t.cache->profile();
  if (ec) throw ControlError("failed", ec.value(), "reading the access profile failed: " + ec.message());
  const uint64_t distinct = distinct_chunks(p.sessions);
  co_return Json{{"name", t.exp->name},
                 {"chunk_size", p.chunk_size},
                 {"image_chunks", p.chunks},
                 {"sessions", sessions_summary(p.sessions, p.chunk_size)},
                 {"chunks", distinct},
                 {"bytes", distinct * p.chunk_size}};
}

// ---- profile-export ------------------------------------------------------------------------------


Task<Json> profile_export(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_cached(*ctx, arg_string(req, "name"));
  const auto path = arg_absolute_path(req, "path");
  const bool force = arg_bool(req, "force", false);
  std::error_code fs_ec;
  if (std::filesystem::is_directory(path, fs_ec) || std::filesystem::is_block_file(path, fs_ec))
    throw ControlError("refused", EINVAL, path + " is not a regular file");
  if (!force && std::filesystem::exists(path, fs_ec))
    throw ControlError("refused", EEXIST, path + " exists; choose another file, or force to overwrite it");
  auto [ec, p] = co_await t.cache->profile();
  if (ec) throw ControlError("failed", ec.value(), "reading the access profile failed: " + ec.message());
  if (p.sessions.empty())
    throw ControlError("refused", ENODATA,
                       "export '" + t.exp->name + "' has no access profile yet: clients (or its clones) have read "
                       "nothing through its cache");
  const std::string identity = co_await image_identity(t);
  const uint64_t size = t.exp->device->geometry().size;
  const uint64_t distinct = distinct_chunks(p.sessions);
  Json doc{{"format", kFormat},
           {"version", kVersion},
           {"export", t.exp->name},
           {"remote", remote::redact_uri(t.exp->uri.substr(0, t.exp->uri.find('?')))},
           {"created", utc_now()},
           {"size", size},
           {"chunk_size", p.chunk_size},
           {"identity", {{"method", kIdentityMethod}, {"sha256", identity}}},
           {"chunks", distinct},
           {"sessions", p.sessions},
           {"checksum", sessions_checksum(p.sessions)}};
  const std::string text = doc.dump() + "\n";
  OutputFile out{path};
  // Written next to the target and renamed over it: a crash or a full disk
  // never leaves a half file under the name.
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  out.path = tmp;
  const std::string* data = &text;
  const int err = co_await core::offload(ctx->blocking, [&out, data, &tmp, &path, force]() -> int {
    out.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out.fd < 0) {
      out.keep = true;  // nothing of ours to remove
      return errno;
    }
    for (size_t done = 0; done < data->size();) {
      const ssize_t n = ::write(out.fd, data->data() + done, data->size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return n < 0 ? errno : EIO;
      done += static_cast<size_t>(n);
    }
    if (::fsync(out.fd) != 0) return errno;
    if (!force && ::link(tmp.c_str(), path.c_str()) != 0) return errno;  // never over a file made meanwhile
    if (force && ::rename(tmp.c_str(), path.c_str()) != 0) return errno;
    return 0;
  });
  if (err == EEXIST) throw ControlError("refused", EEXIST, path + " exists; choose another file, or force to overwrite it");
  if (err) fail(err, "cannot write " + path);
  if (force) out.keep = true;  // renamed: tmp is gone
  const std::string message = "access profile of export '" + t.exp->name + "' written to " + path + " (" +
                              std::to_string(p.sessions.size()) + " sessions, " + std::to_string(distinct) +
                              " chunks of " + std::to_string(p.chunk_size >> 10) + " KiB)";
  core::logger("control")->info("{}", message);
  co_return Json{{"name", t.exp->name},    {"path", path},         {"sessions", p.sessions.size()},
                 {"chunks", distinct},     {"size", size},         {"chunk_size", p.chunk_size},
                 {"identity", identity},   {"message", message}};
}

// ---- profile-import ------------------------------------------------------------------------------

struct ProfileFile {
  uint64_t size = 0, chunk_size = 0;
  std::string identity, remote, exported_from, created;
  std::vector<std::vector<uint32_t>> sessions;
};

[[noreturn]] void corrupt(const std::string& path, const std::string& why) {
  throw ControlError("failed", EBADMSG, path + " is not a usable blockway access profile: " + why);
}

uint64_t field_u64(const Json& doc, const char* key, const std::string& path) {
  auto it = doc.find(key);
  if (it == doc.end() || !it->is_number_unsigned())
    corrupt(path, std::string("\"") + key + "\" is missing or not a whole number");
  return it->get<uint64_t>();
}

// A string member, or "" when it is missing or of another type.
std::string opt_string(const Json& doc, const char* key) {
  auto it = doc.find(key);
  return it != doc.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::string field_string(const Json& doc, const char* key, const std::string& path) {
  auto it = doc.find(key);
  if (it == doc.end() || !it->is_string()) corrupt(path, std::string("\"") + key + "\" is missing or not a string");
  return it->get<std::string>();
}

ProfileFile parse_profile(const std::string& text, const std::string& path) {
  if (json_depth(text) > 8) corrupt(path, "it nests deeper than a profile does");
  Json doc = Json::parse(text, nullptr, false);
  if (doc.is_discarded())
    corrupt(path, "it is not complete JSON (truncated or damaged; " + std::to_string(text.size()) + " bytes)");
  if (!doc.is_object() || opt_string(doc, "format") != kFormat)
    corrupt(path, std::string("it does not say \"format\": \"") + kFormat + "\"");
  const uint64_t version = field_u64(doc, "version", path);
  if (version != kVersion)
    corrupt(path, "its format version is " + std::to_string(version) + "; this blockway reads version " +
                      std::to_string(kVersion));
  ProfileFile f;
  f.size = field_u64(doc, "size", path);
  f.chunk_size = field_u64(doc, "chunk_size", path);
  if (f.chunk_size < 512 || (f.chunk_size & (f.chunk_size - 1)) != 0)
    corrupt(path, "its chunk size " + std::to_string(f.chunk_size) + " is not a power of two of at least 512");
  auto id = doc.find("identity");
  if (id == doc.end() || !id->is_object()) corrupt(path, "\"identity\" is missing");
  if (opt_string(*id, "method") != kIdentityMethod)
    corrupt(path, "its identity was taken by an unknown method '" + opt_string(*id, "method") + "'");
  f.identity = field_string(*id, "sha256", path);
  f.remote = opt_string(doc, "remote");
  f.exported_from = opt_string(doc, "export");
  f.created = opt_string(doc, "created");
  auto sessions = doc.find("sessions");
  if (sessions == doc.end() || !sessions->is_array()) corrupt(path, "\"sessions\" is missing or not a list");
  if (sessions->size() > kMaxSessions)
    corrupt(path, std::to_string(sessions->size()) + " sessions (at most " + std::to_string(kMaxSessions) + ")");
  const uint64_t image_chunks = (f.size + f.chunk_size - 1) / f.chunk_size;
  uint64_t total = 0;
  for (const auto& s : *sessions) {
    if (!s.is_array()) corrupt(path, "a session is not a list of chunk numbers");
    total += s.size();
    if (total > kMaxChunks) corrupt(path, "more than " + std::to_string(kMaxChunks) + " chunk numbers");
    auto& out = f.sessions.emplace_back();
    out.reserve(s.size());
    for (const auto& c : s) {
      if (!c.is_number_unsigned() || c.get<uint64_t>() >= image_chunks)
        corrupt(path, "chunk number " + c.dump() + " is not a chunk of an image of " + std::to_string(f.size) +
                          " bytes");
      out.push_back(static_cast<uint32_t>(c.get<uint64_t>()));
    }
  }
  if (field_string(doc, "checksum", path) != sessions_checksum(f.sessions))
    corrupt(path, "its checksum does not match its chunk numbers (the file was changed or damaged)");
  return f;
}

// Chunk numbers of `from` bytes as chunks of `to` bytes, in the same order
// (a larger chunk becomes its smaller ones; smaller ones merge into theirs).
std::vector<std::vector<uint32_t>> convert(const std::vector<std::vector<uint32_t>>& sessions, uint64_t from,
                                           uint64_t to, uint64_t image_chunks) {
  if (from == to) return sessions;
  std::vector<std::vector<uint32_t>> out;
  for (const auto& s : sessions) {
    auto& o = out.emplace_back();
    std::vector<bool> listed(image_chunks);
    for (uint32_t c : s) {
      const uint64_t first = uint64_t{c} * from / to;
      const uint64_t last = (uint64_t{c} * from + from - 1) / to;
      for (uint64_t n = first; n <= last && n < image_chunks; ++n)
        if (!listed[n] && o.size() < (1u << 16)) {
          listed[n] = true;
          o.push_back(static_cast<uint32_t>(n));
        }
    }
  }
  return out;
}

Task<Json> profile_import(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_cached(*ctx, arg_string(req, "name"));
  const auto path = arg_absolute_path(req, "path");
  const bool force = arg_bool(req, "force", false);
  struct Read {
    int err = 0;
    bool too_large = false, not_regular = false;
    std::string text;
  };
  Read r;
  (void)co_await core::offload(ctx->blocking, [&r, &path]() -> int {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      r.err = errno;
      return 0;
    }
    struct stat st{};
    if (::fstat(fd, &st) != 0) {
      r.err = errno;
    } else if (!S_ISREG(st.st_mode)) {
      r.not_regular = true;
    } else if (st.st_size > kMaxFileBytes) {
      r.too_large = true;
    } else {
      r.text.resize(static_cast<size_t>(st.st_size));
      for (size_t done = 0; done < r.text.size();) {
        const ssize_t n = ::read(fd, r.text.data() + done, r.text.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
          r.err = errno;
          break;
        }
        if (n == 0) {
          r.text.resize(done);
          break;
        }
        done += static_cast<size_t>(n);
      }
    }
    ::close(fd);
    return 0;
  });
  if (r.err == ENOENT) throw ControlError("failed", ENOENT, "no profile file " + path);
  if (r.err) fail(r.err, "cannot read " + path);
  if (r.not_regular) throw ControlError("failed", EINVAL, path + " is not a regular file");
  if (r.too_large)
    corrupt(path, "it is larger than " + std::to_string(kMaxFileBytes >> 20) + " MiB, far more than a profile");
  const ProfileFile f = parse_profile(r.text, path);
  const uint64_t size = t.exp->device->geometry().size;
  if (f.size != size)
    throw ControlError("refused", EINVAL,
                       "the profile in " + path + " is of an image of " + std::to_string(f.size) +
                           " bytes; export '" + t.exp->name + "' is " + std::to_string(size) +
                           " bytes: not the same image");
  const std::string identity = co_await image_identity(t);
  const bool same = identity == f.identity;
  if (!same && !force)
    throw ControlError("refused", EINVAL,
                       "the profile in " + path + " is of another image: its identity (" + f.identity.substr(0, 16) +
                           "..., taken from " + (f.remote.empty() ? std::string("?") : f.remote) +
                           ") differs from export '" + t.exp->name + "''s (" + identity.substr(0, 16) +
                           "...): the first 64 KiB or the sampled blocks differ; force imports it anyway");
  const uint64_t image_chunks = t.cache->chunk_count();
  auto sessions = convert(f.sessions, f.chunk_size, t.cache->chunk_size(), image_chunks);
  const uint64_t distinct = distinct_chunks(sessions);
  const auto result = co_await t.cache->import_profile(std::move(sessions));
  if (!result.ok())
    throw ControlError(result.ec.value() == EIO ? "failed" : "refused", result.ec.value(), result.message);
  std::string message = "access profile from " + path + " imported into export '" + t.exp->name + "' (" +
                        std::to_string(f.sessions.size()) + " sessions, " + std::to_string(distinct) + " chunks";
  if (f.chunk_size != t.cache->chunk_size())
    message += ", converted from chunks of " + std::to_string(f.chunk_size >> 10) + " KiB";
  message += same ? ")" : "; identity differs, forced)";
  message += "; the next hot-first prefetch fetches them first";
  core::logger("control")->info("{}", message);
  co_return Json{{"name", t.exp->name}, {"path", path},       {"sessions", f.sessions.size()},
                 {"chunks", distinct},  {"identity", identity}, {"identity_matches", same},
                 {"message", message}};
}

// ---- cache-drop ----------------------------------------------------------------------------------

Task<Json> cache_drop(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_cached(*ctx, arg_string(req, "name"));
  const bool keep = arg_bool(req, "keep_profile", false);
  const auto r = co_await t.cache->drop(keep);
  if (!r.ok()) {
    const int e = r.ec.value();
    throw ControlError(e == EBUSY || e == EPERM || e == EAGAIN || e == ESHUTDOWN ? "refused" : "failed", e, r.message);
  }
  const auto report = t.cache->report();
  co_return Json{{"name", t.exp->name},
                 {"present_bytes", report.present_bytes},
                 {"keep_profile", keep},
                 {"message", r.message}};
}

}  // namespace

void add_profile_commands(ControlDispatcher& d, core::ExportTable& exports, boost::asio::thread_pool& blocking) {
  auto ctx = std::make_shared<const Context>(Context{exports, blocking});
  d.add("profile-show", "an export's access profile: sessions and chunks in first-read order {name}",
        [ctx](const Json& req) { return profile_show(ctx, req); });
  d.add("profile-export", "write an export's access profile to a file {name, path, force?}",
        [ctx](const Json& req) { return profile_export(ctx, req); });
  d.add("profile-import",
        "make a profile file (of the same image) the export's access profile for hot-first prefetch "
        "{name, path, force?}",
        [ctx](const Json& req) { return profile_import(ctx, req); });
  d.add("cache-drop", "empty an export's cache, nothing dirty; keep_profile keeps its access profile "
        "{name, keep_profile?}",
        [ctx](const Json& req) { return cache_drop(ctx, req); });
}

}  // namespace blockway::gateway
