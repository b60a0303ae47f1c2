"""The coordinator's side of the multi-level storage (docs/storage.md; a mixin of Coordinator): it pairs the
agents of a generation for their partner copies (each agent announced its partner listener in its checkpoint
stats; the committed message tells it where to send), collects what the agents report (`stored`: partner copy
made, drain done, or why not), and decides when a generation is *complete*: with partner copies, only once
every node's images are on a second node (or on the shared level), so that losing one node loses no
generation. Until then the restart script, `last_checkpoint` and a blocking checkpoint's reply wait; the
program does not (it runs again as soon as its images are local).

Nothing of this goes through the checkpoint directory: partner copies work between nodes that share none."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..image import journal, levels, store
from . import protocol
from .base import CoordinatorBase, Waiter
from .script import write_restart_script

log = logging.getLogger("hpcckpt.coordinator")

KEEP = 8          # generations whose reports are kept for the status


@dataclass
class GenLevels:
    """What is known of one generation's copies beyond the local level."""
    generation: int
    drain: str | None = None                                  # the agents' drain mode; None: one level
    partner_of: dict[str, dict] = field(default_factory=dict)    # agent id -> its partner's address (planned)
    hosts: dict[str, str] = field(default_factory=dict)          # agent id -> host (of the planned agents)
    partner: dict[str, str] = field(default_factory=dict)        # agent id -> "done" or why not
    shared: dict[str, str] = field(default_factory=dict)         # agent id -> "done", "skipped: ..." or why not
    agents: int = 0
    kill: bool = False                                        # a kcheckpoint's: copies made as the agents exit
    offered: bool = False                                     # some agent has a partner listener (partner: true)
    since: float = field(default_factory=time.monotonic)      # last report (the timeout counts from it)
    complete: bool = True                                     # survives the loss of one node (see module doc)
    error: str | None = None                                  # why it never became complete
    manifest: store.Manifest | None = None                    # for the restart script, written once complete
    record: dict | None = None                                # last_checkpoint, once complete
    waiters: list[Waiter] = field(default_factory=list)       # blocking checkpoints waiting for it

    def partner_state(self) -> str:
        if not self.partner_of:
            return "none" if self.offered else "off"      # (none: every agent on one host)
        failed = [f"{self.hosts.get(a, a)}: {v}" for a, v in self.partner.items() if v != "done"]
        if failed:
            return "failed: " + "; ".join(failed)
        return "done" if set(self.partner) >= set(self.partner_of) else "running"

    def drain_state(self, on_shared: bool) -> str | None:
        if self.drain in (None, "off"):
            return self.drain
        failed = [v for v in self.shared.values() if v != "done" and not v.startswith("skipped")]
        if on_shared:
            return "done"
        if failed:
            return "failed: " + "; ".join(failed)
        if self.shared and all(v.startswith("skipped") for v in self.shared.values()):
            return "skipped"
        return "running"


class StorageState(CoordinatorBase):
    storage: dict[int, GenLevels]

    def _plan_levels(self, generation: int, durable: dict[bytes, dict], kill_after: bool) -> GenLevels:
        """At the commit (local level): the partner of each agent that announced a partner listener, a ring over
        the agents on other hosts (levels.partner_of). A kcheckpoint's too: its agents make them before they exit
        (their committed message, sent before the kill: rounds.py)."""
        gl = GenLevels(generation, agents=len(durable), kill=kill_after)
        offered: dict[str, dict] = {}
        for ident, res in durable.items():
            st = res.get("stats") or {}
            peer = self.peers.get(ident)
            if peer is None:
                continue
            if st.get("drain") is not None:
                gl.drain = str(st["drain"])
            addr = st.get("partner_addr")
            if isinstance(addr, dict):
                offered[peer.agent_id] = {"agent_id": peer.agent_id, "host": peer.host,
                                          "addresses": list(addr.get("addresses") or []), "port": addr.get("port")}
        gl.offered = bool(offered)
        hosts = {a: d["host"] for a, d in offered.items()}
        for a in offered:
            other = levels.partner_of(a, hosts)
            if other is not None:
                gl.partner_of[a] = offered[other]
                gl.hosts[a] = hosts[a]
        # (drain: sync: every image is on the shared level already at the commit: complete whatever the partners)
        synced = bool(durable) and all((res.get("stats") or {}).get("drained") for res in durable.values())
        gl.complete = not gl.partner_of or synced
        self.storage[generation] = gl
        for old in sorted(self.storage)[:-KEEP]:
            self._give_up(self.storage.pop(old), "superseded")
        return gl

    def _partner_for(self, generation: int, agent_id: str) -> dict | None:
        gl = self.storage.get(generation)
        addr = gl.partner_of.get(agent_id) if gl else None
        if gl is None or addr is None or not gl.kill:
            return addr
        # (a kcheckpoint's agent keeps its partner listener up until the copies it keeps arrived: it must know
        # how many to wait for; the hosts, for its log)
        return {**addr, "expect": [gl.hosts.get(a, a) for a, p in gl.partner_of.items() if p["agent_id"] == agent_id]}

    def _wait_complete(self, generation: int, waiters: list[Waiter]) -> bool:
        """(the round ended well) Blocking checkpoints wait until the generation is complete; True if they do."""
        gl = self.storage.get(generation)
        if gl is None or gl.complete or gl.error:
            return False
        gl.waiters.extend(waiters)
        return True

    def _on_stored(self, ident: bytes, msg: dict) -> None:
        m = protocol.Stored.from_dict(msg)
        peer = self.peers.get(ident)
        gl = self.storage.get(int(m.generation))
        if peer is None or gl is None:
            return
        gl.since = time.monotonic()
        what = "done" if m.ok else (m.error or "failed")
        if m.level == "partner":
            gl.partner[peer.agent_id] = what
        elif m.level == "shared":
            gl.shared[peer.agent_id] = what
        self._check_complete(gl)
        if not m.ok and m.level == "partner":
            self._give_up(gl, f"the partner copy of {peer.host} failed: {what}")
        self._write_status()

    def _check_complete(self, gl: GenLevels) -> None:
        """Complete once every partner copy is made, or (even after they failed) once on the shared level."""
        if gl.complete:
            return
        if gl.partner_state() == "done" and not gl.error:
            self._now_complete(gl, "local+partner")
        elif gl.generation in store.complete_generations(self.ckptdir, self.computation or ""):
            self._now_complete(gl, "local+shared")        # (partner copies failed, the drain made it)

    def _now_complete(self, gl: GenLevels, lv: str) -> None:
        gl.complete, gl.error = True, None
        script = None
        if gl.manifest is not None:
            try:
                script = write_restart_script(self.ckptdir, gl.manifest, self.s.coord_host, self.port, self.interval)
            except OSError as e:
                log.error("generation %d: cannot write the restart script in %s: %s", gl.generation, self.ckptdir, e)
        journal.record(self.ckptdir, "level", computation=self.computation, generation=gl.generation, level=lv)
        if gl.record is not None and (not self.last_checkpoint or
                                      self.last_checkpoint.get("generation", 0) <= gl.generation):
            self.last_checkpoint = {**gl.record, "levels": lv, **({"restart_script": script} if script else {})}
        log.info("checkpoint generation %d is complete on levels %s: losing one node loses none of it%s",
                 gl.generation, lv, f"; restart script {script}" if script else "")
        self._answer_waiters(gl, None)
        for older in self.storage.values():          # (their copies no longer matter)
            if older.generation < gl.generation and not older.complete:
                self._give_up(older, f"superseded by generation {gl.generation}")

    def _give_up(self, gl: GenLevels, why: str) -> None:
        if gl.complete or gl.error:
            return
        gl.error = why
        log.error("checkpoint generation %d stays complete on the nodes' local level only: %s; the restart script "
                  "keeps the previous complete generation", gl.generation, why)
        journal.record(self.ckptdir, "level", computation=self.computation, generation=gl.generation,
                       level="local", error=why)
        self._answer_waiters(gl, why)

    def _answer_waiters(self, gl: GenLevels, error: str | None) -> None:
        waiters, gl.waiters = gl.waiters, []
        for w in waiters:
            reply: dict[str, Any] = {"type": "reply", "command": "checkpoint", "ok": error is None,
                                     "generation": gl.generation}
            if error is None:
                reply["checkpoint"] = self.last_checkpoint
            else:
                reply["error"] = (f"generation {gl.generation} is on the nodes' local level only (the program runs "
                                  f"on): {error}")
            self.answer(w, {**self.status(), **reply})

    def _storage_tick(self, now: float) -> None:
        """Partner copies that cannot come any more (an agent left) or made no progress within the phase
        timeout: the generation stays local only."""
        for gl in list(self.storage.values()):
            if gl.complete or gl.error:
                continue        # (one that failed may still complete on the shared level: a drain's report)
            here = {p.agent_id for p in self.peers.values()}
            # (a kcheckpoint's agents leave once their copies are made: a partner gone is no sign of a lost one)
            gone = [gl.hosts.get(a, a) for a in gl.partner_of
                    if gl.partner.get(a) is None and
                    (a not in here or (gl.partner_of[a]["agent_id"] not in here and not gl.kill))]
            self._check_complete(gl)
            if gl.complete:
                continue
            if gone:
                self._give_up(gl, f"the agent on {', '.join(sorted(set(gone)))} (or its partner) left before its "
                                  f"partner copy was made")
            elif now - gl.since > self.s.phase_timeout:
                self._give_up(gl, f"no partner copy progress for {self.s.phase_timeout:.0f} s "
                                  f"({gl.partner_state()})")

    def storage_levels(self) -> list[dict]:
        """The status' `levels`: per recent generation, local / partner / shared / drain and whether it is
        complete (docs/storage.md, "Status and job log")."""
        rows = {r["generation"]: r for r in levels.levels_of(self.ckptdir, self.computation)}
        for g, gl in self.storage.items():
            row = rows.setdefault(g, {"generation": g, "local": True, "shared": False})
            row.update(partner=gl.partner_state(), drain=gl.drain_state(row["shared"]),
                       complete=bool(gl.complete or row["shared"]))
            if gl.error:
                row["error"] = gl.error
        for row in rows.values():
            row.setdefault("partner", None)
            row.setdefault("drain", "done" if row["shared"] and row["local"] else None)
            row.setdefault("complete", bool(row["shared"]))
        return [rows[g] for g in sorted(rows)][-KEEP:]
