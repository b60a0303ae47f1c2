"""Talking to a coordinator: a DEALER connection used by agents (peers) and by dmtcp_command."""
from __future__ import annotations

import json
import secrets
import socket
import time

import zmq
from zmq.utils import monitor as zmq_monitor

from . import protocol


class CoordinatorUnreachable(Exception):
    """No coordinator answered (or it refused us); the message says where we looked."""


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class CoordinatorLost(CoordinatorUnreachable):
    """The coordinator went away (connection closed, or silent too long) while we waited for it."""


class Connection:
    def __init__(self, host: str, port: int, key: bytes | None = None, ctx: zmq.Context | None = None,
                 routing_id: bytes | None = None, peer_timeout: float = 90.0):
        """routing_id: a stable identity (default: a random one for this connection), so that after a reconnection the coordinator (ROUTER with
        handover) still knows which peer this is. peer_timeout: ZeroMQ drops the connection (and reconnects) only
        after the other side has been silent that long: a paused coordinator is not a dead one."""
        self.host = host
        self.port = port
        self.key = key if key is not None else protocol.read_secret(port)
        self.own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(max(peer_timeout, 10.0) * 1000))
        # stable for the connection's life, so a reconnection is the same peer to the coordinator
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id or b"c" + secrets.token_bytes(12))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(self.endpoint)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def retarget(self, host: str, port: int) -> None:
        """Talk to a coordinator at another address from now on (one started elsewhere after ours died)."""
        if (host, port) == (self.host, self.port):
            return
        try:
            self.sock.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass
        self.host, self.port = host, port
        self.sock.connect(self.endpoint)

    def link_events(self) -> list[str]:
        """Connection events since the last call: "up" (a handshake succeeded) or "down" (disconnected)."""
        out = []
        while self.monitor.poll(0):
            ev = zmq_monitor.recv_monitor_message(self.monitor)["event"]
            out.append("down" if ev == zmq.EVENT_DISCONNECTED else "up")
        return out

    def send(self, msg: dict) -> str:
        """Queue one message; returns its nonce (the coordinator's reply names it), "" if it had to be dropped (no
        coordinator for a long while: queue full). Never blocks: an agent must go on serving its job when its
        coordinator is gone."""
        frames, nonce = protocol.encode_request(self.key, msg)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            return nonce
        except zmq.Again:
            return ""

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
        self.monitor.close(0)
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
    # never reconnect: a coordinator answering on this port later is another one, which knows nothing of our
    # request
    conn.sock.setsockopt(zmq.RECONNECT_IVL, -1)
    return conn


BLOCKING = ("bcheckpoint", "kcheckpoint")


def command(host: str, port: int, cmd: str, timeout: float | None = 10.0, silence: float = 90.0, **args) -> dict:
    """Send one command; raises CoordinatorUnreachable if nobody (authorised) answers. A blocking checkpoint is
    watched (command_watched): it never waits for a coordinator that died or went silent."""
    if cmd in BLOCKING:
        return command_watched(host, port, cmd, None, timeout=timeout, silence=silence, **args)
    conn = _connect(host, port)
    try:
        return conn.request({"type": "command", "cmd": cmd, **args}, timeout)
    finally:
        conn.close()


def command_watched(host: str, port: int, cmd: str, on_status=None, interval: float = 1.0,
                    timeout: float | None = None, silence: float = 90.0, **args) -> dict:
    """A blocking command (-bc, -kc) that asks for the status every `interval` seconds while it waits and passes
    each to on_status (progress on a terminal). Both go over one connection: the coordinator answers a status
    at once, the command when it is done; replies name their command.

    Never waits for ever: raises CoordinatorLost when the connection closes (the coordinator died), when no
    answer at all comes for `silence` seconds, or when the coordinator's status shows it no longer runs our
    request (it answers in order, so the reply would have come first); CoordinatorUnreachable after `timeout`."""
    conn = _connect(host, port)
    where = f"{host}:{port}"
    try:
        nonce = conn.send({"type": "command", "cmd": cmd, **args})
        asked: set[str] = set()
        start = last_answer = time.monotonic()
        next_status = start + interval
        forgotten = 0
        while True:
            now = time.monotonic()
            if "down" in conn.link_events():
                # (a reply that came just before the close - a kcheckpoint's coordinator quitting - still counts)
                while (reply := conn.recv(0.1)) is not None:
                    if protocol.answers(reply, nonce):
                        return reply
                raise CoordinatorLost(f"lost the coordinator {where} (connection closed: it died or quit)")
            if timeout is not None and now - start > timeout:
                raise CoordinatorUnreachable(f"no answer from coordinator {where} within {timeout:.0f} s")
            if now - last_answer > silence:
                raise CoordinatorLost(f"coordinator {where} has not answered for {now - last_answer:.0f} s")
            reply = conn.recv(min(interval, 0.25))
            if reply is None:
                if time.monotonic() >= next_status:
                    asked.add(conn.send({"type": "command", "cmd": "status"}))
                    next_status = time.monotonic() + interval
                continue
            if protocol.answers(reply, nonce):
                last_answer = time.monotonic()
                if reply.get("type") == "reject":
                    raise CoordinatorUnreachable(f"coordinator {host}:{port} refused us: {reply.get('reason')}")
                return reply
            if reply.get("re") not in asked or reply.get("command") != "status":
                continue                      # not an answer to us
            asked.discard(reply["re"])
            last_answer = time.monotonic()
            if on_status is not None:
                on_status(reply)
            if reply.get("checkpoint_progress") is None and not reply.get("waiting_for_ranks") and \
                    reply.get("num_agents"):      # (with no agent yet, a just started coordinator waits for them)
                forgotten += 1
                if forgotten >= 2:
                    raise CoordinatorLost(f"coordinator {where} no longer runs our {cmd} (was it restarted?)")
    finally:
        conn.close()
