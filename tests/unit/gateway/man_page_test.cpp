// The generated man page sections: every flag, URI form, export and FUSE
// option and exit code of the tables is there, marked up for scdoc.
#include "gateway/man_page.hpp"

#include "cache/cache_config.hpp"
#include "cache/overlay_config.hpp"
#include "core/options.hpp"
#include "fuse/fuse_front_end.hpp"
#include "gateway/command_line.hpp"
#include "remote/registry.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

namespace blockway::gateway {
namespace {

using ::testing::HasSubstr;

TEST(ManPageTest, EveryFlagIsATerm) {
  const auto text = man_section("options");
  for (const auto& f : flag_help()) {
    std::string term = "*" + scdoc_escape(f.name) + "*";
    if (!f.value.empty()) term += " _" + scdoc_escape(f.value) + "_";
    EXPECT_THAT(text, HasSubstr(term + "\n\t")) << f.name;
  }
  EXPECT_THAT(text, HasSubstr("*--log-format* _FORMAT_\n\ttext, or json"));
}

TEST(ManPageTest, UrisAndOptionsOfEveryTable) {
  const auto uris = man_section("uris");
  for (const auto& b : remote::backends())
    for (auto form : b.uri_forms) EXPECT_THAT(uris, HasSubstr("*" + scdoc_escape(form) + "*")) << form;
  const auto exports = man_section("export-options");
  for (const auto& s : cache::CacheConfig::options()) EXPECT_THAT(exports, HasSubstr("*" + scdoc_escape(s.name) + "*"));
  for (const auto& s : cache::OverlayConfig::options()) EXPECT_THAT(exports, HasSubstr("*" + scdoc_escape(s.name) + "*"));
  for (const auto& b : remote::backends())
    for (const auto& s : b.options) EXPECT_THAT(exports, HasSubstr("*" + scdoc_escape(s.name) + "*")) << s.name;
  const auto fuse = man_section("fuse-options");
  for (const auto& s : fuse::FuseOptions::options()) EXPECT_THAT(fuse, HasSubstr("*" + scdoc_escape(s.name) + "*"));
  const auto exits = man_section("exit-status");
  for (const auto& [code, meaning] : exit_codes()) EXPECT_THAT(exits, HasSubstr("*" + std::to_string(code) + "*\n\t"));
}

TEST(ManPageTest, MarkupIsEscaped) {
  EXPECT_EQ(scdoc_escape("a_b *c* d\\e"), "a\\_b \\*c\\* d\\\\e");
  EXPECT_THAT(man_section("export-options"), ::testing::Not(HasSubstr("\n\n\n")));
}

TEST(ManPageTest, UnknownSectionIsRefused) {
  EXPECT_THROW((void)man_section("nonsense"), core::ConfigError);
}

}  // namespace
}  // namespace blockway::gateway
