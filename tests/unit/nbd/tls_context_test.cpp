// TlsContext: the start-up checks of --tls, --tls-certificates and --tls-psk.
// The TLS sessions themselves run against real clients in test_tls.py.
#include "nbd/tls_context.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>

namespace blockway::test {
namespace {

using nbd::TlsContext;
using nbd::TlsMode;
using nbd::TlsSettings;

class TlsContextTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("bw-tls-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    const auto p = (dir_ / name).string();
    std::ofstream(p) << text;
    return p;
  }
  static std::string error_of(const TlsSettings& s) {
    try {
      TlsContext ctx(s);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  }
  std::filesystem::path dir_;
};

TEST(TlsMode, ParsesTheThreeModes) {
  EXPECT_EQ(nbd::parse_tls_mode("off"), TlsMode::off);
  EXPECT_EQ(nbd::parse_tls_mode("on"), TlsMode::on);
  EXPECT_EQ(nbd::parse_tls_mode("require"), TlsMode::require);
  EXPECT_THROW(nbd::parse_tls_mode("yes"), std::invalid_argument);
  EXPECT_THROW(nbd::parse_tls_mode(""), std::invalid_argument);
  EXPECT_STREQ(nbd::to_string(TlsMode::require), "require");
}

TEST_F(TlsContextTest, NoCredentialsIsAnError) {
  EXPECT_NE(error_of(TlsSettings{.mode = TlsMode::on}).find("--tls-certificates"), std::string::npos);
}

TEST_F(TlsContextTest, MissingCertificateFilesAreNamed) {
  const auto msg = error_of(TlsSettings{.mode = TlsMode::on, .certificates_dir = dir_.string()});
  EXPECT_NE(msg.find("server-cert.pem is missing"), std::string::npos) << msg;
}

TEST_F(TlsContextTest, VerifyPeerNeedsTheCa) {
  write("server-cert.pem", "x");
  write("server-key.pem", "x");
  const auto msg =
      error_of(TlsSettings{.mode = TlsMode::on, .certificates_dir = dir_.string(), .verify_peer = true});
  EXPECT_NE(msg.find("ca-cert.pem is missing"), std::string::npos) << msg;
}

TEST_F(TlsContextTest, GarbageCertificatesAreRefused) {
  write("server-cert.pem", "not a certificate\n");
  write("server-key.pem", "not a key\n");
  const auto msg = error_of(TlsSettings{.mode = TlsMode::on, .certificates_dir = dir_.string()});
  EXPECT_NE(msg.find("server-cert.pem with"), std::string::npos) << msg;
}

TEST_F(TlsContextTest, PskFileShapeIsChecked) {
  EXPECT_NE(error_of({.mode = TlsMode::on, .psk_file = (dir_ / "none.psk").string()}).find("cannot be read"),
            std::string::npos);
  EXPECT_NE(error_of({.mode = TlsMode::on, .psk_file = write("empty.psk", "")}).find("no keys"), std::string::npos);
  for (const char* bad : {"alice\n", ":00ff\n", "alice:\n", "alice:0g\n", "alice:abc\n"}) {
    const auto msg = error_of({.mode = TlsMode::on, .psk_file = write("bad.psk", bad)});
    EXPECT_NE(msg.find("bad.psk:1"), std::string::npos) << bad << " -> " << msg;
  }
  const auto msg = error_of({.mode = TlsMode::on, .psk_file = write("ok.psk", "alice:00ff\n\nbob:0123456789abcdef\n")});
  EXPECT_EQ(msg, "");
}

TEST_F(TlsContextTest, PriorityStringsAreChecked) {
  const auto psk = write("ok.psk", "alice:00ff\n");
  auto with = [&](const std::string& priority) {
    return error_of({.mode = TlsMode::on, .psk_file = psk, .priority = priority});
  };
  EXPECT_EQ(with(""), "");  // the default
  EXPECT_EQ(with("NORMAL"), "");
  EXPECT_EQ(with("SECURE256:-VERS-TLS1.2"), "");
  auto msg = with("NORMAL:+NO-SUCH-CIPHER:-VERS-TLS1.2");
  EXPECT_NE(msg.find("TLS priority 'NORMAL:+NO-SUCH-CIPHER:-VERS-TLS1.2'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("at '+NO-SUCH-CIPHER'"), std::string::npos) << msg;
  msg = with("NONE");
  EXPECT_NE(msg.find("TLS priority 'NONE': No or insufficient priorities were set"), std::string::npos) << msg;
}

TEST(TlsPriority, DefaultIsNormalWithAes128GcmFirstInTheServersOrder) {
  gnutls_priority_t p = nullptr;
  ASSERT_EQ(gnutls_priority_init(&p, nbd::kDefaultTlsPriority, nullptr), 0);
  unsigned index = 0;
  ASSERT_EQ(gnutls_priority_get_cipher_suite_index(p, 0, &index), 0);
  unsigned char id[2];
  gnutls_kx_algorithm_t kx;
  gnutls_cipher_algorithm_t cipher;
  gnutls_mac_algorithm_t mac;
  gnutls_protocol_t version;
  const char* name = gnutls_cipher_suite_info(index, id, &kx, &cipher, &mac, &version);
  ASSERT_NE(name, nullptr);
  EXPECT_STREQ(name, "TLS_AES_128_GCM_SHA256");
  // NORMAL's ciphers, no more and no fewer.
  gnutls_priority_t normal = nullptr;
  ASSERT_EQ(gnutls_priority_init(&normal, "NORMAL", nullptr), 0);
  auto ciphers = [](gnutls_priority_t q) {
    const unsigned int* list = nullptr;
    const int n = gnutls_priority_cipher_list(q, &list);
    std::multiset<unsigned> out;
    for (int i = 0; i < n; ++i) out.insert(list[i]);
    return out;
  };
  EXPECT_EQ(ciphers(p), ciphers(normal));
  gnutls_priority_deinit(normal);
  gnutls_priority_deinit(p);
}

}  // namespace
}  // namespace blockway::test
