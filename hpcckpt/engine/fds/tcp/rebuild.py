"""Making a restored TCP socket: a new socket of the saved family, its options, flags and buffer sizes as they
were, the bytes it had not read. Used by the kind (kind.py, connections on this host) and by wiring across hosts
(wire.py)."""
from __future__ import annotations

import base64
import os
import socket
import struct

from ....image.fdstate import TcpState
from .info import BOOL_OPTS, INT_OPTS, SO_SNDBUFFORCE


def saved_data(factory, s: TcpState) -> bytes:
    """The bytes the socket had not read at the checkpoint."""
    if s.data_blob:
        return factory.read_blob(s.id)
    return base64.b64decode(s.data or "")


def new_socket(s: TcpState) -> socket.socket:
    sk = socket.socket(s.family, socket.SOCK_STREAM)
    if s.family == socket.AF_INET6 and "v6only" in s.opts:
        sk.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, s.opts["v6only"])
    return sk


def finish(sk: socket.socket, s: TcpState) -> int:
    """Options and flags as they were; returns the fd."""
    lock_sndbuf(sk, s)
    for level, name, key in BOOL_OPTS + INT_OPTS:
        if key in s.opts:
            try:
                sk.setsockopt(level, name, s.opts[key])
            except OSError:
                pass
    if "linger" in s.opts:
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, s.opts["linger"]))
    import fcntl
    fd = sk.detach()
    fcntl.fcntl(fd, fcntl.F_SETFL, s.flags & os.O_NONBLOCK)
    os.set_inheritable(fd, False)
    return fd


def buf_after(s: TcpState) -> tuple[int, int]:
    """Receive buffer size and lock for a restored socket: the original's size only where the program had
    fixed it (SO_RCVBUF locks it); else the default, left to autotuning as the original was."""
    lock = s.opts.get("buf_lock", -1)
    if lock > 0 and lock & 2:
        return s.opts["rcvbuf"], lock
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        return int(f.read().split()[1]), max(lock, 0)


def lock_sndbuf(sk: socket.socket, s: TcpState) -> None:
    """A send buffer size the program had fixed (SO_SNDBUF) is fixed again."""
    lock = s.opts.get("buf_lock", -1)
    if lock > 0 and lock & 1 and "sndbuf" in s.opts:
        try:
            sk.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, s.opts["sndbuf"] // 2)
        except OSError:
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s.opts["sndbuf"] // 2)
