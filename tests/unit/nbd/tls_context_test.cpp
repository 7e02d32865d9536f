// TlsContext: the start-up checks of --tls, --tls-certificates and --tls-psk.
// The TLS sessions themselves run against real clients in test_tls.py.
#include "nbd/tls_context.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
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

}  // namespace
}  // namespace blockway::test
