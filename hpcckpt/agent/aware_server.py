"""The agent's side of the program API (hpcckpt.aware, docs/aware.md): a UNIX stream socket with an abstract name
(HPCCKPT_AWARE in the job's environment) that only processes of this agent's job may use (SO_PEERCRED), one JSON
object per line each way.

    program -> agent   {"op": "checkpoint", "id": N}       answered {"op": "done", "id": N, "result":
                                                            "checkpointed"|"restarted", "generation": G} or
                                                            {"id": N, "error": ...}
                       {"op": "await", "id": N}             the same answer at the next checkpoint, without
                                                            asking for one (hpcckpt.aware.mpi: the other ranks)
                       {"op": "delay", "on": true|false, "id": N}   answered once no checkpoint is in progress
                       {"op": "subscribe", "events": [...]} hooks the program has (pre_checkpoint, resume, restart)
                       {"op": "status", "id": N}            computation, generation, ckptdir, peers, interval
                       {"op": "ack", "event": E, "seq": S}  the program ran its hooks for event E
    agent -> program   {"op": "event", "name": E, "seq": S, "generation": G}

The connections are part of the checkpoint (engine/awarefd.py): a restored process's connection comes back
connected to the restarted agent, which answers the calls that were waiting with "restarted".

All of this runs on the agent's main thread; it polls one epoll descriptor (fileno()).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 1 << 16
EVENTS = ("pre_checkpoint", "resume", "restart")


def new_name() -> str:
    return f"@hpcckpt-aware-{secrets.token_hex(8)}"


@dataclass
class Conn:
    sock: socket.socket
    pid: int
    buf: bytes = b""
    events: set[str] = field(default_factory=set)
    delay: bool = False
    pending: list[int] = field(default_factory=list)        # checkpoint/await calls waiting for a checkpoint
    delay_waiting: list[int] = field(default_factory=list)  # delay-on calls waiting for a checkpoint to end
    acks: dict[str, int] = field(default_factory=dict)      # event -> last seq acknowledged

    @property
    def inode(self) -> int:
        return os.fstat(self.sock.fileno()).st_ino


class AwareServer:
    def __init__(self, job_pids: Callable[[], set[int]], request_checkpoint: Callable[[], None],
                 status: Callable[[], dict]):
        self.job_pids = job_pids
        self.request_checkpoint = request_checkpoint
        self.status = status
        self.name: str | None = None
        self.listener: socket.socket | None = None
        self.conns: dict[int, Conn] = {}
        self.ep = select.epoll()
        self.busy = False                   # a checkpoint round is in progress
        self.seq = 0

    # ---------------------------------------------------------------------------------------- plumbing --
    def listen(self, name: str) -> bool:
        """Listen at the abstract name (e.g. the one a restored job's environment names); False if taken."""
        sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sk.bind("\0" + name.lstrip("@"))
        except OSError as e:
            log.warning("program API socket %s: %s; calls of the program's hpcckpt.aware will fail", name, e)
            sk.close()
            return False
        sk.listen(64)
        self.name, self.listener = name, sk
        self.ep.register(sk.fileno(), select.EPOLLIN)
        return True

    def fileno(self) -> int:
        return self.ep.fileno()

    def close(self) -> None:
        for c in list(self.conns.values()):
            self._drop(c)
        if self.listener is not None:
            self.listener.close()
        self.ep.close()

    def agent_inodes(self) -> dict[int, Conn]:
        return {c.inode: c for c in self.conns.values()}

    def adopt(self, sock: socket.socket, state: dict) -> None:
        """A restored process's connection (our end): as it was at the checkpoint."""
        sock.setblocking(False)
        c = Conn(sock, int(state.get("pid", 0)), events=set(state.get("events", [])),
                 delay=bool(state.get("delay")), pending=list(state.get("pending", [])))
        self.conns[sock.fileno()] = c
        self.ep.register(sock.fileno(), select.EPOLLIN)

    def handle(self, timeout: float = 0) -> None:
        """Serve whatever is ready (accept, read, answer)."""
        for fd, _ in self.ep.poll(timeout):
            if self.listener is not None and fd == self.listener.fileno():
                self._accept()
            elif fd in self.conns:
                self._read(self.conns[fd])

    def _accept(self) -> None:
        if self.listener is None:
            return
        while True:
            try:
                sk, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("program API: accept failed: %s", e)
                return
            pid, uid, _ = struct.unpack("3i", sk.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if pid not in self.job_pids() or uid != os.geteuid():
                log.warning("program API: refused a connection from pid %d uid %d (not a process of this job)",
                            pid, uid)
                sk.close()
                continue
            sk.setblocking(False)
            self.conns[sk.fileno()] = Conn(sk, pid)
            self.ep.register(sk.fileno(), select.EPOLLIN)

    def _drop(self, c: Conn) -> None:
        try:
            self.ep.unregister(c.sock.fileno())
        except (OSError, ValueError):
            pass
        self.conns.pop(c.sock.fileno(), None)
        c.sock.close()

    def _read(self, c: Conn) -> None:
        try:
            data = c.sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.buf += data
        if len(c.buf) > MAX_LINE and b"\n" not in c.buf:
            log.warning("program API: pid %d sent an over-long message; closing its connection", c.pid)
            self._drop(c)
            return
        while b"\n" in c.buf:
            line, c.buf = c.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                self._on(c, msg)

    def _send(self, c: Conn, msg: dict) -> None:
        try:
            c.sock.sendall((json.dumps(msg, separators=(",", ":")) + "\n").encode())
        except (BlockingIOError, OSError) as e:
            log.warning("program API: cannot answer pid %d: %s", c.pid, e)

    # ------------------------------------------------------------------------------------------ requests --
    def _on(self, c: Conn, msg: dict) -> None:
        op = msg.get("op")
        ident: Any = msg.get("id")         # the program's request id, given back as it came
        if op == "checkpoint":
            c.pending.append(ident)
            if not self.busy:
                log.info("the program (pid %d) asks for a checkpoint", c.pid)
                self.request_checkpoint()
        elif op == "await":
            c.pending.append(ident)
        elif op == "delay":
            if msg.get("on"):
                if self.busy:
                    c.delay_waiting.append(ident)     # answered when the checkpoint in progress is over
                else:
                    c.delay = True
                    self._send(c, {"op": "delayed", "id": ident})
            else:
                c.delay = False
                self._send(c, {"op": "delayed", "id": ident})
        elif op == "subscribe":
            c.events = {e for e in msg.get("events", []) if e in EVENTS}
        elif op == "status":
            self._send(c, {"op": "status", "id": ident, **self.status()})
        elif op == "ack":
            c.acks[str(msg.get("event"))] = int(msg.get("seq") or 0)
            for err in msg.get("errors") or []:
                log.warning("pid %d: %s hook failed: %s", c.pid, msg.get("event"), err)

    # ------------------------------------------------------------------------------- checkpoint moments --
    def before_freeze(self, generation: int, delay_max: float, hook_max: float) -> None:
        """(suspend) Wait, bounded, for delayed_checkpoints() blocks to end, then run the programs' pre_checkpoint
        hooks and wait, bounded, for them."""
        self.busy = True
        self.handle(0)          # calls sent before the checkpoint was asked for (aware.mpi's awaits) count for it
        deadline = time.monotonic() + delay_max
        said = False
        while any(c.delay for c in self.conns.values()) and time.monotonic() < deadline:
            if not said:
                log.info("checkpoint waits (up to %.0f s) for %d process(es) inside delayed_checkpoints()", delay_max,
                         sum(1 for c in self.conns.values() if c.delay))
                said = True
            self.handle(0.05)
        if any(c.delay for c in self.conns.values()):
            log.warning("checkpoint goes on after %.0f s although process(es) %s are inside delayed_checkpoints()",
                        delay_max, ", ".join(str(c.pid) for c in self.conns.values() if c.delay))
        self.event("pre_checkpoint", generation, wait=hook_max)

    def event(self, name: str, generation: int, wait: float = 0.0) -> None:
        self.seq += 1
        seq = self.seq
        targets = [c for c in self.conns.values() if name in c.events]
        for c in targets:
            self._send(c, {"op": "event", "name": name, "seq": seq, "generation": generation})
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            if all(c.acks.get(name, 0) >= seq or c.sock.fileno() not in self.conns for c in targets):
                return
            self.handle(0.05)
        if wait and targets:
            log.warning("%s hooks of pid(s) %s did not finish within %.0f s; going on", name,
                        ", ".join(str(c.pid) for c in targets if c.acks.get(name, 0) < seq), wait)

    def round_over(self, generation: int, ok: bool, error: str | None = None) -> None:
        """A checkpoint round ended (committed, or failed): answer the calls that waited for it."""
        self.busy = False
        for c in list(self.conns.values()):
            for ident in c.pending:
                self._send(c, {"op": "done", "id": ident, "result": "checkpointed", "generation": generation} if ok
                           else {"op": "done", "id": ident, "error": f"checkpoint generation {generation} failed: "
                                                                     f"{error or 'see the agent log'}"})
            c.pending.clear()
            for ident in c.delay_waiting:
                c.delay = True
                self._send(c, {"op": "delayed", "id": ident})
            c.delay_waiting.clear()

    def resumed(self, generation: int) -> None:
        self.event("resume", generation)

    def restarted(self, generation: int) -> None:
        """After a restart: calls that waited for the checkpoint now learn they were restarted; restart hooks."""
        self.event("restart", generation)         # first: a call returns "restarted" after the hooks ran
        for c in self.conns.values():
            for ident in c.pending:
                self._send(c, {"op": "done", "id": ident, "result": "restarted", "generation": generation})
            c.pending.clear()


def name_of(pid: int) -> str | None:
    """HPCCKPT_AWARE in a (restored) process's environment."""
    from .procs import environ_var
    return environ_var(pid, "HPCCKPT_AWARE")
