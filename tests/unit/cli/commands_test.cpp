// blockway's table of subcommands and the --help written from it: every
// subcommand and every exit code is listed, and names are unique.
#include "cli/command.hpp"
#include "cli/exit_codes.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>
#include <string>

namespace blockway::cli {
namespace {

using ::testing::HasSubstr;

TEST(Commands, UsageListsEverySubcommandOnce) {
  const std::string help = usage();
  std::set<std::string_view> names;
  for (const auto& c : commands()) {
    EXPECT_TRUE(names.insert(c.name).second) << c.name << " twice";
    EXPECT_THAT(help, HasSubstr("\n  " + std::string(c.name))) << c.name;
    EXPECT_TRUE(c.help.starts_with(c.name)) << c.name;
  }
}

TEST(Commands, UsageListsEveryExitCode) {
  const std::string help = usage();
  const auto exits = help.substr(help.find("Exit codes:"));
  for (const auto& e : kExitCodes)
    EXPECT_THAT(exits, HasSubstr("  " + std::to_string(e.code) + "  " + std::string(e.meaning))) << e.code;
}

TEST(Commands, UnknownCommandIsNotRun) { EXPECT_EQ(run_command("frobnicate", {}), -1); }

}  // namespace
}  // namespace blockway::cli
