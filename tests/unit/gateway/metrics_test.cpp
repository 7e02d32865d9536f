// Metrics: the text exposition of real exports (CheckedDevice over the
// memory fake): families grouped with HELP/TYPE, label escaping, cumulative
// histograms whose counts equal the request counts, providers added later.
#include "gateway/metrics.hpp"

#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

namespace blockway::gateway {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::shared_ptr<core::Export> memory_export(const std::string& name, uint64_t size = 1 << 20) {
  core::Capabilities caps;
  caps.flush = core::Support::native;
  auto e = std::make_shared<core::Export>();
  e->name = name;
  e->uri = "memory:";
  e->device = std::make_shared<core::CheckedDevice>(
      std::make_unique<test::MemoryDevice>(core::Geometry{.size = size}, caps), false);
  return e;
}

TEST(MetricsWriter, EscapesLabelValuesAndHelp) {
  EXPECT_EQ(MetricsWriter::escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  MetricsWriter w;
  w.family("x_total", MetricsWriter::Type::counter, "back\\slash\nnewline");
  w.sample("x_total", {{"export", "q\"uote"}}, 3);
  EXPECT_EQ(w.text(), "# HELP x_total back\\\\slash\\nnewline\n# TYPE x_total counter\nx_total{export=\"q\\\"uote\"} 3\n");
}

TEST(MetricsWriter, GroupsSamplesByFamilyInDeclarationOrder) {
  MetricsWriter w;
  w.family("a", MetricsWriter::Type::gauge, "A.");
  w.family("b", MetricsWriter::Type::gauge, "B.");
  w.sample("a", {{"export", "1"}}, 1);
  w.sample("b", {{"export", "1"}}, 2);
  w.family("a", MetricsWriter::Type::gauge, "A again: ignored.");
  w.sample("a", {{"export", "2"}}, 3.5);
  EXPECT_EQ(w.text(),
            "# HELP a A.\n# TYPE a gauge\na{export=\"1\"} 1\na{export=\"2\"} 3.5\n"
            "# HELP b B.\n# TYPE b gauge\nb{export=\"1\"} 2\n");
  EXPECT_THROW(w.sample("undeclared", {}, 1), std::logic_error);
}

TEST(MetricsCollector, RequestsBytesErrorsAndHistogramsPerExportAndOperation) {
  core::ExportTable table;
  auto e = memory_export("vm \"1\"");
  table.add(e);
  std::vector<std::byte> buf(4096);
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(test::sync_wait(e->device->read(buf, 0, 0)));
  EXPECT_FALSE(test::sync_wait(e->device->write(buf, 4096, 0)));
  EXPECT_TRUE(test::sync_wait(e->device->read(buf, 1 << 20, 0)));  // beyond the end
  e->clients = 2;
  MetricsCollector c(table);
  const std::string text = c.render();
  const std::string vm = "export=\"vm \\\"1\\\"\"";
  EXPECT_THAT(text, HasSubstr("blockway_export_requests_total{" + vm + ",op=\"read\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("blockway_export_bytes_total{" + vm + ",op=\"read\"} 12288\n"));
  EXPECT_THAT(text, HasSubstr("blockway_export_errors_total{" + vm + ",op=\"read\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("blockway_export_requests_total{" + vm + ",op=\"write\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("blockway_export_request_duration_seconds_bucket{" + vm + ",op=\"read\",le=\"+Inf\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("blockway_export_request_duration_seconds_count{" + vm + ",op=\"read\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("blockway_export_request_duration_seconds_bucket{" + vm + ",op=\"read\",le=\"1e-05\"} "));
  EXPECT_THAT(text, HasSubstr("blockway_export_clients{" + vm + "} 2\n"));
  EXPECT_THAT(text, HasSubstr("blockway_clients 2\n"));
  EXPECT_THAT(text, HasSubstr("blockway_exports 1\n"));
  EXPECT_THAT(text, HasSubstr("blockway_remote_connected{" + vm + "} 1\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE blockway_export_request_duration_seconds histogram\n"));
  EXPECT_THAT(text, Not(HasSubstr("blockway_cache_")));  // no cache in this stack
  // Buckets are cumulative: never decreasing up to +Inf.
  uint64_t last = 0;
  size_t buckets = 0;
  const std::string prefix = "blockway_export_request_duration_seconds_bucket{" + vm + ",op=\"read\",le=";
  for (size_t pos = text.find(prefix); pos != std::string::npos; pos = text.find(prefix, pos + 1)) {
    const auto sp = text.find(' ', text.find('}', pos));
    const uint64_t v = std::stoull(text.substr(sp + 1));
    EXPECT_GE(v, last);
    last = v;
    ++buckets;
  }
  EXPECT_EQ(buckets, core::kLatencyBuckets);
  EXPECT_EQ(last, 3u);
}

TEST(MetricsCollector, ProvidersAddTheirFamiliesForEveryExport) {
  core::ExportTable table;
  table.add(memory_export("a"));
  table.add(memory_export("b"));
  MetricsCollector c(table);
  c.add_export_provider([](const core::Export& e, MetricsWriter& out) {
    out.family("blockway_qos_throttled_total", MetricsWriter::Type::counter, "Requests delayed.");
    out.sample("blockway_qos_throttled_total", {{"export", e.name}}, 7);
  });
  const std::string text = c.render();
  EXPECT_THAT(text, HasSubstr("# TYPE blockway_qos_throttled_total counter\nblockway_qos_throttled_total{export=\"a\"} "
                              "7\nblockway_qos_throttled_total{export=\"b\"} 7\n"));
}

}  // namespace
}  // namespace blockway::gateway
