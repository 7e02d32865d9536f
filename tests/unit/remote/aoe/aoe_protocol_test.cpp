// The AoE wire format: header, ATA and Query Config encoding/decoding, and
// the IDENTIFY fields the initiator relies on.
#include "remote/aoe/aoe_protocol.hpp"

#include <gtest/gtest.h>

#include <array>
#include <string>
#include <vector>

namespace blockway::remote::aoe {
namespace {

std::vector<uint8_t> bytes(std::span<const std::byte> s) {
  std::vector<uint8_t> v;
  for (auto b : s) v.push_back(static_cast<uint8_t>(b));
  return v;
}

TEST(AoeProtocol, AtaReadExtRequestBytes) {
  std::array<std::byte, kAtaHeaderSize> out{};
  Header h;
  h.shelf = 0x1234;
  h.slot = 7;
  h.command = Command::ata;
  h.tag = 0xdeadbeef;
  AtaArgs a;
  a.aflags = kAtaExtended;
  a.sector_count = 17;
  a.cmd_status = kAtaReadSectorsExt;
  a.lba = 0x0000a1b2c3d4e5f6;
  encode_ata(out, h, a);
  const std::vector<uint8_t> want{0x10, 0x00, 0x12, 0x34, 0x07, 0x00, 0xde, 0xad, 0xbe, 0xef, 0x40,
                                  0x00, 17,   0x24, 0xf6, 0xe5, 0xd4, 0xc3, 0xb2, 0xa1, 0x00, 0x00};
  EXPECT_EQ(bytes(out), want);
}

TEST(AoeProtocol, HeaderRoundTripKeepsFlagsAndTag) {
  std::array<std::byte, kHeaderSize> buf{};
  Header h;
  h.flags = kFlagResponse | kFlagError;
  h.error = 3;
  h.shelf = 65534;
  h.slot = 254;
  h.command = Command::query_config;
  h.tag = 0x80000001;
  encode_header(buf, h);
  auto d = decode_header(buf);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->version, kVersion);
  EXPECT_EQ(d->flags, kFlagResponse | kFlagError);
  EXPECT_EQ(d->error, 3);
  EXPECT_EQ(d->shelf, 65534);
  EXPECT_EQ(d->slot, 254);
  EXPECT_EQ(d->command, Command::query_config);
  EXPECT_EQ(d->tag, 0x80000001u);
}

TEST(AoeProtocol, ShortFramesDoNotDecode) {
  std::array<std::byte, 64> buf{};
  EXPECT_FALSE(decode_header(std::span(buf).first(kHeaderSize - 1)));
  EXPECT_TRUE(decode_header(std::span(buf).first(kHeaderSize)));
  EXPECT_FALSE(decode_ata(std::span(buf).first(kAtaHeaderSize - 1)));
  EXPECT_TRUE(decode_ata(std::span(buf).first(kAtaHeaderSize)));
  EXPECT_FALSE(decode_config(std::span(buf).first(kConfigHeaderSize - 1)));
  EXPECT_TRUE(decode_config(std::span(buf).first(kConfigHeaderSize)));
  EXPECT_FALSE(decode_header({}));
}

TEST(AoeProtocol, QueryConfigRequestAndAnswer) {
  std::array<std::byte, kConfigHeaderSize> q{};
  EXPECT_EQ(encode_query_config(q, kBroadcastShelf, kBroadcastSlot, 42), kConfigHeaderSize);
  const std::vector<uint8_t> want{0x10, 0, 0xff, 0xff, 0xff, 1, 0, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(bytes(q), want);
  // vblade's answer: 16 buffers, firmware 0x4019, 2 sectors, AoE v1, no config string.
  const std::array<uint8_t, 18> answer{0x18, 0, 0, 0, 1, 1, 0, 0, 0, 42, 0, 16, 0x40, 0x19, 2, 0x10, 0, 0};
  std::array<std::byte, 18> in{};
  for (size_t i = 0; i < in.size(); ++i) in[i] = std::byte{answer[i]};
  auto h = decode_header(in);
  ASSERT_TRUE(h);
  EXPECT_TRUE(h->flags & kFlagResponse);
  EXPECT_EQ(h->slot, 1);
  auto c = decode_config(in);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->buffer_count, 16);
  EXPECT_EQ(c->firmware, 0x4019);
  EXPECT_EQ(c->sector_count, 2);
  EXPECT_EQ(c->aoe_version, 1);
  EXPECT_EQ(c->ccmd, 0);
}

TEST(AoeProtocol, AtaAnswerDecodesStatusAndLba) {
  std::array<std::byte, kAtaHeaderSize> buf{};
  Header h;
  h.flags = kFlagResponse;
  AtaArgs a;
  a.err_feature = 0x10;
  a.cmd_status = 0x41;  // DRDY | ERR
  a.lba = kMaxLba48;
  encode_ata(buf, h, a);
  auto d = decode_ata(buf);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->cmd_status & kAtaStatusErr, kAtaStatusErr);
  EXPECT_EQ(d->err_feature, 0x10);
  EXPECT_EQ(d->lba, kMaxLba48);
}

std::array<std::byte, 512> identify_data(uint16_t w83, uint64_t lba48, uint32_t lba28) {
  std::array<std::byte, 512> d{};
  auto put = [&d](size_t w, uint16_t v) {
    d[2 * w] = std::byte(v & 0xff);
    d[2 * w + 1] = std::byte(v >> 8);
  };
  put(83, w83);
  put(60, static_cast<uint16_t>(lba28));
  put(61, static_cast<uint16_t>(lba28 >> 16));
  for (size_t i = 0; i < 4; ++i) put(100 + i, static_cast<uint16_t>(lba48 >> (16 * i)));
  // "Coraid EtherDrive" in words 27..: two characters per word, first in the high byte.
  const std::string model = "Coraid vblade";  // odd length: the last word ends in a space
  for (size_t i = 0; i < model.size(); i += 2)
    put(27 + i / 2, static_cast<uint16_t>(model[i] << 8 | (i + 1 < model.size() ? model[i + 1] : ' ')));
  return d;
}

TEST(AoeProtocol, IdentifyLba48SizeAndFlush) {
  // vblade's word 83 is 0x5400: LBA48 and FLUSH CACHE, no FLUSH CACHE EXT.
  auto d = identify_data(0x5400, 0x123456789ull, 0x0fffffff);
  auto info = parse_identify(d);
  ASSERT_TRUE(info);
  EXPECT_TRUE(info->lba48);
  EXPECT_TRUE(info->flush);
  EXPECT_FALSE(info->flush_ext);
  EXPECT_EQ(info->sectors, 0x123456789ull);
  EXPECT_EQ(info->logical_sector_size, 512u);
  EXPECT_EQ(info->model, "Coraid vblade");
}

TEST(AoeProtocol, IdentifyLba28WhenWord83IsInvalid) {
  auto d = identify_data(0x0000 | (1u << 10), 0x999999999ull, 123456);  // bit 14 clear: word not valid
  auto info = parse_identify(d);
  ASSERT_TRUE(info);
  EXPECT_FALSE(info->lba48);
  EXPECT_EQ(info->sectors, 123456u);
  EXPECT_FALSE(parse_identify(std::span(d).first(511)));
}

TEST(AoeProtocol, SectorsPerFrameFromTargetAndMtu) {
  EXPECT_EQ(sectors_per_frame(2, 1500), 2u);     // vblade at MTU 1500
  EXPECT_EQ(sectors_per_frame(17, 9000), 17u);   // vblade at MTU 9000
  EXPECT_EQ(sectors_per_frame(255, 9000), 17u);  // our MTU is the limit
  EXPECT_EQ(sectors_per_frame(1, 9000), 1u);     // the target's is
  EXPECT_EQ(sectors_per_frame(0, 9000), 2u);     // 0 means the protocol's default
  EXPECT_EQ(sectors_per_frame(255, 65535), 127u);
  EXPECT_EQ(sectors_per_frame(2, 500), 0u);      // not even one sector fits
}

TEST(AoeProtocol, MacFormatting) {
  EXPECT_EQ(format_mac(Mac{0x56, 0x6c, 0xcc, 0xe0, 0xd9, 0x46}), "56:6c:cc:e0:d9:46");
}

}  // namespace
}  // namespace blockway::remote::aoe
