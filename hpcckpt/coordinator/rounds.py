"""The checkpoint round at the coordinator (a mixin of Coordinator): start it, broadcast each phase of the barrier
(barrier.py's table), count the acks, commit once every image is durable, and end it - or fail it before the
commit, which aborts it everywhere and keeps the previous checkpoint."""
from __future__ import annotations

import logging
import time

from ..image import journal, store
from . import protocol
from .barrier import REACHED, Round, State
from .base import CoordinatorBase, Waiter, Waiting
from .protocol import Phase

log = logging.getLogger("hpcckpt.coordinator")


class Rounds(CoordinatorBase):
    complete_cache: tuple[str, list[int]] | None = None     # liveness.py's: forgotten once a round ends

    def start_checkpoint(self, kill_after: bool = False, waiter: Waiter | None = None,
                         frozen: bool = False) -> str | None:
        """Begin a checkpoint round; returns an error text if one cannot start now. frozen (and kill_after): the
        computation stops right after this checkpoint, so its images are written while it is stopped rather than
        from snapshots while it runs on - progress that would be thrown away, on cores the writers need."""
        if self.round is not None:
            return f"a checkpoint (generation {self.round.generation}) is already in progress"
        if self.gate is not None:
            return "a restart is in progress (waiting for its hosts)"
        if not self.peers and not (waiter is not None and self._rejoin_grace()):
            return "no processes are connected to this coordinator"
        missing = self.ranks.missing()
        if missing or not self.peers:  # not before every MPI rank is ours (ranks.py); _tick starts it later
            if self.waiting is None:
                self.waiting = Waiting(time.monotonic(), kill_after)
                if missing:
                    log.info("checkpoint waits up to %.0f s for MPI %s to join", self.s.rank_wait,
                             "; ".join(missing))
                else:
                    log.info("checkpoint waits for the agents of the computation to connect (coordinator just "
                             "started)")
            self.waiting.kill_after |= kill_after
            self.waiting.frozen |= frozen
            if waiter is not None:
                self.waiting.waiters.append(waiter)
            return None
        waiters = ([] if self.waiting is None else self.waiting.waiters) + ([waiter] if waiter else [])
        kill_after |= bool(self.waiting and self.waiting.kill_after) or self.s.exit_after_ckpt   # DMTCP's option
        frozen = frozen or kill_after or bool(self.waiting and self.waiting.frozen)
        self.waiting = None
        self.generation += 1
        self.round = Round(self.generation, kill_after, set(self.peers), frozen=frozen)
        self.round.waiters.extend(waiters)
        log.info("checkpoint generation %d of computation %s: %d agent(s)%s", self.generation, self.computation,
                 self._agent_count(), "; writing frozen: the computation stops after this checkpoint" if frozen else "")
        self._broadcast_phase()
        return None

    def _broadcast_phase(self) -> None:
        r = self.round
        assert r is not None
        phase = r.begin_phase()
        log.info("%s", r.acks_text())
        # every agent's TCP ends go with the drain: which connections stay inside the computation. Nothing else
        # of the other agents does: a message that grew with N, sent to N agents, made a round O(N^2) in bytes
        msg = protocol.PhaseMsg(phase, r.generation, self.computation, forked_ok=not r.frozen,
                                tcp_ends=r.endpoints if phase == Phase.DRAIN else None)
        self.broadcast(msg.to_dict(), r.peers)
        self._write_status()

    def _on_request(self, ident: bytes, msg: dict) -> None:
        """A peer asks for a checkpoint (its agent got the checkpoint signal, or the program asked)."""
        if msg.get("cmd") == "checkpoint" and self.round is None and self.peers:
            log.info("checkpoint requested by peer %s", self.peers[ident].peer_id if ident in self.peers else "?")
            self.start_checkpoint()

    def _on_ack(self, ident: bytes, msg: dict) -> None:
        r = self.round
        peer = self.peers.get(ident)
        if r is None or peer is None or msg.get("generation") != r.generation or msg.get("phase") != r.phase:
            log.debug("stale ack %s from %r", msg, ident)
            return
        r.ack(ident, msg)
        if r.phase == Phase.SUSPEND and msg.get("tcp_ends"):
            # (a relay's rows already name their agent)
            r.endpoints.extend(list(e) if peer.members else [peer.agent_id] + list(e) for e in msg["tcp_ends"])
        if r.phase == Phase.RESUME:
            r.frozen_s = max(r.frozen_s, (msg.get("stats") or {}).get("frozen_s", 0.0))
            pending = self.storage.get(r.generation)         # (complete later: its partner copies)
            for rec in (self.last_checkpoint, pending.record if pending else None):
                if rec and rec.get("generation") == r.generation:
                    rec["frozen_s"] = r.frozen_s
        reached = REACHED.get(r.phase) if r.phase is not None else None
        if reached is not None:
            peer.state = reached.value
        if not msg.get("ok", False):
            log.error("peer %d failed %s: %s", peer.peer_id, r.acks_text(), msg.get("error"))
        elif log.isEnabledFor(logging.DEBUG):      # (not the text per ack when it is not logged: 4096 a phase)
            log.debug("%s peer=%d", r.acks_text(), peer.peer_id)
        self._check_round()

    def _check_round(self) -> None:
        r = self.round
        if r is None or not r.complete():
            return
        failures = r.failed_acks()
        if failures and not r.committed:
            self._fail_round("; ".join(failures))
            return
        if failures:
            log.error("after the commit, %s failed: %s", r.phase, "; ".join(failures))
        state = r.advance()
        if state == State.CHECKPOINTED:
            self._try_commit()
            if self.round is None:
                return
            if r.kill_after and not r.committed:
                return                # kill only once every image is durable (see _on_written)
        if r.phase == Phase.KILL or (state == State.RUNNING and r.phase == Phase.RESUME):
            r.resumed = True
            if r.committed:
                self._finish_round(ok=True)
            else:
                log.info("processes run again; waiting for %d agent(s) to finish writing",
                         self._agent_count(r.peers - set(r.durable)))
            return
        self._broadcast_phase()
        if not r.peers and self.round is r:
            self._check_round()     # every peer left after the commit: a phase sent to no one is complete now

    def _on_written(self, ident: bytes, msg: dict) -> None:
        """A peer's images of a forked checkpoint are durable (or failed to be written)."""
        r = self.round
        if r is None or msg.get("generation") != r.generation or ident not in r.peers:
            return
        r.last_progress = time.monotonic()
        if not msg.get("ok"):
            self._fail_round(msg.get("error") or "writing images failed")
            return
        r.durable[ident] = msg
        self._try_commit()

    def _try_commit(self) -> None:
        r = self.round
        if r is None or r.committed or r.state not in (State.CHECKPOINTED, State.REFILLED, State.RUNNING) \
                or not r.all_durable():
            return
        try:
            self._commit(r)
        except OSError as e:
            self._fail_round(f"could not write the checkpoint manifest/restart script in {self.ckptdir}: {e}")
            return
        if r.kill_after and r.state == State.CHECKPOINTED:
            for ident, peer in self.peers.items():   # a kcheckpoint's partners, before the kill: the agents make
                if (addr := self._partner_for(r.generation, peer.agent_id)) is not None:    # the copies, then exit
                    self.send(ident, protocol.Committed(r.generation, [], addr).to_dict())
            self._broadcast_phase()      # now the kill
        elif r.resumed:
            self._finish_round(ok=True)

    def _check_waiting(self, now: float) -> None:
        w = self.waiting
        if w is None:
            return
        if not self.peers:
            if not self._rejoin_grace():       # (every agent left while the checkpoint waited)
                self.waiting = None
                self._refuse_waiters(w, "no processes are connected to this coordinator", failure=False)
        elif not self.ranks.missing():
            self.start_checkpoint()
        elif now - w.since > self.s.rank_wait:
            self.waiting = None
            why = (f"MPI {'; '.join(self.ranks.missing())} never joined the computation within "
                   f"{self.s.rank_wait:.0f} s: started on a host or by a launcher that hpcckpt does not wrap? "
                   f"A checkpoint without them could not be restarted")
            log.error("checkpoint not taken: %s", why)
            self._refuse_waiters(w, why)

    def _refuse_waiters(self, w: Waiting, why: str, failure: bool = True) -> None:
        if failure:
            self.last_failure = {"generation": None, "time": time.time(), "phase": "start", "error": why}
        for waiter in w.waiters:
            self.answer(waiter, {**self.status(), "type": "reply", "command": "checkpoint", "ok": False,
                                 "error": why})
        self._reset_interval()

    def _fail_round(self, why: str) -> None:
        r = self.round
        assert r is not None
        log.error("checkpoint generation %d failed in phase %s: %s; the previous checkpoint is kept", r.generation,
                  r.phase, why)
        r.error = why
        self.broadcast(protocol.PhaseMsg(Phase.ABORT, r.generation, self.computation, reason=why).to_dict(),
                       r.peers)
        self.last_failure = {"generation": r.generation, "time": time.time(), "phase": r.phase, "error": why}
        self._finish_round(ok=False)

    def _finish_round(self, ok: bool) -> None:
        r = self.round
        assert r is not None
        self.round = None
        self.complete_cache = None                # a generation committed or pruned
        written = self._written(r)
        journal.record(self.ckptdir, "checkpoint", computation=self.computation, generation=r.generation, ok=ok,
                       phase=None if ok else r.phase, error=None if ok else r.error,
                       duration_s=round(time.time() - r.started, 3), **written)
        if ok:
            # retention, once the new generation is complete: each agent deletes its own images, we the manifests
            self._send_committed(r.generation, self._prune_images())
            for gen in self._prune_list():
                store.remove_manifest(self.ckptdir, self.computation or "", gen)
        waiters = [] if ok and self._wait_complete(r.generation, r.waiters) else r.waiters  # (partner copies)
        for w in waiters:
            reply = {"type": "reply", "command": "checkpoint", "ok": ok, "generation": r.generation, **written}
            if ok:
                reply["checkpoint"] = self.last_checkpoint
            else:
                reply["error"] = r.error
            self.answer(w, {**self.status(), **reply})
        for p in self.peers.values():
            p.state = "RUNNING"
            p.progress = {}
        self._reset_interval()
        hellos, self.pending_hellos = self.pending_hellos, []
        for ident, msg in hellos:
            self._on_hello(ident, msg)
        self._write_status()

    @staticmethod
    def _written(r: Round) -> dict:
        """How the round's images were written: "frozen" (asked for) or "forked", and the snapshot forks the
        agents made (their checkpoint stats): 0 when frozen, also when a forked round fell back (no memory)."""
        return {"written": "frozen" if r.frozen else "forked",
                "snapshots": sum(int((m.get("stats") or {}).get("snapshots", 0)) for m in r.results.values())}

    def _send_committed(self, generation: int, prune: list[dict]) -> None:
        """Tell every agent the generation is complete, each with the retired images that are its own to delete:
        all of them to everyone was O(N^2) bytes a round (issue 20). An image goes to the agents on its host (as
        the agents filter), to the one that wrote it alone when it is among them."""
        on_host: dict[str, list[bytes]] = {}
        by_agent: dict[tuple[str, str], bytes] = {}
        for ident, peer in self.peers.items():
            on_host.setdefault(peer.host, []).append(ident)
            by_agent[(peer.host, peer.agent_id)] = ident
            for aid in peer.members:          # a relay: its agents' images, which it splits among them
                by_agent[(peer.host, aid)] = ident
        mine: dict[bytes, list[dict]] = {}
        for e in prune:
            writer = by_agent.get((e["host"], e.get("agent_id") or ""))
            for ident in [writer] if writer is not None else on_host.get(e["host"], []):
                mine.setdefault(ident, []).append(e)
        partners = {i: p for i, peer in self.peers.items() if (p := self._partner_for(generation, peer.agent_id))}
        for ident in set(mine) | set(partners):        # (each its own partner: O(1) bytes an agent)
            self.send(ident, protocol.Committed(generation, mine.get(ident, []), partners.get(ident)).to_dict())
        self.broadcast(protocol.Committed(generation, []).to_dict(),
                       [i for i in self.peers if i not in mine and i not in partners])

    def _reset_interval(self) -> None:
        self.next_interval_ckpt = time.monotonic() + self.interval if self.interval > 0 else None
