// CheckedDevice over the in-memory fake: validation, emulation, splitting, stats.
#include "core/checked_device.hpp"
#include "tests/support/memory_device.hpp"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace blockway::test {
namespace {

using core::ByteRange;
using core::Capabilities;
using core::CheckedDevice;
using core::Extent;
using core::ExtentList;
using core::Geometry;
using core::kExtentHole;
using core::kExtentZero;
using core::kFastZero;
using core::kFua;
using core::kNoHole;
using core::Support;

constexpr uint64_t kSize = 4u << 20;

std::error_code err(int e) { return core::errno_code(e); }

// Native flush, and the capabilities named in `also` native too
// (writable_caps({&Capabilities::zero})).
Capabilities writable_caps(std::initializer_list<Support Capabilities::*> also = {}) {
  Capabilities c;
  c.flush = Support::native;
  for (const auto field : also) c.*field = Support::native;
  return c;
}

// The fake below a CheckedDevice; the fake stays owned by the CheckedDevice.
struct Stack {
  MemoryDevice* mem = nullptr;
  std::unique_ptr<CheckedDevice> dev;
};

Stack make(Capabilities caps = writable_caps(), Geometry geo = {.size = kSize}, bool export_ro = false) {
  if (geo.size == 0) geo.size = kSize;
  auto mem = std::make_unique<MemoryDevice>(geo, caps);
  Stack s;
  s.mem = mem.get();
  s.dev = std::make_unique<CheckedDevice>(std::move(mem), export_ro);
  return s;
}

std::error_code do_read(CheckedDevice& d, std::vector<std::byte>& buf, uint64_t off, core::IoFlags f = 0) {
  return sync_wait(d.read(buf, off, f));
}
std::error_code do_write(CheckedDevice& d, const std::vector<std::byte>& buf, uint64_t off,
                         core::IoFlags f = 0) {
  return sync_wait(d.write(buf, off, f));
}
std::error_code do_zero(CheckedDevice& d, ByteRange r, core::IoFlags f = 0) { return sync_wait(d.zero(r, f)); }
std::error_code do_trim(CheckedDevice& d, ByteRange r, core::IoFlags f = 0) { return sync_wait(d.trim(r, f)); }
std::error_code do_status(CheckedDevice& d, ByteRange r, ExtentList& out) {
  return sync_wait(d.block_status(r, out));
}

std::vector<std::byte> bytes(size_t n, uint8_t v) { return std::vector<std::byte>(n, std::byte{v}); }

bool all_equal(const std::vector<std::byte>& v, uint8_t value) {
  return std::all_of(v.begin(), v.end(), [&](std::byte b) { return b == std::byte{value}; });
}

// ---------------------------------------------------------------- ranges

TEST(CheckedDeviceRange, ReadBeyondEndIsEinvalAndNeverReachesDevice) {
  auto s = make();
  std::vector<std::byte> buf(1024);
  EXPECT_EQ(do_read(*s.dev, buf, kSize), err(EINVAL));
  EXPECT_EQ(do_read(*s.dev, buf, kSize - 512), err(EINVAL));
  std::vector<std::byte> huge(kSize + 512);
  EXPECT_EQ(do_read(*s.dev, huge, 0), err(EINVAL));
  EXPECT_EQ(s.mem->calls(Op::read), 0u);
  // The last bytes of the image are readable.
  EXPECT_EQ(do_read(*s.dev, buf, kSize - 1024), std::error_code{});
  EXPECT_EQ(s.mem->calls(Op::read), 1u);
}

TEST(CheckedDeviceRange, WriteTrimZeroBeyondEndIsEnospc) {
  auto s = make(writable_caps({&Capabilities::trim, &Capabilities::zero}));
  EXPECT_EQ(do_write(*s.dev, bytes(1024, 1), kSize - 512), err(ENOSPC));
  EXPECT_EQ(do_trim(*s.dev, {kSize - 512, 1024}), err(ENOSPC));
  EXPECT_EQ(do_zero(*s.dev, {kSize, 512}), err(ENOSPC));
  EXPECT_EQ(s.mem->calls(Op::write) + s.mem->calls(Op::trim) + s.mem->calls(Op::zero), 0u);
  EXPECT_EQ(do_write(*s.dev, bytes(1024, 1), kSize - 1024), std::error_code{});
}

// An image that grew below the CheckedDevice (a remote resized while
// served): the device reports half of the fake's bytes until it grows.
class GrownBelow final : public core::Layer {
 public:
  explicit GrownBelow(std::unique_ptr<core::BlockDevice> next) : Layer(std::move(next)) {}
  [[nodiscard]] Geometry geometry() const noexcept override { return {.size = kSize / 2}; }
};

TEST(CheckedDeviceRange, GrowMovesTheEndAndNeverShrinks) {
  CheckedDevice dev(std::make_unique<GrownBelow>(std::make_unique<MemoryDevice>(Geometry{.size = kSize},
                                                                                writable_caps())),
                    false);
  std::vector<std::byte> buf(1024);
  EXPECT_EQ(dev.geometry().size, kSize / 2);
  EXPECT_EQ(do_read(dev, buf, kSize / 2), err(EINVAL));
  EXPECT_EQ(do_write(dev, bytes(1024, 7), kSize - 1024), err(ENOSPC));
  dev.grow(kSize);
  EXPECT_EQ(dev.geometry().size, kSize);
  EXPECT_EQ(do_write(dev, bytes(1024, 7), kSize - 1024), std::error_code{});
  EXPECT_EQ(do_read(dev, buf, kSize - 1024), std::error_code{});
  EXPECT_TRUE(all_equal(buf, 7));
  EXPECT_EQ(do_read(dev, buf, kSize), err(EINVAL));
  dev.grow(kSize / 4);  // a smaller size is not a grow
  EXPECT_EQ(dev.geometry().size, kSize);
}

TEST(CheckedDeviceRange, OffsetPlusLengthOverflowIsRejected) {
  auto s = make(writable_caps({&Capabilities::trim, &Capabilities::zero, &Capabilities::extents}));
  const uint64_t wrap = UINT64_MAX - 511;  // wrap + 1024 overflows to 512
  std::vector<std::byte> buf(1024);
  EXPECT_EQ(do_read(*s.dev, buf, wrap), err(EINVAL));
  EXPECT_EQ(do_write(*s.dev, buf, wrap), err(ENOSPC));
  EXPECT_EQ(do_trim(*s.dev, {wrap, 1024}), err(ENOSPC));
  EXPECT_EQ(do_zero(*s.dev, {wrap, 1024}), err(ENOSPC));
  ExtentList out;
  EXPECT_EQ(do_status(*s.dev, {wrap, 1024}, out), err(EINVAL));
  EXPECT_EQ(sync_wait(s.dev->prefetch({wrap, 1024})), err(EINVAL));
  EXPECT_TRUE(s.mem->log().empty());
}

TEST(CheckedDeviceRange, MisalignedRequestsAreEinvalWithMinBlock512) {
  auto s = make(writable_caps({&Capabilities::zero, &Capabilities::trim}), {.size = kSize, .min_block = 512});
  EXPECT_EQ(s.dev->geometry().min_block, 512u);
  std::vector<std::byte> buf(512);
  EXPECT_EQ(do_read(*s.dev, buf, 100), err(EINVAL));
  std::vector<std::byte> odd(100);
  EXPECT_EQ(do_read(*s.dev, odd, 0), err(EINVAL));
  EXPECT_EQ(do_write(*s.dev, bytes(512, 1), 256), err(EINVAL));
  EXPECT_EQ(do_write(*s.dev, bytes(700, 1), 0), err(EINVAL));
  EXPECT_EQ(do_trim(*s.dev, {512, 100}), err(EINVAL));
  EXPECT_EQ(do_zero(*s.dev, {1, 512}), err(EINVAL));
  EXPECT_TRUE(s.mem->log().empty());
  EXPECT_EQ(do_read(*s.dev, buf, 1024), std::error_code{});
  EXPECT_EQ(do_write(*s.dev, bytes(1024, 1), 512), std::error_code{});
}

// An image whose size is off the grid: its final, partial block is reached by
// a request from the grid to the image's end, and only by such a request.
TEST(CheckedDeviceRange, TheFinalPartialBlockIsReachedByARequestEndingAtTheEnd) {
  constexpr uint64_t kOdd = 4 * 512 + 100;
  auto s = make(writable_caps({&Capabilities::zero}), {.size = kOdd, .min_block = 512});
  std::vector<std::byte> tail(100), more(612), short_tail(50);
  EXPECT_EQ(do_read(*s.dev, tail, 2048), std::error_code{});
  EXPECT_EQ(do_read(*s.dev, more, 1536), std::error_code{});
  EXPECT_EQ(do_write(*s.dev, bytes(100, 7), 2048), std::error_code{});
  EXPECT_EQ(do_zero(*s.dev, {1536, 612}), std::error_code{});
  EXPECT_EQ(do_read(*s.dev, short_tail, 2048), err(EINVAL));  // ends inside the tail
  EXPECT_EQ(do_read(*s.dev, short_tail, 2098), err(EINVAL));  // starts off the grid
  std::vector<std::byte> past(512);
  EXPECT_EQ(do_read(*s.dev, past, 2048), err(EINVAL));  // beyond the end
}

// ---------------------------------------------------------------- read-only and flags

TEST(CheckedDeviceReadOnly, ExportReadOnlyRefusesWriteTrimZeroWithEperm) {
  auto s = make(writable_caps({&Capabilities::trim, &Capabilities::zero}), {.size = kSize}, /*export_ro=*/true);
  EXPECT_TRUE(s.dev->capabilities().read_only);
  EXPECT_EQ(s.dev->capabilities().trim, Support::none);
  EXPECT_EQ(s.dev->capabilities().zero, Support::none);
  EXPECT_EQ(do_write(*s.dev, bytes(512, 1), 0), err(EPERM));
  EXPECT_EQ(do_trim(*s.dev, {0, 512}), err(EPERM));
  EXPECT_EQ(do_zero(*s.dev, {0, 512}), err(EPERM));
  EXPECT_TRUE(s.mem->log().empty());
  std::vector<std::byte> buf(512);
  EXPECT_EQ(do_read(*s.dev, buf, 0), std::error_code{});
}

TEST(CheckedDeviceReadOnly, ReadOnlyDeviceMakesTheExportReadOnly) {
  Capabilities caps = writable_caps();
  caps.read_only = true;
  auto s = make(caps, {.size = kSize}, /*export_ro=*/false);
  EXPECT_TRUE(s.dev->capabilities().read_only);
  EXPECT_EQ(do_write(*s.dev, bytes(512, 1), 0), err(EPERM));
  EXPECT_EQ(s.mem->calls(Op::write), 0u);
}

TEST(CheckedDeviceFlags, UnknownFlagsAreEinval) {
  auto s = make(writable_caps({&Capabilities::trim, &Capabilities::zero}));
  std::vector<std::byte> buf(512);
  EXPECT_EQ(do_read(*s.dev, buf, 0, kNoHole), err(EINVAL));
  EXPECT_EQ(do_write(*s.dev, buf, 0, kNoHole), err(EINVAL));
  EXPECT_EQ(do_write(*s.dev, buf, 0, 1u << 20), err(EINVAL));
  EXPECT_EQ(do_trim(*s.dev, {0, 512}, kFastZero), err(EINVAL));
  EXPECT_EQ(do_zero(*s.dev, {0, 512}, 1u << 7), err(EINVAL));
  EXPECT_TRUE(s.mem->log().empty());
  // FUA on a read is harmless and accepted.
  EXPECT_EQ(do_read(*s.dev, buf, 0, kFua), std::error_code{});
}

// ---------------------------------------------------------------- FUA

TEST(CheckedDeviceFua, EmulatedByWriteThenFlush) {
  auto s = make(writable_caps());  // flush native, fua none
  EXPECT_EQ(s.dev->capabilities().fua, Support::emulate);
  EXPECT_EQ(do_write(*s.dev, bytes(4096, 7), 8192, kFua), std::error_code{});
  const std::vector<Call> expected{{Op::write, 8192, 4096, 0}, {Op::flush, 0, 0, 0}};
  EXPECT_EQ(s.mem->log(), expected);
  EXPECT_TRUE(all_equal(s.mem->contents(8192, 4096), 7));
}

TEST(CheckedDeviceFua, PlainWriteDoesNotFlush) {
  auto s = make(writable_caps());
  EXPECT_EQ(do_write(*s.dev, bytes(4096, 7), 0), std::error_code{});
  EXPECT_EQ(s.mem->calls(Op::flush), 0u);
}

TEST(CheckedDeviceFua, NativeFuaIsPassedDownWithoutFlush) {
  auto s = make(writable_caps({&Capabilities::fua}));
  EXPECT_EQ(do_write(*s.dev, bytes(4096, 7), 0, kFua), std::error_code{});
  const std::vector<Call> expected{{Op::write, 0, 4096, kFua}};
  EXPECT_EQ(s.mem->log(), expected);
}

TEST(CheckedDeviceFua, FailedWriteIsNotFlushed) {
  auto s = make(writable_caps());
  s.mem->fail(Op::write, EIO);
  EXPECT_EQ(do_write(*s.dev, bytes(4096, 7), 0, kFua), err(EIO));
  EXPECT_EQ(s.mem->calls(Op::flush), 0u);
}

TEST(CheckedDeviceFua, FlushErrorFailsTheFuaWrite) {
  auto s = make(writable_caps());
  s.mem->fail(Op::flush, EIO);
  EXPECT_EQ(do_write(*s.dev, bytes(4096, 7), 0, kFua), err(EIO));
}

TEST(CheckedDeviceFua, TrimWithEmulatedFuaFlushesAfterTrim) {
  auto s = make(writable_caps({&Capabilities::trim}));
  EXPECT_EQ(do_trim(*s.dev, {4096, 4096}, kFua), std::error_code{});
  const std::vector<Call> expected{{Op::trim, 4096, 4096, 0}, {Op::flush, 0, 0, 0}};
  EXPECT_EQ(s.mem->log(), expected);
}

TEST(CheckedDeviceFlush, DeviceWithoutFlushSucceedsWithoutCallingIt) {
  auto s = make(Capabilities{});
  EXPECT_EQ(s.dev->capabilities().fua, Support::none);
  EXPECT_EQ(sync_wait(s.dev->flush()), std::error_code{});
  EXPECT_EQ(do_write(*s.dev, bytes(512, 1), 0, kFua), std::error_code{});
  EXPECT_EQ(s.mem->calls(Op::flush), 0u);
}

TEST(CheckedDeviceFlush, FlushErrorIsReported) {
  auto s = make(writable_caps());
  s.mem->fail(Op::flush, EIO);
  EXPECT_EQ(sync_wait(s.dev->flush()), err(EIO));
  EXPECT_EQ(s.dev->stats().snapshot().errors, 1u);
}

// ---------------------------------------------------------------- trim

TEST(CheckedDeviceTrim, WithoutDeviceTrimItIsAnAdvisoryNoop) {
  auto s = make(writable_caps());
  s.mem->fill(0, 4096, std::byte{9});
  EXPECT_EQ(do_trim(*s.dev, {0, 4096}), std::error_code{});
  EXPECT_EQ(s.mem->calls(Op::trim), 0u);
  EXPECT_TRUE(all_equal(s.mem->contents(0, 4096), 9));  // trim is not zero
}

TEST(CheckedDeviceTrim, DeviceTrimReturningEnotsupIsIgnored) {
  auto s = make(writable_caps({&Capabilities::trim}));
  s.mem->fail(Op::trim, EOPNOTSUPP);
  EXPECT_EQ(do_trim(*s.dev, {0, 4096}), std::error_code{});
  EXPECT_EQ(s.mem->calls(Op::trim), 1u);
  s.mem->fail(Op::trim, EIO);
  EXPECT_EQ(do_trim(*s.dev, {0, 4096}), err(EIO));
}

// ---------------------------------------------------------------- write zeroes

TEST(CheckedDeviceZero, EmulatedByWritingZeroesWhenDeviceHasNone) {
  auto s = make(writable_caps());
  EXPECT_EQ(s.dev->capabilities().zero, Support::emulate);
  s.mem->fill(0, kSize, std::byte{0xAA});
  // 2.5 MiB: more than one emulation step of 1 MiB.
  const ByteRange r{512 * 1024, 5u << 19};
  EXPECT_EQ(do_zero(*s.dev, r), std::error_code{});
  EXPECT_EQ(s.mem->calls(Op::zero), 0u);
  EXPECT_EQ(s.mem->calls(Op::write), 3u);
  EXPECT_TRUE(all_equal(s.mem->contents(r.offset, r.length), 0));
  EXPECT_TRUE(all_equal(s.mem->contents(0, r.offset), 0xAA));
  EXPECT_TRUE(all_equal(s.mem->contents(r.end(), kSize - r.end()), 0xAA));
  // The pieces cover the range exactly, in order.
  uint64_t pos = r.offset;
  for (const auto& c : s.mem->log_of(Op::write)) {
    EXPECT_EQ(c.offset, pos);
    pos += c.length;
  }
  EXPECT_EQ(pos, r.end());
}

TEST(CheckedDeviceZero, EmulationRespectsMaxTransfer) {
  auto s = make(writable_caps(), {.size = kSize, .max_transfer = 64 * 1024});
  s.mem->fill(0, kSize, std::byte{0xAA});
  EXPECT_EQ(do_zero(*s.dev, {0, 256 * 1024}), std::error_code{});
  for (const auto& c : s.mem->log_of(Op::write)) EXPECT_LE(c.length, 64u * 1024);
  EXPECT_EQ(s.mem->calls(Op::write), 4u);
  EXPECT_TRUE(all_equal(s.mem->contents(0, 256 * 1024), 0));
}

TEST(CheckedDeviceZero, EmulatedZeroWithFuaFlushes) {
  auto s = make(writable_caps());
  EXPECT_EQ(do_zero(*s.dev, {0, 4096}, kFua), std::error_code{});
  const auto log = s.mem->log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].op, Op::write);
  EXPECT_EQ(log[0].flags, 0u);
  EXPECT_EQ(log[1].op, Op::flush);
}

TEST(CheckedDeviceZero, FastZeroWithoutNativeZeroIsEnotsupAndWritesNothing) {
  auto s = make(writable_caps());
  s.mem->fill(0, 8192, std::byte{0xAA});
  EXPECT_EQ(do_zero(*s.dev, {0, 8192}, kFastZero), err(ENOTSUP));
  EXPECT_EQ(s.mem->calls(Op::write), 0u);
  EXPECT_TRUE(all_equal(s.mem->contents(0, 8192), 0xAA));
}

TEST(CheckedDeviceZero, NativeZeroGetsTheFlags) {
  auto s = make(writable_caps({&Capabilities::zero}));
  s.mem->fill(0, 8192, std::byte{0xAA});
  EXPECT_EQ(do_zero(*s.dev, {0, 8192}, kNoHole | kFastZero), std::error_code{});
  const std::vector<Call> expected{{Op::zero, 0, 8192, kNoHole | kFastZero}};
  EXPECT_EQ(s.mem->log(), expected);
  EXPECT_TRUE(all_equal(s.mem->contents(0, 8192), 0));
}

TEST(CheckedDeviceZero, NativeZeroReturningEnotsupFallsBackToWrites) {
  auto s = make(writable_caps({&Capabilities::zero}));
  s.mem->fill(0, 8192, std::byte{0xAA});
  s.mem->fail(Op::zero, ENOTSUP);
  EXPECT_EQ(do_zero(*s.dev, {0, 8192}), std::error_code{});
  EXPECT_EQ(s.mem->calls(Op::zero), 1u);
  EXPECT_GE(s.mem->calls(Op::write), 1u);
  EXPECT_TRUE(all_equal(s.mem->contents(0, 8192), 0));
}

TEST(CheckedDeviceZero, NativeZeroEnotsupWithFastZeroDoesNotFallBack) {
  auto s = make(writable_caps({&Capabilities::zero}));
  s.mem->fill(0, 8192, std::byte{0xAA});
  s.mem->fail(Op::zero, ENOTSUP);
  EXPECT_EQ(do_zero(*s.dev, {0, 8192}, kFastZero), err(ENOTSUP));
  EXPECT_EQ(s.mem->calls(Op::write), 0u);
  EXPECT_TRUE(all_equal(s.mem->contents(0, 8192), 0xAA));
}

TEST(CheckedDeviceZero, NativeZeroOtherErrorIsReported) {
  auto s = make(writable_caps({&Capabilities::zero}));
  s.mem->fail(Op::zero, EIO);
  EXPECT_EQ(do_zero(*s.dev, {0, 8192}), err(EIO));
  EXPECT_EQ(s.mem->calls(Op::write), 0u);
}

// ---------------------------------------------------------------- block status

TEST(CheckedDeviceBlockStatus, EmulatedAsOneDataExtent) {
  auto s = make(writable_caps());
  EXPECT_EQ(s.dev->capabilities().extents, Support::emulate);
  ExtentList out{{1, 1}};  // stale content is replaced
  EXPECT_EQ(do_status(*s.dev, {4096, 65536}, out), std::error_code{});
  EXPECT_EQ(out, (ExtentList{{65536, 0}}));
  EXPECT_EQ(s.mem->calls(Op::block_status), 0u);
}

TEST(CheckedDeviceBlockStatus, NativeExtentsAreClippedAndMerged) {
  auto s = make(writable_caps({&Capabilities::extents}));
  s.mem->set_extents({{4096, kExtentHole | kExtentZero},
                      {4096, kExtentHole | kExtentZero},
                      {0, 0},
                      {4096, 0},
                      {4096, 0},
                      {1u << 20, kExtentZero}});
  ExtentList out;
  EXPECT_EQ(do_status(*s.dev, {0, 20480}, out), std::error_code{});
  EXPECT_EQ(out, (ExtentList{{8192, kExtentHole | kExtentZero}, {8192, 0}, {4096, kExtentZero}}));
}

TEST(CheckedDeviceBlockStatus, ShortNativeAnswerIsKeptShort) {
  auto s = make(writable_caps({&Capabilities::extents}));
  s.mem->set_extents({{4096, kExtentHole | kExtentZero}});
  ExtentList out;
  EXPECT_EQ(do_status(*s.dev, {0, 65536}, out), std::error_code{});
  EXPECT_EQ(out, (ExtentList{{4096, kExtentHole | kExtentZero}}));
}

TEST(CheckedDeviceBlockStatus, EmptyNativeAnswerBecomesOneDataExtent) {
  auto s = make(writable_caps({&Capabilities::extents}));
  s.mem->set_extents({{0, kExtentHole}});
  ExtentList out;
  EXPECT_EQ(do_status(*s.dev, {0, 65536}, out), std::error_code{});
  EXPECT_EQ(out, (ExtentList{{65536, 0}}));
}

TEST(CheckedDeviceBlockStatus, ZeroLengthAndOutOfRangeAreEinval) {
  auto s = make(writable_caps());
  ExtentList out;
  EXPECT_EQ(do_status(*s.dev, {0, 0}, out), err(EINVAL));
  EXPECT_EQ(do_status(*s.dev, {kSize - 512, 1024}, out), err(EINVAL));
}

TEST(CheckedDeviceBlockStatus, NativeErrorIsReported) {
  auto s = make(writable_caps({&Capabilities::extents}));
  s.mem->fail(Op::block_status, EIO);
  ExtentList out;
  EXPECT_EQ(do_status(*s.dev, {0, 4096}, out), err(EIO));
}

// ---------------------------------------------------------------- prefetch

TEST(CheckedDevicePrefetch, EmulatedByReadingTheRange) {
  auto s = make(writable_caps());
  EXPECT_EQ(s.dev->capabilities().prefetch, Support::emulate);
  const ByteRange r{4096, (5u << 19)};  // 2.5 MiB: three 1 MiB steps
  EXPECT_EQ(sync_wait(s.dev->prefetch(r)), std::error_code{});
  const auto reads = s.mem->log_of(Op::read);
  ASSERT_EQ(reads.size(), 3u);
  uint64_t pos = r.offset;
  for (const auto& c : reads) {
    EXPECT_EQ(c.offset, pos);
    pos += c.length;
  }
  EXPECT_EQ(pos, r.end());
  EXPECT_EQ(s.mem->calls(Op::prefetch), 0u);
}

TEST(CheckedDevicePrefetch, EmulationReadErrorIsReported) {
  auto s = make(writable_caps());
  s.mem->fail(Op::read, EIO);
  EXPECT_EQ(sync_wait(s.dev->prefetch({0, 4096})), err(EIO));
}

TEST(CheckedDevicePrefetch, NativePrefetchIsPassedDown) {
  auto s = make(writable_caps({&Capabilities::prefetch}));
  EXPECT_EQ(sync_wait(s.dev->prefetch({4096, 8192})), std::error_code{});
  const std::vector<Call> expected{{Op::prefetch, 4096, 8192, 0}};
  EXPECT_EQ(s.mem->log(), expected);
}

// ---------------------------------------------------------------- splitting

TEST(CheckedDeviceSplit, ReadsAndWritesAboveMaxTransferAreSplit) {
  auto s = make(writable_caps(), {.size = kSize, .max_transfer = 64 * 1024});
  std::vector<std::byte> data(200 * 1024);
  for (size_t i = 0; i < data.size(); ++i) data[i] = std::byte(static_cast<uint8_t>(i * 7 + 3));
  EXPECT_EQ(do_write(*s.dev, data, 4096), std::error_code{});
  const std::vector<Call> writes{{Op::write, 4096, 65536, 0},
                                 {Op::write, 4096 + 65536, 65536, 0},
                                 {Op::write, 4096 + 2 * 65536, 65536, 0},
                                 {Op::write, 4096 + 3 * 65536, 8192, 0}};
  EXPECT_EQ(s.mem->log_of(Op::write), writes);

  std::vector<std::byte> back(data.size());
  EXPECT_EQ(do_read(*s.dev, back, 4096), std::error_code{});
  EXPECT_EQ(back, data);
  const auto reads = s.mem->log_of(Op::read);
  ASSERT_EQ(reads.size(), 4u);
  for (const auto& c : reads) EXPECT_LE(c.length, 65536u);
}

TEST(CheckedDeviceSplit, SplitFuaWriteFlushesOnceAtTheEnd) {
  auto s = make(writable_caps(), {.size = kSize, .max_transfer = 64 * 1024});
  EXPECT_EQ(do_write(*s.dev, bytes(128 * 1024, 1), 0, kFua), std::error_code{});
  const auto log = s.mem->log();
  ASSERT_EQ(log.size(), 3u);
  EXPECT_EQ(log[0].op, Op::write);
  EXPECT_EQ(log[1].op, Op::write);
  EXPECT_EQ(log[2].op, Op::flush);
}

TEST(CheckedDeviceSplit, ErrorInTheMiddleStopsTheRequest) {
  auto s = make(writable_caps(), {.size = kSize, .max_transfer = 64 * 1024});
  s.mem->fail(Op::read, EIO);
  std::vector<std::byte> buf(200 * 1024);
  EXPECT_EQ(do_read(*s.dev, buf, 0), err(EIO));
  EXPECT_EQ(s.mem->calls(Op::read), 1u);
}

// ---------------------------------------------------------------- stats

TEST(CheckedDeviceStats, CountsEveryKindOfRequestAndErrors) {
  auto s = make(writable_caps({&Capabilities::trim}));
  std::vector<std::byte> buf(4096);
  EXPECT_FALSE(do_read(*s.dev, buf, 0));
  EXPECT_FALSE(do_read(*s.dev, buf, 4096));
  EXPECT_FALSE(do_write(*s.dev, bytes(8192, 1), 0));
  EXPECT_FALSE(sync_wait(s.dev->flush()));
  EXPECT_FALSE(do_trim(*s.dev, {0, 4096}));
  EXPECT_FALSE(do_zero(*s.dev, {0, 4096}));
  ExtentList out;
  EXPECT_FALSE(do_status(*s.dev, {0, 4096}, out));
  EXPECT_FALSE(sync_wait(s.dev->prefetch({0, 4096})));
  EXPECT_EQ(do_read(*s.dev, buf, kSize), err(EINVAL));  // counted as an error only

  const auto st = s.dev->stats().snapshot();
  EXPECT_EQ(st.reads, 2u);
  EXPECT_EQ(st.bytes_read, 8192u);
  EXPECT_EQ(st.writes, 1u);
  EXPECT_EQ(st.bytes_written, 8192u);
  EXPECT_EQ(st.flushes, 1u);
  EXPECT_EQ(st.trims, 1u);
  EXPECT_EQ(st.zeroes, 1u);
  EXPECT_EQ(st.block_status, 1u);
  EXPECT_EQ(st.prefetches, 1u);
  EXPECT_EQ(st.errors, 1u);
}

TEST(CheckedDeviceStats, DeviceErrorsAreCounted) {
  auto s = make(writable_caps());
  s.mem->fail(Op::write, EIO);
  EXPECT_EQ(do_write(*s.dev, bytes(512, 1), 0), err(EIO));
  EXPECT_EQ(do_write(*s.dev, bytes(512, 1), 0, kFua), err(EIO));
  EXPECT_EQ(s.dev->stats().snapshot().errors, 2u);
}

// ---------------------------------------------------------------- capabilities

TEST(CheckedDeviceCaps, AdvertisesEmulationsAndKeepsNativeOnes) {
  auto s = make(native_caps());
  const auto c = s.dev->capabilities();
  EXPECT_EQ(c.fua, Support::native);
  EXPECT_EQ(c.zero, Support::native);
  EXPECT_EQ(c.extents, Support::native);
  EXPECT_TRUE(c.multi_conn);

  auto bare = make(Capabilities{});
  const auto b = bare.dev->capabilities();
  EXPECT_EQ(b.flush, Support::none);
  EXPECT_EQ(b.fua, Support::none);  // nothing to flush, nothing to emulate with
  EXPECT_EQ(b.trim, Support::none);
  EXPECT_EQ(b.zero, Support::emulate);
  EXPECT_EQ(b.extents, Support::emulate);
  EXPECT_EQ(b.prefetch, Support::emulate);
}

TEST(CheckedDeviceCaps, ZeroMinBlockIsTreatedAsOne) {
  auto s = make(writable_caps(), {.size = kSize, .min_block = 0});
  EXPECT_EQ(s.dev->geometry().min_block, 1u);
  std::vector<std::byte> buf(3);
  EXPECT_EQ(do_read(*s.dev, buf, 5), std::error_code{});
}

}  // namespace
}  // namespace blockway::test
