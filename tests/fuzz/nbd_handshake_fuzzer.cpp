// libFuzzer harness: the NBD fixed-newstyle handshake (nbd::negotiate) fed
// the fuzzer's input as everything a client sends after the greeting: client
// flags, then options (EXPORT_NAME, LIST, INFO, GO, STRUCTURED_REPLY,
// LIST/SET_META_CONTEXT, STARTTLS, ABORT, unknown ones) with their payloads.
#include "tests/fuzz/nbd_fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static blockway::fuzz::NbdFixture fixture;
  blockway::fuzz::run_nbd(fixture, {data, size}, false);
  return 0;
}
