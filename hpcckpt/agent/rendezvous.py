"""The coordinator's key-value store, as a restoring agent uses it: restored TCP listeners publish where they
are, the other ends look them up (engine/tcpwire.py). Keys are scoped to the computation and generation."""
from __future__ import annotations

import time

from ..coordinator.client import Connection


class Rendezvous:
    def __init__(self, conn: Connection, computation: str, generation: int, timeout: float = 120.0):
        self.conn = conn
        self.timeout = timeout               # how long the other hosts may take (Settings.restart_timeout)
        self.prefix = f"{computation}/{generation}/"
        self.stash: list[dict] = []          # other messages that arrived while we waited (handled later)
        self.abandoned = ""                  # why the coordinator gave the restart up while we waited

    def put(self, key: str, value) -> None:
        self.conn.send({"type": "kv_put", "key": self.prefix + key, "value": value})

    def get(self, key: str, timeout: float):
        """The value published under key, waiting for it up to timeout seconds (None if it never came, or if the
        restart was abandoned meanwhile: see self.abandoned)."""
        full = self.prefix + key
        self.conn.send({"type": "kv_get", "key": full, "wait": True})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = self.conn.recv(left)
            if msg is None:
                return None
            if msg.get("type") == "kv" and msg.get("key") == full:
                return msg.get("value")
            self.stash.append(msg)
            if msg.get("type") == "restart" and not msg.get("go"):
                self.abandoned = str(msg.get("reason") or "abandoned by the coordinator")
                return None

    def check(self) -> str:
        """Take the messages already here (kept for later) and say whether the restart was abandoned: "" or
        why. For waits that are not on the coordinator (a listener waiting for the other host to connect)."""
        while not self.abandoned:
            msg = self.conn.recv(0)
            if msg is None:
                break
            self.stash.append(msg)
            if msg.get("type") == "restart" and not msg.get("go"):
                self.abandoned = str(msg.get("reason") or "abandoned by the coordinator")
        return self.abandoned
