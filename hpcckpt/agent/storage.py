"""The agent's hooks into the multi-level storage (docs/storage.md): where it writes its images, the drain to
the shared level (drain.py) and the partner copies (partner.py). A line each in agent.py calls them.

The drain and the partner sender are threads; what they report (`stored` messages: a copy made, or why not)
goes to the coordinator from the main loop, which alone uses the coordinator's socket: the threads queue it
and wake the loop through the agent's wake-up pipe."""
from __future__ import annotations

import logging
import os
import threading
import time

from ..coordinator import protocol
from ..image import levels
from .base import AgentBase
from .drain import Drain, DrainJob, Pacer
from .partner import PartnerJob, PartnerSender, PartnerServer, local_addresses

log = logging.getLogger("hpcckpt.agent")


class StorageLevels(AgentBase):
    """Mixed into Agent (agent.py)."""
    drain: Drain | None
    partner_server: PartnerServer | None
    partner_sender: PartnerSender | None
    storage_reports: list[dict]
    storage_started: list[int]
    storage_finish: bool
    storage_expect: dict[int, list[str]]

    def _storage_setup(self) -> None:
        self.imgdir = levels.image_root(self.s)         # where this node writes its images
        self.drain = Drain(self.s, self.ckptdir, self.host, self._storage_report) \
            if levels.local_root(self.s) else None
        self.partner_server = self.partner_sender = None
        self.storage_lock = threading.Lock()
        self.storage_reports = []
        self.storage_started: list[int] = []       # generations whose copies started (a kcheckpoint's: twice)
        self.storage_finish = False
        self.storage_expect = {}       # generation -> hosts sending us their partner copies (a kcheckpoint's)
        self.storage_killed: int | None = None     # the kcheckpoint's generation

    def _storage_retarget(self) -> None:
        """The coordinator's welcome named another checkpoint directory (base.adopt_ckptdir)."""
        self.imgdir = levels.local_root(self.s) or self.ckptdir
        if self.drain is not None:
            self.drain.ckptdir = self.ckptdir

    def _storage_written(self, c, path: str) -> None:
        """(writer thread) An image is durable on the local level: drain: sync copies it now; the first image
        starts our partner server, whose addresses go to the coordinator in the checkpoint's stats (it pairs the
        agents and tells each where to send: the committed message)."""
        with self.storage_lock:
            c.stats["drain"] = self.s.drain if self.drain is not None else None
            if self.s.partner and self.drain is not None and self.partner_server is None and self.computation:
                self.partner_server = PartnerServer(self.imgdir, self.computation)
            if self.partner_server is not None:
                c.stats["partner_addr"] = {"addresses": local_addresses(), "port": self.partner_server.port}
        if self.drain is not None and self.s.drain == "sync":
            self.drain.copy_now(self.computation or "", c.generation, path)
            c.stats["drained"] = True

    def _storage_committed(self, gen: int, partner: dict | None = None, partner_copy: bool = True) -> None:
        """The generation is complete on the local level everywhere: the partner copy (to the agent the
        coordinator named), the drain (async), keep_local. Once per generation."""
        if self.drain is None or not self.computation or gen in self.storage_started:
            return
        self.storage_started = self.storage_started[-15:] + [gen]
        written = list(self.pending_prev.get(gen, {}).values())          # [(path, needs)]
        mine = [p for p, _ in written]
        if partner and partner.get("expect"):
            self.storage_expect[gen] = [str(h) for h in partner["expect"]]
        if self.s.partner and mine and partner_copy:
            if self.partner_sender is None:
                # (not paced by drain_rate: that protects the shared filesystem; this goes over the network)
                self.partner_sender = PartnerSender(self.ckptdir, self.agent_id, self.host, Pacer(),
                                                    self._storage_report)
            self.partner_sender.submit(PartnerJob(self.computation, gen, mine, partner))
        self.drain.submit(DrainJob(self.computation, gen, mine, {n for _, needs in written for n in needs}))

    def _storage_kill(self, gen: int) -> None:
        """(kcheckpoint) The generation is committed and the job is about to be killed. The node-local level does
        not outlive a batch job ($TMPDIR goes with it): the agent finishes, before it exits (_storage_finish), the
        partner copies (its own, sent at the committed message the coordinator sends before the kill, and the
        ones it keeps for others) and the drain. Without partner copies the drain starts here."""
        self._storage_committed(gen, partner_copy=False)      # (already started if the partner was named)
        self.storage_killed = gen
        self.storage_finish = self.drain is not None and (self.s.drain == "async" or self.partner_sender is not None
                                                          or gen in self.storage_expect)

    def _storage_finish(self) -> None:
        """(the agent exits) After a kcheckpoint, wait (up to the phase timeout in all) for the partner copies,
        sent and received, then the drain; the coordinator hears of them (stored) before our bye."""
        gen = self.storage_killed
        if not self.storage_finish or self.drain is None or gen is None:
            return
        t0 = time.monotonic()
        give_up = t0 + self.s.phase_timeout
        what = [w for w, on in (("the partner copies", self.partner_sender is not None or gen in self.storage_expect),
                                (f"the drain to {self.ckptdir}", self.s.drain == "async")) if on]
        log.info("the job was killed after its checkpoint: finishing %s first (up to %.0f s)", " and ".join(what),
                 self.s.phase_timeout)
        sender = self.partner_sender
        while sender is not None and not sender.idle() and time.monotonic() < give_up:
            time.sleep(0.05)
        if sender is not None and not sender.idle():
            log.error("generation %d: our partner copy was not made within %.0f s; the generation stays on this "
                      "node only until its drain", gen, self.s.phase_timeout)
        expect = self.storage_expect.get(gen, [])
        if expect and self.partner_server is not None:
            got = self.partner_server.wait_received(gen, len(expect), max(0.0, give_up - time.monotonic()))
            if len(got) < len(expect):
                log.error("generation %d: the partner copy from %s did not arrive within %.0f s; not keeping it",
                          gen, ", ".join(sorted(set(expect) - set(got)) or expect), self.s.phase_timeout)
            else:
                log.info("partner copies of generation %d kept here for %s", gen, ", ".join(got))
        if self.s.drain == "async":
            if self.drain.wait_idle(max(0.0, give_up - time.monotonic())):
                log.info("drain finished in %.1f s", time.monotonic() - t0)
            else:
                log.error("the drain to %s did not finish within %.0f s; the shared level keeps the previous "
                          "generation", self.ckptdir, self.s.phase_timeout)
        self._storage_flush()        # (the partner copy's report: the generation is complete at the coordinator)

    def _storage_report(self, generation: int, level: str, ok: bool, **extra) -> None:
        """(drain and partner threads) Queue a `stored` report and wake the main loop (_storage_flush)."""
        msg = protocol.Stored(generation, level, ok, **extra).to_dict()
        with self.storage_lock:
            self.storage_reports.append(msg)
        try:
            os.write(self.wake_w, b"s")
        except BlockingIOError:          # (the pipe is full: the loop is awake anyway)
            pass

    def _storage_flush(self) -> None:
        """(main loop) Send the reports the threads queued."""
        with self.storage_lock:
            reports, self.storage_reports = self.storage_reports, []
        for msg in reports:
            self.send(msg)
