// The fixed-newstyle handshake, driven byte by byte over a socketpair.
#include "nbd/handshake.hpp"
#include "tests/unit/nbd/nbd_harness.hpp"

#include <gtest/gtest.h>

#include <atomic>

namespace blockway::test {
namespace {

using namespace blockway::nbd;
using core::Capabilities;
using core::Support;

constexpr uint64_t kDiskSize = 1u << 20;
constexpr uint64_t kRoSize = 64u << 10;
constexpr uint32_t kMaxRequest = 1u << 20;

class HandshakeTest : public ::testing::Test {
 protected:
  HandshakeTest() {
    disk_ = make_export("disk", {.size = kDiskSize, .min_block = 512, .preferred_block = 8192}, native_caps(), false,
                        "the disk");
    ro_ = make_export("ro", {.size = kRoSize}, Capabilities{}, true);
    table_.add(disk_.exp);
    table_.add(ro_.exp);
    table_.set_default("disk");
  }

  ServerHarness& start() {
    hopts_.max_request_bytes = kMaxRequest;
    hopts_.shutting_down = &shutting_down_;
    server_.emplace(table_, hopts_);
    return *server_;
  }
  int fd() { return server_->client(); }
  // Starts the server, and a client (fixed newstyle, NO_ZEROES) in the
  // option phase; with `structured`, it has negotiated structured replies.
  void start_client(bool structured = false) {
    start();
    ASSERT_TRUE(client_start(fd()));
    if (structured) {
      ASSERT_EQ(exchange(fd(), kOptStructuredReply).at(0).type, kRepAck);
    }
  }
  // Starts the server, and a client (with client_flags) that sends `bytes`.
  void start_and_send(const Bytes& bytes, uint32_t client_flags = kClientFixedNewstyle | kClientNoZeroes) {
    start();
    ASSERT_TRUE(client_start(fd(), client_flags));
    ASSERT_TRUE(send_all(fd(), bytes));
  }
  // The option EXPORT_NAME naming `name`.
  static Bytes export_name(const std::string& name) {
    Bytes payload;
    append_str(payload, name);
    return option(kOptExportName, payload);
  }

  // The handshake ended without an export and the server closed the connection.
  void expect_closed_without_export() {
    EXPECT_TRUE(closed_by_peer(fd()));
    ASSERT_TRUE(server_->wait_done());
    EXPECT_FALSE(server_->negotiated().has_value());
    EXPECT_EQ(server_->server_error(), "");
  }
  // The handshake is still going: ABORT gets its ACK.
  void expect_still_negotiating() {
    auto r = exchange(fd(), kOptAbort);
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].type, kRepAck);
    expect_closed_without_export();
  }
  static void expect_error(const std::vector<OptionReply>& r, uint32_t option, uint32_t type) {
    ASSERT_EQ(r.size(), 1u) << "expected exactly one reply";
    EXPECT_EQ(r[0].magic, kOptReplyMagic);
    EXPECT_EQ(r[0].option, option);
    EXPECT_EQ(r[0].type, type);
    EXPECT_FALSE(r[0].data.empty()) << "errors carry a message";
  }

  core::ExportTable table_;
  TestExport disk_, ro_;
  HandshakeOptions hopts_;
  std::atomic<bool> shutting_down_{false};
  std::optional<ServerHarness> server_;
};

// ---------------------------------------------------------------- greeting and client flags

TEST_F(HandshakeTest, GreetingIsNbdmagicIhaveoptAndFlags) {
  start();
  auto g = recv_exact(fd(), 18);
  ASSERT_TRUE(g);
  EXPECT_EQ(get64(g->data()), 0x4e42444d41474943ull);
  EXPECT_EQ(get64(g->data() + 8), 0x49484156454F5054ull);
  EXPECT_EQ(get16(g->data() + 16), kFlagFixedNewstyle | kFlagNoZeroes);
}

TEST_F(HandshakeTest, UnknownClientFlagsCloseTheConnection) {
  start();
  ASSERT_TRUE(client_start(fd(), kClientFixedNewstyle | (1u << 5)));
  expect_closed_without_export();
}

TEST_F(HandshakeTest, BadOptionMagicClosesTheConnection) {
  Bytes bad = option(kOptList);
  bad[0] = std::byte{'X'};
  ASSERT_NO_FATAL_FAILURE(start_and_send(bad));
  expect_closed_without_export();
}

TEST_F(HandshakeTest, ClientGoneMidHandshakeEndsIt) {
  Bytes partial = option(kOptGo, info_payload("disk"));
  partial.resize(partial.size() - 3);
  ASSERT_NO_FATAL_FAILURE(start_and_send(partial));
  ::shutdown(fd(), SHUT_WR);
  expect_closed_without_export();
}

// ---------------------------------------------------------------- LIST

TEST_F(HandshakeTest, ListNamesEveryExportWithDescription) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  auto r = exchange(fd(), kOptList);
  ASSERT_EQ(r.size(), 3u);
  std::map<std::string, std::string> seen;
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(r[i].magic, kOptReplyMagic);
    EXPECT_EQ(r[i].option, kOptList);
    ASSERT_EQ(r[i].type, kRepServer);
    ASSERT_GE(r[i].data.size(), 4u);
    const uint32_t len = get32(r[i].data.data());
    ASSERT_LE(4 + len, r[i].data.size());
    seen[to_string(Bytes(r[i].data.begin() + 4, r[i].data.begin() + 4 + len))] = to_string(r[i].data, 4 + len);
  }
  const std::map<std::string, std::string> expected{{"disk", "the disk"}, {"ro", ""}};
  EXPECT_EQ(seen, expected);
  EXPECT_EQ(r[2].type, kRepAck);
  EXPECT_TRUE(r[2].data.empty());
  expect_still_negotiating();
}

TEST_F(HandshakeTest, ListWithDataIsInvalid) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptList, Bytes(3)), kOptList, kRepErrInvalid);
  expect_still_negotiating();
}

// ---------------------------------------------------------------- INFO and GO

struct InfoReplies {
  std::optional<uint64_t> size;
  std::optional<uint16_t> flags;
  std::optional<std::string> name;
  std::optional<std::string> description;
  std::optional<std::array<uint32_t, 3>> block_size;
  bool acked = false;
  size_t count = 0;
};

InfoReplies parse_info(const std::vector<OptionReply>& replies, uint32_t option) {
  InfoReplies out;
  for (const auto& r : replies) {
    EXPECT_EQ(r.option, option);
    if (r.type == kRepAck) {
      out.acked = true;
      continue;
    }
    EXPECT_EQ(r.type, kRepInfo);
    if (r.type != kRepInfo || r.data.size() < 2) continue;
    ++out.count;
    const uint16_t type = get16(r.data.data());
    switch (type) {
      case kInfoExport:
        EXPECT_EQ(r.data.size(), 12u);
        out.size = get64(r.data.data() + 2);
        out.flags = get16(r.data.data() + 10);
        break;
      case kInfoName: out.name = to_string(r.data, 2); break;
      case kInfoDescription: out.description = to_string(r.data, 2); break;
      case kInfoBlockSize:
        EXPECT_EQ(r.data.size(), 14u);
        out.block_size = {get32(r.data.data() + 2), get32(r.data.data() + 6), get32(r.data.data() + 10)};
        break;
      default: ADD_FAILURE() << "unexpected info type " << type;
    }
  }
  return out;
}

TEST_F(HandshakeTest, InfoWithNameDescriptionAndBlockSize) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  auto r = exchange(fd(), kOptInfo, info_payload("disk", {kInfoName, kInfoDescription, kInfoBlockSize}));
  const auto info = parse_info(r, kOptInfo);
  EXPECT_TRUE(info.acked);
  EXPECT_EQ(info.count, 4u);
  EXPECT_EQ(info.size, kDiskSize);
  EXPECT_EQ(info.flags, transmission_flags(disk_.exp->device->capabilities(), false));
  EXPECT_EQ(info.name, "disk");
  EXPECT_EQ(info.description, "the disk");
  ASSERT_TRUE(info.block_size);
  EXPECT_EQ((*info.block_size)[0], 512u);
  EXPECT_EQ((*info.block_size)[1], 8192u);
  EXPECT_EQ((*info.block_size)[2], kMaxRequest);
  // INFO does not end the handshake.
  expect_still_negotiating();
}

TEST_F(HandshakeTest, InfoWithoutRequestsSendsExportAndBlockSizeOnly) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  const auto info = parse_info(exchange(fd(), kOptInfo, info_payload("disk")), kOptInfo);
  EXPECT_TRUE(info.acked);
  EXPECT_TRUE(info.size);
  EXPECT_TRUE(info.block_size);
  EXPECT_FALSE(info.name);
  EXPECT_FALSE(info.description);
}

TEST_F(HandshakeTest, InfoSkipsAnEmptyDescription) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  const auto info = parse_info(exchange(fd(), kOptInfo, info_payload("ro", {kInfoDescription})), kOptInfo);
  EXPECT_TRUE(info.acked);
  EXPECT_FALSE(info.description);
  EXPECT_EQ(info.size, kRoSize);
  ASSERT_TRUE(info.flags);
  EXPECT_TRUE(*info.flags & kFlagReadOnly);
}

TEST_F(HandshakeTest, InfoOnTheDefaultExportNamesIt) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  const auto info = parse_info(exchange(fd(), kOptInfo, info_payload("", {kInfoName})), kOptInfo);
  EXPECT_TRUE(info.acked);
  EXPECT_EQ(info.name, "disk");
  EXPECT_EQ(info.size, kDiskSize);
}

TEST_F(HandshakeTest, InfoAndGoOnUnknownExportAreErrUnknown) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptInfo, info_payload("nope")), kOptInfo, kRepErrUnknown);
  expect_error(exchange(fd(), kOptGo, info_payload("nope", {kInfoName})), kOptGo, kRepErrUnknown);
  expect_still_negotiating();
}

TEST_F(HandshakeTest, MalformedInfoLengthsAreInvalid) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  // Shorter than the fixed part.
  expect_error(exchange(fd(), kOptInfo, Bytes(5)), kOptInfo, kRepErrInvalid);
  // Name length beyond the payload.
  Bytes p = info_payload("disk");
  put32(p.data(), 100);
  expect_error(exchange(fd(), kOptGo, p), kOptGo, kRepErrInvalid);
  // Name length above 4096.
  p = info_payload(std::string(5000, 'x'));
  expect_error(exchange(fd(), kOptInfo, p), kOptInfo, kRepErrInvalid);
  // Request count says 2, only one request follows.
  p = info_payload("disk", {kInfoName});
  put16(p.data() + 8, 2);
  expect_error(exchange(fd(), kOptInfo, p), kOptInfo, kRepErrInvalid);
  // Trailing byte after the requests.
  p = info_payload("disk", {kInfoName});
  p.push_back(std::byte{0});
  expect_error(exchange(fd(), kOptGo, p), kOptGo, kRepErrInvalid);
  expect_still_negotiating();
}

TEST_F(HandshakeTest, GoSelectsTheExportAndEndsTheHandshake) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  auto r = exchange(fd(), kOptGo, info_payload("disk", {kInfoBlockSize}));
  const auto info = parse_info(r, kOptGo);
  EXPECT_TRUE(info.acked);
  EXPECT_EQ(info.size, kDiskSize);
  ASSERT_TRUE(server_->wait_negotiated());
  const auto n = server_->negotiated();
  ASSERT_TRUE(n);
  EXPECT_EQ(n->exp, disk_.exp);
  EXPECT_FALSE(n->structured_replies);
  EXPECT_TRUE(n->no_zeroes);
  EXPECT_TRUE(n->contexts.empty());
  EXPECT_EQ(n->transmission_flags, info.flags);
  EXPECT_EQ(n->transmission_flags, transmission_flags(disk_.exp->device->capabilities(), false));
}

// ---------------------------------------------------------------- structured replies and meta contexts

TEST_F(HandshakeTest, StructuredReplyIsAckedAndAdvertisesDf) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  auto r = exchange(fd(), kOptStructuredReply);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepAck);
  const auto info = parse_info(exchange(fd(), kOptGo, info_payload("disk")), kOptGo);
  ASSERT_TRUE(info.flags);
  EXPECT_TRUE(*info.flags & kFlagSendDf);
  ASSERT_TRUE(server_->wait_negotiated());
  ASSERT_TRUE(server_->negotiated());
  EXPECT_TRUE(server_->negotiated()->structured_replies);
}

TEST_F(HandshakeTest, StructuredReplyWithDataIsInvalid) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptStructuredReply, Bytes(1)), kOptStructuredReply, kRepErrInvalid);
  // Not enabled by the failed attempt: DF is not advertised.
  const auto info = parse_info(exchange(fd(), kOptInfo, info_payload("disk")), kOptInfo);
  ASSERT_TRUE(info.flags);
  EXPECT_FALSE(*info.flags & kFlagSendDf);
}

TEST_F(HandshakeTest, MetaContextBeforeStructuredRepliesIsInvalid) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptListMetaContext, meta_payload("disk", {})), kOptListMetaContext,
               kRepErrInvalid);
  expect_error(exchange(fd(), kOptSetMetaContext, meta_payload("disk", {"base:allocation"})), kOptSetMetaContext,
               kRepErrInvalid);
  expect_still_negotiating();
}

// Names (and ids) of the META_CONTEXT replies before the final ACK.
std::vector<std::pair<uint32_t, std::string>> contexts_of(const std::vector<OptionReply>& r) {
  std::vector<std::pair<uint32_t, std::string>> out;
  EXPECT_FALSE(r.empty());
  if (r.empty()) return out;
  EXPECT_EQ(r.back().type, kRepAck);
  for (size_t i = 0; i + 1 < r.size(); ++i) {
    EXPECT_EQ(r[i].type, kRepMetaContext);
    if (r[i].data.size() >= 4) out.emplace_back(get32(r[i].data.data()), to_string(r[i].data, 4));
  }
  return out;
}

TEST_F(HandshakeTest, ListMetaContexts) {
  ASSERT_NO_FATAL_FAILURE(start_client(/*structured=*/true));
  using List = std::vector<std::pair<uint32_t, std::string>>;
  const List base{{0, "base:allocation"}};
  EXPECT_EQ(contexts_of(exchange(fd(), kOptListMetaContext, meta_payload("disk", {}))), base);
  EXPECT_EQ(contexts_of(exchange(fd(), kOptListMetaContext, meta_payload("disk", {"base:"}))), base);
  EXPECT_EQ(contexts_of(exchange(fd(), kOptListMetaContext, meta_payload("disk", {"base:allocation"}))), base);
  EXPECT_EQ(contexts_of(exchange(fd(), kOptListMetaContext, meta_payload("disk", {"qemu:dirty-bitmap:x"}))),
            List{});
  EXPECT_EQ(contexts_of(exchange(fd(), kOptListMetaContext, meta_payload("disk", {"base:allocation", "base:"}))),
            base);
  expect_error(exchange(fd(), kOptListMetaContext, meta_payload("disk", {"nonamespace"})), kOptListMetaContext,
               kRepErrInvalid);
  expect_error(exchange(fd(), kOptListMetaContext, meta_payload("nope", {})), kOptListMetaContext,
               kRepErrUnknown);
  expect_still_negotiating();
}

TEST_F(HandshakeTest, SetMetaContextSelectsAnIdThatGoCarries) {
  ASSERT_NO_FATAL_FAILURE(start_client(/*structured=*/true));
  const auto set = contexts_of(exchange(fd(), kOptSetMetaContext, meta_payload("disk", {"base:allocation"})));
  ASSERT_EQ(set.size(), 1u);
  EXPECT_NE(set[0].first, 0u);
  EXPECT_EQ(set[0].second, "base:allocation");
  EXPECT_TRUE(parse_info(exchange(fd(), kOptGo, info_payload("disk")), kOptGo).acked);
  ASSERT_TRUE(server_->wait_negotiated());
  const auto n = server_->negotiated();
  ASSERT_TRUE(n);
  ASSERT_EQ(n->contexts.size(), 1u);
  EXPECT_EQ(n->contexts[0].id, set[0].first);
  EXPECT_EQ(n->contexts[0].name, "base:allocation");
  EXPECT_EQ(n->contexts[0].kind, MetaContextKind::base_allocation);
}

TEST_F(HandshakeTest, SetMetaContextWithUnknownNamespaceSelectsNothing) {
  ASSERT_NO_FATAL_FAILURE(start_client(/*structured=*/true));
  ASSERT_EQ(contexts_of(exchange(fd(), kOptSetMetaContext, meta_payload("disk", {"base:allocation"}))).size(), 1u);
  // A second SET replaces the selection.
  EXPECT_TRUE(contexts_of(exchange(fd(), kOptSetMetaContext, meta_payload("disk", {"qemu:dirty-bitmap:b"}))).empty());
  EXPECT_TRUE(parse_info(exchange(fd(), kOptGo, info_payload("disk")), kOptGo).acked);
  ASSERT_TRUE(server_->wait_negotiated());
  ASSERT_TRUE(server_->negotiated());
  EXPECT_TRUE(server_->negotiated()->contexts.empty());
}

TEST_F(HandshakeTest, ContextsSelectedForAnotherExportAreDropped) {
  ASSERT_NO_FATAL_FAILURE(start_client(/*structured=*/true));
  ASSERT_EQ(contexts_of(exchange(fd(), kOptSetMetaContext, meta_payload("disk", {"base:allocation"}))).size(), 1u);
  EXPECT_TRUE(parse_info(exchange(fd(), kOptGo, info_payload("ro")), kOptGo).acked);
  ASSERT_TRUE(server_->wait_negotiated());
  const auto n = server_->negotiated();
  ASSERT_TRUE(n);
  EXPECT_EQ(n->exp, ro_.exp);
  EXPECT_TRUE(n->contexts.empty());
}

TEST_F(HandshakeTest, ContextsSetOnTheDefaultNameApplyToTheDefaultExport) {
  ASSERT_NO_FATAL_FAILURE(start_client(/*structured=*/true));
  ASSERT_EQ(contexts_of(exchange(fd(), kOptSetMetaContext, meta_payload("", {"base:allocation"}))).size(), 1u);
  EXPECT_TRUE(parse_info(exchange(fd(), kOptGo, info_payload("disk")), kOptGo).acked);
  ASSERT_TRUE(server_->wait_negotiated());
  ASSERT_TRUE(server_->negotiated());
  EXPECT_EQ(server_->negotiated()->contexts.size(), 1u);
}

TEST_F(HandshakeTest, MalformedMetaContextPayloadsAreInvalid) {
  ASSERT_NO_FATAL_FAILURE(start_client(/*structured=*/true));
  expect_error(exchange(fd(), kOptSetMetaContext, Bytes(7)), kOptSetMetaContext, kRepErrInvalid);
  Bytes p = meta_payload("disk", {"base:allocation"});
  put32(p.data(), 1000);  // name longer than the payload
  expect_error(exchange(fd(), kOptSetMetaContext, p), kOptSetMetaContext, kRepErrInvalid);
  p = meta_payload("disk", {"base:allocation"});
  put32(p.data() + 8, 2);  // two queries announced, one sent
  expect_error(exchange(fd(), kOptSetMetaContext, p), kOptSetMetaContext, kRepErrInvalid);
  p = meta_payload("disk", {"base:allocation"});
  put32(p.data() + 12, 200);  // query longer than the payload
  expect_error(exchange(fd(), kOptListMetaContext, p), kOptListMetaContext, kRepErrInvalid);
  p = meta_payload("disk", {"base:allocation"});
  p.push_back(std::byte{'!'});  // trailing byte
  expect_error(exchange(fd(), kOptSetMetaContext, p), kOptSetMetaContext, kRepErrInvalid);
  expect_error(exchange(fd(), kOptSetMetaContext, meta_payload("nope", {"base:allocation"})), kOptSetMetaContext,
               kRepErrUnknown);
  expect_still_negotiating();
}

// ---------------------------------------------------------------- unsupported and oversized options

// ---------------------------------------------------------------- TLS policy (the TLS itself: test_tls.py)

TEST_F(HandshakeTest, TlsRequiredAnswersOptionsWithTlsReqd) {
  hopts_.tls_mode = TlsMode::require;
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptList), kOptList, kRepErrTlsReqd);
  expect_error(exchange(fd(), kOptGo, info_payload("disk")), kOptGo, kRepErrTlsReqd);
  expect_error(exchange(fd(), kOptInfo, info_payload("disk")), kOptInfo, kRepErrTlsReqd);
  expect_error(exchange(fd(), kOptStructuredReply), kOptStructuredReply, kRepErrTlsReqd);
  expect_still_negotiating();  // ABORT is still acked
}

TEST_F(HandshakeTest, TlsRequiredExportNameClosesTheConnection) {
  hopts_.tls_mode = TlsMode::require;
  ASSERT_NO_FATAL_FAILURE(start_and_send(export_name("disk")));
  expect_closed_without_export();
}

TEST_F(HandshakeTest, ExportWithTlsRequireIsHiddenAndRefusedInPlaintext) {
  hopts_.tls_mode = TlsMode::on;
  ro_.exp->tls_required = true;
  ASSERT_NO_FATAL_FAILURE(start_client());
  auto r = exchange(fd(), kOptList);
  ASSERT_EQ(r.size(), 2u);  // disk, then ACK: "ro" is not listed
  EXPECT_EQ(r[0].type, kRepServer);
  EXPECT_EQ(r[1].type, kRepAck);
  expect_error(exchange(fd(), kOptGo, info_payload("ro")), kOptGo, kRepErrTlsReqd);
  expect_error(exchange(fd(), kOptSetMetaContext, meta_payload("ro", {"base:allocation"})), kOptSetMetaContext,
               kRepErrInvalid);  // structured replies first
  auto go = exchange(fd(), kOptGo, info_payload("disk"));
  EXPECT_EQ(go.back().type, kRepAck);
  ASSERT_TRUE(server_->wait_negotiated());
  ASSERT_TRUE(server_->negotiated().has_value());
  EXPECT_FALSE(server_->negotiated()->tls);
}

TEST_F(HandshakeTest, StartTlsWithoutCredentialsIsUnsupported) {
  hopts_.tls_mode = TlsMode::on;  // no TlsContext: STARTTLS cannot be offered
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptStartTls), kOptStartTls, kRepErrUnsup);
  expect_still_negotiating();
}

TEST_F(HandshakeTest, StartTlsIsUnsupported) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptStartTls), kOptStartTls, kRepErrUnsup);
  expect_still_negotiating();
}

TEST_F(HandshakeTest, UnknownOptionIsUnsupportedAndTheHandshakeContinues) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), 99, Bytes(10, std::byte{1})), 99, kRepErrUnsup);
  EXPECT_TRUE(parse_info(exchange(fd(), kOptGo, info_payload("disk")), kOptGo).acked);
  ASSERT_TRUE(server_->wait_negotiated());
  EXPECT_TRUE(server_->negotiated());
}

TEST_F(HandshakeTest, OptionPayloadAbove64KiBIsTooBigAndDrained) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), 99, Bytes((64u << 10) + 1, std::byte{7})), 99, kRepErrTooBig);
  // Even a well-formed GO is refused when oversized, and the stream stays in sync.
  Bytes big = info_payload("disk");
  big.resize(100000);
  expect_error(exchange(fd(), kOptGo, big), kOptGo, kRepErrTooBig);
  EXPECT_TRUE(parse_info(exchange(fd(), kOptGo, info_payload("disk")), kOptGo).acked);
  ASSERT_TRUE(server_->wait_negotiated());
  EXPECT_TRUE(server_->negotiated());
}

TEST_F(HandshakeTest, TooManyOptionsCloseTheConnection) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  for (int i = 0; i < 4096; ++i) {
    auto r = exchange(fd(), 99);
    ASSERT_EQ(r.size(), 1u) << "option " << i;
  }
  // The 4096th option was the last one the server reads.
  expect_closed_without_export();
}

// ---------------------------------------------------------------- EXPORT_NAME, ABORT, old clients

TEST_F(HandshakeTest, ExportNameKnownSendsSizeFlagsAndZeroes) {
  ASSERT_NO_FATAL_FAILURE(start_and_send(export_name("disk"), kClientFixedNewstyle));
  auto r = recv_exact(fd(), 134);
  ASSERT_TRUE(r);
  EXPECT_EQ(get64(r->data()), kDiskSize);
  EXPECT_EQ(get16(r->data() + 8), transmission_flags(disk_.exp->device->capabilities(), false));
  EXPECT_TRUE(std::all_of(r->begin() + 10, r->end(), [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_TRUE(closed_by_peer(fd())) << "nothing after the 124 zero bytes";
  ASSERT_TRUE(server_->wait_negotiated());
  const auto n = server_->negotiated();
  ASSERT_TRUE(n);
  EXPECT_EQ(n->exp, disk_.exp);
  EXPECT_FALSE(n->no_zeroes);
}

TEST_F(HandshakeTest, ExportNameWithNoZeroesSendsTenBytes) {
  ASSERT_NO_FATAL_FAILURE(start_and_send(export_name("ro")));
  auto r = recv_exact(fd(), 10);
  ASSERT_TRUE(r);
  EXPECT_EQ(get64(r->data()), kRoSize);
  EXPECT_TRUE(get16(r->data() + 8) & kFlagReadOnly);
  EXPECT_TRUE(closed_by_peer(fd())) << "no zero padding with NO_ZEROES";
  ASSERT_TRUE(server_->wait_negotiated());
  ASSERT_TRUE(server_->negotiated());
  EXPECT_TRUE(server_->negotiated()->no_zeroes);
}

TEST_F(HandshakeTest, ExportNameEmptySelectsTheDefault) {
  ASSERT_NO_FATAL_FAILURE(start_and_send(option(kOptExportName)));
  auto r = recv_exact(fd(), 10);
  ASSERT_TRUE(r);
  EXPECT_EQ(get64(r->data()), kDiskSize);
}

TEST_F(HandshakeTest, ExportNameUnknownClosesTheConnection) {
  ASSERT_NO_FATAL_FAILURE(start_and_send(export_name("nope")));
  expect_closed_without_export();
}

TEST_F(HandshakeTest, ExportNameLongerThan4096ClosesTheConnection) {
  ASSERT_NO_FATAL_FAILURE(start_and_send(option(kOptExportName, Bytes(5000, std::byte{'a'}))));
  expect_closed_without_export();
}

TEST_F(HandshakeTest, AbortIsAckedAndEndsWithoutExport) {
  ASSERT_NO_FATAL_FAILURE(start_client());
  auto r = exchange(fd(), kOptAbort);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].option, kOptAbort);
  EXPECT_EQ(r[0].type, kRepAck);
  expect_closed_without_export();
}

TEST_F(HandshakeTest, PlainNewstyleClientSendingListIsDisconnected) {
  ASSERT_NO_FATAL_FAILURE(start_and_send(option(kOptList), 0));
  expect_closed_without_export();
}

TEST_F(HandshakeTest, PlainNewstyleClientCanUseExportName) {
  ASSERT_NO_FATAL_FAILURE(start_and_send(export_name("disk"), 0));
  auto r = recv_exact(fd(), 134);
  ASSERT_TRUE(r);
  EXPECT_EQ(get64(r->data()), kDiskSize);
}

// ---------------------------------------------------------------- shutdown

TEST_F(HandshakeTest, ShuttingDownAnswersOptionsWithErrShutdown) {
  shutting_down_ = true;
  ASSERT_NO_FATAL_FAILURE(start_client());
  expect_error(exchange(fd(), kOptList), kOptList, kRepErrShutdown);
  expect_error(exchange(fd(), kOptGo, info_payload("disk")), kOptGo, kRepErrShutdown);
  expect_error(exchange(fd(), kOptInfo, info_payload("disk")), kOptInfo, kRepErrShutdown);
  expect_still_negotiating();
}

TEST_F(HandshakeTest, ShuttingDownRefusesExportName) {
  shutting_down_ = true;
  ASSERT_NO_FATAL_FAILURE(start_and_send(export_name("disk")));
  expect_closed_without_export();
}

// ---------------------------------------------------------------- transmission_flags

TEST(TransmissionFlags, ReadOnlyExport) {
  Capabilities c;
  c.read_only = true;
  c.trim = Support::native;  // never advertised on a read-only export
  c.zero = Support::emulate;
  EXPECT_EQ(transmission_flags(c, false), kFlagHasFlags | kFlagReadOnly | kFlagSendCache);
  EXPECT_EQ(transmission_flags(c, true), kFlagHasFlags | kFlagReadOnly | kFlagSendCache | kFlagSendDf);
}

TEST(TransmissionFlags, WritableExportWithEverything) {
  Capabilities c;
  c.flush = Support::native;
  c.fua = Support::emulate;
  c.trim = Support::native;
  c.zero = Support::emulate;
  c.multi_conn = true;
  const uint16_t expected = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim | kFlagSendWriteZeroes |
                            kFlagSendFastZero | kFlagCanMultiConn | kFlagSendCache;
  EXPECT_EQ(transmission_flags(c, false), expected);
  EXPECT_EQ(transmission_flags(c, true), expected | kFlagSendDf);
}

TEST(TransmissionFlags, WritableExportWithoutFlushOrTrim) {
  Capabilities c;
  EXPECT_EQ(transmission_flags(c, false), kFlagHasFlags | kFlagSendCache);
  c.zero = Support::native;
  EXPECT_EQ(transmission_flags(c, false), kFlagHasFlags | kFlagSendCache | kFlagSendWriteZeroes | kFlagSendFastZero);
}

}  // namespace
}  // namespace blockway::test
