#include "fuse/mount_point.hpp"

#include "fuse/libfuse.hpp"

#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

extern char** environ;

namespace blockway::fuse {

namespace {

// Runs fn on a thread of its own and waits for it at most `timeout`;
// nullopt if it has not finished by then. fn must own everything it uses: on
// a timeout it runs on, detached (a probe of a hung FUSE mount waits until
// that mount's connection ends, or until the process exits).
template <class T>
std::optional<T> run_bounded(std::function<T()> fn, std::chrono::milliseconds timeout) {
  auto task = std::make_shared<std::packaged_task<T()>>(std::move(fn));
  auto result = task->get_future();
  std::thread([task] { (*task)(); }).detach();
  if (result.wait_for(timeout) != std::future_status::ready) return std::nullopt;
  return result.get();
}

// What mount() needs to know of the directory, from calls that wait for
// whatever is mounted there.
struct DirProbe {
  std::string path;        // absolute, symlinks resolved
  bool fuse_mount = false;  // a FUSE mount is listed at path
  int statvfs_errno = 0;    // of statvfs(path)
};

DirProbe probe_dir(const std::string& where) {
  DirProbe p;
  std::error_code fec;
  p.path = std::filesystem::absolute(where, fec).lexically_normal().string();
  if (p.path.size() > 1 && p.path.back() == '/') p.path.pop_back();
  // Resolve symlinks once, here: every check and the mount itself then name
  // the same directory (mountinfo lists canonical paths), and a stale-mount
  // detach cannot be pointed elsewhere through a link.
  if (auto canonical = std::filesystem::weakly_canonical(p.path, fec); !fec) p.path = canonical.string();
  if (p.path.size() > 1 && p.path.back() == '/') p.path.pop_back();
  const auto types = mount_types(p.path);
  p.fuse_mount = std::any_of(types.begin(), types.end(), [](const std::string& t) { return t.starts_with("fuse"); });
  // A daemon that died without unmounting leaves a mount that answers
  // nothing (ENOTCONN). stat() may still succeed from cached attributes;
  // statfs() always asks the daemon.
  struct statvfs vfs{};
  p.statvfs_errno = ::statvfs(p.path.c_str(), &vfs) == 0 ? 0 : errno;
  return p;
}

}  // namespace

std::vector<std::string> mount_types(const std::string& dir) {
  std::vector<std::string> types;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string id, parent, devno, root, mnt;
    fields >> id >> parent >> devno >> root >> mnt;
    // Unescape \040 and friends (three octal digits) in the mount point.
    std::string path;
    for (size_t i = 0; i < mnt.size(); ++i) {
      if (mnt[i] == '\\' && i + 3 < mnt.size()) {
        path += static_cast<char>(((mnt[i + 1] - '0') << 6) | ((mnt[i + 2] - '0') << 3) | (mnt[i + 3] - '0'));
        i += 3;
      } else {
        path += mnt[i];
      }
    }
    if (path != dir) continue;
    const auto sep = line.find(" - ");
    if (sep == std::string::npos) continue;
    std::istringstream after(line.substr(sep + 3));
    std::string type;
    after >> type;
    types.push_back(type);
  }
  return types;
}

std::string prepare_mount_point(const std::string& where, std::chrono::milliseconds timeout, spdlog::logger& log) {
  auto hung = [&](const std::string& path) {
    return std::runtime_error("FUSE: " + path + " did not answer within " + std::to_string(timeout.count()) +
                              " ms (a hung mount there, e.g. a FUSE server that is stopped?); not mounted");
  };
  // Only calls that may wait for a mount at DIR run bounded, on a thread of
  // their own; what they find is acted on here (an abandoned probe changes
  // nothing).
  const auto probed = run_bounded<DirProbe>([where] { return probe_dir(where); }, timeout);
  if (!probed) {
    std::error_code fec;
    throw hung(std::filesystem::absolute(where, fec).lexically_normal().string());
  }
  const std::string path = probed->path;
  if (probed->fuse_mount || probed->statvfs_errno != 0) {
    const int e = probed->fuse_mount && probed->statvfs_errno == 0 ? EEXIST : probed->statvfs_errno;
    if (probed->fuse_mount && e == EEXIST)
      throw std::runtime_error("FUSE: " + path + " is already a FUSE mount (another blockwayd running?)");
    if (probed->fuse_mount && (e == ENOTCONN || e == ECONNABORTED)) {
      // Only a FUSE mount listed at this very path: a dead mount found by
      // following a symlink elsewhere is not ours to take down.
      log.warn("FUSE: {} is a stale mount ({}); detaching it", path, std::strerror(e));
      if (!detach_mount(path)) throw std::runtime_error("FUSE: cannot detach the stale mount at " + path);
    } else if (e == ENOENT) {
      std::error_code fec;
      std::filesystem::create_directories(path, fec);
      if (fec) throw std::runtime_error("FUSE: cannot create " + path + ": " + fec.message());
    } else if (e != 0) {
      throw std::runtime_error("FUSE: cannot use " + path + ": " + std::strerror(e));
    }
  }
  struct Stat {
    int err = 0;
    mode_t mode = 0;
  };
  const auto st = run_bounded<Stat>(
      [path] {
        struct stat s{};
        return ::stat(path.c_str(), &s) == 0 ? Stat{0, s.st_mode} : Stat{errno, 0};
      },
      timeout);
  if (!st) throw hung(path);
  if (st->err != 0) throw std::runtime_error("FUSE: cannot use " + path + ": " + std::strerror(st->err));
  if (!S_ISDIR(st->mode)) throw std::runtime_error("FUSE: " + path + " is not a directory");
  return path;
}

bool detach_mount(const std::string& dir) {
  if (::umount2(dir.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0) return true;
  pid_t pid = 0;
  const char* argv[] = {"fusermount3", "-u", "-z", dir.c_str(), nullptr};
  if (::posix_spawnp(&pid, "fusermount3", nullptr, nullptr, const_cast<char* const*>(argv), environ) != 0)
    return false;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int make_dead_end() {
  int p[2] = {-1, -1};
  if (::pipe2(p, O_CLOEXEC) != 0) return -1;
  ::close(p[0]);
  return p[1];
}

// fuse_session_unmount() would poll the /dev/fuse descriptor and, finding
// the connection alive (files still open on a detached mount),
// umount2(MNT_DETACH) the directory once more as root: whatever has been
// mounted there since would go. So the descriptor is swapped, in place, for
// the dead end (the write end of a pipe without a reader), which polls
// POLLERR ("already unmounted" to libfuse): closing the /dev/fuse
// descriptor ends the connection (open files then get ENOTCONN), and
// libfuse's unmount closes the pipe instead. dead_end was made when the
// session was mounted, so this cannot fail for want of a descriptor.
void end_session(fuse_session* session, int dead_end) {
  const int fd = fuse_session_fd(session);
  if (fd >= 0 && dead_end >= 0) (void)::dup3(dead_end, fd, O_CLOEXEC);
  if (dead_end >= 0) ::close(dead_end);
  fuse_session_unmount(session);  // polls POLLERR: closes the descriptor, unmounts nothing
  fuse_session_destroy(session);
}

}  // namespace blockway::fuse
