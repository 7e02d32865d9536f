// libFuzzer harness: the NBD transmission phase (nbd::Session: request
// headers, write payloads, structured replies, block status over the
// base:allocation and blockway:cache meta contexts). The first input byte
// picks the negotiation, done by the real handshake with well-formed
// options: bit 0 structured replies, bit 1 SET_META_CONTEXT of both
// contexts, bit 2 the read-only export, bit 3 NBD_OPT_EXPORT_NAME instead of
// GO. The rest of the input is the request stream.
#include "tests/fuzz/nbd_fuzz_support.hpp"
#include "nbd/protocol.hpp"

#include <string>
#include <vector>

namespace {

using blockway::nbd::put32;
using blockway::nbd::put64;

void append_option(std::vector<uint8_t>& out, uint32_t opt, const std::vector<uint8_t>& payload) {
  std::byte head[16];
  put64(head, blockway::nbd::kIHaveOpt);
  put32(head + 8, opt);
  put32(head + 12, static_cast<uint32_t>(payload.size()));
  const auto* h = reinterpret_cast<const uint8_t*>(head);
  out.insert(out.end(), h, h + 16);
  out.insert(out.end(), payload.begin(), payload.end());
}

void append32(std::vector<uint8_t>& out, uint32_t v) {
  std::byte b[4];
  put32(b, v);
  const auto* p = reinterpret_cast<const uint8_t*>(b);
  out.insert(out.end(), p, p + 4);
}

void append_str(std::vector<uint8_t>& out, const std::string& s) { out.insert(out.end(), s.begin(), s.end()); }

std::vector<uint8_t> handshake(uint8_t mode) {
  using namespace blockway::nbd;
  const std::string name = mode & 4 ? "ro" : "disk";
  std::vector<uint8_t> out;
  append32(out, kClientFixedNewstyle | kClientNoZeroes);
  if (mode & 1) append_option(out, kOptStructuredReply, {});
  if (mode & 2) {
    std::vector<uint8_t> p;
    append32(p, static_cast<uint32_t>(name.size()));
    append_str(p, name);
    append32(p, 2);
    for (const std::string q : {"base:allocation", "blockway:cache"}) {
      append32(p, static_cast<uint32_t>(q.size()));
      append_str(p, q);
    }
    append_option(out, kOptSetMetaContext, p);
  }
  std::vector<uint8_t> p;
  if (mode & 8) {
    append_str(p, name);
    append_option(out, kOptExportName, p);
  } else {
    append32(p, static_cast<uint32_t>(name.size()));
    append_str(p, name);
    p.push_back(0), p.push_back(0);  // no information requests
    append_option(out, kOptGo, p);
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static blockway::fuzz::NbdFixture fixture;
  if (size == 0) return 0;
  auto stream = handshake(data[0]);
  stream.insert(stream.end(), data + 1, data + size);
  blockway::fuzz::run_nbd(fixture, stream, true);
  return 0;
}
