#include "cli/args.hpp"

#include "cli/format.hpp"

#include <algorithm>
#include <cstdio>

namespace blockway::cli {

Args parse_args(const std::vector<std::string>& in, const std::string& usage, std::set<std::string> flags,
                std::set<std::string> options) {
  flags.insert("--json");
  options.insert("--socket");
  Args a;
  for (size_t i = 0; i < in.size(); ++i) {
    std::string arg = in[i];
    if (arg == "--help" || arg == "-h") {
      a.help = true;
      continue;
    }
    if (arg.starts_with("--") && arg.size() > 2) {
      std::string value;
      bool has_value = false;
      if (auto eq = arg.find('='); eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_value = true;
      }
      if (flags.contains(arg) && !has_value) {
        a.flags.insert(arg);
      } else if (options.contains(arg)) {
        if (!has_value) {
          if (i + 1 >= in.size()) throw CliError(kUsage, arg + " needs a value\n" + usage);
          value = in[++i];
        }
        a.options[arg] = value;
      } else {
        throw CliError(kUsage, "unknown option '" + in[i] + "'\n" + usage);
      }
      continue;
    }
    a.positional.push_back(arg);
  }
  return a;
}

void need_positionals(const Args& a, size_t n, const std::string& usage) {
  if (a.positional.size() < n) throw CliError(kUsage, "missing argument\n" + usage);
  if (a.positional.size() > n) throw CliError(kUsage, "unexpected argument '" + a.positional[n] + "'\n" + usage);
}

int run_one_request(const std::vector<std::string>& in, const OneRequest& command) {
  const Args a = parse_args(in, command.usage, command.flags, command.options);
  if (a.help) return std::puts(command.usage.c_str()), kOk;
  need_positionals(a,
                   std::clamp(a.positional.size(), command.positionals,
                              command.positionals + command.optional_positionals),
                   command.usage);
  ControlClient client(control_socket_path(a.option("--socket")));
  const auto [name, arguments] = command.request(a);
  Json answer;
  try {
    answer = client.call(name, arguments);
  } catch (const CliError& e) {
    std::string message = e.what();
    for (const auto& [argument, option] : command.argument_options)
      for (size_t at; (at = message.find("argument \"" + argument + "\"")) != std::string::npos;)
        message.replace(at, argument.size() + 11, option);
    throw CliError(e.code, message);
  }
  if (a.has("--json")) return print_json(answer), kOk;
  command.print(a, answer);
  return kOk;
}

}  // namespace blockway::cli
