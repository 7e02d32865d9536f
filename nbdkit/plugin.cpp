// The nbdkit plugin (nbdkit-blockway-plugin.so): blockway's export stack, any
// backend with the cache, prefetch and detach, served by nbdkit and usable
// under its filters: `nbdkit blockway uri=iscsi://... cache=DIR mode=...`.
//
// Thread model: NBDKIT_THREAD_MODEL_PARALLEL. .config/.config_complete run
// on nbdkit's main thread and only check the keys (nothing opens, since
// nbdkit may still fork to the background); .after_fork opens the remote and
// starts our event loops (if it cannot, each connection's .open tries
// again); the data callbacks run each request through
// PluginStack::run_request(): with a cache, over a file or over an NBD
// remote with multi-conn (each worker thread its own connection) on the
// nbdkit worker thread that calls them (hopping to our loops only for what
// lives there, such as a remote session's I/O), else on one of our loops;
// .cleanup (after the last connection) flushes and closes the stack, and
// .unload does it if .cleanup did not run. Errors on the data path go to
// nbdkit as errno values (nbdkit_set_error), the one mapping of this front end.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "cache/cache_config.hpp"
#include "core/logging.hpp"
#include "nbdkit/plugin_config.hpp"
#include "nbdkit/plugin_stack.hpp"
#include "remote/registry.hpp"

#include <atomic>
#include <cerrno>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace {

using blockway::core::ByteRange;
using blockway::core::ExtentList;
using blockway::core::IoFlags;
using blockway::core::Support;
using blockway::nbdkit::PluginConfig;
using blockway::nbdkit::PluginStack;

std::optional<PluginConfig> g_config;
std::unique_ptr<PluginStack> g_stack;
// Opening g_stack after .after_fork could not (in .open, on connection
// threads): one at a time, and set once. The data callbacks read g_stack
// without the lock: their connection's .open saw it open.
std::mutex g_stack_mutex;
std::atomic<bool> g_stack_open{false};
// Failed opens so far, and the last one's reason (under g_stack_mutex): a
// connection that waited for the lock while another's open failed is refused
// with that reason instead of trying again itself, so N connections to a
// remote that accepts and never answers wait one io-timeout, not N.
std::atomic<uint64_t> g_failed_opens{0};
std::string g_open_error;
std::string g_help;  // built at load: config_help points into it

// What blockway_open() returns for every connection: nbdkit wants a non-null
// handle, and a connection has no state of its own here (its requests go
// through PluginStack::run_request()).
char g_connection;

int fail(int error) {
  nbdkit_set_error(error);
  return -1;
}

// Runs one request (PluginStack::run_request); errno to nbdkit.
template <class F>
int request(F make_task) {
  try {
    const std::error_code ec = g_stack->run_request(make_task(g_stack->device()));
    return ec ? fail(ec.value()) : 0;
  } catch (const std::exception& e) {
    nbdkit_error("blockway: %s", e.what());
    return fail(EIO);
  }
}

// nbdkit's flags as CheckedDevice takes them: FUA on writes, trims and
// zeroes; NO_HOLE (nbdkit's lack of MAY_TRIM) and FAST_ZERO on zeroes only.
IoFlags flags_of(uint32_t flags) { return (flags & NBDKIT_FLAG_FUA) ? blockway::core::kFua : 0; }
IoFlags zero_flags_of(uint32_t flags) {
  IoFlags f = flags_of(flags);
  if (flags & NBDKIT_FLAG_FAST_ZERO) f |= blockway::core::kFastZero;
  if (!(flags & NBDKIT_FLAG_MAY_TRIM)) f |= blockway::core::kNoHole;
  return f;
}

void blockway_load() {
  PluginConfig empty;
  g_config = std::move(empty);
}

void blockway_close_stack() {
  std::lock_guard lock(g_stack_mutex);
  g_stack_open.store(false, std::memory_order_release);
  if (g_stack) g_stack->close();
  g_stack.reset();
}

void blockway_unload() {
  blockway_close_stack();
  g_config.reset();
}

int blockway_config(const char* key, const char* value) {
  try {
    g_config->add(key, value);
    return 0;
  } catch (const std::exception& e) {
    nbdkit_error("%s", e.what());
    return -1;
  }
}

int blockway_config_complete() {
  try {
    g_config->complete();
    blockway::core::init_logging(g_config->log_level);
    return 0;
  } catch (const std::exception& e) {
    nbdkit_error("%s", e.what());
    return -1;
  }
}

// Opens the stack (the remote, the cache); false, with the reason as
// nbdkit's error, if it cannot. Under g_stack_mutex.
bool open_stack() {
  try {
    g_stack = std::make_unique<PluginStack>(*g_config);
    g_stack_open.store(true, std::memory_order_release);
    return true;
  } catch (const std::exception& e) {
    nbdkit_error("%s", e.what());
    g_open_error = e.what();
    g_failed_opens.fetch_add(1, std::memory_order_release);
    return false;
  }
}

// After nbdkit forked into the background (or decided not to): our threads
// must be started in the process that serves. A remote that cannot be opened
// does not end the server: each new connection tries again and, until one
// succeeds, fails with the reason. Ending it would hang `nbdkit --run CMD`:
// nbdkit's captive parent, which runs CMD, keeps the listening socket open,
// so CMD's connection would wait with nobody serving it.
int blockway_after_fork() {
  std::lock_guard lock(g_stack_mutex);
  if (!open_stack())
    nbdkit_error("blockway: serving anyway: each new connection tries to open the remote again, and fails with "
                 "this reason until it can");
  return 0;
}

void blockway_dump_plugin() {
  std::string schemes, modes = "writethrough,writeback,writeback-local";
  for (const auto& s : blockway::remote::supported_schemes()) schemes += (schemes.empty() ? "" : ",") + s;
  std::string keys;
  for (const auto& s : PluginConfig::options_table()) keys += (keys.empty() ? "" : ",") + std::string(s.name);
  for (const auto& s : blockway::cache::CacheConfig::options()) keys += "," + std::string(s.name);
  std::printf("blockway_version=%s\n", BLOCKWAY_VERSION);
  std::printf("blockway_schemes=%s\n", schemes.c_str());
  std::printf("blockway_write_modes=%s\n", modes.c_str());
  std::printf("blockway_keys=%s\n", keys.c_str());
  std::printf("blockway_thread_model=parallel\n");
}

void* blockway_open(int /*readonly*/) {
  if (!g_stack_open.load(std::memory_order_acquire)) {
    const uint64_t failed_before = g_failed_opens.load(std::memory_order_acquire);
    std::lock_guard lock(g_stack_mutex);
    if (!g_stack && g_failed_opens.load(std::memory_order_acquire) != failed_before) {
      // Another connection's open failed while this one waited: its reason.
      nbdkit_error("%s", g_open_error.c_str());
      return nullptr;
    }
    if (!g_stack && !open_stack()) return nullptr;  // nbdkit sends the client our error
  }
  return &g_connection;
}

const char* blockway_export_description(void*) {
  return g_config->description.empty() ? nullptr : g_config->description.c_str();
}

// nbdkit asks once per connection: a file that grew since is followed.
int64_t blockway_get_size(void*) { return static_cast<int64_t>(g_stack->size_for_new_connection()); }

int blockway_block_size(void*, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  const auto g = g_stack->device().geometry();
  *minimum = g.min_block;
  *preferred = std::max(g.preferred_block, g.min_block);
  *maximum = g.max_transfer;
  return 0;
}

// Capabilities as blockwayd's handshake reports them (nbd/handshake.cpp):
// whatever CheckedDevice provides, natively or emulated, is offered.
int blockway_can_write(void*) { return g_stack->device().capabilities().read_only ? 0 : 1; }
int blockway_can_flush(void*) { return g_stack->device().capabilities().flush != Support::none; }
int blockway_is_rotational(void*) { return 0; }
int blockway_can_trim(void*) {
  const auto c = g_stack->device().capabilities();
  return !c.read_only && c.trim != Support::none;
}
int blockway_can_zero(void*) {
  const auto c = g_stack->device().capabilities();
  return !c.read_only && c.zero != Support::none;
}
int blockway_can_fast_zero(void* h) { return blockway_can_zero(h); }
int blockway_can_fua(void*) {
  return g_stack->device().capabilities().fua != Support::none ? NBDKIT_FUA_NATIVE : NBDKIT_FUA_NONE;
}
int blockway_can_multi_conn(void*) { return g_stack->device().capabilities().multi_conn; }
int blockway_can_extents(void*) { return g_stack->device().capabilities().extents != Support::none; }
int blockway_can_cache(void*) {
  return g_stack->device().capabilities().prefetch != Support::none ? NBDKIT_CACHE_NATIVE : NBDKIT_CACHE_NONE;
}

int blockway_pread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t) {
  return request([&](auto& dev) { return dev.read({static_cast<std::byte*>(buf), count}, offset, 0); });
}

int blockway_pwrite(void*, const void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  return request([&](auto& dev) {
    return dev.write({static_cast<const std::byte*>(buf), count}, offset, flags_of(flags));
  });
}

int blockway_flush(void*, uint32_t) {
  return request([](auto& dev) { return dev.flush(); });
}

int blockway_trim(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return request([&](auto& dev) { return dev.trim(ByteRange{offset, count}, flags_of(flags)); });
}

int blockway_zero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return request([&](auto& dev) { return dev.zero(ByteRange{offset, count}, zero_flags_of(flags)); });
}

int blockway_cache(void*, uint32_t count, uint64_t offset, uint32_t) {
  return request([&](auto& dev) { return dev.prefetch(ByteRange{offset, count}); });
}

int blockway_extents(void*, uint32_t count, uint64_t offset, uint32_t, struct nbdkit_extents* extents) {
  ExtentList list;
  if (int r = request([&](auto& dev) { return dev.block_status(ByteRange{offset, count}, list); }); r != 0)
    return r;
  uint64_t at = offset;
  for (const auto& e : list) {
    if (nbdkit_add_extent(extents, at, e.length, e.flags) == -1) return -1;
    at += e.length;
  }
  return 0;
}

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

struct nbdkit_plugin make_plugin() {
  struct nbdkit_plugin p{};
  p.name = "blockway";
  p.longname = "blockway export stack (backends, local-disk cache, prefetch, detach)";
  p.version = BLOCKWAY_VERSION;
  p.description =
      "Serves a remote disk image (file, NBD, iSCSI, NFS, AoE, Ceph RBD) through blockway's export stack: "
      "retry, a crash-safe local-disk cache with write modes, prefetch and detach.";
  p.load = blockway_load;
  p.unload = blockway_unload;
  p.config = blockway_config;
  p.config_complete = blockway_config_complete;
  p.magic_config_key = "uri";
  p.after_fork = blockway_after_fork;
  p.cleanup = blockway_close_stack;
  p.dump_plugin = blockway_dump_plugin;
  p.open = blockway_open;
  p.export_description = blockway_export_description;
  p.get_size = blockway_get_size;
  p.block_size = blockway_block_size;
  p.can_write = blockway_can_write;
  p.can_flush = blockway_can_flush;
  p.is_rotational = blockway_is_rotational;
  p.can_trim = blockway_can_trim;
  p.can_zero = blockway_can_zero;
  p.can_fast_zero = blockway_can_fast_zero;
  p.can_fua = blockway_can_fua;
  p.can_multi_conn = blockway_can_multi_conn;
  p.can_extents = blockway_can_extents;
  p.can_cache = blockway_can_cache;
  p.pread = blockway_pread;
  p.pwrite = blockway_pwrite;
  p.flush = blockway_flush;
  p.trim = blockway_trim;
  p.zero = blockway_zero;
  p.cache = blockway_cache;
  p.extents = blockway_extents;
  p.errno_is_preserved = 0;
  // nbdkit's --help lists every key of every table.
  g_help = PluginConfig::help();
  p.config_help = g_help.c_str();
  return p;
}

// Built on nbdkit's first call (plugin_init), not during static
// initialisation: the backend registry and the option tables it lists live in
// other translation units, whose globals are only ready by then.
struct nbdkit_plugin& the_plugin() {
  static struct nbdkit_plugin p = make_plugin();
  return p;
}

}  // namespace

NBDKIT_REGISTER_PLUGIN(the_plugin())
