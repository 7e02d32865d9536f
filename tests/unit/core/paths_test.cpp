// Unit tests for core/paths: the default data directory and control socket.
#include "core/paths.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

namespace blockway::core {
namespace {

TEST(DefaultDataDir, RootUsesVarLib) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root";
  EXPECT_EQ(default_data_dir(), "/var/lib/blockway");
}

TEST(DefaultControlSocket, IsControlSockInEveryCase) {
  EXPECT_NE(default_control_socket().find("control.sock"), std::string::npos);
}

TEST(DefaultControlSocket, RootUsesRun) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root";
  EXPECT_EQ(default_control_socket(), "/run/blockway/control.sock");
}

}  // namespace
}  // namespace blockway::core
