// Shared by the NBD fuzz harnesses: an export table over in-memory devices,
// and a run of the real handshake (and, if asked, the real transmission
// phase) over a client byte stream that is the fuzzer's input.
//
// The input is a memfd and the output /dev/null: both are files that epoll
// refuses, so Asio reads and writes them directly and never waits; the run
// ends when the input is used up (EOF), exactly as a client that sent these
// bytes and hung up.
//
// Thread model: single-threaded; one io_context per input.
#pragma once

#include "core/export.hpp"
#include "core/logging.hpp"
#include "nbd/channel.hpp"
#include "nbd/handshake.hpp"
#include "nbd/session.hpp"
#include "tests/support/memory_device.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstdint>
#include <span>

namespace blockway::fuzz {

inline constexpr uint64_t kDiskSize = 256u << 10;

struct NbdFixture {
  core::ExportTable table;
  test::MemoryDevice* disk = nullptr;

  NbdFixture() {
    core::init_logging("off");
    add("disk", false, true);
    add("ro", true, false);
  }

  void add(const std::string& name, bool read_only, bool cached) {
    auto mem = std::make_unique<test::MemoryDevice>(core::Geometry{.size = kDiskSize, .min_block = 512},
                                                    test::native_caps());
    if (!disk) disk = mem.get();
    auto exp = std::make_shared<core::Export>();
    exp->name = name;
    exp->description = "fuzz " + name;
    exp->device = std::make_shared<core::CheckedDevice>(std::move(mem), read_only);
    if (cached) {
      // The blockway:cache context: the whole range present locally.
      exp->cache_status = [](core::ByteRange r, core::ExtentList& out) -> core::Task<std::error_code> {
        out.push_back({r.length, 1});
        co_return std::error_code{};
      };
    }
    table.add(exp);
  }
};

// A file descriptor holding `bytes`, read from its start.
inline int input_fd(std::span<const uint8_t> bytes) {
  const int fd = ::memfd_create("nbd-fuzz", MFD_CLOEXEC);
  if (fd < 0) std::abort();
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  if (::lseek(fd, 0, SEEK_SET) != 0) std::abort();
  return fd;
}

// Runs negotiate() over `client` and, with `transmission`, a Session on
// whatever the handshake left of the stream.
inline void run_nbd(NbdFixture& f, std::span<const uint8_t> client, bool transmission) {
  boost::asio::io_context ctx;
  const int out = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (out < 0) std::abort();
  nbd::Channel ch(nbd::Channel::Descriptor(ctx, input_fd(client)), nbd::Channel::Descriptor(ctx, out));
  nbd::HandshakeOptions hopts;
  hopts.max_request_bytes = 64u << 10;
  // A TCP client on loopback, with no TLS offered: the access rules see an address.
  const nbd::PeerInfo peer{.text = "127.0.0.1:40000", .address = "127.0.0.1"};
  boost::asio::co_spawn(
      ctx,
      [&]() -> core::Task<void> {
        auto negotiated = co_await nbd::negotiate(ch, f.table, hopts, peer);
        if (!negotiated || !transmission) co_return;
        nbd::SessionLimits limits;
        limits.max_request_bytes = 64u << 10;
        limits.max_inflight_bytes = 1u << 20;
        auto session = std::make_shared<nbd::Session>(ch, std::move(*negotiated), limits);
        co_await session->run();
        co_await session->flush_if_dirty();
      },
      [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);  // an escaped exception is a finding
      });
  ctx.run();
  f.disk->clear_log();
}

}  // namespace blockway::fuzz
