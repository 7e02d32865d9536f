#include "nbd/kernel_netlink.hpp"

#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>

namespace blockway::nbd {

namespace {

// One netlink message under construction: header, genl header, attributes.
class Message {
 public:
  Message(uint16_t family, uint8_t cmd) {
    buf_.resize(NLMSG_HDRLEN + GENL_HDRLEN);
    auto* nh = header();
    nh->nlmsg_type = family;
    nh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    auto* gh = reinterpret_cast<genlmsghdr*>(buf_.data() + NLMSG_HDRLEN);
    gh->cmd = cmd;
    gh->version = 1;
  }
  void put(uint16_t type, const void* data, size_t len) {
    const size_t at = buf_.size();
    buf_.resize(at + NLA_ALIGN(NLA_HDRLEN + len));
    auto* a = reinterpret_cast<nlattr*>(buf_.data() + at);
    a->nla_type = type;
    a->nla_len = static_cast<uint16_t>(NLA_HDRLEN + len);
    if (len > 0) std::memcpy(buf_.data() + at + NLA_HDRLEN, data, len);  // a nest header has no data (nullptr)
  }
  void put_u32(uint16_t type, uint32_t v) { put(type, &v, sizeof v); }
  void put_u64(uint16_t type, uint64_t v) { put(type, &v, sizeof v); }
  void put_string(uint16_t type, const std::string& s) { put(type, s.c_str(), s.size() + 1); }
  size_t begin_nest(uint16_t type) {
    const size_t at = buf_.size();
    put(type | NLA_F_NESTED, nullptr, 0);
    return at;
  }
  void end_nest(size_t at) {
    reinterpret_cast<nlattr*>(buf_.data() + at)->nla_len = static_cast<uint16_t>(buf_.size() - at);
  }
  std::vector<char>& finish() {
    header()->nlmsg_len = static_cast<uint32_t>(buf_.size());
    return buf_;
  }

 private:
  nlmsghdr* header() { return reinterpret_cast<nlmsghdr*>(buf_.data()); }
  std::vector<char> buf_;
};

struct Attr {
  uint16_t type;
  const char* data;
  size_t len;
};

std::vector<Attr> parse_attrs(const char* p, size_t len) {
  std::vector<Attr> out;
  while (len >= NLA_HDRLEN) {
    const auto* a = reinterpret_cast<const nlattr*>(p);
    if (a->nla_len < NLA_HDRLEN || a->nla_len > len) break;
    out.push_back({static_cast<uint16_t>(a->nla_type & NLA_TYPE_MASK), p + NLA_HDRLEN, static_cast<size_t>(a->nla_len) - NLA_HDRLEN});
    const size_t step = NLA_ALIGN(a->nla_len);
    if (step >= len) break;
    p += step;
    len -= step;
  }
  return out;
}

uint32_t attr_u32(const Attr& a) {
  uint32_t v = 0;
  std::memcpy(&v, a.data, std::min(a.len, sizeof v));
  return v;
}

class Socket {
 public:
  Socket() {
    fd_ = ::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (fd_ < 0) throw KernelNbdError(errno, std::string("cannot open a netlink socket: ") + std::strerror(errno));
    timeval tv{10, 0};  // the kernel answers at once; never hang on it
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  ~Socket() { ::close(fd_); }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  // Sends and collects the replies (payload of each non-error message) until
  // the acknowledgement. Returns 0 or the kernel's errno.
  int transact(Message& m, std::vector<std::vector<char>>* replies) {
    auto& buf = m.finish();
    reinterpret_cast<nlmsghdr*>(buf.data())->nlmsg_seq = ++seq_;
    sockaddr_nl kernel{};
    kernel.nl_family = AF_NETLINK;
    if (::sendto(fd_, buf.data(), buf.size(), 0, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel) < 0)
      return errno;
    std::vector<char> rbuf(64 * 1024);
    for (;;) {
      const ssize_t n = ::recv(fd_, rbuf.data(), rbuf.size(), 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      size_t left = static_cast<size_t>(n);
      for (auto* nh = reinterpret_cast<nlmsghdr*>(rbuf.data()); NLMSG_OK(nh, left); nh = NLMSG_NEXT(nh, left)) {
        if (nh->nlmsg_seq != seq_) continue;
        if (nh->nlmsg_type == NLMSG_ERROR) {
          const auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(nh));
          return -err->error;  // 0: the acknowledgement
        }
        if (nh->nlmsg_type == NLMSG_DONE) return 0;
        if (replies) {
          const char* data = static_cast<const char*>(NLMSG_DATA(nh));
          replies->emplace_back(data, data + (nh->nlmsg_len - NLMSG_HDRLEN));
        }
      }
    }
  }

 private:
  int fd_;
  uint32_t seq_ = 0;
};

// The "nbd" family's id; a clear error when the module is not loaded.
uint16_t nbd_family(Socket& sock) {
  Message m(GENL_ID_CTRL, CTRL_CMD_GETFAMILY);
  m.put_string(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
  std::vector<std::vector<char>> replies;
  const int err = sock.transact(m, &replies);
  if (err == ENOENT)
    throw KernelNbdError(ENOENT, "the kernel has no NBD netlink interface: load the nbd module (modprobe nbd)");
  if (err) throw KernelNbdError(err, std::string("cannot look up the kernel's NBD interface: ") + std::strerror(err));
  for (const auto& r : replies) {
    if (r.size() < GENL_HDRLEN) continue;
    for (const auto& a : parse_attrs(r.data() + GENL_HDRLEN, r.size() - GENL_HDRLEN))
      if (a.type == CTRL_ATTR_FAMILY_ID && a.len >= 2) {
        uint16_t id = 0;
        std::memcpy(&id, a.data, 2);
        return id;
      }
  }
  throw KernelNbdError(EPROTO, "the kernel did not name the NBD netlink family's id");
}

std::string device_name(uint32_t index) { return "/dev/nbd" + std::to_string(index); }

[[noreturn]] void fail(int err, const std::string& what, std::optional<uint32_t> index) {
  std::string where = index ? device_name(*index) : std::string("a free /dev/nbd device");
  std::string hint;
  if (err == EPERM || err == EACCES) hint = " (attaching NBD devices needs root or CAP_SYS_ADMIN)";
  else if (err == EBUSY) hint = " (the device is in use: pick another, or leave it to the kernel)";
  else if (err == EINVAL && index) hint = " (no such device: the nbd module's nbds_max may be lower)";
  throw KernelNbdError(err, what + " " + where + ": " + std::strerror(err) + hint);
}

void put_sockets(Message& m, const std::vector<int>& sockets) {
  const size_t list = m.begin_nest(NBD_ATTR_SOCKETS);
  for (int fd : sockets) {
    const size_t item = m.begin_nest(NBD_SOCK_ITEM);
    m.put_u32(NBD_SOCK_FD, static_cast<uint32_t>(fd));
    m.end_nest(item);
  }
  m.end_nest(list);
}

}  // namespace

uint32_t KernelNbd::connect(const KernelConnect& p) {
  Socket sock;
  Message m(nbd_family(sock), NBD_CMD_CONNECT);
  if (p.index) m.put_u32(NBD_ATTR_INDEX, *p.index);
  m.put_u64(NBD_ATTR_SIZE_BYTES, p.size_bytes);
  m.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, p.block_size);
  m.put_u64(NBD_ATTR_SERVER_FLAGS, p.server_flags);
  if (p.timeout_s) m.put_u64(NBD_ATTR_TIMEOUT, p.timeout_s);
  if (p.dead_conn_timeout_s) m.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, p.dead_conn_timeout_s);
  put_sockets(m, p.sockets);
  std::vector<std::vector<char>> replies;
  if (const int err = sock.transact(m, &replies)) fail(err, "cannot connect", p.index);
  for (const auto& r : replies) {
    if (r.size() < GENL_HDRLEN) continue;
    for (const auto& a : parse_attrs(r.data() + GENL_HDRLEN, r.size() - GENL_HDRLEN))
      if (a.type == NBD_ATTR_INDEX) return attr_u32(a);
  }
  if (p.index) return *p.index;
  throw KernelNbdError(EPROTO, "the kernel connected a device but did not say which");
}

void KernelNbd::reconfigure(uint32_t index, const std::vector<int>& sockets, uint64_t dead_conn_timeout_s) {
  Socket sock;
  Message m(nbd_family(sock), NBD_CMD_RECONFIGURE);
  m.put_u32(NBD_ATTR_INDEX, index);
  if (dead_conn_timeout_s) m.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_s);
  put_sockets(m, sockets);
  if (const int err = sock.transact(m, nullptr)) fail(err, "cannot give new sockets to", index);
}

void KernelNbd::disconnect(uint32_t index) {
  Socket sock;
  Message m(nbd_family(sock), NBD_CMD_DISCONNECT);
  m.put_u32(NBD_ATTR_INDEX, index);
  if (const int err = sock.transact(m, nullptr)) fail(err, "cannot disconnect", index);
}

std::optional<bool> KernelNbd::connected(uint32_t index) {
  Socket sock;
  Message m(nbd_family(sock), NBD_CMD_STATUS);
  m.put_u32(NBD_ATTR_INDEX, index);
  std::vector<std::vector<char>> replies;
  const int err = sock.transact(m, &replies);
  if (err == EINVAL || err == ENOENT) return std::nullopt;
  if (err) fail(err, "cannot ask the status of", index);
  // [DEVICE_LIST [DEVICE_ITEM [INDEX] [CONNECTED]]]
  for (const auto& r : replies) {
    if (r.size() < GENL_HDRLEN) continue;
    for (const auto& list : parse_attrs(r.data() + GENL_HDRLEN, r.size() - GENL_HDRLEN)) {
      if (list.type != NBD_ATTR_DEVICE_LIST) continue;
      for (const auto& item : parse_attrs(list.data, list.len)) {
        std::optional<uint32_t> idx;
        bool conn = false;
        for (const auto& f : parse_attrs(item.data, item.len)) {
          if (f.type == NBD_DEVICE_INDEX) idx = attr_u32(f);
          if (f.type == NBD_DEVICE_CONNECTED) conn = f.len > 0 && f.data[0] != 0;
        }
        if (idx == index) return conn;
      }
    }
  }
  return std::nullopt;
}

std::optional<uint32_t> parse_nbd_device(const std::string& text) {
  std::string_view s = text;
  if (s.starts_with("/dev/")) s.remove_prefix(5);
  if (s.starts_with("nbd")) s.remove_prefix(3);
  if (s.empty() || s.size() > 6) return std::nullopt;
  uint32_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

}  // namespace blockway::nbd
