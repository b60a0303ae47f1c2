"""TCP sockets of a computation: listening sockets, connections between its processes (with the bytes in
flight both ways), unconnected sockets, and connections to peers outside it.

No TCP_REPAIR (it needs CAP_NET_ADMIN and cannot move a connection to another host): like DMTCP, the bytes
in flight are drained while every process is frozen and refilled afterwards (tcpdrain.py), and at restart a
connection is made anew between its two restored ends.

Restart (`TcpSocket.create`): a listening socket is bound to its address again; a connection between two
processes of this host is connected again - through the job's own listener when it still has one, else a
stand-in on the server end's address - from the client end's original address when it is free, and each
end's unread bytes are sent again from the other end. A connection to another host of the computation is
made again through the coordinator (tcpwire.py). A connection to a peer outside the computation cannot be:
it comes back as a connection the peer has closed (its unread bytes still readable, then end of file), and a
warning says so.
"""
from __future__ import annotations

import base64
import errno
import ipaddress
import logging
import os
import select
import socket
import stat
import time

from ....hostnames import local_ipv4s
from ....image.fdstate import TcpState
from ...errors import UnsupportedFd
from ..base import FdKind
from ..entry import FdEntry
from . import wire as tcpwire
from .drain import Drained
from .info import (
    CLOSE,
    CONNECTED,
    DRAIN_TIMEOUT,
    LISTEN,
    SYN_RECV,
    SYN_SENT,
    WE_WRITE,
    TcpInfo,
    clear_time_wait,
    copy_socket,
    find_peer,
    norm,
    peek_all,
    send_all,
    socket_options,
    tcp_table,
    time_wait_holders,
)
from .rebuild import buf_after, finish, new_socket, saved_data

log = logging.getLogger(__name__)
TIME_WAIT_SECONDS = 65        # TCP_TIMEWAIT_LEN is 60 s

class TcpSocket(FdKind):
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
    def describe(e: FdEntry) -> str | None:
        return describe_inet(e) if e.target.startswith("socket:") else None

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
        sk = copy_socket(e.pid, e.fd)
        try:
            opts = socket_options(sk, info.family)
            bound = info.local[1] != 0
            if info.state == CLOSE and bound:
                try:
                    name = sk.getsockname()
                    bound = name[1] != 0
                except OSError:
                    pass
            state = TcpState(ino=e.ino, family=info.family, state=info.state, state_name=info.state_name,
                             local=list(info.local), remote=list(info.remote), bound=bound, flags=e.flags, opts=opts,
                             peer=None, data="", where=where)
            if info.state in CONNECTED:
                drained = (getattr(ctx, "drained", None) or {}).get(e.ino)
                if drained is None:            # dumped without a drain (a lone process): what is queued here
                    peer = find_peer(info, table, {x.ino for x in ctx.entries.values()})
                    if peer is not None and table[peer].tx_queue:
                        log.warning("%s: dumped without a drain; %d bytes still in the peer's send queue are "
                                    "not saved", where, table[peer].tx_queue)
                    drained = Drained(peek_all(sk, False, 0), False, peer)
                elif drained.late:             # the other host made sure all it sent is in our queue
                    drained = Drained(peek_all(sk, False, 0), False, None, remote=True)
                state.peer = drained.peer
                if drained.remote:             # the other end is on another host of the computation
                    state.remote_end = True
                    state.conn = tcpwire.conn_key(info.local, info.remote)
                    state.server = tcpwire.is_server(info.local, info.remote)
                if len(drained.data) > 4096:       # bulk data goes into image chunks, not the metadata
                    ctx.blobs[oid] = drained.data
                    state.data_blob = True
                else:
                    state.data = base64.b64encode(drained.data).decode()
                if drained.peer is None and not drained.remote:
                    log.warning("%s is connected to %s:%d outside the computation: after a restart it will be a "
                                "connection that peer has closed", where, *info.remote)
        finally:
            sk.close()
        ctx.add(oid, state, min(x.pid for x in ofd))

    # -------------------------------------------------------------------------------------------- restore --
    @staticmethod
    def create(factory, s: TcpState) -> int:
        made = factory.extra.setdefault("tcp-by-ino", {})
        if s.ino in made:
            return made.pop(s.ino)
        if s.remote_end:
            wired = factory.extra.get("tcp-wired", {})
            if s.ino in wired:
                return wired.pop(s.ino)
            log.warning("%s: its other end is on another host, and this restart has no coordinator to find it",
                        s.where)
            return finish(_closed_by_peer(factory, s), s)
        if s.state == LISTEN:
            sk = new_socket(s)
            _bind(sk, s, required=True)
            sk.listen(socket.SOMAXCONN)
            return finish(sk, s)
        if s.state not in CONNECTED:            # created, maybe bound, never connected (or reset)
            sk = new_socket(s)
            if s.bound:
                _bind(sk, s, required=False)
            return finish(sk, s)
        peer = None
        if s.peer is not None:
            peer = next((o for o in factory.states_of("tcp") if o.ino == s.peer), None)
            if peer is None:
                raise UnsupportedFd(f"{s.where}: the other end of its connection (socket {s.peer}) is in no "
                                    f"image given (restart needs every image of the checkpoint)")
        if peer is None:
            return finish(_closed_by_peer(factory, s), s)
        mine, theirs = _connect_pair(factory, s, peer)
        # each end's unread bytes come again from the other end; shut-down sides are shut again after
        send_all([(theirs, mine, saved_data(factory, s)), (mine, theirs, saved_data(factory, peer))], DRAIN_TIMEOUT,
                  after={mine.fileno(): buf_after(s), theirs.fileno(): buf_after(peer)})
        for sk, st in ((mine, s), (theirs, peer)):
            if st.state not in WE_WRITE:
                sk.shutdown(socket.SHUT_WR)
        made[peer.ino] = factory.high(finish(theirs, peer))
        return finish(mine, s)


    @staticmethod
    def prepare(factory) -> None:
        """Connections to other hosts are made all at once, before any object is handed out (tcpwire.py)."""
        remote = [o for o in factory.states_of("tcp") if o.remote_end]
        if remote and factory.rendezvous is not None:
            tcpwire.wire(factory, remote)


def _sockaddr(s: TcpState, addr) -> tuple:
    host, port = addr
    return (host, port, 0, 0) if s.family == socket.AF_INET6 else (host, port)


def _bind(sk: socket.socket, s: TcpState, required: bool, addr=None) -> bool:
    """Bind to the socket's original address. A listener must get it back (its clients know it); a client's
    own port is kept when it is free."""
    addr = addr or s.local
    sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # old connections may linger in TIME_WAIT
    try:
        sk.bind(_sockaddr(s, addr))
        return True
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL and (moved := _moved_address(s, addr)) is not None:
            log.info("%s: %s is not an address of this host (restarted on another one): bound to %s instead",
                     s.where, addr[0], moved[0])
            return _bind(sk, s, required, moved)
        if required and e.errno == errno.EADDRINUSE and _wait_out_time_wait(sk, s, addr):
            return True
        if required:
            raise UnsupportedFd(f"{s.where}: cannot bind to {addr[0]}:{addr[1]} again: {e.strerror}") from None
        log.info("%s: port %d is taken; restored on another port", s.where, addr[1])
        return False


def _moved_address(s: TcpState, addr) -> tuple | None:
    """The address on this host that stands for `addr`, an address of the host the socket was on at the
    checkpoint: loopback for loopback, else this host's first address of the same family (connections to other
    hosts come back through tcpwire.py whatever the address; new ones must find the new host by other means)."""
    ip = ipaddress.ip_address(addr[0].split("%")[0])
    if s.family != socket.AF_INET or ip.is_loopback or ip.is_unspecified:
        return None
    ours = [a for a in local_ipv4s() if not ipaddress.ip_address(a).is_loopback]
    return (ours[0], addr[1]) if ours else None


def _wait_out_time_wait(sk: socket.socket, s: TcpState, addr) -> bool:
    """A listener's port held only by TIME_WAIT connections - the killed original's, when its listener did
    not set SO_REUSEADDR (which TIME_WAIT keeps from the accepted sockets): clear them (SOCK_DESTROY, with
    CAP_NET_ADMIN), else wait until they expire (TCP's 60 s). True once bound."""
    deadline = time.monotonic() + TIME_WAIT_SECONDS
    warned = False
    while True:
        try:
            destroyed, left = clear_time_wait(s.family, addr)
        except OSError:
            destroyed, left = 0, len(time_wait_holders(s.family, addr))
        if destroyed:
            log.info("%s: port %d was held by %d TIME_WAIT connection(s) of the previous run; cleared",
                     s.where, addr[1], destroyed)
        try:
            sk.bind(_sockaddr(s, addr))
            return True
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                return False
        if not destroyed and not left:
            return False                     # something else has the port
        if not warned:
            log.warning("%s: port %d is held by %d TIME_WAIT connection(s) of the previous run (clearing them "
                        "needs CAP_NET_ADMIN); waiting up to %d s for them to expire", s.where, addr[1], left,
                        TIME_WAIT_SECONDS)
            warned = True
        time.sleep(0.5)


def _connect_pair(factory, s: TcpState, peer: TcpState) -> tuple[socket.socket, socket.socket]:
    """Two connected sockets standing for s and its peer (mine, theirs): the client end connects to the
    server end's address - through the job's listener there if it has one, else a stand-in."""
    def listener_at(addr):
        a = norm(tuple(addr))
        return next((o for o in factory.states_of("tcp") if o.state == LISTEN
                     and (norm(tuple(o.local)) == a
                          or (o.local[1] == a[1] and ipaddress.ip_address(o.local[0]).is_unspecified))),
                    None)
    if listener_at(s.local) is not None:
        server, client = s, peer
    elif listener_at(peer.local) is not None:
        server, client = peer, s
    else:          # no listener left: the end with the lower port was most likely the server
        server, client = (s, peer) if s.local[1] <= peer.local[1] else (peer, s)
    lst = listener_at(server.local)
    temp = None
    if lst is not None:
        lsk = socket.socket(fileno=os.dup(factory.fd_for(lst.id)))
    else:
        temp = lsk = new_socket(server)
        if not _bind(lsk, server, required=False):
            lsk.bind(_sockaddr(server, (server.local[0], 0)))
        lsk.listen(1)
    try:
        csk = new_socket(client)
        if client.bound:
            _bind(csk, client, required=False)
        target = lsk.getsockname()
        csk.connect(target)
        lsk.setblocking(True)
        ssk, _ = _accept_from(lsk, csk)
    finally:
        if lst is not None:
            lsk.setblocking(not (lst.flags & os.O_NONBLOCK))   # the shared file's flags as they were
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
    if norm(addr[:2]) != norm(want[:2]):
        ssk.close()
        raise UnsupportedFd(f"TCP: listener {lsk.getsockname()} accepted {addr}, not the restored end {want}")
    return ssk, addr


def _closed_by_peer(factory, s: TcpState) -> socket.socket:
    """A connection whose (outside) peer has closed: the bytes it had not read, then end of file."""
    lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsk.bind(("127.0.0.1", 0))
    lsk.listen(1)
    csk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        csk.connect(lsk.getsockname())
        ssk, _ = lsk.accept()
    finally:
        lsk.close()
    send_all([(ssk, csk, saved_data(factory, s))], DRAIN_TIMEOUT, after={csk.fileno(): buf_after(s)})
    ssk.close()
    log.warning("%s: its peer %s:%d was outside the computation; restored as closed by that peer",
                s.where, *s.remote)
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

