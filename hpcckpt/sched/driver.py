"""The batch-job driver: the deadline -> checkpoint -> requeue policy, written once for every scheduler.

It runs as the job's batch script (after `exec`), in the allocation:

  1. picks the checkpoint directory (per job, kept across requeues) and decides: restart from the newest
     complete checkpoint, start fresh (first run, or no checkpoint ever completed), or stop with an error (a
     rerun whose checkpoints are gone would silently redo work); a restart maps the checkpoint's nodes to this
     run's allocation (nodes.py: the nodes it still has keep their part, the others' parts move), stopping with
     an error when the allocation is too small (unless the config's gather);
  2. starts the computation (computation.py: a coordinator and `hpcckpt launch` or `hpcckpt restart`, in
     sessions of their own, so signals the scheduler sends to the job reach the driver, which decides);
  3. watches: the deadline (end time from the scheduler, minus the lead), the early-warning signal, SIGTERM
     (a cancel, or a preemption), and the computation's end;
  4. at the deadline / on the signal / on preemption: takes a blocking checkpoint; if it completed, kills the
     computation and requeues the job; if it failed, keeps the last good checkpoint, says so, and does not
     requeue. No requeue either when the program ended (its exit code is the job's), when the user cancelled,
     or when max_restarts is reached.

Every request it makes (checkpoint, status, kill, scheduler commands, hooks) has a timeout and says so in the
log when it fires: the driver never hangs.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable

from ..agent.sigfd import SignalFd
from ..coordinator.client import CoordinatorUnreachable
from ..faults import fault
from ..image import journal, levels, store
from . import nodes as allocation
from .base import CANCELLED_MARK, Requeued, Scheduler, SchedulerError
from .computation import Computation, ComputationError
from .config import JobConfig

log = logging.getLogger("hpcckpt.batch")

EVER_COMPLETED = ".hpcckpt-checkpointed"    # written once a checkpoint of this job completed
HOOK_TIMEOUT_S = 300.0                      # a pre_checkpoint/post_restart hook may not hold the driver longer


class DriverError(RuntimeError):
    pass


# What schedulers send as a warning before a limit or a kill: Grid Engine's s_rt (SIGUSR1) and -notify
# (SIGUSR1 before a suspend, SIGUSR2 before a kill), Slurm's --signal (the config's signal). Grid Engine sends
# them to every process of the job, whatever its session, so our own daemons and the program must survive them.
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class JobDriver:
    """The policy. computation(ckptdir, cfg, warning signals): makes what runs and checkpoints the computation
    (default: the transparent engine, computation.Computation); is_local(host): is host this machine (a restart
    keeps this machine's part here)."""

    poll_s = 1.0          # how often the deadline and the computation are looked at between signals

    def __init__(self, sched: Scheduler, cfg: JobConfig, command_line: list[str], fail_rc: int = 99,
                 computation: Callable[[str, JobConfig, tuple[int, ...]], Computation] = Computation,
                 is_local: Callable[[str], bool] | None = None):
        self.sched = sched
        self.cfg = cfg
        self.command = command_line
        self.fail_rc = fail_rc
        self.job = sched.job_id()
        # the checkpoint directory stays the same across reruns, and across continuation jobs (PBS), which
        # carry it in HPCCKPT_CKPTDIR
        self.ckptdir = os.path.abspath(cfg.ckptdir or sched.env.get("HPCCKPT_CKPTDIR") or
                                       os.path.join(sched.submit_dir(), f"hpcckpt-{self.job}"))
        sched.env["HPCCKPT_CKPTDIR"] = self.ckptdir
        self.run_no = sched.run_count()
        self.exit_now: int | None = None
        self.comp = computation(self.ckptdir, cfg, self._warnings())
        self.is_local = is_local or (lambda host: False)
        self.last_logged_gen = 0
        self.levels_logged: dict[int, str] = {}
        self.last_ckpt_s: float | None = None
        self.end: float | None = None
        self.end_checked = 0.0
        self.journal_end: float | None = None     # the deadline last written to the event journal
        self.requeued: Requeued | None = None
        self.cancelled = False
        self.status_warned = 0.0
        # when this run began, recorded once: an adapter that cannot learn the run's start from the scheduler
        # uses it (never "now", which would move the deadline with the clock)
        self.started = time.time()
        sched.env["HPCCKPT_STARTED"] = os.environ["HPCCKPT_STARTED"] = f"{self.started:.3f}"

    # ------------------------------------------------------------------------------------------ helpers --
    def _warnings(self) -> tuple[int, ...]:
        own = getattr(signal, "SIG" + self.cfg.signal)
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)
        return tuple(dict.fromkeys(WARNING_SIGNALS + (() if own in stops else (own,))))

    def _latest(self) -> store.Manifest | None:
        return self.comp.latest()

    # ---------------------------------------------------------------------------------------------- run --
    def _count_run(self) -> None:
        """Our own count of runs in the checkpoint directory: exact whatever the scheduler tells (Grid Engine
        only says 'restarted')."""
        path = os.path.join(self.ckptdir, ".hpcckpt-runs")
        try:
            with open(path) as f:
                before = int(f.read().strip() or 0)
        except (OSError, ValueError):
            before = 0
        self.run_no = max(self.run_no, before)
        store.atomic_write(path, f"{self.run_no + 1}\n".encode(), mode=0o600)

    def run(self) -> int:
        os.makedirs(self.ckptdir, mode=0o700, exist_ok=True)
        # every run's decisions also go to one log in the checkpoint directory: with PBS continuation jobs each
        # run has its own .o file, and this is where the whole story stays
        handler = logging.FileHandler(os.path.join(self.ckptdir, "hpcckpt-job.log"))
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{self.job}] %(levelname)s %(message)s"))
        logging.getLogger("hpcckpt").addHandler(handler)
        stop = self.sched.predecessor_stopped(self.ckptdir)
        if stop:
            log.info("job %s: %s; not continuing the chain", self.job, stop)
            return 0
        self._count_run()
        os.environ["HPCCKPT_RUNDIR"] = os.path.join(self.ckptdir, ".run")   # the coordinator's secret lives here
        try:
            latest = self._latest()
        except store.ManifestError as e:
            log.error("cannot restart: %s", e)
            return self.fail_rc
        ever = os.path.exists(os.path.join(self.ckptdir, EVER_COMPLETED))
        log.info("job %s run %d (%s); checkpoints in %s", self.job, self.run_no,
                 "first run" if self.run_no == 0 else "rerun", self.ckptdir)
        try:
            end = self.sched.end_time()
        except SchedulerError:
            end = None
        journal.record(self.ckptdir, "run", scheduler=self.sched.name, job=self.job, run=self.run_no, deadline=end,
                       restart_from=latest.generation if latest else None)
        if self.run_no > 0 and latest is None and ever:
            log.error("this rerun finds no complete checkpoint in %s although one completed before; stopping "
                      "instead of silently redoing the work (restore the checkpoint directory and requeue)",
                      self.ckptdir)
            return self.fail_rc
        restart = latest is not None
        hostfile = None
        try:
            if latest is not None:
                hostfile = self._place(latest)           # which node restarts which part
            else:
                self._record_nodes()
        except allocation.NodeError as e:
            log.error("cannot restart on this allocation: %s", e)
            return self.fail_rc
        if latest is not None:
            log.info("restarting from checkpoint generation %d of %s (%s)", latest.generation,
                     time.strftime("%H:%M:%S", time.localtime(latest.created)), latest.computation)
        elif self.run_no > 0:
            log.info("no checkpoint completed in the earlier run(s): starting afresh")
        try:
            self.comp.start(restart, self.command, hostfile)
        except ComputationError as e:
            raise DriverError(str(e)) from None
        if restart and self.comp.wait_joined() and self.cfg.post_restart:
            self._hook("post_restart", self.cfg.post_restart)
        return self._watch()

    def _nodes(self) -> list[str]:
        try:
            return self.sched.node_list()
        except SchedulerError as e:
            log.warning("cannot read the allocation's nodes: %s", e)
            return [os.uname().nodename]

    def _record_nodes(self, nodes: list[str] | None = None) -> None:
        """The allocation's nodes, in its order: the next run orders the checkpoint's hosts by it."""
        nodes = nodes or self._nodes()
        if len(nodes) > 1:
            log.info("this run's nodes: %s", " ".join(nodes))
        allocation.write_allocation(self.ckptdir, nodes)

    def _place(self, latest: store.Manifest) -> str | None:
        """Map the checkpoint's hosts to this run's nodes (sched/nodes.py); a host file for the restart when
        any part moves, else None."""
        old = allocation.ordered_hosts([i.host for i in latest.images], allocation.read_allocation(self.ckptdir))
        new = self._nodes()
        here = next((h for h in old if self.is_local(h)), None)
        mapping = allocation.plan(old, new, self.cfg.gather, here, self.sched.this_node(new))
        self._record_nodes(new)
        moves = {o: n for o, n in mapping.items() if allocation.short(o) != allocation.short(n)}
        if not moves:
            return None
        log.info("the checkpoint ran on %s; this run has %s: %s", " ".join(old), " ".join(new),
                 ", ".join(f"{o} -> {n}" for o, n in moves.items()))
        path = os.path.join(self.ckptdir, ".run", "hostfile")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        allocation.write_hostfile(path, mapping)
        return path

    def _watch(self) -> int:
        warn = getattr(signal, "SIG" + self.cfg.signal)
        notify = signal.SIGUSR2 if warn != signal.SIGUSR2 else None      # Grid Engine's -notify before a kill
        sfd = SignalFd([warn, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD] +
                       ([notify] if notify else []))
        try:
            while True:
                code = self.comp.poll()
                if code is not None:
                    rc = self._finished(code)
                    self._late_signals(sfd)
                    return rc
                ready = select.select([sfd.fd], [], [], self.poll_s)[0]
                if ready:
                    for signo, _, sender in sfd.read():
                        if signo == warn:
                            log.info("got SIG%s from the scheduler (pid %d): time is nearly up", self.cfg.signal,
                                     sender)
                            self._pass_warning_on(warn)
                            self._deadline_reached("warning signal")
                        elif signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                            self._on_term(signo)
                        elif signo == notify:
                            log.info("SIGUSR2: the scheduler is about to stop this job (qdel); no requeue")
                if self.exit_now is not None:
                    self._kill_computation()
                    self._stop_coordinator()
                    self._late_signals(sfd)
                    return self.exit_now
                self._log_checkpoints()
                if not self.requeued and self._deadline_near():
                    self._deadline_reached("wall-time deadline")
        finally:
            sfd.close()

    def _late_signals(self, sfd: SignalFd) -> None:
        """A qdel that arrived while we were stopping (after a PBS continuation was submitted) still counts:
        read what is pending before the signalfd closes (closing it would let SIGTERM kill us unlogged)."""
        select.select([sfd.fd], [], [], 0.2)
        for signo, _, _ in sfd.read():
            if signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._on_term(signo)

    def _pass_warning_on(self, signo: int) -> None:
        """forward_warning_signal: the program gets the warning too. Grid Engine already sent it to every
        process of the job; Slurm's B: and PBS reach only the batch script (us): pass it to our launch process,
        which hands it to the agent, which signals the program."""
        if self.cfg.forward_warning_signal and not self.sched.warns_every_process:
            self.comp.signal(signo)

    def _finished(self, code: int) -> int:
        self._log_checkpoints()
        if self.requeued:
            log.info("computation stopped for the requeue")
            self._stop_coordinator()
            if self.exit_now is not None:
                return self.exit_now          # e.g. 99: Grid Engine reschedules; 0: a PBS continuation follows
            time.sleep(1)
            return 0
        code = code if code >= 0 else 128 - code
        journal.record(self.ckptdir, "end" if not self.cancelled else "stop", job=self.job, code=code)
        if self.cancelled:
            log.info("computation stopped: the job was cancelled (no requeue)")
        else:
            log.info("the program ended with exit code %d; not requeueing", code)
        self._stop_coordinator()
        return code

    # ------------------------------------------------------------------------------------------- policy --
    def _deadline_near(self) -> bool:
        now = time.time()
        if now - self.end_checked > 30 or self.end is None:
            try:
                self.end = self.sched.end_time()
            except SchedulerError as e:
                log.warning("cannot read the job's end time: %s", e)
            self.end_checked = now
            if self.end is not None and self.end != self.journal_end:
                journal.record(self.ckptdir, "deadline", job=self.job, deadline=self.end)
                self.journal_end = self.end
        if self.end is None:
            return False
        return now >= self.end - self.cfg.lead_seconds(self.last_ckpt_s)

    def _on_term(self, signo: int) -> None:
        name = signal.Signals(signo).name
        if self.requeued:
            # the scheduler stops this run after our requeue; but a cancel that lands after a PBS continuation
            # was submitted must stop the chain too
            nxt = self.requeued.continuation
            if nxt and self.sched.cancelled():
                log.info("%s: the job was cancelled after its continuation was submitted; withdrawing it", name)
                self._mark_cancelled()
                self.sched.cancel_continuation(nxt)
            return
        if self.sched.cancelled():
            log.info("%s: the job was cancelled; stopping the computation without requeue", name)
            self.cancelled = True
            self._mark_cancelled()
            self._kill_computation()
            return
        if self.end is not None and time.time() >= self.end - 2:
            # PBS's SIGTERM at the walltime, kill_delay before its SIGKILL: we were late; checkpoint now
            log.info("%s at the job's end time: the limit; checkpointing within the scheduler's grace time", name)
            self._deadline_reached("limit signal")
            return
        action = self.cfg.on_preempt
        log.info("%s without a cancel: preemption (on_preempt: %s)", name, action)
        if action == "ignore":
            return
        self._deadline_reached("preemption", requeue=(action == "requeue"))

    def _mark_cancelled(self) -> None:
        try:
            with open(os.path.join(self.ckptdir, CANCELLED_MARK), "a") as f:
                f.write(self.job + "\n")
        except OSError as e:
            log.warning("cannot record the cancel in %s: %s", self.ckptdir, e.strerror)

    def _deadline_reached(self, why: str, requeue: bool | None = None) -> None:
        if self.requeued:
            return
        requeue = self.cfg.requeue if requeue is None else requeue
        if requeue and self.run_no >= self.cfg.max_restarts:
            log.warning("%s: max_restarts (%d) reached; this run is the last, not requeueing", why,
                        self.cfg.max_restarts)
            requeue = False
        if self.cfg.pre_checkpoint:
            self._hook("pre_checkpoint", self.cfg.pre_checkpoint)
        log.info("%s: checkpointing the computation", why)
        if requeue:      # its progress after the snapshot would be thrown away, and the writers need the cores
            log.info("writing frozen: the job stops after this checkpoint")
        reply = self._checkpoint(frozen=requeue)
        if not reply.get("ok"):
            try:
                last = self._latest()
            except store.ManifestError:
                last = None
            log.error("checkpoint failed: %s; the last good checkpoint (generation %s) is kept; not requeueing",
                      reply.get("error"), last.generation if last else "none")
            return
        self._log_checkpoints(final=True)
        if not requeue:
            return
        levels.wait_drained(self.ckptdir, self._checkpoint_timeout())   # the next run may be on other nodes
        self._kill_computation()
        try:
            done = self.sched.requeue()
        except SchedulerError as e:
            log.error("requeue failed: %s", e)
            return
        self.requeued = done
        how = done.continuation
        journal.record(self.ckptdir, "requeue", job=self.job, continuation=how, generation=reply.get("generation"))
        log.info("job %s %s; the next run restarts from generation %s", self.job,
                 f"continues as job {how}" if how else "requeued", reply.get("generation"))
        fault("batch.after_requeue")
        if done.exit_code is not None:
            self.exit_now = done.exit_code

    def _checkpoint_timeout(self) -> float:
        """How long a deadline checkpoint may take: the config's checkpoint_timeout, else until 5 s before the
        hard limit (at least 30 s), else 15 minutes. Past it the run ends as the limit would end it anyway."""
        if self.cfg.checkpoint_timeout:
            return float(self.cfg.checkpoint_timeout)
        if self.end is not None:
            return max(30.0, self.end - time.time() - 5)
        return 900.0

    def _checkpoint(self, frozen: bool = False) -> dict:
        """Take the deadline checkpoint (the one place: the computation says how), and remember that one
        completed. frozen: the job stops after it (a requeue follows)."""
        reply = self.comp.checkpoint(self._checkpoint_timeout(), frozen=frozen)
        if reply.get("ok"):
            store.atomic_write(os.path.join(self.ckptdir, EVER_COMPLETED), b"")
        return reply

    def _kill_computation(self) -> None:
        self.comp.kill()

    def _stop_coordinator(self) -> None:
        self.comp.stop()

    def _hook(self, name: str, cmd: str) -> None:
        log.info("running %s hook: %s", name, cmd)
        limit = HOOK_TIMEOUT_S
        if self.end is not None:
            limit = max(10.0, min(limit, (self.end - time.time()) / 2))   # leave time for the checkpoint
        try:
            r = subprocess.run(cmd, shell=True, env=self.comp.env(), timeout=limit)
        except subprocess.TimeoutExpired:
            log.warning("%s hook did not finish within %.0f s; going on without it", name, limit)
            return
        if r.returncode != 0:
            log.warning("%s hook exited with %d", name, r.returncode)

    def _log_checkpoints(self, final: bool = False) -> None:
        try:
            st = self.comp.status()
        except CoordinatorUnreachable as e:
            if final or time.monotonic() - self.status_warned > 60:
                log.warning("status request: %s", e)
                self.status_warned = time.monotonic()
            return
        levels.log_changes(st.get("levels") or [], self.levels_logged)    # local / partner / shared per generation
        last = st.get("last_checkpoint")
        if not last or last["generation"] <= self.last_logged_gen and not final:
            return
        self.last_logged_gen = last["generation"]
        self.last_ckpt_s = levels.with_drain(self.ckptdir, last["generation"], last.get("duration_s"))  # (+ drain)
        left = ""
        end = self.end if self.end is not None else None
        if end:
            left = f", {max(0, end - time.time()):.0f} s left before the limit"
        log.info("checkpoint generation %d: %.2f s, %.1f MB, processes stopped %.3f s%s", last["generation"],
                 last.get("duration_s", 0), last.get("bytes_out", 0) / 1e6, last.get("frozen_s", 0), left)

