// The kernel's NBD netlink interface: device names, and the error a host
// without the nbd module gives (this CI host has none; the guest tests in
// tests/integration/test_kernel_devices.py attach real devices).
#include "nbd/kernel_netlink.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <cerrno>

namespace blockway::nbd {
namespace {

using ::testing::HasSubstr;

TEST(ParseNbdDevice, Spellings) {
  EXPECT_EQ(parse_nbd_device("/dev/nbd0"), 0u);
  EXPECT_EQ(parse_nbd_device("/dev/nbd15"), 15u);
  EXPECT_EQ(parse_nbd_device("nbd3"), 3u);
  EXPECT_EQ(parse_nbd_device("7"), 7u);
}

TEST(ParseNbdDevice, RefusesEverythingElse) {
  for (const char* bad : {"", "/dev/", "/dev/nbd", "/dev/sda", "/dev/nbd0p1", "nbd-1", "/dev/nbd1234567", "nbd 1",
                          "/dev/nbd0/", "/tmp/nbd0"})
    EXPECT_FALSE(parse_nbd_device(bad).has_value()) << bad;
}

bool nbd_module_loaded() {
  struct stat st {};
  return ::stat("/sys/module/nbd", &st) == 0;
}

TEST(KernelNbd, WithoutTheModuleEveryCallSaysLoadIt) {
  if (nbd_module_loaded()) GTEST_SKIP() << "this host has the nbd module";
  try {
    KernelConnect params;
    params.size_bytes = 1 << 20;
    (void)KernelNbd::connect(params);
    FAIL() << "connect succeeded without the nbd module";
  } catch (const KernelNbdError& e) {
    EXPECT_EQ(e.errno_value, ENOENT);
    EXPECT_THAT(e.what(), HasSubstr("modprobe nbd"));
  }
  EXPECT_THROW(KernelNbd::disconnect(0), KernelNbdError);
  EXPECT_THROW(KernelNbd::reconfigure(0, {}, 1), KernelNbdError);
  EXPECT_THROW((void)KernelNbd::connected(0), KernelNbdError);
}

}  // namespace
}  // namespace blockway::nbd
