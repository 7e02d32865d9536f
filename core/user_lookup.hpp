// User and group names as the system's databases (NSS) know them, or plain
// numbers: what allow=user:/group:, socket-user/socket-group, the FUSE
// export owners and [control] group take.
//
// No threads of its own. The lookups may block (LDAP, sssd): call them when a
// setting is parsed, never on the data path or in a handshake.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string_view>

namespace blockway::core {

// A user name, else a decimal uid (as chown(1) reads its argument);
// nullopt if it is neither.
std::optional<uid_t> find_user(std::string_view name_or_id);
// The same for groups.
std::optional<gid_t> find_group(std::string_view name_or_id);

}  // namespace blockway::core
