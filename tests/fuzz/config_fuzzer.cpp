// libFuzzer harness: the configuration. The first input byte (mod 3) picks
// 0 a TOML configuration file (gateway::load_config_file, then validate()),
// 1 an --export spec (NAME=URI,key=value,...), 2 a --fuse-mount spec. A
// refusal (std::exception: ConfigError, toml's parse errors turned into
// ConfigError) is the expected answer to bad input.
#include "core/logging.hpp"
#include "gateway/config.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <exception>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace blockway;
  static const bool quiet = (core::init_logging("off"), true);
  (void)quiet;
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    switch (data[0] % 3) {
      case 0: {
        // The real reader takes a path: the input as a file.
        const int fd = ::memfd_create("config.toml", MFD_CLOEXEC);
        if (fd < 0 || ::write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size())) std::abort();
        gateway::DaemonConfig cfg;
        try {
          gateway::load_config_file("/proc/self/fd/" + std::to_string(fd), cfg);
          cfg.validate();
        } catch (...) {
          ::close(fd);
          throw;
        }
        ::close(fd);
        break;
      }
      case 1: (void)gateway::ExportConfig::parse_spec(text); break;
      case 2: (void)gateway::FuseMountConfig::parse_spec(text); break;
    }
  } catch (const std::exception&) {
  }
  return 0;
}
