// The ATA over Ethernet wire format (AoE protocol, revision 1): the common
// header, the ATA command arguments, Query Config arguments, and the parts of
// an ATA IDENTIFY DEVICE answer the initiator needs.
//
// Offsets are relative to the start of the AoE header, i.e. the payload of an
// AF_PACKET SOCK_DGRAM socket (the 14-byte Ethernet header is the kernel's).
// Multi-byte header fields are big-endian; the ATA LBA is six bytes, least
// significant first, as in the ATA task file.
//
// Pure functions on byte spans, no allocation, no threads: the encoders write
// into a caller's buffer, the decoders return nullopt for anything too short.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace blockway::remote::aoe {

inline constexpr uint16_t kEtherType = 0x88A2;
inline constexpr uint8_t kVersion = 1;
inline constexpr size_t kSectorSize = 512;

inline constexpr size_t kHeaderSize = 10;        // ver/flags, error, shelf, slot, command, tag
inline constexpr size_t kAtaHeaderSize = 22;     // + aflags, err/feature, count, cmd/status, lba[6], 2 reserved
inline constexpr size_t kConfigHeaderSize = 18;  // + bufcnt, firmware, sector count, ver/ccmd, string length

inline constexpr uint8_t kFlagResponse = 0x08;
inline constexpr uint8_t kFlagError = 0x04;

inline constexpr uint16_t kBroadcastShelf = 0xffff;
inline constexpr uint8_t kBroadcastSlot = 0xff;

enum class Command : uint8_t { ata = 0, query_config = 1, mac_mask = 2, reserve = 3 };

// AoE error codes (header byte 1 when kFlagError is set).
[[nodiscard]] const char* error_name(uint8_t error) noexcept;

// ATA argument flags.
inline constexpr uint8_t kAtaExtended = 0x40;  // LBA48 command
inline constexpr uint8_t kAtaDevice = 0x10;
inline constexpr uint8_t kAtaAsync = 0x02;
inline constexpr uint8_t kAtaWrite = 0x01;

// ATA commands and status bits.
inline constexpr uint8_t kAtaReadSectors = 0x20;
inline constexpr uint8_t kAtaReadSectorsExt = 0x24;
inline constexpr uint8_t kAtaWriteSectors = 0x30;
inline constexpr uint8_t kAtaWriteSectorsExt = 0x34;
inline constexpr uint8_t kAtaFlushCache = 0xE7;
inline constexpr uint8_t kAtaFlushCacheExt = 0xEA;
inline constexpr uint8_t kAtaIdentify = 0xEC;
inline constexpr uint8_t kAtaStatusErr = 0x01;
inline constexpr uint8_t kAtaStatusDf = 0x20;  // device fault
inline constexpr uint8_t kAtaStatusBsy = 0x80;

inline constexpr uint64_t kMaxLba28 = 0x0fffffff;
inline constexpr uint64_t kMaxLba48 = (uint64_t{1} << 48) - 1;

using Mac = std::array<uint8_t, 6>;
inline constexpr Mac kBroadcastMac{0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
[[nodiscard]] std::string format_mac(const Mac& mac);

struct Header {
  uint8_t version = kVersion;
  uint8_t flags = 0;
  uint8_t error = 0;
  uint16_t shelf = 0;
  uint8_t slot = 0;
  Command command = Command::ata;
  uint32_t tag = 0;
};

struct AtaArgs {
  uint8_t aflags = 0;
  uint8_t err_feature = 0;   // feature in a request, error register in an answer
  uint8_t sector_count = 0;
  uint8_t cmd_status = 0;    // command in a request, status register in an answer
  uint64_t lba = 0;          // 48 bits
};

struct ConfigArgs {
  uint16_t buffer_count = 0;  // frames the target accepts outstanding per initiator
  uint16_t firmware = 0;
  uint8_t sector_count = 0;   // most sectors per ATA command (0: the protocol's default, 2)
  uint8_t aoe_version = 0;
  uint8_t ccmd = 0;           // 0: read the config string
  uint16_t config_length = 0;
};

// Writes the 10-byte common header. `out` must hold kHeaderSize bytes.
void encode_header(std::span<std::byte> out, const Header& h) noexcept;
// Writes header + ATA arguments (kAtaHeaderSize bytes).
void encode_ata(std::span<std::byte> out, const Header& h, const AtaArgs& a) noexcept;
// Writes a Query Config "read" request (kConfigHeaderSize bytes); returns its length.
size_t encode_query_config(std::span<std::byte> out, uint16_t shelf, uint8_t slot, uint32_t tag) noexcept;

[[nodiscard]] std::optional<Header> decode_header(std::span<const std::byte> in) noexcept;
[[nodiscard]] std::optional<AtaArgs> decode_ata(std::span<const std::byte> in) noexcept;
[[nodiscard]] std::optional<ConfigArgs> decode_config(std::span<const std::byte> in) noexcept;

// What the initiator reads from the 512-byte IDENTIFY DEVICE data.
struct IdentifyInfo {
  uint64_t sectors = 0;        // addressable 512-byte sectors (LBA48 count when lba48)
  bool lba48 = false;          // word 83 bit 10
  bool flush = false;          // word 83 bit 12: FLUSH CACHE
  bool flush_ext = false;      // word 83 bit 13: FLUSH CACHE EXT
  uint32_t logical_sector_size = kSectorSize;  // words 106, 117-118
  std::string model;           // words 27-46, trimmed
  std::string serial;          // words 10-19, trimmed
};
// nullopt when the data is not 512 bytes.
[[nodiscard]] std::optional<IdentifyInfo> parse_identify(std::span<const std::byte> data) noexcept;

// Sectors one frame can carry: the target's limit (0 means 2), the
// interface MTU after the AoE+ATA headers, and the 8-bit count field.
[[nodiscard]] unsigned sectors_per_frame(uint8_t target_sector_count, unsigned mtu) noexcept;

}  // namespace blockway::remote::aoe
