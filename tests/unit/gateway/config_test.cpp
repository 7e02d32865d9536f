// Configuration parsing: --export and --fuse-mount specs, the TOML file, and
// DaemonConfig::validate.
#include "gateway/config.hpp"

#include "fuse/fuse_front_end.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <tuple>

namespace blockway::gateway {
namespace {

using core::ConfigError;
using core::ListenAddress;

using ::testing::HasSubstr;
using test::what_of;

// ---------------------------------------------------------------- ExportConfig::parse_spec

TEST(ExportSpec, NameAndUriOnly) {
  const auto e = ExportConfig::parse_spec("disk=file:///var/tmp/disk.img");
  EXPECT_EQ(e.name, "disk");
  EXPECT_EQ(e.uri, "file:///var/tmp/disk.img");
  EXPECT_FALSE(e.read_only);
  EXPECT_TRUE(e.description.empty());
  EXPECT_TRUE(e.options.empty());
}

TEST(ExportSpec, GenericKeysAndLeftoverOptions) {
  const auto e = ExportConfig::parse_spec("db=nbd://h/x?a=b,ro,description=Main DB,cache=on,mode=writeback,");
  EXPECT_EQ(e.name, "db");
  EXPECT_EQ(e.uri, "nbd://h/x?a=b");
  EXPECT_TRUE(e.read_only);
  EXPECT_EQ(e.description, "Main DB");
  const std::map<std::string, std::string> expected{{"cache", "on"}, {"mode", "writeback"}};
  EXPECT_EQ(e.options, expected);
}

TEST(ExportSpec, ReadOnlySpellingsAndValues) {
  EXPECT_TRUE(ExportConfig::parse_spec("a=file:///x,read-only").read_only);
  EXPECT_TRUE(ExportConfig::parse_spec("a=file:///x,readonly=yes").read_only);
  EXPECT_FALSE(ExportConfig::parse_spec("a=file:///x,ro=off").read_only);
  EXPECT_TRUE(ExportConfig::parse_spec("a=file:///x,ro=on").read_only);
}

TEST(ExportSpec, FlagWithoutValueIsKeptAsEmptyOption) {
  const auto e = ExportConfig::parse_spec("a=file:///x,direct");
  ASSERT_TRUE(e.options.contains("direct"));
  EXPECT_EQ(e.options.at("direct"), "");
}

TEST(ExportSpec, ErrorsNameTheProblem) {
  EXPECT_THAT(what_of<ConfigError>([] { ExportConfig::parse_spec("just-a-name"); }), HasSubstr("NAME=URI"));
  EXPECT_THAT(what_of<ConfigError>([] { ExportConfig::parse_spec("=file:///x"); }), HasSubstr("export name is empty"));
  EXPECT_THAT(what_of<ConfigError>([] { ExportConfig::parse_spec("a="); }), HasSubstr("URI is empty"));
  EXPECT_THAT(what_of<ConfigError>([] { ExportConfig::parse_spec("a=,ro"); }), HasSubstr("URI is empty"));
  EXPECT_THAT(what_of<ConfigError>([] { ExportConfig::parse_spec(std::string(4097, 'n') + "=file:///x"); }),
              HasSubstr("too long"));
  EXPECT_THAT(what_of<ConfigError>([] { ExportConfig::parse_spec("vm1@snap=file:///x"); }),
              HasSubstr("must not contain '@'"));
  const auto twice = what_of<ConfigError>([] { ExportConfig::parse_spec("a=file:///x,cache=on,cache=off"); });
  EXPECT_THAT(twice, HasSubstr("'cache'"));
  EXPECT_THAT(twice, HasSubstr("twice"));
  const auto bad_ro = what_of<ConfigError>([] { ExportConfig::parse_spec("a=file:///x,ro=maybe"); });
  EXPECT_THAT(bad_ro, HasSubstr("ro"));
  EXPECT_THAT(bad_ro, HasSubstr("maybe"));
  EXPECT_THAT(bad_ro, HasSubstr("export 'a'"));
}

// ---------------------------------------------------------------- TOML file

class ConfigFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/blockway-config-XXXXXX";
    const int fd = ::mkstemp(tmpl);
    ASSERT_GE(fd, 0);
    ::close(fd);
    path_ = tmpl;
  }
  void TearDown() override { std::remove(path_.c_str()); }
  void write(const std::string& text) {
    std::ofstream f(path_, std::ios::trunc);
    f << text;
  }
  std::string path_;
};

TEST_F(ConfigFile, GoodFileSetsEverySetting) {
  write(R"(# blockwayd.toml
listen = ["127.0.0.1:10809", "[::1]:10810", "unix:/run/bw.sock"]
threads = 4
blocking-threads = 8
data-dir = "/var/lib/bw"
log-level = "debug"
pid-file = "/run/bw.pid"
default-export = "disk"
max-inflight = "64M"
max-request = 1048576
handshake-timeout = 5

[[export]]
name = "disk"
uri = "file:///var/tmp/disk.img"
description = "the disk"
read-only = true
cache = "on"
chunk = 65536

[[export]]
name = "other"
uri = "file:///var/tmp/other.img"
)");
  DaemonConfig cfg;
  cfg.listen.push_back(ListenAddress::parse("1.2.3.4:5"));  // replaced by the file
  load_config_file(path_, cfg);
  ASSERT_EQ(cfg.listen.size(), 3u);
  EXPECT_EQ(cfg.listen[0].to_string(), "127.0.0.1:10809");
  EXPECT_EQ(cfg.listen[1].host, "::1");
  EXPECT_EQ(cfg.listen[1].port, 10810);
  EXPECT_EQ(cfg.listen[2].kind, ListenAddress::Kind::unix_socket);
  EXPECT_EQ(cfg.threads, 4u);
  EXPECT_EQ(cfg.blocking_threads, 8u);
  EXPECT_EQ(cfg.data_dir, "/var/lib/bw");
  EXPECT_EQ(cfg.log_level, "debug");
  EXPECT_EQ(cfg.pid_file, "/run/bw.pid");
  EXPECT_EQ(cfg.default_export, "disk");
  EXPECT_EQ(cfg.max_inflight_bytes, 64u << 20);
  EXPECT_EQ(cfg.max_request_bytes, 1u << 20);
  EXPECT_EQ(cfg.handshake_timeout, std::chrono::seconds(5));
  ASSERT_EQ(cfg.exports.size(), 2u);
  EXPECT_EQ(cfg.exports[0].name, "disk");
  EXPECT_EQ(cfg.exports[0].uri, "file:///var/tmp/disk.img");
  EXPECT_EQ(cfg.exports[0].description, "the disk");
  EXPECT_TRUE(cfg.exports[0].read_only);
  const std::map<std::string, std::string> opts{{"cache", "on"}, {"chunk", "65536"}};
  EXPECT_EQ(cfg.exports[0].options, opts);
  EXPECT_EQ(cfg.exports[1].name, "other");
  EXPECT_FALSE(cfg.exports[1].read_only);
  EXPECT_NO_THROW(cfg.validate());
}

TEST_F(ConfigFile, SecondsTakeDecimals) {
  write("handshake-timeout = 2.5\nshutdown-timeout = \"0.25\"\n");
  DaemonConfig cfg;
  load_config_file(path_, cfg);
  EXPECT_EQ(cfg.handshake_timeout, std::chrono::milliseconds(2500));
  EXPECT_EQ(cfg.shutdown_timeout, std::chrono::milliseconds(250));
  write("shutdown-timeout = \"soon\"\n");
  DaemonConfig bad;
  EXPECT_THAT(what_of<ConfigError>([&] { load_config_file(path_, bad); }), HasSubstr("shutdown-timeout='soon'"));
}

TEST_F(ConfigFile, EmptyFileKeepsDefaults) {
  write("");
  DaemonConfig cfg;
  load_config_file(path_, cfg);
  EXPECT_EQ(cfg.max_inflight_bytes, 128ull << 20);
  EXPECT_EQ(cfg.log_level, "info");
  EXPECT_TRUE(cfg.exports.empty());
}

TEST_F(ConfigFile, UnknownKeyIsAnErrorNamingIt) {
  write("threads = 2\nthreadz = 3\n");
  DaemonConfig cfg;
  const auto msg = what_of<ConfigError>([&] { load_config_file(path_, cfg); });
  EXPECT_THAT(msg, HasSubstr("unknown setting 'threadz'"));
  EXPECT_THAT(msg, HasSubstr(path_));
}

TEST_F(ConfigFile, ParseErrorCarriesPathAndLine) {
  write("threads = 2\n\nlog-level = \"info\n");
  DaemonConfig cfg;
  const auto msg = what_of<ConfigError>([&] { load_config_file(path_, cfg); });
  EXPECT_THAT(msg, HasSubstr(path_ + ":3:"));
}

TEST_F(ConfigFile, MissingFileIsAConfigError) {
  DaemonConfig cfg;
  const auto msg = what_of<ConfigError>([&] { load_config_file(path_ + ".missing", cfg); });
  EXPECT_THAT(msg, HasSubstr(path_ + ".missing"));
}

TEST_F(ConfigFile, BadValuesNameTheSetting) {
  const std::pair<std::string, std::string> cases[] = {
      {"threads = -1\n", "threads"},
      {"threads = 1.5\n", "'threads' must be a string, number or boolean"},
      {"max-inflight = \"lots\"\n", "max-inflight"},
      {"max-request = \"8G\"\n", "max-request"},
      {"listen = \"127.0.0.1:1\"\n", "'listen' must be an array"},
      {"listen = [\"nowhere\"]\n", "nowhere"},
      {"export = 3\n", "[[export]]"},
      {"[[export]]\nuri = \"file:///x\"\n", "export name is empty"},
      {"[[export]]\nname = \"a@b\"\nuri = \"file:///x\"\n", "must not contain '@'"},
      {"[[export]]\nname = \"a\"\n", "export 'a' has no uri"},
      {"[[export]]\nname = \"a\"\nuri = \"file:///x\"\nread-only = \"perhaps\"\n", "read-only"},
  };
  for (const auto& [text, expect] : cases) {
    write(text);
    DaemonConfig cfg;
    EXPECT_THAT(what_of<ConfigError>([&] { load_config_file(path_, cfg); }), HasSubstr(expect)) << text;
  }
}

// ---------------------------------------------------------------- validate

DaemonConfig valid_config() {
  DaemonConfig cfg;
  cfg.exports.push_back(ExportConfig::parse_spec("a=file:///a"));
  cfg.exports.push_back(ExportConfig::parse_spec("b=file:///b"));
  return cfg;
}

TEST(DaemonConfigValidate, DefaultsAreValid) {
  EXPECT_NO_THROW(DaemonConfig{}.validate());
  EXPECT_NO_THROW(valid_config().validate());
}

TEST(DaemonConfigValidate, DuplicateExport) {
  auto cfg = valid_config();
  cfg.exports.push_back(ExportConfig::parse_spec("a=file:///c"));
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("export 'a' is defined twice"));
}

TEST(DaemonConfigValidate, DefaultExportMustExist) {
  auto cfg = valid_config();
  cfg.default_export = "b";
  EXPECT_NO_THROW(cfg.validate());
  cfg.default_export = "zz";
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("default-export 'zz'"));
  cfg.stdio_export = ExportConfig::parse_spec("zz=file:///z");
  EXPECT_NO_THROW(cfg.validate());
}

TEST(DaemonConfigValidate, RequestAndInflightLimits) {
  auto cfg = valid_config();
  cfg.max_request_bytes = 4095;
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("max-request"));
  cfg.max_request_bytes = (256u << 20) + 1;
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("max-request"));
  cfg.max_request_bytes = 4096;
  cfg.max_inflight_bytes = 4096;
  EXPECT_NO_THROW(cfg.validate());
  // Below max-request is allowed (one request is always admitted); below 4k is not.
  cfg.max_request_bytes = 32u << 20;
  cfg.max_inflight_bytes = 65536;
  EXPECT_NO_THROW(cfg.validate());
  cfg.max_inflight_bytes = 4095;
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("max-inflight"));
}

TEST(DaemonConfigValidate, LogLevelThreadsAndBlockingThreads) {
  auto cfg = valid_config();
  cfg.log_level = "verbose";
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("log-level 'verbose'"));
  cfg.log_level = "warn";
  EXPECT_NO_THROW(cfg.validate());
  cfg.threads = 257;
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("threads"));
  cfg.threads = 256;
  EXPECT_NO_THROW(cfg.validate());
  cfg.blocking_threads = 0;
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("blocking-threads"));
  cfg.blocking_threads = 1025;
  EXPECT_THAT(what_of<ConfigError>([&] { cfg.validate(); }), HasSubstr("blocking-threads"));
}

TEST(FuseMountConfig, ParsesTheCommandLineSpec) {
  const auto f = FuseMountConfig::parse_spec("/mnt/x,mode=0640,allow-other");
  EXPECT_EQ(f.mountpoint, "/mnt/x");
  EXPECT_EQ(f.options.at("mode"), "0640");
  EXPECT_EQ(f.options.at("allow-other"), "on");
  EXPECT_THROW(FuseMountConfig::parse_spec(",mode=1"), ConfigError);
  EXPECT_THROW(FuseMountConfig::parse_spec("/x,,mode=1"), ConfigError);
}

TEST(FuseMountConfig, ReadsTheFuseTable) {
  char path[] = "/tmp/bw-fuse-config-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::close(fd);
  {
    std::ofstream(path) << "[fuse]\nmountpoint = \"/run/x\"\nmode = \"0600\"\nallow-other = true\n";
    DaemonConfig cfg;
    load_config_file(path, cfg);
    ASSERT_TRUE(cfg.fuse);
    EXPECT_EQ(cfg.fuse->mountpoint, "/run/x");
    const auto o = fuse::FuseOptions::parse(cfg.fuse->options);
    EXPECT_EQ(o.mode, 0600u);
    EXPECT_TRUE(o.allow_other);
  }
  {
    // No mountpoint: options for a mount made at run time.
    std::ofstream(path) << "[fuse]\nmode = \"0600\"\n";
    DaemonConfig cfg;
    load_config_file(path, cfg);
    ASSERT_TRUE(cfg.fuse);
    EXPECT_TRUE(cfg.fuse->mountpoint.empty());
  }
  {
    std::ofstream(path) << "fuse = \"/run/x\"\n";
    DaemonConfig cfg;
    EXPECT_THROW(load_config_file(path, cfg), ConfigError);  // not a table
  }
  ::unlink(path);
}

// ---------------------------------------------------------------- [control]

DaemonConfig load(const std::string& toml) {
  char tmpl[] = "/tmp/blockway-control-conf-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::write(fd, toml.data(), toml.size()), static_cast<ssize_t>(toml.size()));
  ::close(fd);
  DaemonConfig cfg;
  try {
    load_config_file(tmpl, cfg);
  } catch (...) {
    ::unlink(tmpl);
    throw;
  }
  ::unlink(tmpl);
  return cfg;
}

TEST(ControlConfig, SocketAndMode) {
  const auto cfg = load("[control]\nsocket = \"/run/x/c.sock\"\nmode = \"0660\"\n");
  EXPECT_EQ(cfg.control_socket, "/run/x/c.sock");
  EXPECT_EQ(cfg.control_socket_mode, 0660u);
  EXPECT_EQ(cfg.control_mode(), 0660u);
  // A group makes the default mode 0660; an explicit mode still wins.
  const auto grouped = load("[control]\ngroup = \"0\"\n");
  EXPECT_EQ(grouped.control_socket_group, "0");
  EXPECT_EQ(grouped.control_mode(), 0660u);
  EXPECT_EQ(load("[control]\ngroup = \"root\"\nmode = \"0640\"\n").control_mode(), 0640u);
  EXPECT_EQ(control_group_id("root"), 0u);
  EXPECT_EQ(control_group_id("1234"), 1234u);
  EXPECT_NO_THROW(cfg.validate());
  EXPECT_EQ(load("[control]\nmode = 0o640\n").control_socket_mode, 0640u);
  const auto off = load("[control]\nsocket = \"off\"\n");
  EXPECT_EQ(off.control_socket, "off");
  EXPECT_NO_THROW(off.validate());
  const auto dflt = load("threads = 2\n");
  EXPECT_EQ(dflt.control_socket, "");
  EXPECT_EQ(dflt.control_socket_mode, 0600u);
}

TEST(ControlConfig, MistakesNameTheSetting) {
  auto message = [](const std::string& toml) {
    try {
      load(toml).validate();
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("[control]\nbogus = 1\n").find("control.bogus"), std::string::npos);
  EXPECT_NE(message("[control]\nmode = \"rw\"\n").find("control.mode"), std::string::npos);
  EXPECT_NE(message("[control]\nmode = \"01777\"\n").find("control.mode"), std::string::npos);
  EXPECT_NE(message("[control]\nsocket = \"\"\n").find("off"), std::string::npos);
  EXPECT_NE(message("[control]\nsocket = \"relative.sock\"\n").find("absolute"), std::string::npos);
  EXPECT_NE(message("control = 1\n").find("[control]"), std::string::npos);
  EXPECT_NE(message("[control]\ngroup = \"no-such-group-here\"\n").find("control.group"), std::string::npos);
  EXPECT_NE(message("[control]\ngroup = \"\"\n").find("control.group"), std::string::npos);
}

TEST(UnixSocketAccess, ModeOwnerAndGroup) {
  auto cfg = load("listen = [\"unix:/run/x.sock\"]\nsocket-mode = 0o640\nsocket-user = \"root\"\nsocket-group = \"4321\"\n");
  EXPECT_NO_THROW(cfg.validate());
  auto a = cfg.unix_socket_access();
  EXPECT_EQ(a.mode, std::optional<mode_t>(0640));
  EXPECT_EQ(a.uid, std::optional<uid_t>(0));
  EXPECT_EQ(a.gid, std::optional<gid_t>(4321));
  // A group alone means 0660 (its members may connect); nothing set: nothing changed.
  EXPECT_EQ(load("socket-group = \"root\"\n").unix_socket_access().mode, std::optional<mode_t>(0660));
  EXPECT_EQ(load("socket-mode = \"600\"\n").unix_socket_access().mode, std::optional<mode_t>(0600));
  const auto none = load("threads = 2\n").unix_socket_access();
  EXPECT_FALSE(none.mode || none.uid || none.gid);
  EXPECT_EQ(parse_socket_mode("0777", "m"), 0777u);
  EXPECT_EQ(socket_user_id("0", "u"), 0u);
}

TEST(UnixSocketAccess, MistakesNameTheSetting) {
  EXPECT_THAT(what_of<ConfigError>([] { (void)load("socket-mode = \"rw\"\n"); }), HasSubstr("socket-mode 'rw' is not a file mode"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)load("socket-mode = 0o1777\n"); }), HasSubstr("socket-mode 1023 is not a file mode"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)load("socket-user = \"no-such-user-here\"\n"); }), HasSubstr("no such user"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)load("socket-group = \"no-such-group-here\"\n"); }), HasSubstr("no such group"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)parse_socket_mode("", "--socket-mode"); }), HasSubstr("--socket-mode ''"));
  // Only Unix listeners have a file to give a mode to.
  EXPECT_THAT(what_of<ConfigError>([] { (void)load("listen = [\"127.0.0.1:1\"]\nsocket-mode = \"0600\"\n").validate(); }),
              HasSubstr("apply to Unix listeners"));
}

TEST(ExportSpec, FuseOwnerAndMode) {
  const auto e = ExportConfig::parse_spec("a=file:///x,fuse-uid=root,fuse-gid=1234,fuse-mode=0640");
  EXPECT_EQ(e.fuse.uid, std::optional<uid_t>(0));
  EXPECT_EQ(e.fuse.gid, std::optional<gid_t>(1234));
  EXPECT_EQ(e.fuse.mode, std::optional<mode_t>(0640));
  EXPECT_TRUE(e.options.empty());
  EXPECT_THAT(what_of<ConfigError>([] { (void)ExportConfig::parse_spec("a=file:///x,fuse-uid=no-such-user-here"); }),
              HasSubstr("option fuse-uid='no-such-user-here': no such user"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)ExportConfig::parse_spec("a=file:///x,fuse-mode=0800"); }), HasSubstr("fuse-mode"));
}

// blockway access --fuse-uid/--fuse-gid/--fuse-mode take what the keys take,
// with the keys' messages.
TEST(ExportSpec, FuseValuesAsTheControlPlaneTakesThem) {
  EXPECT_EQ(parse_fuse_uid("a", "root"), 0u);
  EXPECT_EQ(parse_fuse_uid("a", "64131"), 64131u);
  EXPECT_EQ(parse_fuse_gid("a", "0"), 0u);
  EXPECT_EQ(parse_fuse_mode("a", "600"), 0600u);
  EXPECT_EQ(parse_fuse_mode("a", "0777"), 0777u);
  EXPECT_EQ(what_of<ConfigError>([] { (void)parse_fuse_uid("vm1", "no-such-user-here"); }),
            "export 'vm1': option fuse-uid='no-such-user-here': no such user");
  EXPECT_EQ(what_of<ConfigError>([] { (void)parse_fuse_gid("vm1", "no-such-group"); }),
            "export 'vm1': option fuse-gid='no-such-group': no such group");
  EXPECT_THAT(what_of<ConfigError>([] { (void)parse_fuse_mode("vm1", "01777"); }),
              HasSubstr("export 'vm1': option fuse-mode"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)parse_fuse_mode("vm1", "rw"); }), HasSubstr("fuse-mode"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)parse_fuse_uid("vm1", ""); }), HasSubstr("no such user"));
}

// The form a run-time change is saved in: every key, empty where unset,
// numbers; read back to the same attributes.
TEST(ExportSpec, FuseAttrsSavedAndReadBack) {
  core::FileAttrs none;
  EXPECT_EQ(saved_fuse_attrs(none), "fuse-uid=,fuse-gid=,fuse-mode=");
  EXPECT_EQ(fuse_attrs_from_saved("a", saved_fuse_attrs(none)), none);
  core::FileAttrs all{.uid = 64131, .gid = 0, .mode = 0600};
  EXPECT_EQ(saved_fuse_attrs(all), "fuse-uid=64131,fuse-gid=0,fuse-mode=0600");
  EXPECT_EQ(fuse_attrs_from_saved("a", saved_fuse_attrs(all)), all);
  core::FileAttrs mode_only{.mode = 044};
  EXPECT_EQ(saved_fuse_attrs(mode_only), "fuse-uid=,fuse-gid=,fuse-mode=0044");
  EXPECT_EQ(fuse_attrs_from_saved("a", saved_fuse_attrs(mode_only)), mode_only);
  // The configuration's keys give the same form (what a saved change is compared with).
  EXPECT_EQ(saved_fuse_attrs(ExportConfig::parse_spec("a=file:///x,fuse-gid=7,fuse-mode=640").fuse),
            "fuse-uid=,fuse-gid=7,fuse-mode=0640");
  EXPECT_THAT(what_of<ConfigError>([] { (void)fuse_attrs_from_saved("a", "fuse-owner=1"); }),
              HasSubstr("unknown key 'fuse-owner'"));
  EXPECT_THAT(what_of<ConfigError>([] { (void)fuse_attrs_from_saved("a", "fuse-mode=9"); }), HasSubstr("fuse-mode"));
  // What the file shows: the mount's where unset, a read-only export's
  // write bits gone.
  const auto shown = mode_only.resolve(5, 6, 0644, false);
  EXPECT_EQ(std::tuple(shown.uid, shown.gid, shown.mode), std::tuple(5u, 6u, 044u));
  EXPECT_EQ(all.resolve(5, 6, 0644, true).mode, 0400u);
  EXPECT_EQ(none.resolve(5, 6, 0664, true).mode, 0444u);
}


// ---------------------------------------------------------------- metrics address

TEST(MetricsAddress, EveryFormAndItsDefaults) {
  EXPECT_EQ(parse_metrics_address("9200").to_string(), "127.0.0.1:9200");  // a port alone: loopback
  EXPECT_EQ(parse_metrics_address("127.0.0.2").to_string(), "127.0.0.2:9110");  // a host alone: port 9110
  EXPECT_EQ(parse_metrics_address("0.0.0.0:9300").to_string(), "0.0.0.0:9300");
  EXPECT_EQ(parse_metrics_address("[::1]:9400").to_string(), "[::1]:9400");
  EXPECT_EQ(parse_metrics_address(":9500").port, 9500);
  EXPECT_THAT(what_of<ConfigError>([] { parse_metrics_address(""); }), HasSubstr("metrics address is empty"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_metrics_address("unix:/run/m.sock"); }), HasSubstr("TCP only"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_metrics_address("0"); }), HasSubstr("port 0 is not a port"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_metrics_address("70000"); }), HasSubstr("70000"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_metrics_address("h:x"); }), HasSubstr("not a valid number"));
}

TEST_F(ConfigFile, MetricsTable) {
  write("[metrics]\nlisten = \"127.0.0.1:9111\"\n");
  DaemonConfig cfg;
  load_config_file(path_, cfg);
  ASSERT_TRUE(cfg.metrics);
  EXPECT_EQ(cfg.metrics->to_string(), "127.0.0.1:9111");
  write("[metrics]\nlisten = 9112\n");  // a TOML integer: a port on loopback
  load_config_file(path_, cfg);
  EXPECT_EQ(cfg.metrics->to_string(), "127.0.0.1:9112");
  write("[metrics]\nlisten = \"off\"\n");
  load_config_file(path_, cfg);
  EXPECT_FALSE(cfg.metrics);
  for (const auto& [text, expect] : std::vector<std::pair<std::string, std::string>>{
           {"metrics = 1\n", "[metrics] table"},
           {"[metrics]\nport = 1\n", "unknown setting 'metrics.port'"},
           {"[metrics]\nlisten = \"unix:/x\"\n", "TCP only"}}) {
    write(text);
    DaemonConfig bad;
    EXPECT_THAT(what_of<ConfigError>([&] { load_config_file(path_, bad); }), HasSubstr(expect)) << text;
  }
}

}  // namespace
}  // namespace blockway::gateway

namespace blockway::gateway {
namespace {

TEST_F(ConfigFile, DeviceTables) {
  write(R"(
[[device]]
export = "vm1"
device = "/dev/nbd2"
dead-conn-timeout = 300
read-only = true

[[device]]
export = "vm2"
)");
  DaemonConfig cfg;
  load_config_file(path_, cfg);
  ASSERT_EQ(cfg.devices.size(), 2u);
  EXPECT_EQ(cfg.devices[0].export_name, "vm1");
  EXPECT_EQ(cfg.devices[0].options.at("device"), "/dev/nbd2");
  EXPECT_EQ(cfg.devices[0].options.at("dead-conn-timeout"), "300");
  EXPECT_EQ(cfg.devices[0].options.at("read-only"), "on");
  EXPECT_EQ(cfg.devices[1].export_name, "vm2");
  EXPECT_TRUE(cfg.devices[1].options.empty());
}

TEST_F(ConfigFile, DeviceTablesNeedAnExport) {
  write("[[device]]\ndevice = \"/dev/nbd0\"\n");
  DaemonConfig cfg;
  EXPECT_THAT(what_of<ConfigError>([&] { load_config_file(path_, cfg); }), HasSubstr("[[device]] has no export"));
  write("[device]\nexport = \"a\"\n");
  DaemonConfig cfg2;
  EXPECT_THAT(what_of<ConfigError>([&] { load_config_file(path_, cfg2); }), HasSubstr("use [[device]] tables"));
}

}  // namespace
}  // namespace blockway::gateway
