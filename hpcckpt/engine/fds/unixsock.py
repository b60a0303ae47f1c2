"""UNIX domain sockets between processes of the computation: socketpairs and named (path or abstract)
stream, datagram and seqpacket sockets, listening sockets, with the data in flight.

Dump: the kernel's sock_diag netlink interface tells each socket's type, state, name, peer and shutdown
state. The data queued at a socket is read without consuming it: the agent takes a copy of the socket
(pidfd_getfd) and peeks with SO_PEEK_OFF stepping through the queue (one message at a time for datagram and
seqpacket sockets), then puts the socket's peek offset back.

Restore: pairs come back as socketpair(); a connection to a named listening socket comes back by connecting to
that socket again and accepting (so names, getpeername and the listener are as before); the queued data is
sent again from the peer, so it arrives in the same order. A socket connected to a process outside the
computation, a listening socket with unaccepted connections, and descriptors in flight (SCM_RIGHTS) are refused
at checkpoint time with a message naming the process and fd.
"""
from __future__ import annotations

import base64
import logging
import os
import socket
import stat
import struct

from ...image.fdstate import UnixState
from ..errors import UnsupportedFd
from ..linux import pidfd_getfd
from .base import FdKind
from .entry import FdEntry

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = 1, 4, 8, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_PEER, UNIX_DIAG_ICONS, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 2, 3, 4, 6
TCP_LISTEN = 10
SO_PEEK_OFF = 42
TYPES = {1: "stream", 2: "dgram", 5: "seqpacket"}
STYPE = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}


def sock_diag_unix() -> dict[int, dict]:
    """Every UNIX socket of this network namespace: inode -> {type, state, name, peer, icons, rqlen, shutdown}."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    try:
        # (the shutdown state comes with every answer, no flag needed)
        req = struct.pack("<BBHIII2I", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                          UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN, 0, 0)
        hdr = struct.pack("<IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        s.send(hdr + req)
        out: dict[int, dict] = {}
        while True:
            data = s.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, _, _ = struct.unpack_from("<IHHII", data, off)
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("<i", data, off + 16)[0]
                    raise OSError(err, f"sock_diag: {os.strerror(err)}")
                body = data[off + 16: off + length]
                fam, typ, state, _, ino = struct.unpack_from("<BBBBI", body)
                rec = {"type": TYPES.get(typ, str(typ)), "state": state, "name": None, "peer": 0, "icons": [],
                       "rqlen": (0, 0), "shutdown": 0}
                a = 16        # after struct unix_diag_msg (8 bytes) + cookie (8 bytes)
                while a + 4 <= len(body):
                    alen, atype = struct.unpack_from("<HH", body, a)
                    payload = body[a + 4: a + alen]
                    if atype == UNIX_DIAG_NAME:
                        rec["name"] = payload
                    elif atype == UNIX_DIAG_PEER:
                        rec["peer"] = struct.unpack_from("<I", payload)[0]
                    elif atype == UNIX_DIAG_ICONS:
                        rec["icons"] = list(struct.unpack(f"<{len(payload) // 4}I", payload))
                    elif atype == UNIX_DIAG_RQLEN:
                        rec["rqlen"] = struct.unpack_from("<II", payload)
                    elif atype == UNIX_DIAG_SHUTDOWN:
                        rec["shutdown"] = payload[0]
                    a += (alen + 3) & ~3
                out[ino] = rec
                off += (length + 3) & ~3
    finally:
        s.close()


def _peek_queue(pid: int, fd: int, kind: str) -> list[bytes]:
    """The data queued at a socket, without consuming it: whole messages for dgram/seqpacket, one blob for
    stream."""
    pidfd = os.pidfd_open(pid)
    try:
        mine = pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    sk = socket.socket(fileno=mine)
    try:
        old = sk.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        out: list[bytes] = []
        try:
            while True:
                try:
                    data = sk.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data and kind == "stream":
                    break
                out.append(data)
                if len(out) > 100000:
                    raise UnsupportedFd(f"pid {pid} fd {fd}: more than 100000 queued messages")
        finally:
            sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)
        return [b"".join(out)] if kind == "stream" and out else out
    finally:
        sk.close()


def _name_text(name: bytes | None) -> str | None:
    """A socket name as text: a path, or "@name" for the abstract namespace."""
    if not name:
        return None
    if name[:1] == b"\0":
        return "@" + name[1:].decode("utf-8", "surrogateescape")
    return name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")    # paths may come NUL-terminated


def _addr(text: str) -> str | bytes:
    return b"\0" + text[1:].encode("utf-8", "surrogateescape") if text.startswith("@") else text


class UnixSocket(FdKind):
    KIND = "unix"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return stat.S_ISSOCK(e.mode) and UnixSocket._diag(e) is not None

    _cache: dict = {}     # the sock_diag table of the scan in progress (reset() at each scan)

    @staticmethod
    def _diag(e: FdEntry):
        table = UnixSocket._cache.get("table")
        if table is None:
            table = UnixSocket._cache["table"] = sock_diag_unix()
        rec = table.get(e.ino)
        if rec is None:                      # a socket created since we read the table
            table = UnixSocket._cache["table"] = sock_diag_unix()
            rec = table.get(e.ino)
        return rec

    @staticmethod
    def reset() -> None:
        UnixSocket._cache.clear()

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        d = UnixSocket._diag(e)
        if e.info.get("scm_fds", "0") != "0":
            raise UnsupportedFd(f"{e.where()}: UNIX socket has file descriptors in flight (SCM_RIGHTS); "
                                f"cannot be checkpointed")
        state = UnixState(ino=e.ino, type=d["type"], listening=d["state"] == TCP_LISTEN, name=_name_text(d["name"]),
                          peer=d["peer"], shutdown=d["shutdown"], flags=e.flags, queue=[])
        if state.listening:
            if d["icons"]:
                raise UnsupportedFd(f"{e.where()}: listening UNIX socket {state.name} has "
                                    f"{len(d['icons'])} connection(s) not yet accepted; cannot be checkpointed")
        else:
            peer_in_job = d["peer"] == 0 or any(x.ino == d["peer"] and UnixSocket.matches(x)
                                                for x in ctx.entries.values())
            if not peer_in_job:
                # the other end may be a socket only the kernel holds (e.g. a connection not yet accepted);
                # either way it is outside the computation
                raise UnsupportedFd(f"{e.where()}: UNIX socket {state.name or ''} is connected to a process "
                                    f"outside the computation")
            if d["rqlen"][0]:
                state.queue = [base64.b64encode(m).decode() for m in _peek_queue(e.pid, e.fd, d["type"])]
            if d["peer"]:
                peer = UnixSocket._cache["table"].get(d["peer"], {})
                state.peer_name = _name_text(peer.get("name"))
        ctx.add(oid, state, min(x.pid for x in ofd))

    # ---------------------------------------------------------------------------------------------- restore --
    @staticmethod
    def create(factory, s: UnixState) -> int:
        made = factory.extra.setdefault("unix-by-ino", {})
        if s.ino in made:
            return made.pop(s.ino)
        typ = STYPE[s.type]
        if s.listening:
            if not s.name:
                raise UnsupportedFd(f"listening UNIX socket (inode {s.ino}) without a name: nothing to bind again")
            sk = socket.socket(socket.AF_UNIX, typ)
            _bind(sk, s.name)
            sk.listen(128)
            fd = sk.detach()
            _flags(fd, s.flags)
            return fd
        peer = _peer_state(factory, s)
        if peer is None:                     # unconnected (or its peer closed): a lone socket, maybe bound
            sk = socket.socket(socket.AF_UNIX, typ)
            if s.name:
                _bind(sk, s.name)
            _refill(sk, sk, s)
            fd = sk.detach()
            _flags(fd, s.flags)
            return fd
        mine, theirs = _connect_pair(factory, s, peer, typ)
        # queued data of each end is sent again from the other end
        _refill(theirs, mine, s)
        _refill(mine, theirs, peer)
        for sk, st in ((mine, s), (theirs, peer)):
            if st.shutdown:
                sk.shutdown({1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}.get(st.shutdown, 0))
        peer_fd = theirs.detach()
        _flags(peer_fd, peer.flags)
        made[peer.ino] = factory.high(peer_fd)
        fd = mine.detach()
        _flags(fd, s.flags)
        return fd


def _peer_state(factory, s: UnixState) -> UnixState | None:
    if not s.peer:
        return None
    return next((o for o in factory.states_of("unix") if o.ino == s.peer), None)


def _bind(sk: socket.socket, name: str) -> None:
    addr = _addr(name)
    if isinstance(addr, str) and os.path.exists(addr):
        if stat.S_ISSOCK(os.lstat(addr).st_mode):
            os.unlink(addr)                   # the socket file the original left behind
        else:
            raise UnsupportedFd(f"cannot bind UNIX socket to {name}: a non-socket file is in the way")
    try:
        sk.bind(addr)
    except OSError as e:
        raise UnsupportedFd(f"cannot bind UNIX socket to {name}: {e.strerror}") from None


def _connect_pair(factory, s: UnixState, peer: UnixState, typ: int) -> tuple[socket.socket, socket.socket]:
    """Two connected sockets standing for s and its peer (mine, theirs)."""
    server_side = bool(s.name) and not peer.name
    named = s.peer_name or s.name
    if not named or typ == socket.SOCK_DGRAM:
        a, b = socket.socketpair(socket.AF_UNIX, typ)
        return a, b
    # a connection to a named listening socket: connect to it (or to a stand-in) and accept
    path = s.name if server_side else s.peer_name
    if not path:
        raise UnsupportedFd(f"UNIX socket {named}: the listening end of its connection has no name")
    listener_state = next((o for o in factory.states_of("unix") if o.listening and o.name == path), None)
    temp = None
    if listener_state is not None:
        lfd = factory.fd_for(listener_state.id)
        listener = socket.socket(fileno=os.dup(lfd))
    else:
        temp = socket.socket(socket.AF_UNIX, typ)
        _bind(temp, path)
        temp.listen(1)
        listener = temp
    try:
        client = socket.socket(socket.AF_UNIX, typ)
        client_state = peer if server_side else s
        if client_state.name:
            _bind(client, client_state.name)
        blocking = listener.getblocking()
        listener.setblocking(True)
        client.connect(_addr(path))
        server, _ = listener.accept()
        listener.setblocking(blocking)
    finally:
        listener.close()                      # our copy of the real listener, or the stand-in
        if temp is not None and not path.startswith("@"):
            os.unlink(path)
    return (server, client) if server_side else (client, server)


def _refill(sender: socket.socket, receiver: socket.socket, state: UnixState) -> None:
    """Queue state's saved data at `receiver` by sending it from `sender`."""
    for m in state.queue:
        data = base64.b64decode(m)
        if sender is receiver:
            log.warning("UNIX socket %s: %d queued bytes had no sender to send them again; dropped",
                        state.name, len(data))
            continue
        sender.sendall(data) if state.type == "stream" else sender.send(data)


def _flags(fd: int, flags: int) -> None:
    import fcntl
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & os.O_NONBLOCK)
    os.set_inheritable(fd, False)
