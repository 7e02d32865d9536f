"""The peer servers blockwayd talks to in the integration tests, one class
each: nbdkit (NBD), tgt (iSCSI), nfs-ganesha with rpcbind (NFS; on the host
or in a private network namespace), vblade in a network namespace (AoE), a
one-node Ceph cluster on loopback (RBD).

Every peer is a PeerProcess:
  start()            starts it and waits (bounded) until it answers
  uri / uri(...)     what blockwayd's --export takes to reach it
  kill(), stop()     SIGKILL / SIGTERM by pid, then reap it
  restart()          kill and start again on the same address
  frozen()           holds it stopped for a with-block (harness.frozen)
  flush_observer()   counts the flushes that reached the peer itself, or None
  close()            what a test's cleanup calls
A test starts one with `remotes.started(test, peer)`, which registers
close() first. Names and ports are per test, so tests run in parallel.
"""

import functools
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import uuid

import harness

MiB = harness.MiB


def started(test, thing):
    """Registers thing.close() as a cleanup of test, then starts it."""
    test.addCleanup(thing.close)
    return thing.start()


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class PeerProcess:
    """A peer server a test started: `proc` is its Popen, `log_path` the file
    its output goes to (appended to across restarts)."""

    proc = None
    log_path = None

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail=4000):
        """The last `tail` characters of its log ("" before it wrote one)."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def _spawn(self, args, output=True):
        """Starts args with stdout and stderr appended to the log."""
        if not output:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            return self.proc
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self.proc

    def _wait_ready(self, ready, timeout, what, interval=0.02, exited=AssertionError):
        """Polls ready() until it is true; raises `exited` if the process ends
        first, AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise exited("%s exited with %d:\n%s" % (what, self.proc.returncode, self.log()))
            if ready():
                return self
            if time.monotonic() > deadline:
                raise AssertionError("%s did not answer within %.0fs:\n%s" % (what, timeout, self.log()))
            time.sleep(interval)

    def kill(self, sig=signal.SIGKILL):
        """Signals it by pid and reaps it; SIGKILL if it outlives `sig` by 15 s."""
        if self.running():
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)

    def stop(self):
        self.kill(signal.SIGTERM)

    def close(self):
        self.kill()

    def restart(self):
        self.kill()
        return self.start()

    def frozen(self):
        return harness.frozen(self.proc.pid)

    def flush_observer(self):
        return None


# ---- what reached the peer ------------------------------------------------------

class FlushObserver:
    """Counts the flushes a peer saw: mark() returns how many since the
    previous mark (or since the observer started). A with-block closes it."""

    def mark(self):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LogFlushes(FlushObserver):
    """Counts lines matching `pattern` that a peer appends to a log file."""

    def __init__(self, path, pattern):
        self.path = path
        self.pattern = re.compile(pattern, re.M)
        self.offset = self._size()

    def _size(self):
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def mark(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        # Only whole lines; a line being written counts at the next mark.
        text = text[:text.rfind(b"\n") + 1]
        self.offset += len(text)
        return len(self.pattern.findall(text.decode(errors="replace")))


class StraceFlushes(LogFlushes):
    """Calls that sync a file (fsync, fdatasync, sync_file_range, or what
    `pattern` matches among `syscalls`) of a process and all its threads,
    seen by strace, which writes each line before the traced thread goes
    on: a flush that was answered is already counted."""

    SYNCS = r"\b(?:fsync|fdatasync|sync_file_range)\("

    def __init__(self, pid, out_path, syscalls="fsync,fdatasync,sync_file_range", pattern=SYNCS,
                 timeout=10.0):
        if os.path.exists(out_path):
            os.unlink(out_path)
        self.proc = subprocess.Popen(["strace", "-f", "-e", "trace=" + syscalls, "-o", out_path,
                                      "-p", str(pid)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        # strace says "Process N attached [with M threads]" once it holds them all.
        ready, _, _ = select.select([self.proc.stderr], [], [], timeout)
        line = self.proc.stderr.readline() if ready else b""
        if b"attached" not in line:
            self.close()
            raise AssertionError("strace did not attach to pid %d within %.0fs: %r" % (pid, timeout, line))
        super().__init__(out_path, pattern)

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # detaches from the traced process
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc.stderr.close()


class AoeFlushSniffer(FlushObserver):
    """ATA FLUSH CACHE (EXT) requests on the host's end of an AoE link."""

    FLUSH_COMMANDS = (0xE7, 0xEA)

    def __init__(self, ifname):
        # ETH_P_ALL: only such taps see the frames the host sends.
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * MiB)
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)

    def mark(self):
        n = 0
        while True:
            try:
                frame = self.sock.recv(9100)
            except BlockingIOError:
                return n
            # Ethernet header (14), AoE header (10), then the ATA header: its
            # command byte is at offset 13 of the AoE part; response flag 0x08.
            if (len(frame) >= 14 + 22 and frame[12:14] == b"\x88\xa2" and frame[14 + 5] == 0
                    and not frame[14] & 0x08 and frame[14 + 13] in self.FLUSH_COMMANDS):
                n += 1

    def close(self):
        self.sock.close()


# ---- NBD: nbdkit ------------------------------------------------------------------

class Nbdkit(PeerProcess):
    """nbdkit's file plugin serving a file, on a TCP port or a Unix socket.
    With log_requests, its log filter writes every request to requests_log
    (flush_observer() and read_bytes() read it).

    nbdkit sets PR_SET_PDEATHSIG(SIGTERM): it shuts down when the *thread*
    that started it ends. Start it from a thread that outlives it (the test's
    main thread, or a helper thread joined only after the last use)."""

    def __init__(self, workdir, img, port=None, sock=None, filters=(), params=(), name="nbdkit",
                 log_requests=False, server_args=()):
        """server_args: nbdkit's own options (e.g. --tls=require ...)."""
        self.workdir = workdir
        self.server_args = list(server_args)
        self.img = img
        self.sock = sock
        self.port = None if sock else (port or harness.free_port())
        self.filters = list(filters)
        self.params = list(params)
        self.log_path = os.path.join(workdir, name + ".log")
        self.requests_log = None
        if log_requests:
            self.requests_log = os.path.join(workdir, name + "-requests.log")
            self.filters.append("log")
            self.params.append("logfile=" + self.requests_log)

    def start(self, timeout=10.0):
        args = ["nbdkit", "-f"]
        if self.sock:
            if os.path.exists(self.sock):
                os.unlink(self.sock)
            args += ["-U", self.sock]
        else:
            args += ["-i", "127.0.0.1", "-p", str(self.port)]
        args += self.server_args
        args += ["--filter=" + f for f in self.filters]
        args += ["file", self.img] + self.params
        self._spawn(args)
        return self._wait_ready(self._listens, timeout, "nbdkit")

    def _listens(self):
        try:
            if self.sock:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.sock)
            else:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    @property
    def uri(self):
        if self.sock:
            return "nbd+unix:///?socket=" + self.sock
        return "nbd://127.0.0.1:%d/" % self.port

    def requests(self):
        try:
            with open(self.requests_log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def read_bytes(self):
        """Bytes the remote was asked to read so far (needs log_requests)."""
        return sum(int(c, 0) for c in re.findall(r" Read id=\d+ offset=\S+ count=(\S+)", self.requests()))

    def flush_observer(self):
        """FLUSH requests and FUA writes, from the log filter."""
        if not self.requests_log:
            return None
        return LogFlushes(self.requests_log, r" (?:Flush id=\d+|Write id=\d+ .*fua=1) \.\.\.$")


# ---- iSCSI: tgt ------------------------------------------------------------------

IQN = "iqn.2026-11.io.blockway.test:disk1"


class TgtExited(AssertionError):
    pass


class Tgt(PeerProcess):
    """One tgtd with one target (tid 1), restartable on the same portal. Its
    control socket is numbered after the port (tgtd -C / tgtadm -C), so tgtds
    of tests running in parallel never meet."""

    def __init__(self, workdir, port=None, name="tgtd"):
        self.workdir = workdir
        self.port = port or harness.free_port()
        # tgtd's control-socket number (below 32768); a clash with another
        # tgtd makes ours exit at once, and start() then tries another.
        self.control = 1000 + self.port % 31000
        self.log_path = os.path.join(workdir, name + ".log")
        self.luns = []     # (lun, path, thin) to recreate on restart
        self.bstype = None  # tgt's backing store for every LUN (default rdwr; aio has no WRITE SAME)
        self.accounts = []  # (user, password)

    def tgtadm(self, *args, check=True):
        return harness.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi"] + list(args),
                           timeout=20, check=check)

    def start(self, timeout=10.0):
        for attempt in range(5):
            try:
                return self._start(timeout)
            except TgtExited:
                if attempt == 4:
                    raise
                self.control = random.randint(1000, 32000)

    def _answers(self):
        if self.tgtadm("--op", "show", "--mode", "target", check=False).returncode != 0:
            return False
        return port_open(self.port)

    def _start(self, timeout):
        self._spawn(["tgtd", "-f", "-C", str(self.control), "--iscsi", "portal=127.0.0.1:%d" % self.port])
        self._wait_ready(self._answers, timeout, "tgtd", interval=0.05, exited=TgtExited)
        self.tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", IQN)
        for lun, path, thin in self.luns:
            self._add_lun(lun, path, thin)
        for user, password in self.accounts:
            self._add_account(user, password)
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        return self

    def _add_lun(self, lun, path, thin):
        self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun), "-b", path,
                    *(("--bstype", self.bstype) if self.bstype else ()))
        if thin:
            self.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun),
                        "--params", "thin_provisioning=1")

    def _add_account(self, user, password):
        self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        self.tgtadm("--op", "bind", "--mode", "account", "--tid", "1", "--user", user)

    def add_lun(self, lun, path, thin=False):
        self.luns.append((lun, path, thin))
        if self.running():
            self._add_lun(lun, path, thin)

    def add_account(self, user, password):
        self.accounts.append((user, password))
        if self.running():
            self._add_account(user, password)

    def debug(self, on):
        harness.run(["tgtadm", "-C", str(self.control), "--op", "update", "--mode", "sys",
                     "--name", "debug", "--value", "on" if on else "off"], timeout=20)

    def uri(self, lun=1, auth=""):
        return "iscsi://%s127.0.0.1:%d/%s/%d" % (auth + "@" if auth else "", self.port, IQN, lun)

    def flush_observer(self):
        """tgt's rdwr backing store syncs the file for SYNCHRONIZE CACHE and FUA."""
        return StraceFlushes(self.pid, os.path.join(self.workdir, "tgtd-strace.out"))


# ---- NFS: nfs-ganesha and rpcbind --------------------------------------------------

class NetNamespace:
    """A private network namespace (loopback up) and mount namespace (a fresh
    tmpfs on /run, so a second rpcbind does not take the host's socket),
    held open by a process of ours; prefix() runs a command inside. The
    holder ends when its stdin closes, so a crashed test leaves nothing."""

    proc = None

    def start(self, timeout=10.0):
        self.proc = subprocess.Popen(
            ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs bwrun /run && mkdir -p /run/rpcbind && ip link set lo up && echo ready && exec cat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            err = self.proc.stderr.read1(4000) if self.proc.poll() is not None else b""
            self.close()
            raise AssertionError("no network namespace within %.0fs: %s" % (timeout, err.decode(errors="replace")))
        return self

    def prefix(self, mount=False):
        """nsenter joins the namespaces and execs the command: its pid stays ours."""
        return ["nsenter", "-t", str(self.proc.pid), "-n"] + (["-m"] if mount else [])

    def listens(self, port):
        """Whether a TCP socket listens on `port` inside the namespace."""
        for name in ("tcp", "tcp6"):
            try:
                with open("/proc/%d/net/%s" % (self.proc.pid, name)) as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                            return True
            except FileNotFoundError:
                pass
        return False

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            self.proc.stdout.close()
            self.proc.stderr.close()


class Rpcbind(PeerProcess):
    """rpcbind for NFSv3's MOUNT protocol, on the host or inside netns."""

    def __init__(self, workdir, netns=None):
        self.netns = netns
        self.log_path = os.path.join(workdir, "rpcbind.log")

    def start(self, timeout=10.0):
        prefix = self.netns.prefix(mount=True) if self.netns else []
        self._spawn(prefix + ["rpcbind", "-w", "-f"])
        listens = (lambda: self.netns.listens(111)) if self.netns else (lambda: port_open(111))
        return self._wait_ready(listens, timeout, "rpcbind", interval=0.05)

    def close(self):
        self.kill(signal.SIGTERM)


def host_rpcbind(workdir):
    """Starts rpcbind on the host if none answers there; returns it, or None
    when one already ran (which is left alone)."""
    if port_open(111):
        return None
    return Rpcbind(workdir).start()


PSEUDO = "/bwexport"
RO_PSEUDO = "/bwro"


class Ganesha(PeerProcess):
    """nfs-ganesha (VFS FSAL) with two exports of directories under workdir:
    export/ read-write and roexport/ read-only. On the host it takes port
    2049 and the host's rpcbind (bench/remote_ab.py runs it so, inside a
    namespace of its own); with a NetNamespace it runs inside that, and so
    must blockwayd (netns.prefix()): see PrivateNfs."""

    def __init__(self, workdir, lease=None, netns=None):
        self.workdir = workdir
        self.netns = netns
        self.export_dir = os.path.join(workdir, "export")
        self.ro_dir = os.path.join(workdir, "roexport")
        os.makedirs(self.export_dir, exist_ok=True)
        os.makedirs(self.ro_dir, exist_ok=True)
        self.conf = os.path.join(workdir, "ganesha.conf")
        self.log_path = os.path.join(workdir, "ganesha.log")
        self.pid_file = os.path.join(workdir, "ganesha.pid")
        with open(self.conf, "w") as f:
            f.write("""
NFS_CORE_PARAM { Protocols = 3, 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; }
NFSv4 { Graceless = true; %s}
EXPORT { Export_Id = 1; Path = %s; Pseudo = %s; Access_Type = RW;
         Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; FSAL { Name = VFS; } }
EXPORT { Export_Id = 2; Path = %s; Pseudo = %s; Access_Type = RO;
         Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; FSAL { Name = VFS; } }
""" % ("Lease_Lifetime = %d; " % lease if lease else "", self.export_dir, PSEUDO, self.ro_dir, RO_PSEUDO))

    def prefix(self):
        return self.netns.prefix(mount=True) if self.netns else []

    def start(self, timeout=60.0):
        if not self.netns and port_open(2049):
            raise AssertionError("port 2049 is taken: another NFS server runs here")
        # ganesha logs to -L; its own stdout and stderr say nothing useful.
        self._spawn(self.prefix() + ["ganesha.nfsd", "-F", "-f", self.conf, "-L", self.log_path,
                                     "-p", self.pid_file], output=False)
        probes = ["nfs://127.0.0.1" + self.export_dir, "nfs://127.0.0.1%s?version=4" % PSEUDO]

        def answers():
            return all(subprocess.run(self.prefix() + ["nfs-ls", uri], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, timeout=10).returncode == 0
                       for uri in probes)
        try:
            return self._wait_ready(answers, timeout, "ganesha", interval=0.1)
        except AssertionError:
            self.kill()
            raise

    def kill(self, sig=signal.SIGKILL):
        super().kill(sig)
        self.proc = None

    def v3_uri(self, name, ro=False):
        return "nfs://127.0.0.1%s/%s" % (self.ro_dir if ro else self.export_dir, name)

    def v4_uri(self, name, ro=False):
        return "nfs://127.0.0.1%s/%s?version=4" % (RO_PSEUDO if ro else PSEUDO, name)

    def uri(self, version, name, ro=False):
        return self.v4_uri(name, ro) if version == 4 else self.v3_uri(name, ro)

    def file(self, name):
        return os.path.join(self.export_dir, name)

    def flush_observer(self):
        """ganesha's VFS FSAL syncs the file for COMMIT and stable WRITEs."""
        return StraceFlushes(self.pid, os.path.join(self.workdir, "ganesha-strace.out"))


class PrivateNfs:
    """rpcbind and ganesha in a network namespace of their own: no lock on
    port 2049 needed. `server` is the Ganesha; blockwayd runs with prefix()."""

    def __init__(self, workdir, lease=None):
        self.netns = NetNamespace()
        self.rpcbind = Rpcbind(workdir, self.netns)
        self.server = Ganesha(workdir, lease=lease, netns=self.netns)

    def start(self):
        self.netns.start()
        self.rpcbind.start()
        self.server.start()
        return self

    def prefix(self):
        return self.netns.prefix()

    def close(self):
        self.server.kill()
        self.rpcbind.close()
        self.netns.close()


# ---- AoE: vblade in a network namespace ----------------------------------------------

@functools.lru_cache(maxsize=None)
def can_make_netns():
    """Root, ip, and `ip netns add` works here."""
    if os.geteuid() != 0 or not harness.have("ip"):
        return False
    name = "bwchk%d" % os.getpid()
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    if p.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True


_aoe_names = itertools.count()


class AoeNet:
    """A named network namespace joined to the host by a veth pair; names
    carry the pid and a counter so parallel runs do not collide."""

    def __init__(self, mtu=1500):
        tag = "%d%d" % (os.getpid() % 100000, next(_aoe_names))
        self.mtu = mtu
        self.ns = "bwaoe" + tag
        self.host_if = "bwh" + tag   # blockwayd's end, in the host namespace
        self.peer_if = "bwp" + tag   # vblade's end, in the namespace

    def start(self):
        harness.run(["ip", "netns", "add", self.ns])
        harness.run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if])
        harness.run(["ip", "link", "set", self.peer_if, "netns", self.ns])
        harness.run(["ip", "link", "set", self.host_if, "mtu", str(self.mtu), "up"])
        self.ns_run(["ip", "link", "set", self.peer_if, "mtu", str(self.mtu), "up"])
        self.ns_run(["ip", "link", "set", "lo", "up"])
        return self

    def ns_run(self, cmd, **kw):
        return harness.run(["ip", "netns", "exec", self.ns] + list(cmd), **kw)

    def close(self):
        # Deleting the host end removes the pair; deleting the namespace
        # removes anything left in it.
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def mac(self, ifname, in_ns):
        cmd = ["cat", "/sys/class/net/%s/address" % ifname]
        out = (self.ns_run(cmd) if in_ns else harness.run(cmd)).stdout.decode().strip()
        return bytes(int(x, 16) for x in out.split(":"))


AOE_SHELF, AOE_SLOT = 3, 7


class Vblade(PeerProcess):
    """vblade serving img as AOE_SHELF.AOE_SLOT inside net's namespace. sync
    (-s) opens the file O_SYNC: vblade's ATA FLUSH does not sync by itself."""

    def __init__(self, workdir, net, img, sync=False, read_only=False):
        self.net = net
        self.img = img
        self.sync = sync
        self.read_only = read_only
        self.log_path = os.path.join(workdir, "vblade-%s.log" % net.ns)

    def start(self, timeout=10.0):
        args = ["ip", "netns", "exec", self.net.ns, "vblade"]
        if self.sync:
            args.append("-s")
        if self.read_only:
            args.append("-r")
        args += [str(AOE_SHELF), str(AOE_SLOT), self.net.peer_if, self.img]
        # `ip netns exec` execs vblade: this pid is vblade's.
        self._spawn(args)
        announced = re.compile(r"pid %d: e%d\.%d" % (self.proc.pid, AOE_SHELF, AOE_SLOT))
        return self._wait_ready(lambda: announced.search(self.log()), timeout, "vblade")

    @property
    def uri(self):
        return "aoe://%s/%d.%d" % (self.net.host_if, AOE_SHELF, AOE_SLOT)

    def flush_observer(self):
        """The ATA flush frames blockwayd sends (vblade logs nothing)."""
        return AoeFlushSniffer(self.net.host_if)


# ---- Ceph: a one-mon, one-OSD cluster on loopback, with cephx -----------------------

class RbdFlushes(FlushObserver):
    """The flushes librbd inside a client process (blockwayd) sent to the
    cluster: the `flush` perf counter of its images, read on the client's
    admin socket (the cluster's ceph.conf gives every client one)."""

    def __init__(self, cluster, pid, user="admin"):
        self.cluster = cluster
        self.pid = pid
        self.name = "client." + user
        self.last = self._count()

    def _count(self):
        dump = self.cluster.asok(self.pid, self.name, "perf", "dump")
        if dump is None:
            raise AssertionError("no admin socket answers for pid %d" % self.pid)
        return sum(v.get("flush", 0) for k, v in dump.items() if k.startswith("librbd-"))

    def mark(self):
        now = self._count()
        seen, self.last = now - self.last, now
        return seen


class CephDaemon(PeerProcess):
    """One Ceph daemon in the foreground (-f): its Popen pid is the daemon's."""

    def __init__(self, cluster, kind, ident):
        self.cluster = cluster
        self.kind = kind
        self.ident = ident
        self.log_path = os.path.join(cluster.dir, "%s.%s.out" % (kind, ident))

    def start(self, timeout=60.0):
        self._spawn(["ceph-%s" % self.kind, "-f", "-c", self.cluster.conf, "-i", self.ident])
        if self.kind == "osd":
            # The mon still counts a killed OSD as up: ask the new one itself,
            # then wait until its placement groups serve I/O again.
            self._wait_ready(lambda: self.cluster.daemon_state(self.proc.pid, "osd.0") == "active",
                             timeout, "ceph-osd", interval=0.1)
            if self.cluster.pool_ready:
                self._wait_ready(self.cluster.pgs_active, timeout, "the OSD's placement groups", interval=0.1)
        return self

    def kill(self, sig=signal.SIGKILL):
        # Wait on the pid itself: a killed daemon lingers as a zombie ~2 s.
        super().kill(sig)


class CephCluster:
    """A Ceph cluster of one mon, one mgr-less OSD (bluestore on a sparse file)
    and the pool `rbd`, everything under workdir/ceph on 127.0.0.1 with a mon
    port of its own (so modules can run in parallel), cephx on. One per test
    module: start() takes about 3-5 s. `conf` and `keyring` (client.admin)
    are what rbd:// URIs name; rbd(...) and ceph(...) run the tools."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "ceph")
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.keyring = os.path.join(self.dir, "client.admin", "keyring")
        self.port = harness.free_port()
        self.mon = CephDaemon(self, "mon", "a")
        self.osd = CephDaemon(self, "osd", "0")
        self.pool_ready = False

    def _write_conf(self, fsid):
        d = self.dir
        with open(self.conf, "w") as f:
            f.write("""[global]
fsid = %(fsid)s
mon host = [v2:127.0.0.1:%(port)d]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = %(d)s/$name/keyring
mon data = %(d)s/mon.$id
osd data = %(d)s/$name
run dir = %(d)s/run
admin socket = %(d)s/run/$name.$pid.asok
pid file = %(d)s/run/$name.pid
log file = %(d)s/log/$name.log
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 8
paxos propose interval = 0.1
[osd]
osd objectstore = bluestore
bluestore block size = 4G
bluestore block create = true
bluestore fsck on mkfs = false
bdev aio poll ms = 10
osd memory target = 1G
bluestore cache size = 128M
""" % {"fsid": fsid, "port": self.port, "d": d})

    def tool(self, name, *args, timeout=60, check=True):
        return harness.run([name, "-c", self.conf] + list(args), timeout=timeout, check=check)

    def ceph(self, *args, timeout=60, check=True):
        return self.tool("ceph", *args, timeout=timeout, check=check)

    def rbd(self, *args, timeout=120, check=True):
        return self.tool("rbd", *args, timeout=timeout, check=check)

    def start(self, timeout=60.0):
        d = self.dir
        for sub in ("run", "log", "client.admin", "osd.0"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        # Keyrings live outside mon.a: ceph-mon --mkfs does nothing on a non-empty dir.
        harness.run(["ceph-authtool", "--create-keyring", d + "/mon.keyring", "--gen-key", "-n", "mon.",
                     "--cap", "mon", "allow *"])
        harness.run(["ceph-authtool", "--create-keyring", self.keyring, "--gen-key", "-n", "client.admin",
                     "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                     "--cap", "mds", "allow *"])
        harness.run(["ceph-authtool", d + "/mon.keyring", "--import-keyring", self.keyring])
        harness.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                     "[v2:127.0.0.1:%d]" % self.port, d + "/monmap"])
        harness.run(["ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", d + "/monmap",
                     "--keyring", d + "/mon.keyring"])
        self.mon.start()
        secret = harness.run(["ceph-authtool", "--gen-print-key"]).stdout.decode().strip()
        with open(d + "/osd.json", "w") as f:
            json.dump({"cephx_secret": secret}, f)
        osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", osd_uuid, "-i", d + "/osd.json", timeout=timeout)
        harness.run(["ceph-authtool", "--create-keyring", d + "/osd.0/keyring", "--name", "osd.0",
                     "--add-key", secret])
        harness.run(["ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
                     "--osd-objectstore", "bluestore"], timeout=timeout)
        self.osd.start()
        self.ceph("osd", "pool", "create", "rbd", "8", "8")
        self.wait_osd_up(timeout)
        self.rbd("pool", "init", "rbd")
        self.pool_ready = True
        return self

    def admin_socket(self, pid, name):
        return os.path.join(self.dir, "run", "%s.%d.asok" % (name, pid))

    def asok(self, pid, name, *command, timeout=10):
        """A command on the admin socket of process `pid` (`name`: osd.0,
        client.admin...) as JSON, or None when it does not answer."""
        path = self.admin_socket(pid, name)
        if not os.path.exists(path):
            return None
        p = subprocess.run(["ceph", "--admin-daemon", path] + list(command), capture_output=True,
                           timeout=timeout)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def daemon_state(self, pid, name):
        status = self.asok(pid, name, "status")
        return status.get("state") if status else None

    def pgs_active(self):
        """Every placement group of pool rbd serves I/O again: listing the
        pool visits each (without a mgr, `ceph pg stat` would hang)."""
        return self.tool("rados", "--rados-osd-op-timeout", "2", "-p", "rbd", "ls", timeout=10,
                         check=False).returncode == 0

    def osd_up(self):
        p = self.ceph("osd", "stat", "-f", "json", timeout=10, check=False)
        return p.returncode == 0 and json.loads(p.stdout).get("num_up_osds") == 1

    def wait_osd_up(self, timeout=60.0):
        harness.wait_until(self.osd_up, timeout, interval=0.1, what="the OSD is up")

    def create_image(self, name, size, *extra):
        self.rbd("create", "--size", str(size) + "B", "rbd/" + name, *extra)
        return name

    def uri(self, image, user="", extra=""):
        u = "rbd://%srbd/%s?conf=%s&keyring=%s" % (user + "@" if user else "", image, self.conf, self.keyring)
        return u + ("&" + extra if extra else "")

    def image_path(self, image):
        """What qemu and rbd take for the image."""
        return "rbd:rbd/%s:conf=%s:keyring=%s" % (image, self.conf, self.keyring)

    def close(self):
        # The OSD first, then the mon; each by its own pid.
        self.osd.kill()
        self.mon.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
