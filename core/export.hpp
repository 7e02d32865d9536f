// Export: one named image offered to clients, and the table of them.
//
// Thread model: an Export is immutable after creation apart from its device's
// own counters and its atomics (access rules, file attributes and counts the
// control plane and sessions change at run time), and is shared (shared_ptr)
// by every session using it. The ExportTable is read by handshakes on every
// event-loop thread and changed rarely, so a shared_mutex guards it; sessions
// keep their own shared_ptr and never hold the lock during I/O.
#pragma once

#include "core/access_policy.hpp"
#include "core/checked_device.hpp"
#include "core/export_control.hpp"
#include "core/file_attrs.hpp"
#include "core/qos_layer.hpp"
#include "core/retry_layer.hpp"

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

namespace blockway::core {

struct Export {
  std::string name;
  std::string description;
  std::string uri;
  std::shared_ptr<CheckedDevice> device;
  // Set when a local cache sits in the device chain: its per-range state
  // (extent flag 1 = present locally, 2 = dirty), for the blockway:cache
  // metadata context.
  std::function<Task<std::error_code>(ByteRange, ExtentList&)> cache_status;
  // Set for an uncached stack over an image that can grow under it (a
  // file): looks at the image's size again and grows the device when it
  // grew (stack::Stack::follow_size). The NBD server calls it before it
  // tells a client the size; connected clients keep the size they were told.
  std::function<void()> follow_size;
  // Set when the backend reaches its image over a network session: the
  // health of that session (from the RetryLayer above it), for status.
  std::function<RetryHealth()> remote_health;
  // NBD connections using this export right now (kept by nbd::Session), for
  // status and for refusing to remove an export in use. Other holders of the
  // shared_ptr (a FUSE mount's node, a status request) are not clients.
  std::atomic<long> clients{0};
  // Set when a local cache sits in the device chain: run-time control of it
  // (prefetch, detach, write mode) and its report. Owned by the device chain,
  // so it lives as long as `device`.
  ExportControl* control = nullptr;
  // The export's QoS limits and counters (always in the chain, right below
  // `device`; without limits it passes requests straight on). Owned by the
  // device chain.
  QosLayer* qos = nullptr;
  // NBD clients must use TLS for this export (tls=require), even on a
  // listener that allows plaintext.
  bool tls_required = false;
  // Set for a clone (URI clone:BASE): the base export's name, the overlay
  // file, and the overlay's counters as (name, value) pairs in a fixed order
  // (allocated_bytes, base_read_bytes, ...), for status, stats and metrics.
  // Owned by the device chain.
  std::string clone_of;
  std::string overlay_path;
  std::function<std::vector<std::pair<std::string, uint64_t>>()> overlay_counters;
  // Set for a snapshot's read-only view (CLONE@SNAPSHOT): the clone's name.
  std::string snapshot_of;
  // allow= and listen=: who may use it over NBD, and on which listeners it
  // is published. Replaced whole when the control plane changes the rules;
  // null means everyone, everywhere.
  std::atomic<std::shared_ptr<const AccessPolicy>> access;
  // NBD clients refused by `access` (INFO, GO, EXPORT_NAME, meta contexts).
  std::atomic<uint64_t> denied{0};
  // fuse-uid=, fuse-gid=, fuse-mode=: the owner and mode of its file in the
  // FUSE mount; null or unset fields: the mount's uid/gid/mode. Replaced
  // whole when the control plane changes them, which then has the FUSE
  // mount make the kernel forget what it cached (FuseFrontEnd::forget).
  std::atomic<std::shared_ptr<const FileAttrs>> file_attrs;

  // The file attributes in effect now (a copy: null reads as all unset).
  [[nodiscard]] FileAttrs file() const {
    const auto attrs = file_attrs.load();
    return attrs ? *attrs : FileAttrs{};
  }
};

// What happened to an export, for ExportTable observers.
enum class ExportEvent { added, removed };
using ExportObserver = std::function<void(const std::shared_ptr<Export>&, ExportEvent)>;

class ExportTable {
 public:
  // Throws std::invalid_argument if the name is taken or invalid.
  void add(std::shared_ptr<Export> exp);
  std::shared_ptr<Export> remove(const std::string& name);
  // Looks up a name; the empty name means the default export.
  [[nodiscard]] std::shared_ptr<Export> find(const std::string& name) const;
  [[nodiscard]] std::vector<std::shared_ptr<Export>> list() const;
  // The export that the empty name selects; with no setting and exactly one
  // export, that one.
  void set_default(std::string name);

  // Observers of add() and remove() (front ends that list exports, such as
  // the FUSE mount). Called on the thread that changed the table, after the
  // change, without the table lock held (an observer may call find/list) but
  // under the observers' own lock: an observer must not subscribe or
  // unsubscribe, and unsubscribe() returns only after any call in progress.
  uint64_t subscribe(ExportObserver observer);
  void unsubscribe(uint64_t id);

 private:
  void notify(const std::shared_ptr<Export>& exp, ExportEvent event);

  std::mutex observers_mutex_;
  uint64_t next_observer_ = 1;
  std::map<uint64_t, ExportObserver> observers_;

  mutable std::shared_mutex mutex_;
  std::map<std::string, std::shared_ptr<Export>> exports_;
  std::string default_name_;
};

}  // namespace blockway::core
