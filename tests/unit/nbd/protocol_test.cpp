// NBD wire format helpers: big-endian fields, request headers, error mapping.
#include "nbd/protocol.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cerrno>
#include <future>

namespace blockway::nbd {
namespace {

template <size_t N>
std::array<std::byte, N> raw(const std::array<uint8_t, N>& in) {
  std::array<std::byte, N> out;
  for (size_t i = 0; i < N; ++i) out[i] = std::byte{in[i]};
  return out;
}

TEST(BigEndian, PutWritesMostSignificantByteFirst) {
  std::array<std::byte, 8> b{};
  put16(b.data(), 0x0102);
  EXPECT_EQ(b[0], std::byte{0x01});
  EXPECT_EQ(b[1], std::byte{0x02});
  put32(b.data(), 0x01020304u);
  EXPECT_EQ((std::array<std::byte, 4>{b[0], b[1], b[2], b[3]}), raw<4>({1, 2, 3, 4}));
  put64(b.data(), 0x0102030405060708ull);
  EXPECT_EQ(b, raw<8>({1, 2, 3, 4, 5, 6, 7, 8}));
}

TEST(BigEndian, GetReadsMostSignificantByteFirst) {
  const auto b = raw<8>({0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10});
  EXPECT_EQ(get16(b.data()), 0xfedc);
  EXPECT_EQ(get32(b.data()), 0xfedcba98u);
  EXPECT_EQ(get64(b.data()), 0xfedcba9876543210ull);
}

TEST(BigEndian, RoundTripsAtUnalignedAddresses) {
  std::array<std::byte, 32> buf{};
  for (size_t off = 0; off < 8; ++off) {
    for (uint64_t v : {0ull, 1ull, 0x8000000000000000ull, 0xffffffffffffffffull, 0x123456789abcdef0ull}) {
      put64(buf.data() + off, v);
      EXPECT_EQ(get64(buf.data() + off), v);
      put32(buf.data() + off + 9, static_cast<uint32_t>(v >> 7));
      EXPECT_EQ(get32(buf.data() + off + 9), static_cast<uint32_t>(v >> 7));
      put16(buf.data() + off + 17, static_cast<uint16_t>(v >> 3));
      EXPECT_EQ(get16(buf.data() + off + 17), static_cast<uint16_t>(v >> 3));
    }
  }
}

TEST(BigEndian, MagicsSpellTheirNames) {
  std::array<std::byte, 8> b{};
  put64(b.data(), kNbdMagic);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data()), 8), "NBDMAGIC");
  put64(b.data(), kIHaveOpt);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data()), 8), "IHAVEOPT");
}

TEST(RequestHeader, DecodesTheWireLayout) {
  // magic, flags, type, cookie, offset, length as the spec lays them out.
  const auto wire = raw<28>({0x25, 0x60, 0x95, 0x13,                          // magic
                             0x00, 0x09,                                      // flags: FUA | REQ_ONE
                             0x00, 0x07,                                      // type: BLOCK_STATUS
                             0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,  // cookie
                             0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x10, 0x00,  // offset
                             0x00, 0x10, 0x00, 0x00});                        // length
  const auto h = RequestHeader::decode(wire.data());
  EXPECT_EQ(h.magic, kRequestMagic);
  EXPECT_EQ(h.flags, kCmdFlagFua | kCmdFlagReqOne);
  EXPECT_EQ(h.type, kCmdBlockStatus);
  EXPECT_EQ(h.cookie, 0x1122334455667788ull);
  EXPECT_EQ(h.offset, 0x100001000ull);
  EXPECT_EQ(h.length, 0x100000u);
  std::array<std::byte, 28> back{};
  h.encode(back.data());
  EXPECT_EQ(back, wire);
}

TEST(RequestHeader, EncodeDecodeRoundTrip) {
  const RequestHeader h{kRequestMagic, 0xffff, 0xabcd, ~0ull, 0x7fffffffffffffffull, 0xffffffffu};
  std::array<std::byte, kRequestHeaderSize> buf{};
  h.encode(buf.data());
  const auto d = RequestHeader::decode(buf.data());
  EXPECT_EQ(d.magic, h.magic);
  EXPECT_EQ(d.flags, h.flags);
  EXPECT_EQ(d.type, h.type);
  EXPECT_EQ(d.cookie, h.cookie);
  EXPECT_EQ(d.offset, h.offset);
  EXPECT_EQ(d.length, h.length);
}

std::error_code sys(int e) { return {e, std::system_category()}; }

TEST(ToNbdError, SuccessIsZero) { EXPECT_EQ(to_nbd_error({}), 0u); }

TEST(ToNbdError, SpecValuesPassThrough) {
  for (int e : {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})
    EXPECT_EQ(to_nbd_error(sys(e)), static_cast<uint32_t>(e)) << e;
}

TEST(ToNbdError, OthersAreFoldedIntoSpecValues) {
  EXPECT_EQ(to_nbd_error(sys(EROFS)), static_cast<uint32_t>(EPERM));
  EXPECT_EQ(to_nbd_error(sys(EACCES)), static_cast<uint32_t>(EPERM));
  EXPECT_EQ(to_nbd_error(sys(EDQUOT)), static_cast<uint32_t>(ENOSPC));
  EXPECT_EQ(to_nbd_error(sys(EFBIG)), static_cast<uint32_t>(ENOSPC));
  EXPECT_EQ(to_nbd_error(sys(EOPNOTSUPP)), static_cast<uint32_t>(ENOTSUP));
  for (int e : {ENOENT, EBADF, ECONNRESET, ETIMEDOUT, EAGAIN, 9999}) EXPECT_EQ(to_nbd_error(sys(e)), 5u) << e;
}

TEST(ToNbdError, GenericCategoryIsUnderstood) {
  EXPECT_EQ(to_nbd_error(std::make_error_code(std::errc::read_only_file_system)), static_cast<uint32_t>(EPERM));
  EXPECT_EQ(to_nbd_error(std::make_error_code(std::errc::invalid_argument)), static_cast<uint32_t>(EINVAL));
}

TEST(ToNbdError, ForeignCategoryIsEio) {
  // future_errc values are small integers that would alias errno values.
  const auto ec = std::make_error_code(std::future_errc::broken_promise);
  ASSERT_NE(ec.value(), 0);
  EXPECT_EQ(to_nbd_error(ec), static_cast<uint32_t>(EIO));
}

}  // namespace
}  // namespace blockway::nbd
