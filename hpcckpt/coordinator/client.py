"""Talking to a coordinator: a DEALER connection used by agents (peers) and by dmtcp_command."""
from __future__ import annotations

import json
import socket
import time

import zmq

from . import protocol


class CoordinatorUnreachable(Exception):
    """No coordinator answered (or it refused us); the message says where we looked."""


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Connection:
    def __init__(self, host: str, port: int, key: bytes | None = None, ctx: zmq.Context | None = None):
        self.host = host
        self.port = port
        self.key = key if key is not None else protocol.read_secret(port)
        self.own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        self.sock.connect(f"tcp://{host}:{port}")

    def send(self, msg: dict) -> str:
        """Send msg; returns its nonce (the coordinator's reply names it)."""
        frames, nonce = protocol.encode_request(self.key, msg)
        self.sock.send_multipart(frames)
        return nonce

    def recv(self, timeout: float | None, reply_to: str | None = None) -> dict | None:
        """One authenticated message (with reply_to: the reply to that request only), or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0, deadline - time.monotonic())
            if not self.sock.poll(None if left is None else int(left * 1000)):
                return None
            frames = self.sock.recv_multipart()
            if len(frames) == 3 and frames[0] == protocol.PROTO_TAG and frames[1] == b"":
                # an unauthenticated refusal: the coordinator could not verify us
                try:
                    reason = json.loads(frames[2]).get("reason", "refused")
                except ValueError:
                    reason = "refused"
                raise CoordinatorUnreachable(f"coordinator {self.host}:{self.port} refused us: {reason}")
            try:
                msg = protocol.decode(self.key, frames)
            except protocol.ProtocolError:
                continue
            if reply_to is None:
                return msg
            if protocol.answers(msg, reply_to):
                if msg.get("type") == "reject":     # authentic but refused (stale: clocks apart?)
                    raise CoordinatorUnreachable(f"coordinator {self.host}:{self.port} refused us: "
                                                 f"{msg.get('reason')}")
                return msg

    def request(self, msg: dict, timeout: float | None) -> dict:
        reply = self.recv(timeout, reply_to=self.send(msg))
        if reply is None:
            raise CoordinatorUnreachable(f"no answer from coordinator {self.host}:{self.port} within "
                                         f"{timeout:.0f} s")
        return reply

    def fileno(self) -> int:
        return self.sock.getsockopt(zmq.FD)

    def close(self) -> None:
        self.sock.close()
        if self.own_ctx:
            self.ctx.term()


def _connect(host: str, port: int) -> Connection:
    """A connection for one client command; raises CoordinatorUnreachable if nobody (authorised) listens."""
    if not port_is_open(host, port):
        raise CoordinatorUnreachable(f"no coordinator listening on {host}:{port}")
    try:
        conn = Connection(host, port)
    except protocol.SecretError as e:
        raise CoordinatorUnreachable(str(e)) from None
    conn.sock.setsockopt(zmq.LINGER, 0)
    return conn


def command(host: str, port: int, cmd: str, timeout: float | None = 10.0, **args) -> dict:
    """Send one command; raises CoordinatorUnreachable if nobody (authorised) answers."""
    conn = _connect(host, port)
    try:
        return conn.request({"type": "command", "cmd": cmd, **args}, timeout)
    finally:
        conn.close()


def command_watched(host: str, port: int, cmd: str, on_status, interval: float = 1.0, **args) -> dict:
    """A blocking command (-bc, -kc) that asks for the status every `interval` seconds while it waits and passes
    each to on_status (progress on a terminal). Both go over one connection: the coordinator answers a status
    at once, the command when it is done; replies name their command."""
    conn = _connect(host, port)
    try:
        nonce = conn.send({"type": "command", "cmd": cmd, **args})
        asked: set[str] = set()
        while True:
            reply = conn.recv(interval)
            if reply is None:
                asked.add(conn.send({"type": "command", "cmd": "status"}))
            elif protocol.answers(reply, nonce):
                if reply.get("type") == "reject":
                    raise CoordinatorUnreachable(f"coordinator {host}:{port} refused us: {reply.get('reason')}")
                return reply
            elif reply.get("re") in asked and reply.get("command") == "status":
                asked.discard(reply["re"])
                on_status(reply)
    finally:
        conn.close()
