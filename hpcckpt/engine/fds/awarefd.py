"""A program's connection to its agent for the program API (hpcckpt.aware; agent/aware_server.py): a UNIX
socket whose peer is one of the agent's own. Other UNIX sockets to a process outside the job are refused
(unixsock.py); this one is saved with what the agent knew about it (hooks subscribed, checkpoint calls waiting,
a delayed_checkpoints() block open) and comes back as one end of a new socketpair whose other end the restarting
agent holds - which answers the waiting calls with "restarted".

The agent names its server here (SERVER) before a checkpoint or a restore; without one no descriptor is of this
kind."""
from __future__ import annotations

import socket
import stat
from typing import Any

from ...image.fdstate import AwareState
from .base import FdKind
from .entry import FdEntry

SERVER: Any = None  # the agent's AwareServer (set by the agent; None in any other process)


def _conn_of(e: FdEntry):
    if SERVER is None or not stat.S_ISSOCK(e.mode):
        return None
    from .unixsock import UnixSocket
    d = UnixSocket._diag(e)
    if d is None or not d.get("peer"):
        return None
    return SERVER.agent_inodes().get(d["peer"])


class AwareConnection(FdKind):
    KIND = "aware"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return _conn_of(e) is not None

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        c = _conn_of(e)
        ctx.add(oid, AwareState(flags=e.flags, pid=c.pid, events=sorted(c.events), delay=c.delay,
                                pending=list(c.pending)), min(x.pid for x in ofd))

    @staticmethod
    def create(factory, s: AwareState) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if SERVER is not None:
            SERVER.adopt(ours, s.to_dict())
        else:                      # restored without an agent serving the API: the program's calls fail at once
            ours.close()
        theirs.setblocking(not (s.flags & 0o4000))
        return theirs.detach()
