#include "remote/aoe/aoe_discovery.hpp"

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <vector>

namespace blockway::remote::aoe {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kResendInterval = std::chrono::milliseconds(250);

// Tags for discovery frames: distinct per call, with the top bit set so they
// never collide with the session's slot tags of the same process.
std::atomic<uint32_t> discovery_tag{0x80000000u};

std::string errno_text(int e) { return std::strerror(e); }

enum class Verdict { ignore, done };

// Sends `frame` to `dst` every kResendInterval until `accept` returns done
// for an answer or the deadline passes (returns ETIMEDOUT).
int exchange(const PacketSocket& s, const Mac& dst, std::span<const std::byte> frame, Clock::time_point deadline,
             const std::function<Verdict(std::span<const std::byte>, const Mac& from)>& accept) {
  std::vector<std::byte> buf(65536);
  auto next_send = Clock::now();
  for (;;) {
    auto now = Clock::now();
    if (now >= deadline) return ETIMEDOUT;
    if (now >= next_send) {
      const int e = send_frame(s, dst, frame);
      if (e != 0 && e != EAGAIN && e != ENOBUFS) return e;
      next_send = now + kResendInterval;
    }
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(std::min(deadline, next_send) - now);
    pollfd p{s.fd.get(), POLLIN, 0};
    const int rc = ::poll(&p, 1, static_cast<int>(std::max<int64_t>(wait.count(), 1)));
    if (rc < 0 && errno != EINTR) return errno;
    if (rc <= 0) continue;
    for (;;) {
      sockaddr_ll from{};
      socklen_t fromlen = sizeof from;
      const ssize_t n = ::recvfrom(s.fd.get(), buf.data(), buf.size(), MSG_DONTWAIT | MSG_TRUNC,
                                   reinterpret_cast<sockaddr*>(&from), &fromlen);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        return errno;
      }
      if (from.sll_pkttype == PACKET_OUTGOING || static_cast<size_t>(n) > buf.size() || from.sll_halen != 6)
        continue;
      Mac mac{};
      std::memcpy(mac.data(), from.sll_addr, mac.size());
      if (accept(std::span<const std::byte>(buf.data(), static_cast<size_t>(n)), mac) == Verdict::done) return 0;
    }
  }
}

}  // namespace

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string missing_capability_message(const std::string& interface) {
  return "cannot open a raw AF_PACKET socket on " + interface +
         ": permission denied. blockwayd needs CAP_NET_RAW (or root) for aoe:// exports: run it as root, "
         "grant the capability with `setcap cap_net_raw+ep /path/to/blockwayd`, or set "
         "AmbientCapabilities=CAP_NET_RAW in its systemd unit";
}

DiscoverResult open_packet_socket(const AoeAddress& address) {
  DiscoverResult r;
  const unsigned ifindex = ::if_nametoindex(address.interface.c_str());
  if (ifindex == 0) {
    r.err = ENODEV;
    r.message = "no network interface '" + address.interface + "' (see `ip link`)";
    return r;
  }
  // Protocol 0 until bound: no frame of another interface slips in before bind().
  const int fd = ::socket(AF_PACKET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    r.err = errno;
    r.message = (r.err == EPERM || r.err == EACCES) ? missing_capability_message(address.interface)
                                                     : "cannot open an AF_PACKET socket: " + errno_text(r.err);
    return r;
  }
  r.socket.fd.reset(fd);
  r.socket.ifindex = static_cast<int>(ifindex);
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, address.interface.c_str(), IFNAMSIZ - 1);
  if (::ioctl(fd, SIOCGIFFLAGS, &ifr) < 0) {
    r.err = errno;
    r.message = "cannot read the flags of interface " + address.interface + ": " + errno_text(r.err);
    return r;
  }
  if (!(ifr.ifr_flags & IFF_UP)) {
    r.err = ENETDOWN;
    r.message = "network interface " + address.interface + " is down (ip link set " + address.interface + " up)";
    return r;
  }
  if (::ioctl(fd, SIOCGIFMTU, &ifr) < 0) {
    r.err = errno;
    r.message = "cannot read the MTU of interface " + address.interface + ": " + errno_text(r.err);
    return r;
  }
  r.socket.mtu = static_cast<unsigned>(std::max(ifr.ifr_mtu, 0));
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(kEtherType);
  sll.sll_ifindex = static_cast<int>(ifindex);
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&sll), sizeof sll) < 0) {
    r.err = errno;
    r.message = "cannot bind an AF_PACKET socket to " + address.interface + ": " + errno_text(r.err);
    return r;
  }
  // Our own frames are not answers; don't even queue them (Linux >= 4.20).
  const int one = 1;
  (void)::setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
  // Room for a full window of jumbo answers even if the loop is slow to read.
  // SO_RCVBUFFORCE passes net.core.rmem_max when we may (CAP_NET_ADMIN).
  const int rcvbuf = 4 << 20;
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
    (void)::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  return r;
}

int send_frame(const PacketSocket& s, const Mac& dst, std::span<const std::byte> frame) noexcept {
  sockaddr_ll to{};
  to.sll_family = AF_PACKET;
  to.sll_protocol = htons(kEtherType);
  to.sll_ifindex = s.ifindex;
  to.sll_halen = 6;
  std::memcpy(to.sll_addr, dst.data(), dst.size());
  const ssize_t n =
      ::sendto(s.fd.get(), frame.data(), frame.size(), 0, reinterpret_cast<const sockaddr*>(&to), sizeof to);
  return n < 0 ? errno : 0;
}

DiscoverResult discover(const AoeAddress& address, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  DiscoverResult r = open_packet_socket(address);
  if (r.err != 0) return r;
  const std::string target_name = "shelf " + std::to_string(address.shelf) + " slot " +
                                  std::to_string(address.slot) + " on " + address.interface;

  // 1. Query Config, broadcast to SHELF.SLOT: who serves it, and its limits.
  std::array<std::byte, kConfigHeaderSize> query{};
  const uint32_t qtag = discovery_tag.fetch_add(1) | 0x80000000u;
  encode_query_config(query, address.shelf, address.slot, qtag);
  std::string target_error;
  int e = exchange(r.socket, kBroadcastMac, query, deadline, [&](std::span<const std::byte> p, const Mac& from) {
    auto h = decode_header(p);
    if (!h || !(h->flags & kFlagResponse) || h->command != Command::query_config || h->tag != qtag ||
        h->shelf != address.shelf || h->slot != address.slot)
      return Verdict::ignore;
    if (h->flags & kFlagError) {
      target_error = error_name(h->error);
      return Verdict::ignore;
    }
    auto c = decode_config(p);
    if (!c) return Verdict::ignore;
    r.target.mac = from;
    r.target.config = *c;
    return Verdict::done;
  });
  if (e != 0) {
    r.err = e == ETIMEDOUT ? EHOSTUNREACH : e;
    r.message = e == ETIMEDOUT
                    ? "no AoE target answered Query Config for " + target_name + " within " +
                          std::to_string(timeout.count()) + " ms" +
                          (target_error.empty() ? "" : " (it answered with an error: " + target_error + ")") +
                          "; is the target (e.g. vblade " + std::to_string(address.shelf) + " " +
                          std::to_string(address.slot) + " IFACE FILE) running on that network segment?"
                    : "Query Config on " + address.interface + " failed: " + errno_text(e);
    return r;
  }
  r.target.sectors_per_frame = sectors_per_frame(r.target.config.sector_count, r.socket.mtu);
  if (r.target.sectors_per_frame == 0) {
    r.err = EMSGSIZE;
    r.message = "the MTU of " + address.interface + " (" + std::to_string(r.socket.mtu) +
                ") cannot carry one 512-byte sector per AoE frame";
    return r;
  }

  // 2. IDENTIFY DEVICE, unicast to the target that answered.
  std::array<std::byte, kAtaHeaderSize> ident{};
  const uint32_t itag = discovery_tag.fetch_add(1) | 0x80000000u;
  Header h;
  h.shelf = address.shelf;
  h.slot = address.slot;
  h.command = Command::ata;
  h.tag = itag;
  AtaArgs a;
  a.sector_count = 1;
  a.cmd_status = kAtaIdentify;
  encode_ata(ident, h, a);
  std::string failure;
  e = exchange(r.socket, r.target.mac, ident, deadline, [&](std::span<const std::byte> p, const Mac& from) {
    auto rh = decode_header(p);
    if (!rh || from != r.target.mac || !(rh->flags & kFlagResponse) || rh->command != Command::ata ||
        rh->tag != itag || rh->shelf != address.shelf || rh->slot != address.slot)
      return Verdict::ignore;
    auto ra = decode_ata(p);
    if (rh->flags & kFlagError) {
      failure = std::string("AoE error: ") + error_name(rh->error);
      return Verdict::done;
    }
    if (!ra || p.size() < kAtaHeaderSize + kSectorSize) return Verdict::ignore;
    if (ra->cmd_status & (kAtaStatusErr | kAtaStatusDf)) {
      failure = "ATA status " + std::to_string(ra->cmd_status) + ", error " + std::to_string(ra->err_feature);
      return Verdict::done;
    }
    auto info = parse_identify(p.subspan(kAtaHeaderSize, kSectorSize));
    if (!info) return Verdict::ignore;
    r.target.identify = *info;
    return Verdict::done;
  });
  if (e != 0 || !failure.empty()) {
    r.err = e == 0 ? EIO : (e == ETIMEDOUT ? EHOSTUNREACH : e);
    r.message = "AoE target " + format_mac(r.target.mac) + " (" + target_name + ") " +
                (failure.empty() ? "did not answer ATA IDENTIFY DEVICE within " + std::to_string(timeout.count()) +
                                       " ms"
                                 : "refused ATA IDENTIFY DEVICE: " + failure);
    return r;
  }
  const IdentifyInfo& id = r.target.identify;
  if (id.logical_sector_size != kSectorSize) {
    r.err = ENOTSUP;
    r.message = "AoE target " + target_name + " has " + std::to_string(id.logical_sector_size) +
                "-byte logical sectors; only 512 is supported";
    return r;
  }
  if (id.sectors == 0) {
    r.err = EIO;
    r.message = "AoE target " + target_name + " reports a size of 0 sectors";
    return r;
  }
  r.target.flush_command = id.flush_ext ? kAtaFlushCacheExt : kAtaFlushCache;
  return r;
}

}  // namespace blockway::remote::aoe
