"""The checkpoint phases at the agent (a mixin of agent.Agent): the coordinator's `phase` messages, each run by
its method from one table (Phase -> method), for the whole process tree of the job: suspend (freeze every
process) -> drain -> checkpoint (dump) -> refill -> resume, or kill, or abort.

Each phase method is where a step of that phase is added (one call); it acknowledges the phase itself. A phase
that fails before the images are committed (suspend, drain, checkpoint) aborts the round here first, so the
job runs on untouched; the coordinator learns why in one line."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from ..applevel import phases as applevel
from ..coordinator import protocol
from ..coordinator.protocol import Phase, PhaseMsg
from ..engine import dump as engine_dump
from ..engine import tree, wptrack
from ..engine.fds.fdtable import FdTable
from ..engine.fds.tcp import drain as tcpdrain
from ..engine.maps import vmflags_hint
from ..faults import fault
from ..image import runlock, store
from .base import AgentBase, AgentError
from .ckptstate import CheckpointState, PendingImage, fork_fits_in_memory
from .procs import mpi_identity, program_of

log = logging.getLogger("hpcckpt.agent")

# phases whose failure leaves frozen processes or half-written images behind: the agent aborts them itself
ABORT_ON_FAILURE = (Phase.SUSPEND, Phase.DRAIN, Phase.CHECKPOINT)


class Phases(AgentBase):
    def phase_table(self) -> dict[Phase, Callable[[PhaseMsg], None]]:
        """What the agent does for each phase the coordinator broadcasts (coordinator/barrier.py's table)."""
        return {
            Phase.SUSPEND: self._phase_suspend,
            Phase.DRAIN: self._phase_drain,
            Phase.CHECKPOINT: self._phase_checkpoint,
            Phase.REFILL: self._phase_refill,
            Phase.RESUME: self._phase_resume,
            Phase.KILL: self._phase_kill,
            Phase.ABORT: self._phase_abort,
        }

    def _ack(self, msg: PhaseMsg, ok: bool, error: str | None = None, **extra) -> None:
        self.send(protocol.Ack(msg.phase, msg.generation, ok, error, **extra).to_dict())

    def _on_phase(self, raw: dict) -> None:
        if self.s.engine == "signal":      # application-level mode: nothing frozen (hpcckpt/applevel/)
            return applevel.on_phase(self, raw)
        msg = PhaseMsg.from_dict(raw)
        gen = msg.generation
        log.debug("phase=%s gen=%d", msg.phase, gen)
        self.max_generation = max(self.max_generation, gen)
        try:
            phase = Phase(msg.phase)
        except ValueError:
            self._ack(msg, False, f"unknown phase {msg.phase}")
            return
        try:
            self.phases[phase](msg)
        except Exception as e:   # one line to the coordinator; the job resumes untouched
            log.error("phase %s of generation %d failed: %s", phase, gen, e)
            log.debug("details", exc_info=True)
            if phase in ABORT_ON_FAILURE:
                self._abort(gen, str(e), quiet=True)
            self._ack(msg, False, f"{self.host}: {e}")

    # ------------------------------------------------------------------------------------- the phases --
    def _phase_suspend(self, msg: PhaseMsg) -> None:
        gen = msg.generation
        self.plugin_event("presuspend", gen)
        if self.aware is not None:      # delayed_checkpoints() blocks end, pre_checkpoint hooks run
            self.aware.before_freeze(gen, self.s.aware_delay_max, self.s.aware_hook_max)
        self._suspend(gen)
        self.plugin_event("precheckpoint", gen)
        c = self.ckpt
        assert c is not None
        self._ack(msg, True, tcp_ends=tcpdrain.connected_ends([fp.pid for fp in c.frozen]))
        fault("agent.after_suspend")      # (tests: a long freeze window, e.g. to lose the coordinator in)

    def _phase_drain(self, msg: PhaseMsg) -> None:
        others = [e for e in msg.tcp_ends or [] if e and e[0] != self.agent_id]
        self._drain(msg.generation, others)
        self._ack(msg, True)

    def _phase_checkpoint(self, msg: PhaseMsg) -> None:
        if self.ckpt is not None:
            # the image records its own agent only: every agent of the checkpoint is in the manifest, whose
            # entries name theirs (a map of all agents sent to all agents was O(N^2) bytes a round)
            self.ckpt.agents = {self.agent_id: self.host}
        images, stats, pending = self._checkpoint(msg.generation, msg.forked_ok)
        self._ack(msg, True, images=images, stats=stats, pending=pending)
        if self.ckpt is not None:
            self.ckpt.reported = not pending

    def _phase_refill(self, msg: PhaseMsg) -> None:
        self._refill()
        self._ack(msg, True)

    def _phase_resume(self, msg: PhaseMsg) -> None:
        c = self.ckpt
        frozen = self._resume_frozen()
        if c is not None and c.pending:
            self._start_writes(c)          # images of a forked checkpoint, while the job runs
        self._ack(msg, True, stats={"frozen_s": frozen})
        if self.aware is not None:
            self.aware.resumed(msg.generation)
        self.plugin_event("resume", msg.generation)

    def _phase_kill(self, msg: PhaseMsg) -> None:
        self._ack(msg, True)
        self._storage_kill(msg.generation)       # (the drain, finished before the agent exits: storage.py)
        self._kill_job("checkpointed and killed (kcheckpoint)")

    def _phase_abort(self, msg: PhaseMsg) -> None:
        self._abort(msg.generation, msg.reason or "")

    # ---------------------------------------------------------------------------------------- the work --
    def _suspend(self, gen: int) -> None:
        live = [p.pid for p in self.job() if not p.zombie]
        engine_dump.check_supported(live)        # refuse before touching anything
        self.ckpt = CheckpointState(gen)
        for pid in live:                         # smaps is slow: read it before the processes stop
            try:
                self.ckpt.hints[pid] = vmflags_hint(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        t0 = time.monotonic()
        frozen = tree.freeze_all(self.job)
        self.ckpt.frozen = [frozen[p] for p in sorted(frozen)]
        self.ckpt.procs = {p.pid: p for p in self.job()}
        self.ckpt.frozen_at = t0
        self.ckpt.stats["freeze_s"] = round(time.monotonic() - t0, 6)
        self.ckpt.stats["processes"] = len(frozen)

    def _drain(self, gen: int, remote_ends: list | None = None) -> None:
        """Take the bytes in flight out of the job's TCP connections (every process of the computation, on
        every host, is frozen now)."""
        c = self.ckpt
        if c is None or c.generation != gen:
            raise AgentError(f"drain of generation {gen} without a suspend")
        t0 = time.monotonic()
        c.drainer = tcpdrain.Drainer([fp.pid for fp in c.frozen], remote_ends, f"{self.computation}/{gen}")
        c.drained = c.drainer.drain()
        c.stats["drain_s"] = round(time.monotonic() - t0, 6)
        c.stats["drained_bytes"] = sum(len(d.data) for d in c.drained.values() if d.consumed)

    def _refill(self) -> None:
        c = self.ckpt
        if c is not None and c.drainer is not None:
            try:
                c.drainer.refill()
            finally:
                c.drainer.close()
                c.drainer = None

    def _checkpoint(self, gen: int, forked_ok: bool = True) -> tuple[list[dict], dict, bool]:
        """Capture every frozen process; with forked checkpoints make snapshots (images written after resume),
        else write the images now. Returns (images written, stats, images still to come)."""
        c = self.ckpt
        if c is None or c.generation != gen:
            raise AgentError(f"checkpoint of generation {gen} without a suspend")
        gdir = store.generation_dir(self.imgdir, self.comp, gen)
        try:       # checked, never through another user's directory or link (safefs); the computation's lock
            gdir = store.make_generation_dir(self.imgdir, self.comp, gen)
            runlock.hold(self.ckptdir, self.comp)
        except OSError as e:
            raise AgentError(f"cannot use checkpoint directory {gdir}: {e.strerror or e}") from None
        if not os.access(gdir, os.W_OK | os.X_OK):
            raise AgentError(f"checkpoint directory {gdir} is not writable")
        fdt = FdTable([fp.pid for fp in c.frozen], stdio_pid=os.getpid(), drained=c.drained)
        fdt.scan()
        t0 = time.monotonic()
        todo: list[PendingImage] = []
        track = self.s.incremental and self.s.write_tracking
        self.trackers = {fp.pid: self.trackers.get(fp.pid) or wptrack.Tracker(fp.pid) for fp in c.frozen} \
            if track else {}
        for fp in c.frozen:
            info = c.procs.get(fp.pid)
            zombies = [{"pid": z.pid, "pgid": z.pgid, "sid": z.sid, "status": z.exit_code}
                       for z in c.procs.values() if z.zombie and z.ppid == fp.pid]
            place = engine_dump.Placement(
                fdt.records.get(fp.pid, []), fdt.objects_of(fp.pid), fdt.blobs_of(fp.pid),
                pgid=info.pgid if info else 0, sid=info.sid if info else 0, root=(fp.pid == self.root.pid),
                zombies=zombies)
            program = self.root.program if fp.pid == self.root.pid else program_of(fp.pid)
            uid = self.unique_id(fp.pid)
            path = os.path.join(gdir, store.image_name(program, uid))
            c.images.append(path)
            cap = engine_dump.capture(fp, place, self.pid_namespace, vmflags_hint=c.hints.get(fp.pid),
                                      forked=forked_ok and self.s.forked, tracker=self.trackers.get(fp.pid),
                                      generation=gen)
            todo.append(PendingImage(cap, path, program, uid, (mpi_identity(fp.pid) or {}).get("rank")))
        c.stats["capture_s"] = round(time.monotonic() - t0, 6)
        if not forked_ok and self.s.forked:
            log.info("checkpoint generation %d: writing frozen: the computation stops after this checkpoint", gen)
        if forked_ok and self.s.forked and fork_fits_in_memory([p.cap.fp.pid for p in todo]):
            for p in todo:
                info = c.procs.get(p.cap.fp.pid)
                engine_dump.snapshot(p.cap, parent_is_agent=bool(info and info.ppid == os.getpid()))
        c.pending = [p for p in todo if p.cap.snapshot_pid]     # written from their snapshots once the job runs
        c.stats["snapshots"] = len(c.pending)                   # 0: written frozen (the coordinator's record)
        # the others now, while frozen; the directory is fsync'ed with them (background.py)
        self._write_images(c, [p for p in todo if not p.cap.snapshot_pid], report=True)
        c.stats.update(dump_s=round(time.monotonic() - t0, 6))
        return list(c.entries), c.stats, bool(c.pending)

    def _resume_frozen(self) -> float:
        """Let the frozen processes run again; returns how long they were stopped."""
        c = self.ckpt
        if c is None:
            return 0.0
        if c.drainer is not None:        # an aborted checkpoint: the drained bytes go back first
            try:
                self._refill()
            except Exception as e:
                log.error("putting drained TCP data back failed: %s", e)
        for fp in c.frozen:
            fp.resume()
        frozen = round(time.monotonic() - c.frozen_at, 6) if c.frozen_at else 0.0
        log.info("checkpoint generation %d: processes were stopped for %.3f s", c.generation, frozen)
        self.ckpt = None
        return frozen

    def _abort(self, gen: int, reason: str, quiet: bool = False) -> None:
        if self.aware is not None:
            self.aware.round_over(gen, False, reason)
        if self.writing is not None and self.writing.state.generation == gen:
            self._cancel_writes(reason)
            return
        c = self.ckpt
        paths = list(c.images) if c is not None and c.generation == gen else []
        # (and images we kept when we abandoned this round ourselves: the coordinator did not commit it)
        paths += [p for p, _ in self.pending_prev.pop(gen, {}).values()]
        if c is not None:
            self._reap_snapshots([p.cap.snapshot_pid for p in c.pending if p.cap.snapshot_pid])
        self._resume_frozen()
        if self.computation:
            store.remove_generation_images(self.imgdir, self.comp, gen, paths)
        if not quiet:
            log.warning("checkpoint generation %d aborted (%s); images removed, job resumed", gen, reason)

    def _prune(self, entries: list[dict]) -> None:
        """Delete this host's images of generations the coordinator retired (retention)."""
        by_gen: dict[int, list[str]] = {}
        for e in entries:
            if e.get("host") == self.host:
                by_gen.setdefault(int(e["generation"]), []).append(e["path"])
        for gen, paths in by_gen.items():
            store.remove_generation_images(self.ckptdir, self.comp, gen, paths)
