"""Liveness, the agent's side: is our coordinator still there, and how to get one back when it is not.

The coordinator sends a heartbeat every few seconds (naming the checkpoint round we take part in, if any);
ZeroMQ tells us when the connection closes. The coordinator is *lost* when it is silent for peer_timeout
seconds, when its connection stays closed for a few heartbeats, or when it answers that it does not know us
(a new coordinator on the same port has a new secret). A lost coordinator never stops the job: the agent
says hello again every heartbeat - re-reading the port's secret, naming its computation, processes and agent
id - until a coordinator takes the computation back; if the port stays closed coord_fallback seconds, it asks
the launch for a coordinator (which starts one on this host, on the same port when it can).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..coordinator import protocol
from ..coordinator.client import Connection, port_is_open
from ..image import store
from ..settings import Settings
from .base import AgentBase

log = logging.getLogger("hpcckpt.agent")
STALL_S = 5.0        # a gap this long between two looks at the link: we were stopped or busy, not it silent


class CoordinatorLink:
    def __init__(self, conn: Connection, settings: Settings,
                 find_coordinator: Callable[[], tuple[str, int]] | None = None):
        self.conn = conn
        self.s = settings
        self.find = find_coordinator        # the launch's service process: finds (or starts) a coordinator
        self.heartbeat_s = settings.heartbeat_s()
        now = time.monotonic()
        self.last_heard = now
        self.last_poll = now
        self.joined = True
        self.down_since: float | None = None      # the connection is closed (and not up again) since
        self.lost_since: float | None = None      # we gave the coordinator up at
        self.lost_why = ""
        self.last_reject: str | None = None
        self.rehello = False                      # reconnected: say hello again at once
        self.next_hello = 0.0
        self.hello_every = self.heartbeat_s       # grows while nobody answers (a stopped coordinator reads them all)
        self.closed_since: float | None = None    # nothing listens on the coordinator's port since
        self.next_fallback = 0.0
        self.secret_port: int | None = None       # behind a relay: the coordinator's port, whose secret we sign with

    @property
    def where(self) -> str:
        return f"{self.conn.host}:{self.conn.port}"

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def poll(self) -> None:
        """Take the connection's events, and decide whether the coordinator is lost."""
        now = time.monotonic()
        gap, self.last_poll = now - self.last_poll, now
        if gap > STALL_S:
            # we were not listening (stopped, or busy in a long phase): the coordinator's heartbeats of that
            # time wait unread; its silence is ours
            self.last_heard += gap
        for ev in self.conn.link_events():
            if ev == "down":
                self.down_since = self.down_since or now
            else:
                # connected again: perhaps to a new coordinator on the port, which knows nothing of us
                self.rehello = self.rehello or self.down_since is not None
                self.down_since = None
        if not self.joined:
            return
        if self.silent_for() > self.s.peer_timeout:
            self.lose(f"silent for {self.silent_for():.0f} s")
        elif self.down_since is not None and now - self.down_since > 3 * self.heartbeat_s:
            self.lose("its connection closed")

    def lose(self, why: str) -> None:
        if self.joined:
            log.warning("lost the coordinator %s (%s); the job runs on, waiting for a coordinator to take it back",
                        self.where, why)
            self.joined = False
            self.lost_since = time.monotonic()
            self.lost_why = why
            self.next_hello = 0.0
            self.hello_every = self.heartbeat_s

    def rejoined(self, heartbeat: float) -> None:
        if not self.joined:
            log.info("coordinator %s took the computation back (lost %.0f s before)", self.where,
                     time.monotonic() - (self.lost_since or time.monotonic()))
        self.joined = True
        self.lost_since = None
        self.closed_since = None
        self.heartbeat_s = min(heartbeat, self.s.heartbeat_s())
        self.heard()

    def hello_due(self) -> bool:
        """Lost: time to say hello again? (Refreshes the secret, which a new coordinator on the port rewrote;
        asks for a fallback coordinator when the port stays closed.)"""
        now = time.monotonic()
        if self.rehello and self.down_since is None:
            self.rehello = False           # (the same coordinator answers with a welcome as well)
        elif self.joined or now < self.next_hello:
            return False
        self.next_hello = now + max(1.0, self.hello_every)
        self.hello_every = min(2 * self.hello_every, 30.0)
        self._fallback(now)
        if self.down_since is not None:
            return False              # nothing to talk to (the hello would wait in a queue, with a stale secret)
        try:
            self.conn.key = protocol.read_secret(self.secret_port or self.conn.port)
        except protocol.SecretError as e:
            log.debug("no secret for %s yet: %s", self.where, e)
            return False
        return True

    def _fallback(self, now: float) -> None:
        if self.find is None or not self.s.coord_fallback:
            return
        # (our relay's port taken by another program - it never completes a handshake - is as good as closed)
        stranger = self.secret_port is not None and self.down_since is not None
        if not stranger and port_is_open(self.conn.host, self.conn.port, timeout=0.2):
            self.closed_since = None
            return
        self.closed_since = self.closed_since or now
        if now - self.closed_since < self.s.coord_fallback or now < self.next_fallback:
            return
        self.next_fallback = now + self.s.coord_fallback
        log.warning("no coordinator on %s for %.0f s; asking for one", self.where, now - self.closed_since)
        try:
            host, port = self.find()
        except Exception as e:        # (Fail from the launch's service: it could not start one)
            log.warning("no coordinator to fall back on: %s", e)
            return
        self.conn.retarget(host, port)
        self.secret_port = None        # (the coordinator's own now)
        self.closed_since = None
        self.down_since = now          # until the new connection's handshake


class AgentLiveness(AgentBase):
    """The Agent's side of liveness (a mixin of agent.Agent: uses its link, frozen checkpoint and writes)."""

    def _watch_coordinator(self) -> None:
        """Never frozen for a coordinator that is gone; a lost coordinator replaced (liveness.py)."""
        link = self.link
        link.poll()
        if self.ckpt is not None:
            silent = link.silent_for()
            if not link.joined:
                self._abandon(f"lost the coordinator {link.where} ({link.lost_why})")
            elif link.down_since is not None:
                self._abandon(f"the connection to the coordinator {link.where} closed")
            elif silent > min(self.s.phase_timeout, self.s.peer_timeout):
                self._abandon(f"no word from the coordinator {link.where} for {silent:.0f} s")
        if link.hello_due():
            self.conn.send(self._hello_msg(rejoin=True))

    def _on_coordinator_heartbeat(self, msg: dict) -> None:
        """The coordinator names the round we take part in: ours must be that one, or it is lost."""
        generation = protocol.CoordHeartbeat.from_dict(msg).generation
        if self.ckpt is not None and generation != self.ckpt.generation:
            self._abandon(f"the coordinator no longer runs checkpoint generation {self.ckpt.generation}")
        if self.writing is not None and generation != self.writing.state.generation:
            self._cancel_writes("the coordinator no longer runs this checkpoint")

    def _on_welcome(self, msg: dict) -> None:
        """A coordinator took us back (ours after a pause, or a new one on the port, which adopted the
        computation and its generation numbers)."""
        if msg.get("computation") != self.computation:
            log.error("coordinator %s runs computation %s, not ours (%s)", self.link.where, msg.get("computation"),
                      self.computation)
            return
        self.heartbeat_s = min(float(msg.get("heartbeat", 2.0)), self.s.heartbeat_s())
        self.link.rejoined(self.heartbeat_s)
        self.publish_job_file()
        # images we wrote for rounds that ended without us hearing the outcome: the coordinator knows now
        # (a manifest in our own ckptdir counts too: a coordinator started with another ckptdir knows nothing of it)
        complete = set(msg.get("complete") or []) | set(store.complete_generations(self.ckptdir, self.comp))
        busy = {c.state.generation for c in [self.writing] if c} | {c.generation for c in [self.ckpt] if c} | \
            {msg.get("round")}                     # the round we still take part in may yet commit
        for gen in sorted(set(self.pending_prev) - busy):
            written = self.pending_prev.pop(gen)
            if gen in complete:
                self.prev_images.update(written)
            else:
                store.remove_generation_images(self.ckptdir, self.comp, gen, [p for p, _ in written.values()])
                log.info("images of generation %d removed: it was never committed", gen)
        self.adopt_ckptdir(msg.get("ckptdir"))       # (after: those images were in the directory we used)

    def _abandon(self, why: str) -> None:
        """Give up the round our processes are frozen for, on our own: they run again at once, the coordinator
        (if any) is told. Images not yet reported durable are removed; reported ones are kept until a
        coordinator says whether it committed them (see _on_welcome)."""
        c = self.ckpt
        if c is None:
            return
        self._reap_snapshots([p.cap.snapshot_pid for p in c.pending if p.cap.snapshot_pid])
        frozen = self._resume_frozen()
        if not c.reported and self.computation:
            store.remove_generation_images(self.ckptdir, self.comp, c.generation, c.images)
            self.pending_prev.pop(c.generation, None)
        log.warning("checkpoint generation %d abandoned: %s; processes resumed after %.1f s stopped, %s", c.generation,
                    why, frozen, "images kept until a coordinator says whether it committed them" if c.reported
                    else "its images removed")
        self.send(protocol.Abandon(c.generation, why, self.agent_id).to_dict())
