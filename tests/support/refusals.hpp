// expect_refusals: table-driven checks of a parser's error messages.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

namespace blockway::test {

// An input a parser refuses, and words its message must contain.
struct Refusal {
  std::string input;
  std::string words;
};

// For each case, message_of(input) (the parser's error message, as what_of
// gives it) contains the case's words.
template <class F>
void expect_refusals(F&& message_of, std::initializer_list<Refusal> cases) {
  for (const auto& c : cases) EXPECT_THAT(message_of(c.input), ::testing::HasSubstr(c.words)) << c.input;
}

}  // namespace blockway::test
