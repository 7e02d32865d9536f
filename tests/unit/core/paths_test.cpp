// Unit tests for core/paths: the default data directory and control socket.
#include "core/paths.hpp"

#include <gtest/gtest.h>

#include <stdlib.h>
#include <unistd.h>

#include <optional>
#include <string>

namespace blockway::core {
namespace {

// Sets an environment variable for one test, restoring it afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = ::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(DefaultDataDir, SystemdStateDirectoryWins) {
  ScopedEnv env("STATE_DIRECTORY", "/var/lib/blockway:/var/lib/other");
  EXPECT_EQ(default_data_dir(), "/var/lib/blockway");
}

TEST(DefaultDataDir, RelativeStateDirectoryIsIgnored) {
  ScopedEnv env("STATE_DIRECTORY", "relative/dir");
  EXPECT_NE(default_data_dir(), "relative/dir");
}

TEST(DefaultControlSocket, SystemdRuntimeDirectoryWins) {
  ScopedEnv env("RUNTIME_DIRECTORY", "/run/bw-test");
  EXPECT_EQ(default_control_socket(), "/run/bw-test/control.sock");
}

TEST(DefaultDataDir, RootUsesVarLib) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root";
  if (::getenv("STATE_DIRECTORY")) GTEST_SKIP() << "running under a systemd StateDirectory=";
  EXPECT_EQ(default_data_dir(), "/var/lib/blockway");
}

TEST(DefaultControlSocket, IsControlSockInEveryCase) {
  EXPECT_NE(default_control_socket().find("control.sock"), std::string::npos);
}

TEST(DefaultControlSocket, RootUsesRun) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root";
  if (::getenv("RUNTIME_DIRECTORY")) GTEST_SKIP() << "running under a systemd RuntimeDirectory=";
  EXPECT_EQ(default_control_socket(), "/run/blockway/control.sock");
}

}  // namespace
}  // namespace blockway::core
