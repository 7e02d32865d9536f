// The transmission phase: a real handshake, then raw requests over a socketpair.
#include "nbd/session.hpp"
#include "tests/unit/nbd/nbd_harness.hpp"

#include <gtest/gtest.h>

#include <cerrno>
#include <map>
#include <set>
#include <thread>

namespace blockway::test {
namespace {

using namespace blockway::nbd;
using core::Capabilities;
using core::kExtentHole;
using core::kExtentZero;

constexpr uint64_t kDiskSize = 4u << 20;

Bytes pattern(size_t n, uint8_t seed) {
  Bytes v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>((i * 31 + seed) % 255 + 1));
  return v;
}

class SessionTest : public ::testing::Test {
 protected:
  SessionTest() {
    disk_ = make_export("disk", {.size = kDiskSize}, native_caps());
    ro_ = make_export("ro", {.size = kDiskSize}, native_caps(), true);
    table_.add(disk_.exp);
    table_.add(ro_.exp);
  }

  // Handshake with GO on `name`; then the Session serves requests.
  void start(bool structured = true, bool meta = true, SessionLimits limits = {}, const std::string& name = "disk") {
    server_.emplace(table_, HandshakeOptions{.max_request_bytes = limits.max_request_bytes}, limits);
    ASSERT_TRUE(client_go(fd(), name, structured, meta));
    ASSERT_TRUE(server_->wait_negotiated());
    ASSERT_TRUE(server_->negotiated());
  }
  int fd() { return server_->client(); }
  void send(const Bytes& b) { ASSERT_TRUE(send_all(fd(), b)); }
  // Sending `bytes` ends the session: the server closes the connection
  // without a reply, and is done.
  void expect_sending_ends_the_session(const Bytes& bytes) {
    send(bytes);
    EXPECT_TRUE(closed_by_peer(fd())) << "no reply; the connection ends";
    ASSERT_TRUE(server_->wait_done());
  }
  Reply next(uint32_t read_length = 0) {
    auto r = read_reply(fd(), read_length);
    EXPECT_TRUE(r) << "no reply from the server";
    return r.value_or(Reply{});
  }
  // A successful reply to a command that carries no data.
  static void expect_ok(const Reply& r, uint64_t cookie) {
    EXPECT_EQ(r.cookie, cookie);
    if (r.structured) {
      EXPECT_EQ(r.type, kReplyNone);
      EXPECT_EQ(r.flags, kReplyFlagDone);
    } else {
      EXPECT_EQ(r.error, 0u);
    }
  }
  // A structured chunk of `type` for cookie, the last (DONE) of its reply.
  static void expect_done_chunk(const Reply& r, uint64_t cookie, uint16_t type) {
    EXPECT_TRUE(r.structured);
    EXPECT_EQ(r.cookie, cookie);
    EXPECT_EQ(r.type, type);
    EXPECT_EQ(r.flags, kReplyFlagDone);
  }
  // A structured error chunk: DONE, the NBD error value, and a message.
  static void expect_error_chunk(const Reply& r, uint64_t cookie, uint32_t error) {
    expect_done_chunk(r, cookie, kReplyError);
    ASSERT_GE(r.payload.size(), 6u);
    EXPECT_EQ(get32(r.payload.data()), error);
    const uint16_t msg_len = get16(r.payload.data() + 4);
    EXPECT_EQ(r.payload.size(), 6u + msg_len);
    EXPECT_GT(msg_len, 0u);
  }
  // A structured read answered with one OFFSET_DATA chunk.
  static Bytes data_of(const Reply& r, uint64_t cookie, uint64_t offset) {
    expect_done_chunk(r, cookie, kReplyOffsetData);
    if (r.payload.size() < 8) return {};
    EXPECT_EQ(get64(r.payload.data()), offset);
    return Bytes(r.payload.begin() + 8, r.payload.end());
  }

  core::ExportTable table_;
  TestExport disk_, ro_;
  std::optional<ServerHarness> server_;
};

// ---------------------------------------------------------------- data path

TEST_F(SessionTest, WriteThenReadRoundTripWithStructuredReplies) {
  start();
  const auto data = pattern(8192, 1);
  send(request(kCmdWrite, 0, 1, 4096, 8192, data));
  expect_ok(next(), 1);
  EXPECT_EQ(disk_.mem->contents(4096, 8192), data);
  send(request(kCmdRead, 0, 2, 4096, 8192));
  EXPECT_EQ(data_of(next(), 2, 4096), data);
}

TEST_F(SessionTest, SimpleRepliesWhenNotStructured) {
  start(/*structured=*/false, /*meta=*/false);
  const auto data = pattern(4096, 2);
  send(request(kCmdWrite, 0, 10, 0, 4096, data));
  auto w = next();
  EXPECT_FALSE(w.structured);
  EXPECT_EQ(w.cookie, 10u);
  EXPECT_EQ(w.error, 0u);
  send(request(kCmdRead, 0, 11, 0, 4096));
  auto r = next(4096);
  EXPECT_FALSE(r.structured);
  EXPECT_EQ(r.cookie, 11u);
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(r.payload, data);
  // Zeroes travel in full too: there is no hole chunk without structured replies.
  send(request(kCmdRead, 0, 12, 65536, 512));
  auto z = next(512);
  EXPECT_EQ(z.payload, Bytes(512));
}

TEST_F(SessionTest, SimpleErrorReplyCarriesNoDataAndStreamStaysInSync) {
  start(false, false);
  send(request(kCmdRead, 0, 20, kDiskSize - 512, 4096));
  auto e = next();  // no data expected after an error
  EXPECT_FALSE(e.structured);
  EXPECT_EQ(e.cookie, 20u);
  EXPECT_EQ(e.error, static_cast<uint32_t>(EINVAL));
  disk_.mem->fill_pattern(0, 512);
  send(request(kCmdRead, 0, 21, 0, 512));
  auto r = next(512);
  EXPECT_EQ(r.cookie, 21u);
  EXPECT_EQ(r.payload, disk_.mem->contents(0, 512));
}

TEST_F(SessionTest, AllZeroReadIsAnOffsetHoleChunk) {
  start();
  send(request(kCmdRead, 0, 3, 1u << 20, 65536));
  auto r = next();
  expect_done_chunk(r, 3u, kReplyOffsetHole);
  ASSERT_EQ(r.payload.size(), 12u);
  EXPECT_EQ(get64(r.payload.data()), 1u << 20);
  EXPECT_EQ(get32(r.payload.data() + 8), 65536u);
}

TEST_F(SessionTest, ReadWithOneNonZeroByteIsData) {
  start();
  disk_.mem->fill(65535, 1, std::byte{1});  // the very last byte
  send(request(kCmdRead, 0, 4, 0, 65536));
  const auto data = data_of(next(), 4, 0);
  ASSERT_EQ(data.size(), 65536u);
  EXPECT_EQ(data.back(), std::byte{1});
}

TEST_F(SessionTest, ZeroLengthStructuredReadIsANoneChunk) {
  start();
  send(request(kCmdRead, 0, 6, 4096, 0));
  auto r = next();
  expect_done_chunk(r, 6u, kReplyNone);
  EXPECT_TRUE(r.payload.empty());
  send(request(kCmdFlush, 0, 7, 0, 0));  // still in sync
  expect_ok(next(), 7);
}

TEST_F(SessionTest, OutOfRangeReadIsAnErrorChunk) {
  start();
  send(request(kCmdRead, 0, 5, kDiskSize - 512, 4096));
  expect_error_chunk(next(), 5, EINVAL);
  EXPECT_EQ(disk_.mem->calls(test::Op::read), 0u);
}

TEST_F(SessionTest, DeviceErrorsAreMappedToNbdErrors) {
  start();
  send(request(kCmdWrite, 0, 6, kDiskSize - 512, 4096, pattern(4096, 3)));
  expect_error_chunk(next(), 6, ENOSPC);
  disk_.mem->fail(test::Op::write, EROFS);
  send(request(kCmdWrite, 0, 7, 0, 512, pattern(512, 3)));
  expect_error_chunk(next(), 7, EPERM);
  disk_.mem->fail(test::Op::flush, ECONNRESET);
  send(request(kCmdFlush, 0, 8, 0, 0));
  expect_error_chunk(next(), 8, EIO);
}

TEST_F(SessionTest, WritesToAReadOnlyExportAreEperm) {
  start(true, true, {}, "ro");
  send(request(kCmdWrite, 0, 9, 0, 512, pattern(512, 4)));
  expect_error_chunk(next(), 9, EPERM);
  send(request(kCmdTrim, 0, 10, 0, 512));
  expect_error_chunk(next(), 10, EPERM);
  send(request(kCmdWriteZeroes, 0, 11, 0, 512));
  expect_error_chunk(next(), 11, EPERM);
  EXPECT_EQ(ro_.mem->calls(test::Op::write), 0u);
}

TEST_F(SessionTest, CommandsReachTheDeviceWithTheirFlags) {
  start();
  send(request(kCmdWrite, kCmdFlagFua, 1, 0, 512, pattern(512, 5)));
  expect_ok(next(), 1);
  send(request(kCmdFlush, 0, 2, 0, 0));
  expect_ok(next(), 2);
  send(request(kCmdTrim, kCmdFlagFua, 3, 4096, 4096));
  expect_ok(next(), 3);
  send(request(kCmdWriteZeroes, kCmdFlagNoHole | kCmdFlagFastZero, 4, 8192, 4096));
  expect_ok(next(), 4);
  send(request(kCmdCache, 0, 5, 0, 65536));
  expect_ok(next(), 5);
  const std::vector<Call> expected{{Op::write, 0, 512, core::kFua},
                                   {Op::flush, 0, 0, 0},
                                   {Op::trim, 4096, 4096, core::kFua},
                                   {Op::zero, 8192, 4096, core::kNoHole | core::kFastZero},
                                   {Op::prefetch, 0, 65536, 0}};
  EXPECT_EQ(disk_.mem->log(), expected);
}

// ---------------------------------------------------------------- bad requests

TEST_F(SessionTest, UnknownCommandIsEinvalAndTheSessionGoesOn) {
  start();
  send(request(99, 0, 30, 0, 0));
  expect_error_chunk(next(), 30, EINVAL);
  send(request(kCmdFlush, 0, 31, 0, 0));
  expect_ok(next(), 31);
}

TEST_F(SessionTest, UnknownFlagsAreEinval) {
  start();
  send(request(kCmdRead, kCmdFlagNoHole, 32, 0, 512));
  expect_error_chunk(next(), 32, EINVAL);
  // The payload of a refused write is still consumed.
  send(request(kCmdWrite, kCmdFlagReqOne, 33, 0, 512, pattern(512, 6)));
  expect_error_chunk(next(), 33, EINVAL);
  send(request(kCmdFlush, 1u << 9, 34, 0, 0));
  expect_error_chunk(next(), 34, EINVAL);
  send(request(kCmdRead, kCmdFlagDf, 35, 0, 512));  // DF is fine with structured replies
  EXPECT_EQ(next().cookie, 35u);
  EXPECT_EQ(disk_.mem->calls(test::Op::write), 0u);
}

TEST_F(SessionTest, DfWithoutStructuredRepliesIsEinval) {
  start(false, false);
  send(request(kCmdRead, kCmdFlagDf, 36, 0, 512));
  auto r = next();
  EXPECT_EQ(r.cookie, 36u);
  EXPECT_EQ(r.error, static_cast<uint32_t>(EINVAL));
}

TEST_F(SessionTest, OversizedWriteIsEinvalAndTheSessionStaysUsable) {
  SessionLimits limits;
  limits.max_request_bytes = 64u << 10;
  start(true, true, limits);
  send(request(kCmdWrite, 0, 40, 0, 128u << 10, pattern(128u << 10, 7)));
  expect_error_chunk(next(), 40, EINVAL);
  EXPECT_EQ(disk_.mem->calls(test::Op::write), 0u);
  // The payload was skipped exactly: the next request parses.
  disk_.mem->fill_pattern(0, 4096);
  send(request(kCmdRead, 0, 41, 0, 4096));
  EXPECT_EQ(data_of(next(), 41, 0), disk_.mem->contents(0, 4096));
  send(request(kCmdRead, 0, 42, 0, 128u << 10));
  expect_error_chunk(next(), 42, EINVAL);
  // At the limit is fine.
  send(request(kCmdWrite, 0, 43, 0, 64u << 10, pattern(64u << 10, 8)));
  expect_ok(next(), 43);
}

TEST_F(SessionTest, BadMagicClosesTheConnection) {
  start();
  expect_sending_ends_the_session(request(kCmdRead, 0, 50, 0, 512, {}, 0xdeadbeef));
  EXPECT_EQ(disk_.mem->calls(test::Op::read), 0u);
}

TEST_F(SessionTest, DiscEndsTheSessionAndFlushesUnflushedWrites) {
  start();
  send(request(kCmdWrite, 0, 51, 0, 512, pattern(512, 9)));
  expect_ok(next(), 51);
  ASSERT_NO_FATAL_FAILURE(expect_sending_ends_the_session(request(kCmdDisc, 0, 52, 0, 0)));
  EXPECT_EQ(disk_.mem->calls(test::Op::flush), 1u);
}

TEST_F(SessionTest, DiscAfterFlushDoesNotFlushAgain) {
  start();
  send(request(kCmdWrite, 0, 53, 0, 512, pattern(512, 9)));
  expect_ok(next(), 53);
  send(request(kCmdFlush, 0, 54, 0, 0));
  expect_ok(next(), 54);
  ASSERT_NO_FATAL_FAILURE(expect_sending_ends_the_session(request(kCmdDisc, 0, 55, 0, 0)));
  EXPECT_EQ(disk_.mem->calls(test::Op::flush), 1u);
}

TEST_F(SessionTest, DiscAnswersRequestsSentBeforeIt) {
  start();
  Bytes batch;
  for (uint64_t c = 1; c <= 5; ++c) {
    const auto r = request(kCmdWrite, 0, c, c * 4096, 4096, pattern(4096, static_cast<uint8_t>(c)));
    batch.insert(batch.end(), r.begin(), r.end());
  }
  const auto disc = request(kCmdDisc, 0, 99, 0, 0);
  batch.insert(batch.end(), disc.begin(), disc.end());
  send(batch);
  std::set<uint64_t> cookies;
  for (int i = 0; i < 5; ++i) cookies.insert(next().cookie);
  EXPECT_EQ(cookies, (std::set<uint64_t>{1, 2, 3, 4, 5}));
  EXPECT_TRUE(closed_by_peer(fd()));
}

// ---------------------------------------------------------------- concurrency

TEST_F(SessionTest, PipelinedRequestsAreAllAnswered) {
  start();
  disk_.mem->fill_pattern(2u << 20, 1u << 20);
  Bytes batch;
  std::map<uint64_t, uint64_t> read_offsets;  // cookie -> offset
  for (uint64_t i = 0; i < 50; ++i) {
    const uint64_t cookie = 1000 + i;
    Bytes r;
    if (i % 2 == 0) {
      r = request(kCmdWrite, 0, cookie, i * 4096, 4096, pattern(4096, static_cast<uint8_t>(i)));
    } else {
      read_offsets[cookie] = (2u << 20) + i * 8192;
      r = request(kCmdRead, 0, cookie, read_offsets[cookie], 4096);
    }
    batch.insert(batch.end(), r.begin(), r.end());
  }
  send(batch);
  std::set<uint64_t> answered;
  for (int i = 0; i < 50; ++i) {
    const auto r = next();
    EXPECT_TRUE(answered.insert(r.cookie).second) << "cookie " << r.cookie << " answered twice";
    if (read_offsets.contains(r.cookie)) {
      const uint64_t off = read_offsets[r.cookie];
      EXPECT_EQ(data_of(r, r.cookie, off), disk_.mem->contents(off, 4096));
    } else {
      expect_ok(r, r.cookie);
    }
  }
  EXPECT_EQ(answered.size(), 50u);
  EXPECT_EQ(*answered.begin(), 1000u);
  EXPECT_EQ(*answered.rbegin(), 1049u);
  for (uint64_t i = 0; i < 50; i += 2)
    EXPECT_EQ(disk_.mem->contents(i * 4096, 4096), pattern(4096, static_cast<uint8_t>(i)));
}

// Writes of 32 KiB and more are read straight into their payload buffer with
// only the next header behind them (Session::reader): a stream that mixes
// them with small requests, back to back, must parse and land intact.
// Sent whole, and in pieces (7919 and 20 bytes) so that headers and payloads
// arrive split at every kind of boundary.
TEST_F(SessionTest, LargeWritesMixedWithSmallRequestsInOneBatch) {
  start();
  disk_.mem->fill_pattern(3u << 20, 4096);
  struct Op {
    uint16_t type;
    uint64_t offset;
    uint32_t length;
  };
  // Large after large, small after large, large after small, a read and a
  // flush between, the threshold itself and one block above it.
  const std::vector<Op> ops = {{kCmdWrite, 0, 256u << 10},           {kCmdWrite, 256u << 10, 32u << 10},
                               {kCmdWrite, 288u << 10, 512},         {kCmdRead, 3u << 20, 4096},
                               {kCmdWrite, 1u << 20, (1u << 20) + 512}, {kCmdFlush, 0, 0},
                               {kCmdWrite, 300u << 10, 33u << 10},   {kCmdWrite, 400u << 10, 4096},
                               {kCmdWrite, 2304u << 10, 64u << 10}};
  for (size_t piece : {size_t{0}, size_t{7919}, size_t{20}}) {
    SCOPED_TRACE("piece " + std::to_string(piece));
    Bytes stream;
    std::map<uint64_t, Bytes> written;  // offset -> data
    for (size_t i = 0; i < ops.size(); ++i) {
      const auto& op = ops[i];
      Bytes payload;
      if (op.type == kCmdWrite) {
        payload = pattern(op.length, static_cast<uint8_t>(i * 7 + piece));
        written[op.offset] = payload;
      }
      const auto r = request(op.type, 0, 100 + i, op.offset, op.length, payload);
      stream.insert(stream.end(), r.begin(), r.end());
    }
    if (piece == 0) {
      send(stream);
    } else {
      for (size_t at = 0; at < stream.size(); at += piece) {
        send(Bytes(stream.begin() + static_cast<std::ptrdiff_t>(at),
                   stream.begin() + static_cast<std::ptrdiff_t>(std::min(stream.size(), at + piece))));
        if (at % (piece * 64) == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    std::set<uint64_t> answered;
    for (size_t i = 0; i < ops.size(); ++i) {
      const auto r = next();
      ASSERT_GE(r.cookie, 100u);
      ASSERT_LT(r.cookie, 100u + ops.size());
      EXPECT_TRUE(answered.insert(r.cookie).second);
      if (ops[r.cookie - 100].type == kCmdRead)
        EXPECT_EQ(data_of(r, r.cookie, 3u << 20), disk_.mem->contents(3u << 20, 4096));
      else
        expect_ok(r, r.cookie);
    }
    for (const auto& [off, data] : written) EXPECT_EQ(disk_.mem->contents(off, data.size()), data) << off;
  }
  // The stream is still in step: a small request after all that.
  send(request(kCmdRead, 0, 999, 0, 4096));
  EXPECT_EQ(data_of(next(), 999, 0), disk_.mem->contents(0, 4096));
}

TEST_F(SessionTest, ClientGoneInTheMiddleOfALargeWritePayloadEndsTheSession) {
  start();
  const auto r = request(kCmdWrite, 0, 70, 0, 256u << 10, pattern(256u << 10, 3));
  send(Bytes(r.begin(), r.begin() + static_cast<std::ptrdiff_t>(kRequestHeaderSize + (100u << 10))));
  ::shutdown(fd(), SHUT_WR);
  EXPECT_TRUE(closed_by_peer(fd())) << "no reply; the connection ends";
  ASSERT_TRUE(server_->wait_done());
  EXPECT_EQ(disk_.mem->calls(test::Op::write), 0u);
}

TEST_F(SessionTest, RepliesMayOvertakeSlowRequests) {
  start();
  disk_.mem->fill_pattern(0, 4096);
  disk_.mem->close_gate(test::Op::read);
  send(request(kCmdRead, 0, 60, 0, 4096));
  ASSERT_TRUE(eventually([&] { return disk_.mem->in_flight(test::Op::read) == 1; }));
  send(request(kCmdFlush, 0, 61, 0, 0));
  expect_ok(next(), 61);  // the flush is answered while the read still waits
  disk_.mem->open_gate(test::Op::read);
  EXPECT_EQ(data_of(next(), 60, 0), disk_.mem->contents(0, 4096));
}

TEST_F(SessionTest, InflightBytesAreCappedWhenTheClientStopsReading) {
  SessionLimits limits;
  limits.max_inflight_bytes = 1u << 20;
  start(true, true, limits);
  disk_.mem->fill_pattern(0, kDiskSize);  // no hole chunks: every reply is 256 KiB
  constexpr uint32_t kLen = 256u << 10;
  constexpr int kCount = 64;
  Bytes batch;
  for (int i = 0; i < kCount; ++i) {
    const auto r = request(kCmdRead, 0, static_cast<uint64_t>(i), (static_cast<uint64_t>(i) * kLen) % kDiskSize, kLen);
    batch.insert(batch.end(), r.begin(), r.end());
  }
  send(batch);
  // Three 256 KiB reads fit under 1 MiB with their overhead; the socket buffer
  // holds less than one reply, so the device must stall near there.
  ASSERT_TRUE(eventually([&] { return disk_.mem->calls(test::Op::read) >= 3; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // give a runaway server time to show
  const auto stalled_at = disk_.mem->calls(test::Op::read);
  EXPECT_LE(stalled_at, 6u) << "the device saw reads far beyond the 1 MiB cap";

  std::set<uint64_t> answered;
  for (int i = 0; i < kCount; ++i) {
    const auto r = next();
    ASSERT_EQ(r.type, kReplyOffsetData);
    ASSERT_EQ(r.payload.size(), 8u + kLen);
    answered.insert(r.cookie);
  }
  EXPECT_EQ(answered.size(), static_cast<size_t>(kCount));
  EXPECT_EQ(disk_.mem->calls(test::Op::read), static_cast<uint64_t>(kCount));
}

TEST_F(SessionTest, RejectedOversizedRequestsDoNotShrinkTheInflightBudget) {
  SessionLimits limits;
  limits.max_request_bytes = 4096;
  limits.max_inflight_bytes = 1200;  // two 512-byte reads (576 bytes charged each) fit
  start(true, true, limits);
  const auto two_reads_run_together = [&](uint64_t cookie) {
    disk_.mem->close_gate(test::Op::read);
    send(request(kCmdRead, 0, cookie, 0, 512));
    send(request(kCmdRead, 0, cookie + 1, 512, 512));
    const bool together = eventually([&] { return disk_.mem->in_flight(test::Op::read) == 2; },
                                     std::chrono::milliseconds(500));
    disk_.mem->open_gate(test::Op::read);
    std::set<uint64_t> cookies{next().cookie, next().cookie};
    EXPECT_EQ(cookies, (std::set<uint64_t>{cookie, cookie + 1}));
    return together;
  };
  EXPECT_TRUE(two_reads_run_together(100));
  send(request(kCmdRead, 0, 200, 0, 8192));  // above max_request: refused
  expect_error_chunk(next(), 200, EINVAL);
  EXPECT_TRUE(two_reads_run_together(300)) << "one refused request should not serialize the connection";
}

// ---------------------------------------------------------------- block status

TEST_F(SessionTest, BlockStatusReplyFormat) {
  start();
  disk_.mem->set_extents({{4096, kExtentHole | kExtentZero}, {8192, 0}, {4096, kExtentZero}});
  const uint32_t ctx = server_->negotiated()->contexts.at(0).id;
  send(request(kCmdBlockStatus, 0, 70, 0, 16384));
  auto r = next();
  expect_done_chunk(r, 70u, kReplyBlockStatus);
  ASSERT_EQ(r.payload.size(), 4u + 3 * 8);
  EXPECT_EQ(get32(r.payload.data()), ctx);
  const std::vector<std::pair<uint32_t, uint32_t>> expected{
      {4096, kStateHole | kStateZero}, {8192, 0}, {4096, kStateZero}};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(get32(r.payload.data() + 4 + 8 * i), expected[i].first) << i;
    EXPECT_EQ(get32(r.payload.data() + 8 + 8 * i), expected[i].second) << i;
  }
}

TEST_F(SessionTest, BlockStatusWithReqOneSendsOneExtent) {
  start();
  disk_.mem->set_extents({{4096, kExtentHole | kExtentZero}, {8192, 0}, {4096, kExtentZero}});
  send(request(kCmdBlockStatus, kCmdFlagReqOne, 71, 0, 16384));
  auto r = next();
  EXPECT_EQ(r.type, kReplyBlockStatus);
  EXPECT_EQ(r.flags, kReplyFlagDone);
  ASSERT_EQ(r.payload.size(), 4u + 8);
  EXPECT_EQ(get32(r.payload.data() + 4), 4096u);
  EXPECT_EQ(get32(r.payload.data() + 8), kStateHole | kStateZero);
}

TEST_F(SessionTest, BlockStatusWithoutMetaContextIsEinval) {
  start(true, /*meta=*/false);
  send(request(kCmdBlockStatus, 0, 72, 0, 4096));
  expect_error_chunk(next(), 72, EINVAL);
  EXPECT_EQ(disk_.mem->calls(test::Op::block_status), 0u);
}

TEST_F(SessionTest, BlockStatusOutOfRangeIsEinval) {
  start();
  send(request(kCmdBlockStatus, 0, 73, kDiskSize, 4096));
  expect_error_chunk(next(), 73, EINVAL);
}

// ---------------------------------------------------------------- stop_when_quiet (SIGTERM with a kernel device)

// The session ended on its own (the receiving side shut once quiet): the
// connection closes, and the peer's next send fails with EPIPE.
void expect_quiet_end(ServerHarness& server, uint64_t cookie) {
  EXPECT_TRUE(closed_by_peer(server.client()));
  ASSERT_TRUE(server.wait_done());
  const auto req = request(kCmdFlush, 0, cookie, 0, 0);
  errno = 0;
  EXPECT_LT(::send(server.client(), req.data(), req.size(), MSG_NOSIGNAL), 0);
  EXPECT_EQ(errno, EPIPE);
}

TEST_F(SessionTest, StopWhenQuietAnswersRequestsInFlightThenEnds) {
  start();
  disk_.mem->fill_pattern(0, 3 * 4096);
  disk_.mem->close_gate(test::Op::read);
  for (uint64_t c = 1; c <= 3; ++c) send(request(kCmdRead, 0, c, (c - 1) * 4096, 4096));
  ASSERT_TRUE(eventually([&] { return disk_.mem->in_flight(test::Op::read) == 3; }));
  ASSERT_TRUE(server_->on_session([](Session& s) { s.stop_when_quiet(std::chrono::seconds(5)); }));
  // Not quiet yet: the session still receives, and answers, a new request.
  send(request(kCmdFlush, 0, 4, 0, 0));
  expect_ok(next(), 4);
  disk_.mem->open_gate(test::Op::read);
  std::set<uint64_t> answered;
  for (int i = 0; i < 3; ++i) {
    const auto r = next();
    EXPECT_EQ(data_of(r, r.cookie, (r.cookie - 1) * 4096), disk_.mem->contents((r.cookie - 1) * 4096, 4096));
    answered.insert(r.cookie);
  }
  EXPECT_EQ(answered, (std::set<uint64_t>{1, 2, 3}));
  ASSERT_NO_FATAL_FAILURE(expect_quiet_end(*server_, 5));  // quiet now
  EXPECT_EQ(disk_.mem->calls(test::Op::flush), 1u) << "flush 5 never reached the device";
}

TEST_F(SessionTest, StopWhenQuietReadsARequestAlreadyQueuedInTheSocket) {
  start();
  send(request(kCmdFlush, 0, 1, 0, 0));
  expect_ok(next(), 1);  // the reader now waits for a header, nothing in flight
  const auto data = pattern(4096, 12);
  // On the server's thread, so the reader cannot take the write before
  // stop_when_quiet looks at the socket: the request is queued, unread.
  ASSERT_TRUE(server_->on_session([&](Session& s) {
    ASSERT_TRUE(send_all(fd(), request(kCmdWrite, 0, 2, 8192, 4096, data)));
    s.stop_when_quiet(std::chrono::seconds(5));
  }));
  expect_ok(next(), 2);
  EXPECT_EQ(disk_.mem->contents(8192, 4096), data);
  ASSERT_NO_FATAL_FAILURE(expect_quiet_end(*server_, 3));
  EXPECT_EQ(disk_.mem->calls(test::Op::flush), 2u) << "flush 1 and the flush after disconnect, no more";
}

TEST_F(SessionTest, StopWhenQuietFallsBackToStopAfterTheLimit) {
  start();
  disk_.mem->close_gate(test::Op::read);
  send(request(kCmdRead, 0, 1, 0, 4096));  // kept busy: never quiet
  ASSERT_TRUE(eventually([&] { return disk_.mem->in_flight(test::Op::read) == 1; }));
  const auto called = std::chrono::steady_clock::now();
  ASSERT_TRUE(server_->on_session([](Session& s) { s.stop_when_quiet(std::chrono::milliseconds(300)); }));
  send(request(kCmdFlush, 0, 2, 0, 0));  // before the limit: still received and answered
  expect_ok(next(), 2);
  EXPECT_LT(std::chrono::steady_clock::now() - called, std::chrono::milliseconds(300));
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  // After the limit stop() ran: the receiving side no longer reads; this flush is never answered.
  send(request(kCmdFlush, 0, 3, 0, 0));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(disk_.mem->calls(test::Op::flush), 1u);
  disk_.mem->open_gate(test::Op::read);
  EXPECT_EQ(next().cookie, 1u);  // the request in flight is still answered
  EXPECT_TRUE(closed_by_peer(fd()));
  ASSERT_TRUE(server_->wait_done());
}

}  // namespace
}  // namespace blockway::test
