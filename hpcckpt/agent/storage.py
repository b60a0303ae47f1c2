"""The agent's hooks into the multi-level storage (docs/storage.md): where it writes its images, the drain to
the shared level (drain.py) and the partner copies (partner.py). A line each in agent.py calls them."""
from __future__ import annotations

import logging
import threading

from ..image import levels
from .base import AgentBase
from .drain import Drain, DrainJob, Pacer
from .partner import PartnerJob, PartnerSender, PartnerServer, publish

log = logging.getLogger("hpcckpt.agent")


class StorageLevels(AgentBase):
    """Mixed into Agent (agent.py)."""
    drain: Drain | None
    partner_server: PartnerServer | None
    partner_sender: PartnerSender | None
    storage_agents: dict[int, dict]

    def _storage_setup(self) -> None:
        self.imgdir = levels.image_root(self.s)         # where this node writes its images
        self.drain = Drain(self.s, self.ckptdir, self.host) if levels.local_root(self.s) else None
        self.partner_server = self.partner_sender = None
        self.storage_agents = {}
        self.storage_lock = threading.Lock()

    def _storage_retarget(self) -> None:
        """The coordinator's welcome named another checkpoint directory (base.adopt_ckptdir)."""
        self.imgdir = levels.local_root(self.s) or self.ckptdir
        if self.drain is not None:
            self.drain.ckptdir = self.ckptdir

    def _agents_of(self, gen: int) -> dict[str, str]:
        """Every agent of a generation and its host, from the coordinator's local manifest (the checkpoint
        phase no longer sends every agent the map of all agents: O(N^2) bytes a round)."""
        try:
            m = levels.read_local_manifest(self.ckptdir, self.comp, gen)
        except Exception as e:        # (no partner this round; the drain still runs)
            log.debug("generation %d: no local manifest to find a partner in: %s", gen, e)
            return {}
        return {e.agent_id: e.host for e in m.images if e.agent_id}

    def _storage_written(self, c, path: str) -> None:
        """(writer thread) An image is durable on the local level: drain: sync copies it now; the first image
        starts our partner server (every agent writes before any generation commits)."""
        with self.storage_lock:
            self.storage_agents[c.generation] = dict(c.agents or {})
            c.stats["drain"] = self.s.drain if self.drain is not None else None
            if self.s.partner and self.drain is not None and self.partner_server is None and self.computation:
                self.partner_server = PartnerServer(self.imgdir, self.computation)
                publish(self.ckptdir, self.computation, self.agent_id, self.host, self.partner_server.port)
        if self.drain is not None and self.s.drain == "sync":
            self.drain.copy_now(self.computation or "", c.generation, path)
            c.stats["drained"] = True

    def _storage_committed(self, gen: int) -> None:
        """The generation is complete on the local level everywhere: the partner copy, the drain (async),
        keep_local."""
        if self.drain is None or not self.computation:
            return
        written = list(self.pending_prev.get(gen, {}).values())          # [(path, needs)]
        mine = [p for p, _ in written]
        agents = self.storage_agents.pop(gen, {})
        if self.s.partner and len(agents) < 2:
            agents = self._agents_of(gen) or agents
        if self.s.partner and mine:
            if self.partner_sender is None:
                # (not paced by drain_rate: that protects the shared filesystem; this goes over the network)
                self.partner_sender = PartnerSender(self.ckptdir, self.agent_id, self.host, Pacer())
            self.partner_sender.submit(PartnerJob(self.computation, gen, mine, agents))
        self.drain.submit(DrainJob(self.computation, gen, mine, {n for _, needs in written for n in needs}))
