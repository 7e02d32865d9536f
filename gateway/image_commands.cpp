#include "gateway/image_commands.hpp"

#include "core/logging.hpp"
#include "core/task.hpp"
#include "gateway/output_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>
#include <vector>

namespace blockway::gateway {
namespace {

using core::Task;

constexpr uint64_t kPiece = 1 << 20;     // read a MiB at a time
constexpr uint64_t kZeroBlock = 4096;    // zero blocks of this size become holes

struct Context {
  core::ExportTable& exports;
  boost::asio::thread_pool& blocking;
};


[[noreturn]] void fail(int err, const std::string& what) {
  throw ControlError("failed", err, what + ": " + std::strerror(err));
}

Task<Json> export_image(std::shared_ptr<const Context> ctx, Json req) {
  const auto name = arg_string(req, "name");
  const auto path = arg_absolute_path(req, "path");
  const bool force = arg_bool(req, "force", false);
  auto exp = name.empty() ? nullptr : ctx->exports.find(name);
  if (!exp || exp->name != name) throw ControlError("unknown-export", ENOENT, "no export named '" + name + "'");
  std::error_code fs_ec;
  if (std::filesystem::is_block_file(path, fs_ec) || std::filesystem::is_directory(path, fs_ec))
    throw ControlError("refused", EINVAL, path + " is not a regular file");
  OutputFile out{path};
  out.fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (force ? O_TRUNC : O_EXCL), 0600);
  if (out.fd < 0) {
    out.keep = true;  // not ours to remove
    if (errno == EEXIST)
      throw ControlError("refused", EEXIST, path + " exists; choose another file, or force to overwrite it");
    fail(errno, "cannot create " + path);
  }
  const uint64_t size = exp->device->geometry().size;
  if (::ftruncate(out.fd, static_cast<off_t>(size)) != 0) fail(errno, "cannot size " + path);
  std::vector<std::byte> buf(std::min(kPiece, std::max<uint64_t>(size, 1)));
  uint64_t data_bytes = 0;
  std::vector<std::pair<uint64_t, uint64_t>> runs;  // (offset in the piece, length) to write
  for (uint64_t off = 0; off < size; off += kPiece) {
    const auto piece = std::span(buf).first(std::min(kPiece, size - off));
    if (auto ec = co_await exp->device->read(piece, off, 0))
      throw ControlError("failed", ec.value(), "reading export '" + name + "' at " + std::to_string(off) + ": " +
                                                   ec.message());
    // Runs of non-zero 4 KiB blocks are written; zeroes stay holes (the
    // file was sized, so holes read zero).
    runs.clear();
    for (uint64_t at = 0; at < piece.size(); at += kZeroBlock) {
      const auto block = piece.subspan(at, std::min<uint64_t>(kZeroBlock, piece.size() - at));
      if (std::all_of(block.begin(), block.end(), [](std::byte b) { return b == std::byte{0}; })) continue;
      if (!runs.empty() && runs.back().first + runs.back().second == at)
        runs.back().second += block.size();
      else
        runs.emplace_back(at, block.size());
    }
    if (runs.empty()) continue;
    const int fd = out.fd;
    const std::byte* data = piece.data();
    const auto* todo = &runs;
    const int err = co_await core::offload(ctx->blocking, [fd, data, todo, off]() -> int {
      for (const auto& [at, len] : *todo)
        for (size_t done = 0; done < len;) {
          const ssize_t n = ::pwrite(fd, data + at + done, len - done, static_cast<off_t>(off + at + done));
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) return n < 0 ? errno : EIO;
          done += static_cast<size_t>(n);
        }
      return 0;
    });
    if (err) fail(err, "writing " + path);
    for (const auto& run : runs) data_bytes += run.second;
  }
  const int fd = out.fd;
  const int err = co_await core::offload(ctx->blocking, [fd]() -> int { return ::fsync(fd) == 0 ? 0 : errno; });
  if (err) fail(err, "syncing " + path);
  out.keep = true;
  const std::string message = "export '" + name + "' written to " + path + " (" + std::to_string(size) +
                              " bytes, " + std::to_string(data_bytes) + " of them not zero)";
  core::logger("control")->info("{}", message);
  co_return Json{{"name", name}, {"path", path}, {"size", size}, {"data_bytes", data_bytes}, {"message", message}};
}

}  // namespace

void add_image_commands(ControlDispatcher& d, core::ExportTable& exports, boost::asio::thread_pool& blocking) {
  auto ctx = std::make_shared<const Context>(Context{exports, blocking});
  d.add("export-image", "write a full raw image of an export to a file, sparse where zero {name, path, force?}",
        [ctx](const Json& req) { return export_image(ctx, req); });
}

}  // namespace blockway::gateway
