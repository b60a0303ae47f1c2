"""Relays at the coordinator (a mixin of Coordinator): a node's relay (hpcckpt/relay/) is one peer that stands for
every agent of its node. The round counts it as one peer (its acks and `written` are its agents' aggregated);
what is per agent stays per agent here: the peer numbers, the status listing, the agent-id index (prune routing,
an agent that comes back directly when its relay is gone).

A plain agent's path does not come through here (one `if` in the hello and the bye)."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from . import protocol
from .base import CoordinatorBase, Member, Peer

log = logging.getLogger("hpcckpt.coordinator")


class Relayed(CoordinatorBase):
    agent_index: dict[str, bytes]
    next_peer_id: int

    def _add_peer(self, ident: bytes, peer: Peer) -> None:
        raise NotImplementedError

    def _adopt_computation(self, comp: str | None) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- joining --
    def _on_relay_hello(self, ident: bytes, msg: dict) -> None:
        """A relay's hello: first, or again with its agents as they are now (one joined)."""
        peer = self.peers.get(ident)
        rows = [m for m in msg.get("members") or [] if isinstance(m, dict) and m.get("agent_id")]
        new = [str(m["agent_id"]) for m in rows if peer is None or str(m["agent_id"]) not in peer.members]
        if self.round is not None and (peer is None or new):
            # as any hello: its new agents join once the checkpoint in progress is over
            self.pending_hellos = [(i, m) for i, m in self.pending_hellos if i != ident] + [(ident, msg)]
            return
        comp = msg.get("computation")
        if comp and self.computation and comp != self.computation and self.peers and peer is None:
            self.send(ident, {"type": "reject", "reason": f"this coordinator runs computation {self.computation}; "
                                                          f"the relay belongs to computation {comp}"})
            return
        if msg.get("restart"):
            self.send(ident, {"type": "reject", "reason": "a restart's agents join the coordinator directly"})
            return
        if not self.peers:
            self._adopt_computation(comp)
        if peer is None:
            peer = Peer(ident, self.next_peer_id, str(msg.get("host", "?")), int(msg.get("agent_pid", 0)), [],
                        False)
            self.next_peer_id += 1
            self._add_peer(ident, peer)
            log.info("relay %d joined from host %s (pid %d)", peer.peer_id, peer.host, peer.agent_pid)
        peer.last_seen = time.monotonic()
        members: dict[str, Member] = {}
        for m in rows:
            aid = str(m["agent_id"])
            members[aid] = peer.members.get(aid) or self._member_from_elsewhere(aid, peer) or \
                Member(self._next_id(), int(m.get("agent_pid") or 0), [])
            members[aid].processes = list(m.get("processes") or [])
            self.agent_index[aid] = ident
        peer.members = members
        self._relay_processes(peer)
        self.ever_had_peers = True
        welcome = protocol.Welcome(
            peer.peer_id, self.computation, self.interval, self.generation, self.ckptdir, self.s.heartbeat_s(),
            self.s.peer_timeout, self._complete_generations(),
            self.round.generation if self.round and ident in self.round.peers else None,
            peer_ids={aid: m.peer_id for aid, m in members.items()})
        self.send(ident, welcome.to_dict())
        if new:
            log.info("relay %d on %s: %d agent(s), %d new", peer.peer_id, peer.host, len(members), len(new))
        self._write_status()

    def _next_id(self) -> int:
        self.next_peer_id += 1
        return self.next_peer_id - 1

    def _member_from_elsewhere(self, agent_id: str, relay: Peer) -> Member | None:
        """An agent we knew directly (or given up) now behind a relay keeps its peer number."""
        old = self.lost_peers.pop(agent_id, None)
        i = self.agent_index.get(agent_id)
        p = self.peers.get(i) if i is not None and i != relay.ident else None
        if p is not None and p.agent_id == agent_id:
            del self.peers[p.ident]
            self._peer_gone(p.ident, f"peer {p.peer_id} on {p.host} moved behind its node's relay")
            old = p
        elif p is not None and agent_id in p.members:          # from another relay (a new one for its node)
            m = p.members.pop(agent_id)
            if not p.members:
                del self.peers[p.ident]
                self._peer_gone(p.ident, f"relay {p.peer_id} on {p.host} has no agents left", lost=True)
            return m
        return Member(old.peer_id, old.agent_pid, old.processes) if old is not None else None

    def _relay_processes(self, peer: Peer) -> None:
        peer.processes = [p for m in peer.members.values() for p in m.processes]
        self.ranks.update(peer.processes, False)

    # ---------------------------------------------------------------------------------- heartbeats --
    def _members_heard(self, peer: Peer, members: dict) -> None:
        """A relay's heartbeat with its agents' processes that changed."""
        for aid, procs in members.items():
            m = peer.members.get(str(aid))
            if m is not None and isinstance(procs, list):
                m.processes = procs
        self._relay_processes(peer)

    # ---------------------------------------------------------------------------------------- leaving --
    def _member_left(self, ident: bytes, agent_id: str, why: str) -> None:
        """One agent behind a relay left (the relay says which); the relay stays. A round it took part in was
        already told (the relay sends `abandon` for a round before its commit)."""
        peer = self.peers.get(ident)
        if peer is None or peer.members.pop(agent_id, None) is None:
            return
        if self.agent_index.get(agent_id) == ident:
            del self.agent_index[agent_id]
        log.info("agent %s behind relay %d on %s left: %s", agent_id, peer.peer_id, peer.host, why)
        if not peer.members:
            # as a plain agent's last bye (--exit-on-last); the relay says hello again if another agent comes
            del self.peers[ident]
            self._peer_gone(ident, f"relay {peer.peer_id} on {peer.host}: its last agent left ({why})")
            return
        self._relay_processes(peer)
        self._write_status()

    def _members_lost(self, peer: Peer) -> None:
        """A relay given up for its silence: each of its agents is kept as lost, taken back when it returns
        (directly, or behind a new relay) with its peer number."""
        for aid, m in peer.members.items():
            self.lost_peers[aid] = Peer(b"", m.peer_id, peer.host, m.agent_pid, m.processes, False, agent_id=aid)

    def _member_returns(self, ident: bytes, agent_id: str) -> bool:
        """A hello straight from an agent its relay still stands for (the relay died, and the agent fell back to
        us): it becomes a peer of its own with its peer number; a relay left without agents goes."""
        i = self.agent_index.get(agent_id) if agent_id else None
        relay = self.peers.get(i) if i is not None else None
        if relay is None or i == ident or agent_id not in relay.members:
            return False
        m = relay.members.pop(agent_id)
        log.warning("agent %s of relay %d on %s connects directly (its relay gone?)", agent_id, relay.peer_id,
                    relay.host)
        if self.round is not None and relay.ident in self.round.peers and not self.round.committed:
            self._fail_round(f"agent {agent_id} on {relay.host} lost its relay during the checkpoint")
        if not relay.members:
            del self.peers[relay.ident]
            self._peer_gone(relay.ident, f"relay {relay.peer_id} on {relay.host} has no agents left", lost=True)
        else:
            self._relay_processes(relay)
        self.lost_peers[agent_id] = Peer(ident, m.peer_id, relay.host, m.agent_pid, m.processes, False,
                                         agent_id=agent_id)
        return False          # (the hello goes on: a lost peer given back, _rejoin)

    # ------------------------------------------------------------------------------------------- status --
    def _listed_peers(self) -> Iterator[Peer]:
        """Every agent as a peer of its own, those behind a relay included (the status listing)."""
        for p in self.peers.values():
            if not p.members:
                yield p
                continue
            for aid, m in p.members.items():
                yield Peer(p.ident, m.peer_id, p.host, m.agent_pid, m.processes, p.restarted, state=p.state,
                           progress=p.progress, agent_id=aid)

    def _agent_count(self, idents: Iterable[bytes] | None = None) -> int:
        """Agents, not peers: a relay counts for each of its agents (of those peers only, if given)."""
        peers = self.peers.values() if idents is None else (self.peers[i] for i in idents if i in self.peers)
        return sum(len(p.members) or 1 for p in peers)
