"""Restart gathering: the agents of a restarted computation (one per host of the checkpoint) meet at the
coordinator, each restores its processes - stopped - and only when every one of them has succeeded are all
released at once. A host that does not come back within the timeout, or an agent whose restore fails, makes
every agent kill what it restored: no partial computation is ever left running. The console's `f` lets the
ones present go on without the missing (DMTCP's "force").

Agents are known by the id they had at the checkpoint (every image records its agent's id and the ids and
hosts of all agents of that checkpoint), so the gate can name the host that is missing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .base import CoordinatorBase

log = logging.getLogger("hpcckpt.coordinator")


@dataclass
class RestartGate:
    computation: str
    generation: int
    expected: dict[str, str]                  # agent id -> host it ran on at the checkpoint
    deadline: float
    joined: dict[bytes, list[str]] = field(default_factory=dict)   # connection -> ids of the agents it restores
    restored: dict[str, str | None] = field(default_factory=dict)  # agent id -> None (ok) or error text
    forced: bool = False
    abandoned: str = ""                       # why the restart's launcher gave up (a host's restart failed)

    @classmethod
    def open(cls, computation: str, generation: int, agents: dict[str, str], timeout: float) -> RestartGate:
        return cls(computation, generation, dict(agents), time.monotonic() + timeout)

    def present(self) -> set[str]:
        return {a for ids in self.joined.values() for a in ids}

    def join(self, ident: bytes, agent_ids: list[str], host: str) -> str | None:
        """Register a restarting agent, which restores the images of agent_ids (one host of the checkpoint, or
        several when a restart gathers them on fewer hosts); returns why it cannot join, or None."""
        again = [a for a in agent_ids if a in self.present()]
        if again:
            return f"the images of {', '.join(self.expected.get(a, a) for a in again)} are already being restarted"
        for a in agent_ids:
            self.expected.setdefault(a, host)    # images without the list of agents (older images)
        self.joined[ident] = list(agent_ids)
        return None

    def report(self, ident: bytes, error: str | None) -> None:
        for a in self.joined.get(ident, []):
            self.restored[a] = error

    def leave(self, ident: bytes) -> bool:
        """An agent went away; True if it had not finished restoring."""
        ids = self.joined.pop(ident, [])
        gone = [a for a in ids if a not in self.restored]
        for a in gone:
            self.restored[a] = "its agent went away during the restore"
        return bool(gone)

    def missing(self) -> dict[str, str]:
        return {a: h for a, h in self.expected.items() if a not in self.present()}

    def failure(self) -> str | None:
        if self.abandoned:
            return self.abandoned
        errors = [f"{self.expected.get(a, '?')}: {e}" for a, e in sorted(self.restored.items()) if e]
        if errors:
            return "restore failed on " + "; ".join(errors)
        if time.monotonic() > self.deadline and not self.forced and self.missing():
            return self.missing_text()
        return None

    def missing_text(self) -> str:
        hosts = ", ".join(f"{h} (agent {a})" for a, h in sorted(self.missing().items()))
        return f"host(s) {hosts} of the checkpoint did not come back; type f at the coordinator's console to " \
               f"go on without them"

    def ready(self) -> bool:
        """Every agent expected (or, forced, every agent present) has restored its processes."""
        waiting_for = self.present() if self.forced else set(self.expected)
        return bool(self.joined) and all(self.restored.get(a, "x") is None for a in waiting_for)


class Restarts(CoordinatorBase):
    """The coordinator's part in restarts and in the rendezvous of restored TCP connections (a mixin of
    Coordinator: uses its peers, send/broadcast and status)."""

    def _gate_join(self, ident: bytes, msg: dict, generation: int) -> str | None:
        if self.gate is None:
            if self.peers:
                return f"this coordinator already runs computation {self.computation}; restart with a new one"
            agents = msg.get("agents") or {msg["agent_id"]: msg.get("host", "?")}
            self.gate = RestartGate.open(msg.get("computation") or "", generation, agents, self.s.restart_timeout)
            log.info("restart of generation %d: waiting for %d host(s): %s", generation, len(agents),
                     ", ".join(sorted(set(agents.values()))))
        elif generation != self.gate.generation:
            return f"its images are of generation {generation}, the restart in progress is of generation " \
                   f"{self.gate.generation}"
        return self.gate.join(ident, [str(a) for a in msg.get("agent_ids") or [msg["agent_id"]]], msg.get("host", "?"))

    def _on_restored(self, ident: bytes, msg: dict) -> None:
        if self.gate is None or ident not in self.gate.joined:
            return
        self.gate.report(ident, msg.get("error"))
        peer = self.peers.get(ident)
        log.info("host %s %s", peer.host if peer else "?",
                 f"failed to restore: {msg['error']}" if msg.get("error") else "restored its processes")
        self._check_gate()

    def _check_gate(self) -> None:
        g = self.gate
        if g is None:
            return
        why = g.failure()
        if why is None and not g.ready():
            return
        self.gate = None
        idents = list(g.joined)
        if why:
            log.error("restart of generation %d abandoned: %s", g.generation, why)
            self.last_failure = {"generation": g.generation, "time": time.time(), "phase": "restart", "error": why}
            self.broadcast({"type": "restart", "go": False, "reason": why}, idents)
        else:
            if g.forced and g.missing():
                log.warning("restart goes on without %s (forced)", ", ".join(sorted(g.missing().values())))
            log.info("every host restored its processes; the computation runs again")
            self.broadcast({"type": "restart", "go": True}, idents)
            for i in idents:
                if i in self.peers:
                    self.peers[i].state = "RUNNING"
        hellos, self.pending_hellos = self.pending_hellos, []
        for ident, m in hellos:
            self._on_hello(ident, m)
        self._write_status()

    # --------------------------------------------------------------------------------------- rendezvous --
    def _on_kv_put(self, ident: bytes, msg: dict) -> None:
        key = str(msg.get("key"))
        self.kv[key] = msg.get("value")
        for w in self.kv_waiters.pop(key, []):
            self.send(w, {"type": "kv", "key": key, "value": self.kv[key], "found": True})

    def _on_kv_get(self, ident: bytes, msg: dict) -> None:
        key = str(msg.get("key"))
        if key in self.kv or not msg.get("wait"):
            self.send(ident, {"type": "kv", "key": key, "value": self.kv.get(key), "found": key in self.kv})
        else:
            self.kv_waiters.setdefault(key, []).append(ident)
