"""TCP basics shared by the drain (tcpdrain.py), the dump/restore handler (tcp.py) and the rewiring of
connections between hosts at restart (tcpwire.py): the kernel's socket table, copies of a process's socket,
reading a receive queue without consuming it, receive-buffer sizing, and the byte exchange through which two
agents put back each other's drained bytes."""
from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import socket
import struct
import termios
import time
from dataclasses import dataclass
from typing import Any

from ...errors import UnsupportedFd
from ...linux import pidfd_getfd

# kernel TCP states (include/net/tcp_states.h)
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, \
    CLOSING = range(1, 12)
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
               7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
CONNECTED = {ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING}
WE_WRITE = {ESTABLISHED, CLOSE_WAIT}            # states in which this end has not shut down writing
PEER_WRITES = {ESTABLISHED, FIN_WAIT1, FIN_WAIT2}  # states in which the other end has not (no FIN received)
SO_PEEK_OFF = 42
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
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


def norm(addr: tuple[str, int]) -> tuple[str, int]:
    """Addresses compared across families: ::ffff:a.b.c.d is a.b.c.d."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), addr[1]


def find_peer(info: TcpInfo, table: dict[int, TcpInfo], inos: set[int]) -> int | None:
    """The inode (among inos) of the other end of a connection, if both ends are in this namespace."""
    want_local, want_remote = norm(info.remote), norm(info.local)
    for ino in inos:
        o = table.get(ino)
        if o is not None and ino != info.ino and o.state in CONNECTED | {SYN_RECV} \
                and norm(o.local) == want_local and norm(o.remote) == want_remote:
            return ino
    return None


def copy_socket(pid: int, fd: int) -> socket.socket:
    pidfd = os.pidfd_open(pid)
    try:
        return socket.socket(fileno=pidfd_getfd(pidfd, fd))
    finally:
        os.close(pidfd)


def socket_options(sk: socket.socket, family: int) -> dict:
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
    opts["rcvbuf"], opts["buf_lock"] = buf_state(sk)
    opts["sndbuf"] = sk.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return opts


def peek_all(sk: socket.socket, until_eof: bool, timeout: float) -> bytes:
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


def send_all(jobs: list[tuple[socket.socket, socket.socket, bytes]], timeout: float,
              after: dict[int, tuple[int, int]] | None = None) -> None:
    """Send each (sender, receiver, bytes) without blocking on any one of them: nobody reads until we are
    done, so each receiver's buffer is made to hold all of its bytes first, then set back (to its size and
    autotuning lock as they were, or as `after` gives them by receiver fd) - the kernel keeps what is queued
    beyond a smaller buffer, it only accepts nothing more until the process has read it down."""
    before = {}
    for _, rcv, data in jobs:
        if rcv.fileno() not in before:
            before[rcv.fileno()] = (after or {}).get(rcv.fileno()) or buf_state(rcv)
        set_rcvbuf(rcv, len(data) * 2 + 262144, grow_only=True)
    pending: list[list[Any]] = [[snd, memoryview(data)] for snd, _, data in jobs if data]   # [socket, left]
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
                set_rcvbuf(rcv, size, grow_only=False)
                set_lock(rcv, lock)


def buf_state(sk: socket.socket) -> tuple[int, int]:
    """(receive buffer size, SO_BUF_LOCK bits) of a socket."""
    try:
        lock = sk.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
    except OSError:
        lock = -1
    return sk.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), lock


def set_rcvbuf(sk: socket.socket, size: int, grow_only: bool) -> None:
    """Set the kernel's receive buffer size to `size` bytes (the kernel doubles what it is given)."""
    if grow_only and sk.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= size:
        return
    try:
        sk.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size // 2)
    except OSError:          # without CAP_NET_ADMIN: as much as net.core.rmem_max allows
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size // 2)


def set_lock(sk: socket.socket, lock: int) -> None:
    """Put back the SO_BUF_LOCK bits: setting SO_RCVBUF above locked the size, which stops autotuning."""
    if lock >= 0:
        try:
            sk.setsockopt(socket.SOL_SOCKET, SO_BUF_LOCK, lock)
        except OSError:
            pass


def unread(sk: socket.socket) -> int:
    """Bytes in the socket's receive queue (SIOCINQ)."""
    return struct.unpack("i", fcntl.ioctl(sk.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


class Exchange:
    """One end of a connection whose other end another agent holds, putting back the bytes each end had not
    read. Each agent sends [8-byte length][its end's bytes] on its end, reads exactly the other's, and sends
    those back: they arrive at the other end's receive queue, in order, ahead of anything the processes write
    once they run (those come later on the same stream). Both agents run this at once (a barrier phase)."""

    def __init__(self, sk: socket.socket, mine: bytes, where: str, shut_after: bool = False):
        self.sk, self.mine, self.where, self.shut_after = sk, mine, where, shut_after
        self.out = memoryview(struct.pack("<Q", len(mine)) + mine)
        self.head = bytearray()
        self.theirs = bytearray()
        self.want: int | None = None
        self.echo: memoryview | None = None

    def wants_read(self) -> bool:
        return self.want is None or len(self.theirs) < self.want

    def wants_write(self) -> bool:
        return bool(len(self.out)) or (self.echo is not None and bool(len(self.echo)))

    def on_read(self) -> None:
        n = 8 - len(self.head) if self.want is None else self.want - len(self.theirs)
        try:
            data = self.sk.recv(min(n, 1 << 20), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            raise UnsupportedFd(f"{self.where}: the other end closed during the byte exchange")
        if self.want is None:
            self.head += data
            if len(self.head) == 8:
                self.want = struct.unpack("<Q", bytes(self.head))[0]
        else:
            self.theirs += data
        if self.want is not None and len(self.theirs) == self.want:
            self.echo = memoryview(bytes(self.theirs))

    def on_write(self) -> None:
        view = self.out if len(self.out) else self.echo    # ours first: the other end reads it before the echo
        if view is None:
            return
        try:
            n = self.sk.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return
        if view is self.out:
            self.out = self.out[n:]
        else:
            self.echo = view[n:]

    def sent(self) -> bool:
        return not self.wants_read() and not self.wants_write()

    def arrived(self) -> bool:
        return unread(self.sk) >= len(self.mine)


def run_exchanges(exchanges: list[Exchange], timeout: float) -> None:
    """Run every exchange to its end: our bytes sent and echoed, theirs echoed back, ours arrived. Receive
    buffers hold the echoed bytes meanwhile (set back afterwards, as send_all does)."""
    before = {}
    for x in exchanges:
        before[x.sk.fileno()] = buf_state(x.sk)
        set_rcvbuf(x.sk, len(x.mine) * 2 + 262144, grow_only=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            busy = [x for x in exchanges if not x.sent()]
            waiting = [x for x in exchanges if x.sent() and not x.arrived()]
            if not busy and not waiting:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                x = (busy or waiting)[0]
                raise UnsupportedFd(f"{x.where}: the other host did not complete the byte exchange in "
                                    f"{timeout:.0f} s")
            r, w, _ = select.select([x.sk for x in busy if x.wants_read()],
                                    [x.sk for x in busy if x.wants_write()], [], min(left, 0.05 if waiting else 1.0))
            for x in busy:
                if x.sk in w:
                    x.on_write()
                if x.sk in r:
                    x.on_read()
        for x in exchanges:
            if x.shut_after:
                x.sk.shutdown(socket.SHUT_WR)
    finally:
        for x in exchanges:
            size, lock = before.pop(x.sk.fileno())
            set_rcvbuf(x.sk, size, grow_only=False)
            set_lock(x.sk, lock)


# -------------------------------------------------------------------- TIME_WAIT leftovers of a killed job --
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 4, 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 1, 4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3


def _nl_exchange(msg_type: int, flags: int, req: bytes) -> list[tuple[int, bytes]]:
    """One sock_diag request; the answers as (type, body) until NLMSG_DONE or the ACK/error."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    try:
        s.send(struct.pack("<IHHII", 16 + len(req), msg_type, flags, 1, 0) + req)
        out = []
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, mtype = struct.unpack_from("<IH", data, off)
                if length < 16:
                    break
                body = data[off + 16: off + length]
                out.append((mtype, body))
                if mtype in (NLMSG_DONE, NLMSG_ERROR):
                    return out
                off += (length + 3) & ~3
    finally:
        s.close()


def _raw_ip(family: int, host: str) -> bytes:
    """An address as inet_diag_sockid carries it (16 bytes, network order)."""
    return socket.inet_pton(family, host).ljust(16, b"\0")


def _lookups(family: int, host: str) -> list[tuple[int, str | None]]:
    """(family, address or None for any) to look for TIME_WAIT connections in: an IPv6 wildcard or
    v4-mapped listener also conflicts with IPv4 connections (dual stack)."""
    if host in ("0.0.0.0", "::", ""):
        anywhere: list[tuple[int, str | None]] = [(family, None)]
        return anywhere + ([(socket.AF_INET, None)] if family == socket.AF_INET6 else [])
    if family == socket.AF_INET6 and ipaddress.IPv6Address(host).ipv4_mapped:
        return [(socket.AF_INET, str(ipaddress.IPv6Address(host).ipv4_mapped)), (family, host)]
    return [(family, host)]


def time_wait_holders(family: int, addr: tuple[str, int]) -> list[tuple[int, bytes]]:
    """(family, inet_diag_sockid) of every TIME_WAIT connection whose local end is on addr's port (and address,
    or either address is a wildcard): what keeps a listener from binding there again when the original
    listener did not set SO_REUSEADDR."""
    host, port = addr
    found = []
    for fam, want_host in _lookups(family, host):
        want = None if want_host is None else _raw_ip(fam, want_host)
        req = struct.pack("<BBBxI", fam, socket.IPPROTO_TCP, 0, 1 << TIME_WAIT) + bytes(48)
        for mtype, body in _nl_exchange(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req):
            if mtype != SOCK_DIAG_BY_FAMILY or len(body) < 52:
                continue
            state = body[1]
            sockid = body[4:52]
            sport = struct.unpack_from(">H", sockid, 0)[0]
            src = sockid[4:20]
            if state != TIME_WAIT or sport != port:
                continue
            if want is None or src == want or src == bytes(16):
                found.append((fam, sockid))
    return found


def clear_time_wait(family: int, addr: tuple[str, int]) -> tuple[int, int]:
    """Destroy (SOCK_DESTROY, needs CAP_NET_ADMIN) the TIME_WAIT connections on addr's port; returns
    (destroyed, still there)."""
    holders = time_wait_holders(family, addr)
    done = 0
    for family, sockid in holders:
        req = struct.pack("<BBBxI", family, socket.IPPROTO_TCP, 0, 1 << TIME_WAIT) + sockid
        try:
            answers = _nl_exchange(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)
        except OSError:
            continue
        err = next((struct.unpack_from("<i", b)[0] for t, b in answers if t == NLMSG_ERROR), -1)
        if err in (0, -2):             # destroyed, or gone meanwhile (ENOENT)
            done += 1
    return done, len(holders) - done
