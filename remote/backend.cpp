#include "remote/backend.hpp"

namespace blockway::remote {

core::EventLoops& loops_of(const OpenEnv& env, const std::string& uri_for_messages) {
  if (env.loops == nullptr) throw BackendError("URI '" + uri_for_messages + "' needs the daemon's event loops");
  return *env.loops;
}

}  // namespace blockway::remote
