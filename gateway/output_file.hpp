// OutputFile: a file the control plane writes for the user (export-image,
// profile-export), removed again unless kept, so a failed command leaves
// nothing behind.
//
// Thread model: owned by one handler; its fd may be used on the blocking
// pool while the handler awaits it.
#pragma once

#include <unistd.h>

#include <string>

namespace blockway::gateway {

struct OutputFile {
  std::string path;
  int fd = -1;
  bool keep = false;
  ~OutputFile() {
    if (fd >= 0) ::close(fd);
    if (!keep) ::unlink(path.c_str());
  }
};

}  // namespace blockway::gateway
