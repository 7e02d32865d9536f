// The directory side of a mount: probing the directory (which a hung FUSE
// mount there can block for as long as it hangs), detaching a stale mount,
// and ending a session without unmounting by path again.
//
// Thread model: free functions with no shared state. Calls that may wait for
// whatever is mounted at the directory run on a thread of their own, bounded
// by a timeout; what they find is acted on by the caller's thread.
#pragma once

#include <chrono>
#include <string>
#include <vector>

struct fuse_session;

namespace spdlog {
class logger;
}

namespace blockway::fuse {

// Resolves `where` (absolute, symlinks resolved), detaches a stale FUSE mount
// left there by a daemon that died (ENOTCONN), creates the directory if it is
// missing, and checks that it is a directory; returns the resolved path.
// Throws std::runtime_error naming the directory: a live FUSE mount there, a
// directory that does not answer within `timeout`, anything unusable.
std::string prepare_mount_point(const std::string& where, std::chrono::milliseconds timeout, spdlog::logger& log);

// The file system types mounted at dir (canonical) right now, as listed in
// /proc/self/mountinfo ("fuse.blockway", "tmpfs"), bottom first.
std::vector<std::string> mount_types(const std::string& dir);

// Lazily detaches the mount at dir: umount2(MNT_DETACH) as root, else
// fusermount3 -u -z. Blocks (a hung mount): call from the blocking pool.
bool detach_mount(const std::string& dir);

// The write end of a pipe whose read end is closed (it polls POLLERR), or
// -1: made when a session is mounted, for end_session().
int make_dead_end();

// Ends a session whose mount is already gone (umount, or a lazy detach that
// open files outlive), without unmounting anything by path; closes
// dead_end. Any thread; no reader may be using the session any more.
void end_session(fuse_session* session, int dead_end);

}  // namespace blockway::fuse
