"""Liveness, the coordinator's side (a mixin of Coordinator): heartbeats to every agent, agents silent too long
dropped, agents that come back taken back, and a pause of the coordinator itself never blamed on them.

Both sides send a heartbeat every `heartbeat` seconds and give the other up after `peer_timeout` seconds of
silence (Settings; HPCCKPT_PEER_TIMEOUT). The coordinator's heartbeat names the checkpoint round the agent
takes part in (or none): an agent whose processes are frozen for a round its coordinator does not run (any
more) resumes them at once. Agents reconnect with a stable ZeroMQ routing id (the ROUTER hands the identity
over), and a hello from a known agent id is a return, not a new peer.
"""
from __future__ import annotations

import logging
import time

from ..image import store
from . import protocol
from .base import CoordinatorBase, Peer

log = logging.getLogger("hpcckpt.coordinator")

JOIN_GRACE_S = 10.0  # a blocking checkpoint asked of a coordinator just started waits this long for agents to (re)join
STALL_S = 1.0        # a main-loop gap this long (the loop polls every 0.25 s) means we were stopped or starved


class Liveness(CoordinatorBase):
    last_tick: float = 0.0
    last_heartbeat: float = 0.0
    complete_cache: tuple[str, list[int]] | None = None     # (computation, its committed generations)
    agent_index: dict[str, bytes]                            # agent id -> its connection (server.py creates it)
    fresh: protocol.Freshness                                # the replay memory (server.py bind)

    def _liveness_tick(self, now: float) -> None:
        self.complete_cache = None
        gap = now - self.last_tick if self.last_tick else 0.0
        self.last_tick = now
        if gap > STALL_S:
            # our own pause: the peers' silence and the round's lack of progress meanwhile are ours, not theirs
            (log.warning if gap > 5 else log.debug)("coordinator was stalled for %.1f s (stopped or starved); not "
                                                    "counting it against peers", gap)
            for p in self.peers.values():
                p.last_seen += gap
            if self.round is not None:
                self.round.last_progress += gap
        if now - self.last_heartbeat >= self.s.heartbeat_s():
            self.last_heartbeat = now
            r = self.round
            inside = [i for i in self.peers if r is not None and i in r.peers]
            outside = [i for i in self.peers if r is None or i not in r.peers]
            # two broadcasts (each encoded once), not a message encoded per peer: thousands of peers
            if inside:
                assert r is not None
                self.broadcast(protocol.CoordHeartbeat(r.generation, r.phase).to_dict(), inside)
            if outside:
                self.broadcast(protocol.CoordHeartbeat().to_dict(), outside)
        # a scan per batch of messages made each phase O(peers^2) with thousands of peers (bench/scale.py);
        # twice a second is plenty for a timeout of tens of seconds
        if now < self.next_liveness_scan:
            return
        self.next_liveness_scan = now + 0.5
        for ident, peer in list(self.peers.items()):
            if self.gate is not None and ident in self.gate.joined:
                continue          # restoring (big images take long, silently): the restart's own deadline applies
            if now - peer.last_seen > self.s.peer_timeout:
                log.error("peer %d on %s silent for %.0f s; considering it gone (it is taken back if it returns)",
                          peer.peer_id, peer.host, now - peer.last_seen)
                del self.peers[ident]
                if peer.agent_id:
                    self.lost_peers[peer.agent_id] = peer
                self._members_lost(peer)          # a relay's agents (relayed.py)
                self._peer_gone(ident, f"peer {peer.peer_id} on {peer.host} stopped responding", lost=True)

    def _rejoin_grace(self) -> bool:
        """Just started and no agent yet: those of a computation whose coordinator was restarted are reconnecting."""
        return not self.ever_had_peers and time.monotonic() - self.started < JOIN_GRACE_S

    def _add_peer(self, ident: bytes, peer: Peer) -> None:
        """Every peer goes in through here, so that agent_index stays complete."""
        self.peers[ident] = peer
        if peer.agent_id:
            self.agent_index[peer.agent_id] = ident
        # the replay memory's bound grows with the agents: each one's heartbeats fill window / heartbeat of it
        per_agent = protocol.NONCES_PER_AGENT_HEARTBEATS * self.fresh.window / self.s.heartbeat_s() + 64
        self.fresh.max_nonces = max(self.fresh.max_nonces, int(len(self.peers) * per_agent))

    def _known_agent(self, ident: bytes, agent_id: str) -> bytes | None:
        if ident in self.peers:
            return ident
        if not agent_id:
            return None
        # the index, not a scan of every peer per hello (O(peers^2) for thousands joining: 1.6 s at 4096);
        # an entry of a peer gone since is ignored (agent ids are unique among the peers: _rejoin)
        i = self.agent_index.get(agent_id)
        p = self.peers.get(i) if i is not None else None
        return i if p is not None and p.agent_id == agent_id else None

    def _rejoin(self, ident: bytes, msg: dict) -> bool:
        """A hello from an agent we know (same connection or same agent id: it lost us for a while and comes
        back). Takes it back with its peer number; False if it is not one of ours."""
        if msg.get("restart"):
            return False
        agent_id = str(msg.get("agent_id") or "")
        self._member_returns(ident, agent_id)     # straight from an agent its relay stood for (relayed.py)
        old = self._known_agent(ident, agent_id)
        away = old != ident or agent_id in self.lost_peers     # (else: a repeated hello of a peer we still have)
        if old is None and agent_id in self.lost_peers and msg.get("computation") == self.computation:
            old = ident                                   # given up for its silence: it was only slow
            self._add_peer(ident, self.lost_peers[agent_id])
        if old is None:
            return False
        self.lost_peers.pop(agent_id, None)
        peer = self.peers.pop(old)
        if old != ident and self.round is not None and old in self.round.peers:
            # its part of the round went with its old connection (it abandons a round it lost)
            self.round.peers.discard(old)
            self.round.acks.pop(old, None)
            if not self.round.committed:
                self._fail_round(f"peer {peer.peer_id} on {peer.host} reconnected during the checkpoint")
        peer.ident = ident
        peer.last_seen = time.monotonic()
        peer.processes = list(msg.get("processes", peer.processes))
        self._add_peer(ident, peer)
        self.ranks.update(peer.processes, peer.restarted)
        self.generation = max(self.generation, int(msg.get("generation") or 0))
        (log.info if away else log.debug)("peer %d on %s is back (agent %s)", peer.peer_id, peer.host,
                                          peer.agent_id or "?")
        self._welcome(ident, peer)
        return True

    def _complete_generations(self) -> list[int]:
        # read from the checkpoint directory once per batch of messages (_liveness_tick forgets it), not once per
        # hello: thousands of agents join at once, and a commit or prune (_finish_round) forgets it too
        if not self.computation:
            return []
        cached = self.complete_cache
        if cached is None or cached[0] != self.computation:
            cached = self.complete_cache = (self.computation,
                                            store.complete_generations(self.ckptdir, self.computation))
        return list(cached[1])

    def _on_abandon(self, ident: bytes, msg: dict) -> None:
        """An agent gave up a round on its own (lost us, or its job got a termination signal while frozen): its
        processes run again; a round not yet committed cannot be any more."""
        r = self.round
        who = self._known_agent(ident, str(msg.get("agent_id") or ""))
        peer = self.peers.get(who) if who is not None else None
        what = f"peer {peer.peer_id} on {peer.host}" if peer else f"an agent ({msg.get('agent_id')})"
        log.warning("%s abandoned checkpoint generation %s: %s", what, msg.get("generation"), msg.get("reason"))
        if r is None or msg.get("generation") != r.generation or who not in r.peers:
            return
        if not r.committed:
            self._fail_round(f"{what} abandoned it: {msg.get('reason')}")
        elif not r.resumed and not (peer and peer.members):    # (a relay counts its agents itself)
            r.acks[who] = {"ok": True, "phase": r.phase}      # its processes already run
            self._check_round()
