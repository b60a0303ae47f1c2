"""Restored TCP connections between hosts: each end is restored by the agent of its own host - maybe a
different host, with different addresses, than at the checkpoint - and the two agents find each other through
the coordinator's key-value store (like DMTCP's rewiring through its coordinator).

Of the two ends, the one with the lower port (the one that accepted the connection, as a rule) is the server:
its agent listens on that port again (the job's own listening socket if it still has one there, else a
stand-in; another port if that one is taken) and publishes its addresses under the connection's key; the other
agent looks them up, binds its end to its old port when it is free, connects, and sends a 16-byte token naming
the connection, which the server side reads off before the process ever sees the socket. Every agent first
publishes all it serves and only then connects, so no two agents wait for each other. Then the bytes each end
had not read go back through tcpinfo.Exchange, half-closed ends are shut again, and the sockets are handed to
the restore like any other object.
"""
from __future__ import annotations

import hashlib
import logging
import os
import select
import socket
import time

from ....hostnames import local_ipv4s
from ....image.fdstate import TcpState
from ...errors import UnsupportedFd
from .info import LISTEN, WE_WRITE, Exchange, norm, run_exchanges, set_lock, set_rcvbuf
from .rebuild import buf_after, finish, new_socket, saved_data

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


def conn_key(local, remote) -> str:
    """The same name for a connection at both of its ends."""
    a, b = sorted(f"{ip}:{port}" for ip, port in (norm(tuple(local)), norm(tuple(remote))))
    return f"{a}={b}"


def is_server(local, remote) -> bool:
    lo, re = norm(tuple(local)), norm(tuple(remote))
    return (lo[1], lo[0]) < (re[1], re[0])


def _token(o: TcpState) -> bytes:
    """What the connecting end sends first: names the connection (the same key on both hosts)."""
    if o.conn is None:
        raise UnsupportedFd(f"{o.where}: an end of a connection to another host without its connection key")
    return hashlib.sha256(o.conn.encode()).digest()[:16]


def _host_of(ip: str) -> str:
    try:
        return socket.gethostbyaddr(ip)[0]
    except OSError:
        return ip


def wire(factory, objects: list[TcpState], timeout: float | None = None) -> None:
    """Make every connection of `objects` (this host's ends of connections to other hosts); the sockets go to
    factory.extra["tcp-wired"][inode]. timeout: by default the rendezvous's, as long as the coordinator's restart
    gate waits for a missing host (Settings.restart_timeout)."""
    rv = factory.rendezvous
    timeout = rv.timeout if timeout is None else timeout
    ips = local_ipv4s()
    listeners: dict[int, socket.socket] = {}
    expect: dict[bytes, TcpState] = {}
    socks: dict[int, socket.socket] = {}
    # An end accepted by one of the job's listeners shares its port. If the lower-port rule made it the
    # connecting end, it must not bind that port: the listener restored later could not bind it then.
    job_ports = {x.local[1] for x in factory.states_of("tcp") if x.state == LISTEN}
    try:
        for o in (o for o in objects if o.server):
            port = o.local[1]
            if port not in listeners:
                listeners[port] = _listener(factory, o, new_socket)
            mine = [ip for ip in ips if ip == o.local[0]] + [ip for ip in ips if ip != o.local[0]]
            rv.put(f"tcp/{o.conn}", {"ips": mine, "port": listeners[port].getsockname()[1]})
            expect[_token(o)] = o
        for o in (o for o in objects if not o.server):
            addr = rv.get(f"tcp/{o.conn}", timeout)
            if addr is None and getattr(rv, "abandoned", None):
                raise UnsupportedFd(f"restart abandoned: {rv.abandoned}")
            if addr is None:
                ip, port = o.remote[0], o.remote[1]
                raise UnsupportedFd(f"{o.where}: the other end of connection {o.conn} (on {_host_of(ip)} at "
                                    f"the checkpoint, port {port}) was not restored on any host within "
                                    f"{timeout:.0f} s: is that host's part of the restart running?")
            socks[o.ino] = _connect(o, addr, ips, new_socket, keep_port=o.local[1] not in job_ports)
        deadline = time.monotonic() + timeout
        while expect:
            left = deadline - time.monotonic()
            if left <= 0:
                o = next(iter(expect.values()))
                raise UnsupportedFd(f"{o.where}: the other end of connection {o.conn} (on "
                                    f"{_host_of(o.remote[0])} at the checkpoint) did not connect again within "
                                    f"{timeout:.0f} s: is that host's part of the restart running?")
            r, _, _ = select.select(list(listeners.values()), [], [], min(left, 0.5))
            if not r and hasattr(rv, "check") and rv.check():
                raise UnsupportedFd(f"restart abandoned: {rv.abandoned}")
            for lsk in r:
                try:
                    sk, _ = lsk.accept()
                except BlockingIOError:
                    continue
                sk.settimeout(CONNECT_TIMEOUT)
                tok = _read_exactly(sk, 16)
                sk.settimeout(None)
                came = expect.pop(tok, None)
                if came is None:
                    sk.close()
                    log.warning("a connection to a restored listener did not name a connection we expected")
                    continue
                socks[came.ino] = sk
        run_exchanges([Exchange(socks[o.ino], saved_data(factory, o), o.where,
                                shut_after=o.state not in WE_WRITE) for o in objects], timeout)
        wired = factory.extra.setdefault("tcp-wired", {})
        for o in objects:
            sk = socks.pop(o.ino)
            size, lock = buf_after(o)
            if lock > 0:
                set_rcvbuf(sk, size, grow_only=False)
                set_lock(sk, lock)
            wired[o.ino] = factory.high(finish(sk, o))
        log.info("reconnected %d TCP connection(s) to other hosts", len(objects))
    finally:
        for sk in list(socks.values()) + list(listeners.values()):
            sk.close()


def _listener(factory, o: TcpState, new) -> socket.socket:
    """Where the other host connects to: the job's own listening socket on that port, else a stand-in on the
    same port (or another, if it is taken)."""
    port = o.local[1]
    job = next((x for x in factory.states_of("tcp") if x.state == LISTEN
                and x.local[1] == port), None)
    if job is not None:     # (left blocking: its flags are the job's; select says when accept() is ready)
        return socket.socket(fileno=os.dup(factory.fd_for(job.id)))
    lsk = new(o)
    lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        lsk.bind(("0.0.0.0", port))
    except OSError:
        log.info("%s: port %d is taken on this host; the connection comes back on another", o.where, port)
        lsk.bind(("0.0.0.0", 0))
    lsk.listen(128)
    lsk.setblocking(False)
    return lsk


def _connect(o: TcpState, addr: dict, ips: list[str], new, keep_port: bool = True) -> socket.socket:
    errors = []
    for ip in addr["ips"]:
        sk = new(o)
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if keep_port:
                sk.bind((o.local[0] if o.local[0] in ips else "0.0.0.0", o.local[1]))
        except OSError:
            pass                          # the old port is taken: any port will do
        sk.settimeout(CONNECT_TIMEOUT)
        try:
            sk.connect((ip, addr["port"]))
            sk.sendall(_token(o))
            sk.settimeout(None)
            return sk
        except OSError as e:
            errors.append(f"{ip}:{addr['port']}: {e.strerror or e}")
            sk.close()
    raise UnsupportedFd(f"{o.where}: cannot connect again to the other end ({'; '.join(errors)})")


def _read_exactly(sk: socket.socket, n: int) -> bytes:
    buf = b""
    try:
        while len(buf) < n:
            data = sk.recv(n - len(buf))
            if not data:
                break
            buf += data
    except OSError:
        pass
    return buf
