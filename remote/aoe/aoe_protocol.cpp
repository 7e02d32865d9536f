#include "remote/aoe/aoe_protocol.hpp"

#include <algorithm>
#include <cstdio>

namespace blockway::remote::aoe {
namespace {

uint8_t u8(std::span<const std::byte> in, size_t at) noexcept { return static_cast<uint8_t>(in[at]); }
uint16_t be16(std::span<const std::byte> in, size_t at) noexcept {
  return static_cast<uint16_t>(u8(in, at) << 8 | u8(in, at + 1));
}
uint32_t be32(std::span<const std::byte> in, size_t at) noexcept {
  return uint32_t{be16(in, at)} << 16 | be16(in, at + 2);
}
void put8(std::span<std::byte> out, size_t at, uint8_t v) noexcept { out[at] = std::byte{v}; }
void put16(std::span<std::byte> out, size_t at, uint16_t v) noexcept {
  put8(out, at, static_cast<uint8_t>(v >> 8));
  put8(out, at + 1, static_cast<uint8_t>(v));
}
void put32(std::span<std::byte> out, size_t at, uint32_t v) noexcept {
  put16(out, at, static_cast<uint16_t>(v >> 16));
  put16(out, at + 2, static_cast<uint16_t>(v));
}

// IDENTIFY data is 256 little-endian words.
uint16_t word(std::span<const std::byte> d, size_t w) noexcept {
  return static_cast<uint16_t>(u8(d, 2 * w) | u8(d, 2 * w + 1) << 8);
}

// ATA strings hold two characters per word, the first in the high byte.
std::string ata_string(std::span<const std::byte> d, size_t first_word, size_t words) {
  std::string s;
  for (size_t w = first_word; w < first_word + words; ++w) {
    const uint16_t v = word(d, w);
    for (const uint8_t c : {static_cast<uint8_t>(v >> 8), static_cast<uint8_t>(v)})
      s.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : ' ');
  }
  const auto b = s.find_first_not_of(' ');
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(' ') - b + 1);
}

}  // namespace

const char* error_name(uint8_t error) noexcept {
  switch (error) {
    case 1: return "unrecognized command code";
    case 2: return "bad argument parameter";
    case 3: return "device unavailable";
    case 4: return "config string present";
    case 5: return "unsupported version";
    case 6: return "target is reserved";
    default: return "unknown AoE error";
  }
}

std::string format_mac(const Mac& mac) {
  char buf[18];
  std::snprintf(buf, sizeof buf, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4],
                mac[5]);
  return buf;
}

void encode_header(std::span<std::byte> out, const Header& h) noexcept {
  put8(out, 0, static_cast<uint8_t>(h.version << 4 | (h.flags & 0x0f)));
  put8(out, 1, h.error);
  put16(out, 2, h.shelf);
  put8(out, 4, h.slot);
  put8(out, 5, static_cast<uint8_t>(h.command));
  put32(out, 6, h.tag);
}

void encode_ata(std::span<std::byte> out, const Header& h, const AtaArgs& a) noexcept {
  encode_header(out, h);
  put8(out, 10, a.aflags);
  put8(out, 11, a.err_feature);
  put8(out, 12, a.sector_count);
  put8(out, 13, a.cmd_status);
  for (size_t i = 0; i < 6; ++i) put8(out, 14 + i, static_cast<uint8_t>(a.lba >> (8 * i)));
  put8(out, 20, 0);
  put8(out, 21, 0);
}

size_t encode_query_config(std::span<std::byte> out, uint16_t shelf, uint8_t slot, uint32_t tag) noexcept {
  Header h;
  h.shelf = shelf;
  h.slot = slot;
  h.command = Command::query_config;
  h.tag = tag;
  encode_header(out, h);
  std::fill(out.begin() + kHeaderSize, out.begin() + kConfigHeaderSize, std::byte{0});  // ccmd 0: read
  return kConfigHeaderSize;
}

std::optional<Header> decode_header(std::span<const std::byte> in) noexcept {
  if (in.size() < kHeaderSize) return std::nullopt;
  Header h;
  h.version = u8(in, 0) >> 4;
  h.flags = u8(in, 0) & 0x0f;
  h.error = u8(in, 1);
  h.shelf = be16(in, 2);
  h.slot = u8(in, 4);
  h.command = static_cast<Command>(u8(in, 5));
  h.tag = be32(in, 6);
  return h;
}

std::optional<AtaArgs> decode_ata(std::span<const std::byte> in) noexcept {
  if (in.size() < kAtaHeaderSize) return std::nullopt;
  AtaArgs a;
  a.aflags = u8(in, 10);
  a.err_feature = u8(in, 11);
  a.sector_count = u8(in, 12);
  a.cmd_status = u8(in, 13);
  for (size_t i = 0; i < 6; ++i) a.lba |= uint64_t{u8(in, 14 + i)} << (8 * i);
  return a;
}

std::optional<ConfigArgs> decode_config(std::span<const std::byte> in) noexcept {
  if (in.size() < kConfigHeaderSize) return std::nullopt;
  ConfigArgs c;
  c.buffer_count = be16(in, 10);
  c.firmware = be16(in, 12);
  c.sector_count = u8(in, 14);
  c.aoe_version = u8(in, 15) >> 4;
  c.ccmd = u8(in, 15) & 0x0f;
  c.config_length = be16(in, 16);
  return c;
}

std::optional<IdentifyInfo> parse_identify(std::span<const std::byte> d) noexcept {
  if (d.size() != 512) return std::nullopt;
  IdentifyInfo info;
  const uint16_t w83 = word(d, 83);
  const bool w83_valid = (w83 & 0xc000) == 0x4000;  // bit 14 set, bit 15 clear: word is meaningful
  info.lba48 = w83_valid && (w83 & (1u << 10));
  info.flush = w83_valid && (w83 & (1u << 12));
  info.flush_ext = w83_valid && (w83 & (1u << 13));
  if (info.lba48) {
    for (size_t i = 0; i < 4; ++i) info.sectors |= uint64_t{word(d, 100 + i)} << (16 * i);
  } else {
    info.sectors = uint64_t{word(d, 60)} | uint64_t{word(d, 61)} << 16;
  }
  const uint16_t w106 = word(d, 106);
  if ((w106 & 0xc000) == 0x4000 && (w106 & (1u << 12))) {
    const uint32_t words = uint32_t{word(d, 117)} | uint32_t{word(d, 118)} << 16;
    info.logical_sector_size = words * 2;
  }
  try {
    info.model = ata_string(d, 27, 20);
    info.serial = ata_string(d, 10, 10);
  } catch (...) {
    // Allocation failure: the strings are only for logs.
  }
  return info;
}

unsigned sectors_per_frame(uint8_t target_sector_count, unsigned mtu) noexcept {
  const unsigned target = target_sector_count == 0 ? 2u : target_sector_count;
  const unsigned by_mtu = mtu > kAtaHeaderSize ? static_cast<unsigned>((mtu - kAtaHeaderSize) / kSectorSize) : 0u;
  return std::min({target, by_mtu, 255u});
}

}  // namespace blockway::remote::aoe
