"""A ZeroMQ DEALER for one short conversation with the coordinator, in plain Python over a TCP socket (ZMTP 3,
NULL mechanism): `dmtcp_command` uses it instead of libzmq, whose import alone costs more than the whole request
(bench/RESULTS-latency.md). Long-lived connections (agents) keep libzmq, which reconnects and heartbeats.

Only what a DEALER talking to our ROUTER needs: the greeting, READY with Socket-Type DEALER, multipart messages,
and PING answered with PONG. Authentication stays where it always is, in the frames (protocol.py)."""
from __future__ import annotations

import select
import socket
import struct
import time

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


class ZmtpError(OSError):
    pass


def _command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    return (bytes([COMMAND, len(data)]) if len(data) < 256 else bytes([COMMAND | LONG]) +
            struct.pack(">Q", len(data))) + data


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


class DealerSocket:
    """send_multipart / recv_multipart / poll / close: as much of zmq.Socket as one command needs
    (client.CommandConnection). It never reconnects."""

    def __init__(self, sock: socket.socket, routing_id: bytes = b"", timeout: float = 5.0):
        """Greet the ROUTER at the other end of the connected sock and say READY as a DEALER (with routing_id as
        its Identity, if given); raises ZmtpError (an OSError) or TimeoutError when it does not answer so."""
        self.sock = sock
        self.where = "{}:{}".format(*sock.getpeername()[:2])
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(GREETING)
        greeting = self._read(64, timeout)
        if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3 or greeting[12:16] != b"NULL":
            raise ZmtpError(f"{self.where} does not speak ZMTP 3 with the NULL mechanism")
        prop = _property(b"Socket-Type", b"DEALER") + (_property(b"Identity", routing_id) if routing_id else b"")
        self.sock.sendall(_command(b"READY", prop))
        flags, body = self._frame(timeout)
        if not flags & COMMAND or not body.startswith(b"\x05READY"):
            raise ZmtpError(f"{self.where}: no READY from the coordinator")
        self.sock.settimeout(None)

    def _read(self, n: int, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.buf) < n:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("timed out")
            if not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("timed out")
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise ConnectionResetError("the coordinator closed the connection")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self, timeout: float | None) -> tuple[int, bytes]:
        flags = self._read(1, timeout)[0]
        size = struct.unpack(">Q", self._read(8, timeout))[0] if flags & LONG else self._read(1, timeout)[0]
        return flags, self._read(size, timeout)

    def send_multipart(self, frames: list[bytes]) -> None:
        out = []
        for i, f in enumerate(frames):
            more = MORE if i < len(frames) - 1 else 0
            out.append(bytes([more | LONG]) + struct.pack(">Q", len(f)) if len(f) > 255 else bytes([more, len(f)]))
            out.append(f)
        self.sock.sendall(b"".join(out))

    def recv_multipart(self, timeout: float | None = None) -> list[bytes]:
        frames: list[bytes] = []
        while True:
            flags, body = self._frame(timeout)
            if flags & COMMAND:
                if body.startswith(b"\x04PING"):          # keep-alive: PONG with the ping's context
                    self.sock.sendall(_command(b"PONG", body[7:]))
                continue
            frames.append(body)
            if not flags & MORE:
                return frames

    def poll(self, timeout_ms: int | None = None) -> bool:
        """True when a message (or part of one) can be read within timeout_ms (None: wait for ever)."""
        if self.buf:
            return True
        r, _, _ = select.select([self.sock], [], [], None if timeout_ms is None else timeout_ms / 1000)
        return bool(r)

    def close(self, linger: int | None = None) -> None:
        self.sock.close()
