// RbdTarget: what an rbd:// URI names, validated without touching the network.
//
//   rbd://[ID@]POOL[/NAMESPACE]/IMAGE[@SNAP][?conf=PATH&keyring=PATH&exclusive=on|off|break&rbd_cache=on|off]
//
// ID is the cephx user without "client." (default: admin, as the rbd tool).
// conf is the ceph.conf to read (default: librados' search path,
// /etc/ceph/ceph.conf first), keyring the keyring file (default: what the
// conf says). exclusive: on (default) takes the image's exclusive lock at
// start-up and refuses to start when another client holds it; break takes it
// from the holder (which librbd blocklists); off shares the image (the user
// answers for any other writer). A snapshot is always opened read-only and
// takes no lock. rbd_cache: librbd's own cache (see rbd_device.hpp;
// default off). Components are percent-decoded.
//
// Pure value type, no threads.
#pragma once

#include <string>
#include <string_view>

namespace blockway::remote::rbd {

enum class LockMode { on, off, take_over };

struct RbdTarget {
  std::string id = "admin";  // cephx user, without "client."
  std::string pool;
  std::string ns;            // RADOS namespace, may be empty
  std::string image;
  std::string snap;          // empty: the image itself
  std::string conf;          // empty: librados' default search
  std::string keyring;       // empty: what the conf says
  LockMode lock = LockMode::on;
  bool rbd_cache = false;    // rbd_cache=on|off: librbd's own cache

  // Throws BackendError (remote/backend.hpp) with a message that quotes the
  // URI and says what is wrong and what is expected.
  static RbdTarget parse(std::string_view uri);
  // "POOL[/NAMESPACE]/IMAGE[@SNAP]" as the rbd tool spells it (no secrets).
  [[nodiscard]] std::string spec() const;
};

}  // namespace blockway::remote::rbd
