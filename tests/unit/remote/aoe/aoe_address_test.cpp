// aoe://IFACE/SHELF.SLOT: what parse_address accepts and the messages it gives.
#include "remote/aoe/aoe_address.hpp"

#include "remote/backend.hpp"
#include "remote/uri.hpp"
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
  EXPECT_THAT(error_of("aoe://eth1/65535.1"), HasSubstr("shelf '65535' is not a number from 0 to 65534"));
  EXPECT_THAT(error_of("aoe://eth1/70000.1"), HasSubstr("shelf '70000'"));
  EXPECT_THAT(error_of("aoe://eth1/0.255"), HasSubstr("slot '255' is not a number from 0 to 254"));
  EXPECT_THAT(error_of("aoe://eth1/-1.2"), HasSubstr("shelf '-1'"));
  EXPECT_THAT(error_of("aoe://eth1/1.x"), HasSubstr("slot 'x'"));
  EXPECT_THAT(error_of("aoe://eth1/1."), HasSubstr("slot ''"));
  EXPECT_THAT(error_of("aoe://eth1/.1"), HasSubstr("shelf ''"));
  EXPECT_THAT(error_of("aoe://eth1/000001.1"), HasSubstr("shelf '000001'"));
}

TEST(AoeAddress, TargetSyntax) {
  EXPECT_THAT(error_of("aoe://eth1/1"), HasSubstr("'1' is not SHELF.SLOT"));
  EXPECT_THAT(error_of("aoe://eth1/1.2.3"), HasSubstr("is not SHELF.SLOT"));
  EXPECT_THAT(error_of("aoe://eth1/"), HasSubstr("names no shelf and slot"));
  EXPECT_THAT(error_of("aoe://eth1"), HasSubstr("names no shelf and slot"));
  EXPECT_THAT(error_of("aoe://eth1/0/1"), HasSubstr("is not SHELF.SLOT"));
}

TEST(AoeAddress, InterfaceNames) {
  EXPECT_THAT(error_of("aoe:///0.1"), HasSubstr("names no network interface"));
  EXPECT_THAT(error_of("aoe://abcdefghijklmnop/0.1"), HasSubstr("not a valid network interface name"));
  EXPECT_THAT(error_of("aoe://../0.1"), HasSubstr("not a valid network interface name"));
  EXPECT_FALSE(valid_interface_name("eth 1"));
  EXPECT_THAT(error_of("aoe://eth1:80/0.1"), HasSubstr("takes no port"));
  EXPECT_THAT(error_of("aoe://me@eth1/0.1"), HasSubstr("takes no user name"));
  EXPECT_THAT(error_of("aoe://eth1/0.1?mtu=9000"), HasSubstr("takes no query parameters"));
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
