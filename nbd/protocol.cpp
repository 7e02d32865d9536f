#include "nbd/protocol.hpp"

#include <cerrno>

namespace blockway::nbd {

uint32_t to_nbd_error(std::error_code ec) noexcept {
  if (!ec) return 0;
  if (ec.category() != std::system_category() && ec.category() != std::generic_category()) return EIO;
  switch (ec.value()) {
    case EPERM:
    case EROFS:
    case EACCES:
      return EPERM;
    case EIO: return EIO;
    case ENOMEM: return ENOMEM;
    case EINVAL: return EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return ENOSPC;
    case EOVERFLOW: return EOVERFLOW;
    case ENOTSUP: return ENOTSUP;  // == EOPNOTSUPP on Linux
    case ESHUTDOWN: return ESHUTDOWN;
    default: return EIO;
  }
}

}  // namespace blockway::nbd
