"""The program-facing API (DMTCP's "dmtcpaware"): a program running under `dmtcp_launch` (or restarted) can ask
for a checkpoint at a point of its choosing, learn whether it has just been restarted, hold checkpoints off during
a critical section, and run its own code before a checkpoint and after a resume or restart.

    from hpcckpt import aware
    if aware.is_enabled():
        aware.on("restart", reopen_license_server)
        with aware.delayed_checkpoints():
            update_files()
        if aware.checkpoint() == "restarted":
            print("carrying on after a restart")

How it talks to its agent: a UNIX stream socket (an abstract name, passed in HPCCKPT_AWARE; the agent accepts
only processes of its own job, by SO_PEERCRED), one JSON object per line. Nothing happens until the program
calls a function here: importing this module opens nothing and starts no thread. The connection is part of the
checkpoint like any descriptor: after a restart it is connected to the new agent, so a call that was waiting
for its checkpoint returns "restarted" there. The protocol is in docs/aware.md; the C library speaks it too.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
from collections.abc import Callable

__all__ = ["NotEnabled", "AwareError", "is_enabled", "checkpoint", "delayed_checkpoints", "on", "status",
           "EVENTS"]

ENV = "HPCCKPT_AWARE"
EVENTS = ("pre_checkpoint", "resume", "restart")


class NotEnabled(RuntimeError):
    """The program does not run under hpcckpt (dmtcp_launch / dmtcp_restart)."""


class AwareError(RuntimeError):
    """The agent refused or could not do what was asked; the message says why."""


def is_enabled() -> bool:
    """True only in a program started by dmtcp_launch (or restarted by dmtcp_restart)."""
    return bool(os.environ.get(ENV))


class _Channel:
    """This process's connection to its agent, with one reader thread that answers calls and runs hooks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.pid = 0
        self.ids = itertools.count(1)
        self.waiting: dict[int, tuple[threading.Event, list]] = {}
        self.hooks: dict[str, list[Callable]] = {e: [] for e in EVENTS}
        self.delay_depth = 0
        self.delay_lock = threading.Lock()

    def _address(self) -> str:
        name = os.environ.get(ENV)
        if not name:
            raise NotEnabled("not running under hpcckpt (start the program with dmtcp_launch)")
        return "\0" + name[1:] if name.startswith("@") else name

    def connect(self) -> socket.socket:
        with self.lock:
            if self.sock is not None and self.pid == os.getpid():
                return self.sock
            if self.sock is not None:            # inherited across fork(): it is our parent's conversation
                try:
                    self.sock.detach()
                except OSError:
                    pass
                self.waiting.clear()
            sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sk.connect(self._address())
            except OSError as e:
                sk.close()
                raise AwareError(f"cannot reach the hpcckpt agent ({e.strerror or e})") from None
            self.sock, self.pid = sk, os.getpid()
            threading.Thread(target=self._read, args=(sk,), name="hpcckpt-aware", daemon=True).start()
            if any(self.hooks.values()):
                self._send({"op": "subscribe", "events": [e for e, fns in self.hooks.items() if fns]})
            return sk

    def _send(self, msg: dict) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        if self.sock is None:
            raise OSError("not connected to the hpcckpt agent")
        self.sock.sendall(data)

    def ask(self, msg: dict) -> tuple[int, threading.Event, list]:
        """Send a request; its answer arrives in the returned box (answer())."""
        self.connect()
        ident = next(self.ids)
        ev: threading.Event = threading.Event()
        box: list = []
        self.waiting[ident] = (ev, box)
        try:
            with self.lock:
                self._send({**msg, "id": ident})
        except BaseException:
            self.waiting.pop(ident, None)
            raise
        return ident, ev, box

    def answer(self, ident: int, ev: threading.Event, box: list, timeout: float | None = None) -> dict:
        try:
            if not ev.wait(timeout):
                raise AwareError(f"no answer from the hpcckpt agent within {timeout:.0f} s")
        finally:
            self.waiting.pop(ident, None)
        reply = box[0]
        if reply.get("error"):
            raise AwareError(reply["error"])
        return reply

    def call(self, msg: dict, timeout: float | None = None) -> dict:
        return self.answer(*self.ask(msg), timeout)

    def _read(self, sk: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = sk.recv(65536)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                self._lost(sk)
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                self._dispatch(sk, msg)

    def _dispatch(self, sk: socket.socket, msg: dict) -> None:
        if msg.get("op") == "event":
            name = msg.get("name")
            errors = []
            for fn in list(self.hooks.get(str(name), ())):
                try:
                    fn()
                except Exception as e:        # a hook's failure is the program's, reported to the agent
                    errors.append(f"{getattr(fn, '__name__', fn)}: {e}")
            with self.lock:
                if self.sock is sk:
                    try:
                        self._send({"op": "ack", "event": name, "seq": msg.get("seq"), "errors": errors})
                    except OSError:
                        pass
            return
        w = self.waiting.get(int(msg.get("id") or 0))
        if w is not None:
            w[1].append(msg)
            w[0].set()

    def _lost(self, sk: socket.socket) -> None:
        with self.lock:
            if self.sock is sk:
                self.sock = None
            for ev, box in list(self.waiting.values()):
                box.append({"error": "the connection to the hpcckpt agent was lost"})
                ev.set()


_channel = _Channel()


def checkpoint(timeout: float | None = None) -> str:
    """Checkpoint the whole computation now and wait until it is complete. Returns "checkpointed" in the run that
    took it and "restarted" when the process resumes from that checkpoint after a restart."""
    if not is_enabled():
        raise NotEnabled("not running under hpcckpt (start the program with dmtcp_launch)")
    return _channel.call({"op": "checkpoint"}, timeout)["result"]


@contextlib.contextmanager
def delayed_checkpoints():
    """No checkpoint freezes this process inside the block: one that is asked for waits (bounded, logged by the
    agent) until the block ends. Nesting and threads are fine: the outermost block counts."""
    if not is_enabled():
        yield
        return
    with _channel.delay_lock:
        _channel.delay_depth += 1
        first = _channel.delay_depth == 1
    try:
        if first:
            _channel.call({"op": "delay", "on": True})     # answered once no checkpoint is in progress
        yield
    finally:
        with _channel.delay_lock:
            _channel.delay_depth -= 1
            last = _channel.delay_depth == 0
        if last:
            _channel.call({"op": "delay", "on": False})


def on(event: str, fn: Callable[[], object]) -> Callable[[], object]:
    """Run fn in this process at `event`: "pre_checkpoint" (before the processes are frozen; e.g. flush a file),
    "resume" (after a checkpoint, in the run that took it), "restart" (after a restart, before the program goes
    on; e.g. reopen a device or a license connection). Returns fn (usable as a decorator)."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; one of {', '.join(EVENTS)}")
    _channel.hooks[event].append(fn)
    if is_enabled():
        _channel.connect()
        with _channel.lock:
            _channel._send({"op": "subscribe", "events": [e for e, fns in _channel.hooks.items() if fns]})
    return fn


def status() -> dict:
    """computation, generation (the last complete checkpoint), ckptdir, peers (agents), interval, restarted."""
    if not is_enabled():
        raise NotEnabled("not running under hpcckpt (start the program with dmtcp_launch)")
    reply = _channel.call({"op": "status"}, 30)
    return {k: v for k, v in reply.items() if k not in ("op", "id")}
