"""Talking to a coordinator: Connection, libzmq's DEALER, for agents (peers) that stay connected for a
computation's life; command() and command_watched(), one command's conversation over zmtp.DealerSocket (plain
Python, no libzmq) for dmtcp_command and the other one-shot clients.

libzmq (pyzmq) is imported only when a Connection is made: its import alone (~25 ms, with asyncio) cost more than
a whole dmtcp_command request (docs/design.md, "Latency"). Both speak the same authenticated, fresh protocol
(wire.py): every request is stamped with a nonce and the time and MACed; a reply is taken only when its MAC
checks and it names our request's nonce."""
from __future__ import annotations

import json
import secrets
import socket
import time

from . import wire, zmtp

TYPE_CHECKING = False       # (not typing's: importing typing costs a command ~2 ms; mypy knows the name)
if TYPE_CHECKING:
    import zmq


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
        """routing_id: a stable identity (default: a random one for this connection), so that after a
        reconnection the coordinator (ROUTER with handover) still knows which peer this is. peer_timeout: ZeroMQ
        drops the connection (and reconnects) only after the other side has been silent that long: a paused
        coordinator is not a dead one."""
        import zmq
        self.host = host
        self.port = port
        self.key = key if key is not None else wire.read_secret(port)
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
        import zmq
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
        import zmq
        from zmq.utils import monitor as zmq_monitor
        out = []
        while self.monitor.poll(0):
            ev = zmq_monitor.recv_monitor_message(self.monitor)["event"]
            out.append("down" if ev == zmq.EVENT_DISCONNECTED else "up")
        return out

    def send(self, msg: dict) -> str:
        """Queue one message; returns its nonce (the coordinator's reply names it), "" if it had to be dropped (no
        coordinator for a long while: queue full). Never blocks: an agent must go on serving its job when its
        coordinator is gone."""
        import zmq
        frames, nonce = wire.encode_request(self.key, msg)
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
            if len(frames) == 3 and frames[0] == wire.PROTO_TAG and frames[1] == b"":
                # an unauthenticated refusal: the coordinator could not verify us
                try:
                    reason = json.loads(frames[2]).get("reason", "refused")
                except ValueError:
                    reason = "refused"
                raise CoordinatorUnreachable(f"coordinator {self.host}:{self.port} refused us: {reason}")
            try:
                msg = wire.decode(self.key, frames)
            except wire.ProtocolError:
                continue
            if reply_to is None:
                return msg
            if wire.answers(msg, reply_to):
                if msg.get("type") == "reject":     # authentic but refused (stale: clocks apart?)
                    raise CoordinatorUnreachable(f"coordinator {self.host}:{self.port} refused us: "
                                                 f"{msg.get('reason')}")
                return msg

    def fileno(self) -> int:
        import zmq
        return int(self.sock.getsockopt(zmq.FD))

    def close(self) -> None:
        self.monitor.close(0)
        self.sock.close()
        if self.own_ctx:
            self.ctx.term()


class CommandConnection:
    """One command's conversation with a coordinator over a plain TCP socket (zmtp.DealerSocket): requests are
    encoded, MACed and stamped exactly as a Connection's are; replies are authenticated the same way. It never
    reconnects: a coordinator answering on this port later is another one, which knows nothing of our request."""

    HANDSHAKE_S = 5.0

    def __init__(self, host: str, port: int, timeout: float | None = None):
        """timeout: the command's; the connection and the greeting take no longer (a coordinator that is stopped
        still has its connections accepted by the kernel, but never greets)."""
        self.host, self.port = host, port
        self.where = f"{host}:{port}"
        handshake = self.HANDSHAKE_S if timeout is None else max(0.1, min(self.HANDSHAKE_S, timeout))
        try:
            # (an ASCII name as bytes: a str would import the idna codec first)
            # (getaddrinfo takes bytes; typeshed's create_connection says str only)
            raw = socket.create_connection((host.encode() if host.isascii() else host, port),  # type: ignore[arg-type]
                                           timeout=handshake)
        except OSError:
            raise CoordinatorUnreachable(f"no coordinator listening on {self.where}") from None
        try:
            self.key = wire.read_secret(port)
        except wire.SecretError as e:
            raw.close()
            raise CoordinatorUnreachable(str(e)) from None
        try:
            self.sock = zmtp.DealerSocket(raw, routing_id=b"c" + secrets.token_bytes(12), timeout=handshake)
        except TimeoutError:
            raw.close()
            raise CoordinatorUnreachable(f"no answer from coordinator {self.where} within {handshake:.0f} s (it "
                                         f"took the connection but never greeted: stopped or stalled?)") from None
        except OSError as e:
            raw.close()
            raise CoordinatorUnreachable(f"{self.where} does not answer as a coordinator ({e})") from None

    def send(self, msg: dict) -> str:
        """Send one request; returns its nonce (the coordinator's reply names it)."""
        frames, nonce = wire.encode_request(self.key, msg)
        try:
            self.sock.send_multipart(frames)
        except OSError as e:
            raise CoordinatorLost(f"lost the coordinator {self.where} (connection closed: {e})") from None
        return nonce

    def recv(self, timeout: float | None, reply_to: str | None = None) -> dict | None:
        """One authenticated message (with reply_to: the reply to that request only), or None on timeout; raises
        CoordinatorLost when the coordinator closes the connection (after every message it sent was read)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if not self.sock.poll(None if left is None else int(left * 1000)):
                    return None
                # a message once begun is read whole; a coordinator that stalls mid-message for long is lost
                frames = self.sock.recv_multipart(timeout=max(left or 0.0, 30.0))
            except TimeoutError:
                raise CoordinatorLost(f"coordinator {self.where} stopped in the middle of a message") from None
            except OSError:
                raise CoordinatorLost(f"lost the coordinator {self.where} (connection closed: it died or "
                                      f"quit)") from None
            if len(frames) == 3 and frames[0] == wire.PROTO_TAG and frames[1] == b"":
                # an unauthenticated refusal: the coordinator could not verify us
                try:
                    reason = json.loads(frames[2]).get("reason", "refused")
                except (ValueError, AttributeError):
                    reason = "refused"
                raise CoordinatorUnreachable(f"coordinator {self.where} refused us: {reason}")
            try:
                msg = wire.decode(self.key, frames)
            except wire.ProtocolError:
                continue                        # not authentic (or not for us): ignored, as a Connection does
            if reply_to is None:
                return msg
            if wire.answers(msg, reply_to):
                if msg.get("type") == "reject":     # authentic but refused (stale: clocks apart?)
                    raise CoordinatorUnreachable(f"coordinator {self.where} refused us: {msg.get('reason')}")
                return msg

    def close(self) -> None:
        self.sock.close()


BLOCKING = ("bcheckpoint", "kcheckpoint")


def command(host: str, port: int, cmd: str, timeout: float | None = 10.0, silence: float = 90.0, **args) -> dict:
    """Send one command; raises CoordinatorUnreachable if nobody (authorised) answers. A blocking checkpoint is
    watched (command_watched): it never waits for a coordinator that died or went silent."""
    if cmd in BLOCKING:
        return command_watched(host, port, cmd, None, timeout=timeout, silence=silence, **args)
    start = time.monotonic()
    conn = CommandConnection(host, port, timeout)
    left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
    try:
        reply = conn.recv(left, reply_to=conn.send({"type": "command", "cmd": cmd, **args}))
    except CoordinatorLost as e:
        # not a checkpoint that was lost half-way: the command simply got no answer
        raise CoordinatorUnreachable(f"no answer from coordinator {conn.where}: {e}") from None
    finally:
        conn.close()
    if reply is None:
        raise CoordinatorUnreachable(f"no answer from coordinator {host}:{port} within {timeout:.0f} s")
    return reply


def command_watched(host: str, port: int, cmd: str, on_status=None, interval: float = 1.0,
                    timeout: float | None = None, silence: float = 90.0, **args) -> dict:
    """A blocking command (-bc, -kc) that asks for the status every `interval` seconds while it waits and passes
    each to on_status (progress on a terminal). Both go over one connection: the coordinator answers a status
    at once, the command when it is done; replies name their command.

    Never waits for ever: raises CoordinatorLost when the connection closes (the coordinator died; a reply sent
    just before the close - a kcheckpoint's coordinator quitting - is still read first), when no answer at all
    comes for `silence` seconds, or when the coordinator's status shows it no longer runs our request (it answers
    in order, so the reply would have come first); CoordinatorUnreachable after `timeout`."""
    conn = CommandConnection(host, port, timeout)
    where = conn.where
    try:
        nonce = conn.send({"type": "command", "cmd": cmd, **args})
        asked: set[str] = set()
        start = last_answer = time.monotonic()
        next_status = start + interval
        forgotten = 0
        while True:
            now = time.monotonic()
            if timeout is not None and now - start > timeout:
                raise CoordinatorUnreachable(f"no answer from coordinator {where} within {timeout:.0f} s")
            if now - last_answer > silence:
                raise CoordinatorLost(f"coordinator {where} has not answered for {now - last_answer:.0f} s")
            reply = conn.recv(max(0.0, min(interval, next_status - now)))
            if reply is None:
                if time.monotonic() >= next_status:
                    asked.add(conn.send({"type": "command", "cmd": "status"}))
                    next_status = time.monotonic() + interval
                continue
            if wire.answers(reply, nonce):
                if reply.get("type") == "reject":
                    raise CoordinatorUnreachable(f"coordinator {where} refused us: {reply.get('reason')}")
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
