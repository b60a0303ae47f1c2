"""A coordinator in this process with simulated agents: no sockets, no processes. Messages go through the real
framing (encode, MAC, freshness) and the real dispatch (Coordinator._on_frames); what the coordinator sends is
kept per agent, decoded, to be looked at."""
from __future__ import annotations

import json
import logging
import os

import zmq

from hpcckpt.coordinator import protocol
from hpcckpt.coordinator.ratelog import RateLimitedLog
from hpcckpt.coordinator.server import Coordinator
from hpcckpt.image import store
from hpcckpt.settings import Settings


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.partial: list[bytes] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent.append(list(frames))

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.partial.append(frame)
        if not flags & zmq.SNDMORE:
            self.sent.append(self.partial)
            self.partial = []


class Sim:
    def __init__(self, ckptdir: str, **settings) -> None:
        self.c = Coordinator(Settings(ckptdir=ckptdir, **settings))
        self.sock = FakeSocket()
        self.c.sock = self.sock            # type: ignore[assignment]
        self.c.key = b"k" * 32
        self.c.port = 0
        self.c.fresh = protocol.Freshness()
        self.c.rejects = RateLimitedLog(logging.getLogger("test"), "rejected")
        self.agents: list[bytes] = []
        self.log: list[tuple[bytes, dict, int]] = []     # everything taken so far

    def deliver(self, ident: bytes, msg: dict) -> None:
        self.c._on_frames([ident] + protocol.encode(self.c.key, msg))

    def take(self) -> list[tuple[bytes, dict, int]]:
        """What the coordinator sent since the last take: (to, message, bytes on the wire)."""
        out = [(f[0], json.loads(f[3]), sum(map(len, f[1:]))) for f in self.sock.sent]
        self.sock.sent.clear()
        self.log += out
        return out

    def join(self, n: int, hosts_of: int = 64) -> None:
        for k in range(n):
            ident = f"agent-{k:06d}".encode()
            self.deliver(ident, protocol.Hello(host=f"node{k // hosts_of}", agent_pid=1000 + k, processes=[
                {"pid": 100 + k, "unique_id": f"u{k}", "program": "sim"}], agent_id=f"a{k:06d}",
                agent_ids=[f"a{k:06d}"]).to_dict())
            self.agents.append(ident)

    def ack(self, ident: bytes, phase: dict, ok: bool = True, error: str | None = None) -> None:
        """Answer a phase as an agent with one process would (its image written before the ack)."""
        k = self.agents.index(ident)
        extra: dict = {}
        if phase["phase"] == "suspend":
            extra["tcp_ends"] = []
        elif phase["phase"] == "checkpoint":
            gdir = store.generation_dir(self.c.ckptdir, self.c.computation or "", phase["generation"])
            extra.update(pending=False, stats={"bytes_in": 4096, "bytes_out": 4096}, images=[{
                "host": f"node{k // 64}", "path": os.path.join(gdir, f"sim-u{k}.dmtcp"),   # (shared dir: one level)
                "program": "sim", "unique_id": f"u{k}", "pid": 100 + k, "size": 4096, "needs": [],
                "rank": None, "agent_id": f"a{k:06d}"}])
        elif phase["phase"] == "resume":
            extra["stats"] = {"frozen_s": 0.01}
        self.deliver(ident, protocol.Ack(phase["phase"], phase["generation"], ok, error, **extra).to_dict())

    def run_round(self) -> dict[bytes, int]:
        """One checkpoint round, every agent answering every phase; bytes the coordinator sent to each agent."""
        sent: dict[bytes, int] = {}
        assert self.c.start_checkpoint() is None
        while True:
            phases = []
            for to, msg, size in self.take():
                sent[to] = sent.get(to, 0) + size
                if msg["type"] == "phase" and msg["phase"] != "abort":
                    phases.append((to, msg))
            if not phases:
                return sent
            for to, msg in phases:
                self.ack(to, msg)
