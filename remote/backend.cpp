#include "remote/backend.hpp"

#include <stdexcept>

namespace blockway::remote {

Uri parse_uri(const std::string& text) {
  try {
    return Uri::parse(text);
  } catch (const std::invalid_argument& e) {
    throw BackendError(e.what());
  }
}

core::EventLoops& loops_of(const OpenEnv& env, const std::string& uri_for_messages) {
  if (env.loops == nullptr) throw BackendError("URI '" + uri_for_messages + "' needs the daemon's event loops");
  return *env.loops;
}

}  // namespace blockway::remote
