// poll_until: the synchronous twin of FdWatcher, for the blocking steps of
// setting a session up (connect, handshake, login, mount, open) at start-up
// and on the blocking pool when reconnecting. It drives a library's "fd +
// wanted events + service" API with poll() until the step is done or the
// deadline passes, so a server that accepts and then says nothing cannot
// hold a thread.
//
// `Lib` provides: bool done() (the step finished, well or not); int fd()
// (-1 while there is none); short events() (POLLIN/POLLOUT, 0 for none);
// bool service(short revents) (false: the library failed). service() is
// also called after a poll() that timed out (revents 0), so a library can
// run its own timers.
//
// An open its caller gives up on (the daemon stops, or a control command
// waits for a background retry) ends within a slice: the caller sets
// `cancel_opens_when` on its thread around the open (CancelOpensWhen), and
// poll_until() asks it between polls.
//
// Thread model: the calling thread only; the library handle is not shared.
#pragma once

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <functional>
#include <thread>
#include <utility>

namespace blockway::remote::common {

enum class PollEnd {
  done,       // lib.done() holds
  timed_out,  // the deadline passed first
  failed,     // lib.service() failed, or poll() did (errno is left set)
  cancelled,  // this thread's cancel_opens_when said so
};

// Asked between polls on this thread; empty: never cancelled.
inline thread_local std::function<bool()> cancel_opens_when;

// Sets cancel_opens_when for its scope (the blocking pool's thread is reused).
class CancelOpensWhen {
 public:
  explicit CancelOpensWhen(std::function<bool()> test) : saved_(std::exchange(cancel_opens_when, std::move(test))) {}
  ~CancelOpensWhen() { cancel_opens_when = std::move(saved_); }
  CancelOpensWhen(const CancelOpensWhen&) = delete;
  CancelOpensWhen& operator=(const CancelOpensWhen&) = delete;

 private:
  std::function<bool()> saved_;
};

template <class Lib>
PollEnd poll_until(Lib& lib, std::chrono::steady_clock::time_point deadline,
                   std::chrono::milliseconds slice = std::chrono::milliseconds(100)) {
  using namespace std::chrono;
  while (!lib.done()) {
    const auto left = duration_cast<milliseconds>(deadline - steady_clock::now());
    if (left.count() <= 0) return PollEnd::timed_out;
    if (cancel_opens_when && cancel_opens_when()) return PollEnd::cancelled;
    const int wait = static_cast<int>(std::min(left, slice).count());
    pollfd p{lib.fd(), lib.events(), 0};
    if (p.fd < 0 || p.events == 0) {
      // Nothing to wait for on a socket: let the library's timers run.
      std::this_thread::sleep_for(milliseconds(std::min(wait, 10)));
    } else if (::poll(&p, 1, wait) < 0) {
      if (errno != EINTR) return PollEnd::failed;
      p.revents = 0;
    }
    if (!lib.service(p.revents)) return PollEnd::failed;
  }
  return PollEnd::done;
}

}  // namespace blockway::remote::common
