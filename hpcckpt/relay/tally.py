"""A relay's part of one checkpoint round: the agents of its node that take part, their acks of the current phase
and their `written`, and the one aggregated message the relay sends up for each (no sockets here: relay.py sends).

Aggregation rules (docs/protocol.md "Relays"): ok only if every agent's is; the first error, naming its agent and
host; TCP ends as `[agent id, end...]` rows (the coordinator's drain lists them so); images concatenated; stats
summed (the slowest agent's times, the longest freeze; flags true only if every agent's is)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

_LONGEST = ("frozen_s", "capture_s", "write_s", "duration_s")


@dataclass
class Agent:
    """One agent behind the relay (what the relay knows of it)."""
    ident: bytes
    agent_id: str
    host: str
    agent_pid: int
    processes: list[dict]
    last_seen: float = field(default_factory=time.monotonic)
    peer_id: int | None = None            # given by the coordinator (its welcome's peer_ids)
    welcome_due: bool = True              # said hello; a welcome is owed
    progress: int = 0                     # bytes written so far in a round

    def name(self) -> str:
        return f"agent {self.agent_id} (pid {self.agent_pid}) on {self.host}"


def merge_stats(rows: list[dict]) -> dict:
    """Several agents' stats as one: numbers summed, times the longest, flags true when all are, words kept when
    all agree (a drain mode)."""
    out: dict[str, Any] = {}
    for st in rows:
        for k, v in (st or {}).items():
            if isinstance(v, bool):
                out[k] = out.get(k, True) and v
            elif isinstance(v, (int, float)):
                out[k] = max(out.get(k, 0), v) if k in _LONGEST else out.get(k, 0) + v
            elif k not in out:
                out[k] = v
            elif out[k] != v:
                out[k] = None
    for st in rows:                       # a flag some agents lack is not true for all
        for k, v in list(out.items()):
            if isinstance(v, bool) and v and k not in (st or {}):
                out[k] = False
    return out


def ends_needed(index: dict[tuple, list[list]], own: list[list], agent_id: str) -> list[list]:
    """Of the drain's list of every agent's TCP ends ([agent id, lip, lport, rip, rport, state]), the rows an agent
    needs: the other ends of its own connections (own: its suspend ack's [lip, lport, rip, rport, state]), held by
    other agents - what agent/phases.py matches them against (engine/fds/tcp/drain.py _remote_state). index: the
    rows by (lip, lport, rip, rport) (index_ends)."""
    out = []
    for e in own:
        if len(e) >= 4:
            out += [r for r in index.get((e[2], e[3], e[0], e[1]), []) if r[0] != agent_id]
    return out


def index_ends(rows: list[list]) -> dict[tuple, list[list]]:
    index: dict[tuple, list[list]] = {}
    for r in rows:
        if len(r) >= 5:
            index.setdefault((r[1], r[2], r[3], r[4]), []).append(r)
    return index


def named(a: Agent, msg: dict) -> list[dict]:
    """An agent's image entries, each naming its agent (the coordinator names a plain agent's itself; a restart's
    gate waits for every agent the manifest names)."""
    return [{**img, "agent_id": img.get("agent_id") or a.agent_id} for img in msg.get("images") or []]


@dataclass
class Tally:
    generation: int
    members: dict[bytes, Agent]           # the agents taking part (those welcomed when the round began)
    phase: str = ""
    acks: dict[bytes, dict] = field(default_factory=dict)
    acked: bool = False                   # the phase's aggregate went up
    pending: set[bytes] = field(default_factory=set)        # forked: images still being written
    ends: dict[bytes, list] = field(default_factory=dict)   # each agent's own TCP ends (its suspend ack)
    durable: dict[bytes, dict] = field(default_factory=dict)   # agent -> its images and stats once on disk
    written_sent: bool = False
    last_progress: float = field(default_factory=time.monotonic)

    def begin(self, phase: str) -> None:
        self.phase = phase
        self.acks = {}
        self.acked = False
        self.last_progress = time.monotonic()

    def ack(self, ident: bytes, msg: dict) -> dict | None:
        """Take one agent's ack; the aggregate to send up once it is due (all acked, or the first failure)."""
        if self.acked or ident not in self.members or msg.get("phase") != self.phase or \
                msg.get("generation") != self.generation:
            return None
        self.acks[ident] = msg
        self.last_progress = time.monotonic()
        if self.phase == "suspend":
            self.ends[ident] = list(msg.get("tcp_ends") or [])
        if self.phase == "checkpoint" and msg.get("ok"):
            if msg.get("pending"):
                self.pending.add(ident)
            else:
                self.durable[ident] = msg
        if not msg.get("ok", False) or len(self.acks) >= len(self.members):
            return self.aggregate()
        return None

    def aggregate(self, error: str | None = None) -> dict:
        """The relay's ack of the phase (error: the relay's own reason to fail it, a slow agent)."""
        self.acked = True
        acks = [(self.members[i], m) for i, m in self.acks.items() if i in self.members]
        failed = [(a, m) for a, m in acks if not m.get("ok", False)]
        msg: dict[str, Any] = {"type": "ack", "phase": self.phase, "generation": self.generation,
                               "ok": not failed and error is None, "error": None}
        if failed:
            a, m = failed[0]
            msg["error"] = f"{a.name()}: {m.get('error') or 'failed'}"
        elif error is not None:
            msg["error"] = error
        ends = [[a.agent_id] + list(e) for a, m in acks for e in m.get("tcp_ends") or []]
        if self.phase == "suspend":
            msg["tcp_ends"] = ends
        if self.phase == "checkpoint":
            msg["pending"] = bool(self.pending)
            if not self.pending:
                msg["images"] = [img for a, m in acks for img in named(a, m)]
        stats = [m["stats"] for _, m in acks if m.get("stats")]
        if stats:
            msg["stats"] = merge_stats(stats)
        return msg

    def written(self, ident: bytes, msg: dict) -> dict | None:
        """One agent's forked images are durable (or failed); the relay's `written` once all are (or the first
        failure)."""
        if self.written_sent or ident not in self.pending or msg.get("generation") != self.generation:
            return None
        self.last_progress = time.monotonic()
        if not msg.get("ok"):
            self.written_sent = True
            return {"type": "written", "generation": self.generation, "ok": False,
                    "error": f"{self.members[ident].name()}: {msg.get('error') or 'writing images failed'}"}
        self.durable[ident] = msg
        if not self.pending.issubset(self.durable):
            return None
        return self.all_written()

    def all_written(self) -> dict:
        self.written_sent = True
        rows = [(a, self.durable[i]) for i, a in self.members.items() if i in self.durable]
        return {"type": "written", "generation": self.generation, "ok": True,
                "images": [img for a, m in rows for img in named(a, m)],
                "stats": merge_stats([m.get("stats") or {} for _, m in rows])}

    def drop(self, ident: bytes) -> dict | None:
        """An agent left the round (lost, gone, or it abandoned it after the commit): the phase may now be
        complete without it."""
        self.members.pop(ident, None)
        self.acks.pop(ident, None)
        self.pending.discard(ident)
        self.durable.pop(ident, None)
        if self.members and not self.acked and self.phase and len(self.acks) >= len(self.members):
            return self.aggregate()
        return None

    def written_due(self) -> dict | None:
        if not self.written_sent and self.pending and self.pending.issubset(self.durable):
            return self.all_written()
        return None

    def slow(self) -> list[Agent]:
        """The agents the round waits for."""
        if not self.acked:
            return [a for i, a in self.members.items() if i not in self.acks]
        return [self.members[i] for i in self.pending - set(self.durable) if i in self.members]
