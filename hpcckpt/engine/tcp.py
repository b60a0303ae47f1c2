"""TCP sockets of a computation: listening sockets, connections between processes of the job (with the bytes
in flight in both directions), unconnected sockets, and connections to peers outside the job.

No TCP_REPAIR (it needs CAP_NET_ADMIN and cannot move a connection to another host): like DMTCP, the data in
flight is *drained* while every process is frozen and *refilled* afterwards, and at restart a connection is
made anew between the two restored ends.

Drain (agent, processes frozen, `Drainer`): the agent takes a copy of each connected socket (pidfd_getfd) and
sends a random 16-byte marker on it, behind whatever the process had queued; the other end's copy is read
until that marker arrives. Everything before the marker is what the process at that end had yet to read - no
matter whether it sat in its receive queue, on the wire or in the sender's send queue. When the peer can no
longer write (it shut down its side), the receive queue is only peeked up to the end of file, because nothing
could send it again.

Refill (resume without restart): each end's drained bytes are sent again from the other end, so they arrive in
the same order, before anything the processes write once they run.

Restart (`TcpSocket.create`): a listening socket is bound to its address again; a connection between two
processes of the job is connected again - through the job's own listener when it still has one, else through
a stand-in listener on the server end's address - from the client end's original address when it is free, and
its bytes are sent again from the other end. A connection to a peer outside the job cannot be reconnected: it
comes back as a connection the peer has closed (its unread bytes are still readable, then end of file), and a
warning says so.

The drain/refill design extends across hosts: both ends' agents run the same marker exchange on their own
copies; only the pairing of ends at restart needs the coordinator (see docs/design.md).
"""
from __future__ import annotations

import base64
import ipaddress
import logging
import os
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass, field

from .fdtable import FdEntry, UnsupportedFd, list_fds
from .linux import pidfd_getfd

log = logging.getLogger(__name__)

# kernel TCP states (include/net/tcp_states.h)
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, \
    CLOSING = range(1, 12)
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
               7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
CONNECTED = {ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING}
WE_WRITE = {ESTABLISHED, CLOSE_WAIT}            # states in which this end has not shut down writing
PEER_WRITES = {ESTABLISHED, FIN_WAIT1, FIN_WAIT2}  # states in which the other end has not (no FIN received)
SO_PEEK_OFF = 42
SO_RCVBUFFORCE = 33
SO_BUF_LOCK = 72            # Linux 5.14: read/set the buffer-size locks (SOCK_SNDBUF_LOCK 1, SOCK_RCVBUF_LOCK 2)
MARKER_PREFIX = b"\xffhpcckpt"
DRAIN_TIMEOUT = 30.0

# options restored on every socket: (level, name, key)
BOOL_OPTS = [(socket.SOL_SOCKET, socket.SO_REUSEADDR, "reuseaddr"),
             (socket.SOL_SOCKET, socket.SO_REUSEPORT, "reuseport"),
             (socket.SOL_SOCKET, socket.SO_KEEPALIVE, "keepalive"),
             (socket.IPPROTO_TCP, socket.TCP_NODELAY, "nodelay")]
INT_OPTS = [(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, "keepidle"),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, "keepintvl"),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, "keepcnt")]


@dataclass
class TcpInfo:
    """One TCP socket as /proc/net/tcp{,6} shows it."""
    ino: int
    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    tx_queue: int
    rx_queue: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))


def _addr4(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    return str(ipaddress.IPv4Address(bytes.fromhex(host)[::-1])), int(port, 16)


def _addr6(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, 32, 8))
    return str(ipaddress.IPv6Address(raw)), int(port, 16)


def tcp_table(pid: int | str = "self") -> dict[int, TcpInfo]:
    """Every TCP socket of pid's network namespace with an inode (sockets no fd holds have inode 0)."""
    out: dict[int, TcpInfo] = {}
    for name, family, conv in (("tcp", socket.AF_INET, _addr4), ("tcp6", socket.AF_INET6, _addr6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            p = line.split()
            ino = int(p[9])
            if ino == 0:
                continue
            tx, rx = (int(x, 16) for x in p[4].split(":"))
            out[ino] = TcpInfo(ino, family, conv(p[1]), conv(p[2]), int(p[3], 16), tx, rx)
    return out


def _norm(addr: tuple[str, int]) -> tuple[str, int]:
    """Addresses compared across families: ::ffff:a.b.c.d is a.b.c.d."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), addr[1]


def find_peer(info: TcpInfo, table: dict[int, TcpInfo], inos: set[int]) -> int | None:
    """The inode (among inos) of the other end of a connection, if both ends are in this namespace."""
    want_local, want_remote = _norm(info.remote), _norm(info.local)
    for ino in inos:
        o = table.get(ino)
        if o is not None and ino != info.ino and o.state in CONNECTED | {SYN_RECV} \
                and _norm(o.local) == want_local and _norm(o.remote) == want_remote:
            return ino
    return None


def _copy(pid: int, fd: int) -> socket.socket:
    pidfd = os.pidfd_open(pid)
    try:
        return socket.socket(fileno=pidfd_getfd(pidfd, fd))
    finally:
        os.close(pidfd)


def _options(sk: socket.socket, family: int) -> dict:
    opts = {}
    for level, name, key in BOOL_OPTS + INT_OPTS:
        try:
            opts[key] = sk.getsockopt(level, name)
        except OSError:
            pass
    if family == socket.AF_INET6:
        opts["v6only"] = sk.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    onoff, linger = struct.unpack("ii", sk.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    if onoff:
        opts["linger"] = linger
    opts["rcvbuf"], opts["buf_lock"] = _buf_state(sk)
    opts["sndbuf"] = sk.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return opts


def _peek_all(sk: socket.socket, until_eof: bool, timeout: float) -> bytes:
    """The socket's receive queue, not consumed. until_eof: wait for the end of file (the peer has shut down
    writing, so the rest of its data is on its way)."""
    old = sk.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    parts: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                data = sk.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not until_eof or time.monotonic() > deadline:
                    break
                select.select([sk], [], [], 0.05)
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            parts.append(data)
    finally:
        sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)
    return b"".join(parts)


@dataclass
class Drained:
    """What one connected socket had yet to read at the checkpoint."""
    data: bytes = b""
    consumed: bool = False        # taken out of the socket (must be refilled to resume)
    peer: int | None = None       # the other end's inode when it belongs to the job


@dataclass
class _End:
    info: TcpInfo
    pid: int
    fd: int
    sk: socket.socket
    peer: int | None
    drained: Drained = field(default_factory=Drained)
    buf: bytearray = field(default_factory=bytearray)
    to_send: bytes = b""
    done: bool = False


class Drainer:
    """Drains every TCP connection of a frozen computation, and refills them (resume path)."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.ends: dict[int, _End] = {}
        self.refilled = False

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> dict[int, Drained]:
        table = tcp_table(self.pids[0]) if self.pids else {}
        held: dict[int, tuple[int, int]] = {}
        for pid in self.pids:
            for e in list_fds(pid):
                if stat.S_ISSOCK(e.mode) and e.ino in table:
                    held.setdefault(e.ino, (pid, e.fd))
        for ino, (pid, fd) in held.items():
            info = table[ino]
            if info.state not in CONNECTED:
                continue
            self.ends[ino] = _End(info, pid, fd, _copy(pid, fd), find_peer(info, table, set(held)))
        marker = MARKER_PREFIX + os.urandom(8)
        for end in self.ends.values():
            end.drained.peer = end.peer
            if end.peer is None:
                # a peer outside the job: nothing may be sent to it; keep a copy of what is queued here
                end.drained.data = _peek_all(end.sk, False, 0)
                end.done = True
            elif end.info.state not in PEER_WRITES:
                # the peer shut down writing: its last bytes are on their way to us, then end of file
                end.drained.data = _peek_all(end.sk, True, timeout)
                end.done = True
            if end.info.state in WE_WRITE and end.peer is not None and \
                    self.ends.get(end.peer) is not None and self.ends[end.peer].info.state in PEER_WRITES:
                end.to_send = marker
        self._pump(marker, timeout)
        return {ino: e.drained for ino, e in self.ends.items()}

    def _pump(self, marker: bytes, timeout: float) -> None:
        """Send every pending marker and read every connection up to its peer's marker."""
        deadline = time.monotonic() + timeout
        while True:
            readers = [e for e in self.ends.values() if not e.done]
            writers = [e for e in self.ends.values() if e.to_send]
            if not readers and not writers:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                e = (readers or writers)[0]
                raise UnsupportedFd(f"pid {e.pid} fd {e.fd}: TCP connection {e.info.local} -> {e.info.remote} "
                                    f"could not be drained in {timeout:.0f} s")
            r, w, _ = select.select([e.sk for e in readers], [e.sk for e in writers], [], min(left, 1.0))
            for e in writers:
                if e.sk in w:
                    try:
                        n = e.sk.send(e.to_send, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                        e.to_send = e.to_send[n:]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        e.to_send = b""
            for e in readers:
                if e.sk not in r:
                    continue
                try:
                    data = e.sk.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                e.drained.consumed = True
                if not data:                     # end of file before the marker: the peer closed
                    e.done = True
                    e.drained.data = bytes(e.buf)
                    continue
                e.buf += data
                if e.buf.endswith(marker):
                    e.done = True
                    e.drained.data = bytes(e.buf[:-len(marker)])

    def refill(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Put every consumed byte back, sent again from the other end (before the processes run again)."""
        if self.refilled:
            return
        self.refilled = True
        jobs = []
        for e in self.ends.values():
            if e.drained.consumed and e.drained.data:
                sender = self.ends.get(e.peer) if e.peer is not None else None
                if sender is None:
                    log.error("pid %d fd %d: %d drained TCP bytes have no sender", e.pid, e.fd,
                              len(e.drained.data))
                    continue
                jobs.append((sender.sk, e.sk, e.drained.data))
        _send_all(jobs, timeout)

    def close(self) -> None:
        for e in self.ends.values():
            e.sk.close()
        self.ends.clear()


def _send_all(jobs: list[tuple[socket.socket, socket.socket, bytes]], timeout: float,
              after: dict[int, tuple[int, int]] | None = None) -> None:
    """Send each (sender, receiver, bytes) without blocking on any one of them: nobody reads until we are
    done, so each receiver's buffer is made to hold all of its bytes first, then set back (to its size and
    autotuning lock as they were, or as `after` gives them by receiver fd) - the kernel keeps what is queued
    beyond a smaller buffer, it only accepts nothing more until the process has read it down."""
    before = {}
    for _, rcv, data in jobs:
        if rcv.fileno() not in before:
            before[rcv.fileno()] = (after or {}).get(rcv.fileno()) or _buf_state(rcv)
        _set_rcvbuf(rcv, len(data) * 2 + 262144, grow_only=True)
    pending = [[snd, memoryview(data)] for snd, _, data in jobs if data]
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnsupportedFd(f"TCP: could not send {sum(len(p[1]) for p in pending)} bytes back into "
                                    f"{len(pending)} connection(s) in {timeout:.0f} s (receive buffer too small; "
                                    f"an unprivileged agent cannot grow it beyond net.core.rmem_max)")
            _, w, _ = select.select([], [p[0] for p in pending], [], min(left, 1.0))
            for p in list(pending):
                if p[0] in w:
                    try:
                        n = p[0].send(p[1], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                        p[1] = p[1][n:]
                    except BlockingIOError:
                        continue
                    if not len(p[1]):
                        pending.remove(p)
    finally:
        for _, rcv, _ in jobs:
            if rcv.fileno() in before:
                size, lock = before.pop(rcv.fileno())
                _set_rcvbuf(rcv, size, grow_only=False)
                _set_lock(rcv, lock)


def _buf_state(sk: socket.socket) -> tuple[int, int]:
    """(receive buffer size, SO_BUF_LOCK bits) of a socket."""
    try:
        lock = sk.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
    except OSError:
        lock = -1
    return sk.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), lock


def _set_rcvbuf(sk: socket.socket, size: int, grow_only: bool) -> None:
    """Set the kernel's receive buffer size to `size` bytes (the kernel doubles what it is given)."""
    if grow_only and sk.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= size:
        return
    try:
        sk.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size // 2)
    except OSError:          # without CAP_NET_ADMIN: as much as net.core.rmem_max allows
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size // 2)


def _set_lock(sk: socket.socket, lock: int) -> None:
    """Put back the SO_BUF_LOCK bits: setting SO_RCVBUF above locked the size, which stops autotuning."""
    if lock >= 0:
        try:
            sk.setsockopt(socket.SOL_SOCKET, SO_BUF_LOCK, lock)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------- dump --
class TcpSocket:
    KIND = "tcp"
    _cache: dict = {}

    @staticmethod
    def reset() -> None:
        TcpSocket._cache.clear()

    @staticmethod
    def _table(pid: int) -> dict[int, TcpInfo]:
        t = TcpSocket._cache.get("table")
        if t is None:
            t = TcpSocket._cache["table"] = tcp_table(pid)
        return t

    @staticmethod
    def matches(e: FdEntry) -> bool:
        if not stat.S_ISSOCK(e.mode):
            return False
        t = TcpSocket._table(e.pid)
        if e.ino not in t:                    # created since we read the table?
            t = TcpSocket._cache["table"] = tcp_table(e.pid)
        return e.ino in t

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        table = TcpSocket._table(e.pid)
        info = table[e.ino]
        where = f"{e.where()}: TCP socket {info.local[0]}:{info.local[1]}"
        if info.state in (SYN_SENT, SYN_RECV):
            raise UnsupportedFd(f"{where} is still connecting ({info.state_name}); try again")
        if info.state == LISTEN and info.rx_queue:
            raise UnsupportedFd(f"{where} has {info.rx_queue} connection(s) not yet accepted; try again")
        sk = _copy(e.pid, e.fd)
        try:
            opts = _options(sk, info.family)
            bound = info.local[1] != 0
            if info.state == CLOSE and bound:
                try:
                    name = sk.getsockname()
                    bound = name[1] != 0
                except OSError:
                    pass
            state = {"kind": "tcp", "ino": e.ino, "family": info.family, "state": info.state,
                     "state_name": info.state_name, "local": list(info.local), "remote": list(info.remote),
                     "bound": bound, "flags": e.flags, "opts": opts, "peer": None, "data": "", "where": where}
            if info.state in CONNECTED:
                drained = (getattr(ctx, "drained", None) or {}).get(e.ino)
                if drained is None:            # dumped without a drain (a lone process): what is queued here
                    peer = find_peer(info, table, {x.ino for x in ctx.entries.values()})
                    if peer is not None and table[peer].tx_queue:
                        log.warning("%s: dumped without a drain; %d bytes still in the peer's send queue are "
                                    "not saved", where, table[peer].tx_queue)
                    drained = Drained(_peek_all(sk, False, 0), False, peer)
                state["peer"] = drained.peer
                if len(drained.data) > 4096:       # bulk data goes into image chunks, not the metadata
                    ctx.blobs[oid] = drained.data
                    state["data_blob"] = True
                else:
                    state["data"] = base64.b64encode(drained.data).decode()
                if drained.peer is None:
                    log.warning("%s is connected to %s:%d outside the computation: after a restart it will be a "
                                "connection that peer has closed", where, *info.remote)
        finally:
            sk.close()
        ctx.add(oid, state, min(x.pid for x in ofd))

    # -------------------------------------------------------------------------------------------- restore --
    @staticmethod
    def create(factory, s: dict) -> int:
        made = factory.extra.setdefault("tcp-by-ino", {})
        if s["ino"] in made:
            return made.pop(s["ino"])
        _blobs.clear()
        for o in factory.objects.values():
            if o.get("kind") == "tcp" and o.get("data_blob") and o["ino"] in (s["ino"], s.get("peer")):
                _blobs[o["id"]] = factory.read_blob(o["id"])
        if s["state"] == LISTEN:
            sk = _new(s)
            _bind(sk, s, required=True)
            sk.listen(socket.SOMAXCONN)
            return _finish(sk, s)
        if s["state"] not in CONNECTED:            # created, maybe bound, never connected (or reset)
            sk = _new(s)
            if s["bound"]:
                _bind(sk, s, required=False)
            return _finish(sk, s)
        peer = None
        if s["peer"] is not None:
            peer = next((o for o in factory.objects.values() if o.get("kind") == "tcp"
                         and o.get("ino") == s["peer"]), None)
            if peer is None:
                raise UnsupportedFd(f"{s['where']}: the other end of its connection (socket {s['peer']}) is in no "
                                    f"image given (restart needs every image of the checkpoint)")
        if peer is None:
            return _finish(_closed_by_peer(s), s)
        mine, theirs = _connect_pair(factory, s, peer)
        # each end's unread bytes come again from the other end; shut-down sides are shut again after
        _send_all([(theirs, mine, _data(s)), (mine, theirs, _data(peer))], DRAIN_TIMEOUT,
                  after={mine.fileno(): _buf_after(s), theirs.fileno(): _buf_after(peer)})
        for sk, st in ((mine, s), (theirs, peer)):
            if st["state"] not in WE_WRITE:
                sk.shutdown(socket.SHUT_WR)
        made[peer["ino"]] = factory.high(_finish(theirs, peer))
        return _finish(mine, s)


_blobs: dict[str, bytes] = {}      # object id -> bulk data read from its image, during one create()


def _data(s: dict) -> bytes:
    if s.get("data_blob"):
        return _blobs[s["id"]]
    return base64.b64decode(s.get("data") or "")


def _new(s: dict) -> socket.socket:
    sk = socket.socket(s["family"], socket.SOCK_STREAM)
    if s["family"] == socket.AF_INET6 and "v6only" in s["opts"]:
        sk.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, s["opts"]["v6only"])
    return sk


def _sockaddr(s: dict, addr) -> tuple:
    host, port = addr
    return (host, port, 0, 0) if s["family"] == socket.AF_INET6 else (host, port)


def _bind(sk: socket.socket, s: dict, required: bool, addr=None) -> bool:
    """Bind to the socket's original address. A listener must get it back (its clients know it); a client's
    own port is kept when it is free."""
    addr = addr or s["local"]
    sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # old connections may linger in TIME_WAIT
    try:
        sk.bind(_sockaddr(s, addr))
        return True
    except OSError as e:
        if required:
            raise UnsupportedFd(f"{s['where']}: cannot bind to {addr[0]}:{addr[1]} again: {e.strerror}") from None
        log.info("%s: port %d is taken; restored on another port", s["where"], addr[1])
        return False


def _finish(sk: socket.socket, s: dict) -> int:
    """Options and flags as they were; returns the fd."""
    _lock_sndbuf(sk, s)
    for level, name, key in BOOL_OPTS + INT_OPTS:
        if key in s["opts"]:
            try:
                sk.setsockopt(level, name, s["opts"][key])
            except OSError:
                pass
    if "linger" in s["opts"]:
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, s["opts"]["linger"]))
    import fcntl
    fd = sk.detach()
    fcntl.fcntl(fd, fcntl.F_SETFL, s["flags"] & os.O_NONBLOCK)
    os.set_inheritable(fd, False)
    return fd


def _buf_after(s: dict) -> tuple[int, int]:
    """Receive buffer size and lock for a restored socket: the original's size only where the program had
    fixed it (SO_RCVBUF locks it); else the default, left to autotuning as the original was."""
    lock = s["opts"].get("buf_lock", -1)
    if lock > 0 and lock & 2:
        return s["opts"]["rcvbuf"], lock
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        return int(f.read().split()[1]), max(lock, 0)


def _lock_sndbuf(sk: socket.socket, s: dict) -> None:
    """A send buffer size the program had fixed (SO_SNDBUF) is fixed again."""
    lock = s["opts"].get("buf_lock", -1)
    if lock > 0 and lock & 1 and "sndbuf" in s["opts"]:
        try:
            sk.setsockopt(socket.SOL_SOCKET, 32, s["opts"]["sndbuf"] // 2)      # SO_SNDBUFFORCE
        except OSError:
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s["opts"]["sndbuf"] // 2)


def _connect_pair(factory, s: dict, peer: dict) -> tuple[socket.socket, socket.socket]:
    """Two connected sockets standing for s and its peer (mine, theirs): the client end connects to the
    server end's address - through the job's listener there if it has one, else a stand-in."""
    def listener_at(addr):
        a = _norm(tuple(addr))
        return next((o for o in factory.objects.values() if o.get("kind") == "tcp" and o["state"] == LISTEN
                     and (_norm(tuple(o["local"])) == a
                          or (o["local"][1] == a[1] and ipaddress.ip_address(o["local"][0]).is_unspecified))),
                    None)
    if listener_at(s["local"]) is not None:
        server, client = s, peer
    elif listener_at(peer["local"]) is not None:
        server, client = peer, s
    else:          # no listener left: the end with the lower port was most likely the server
        server, client = (s, peer) if s["local"][1] <= peer["local"][1] else (peer, s)
    lst = listener_at(server["local"])
    temp = None
    if lst is not None:
        lsk = socket.socket(fileno=os.dup(factory.fd_for(lst["id"])))
    else:
        temp = lsk = _new(server)
        if not _bind(lsk, server, required=False):
            lsk.bind(_sockaddr(server, (server["local"][0], 0)))
        lsk.listen(1)
    try:
        csk = _new(client)
        if client["bound"]:
            _bind(csk, client, required=False)
        target = lsk.getsockname()
        csk.connect(target)
        lsk.setblocking(True)
        ssk, _ = _accept_from(lsk, csk)
    finally:
        if lst is not None:
            lsk.setblocking(not (lst["flags"] & os.O_NONBLOCK))   # the shared file's flags as they were
        lsk.close()
    del temp
    return (ssk, csk) if server is s else (csk, ssk)


def _accept_from(lsk: socket.socket, csk: socket.socket) -> tuple[socket.socket, tuple]:
    """Accept the connection csk just made (the job's listener has no other one queued: dump refuses
    listeners with connections not yet accepted)."""
    want = csk.getsockname()
    r, _, _ = select.select([lsk], [], [], 10)
    if not r:
        raise UnsupportedFd(f"TCP: connection to {lsk.getsockname()} was not accepted in 10 s")
    ssk, addr = lsk.accept()
    if _norm(addr[:2]) != _norm(want[:2]):
        ssk.close()
        raise UnsupportedFd(f"TCP: listener {lsk.getsockname()} accepted {addr}, not the restored end {want}")
    return ssk, addr


def _closed_by_peer(s: dict) -> socket.socket:
    """A connection whose (outside) peer has closed: the bytes it had not read, then end of file."""
    lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsk.bind(("127.0.0.1", 0))
    lsk.listen(1)
    csk = _new({"family": socket.AF_INET, "opts": {}})
    try:
        csk.connect(lsk.getsockname())
        ssk, _ = lsk.accept()
    finally:
        lsk.close()
    _send_all([(ssk, csk, _data(s))], DRAIN_TIMEOUT, after={csk.fileno(): _buf_after(s)})
    ssk.close()
    log.warning("%s: its peer %s:%d was outside the computation; restored as closed by that peer",
                s["where"], *s["remote"])
    return csk


def describe_inet(e: FdEntry) -> str | None:
    """'UDP socket' etc. for the error message about an INET socket we do not handle."""
    for name in ("udp", "udp6", "raw", "raw6"):
        try:
            with open(f"/proc/{e.pid}/net/{name}") as f:
                if any(line.split()[9] == str(e.ino) for line in f.read().splitlines()[1:]):
                    return name.rstrip("6").upper() + " socket"
        except (FileNotFoundError, IndexError):
            continue
    return None

