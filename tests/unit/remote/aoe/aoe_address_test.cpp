// aoe://IFACE/SHELF.SLOT: what parse_address accepts and the messages it gives.
#include "remote/aoe/aoe_address.hpp"

#include "remote/backend.hpp"
#include "remote/uri.hpp"
#include "tests/support/refusals.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace blockway::remote::aoe {
namespace {

using ::testing::HasSubstr;

AoeAddress parse(const std::string& text) { return parse_address(Uri::parse(text), text); }

std::string error_of(const std::string& text) {
  return test::what_of<BackendError>([&] { (void)parse(text); });
}

TEST(AoeAddress, ParsesInterfaceShelfAndSlot) {
  EXPECT_EQ(parse("aoe://eth1/0.1"), (AoeAddress{"eth1", 0, 1}));
  EXPECT_EQ(parse("aoe://veth-aoe.0/65534.254"), (AoeAddress{"veth-aoe.0", 65534, 254}));
  EXPECT_EQ(parse("AOE://enp0s31f6/12.0"), (AoeAddress{"enp0s31f6", 12, 0}));
}

TEST(AoeAddress, ShelfAndSlotRanges) {
  test::expect_refusals(error_of, {
      {"aoe://eth1/65535.1", "shelf '65535' is not a number from 0 to 65534"},
      {"aoe://eth1/70000.1", "shelf '70000'"},
      {"aoe://eth1/0.255", "slot '255' is not a number from 0 to 254"},
      {"aoe://eth1/-1.2", "shelf '-1'"},
      {"aoe://eth1/1.x", "slot 'x'"},
      {"aoe://eth1/1.", "slot ''"},
      {"aoe://eth1/.1", "shelf ''"},
      {"aoe://eth1/000001.1", "shelf '000001'"},
  });
}

TEST(AoeAddress, TargetSyntax) {
  test::expect_refusals(error_of, {
      {"aoe://eth1/1", "'1' is not SHELF.SLOT"},
      {"aoe://eth1/1.2.3", "is not SHELF.SLOT"},
      {"aoe://eth1/", "names no shelf and slot"},
      {"aoe://eth1", "names no shelf and slot"},
      {"aoe://eth1/0/1", "is not SHELF.SLOT"},
  });
}

TEST(AoeAddress, InterfaceNames) {
  test::expect_refusals(error_of, {
      {"aoe:///0.1", "names no network interface"},
      {"aoe://abcdefghijklmnop/0.1", "not a valid network interface name"},
      {"aoe://../0.1", "not a valid network interface name"},
      {"aoe://eth1:80/0.1", "takes no port"},
      {"aoe://me@eth1/0.1", "takes no user name"},
      {"aoe://eth1/0.1?mtu=9000", "takes no query parameters"},
  });
  EXPECT_FALSE(valid_interface_name("eth 1"));
  EXPECT_TRUE(valid_interface_name("abcdefghijklmno"));  // 15 bytes is the limit
  EXPECT_FALSE(valid_interface_name("abcdefghijklmnop"));
  EXPECT_FALSE(valid_interface_name("a/b"));
  EXPECT_FALSE(valid_interface_name("."));
}

TEST(AoeAddress, MessagesQuoteTheUriAndTheForm) {
  const auto msg = error_of("aoe://eth1/banana");
  EXPECT_THAT(msg, HasSubstr("'aoe://eth1/banana'"));
  EXPECT_THAT(msg, HasSubstr("aoe://IFACE/SHELF.SLOT"));
}

}  // namespace
}  // namespace blockway::remote::aoe
