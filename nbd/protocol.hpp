// NBD wire format: constants of the protocol (NetworkBlockDevice/nbd
// doc/proto.md) and big-endian field encoding. Pure functions, no threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <system_error>

namespace blockway::nbd {

// Handshake.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
inline constexpr uint64_t kIHaveOpt = 0x49484156454F5054ull;  // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x3e889045565a9ull;
inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kClientFixedNewstyle = 1u << 0;
inline constexpr uint32_t kClientNoZeroes = 1u << 1;

enum Option : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
};

inline constexpr uint32_t kRepErrBit = 0x80000000u;
enum OptionReply : uint32_t {
  kRepAck = 1,
  kRepServer = 2,
  kRepInfo = 3,
  kRepMetaContext = 4,
  kRepErrUnsup = kRepErrBit | 1,
  kRepErrPolicy = kRepErrBit | 2,
  kRepErrInvalid = kRepErrBit | 3,
  kRepErrPlatform = kRepErrBit | 4,
  kRepErrTlsReqd = kRepErrBit | 5,
  kRepErrUnknown = kRepErrBit | 6,
  kRepErrShutdown = kRepErrBit | 7,
  kRepErrBlockSizeReqd = kRepErrBit | 8,
  kRepErrTooBig = kRepErrBit | 9,
};

enum InfoType : uint16_t { kInfoExport = 0, kInfoName = 1, kInfoDescription = 2, kInfoBlockSize = 3 };

// Transmission flags (per export).
enum TransmissionFlag : uint16_t {
  kFlagHasFlags = 1u << 0,
  kFlagReadOnly = 1u << 1,
  kFlagSendFlush = 1u << 2,
  kFlagSendFua = 1u << 3,
  kFlagRotational = 1u << 4,
  kFlagSendTrim = 1u << 5,
  kFlagSendWriteZeroes = 1u << 6,
  kFlagSendDf = 1u << 7,
  kFlagCanMultiConn = 1u << 8,
  kFlagSendCache = 1u << 10,
  kFlagSendFastZero = 1u << 11,
};

// Transmission.
inline constexpr uint32_t kRequestMagic = 0x25609513u;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33efu;
inline constexpr size_t kRequestHeaderSize = 28;
inline constexpr size_t kSimpleReplySize = 16;
inline constexpr size_t kStructuredHeaderSize = 20;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};

enum CommandFlag : uint16_t {
  kCmdFlagFua = 1u << 0,
  kCmdFlagNoHole = 1u << 1,
  kCmdFlagDf = 1u << 2,
  kCmdFlagReqOne = 1u << 3,
  kCmdFlagFastZero = 1u << 4,
};

inline constexpr uint16_t kReplyFlagDone = 1u << 0;
enum ReplyType : uint16_t {
  kReplyNone = 0,
  kReplyOffsetData = 1,
  kReplyOffsetHole = 2,
  kReplyBlockStatus = 5,
  kReplyError = (1u << 15) | 1,
  kReplyErrorOffset = (1u << 15) | 2,
};

// base:allocation flags.
inline constexpr uint32_t kStateHole = 1u << 0;
inline constexpr uint32_t kStateZero = 1u << 1;

inline constexpr size_t kMaxString = 4096;  // longest export name or query

// The NBD error value for an errno-carrying error code: the spec allows only
// a few, so this is the one place where others are folded into them.
uint32_t to_nbd_error(std::error_code ec) noexcept;

// Big-endian encoding into and out of raw bytes.
inline void put16(std::byte* p, uint16_t v) noexcept {
  v = __builtin_bswap16(v);
  std::memcpy(p, &v, 2);
}
inline void put32(std::byte* p, uint32_t v) noexcept {
  v = __builtin_bswap32(v);
  std::memcpy(p, &v, 4);
}
inline void put64(std::byte* p, uint64_t v) noexcept {
  v = __builtin_bswap64(v);
  std::memcpy(p, &v, 8);
}
inline uint16_t get16(const std::byte* p) noexcept {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return __builtin_bswap16(v);
}
inline uint32_t get32(const std::byte* p) noexcept {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return __builtin_bswap32(v);
}
inline uint64_t get64(const std::byte* p) noexcept {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}

struct RequestHeader {
  uint32_t magic = 0;
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;

  static RequestHeader decode(const std::byte* p) noexcept {
    return {get32(p), get16(p + 4), get16(p + 6), get64(p + 8), get64(p + 16), get32(p + 24)};
  }
  void encode(std::byte* p) const noexcept {
    put32(p, magic), put16(p + 4, flags), put16(p + 6, type), put64(p + 8, cookie),
        put64(p + 16, offset), put32(p + 24, length);
  }
};

}  // namespace blockway::nbd
