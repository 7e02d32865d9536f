// libFuzzer harness: the AoE frame decoders the initiator runs on every frame
// its AF_PACKET socket receives (remote/aoe/aoe_protocol: the common header,
// ATA and Query Config arguments, the IDENTIFY DEVICE data), fed whole
// frames as they arrive after the Ethernet header.
#include "remote/aoe/aoe_protocol.hpp"

#include <cstddef>
#include <cstdint>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace blockway::remote::aoe;
  const std::span<const std::byte> frame(reinterpret_cast<const std::byte*>(data), size);
  if (auto h = decode_header(frame)) {
    if (auto a = decode_ata(frame)) {
      // An answer to IDENTIFY carries the 512-byte data after the ATA header.
      if (frame.size() >= kAtaHeaderSize + 512) (void)parse_identify(frame.subspan(kAtaHeaderSize, 512));
      (void)a->lba;
    }
    if (auto c = decode_config(frame)) (void)sectors_per_frame(c->sector_count, static_cast<unsigned>(size));
  }
  if (size >= 512) (void)parse_identify(frame.first(512));
  return 0;
}
