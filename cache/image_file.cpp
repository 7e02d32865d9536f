#include "cache/image_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace blockway::cache {

std::string image_file_name(const std::string& export_name) {
  std::string out;
  for (char c : export_name)
    out.push_back(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' ? c : '_');
  return out + ".img";
}

void create_image_file(const std::string& path, uint64_t size, bool preallocate) {
  ::unlink(path.c_str());
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
  int rc = ::ftruncate(fd, static_cast<off_t>(size));
  if (rc == 0 && preallocate) rc = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
  const int e = rc == 0 ? 0 : (rc > 0 ? rc : errno);
  ::fsync(fd);
  ::close(fd);
  if (e) throw std::runtime_error("cannot size " + path + ": " + std::strerror(e));
}

}  // namespace blockway::cache
