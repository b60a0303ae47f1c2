"""Draining the TCP connections of a frozen computation, and refilling them when it resumes.

The agent takes a copy of each connected socket (pidfd_getfd) and sends a random 16-byte marker on it, behind
whatever the process had queued; the other end's copy is read until that marker arrives. Everything before
the marker is what the process at that end had yet to read - wherever it was: in its receive queue, on the
wire, or in the sender's send queue. Refill sends those bytes again from the other end, so they arrive in the
same order and ahead of anything the processes write once they run.

Both ends in this agent: one select loop does both sides, and refill sends from the other end's copy. Ends in
two agents (two hosts): each agent learns from the coordinator which of its connections lead to another
agent of the computation (`remote_ends`, every agent's connected ends, exchanged at the suspend barrier); both
agents run the marker exchange at the same time (the drain barrier), and refill with tcpinfo.Exchange.

Half-closed connections: when the other end can no longer write (it shut down its side), our receive queue is
only peeked up to the end of file - nothing could send it again. When we shut down writing but the other end
did not, and the other end is in another agent: that agent waits until its send queue is empty (everything it
sent has reached our receive queue), and our queue is peeked when the images are made, after the barrier.
"""
from __future__ import annotations

import hashlib
import logging
import os
import select
import socket
import stat
import time
from dataclasses import dataclass, field

from ...errors import UnsupportedFd
from ..entry import list_fds
from .info import (
    CONNECTED,
    DRAIN_TIMEOUT,
    ESTABLISHED,
    MARKER_PREFIX,
    PEER_WRITES,
    WE_WRITE,
    Exchange,
    TcpInfo,
    copy_socket,
    find_peer,
    norm,
    peek_all,
    run_exchanges,
    send_all,
    tcp_table,
)

log = logging.getLogger(__name__)


@dataclass
class Drained:
    """What one connected socket had yet to read at the checkpoint."""
    data: bytes = b""
    consumed: bool = False        # taken out of the socket (must be refilled to resume)
    peer: int | None = None       # the other end's inode when it is in this agent
    remote: bool = False          # the other end is in another agent of the computation
    late: bool = False            # read (peeked) when the image is made, after the drain barrier


@dataclass
class _End:
    info: TcpInfo
    pid: int
    fd: int
    sk: socket.socket
    peer: int | None
    remote_state: int | None = None           # the other end's TCP state, when another agent holds it
    drained: Drained = field(default_factory=Drained)
    buf: bytearray = field(default_factory=bytearray)
    to_send: bytes = b""
    done: bool = False
    wait_sent: bool = False                   # wait until our send queue is empty (see module doc)

    def where(self) -> str:
        return f"pid {self.pid} fd {self.fd}: TCP {self.info.local[0]}:{self.info.local[1]} -> " \
               f"{self.info.remote[0]}:{self.info.remote[1]}"


def connected_ends(pids: list[int]) -> list[list]:
    """This computation's connected TCP ends, [local ip, port, remote ip, port, state], for the coordinator to
    match against other agents' (which connections stay inside the computation)."""
    table = tcp_table(pids[0]) if pids else {}
    seen = set()
    out = []
    for pid in pids:
        for e in list_fds(pid):
            info = table.get(e.ino) if stat.S_ISSOCK(e.mode) else None
            if info is not None and info.state in CONNECTED and e.ino not in seen:
                seen.add(e.ino)
                out.append([*norm(info.local), *norm(info.remote), info.state])
    return out


def _remote_state(info: TcpInfo, remote_ends: list[list]) -> int | None:
    """The state of our end's other end if another agent holds it."""
    me, them = norm(info.local), norm(info.remote)
    for e in remote_ends:
        if (e[1], e[2]) == them and (e[3], e[4]) == me:
            return int(e[5])
    return None


class Drainer:
    """Drains every TCP connection of a frozen computation, and refills them (resume path)."""

    def __init__(self, pids: list[int], remote_ends: list[list] | None = None, name: str = ""):
        """name: the same for every agent of one checkpoint (computation/generation): the marker derives from
        it, so the agent at the other end of a connection knows what to look for."""
        self.pids = pids
        self.marker = MARKER_PREFIX + (hashlib.sha256(name.encode()).digest()[:8] if name else os.urandom(8))
        self.remote_ends = remote_ends or []      # [agent id, lip, lport, rip, rport, state] of other agents
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
            peer = find_peer(info, table, set(held))
            end = _End(info, pid, fd, copy_socket(pid, fd), peer)
            if peer is None:
                end.remote_state = _remote_state(info, self.remote_ends)
            self.ends[ino] = end
        marker = self.marker
        for end in self.ends.values():
            self._plan(end, marker, timeout)
        self._pump(marker, timeout)
        self._wait_sent(timeout)
        return {ino: e.drained for ino, e in self.ends.items()}

    def _plan(self, end: _End, marker: bytes, timeout: float) -> None:
        d = end.drained
        d.peer = end.peer
        d.remote = end.remote_state is not None
        state = end.info.state
        if end.peer is None and end.remote_state is None:
            # a peer outside the computation: nothing may be sent to it; keep a copy of what is queued here
            d.data = peek_all(end.sk, False, 0)
            end.done = True
            return
        if state not in PEER_WRITES:
            # the other end shut down writing: its last bytes are on their way to us, then end of file
            d.data = peek_all(end.sk, True, timeout)
            end.done = True
        if end.peer is not None:
            peer = self.ends.get(end.peer)
            if state in WE_WRITE and peer is not None and peer.info.state in PEER_WRITES:
                end.to_send = marker
            return
        # the other end is in another agent
        if state == ESTABLISHED and end.remote_state == ESTABLISHED:
            end.to_send = marker          # and read up to the other agent's marker
        elif state in PEER_WRITES:        # we shut down writing, the other end did not: see the module doc
            d.late = True
            end.done = True
        if state in WE_WRITE and end.remote_state != ESTABLISHED:
            end.wait_sent = True          # the other end is half-closed: it peeks what we sent, once all is there

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
                raise UnsupportedFd(f"{e.where()} could not be drained in {timeout:.0f} s")
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

    def _wait_sent(self, timeout: float) -> None:
        waiting = [e for e in self.ends.values() if e.wait_sent]
        deadline = time.monotonic() + timeout
        while waiting:
            table = tcp_table(self.pids[0])
            waiting = [e for e in waiting if e.info.ino in table and table[e.info.ino].tx_queue > 0]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise UnsupportedFd(f"{waiting[0].where()}: {table[waiting[0].info.ino].tx_queue} bytes sent to a "
                                    f"half-closed connection on another host were not taken in {timeout:.0f} s")
            time.sleep(0.01)

    def refill(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Put every consumed byte back (before the processes run again): sent again from the other end when
        this agent holds it, else through the byte exchange with the agent that does."""
        if self.refilled:
            return
        self.refilled = True
        jobs, exchanges = [], []
        for e in self.ends.values():
            if e.drained.remote:
                if e.info.state == ESTABLISHED and e.remote_state == ESTABLISHED:
                    exchanges.append(Exchange(e.sk, e.drained.data, e.where()))
                continue
            if e.drained.consumed and e.drained.data:
                sender = self.ends.get(e.peer) if e.peer is not None else None
                if sender is None:
                    log.error("%s: %d drained bytes have no sender", e.where(), len(e.drained.data))
                    continue
                jobs.append((sender.sk, e.sk, e.drained.data))
        send_all(jobs, timeout)
        if exchanges:
            run_exchanges(exchanges, timeout)

    def close(self) -> None:
        for e in self.ends.values():
            e.sk.close()
        self.ends.clear()
