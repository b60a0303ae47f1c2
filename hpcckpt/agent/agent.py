"""The per-node agent: owns the job's processes (it is their ancestor: the init of their PID namespace, or a
child subreaper), talks to the coordinator and runs the checkpoint phases locally for the whole process tree:
suspend (freeze every process) -> drain -> checkpoint (dump) -> refill -> resume.

All ptrace work happens on the agent's main thread (ptrace is per tracer thread); ZeroMQ's I/O threads and
the compression pool never trace.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict

import zmq

from .. import plugins
from ..coordinator.client import Connection, CoordinatorUnreachable
from ..engine import dump as engine_dump
from ..engine import tree, wptrack
from ..engine.fds.fdtable import FdTable
from ..engine.fds.tcp import drain as tcpdrain
from ..engine.forker import left_snapshot
from ..engine.maps import vmflags_hint
from ..faults import fault
from ..image import runlock, store
from ..settings import Settings
from . import remoteio
from .aware_server import AwareServer
from .background import BackgroundWrites
from .ckptstate import BackgroundWrite, CheckpointState, PendingImage, fork_fits_in_memory
from .extensions import Extensions
from .liveness import AgentLiveness, CoordinatorLink
from .namespaces import install_init_handlers
from .procs import JobProcess, mpi_identity, new_agent_id, new_unique_id, program_of
from .sigfd import SignalFd

log = logging.getLogger("hpcckpt.agent")

WALL = 0x40000000
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)   # the job must act on these now, frozen or not


class AgentError(Exception):
    """A failure of ours (not the program's): reported in one line, exit with DMTCP_FAIL_RC."""


class Agent(AgentLiveness, BackgroundWrites, Extensions):
    def __init__(self, settings: Settings, conn: Connection, processes: list[JobProcess], *,
                 computation: str | None = None, restarted_generation: int | None = None,
                 pid_namespace: bool = False, not_job: set[int] | None = None, agent_id: str | None = None,
                 agents: dict | None = None):
        """processes: the job's processes known at start; the first is the root, whose exit ends the job.
        not_job: children of ours that are not part of the job (e.g. the coordinator service process).
        agent_id: ours, kept across restarts (images record it); agents: for a restart, every agent (id -> host)
        of the checkpoint, which the coordinator waits for before any process runs."""
        self.not_job = set(not_job or ())
        self.s = settings
        self.conn = conn
        self.root = processes[0]
        self.uids = {p.pid: p.unique_id for p in processes}       # stable ids, kept across restarts
        self.computation = computation
        self.restarted_generation = restarted_generation
        self.ckptdir = os.path.abspath(settings.ckptdir)
        self.host = socket.gethostname()
        self.ckpt: CheckpointState | None = None
        self.heartbeat_s = 2.0
        self.last_sent = 0.0
        self.last_listed: list[dict] = []
        self.exit_code: int | None = None
        self.killed = False
        self.sigfd: SignalFd | None = None
        self.pid_namespace = pid_namespace     # we are PID 1 of the job's own namespace
        self.writing: BackgroundWrite | None = None
        self.prev_images: dict[str, tuple[str, list]] = {}    # unique id -> (last committed image, its needs)
        self.trackers: dict[int, wptrack.Tracker] = {}        # pid -> its write tracking (incremental images)
        self.pending_prev: dict[int, dict] = {}                # generation -> images written, not yet committed
        self.write_lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.agent_id = agent_id or new_agent_id()
        self.expected_agents = dict(agents or {})
        self.stash: list[dict] = []            # messages that came while we waited for something else
        self.restart_ids: list[str] = []       # a restart: the agents (of the checkpoint) whose images we restore
        self.job_file: str | None = None       # where the job's ssh/srun shims find the coordinator
        self.on_root_exit = None               # called with the root's status when others live on (cli/jobrun.py)
        self.root_gone_told = False
        self.aware: AwareServer | None = None  # the program API (agent/aware_server.py), once serve_api() ran
        self.plugins = plugins.PluginHost.load(plugins.specs_from(settings))
        self.interval = settings.interval
        self.last_generation = restarted_generation or 0
        self.link = CoordinatorLink(conn, settings)   # is the coordinator there (liveness.py)
        self.max_generation = restarted_generation or 0   # the newest generation we took part in

    # ---------------------------------------------------------------------------------------- joining --
    def _hello_msg(self, rejoin: bool = False) -> dict:
        restart = self.restarted_generation is not None and not rejoin
        return {"type": "hello", "role": "peer", "host": self.host, "agent_pid": os.getpid(),
                "processes": self.public_processes(), "ckptdir": self.ckptdir,
                "computation": self.computation, "restart": restart, "rejoin": rejoin,
                "generation": self.max_generation if rejoin else self.restarted_generation,
                "agent_id": self.agent_id, "agents": self.expected_agents,
                "agent_ids": self.restart_ids or [self.agent_id]}

    def hello(self, timeout: float = 15.0) -> dict:
        self.conn.send(self._hello_msg())
        deadline = time.monotonic() + timeout
        while True:
            reply = self.conn.recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise CoordinatorUnreachable(f"coordinator {self.conn.host}:{self.conn.port} did not answer "
                                             f"within {timeout:.0f} s")
            if reply["type"] == "reject":
                raise CoordinatorUnreachable(f"coordinator refused this computation: {reply.get('reason')}")
            if reply["type"] == "welcome":
                self.computation = reply["computation"]
                self.heartbeat_s = min(float(reply.get("heartbeat", 2.0)), self.s.heartbeat_s())
                self.interval = reply.get("interval", self.interval)
                self.link.rejoined(self.heartbeat_s)
                log.info("joined coordinator %s:%d as peer %s of computation %s", self.conn.host, self.conn.port,
                         reply.get("peer_id"), self.computation)
                self.publish_job_file()
                return reply

    def send(self, msg: dict) -> None:
        self.conn.send(msg)
        self.last_sent = time.monotonic()

    def publish_job_file(self) -> None:
        if self.job_file:
            try:
                remoteio.write_job_file(self.job_file, self.conn.host, self.conn.port, self.computation or "",
                                        self.ckptdir)
            except OSError as e:
                log.warning("cannot write %s (ssh/srun inside the job will not find the coordinator): %s",
                            self.job_file, e)

    def adopt(self, processes: list[JobProcess]) -> None:
        """After a restore: the processes as they now are (new PIDs without a PID namespace of our own)."""
        self.root = processes[0]
        self.uids = {p.pid: p.unique_id for p in processes}

    def restore_done(self, error: str | None, timeout: float) -> tuple[bool, str]:
        """Tell the coordinator our processes are restored (or why not) and wait for its word: (go, reason).
        Every host of the checkpoint must have restored its processes before any of them runs."""
        self.send({"type": "restored", "error": error})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, f"no word from the coordinator within {timeout:.0f} s"
            if time.monotonic() - self.last_sent >= self.heartbeat_s:
                self.send({"type": "heartbeat"})      # other hosts may take long: we are alive, waiting
            msg = self.stash.pop(0) if self.stash else self.conn.recv(min(left, self.heartbeat_s))
            if msg is None:
                continue
            if msg.get("type") == "restart":
                return bool(msg.get("go")), msg.get("reason", "")
            if msg.get("type") == "kill":
                return False, "the computation was killed"

    # ------------------------------------------------------------------------------------------- the job --
    def job(self) -> list[tree.ProcInfo]:
        return [p for p in tree.job_processes(os.getpid(), self.pid_namespace, self.not_job)
                if not left_snapshot(p.pid) and not (self.writing and p.pid in self.writing.snapshots)]

    def unique_id(self, pid: int) -> str:
        if pid not in self.uids:
            self.uids[pid] = new_unique_id(pid)
        return self.uids[pid]

    def public_processes(self) -> list[dict]:
        procs = [p for p in self.job() if not p.zombie] or \
            ([tree.ProcInfo(self.root.pid, 0, 0, 0, "R", 0, self.root.program)] if self.root.exit_status is None
             else [])
        out = []
        for p in procs:
            row = {"pid": p.pid, "unique_id": self.unique_id(p.pid),
                   "program": self.root.program if p.pid == self.root.pid else program_of(p.pid)}
            row.update(mpi_identity(p.pid) or {})
            out.append(row)
        return out

    # ------------------------------------------------------------------------------------------ main loop --
    def run(self) -> int:
        """Serve while any process of the job lives (children may outlive the launched process, as daemons and
        nohup'ed ones do: the computation goes on, as DMTCP's does); returns the root's shell-style exit code."""
        sigs = list(FORWARDED_SIGNALS) + [signal.SIGCHLD] + ([self.s.ckpt_signal] if self.s.ckpt_signal else [])
        if self.pid_namespace:
            install_init_handlers(sigs)    # an init only gets signals it handles; the signalfd reads them
        self.sigfd = SignalFd(sigs)
        poller = zmq.Poller()
        poller.register(self.conn.sock, zmq.POLLIN)
        poller.register(self.sigfd.fd, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        if self.aware is not None:
            poller.register(self.aware.fileno(), zmq.POLLIN)
        clean = False
        try:
            self._reap()
            while self.root.exit_status is None or self._survivors():
                events = dict(poller.poll(timeout=500))
                if self.sigfd.fd in events:
                    self._on_signals()
                if self.wake_r in events:
                    try:
                        os.read(self.wake_r, 64)
                    except BlockingIOError:
                        pass
                    self._writes_done()
                if self.aware is not None and self.aware.fileno() in events:
                    self.aware.handle(0)
                if self.conn.sock in events:
                    while True:
                        try:
                            msg = self.conn.recv(0)
                        except CoordinatorUnreachable as e:    # a coordinator with another secret
                            self.link.lose(str(e))
                            msg = None
                        if msg is None:
                            break
                        self.link.heard()
                        self._on_message(msg)
                self._reap()
                self._watch_coordinator()
                procs = self.public_processes()
                if not self.link.joined or self.link.down_since is not None:
                    pass          # nobody to tell (hellos carry the processes until a coordinator answers)
                elif procs != self.last_listed or time.monotonic() - self.last_sent >= self.heartbeat_s:
                    hb = {"type": "heartbeat", "processes": procs}      # -l shows changes within ~0.5 s
                    if self.writing:
                        hb["progress"] = {"bytes": self.writing.done_bytes}
                    self.send(hb)
                    self.last_listed = procs
            clean = True
        finally:
            if self.ckpt is not None:
                self._resume_frozen()
            if self.writing is not None:
                self._cancel_writes("the job ended while its checkpoint was being written")
            if not clean:
                # the agent itself failed: never leave the job running without its owner
                self._kill_job("agent failed; killing the job it owns")
            self.send({"type": "bye", "reason": self._exit_text()})
            self.sigfd.close()
        return self.root.exit_status

    def _survivors(self) -> bool:
        """After the root's exit: do other processes of the job live on? The first time, say so (and let the
        launching command return with the root's status, as DMTCP's dmtcp_launch would: on_root_exit)."""
        alive = [p for p in self.job() if not p.zombie and p.pid != self.root.pid]
        if alive and not self.root_gone_told:
            self.root_gone_told = True
            log.info("%s ended; %d process(es) of the computation go on (%s)", self.root.program, len(alive),
                     ", ".join(f"{program_of(p.pid)}[{p.pid}]" for p in alive[:4]))
            if self.on_root_exit is not None:
                self.on_root_exit(self.root.exit_status)
        return bool(alive) and not self.killed

    def _exit_text(self) -> str:
        st = self.root.exit_status
        if st is None:
            return "agent stopped"
        if st > 128:
            try:
                return f"{self.root.program} killed by {signal.Signals(st - 128).name}"
            except ValueError:
                pass
        return f"{self.root.program} exited with status {st}"

    def _reap(self) -> None:
        """Collect exited children (a ptrace stop is not an exit: tree.reap_exits)."""
        for ex in tree.reap_exits():
            if ex.pid == self.root.pid:
                self.root.exit_status = ex.code
                log.info("%s (pid %d) %s", self.root.program, self.root.pid,
                         f"was killed by signal {ex.status}" if ex.signaled else f"exited with status {ex.code}")

    def _on_signals(self) -> None:
        for signo, code, sender in self.sigfd.read():
            if signo == signal.SIGCHLD:
                continue
            if self.s.ckpt_signal and signo == self.s.ckpt_signal:
                log.info("signal %d: asking the coordinator for a checkpoint", signo)
                self.send({"type": "request", "cmd": "checkpoint"})
                continue
            if SignalFd.sent_by_process(code) and self.root.exit_status is None:
                if signo in ENDING_SIGNALS and self.ckpt is not None:
                    # a frozen job could not act on it (and a batch system's SIGKILL follows): resume first
                    self._abandon(f"got {signal.Signals(signo).name} while the processes were frozen")
                log.info("forwarding signal %s (from pid %d) to the job", signal.Signals(signo).name, sender)
                try:
                    os.kill(self.root.pid, signo)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------------------------------ phases --
    def _on_message(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "phase":
            self._on_phase(msg)
        elif kind == "kill":
            self._kill_job("killed by the coordinator")
        elif kind == "committed":
            # the generation is complete everywhere: its images are the bases of the next incremental ones
            self.prev_images.update(self.pending_prev.pop(msg.get("generation"), {}))
            self.last_generation = max(self.last_generation, int(msg.get("generation") or 0))
            if self.aware is not None:
                self.aware.round_over(int(msg.get("generation") or 0), True)
            self._prune(msg.get("prune", []))
        elif kind == "reject":
            if msg.get("rejoin"):
                self.link.lose(f"it does not know us: {msg.get('reason')}")
            elif msg.get("reason") != self.link.last_reject:      # (a lost agent's hellos repeat it)
                self.link.last_reject = msg.get("reason")
                log.error("coordinator: %s", msg.get("reason"))
        elif kind == "heartbeat":
            self._on_coordinator_heartbeat(msg.get("generation"))
        elif kind == "welcome":
            self._on_welcome(msg)

    def _ack(self, msg: dict, ok: bool, error: str | None = None, **extra) -> None:
        self.send({"type": "ack", "phase": msg["phase"], "generation": msg["generation"], "ok": ok,
                   "error": error, **extra})

    def _on_phase(self, msg: dict) -> None:
        phase, gen = msg["phase"], msg["generation"]
        log.debug("phase=%s gen=%d", phase, gen)
        self.max_generation = max(self.max_generation, gen)
        try:
            if phase == "suspend":
                self.plugin_event("presuspend", gen)
                if self.aware is not None:      # delayed_checkpoints() blocks end, pre_checkpoint hooks run
                    self.aware.before_freeze(gen, self.s.aware_delay_max, self.s.aware_hook_max)
                self._suspend(gen)
                self.plugin_event("precheckpoint", gen)
                c = self.ckpt
                self._ack(msg, True, tcp_ends=tcpdrain.connected_ends([fp.pid for fp in c.frozen]))
                fault("agent.after_suspend")      # (tests: a long freeze window, e.g. to lose the coordinator in)
            elif phase == "drain":
                others = [e for e in msg.get("tcp_ends", []) if e and e[0] != self.agent_id]
                self._drain(gen, others)
                self._ack(msg, True)
            elif phase == "checkpoint":
                if self.ckpt is not None:
                    self.ckpt.agents = msg.get("agents") or {self.agent_id: self.host}
                images, stats, pending = self._checkpoint(gen, msg.get("forked_ok", True))
                self._ack(msg, True, images=images, stats=stats, pending=pending)
                self.ckpt.reported = not pending
            elif phase == "refill":
                self._refill()
                self._ack(msg, True)
            elif phase == "resume":
                c = self.ckpt
                frozen = self._resume_frozen()
                if c is not None and c.pending:
                    self._start_writes(c)          # images of a forked checkpoint, while the job runs
                self._ack(msg, True, stats={"frozen_s": frozen})
                if self.aware is not None:
                    self.aware.resumed(gen)
                self.plugin_event("resume", gen)
            elif phase == "kill":
                self._ack(msg, True)
                self._kill_job("checkpointed and killed (kcheckpoint)")
            elif phase == "abort":
                self._abort(gen, msg.get("reason", ""))
            else:
                self._ack(msg, False, f"unknown phase {phase}")
        except Exception as e:   # one line to the coordinator; the job resumes untouched
            log.error("phase %s of generation %d failed: %s", phase, gen, e)
            log.debug("details", exc_info=True)
            if phase in ("suspend", "drain", "checkpoint"):
                self._abort(gen, str(e), quiet=True)
            self._ack(msg, False, f"{self.host}: {e}")

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
        gdir = store.generation_dir(self.ckptdir, self.computation, gen)
        try:       # checked, never through another user's directory or link (safefs); the computation's lock
            gdir = store.make_generation_dir(self.ckptdir, self.computation, gen)
            runlock.hold(self.ckptdir, self.computation)
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
        if forked_ok and self.s.forked and fork_fits_in_memory([p.cap.fp.pid for p in todo]):
            for p in todo:
                info = c.procs.get(p.cap.fp.pid)
                engine_dump.snapshot(p.cap, parent_is_agent=bool(info and info.ppid == os.getpid()))
        for p in todo:
            if p.cap.snapshot_pid:
                c.pending.append(p)        # written from its snapshot once the job runs again
            else:
                self._write(c, p)          # written now, while frozen
        if not c.pending:
            store.fsync_dir(gdir)
        c.stats.update(dump_s=round(time.monotonic() - t0, 6))
        return list(c.entries), c.stats, bool(c.pending)

    def _write(self, c: CheckpointState, p: PendingImage) -> None:
        base = None
        if self.s.incremental and p.unique_id in self.prev_images:
            path, needs = self.prev_images[p.unique_id]
            if len(needs) < self.s.full_every and os.path.exists(path):
                base = path
        meta = engine_dump.write_image(p.cap, p.path, computation=self.computation, generation=c.generation,
                                       unique_id=p.unique_id, compress=self.s.compress,
                                       level=self.s.compress_level,
                                       progress=lambda done: self._progress(p.path, done),
                                       incremental=self.s.incremental, base=base,
                                       agent={"agent_id": self.agent_id, "agents": c.agents})
        size = os.path.getsize(p.path)
        with self.write_lock:           # (writer threads write several images at once)
            self.pending_prev.setdefault(c.generation, {})[p.unique_id] = (p.path, list(meta.needs))
            c.stats["bytes_in"] = c.stats.get("bytes_in", 0) + meta.stats["bytes_in"]
            c.stats["bytes_out"] = c.stats.get("bytes_out", 0) + size
            for key in ("pages_dumped", "pages_skipped", "zero_pages"):
                c.stats[key] = c.stats.get(key, 0) + meta.stats.get(key, 0)
            c.stats["write_s"] = max(c.stats.get("write_s", 0.0), meta.stats.get("total_s", 0.0))
            c.entries.append(asdict(store.ImageEntry(self.host, p.path, p.program, p.unique_id, p.cap.fp.pid,
                                                     size, list(meta.needs), p.rank)))

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
            store.remove_generation_images(self.ckptdir, self.computation, gen, paths)
        if not quiet:
            log.warning("checkpoint generation %d aborted (%s); images removed, job resumed", gen, reason)

    def _prune(self, entries: list[dict]) -> None:
        """Delete this host's images of generations the coordinator retired (retention)."""
        by_gen: dict[int, list[str]] = {}
        for e in entries:
            if e.get("host") == self.host:
                by_gen.setdefault(int(e["generation"]), []).append(e["path"])
        for gen, paths in by_gen.items():
            store.remove_generation_images(self.ckptdir, self.computation, gen, paths)

    def _kill_job(self, why: str) -> None:
        log.info("%s", why)
        self.killed = True
        alive = self.root.exit_status is None
        if self.ckpt is not None:
            self._resume_frozen()
        for p in self.job():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # wait (bounded) for the kill to land so we exit with the job's status
        deadline = time.monotonic() + 10
        while self.root.exit_status is None and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)
        # A root that ended on its own meanwhile (mpiexec seeing its ranks on other hosts killed first) was
        # killed with the computation all the same: say so, whatever its own status
        if alive and self.root.exit_status not in (None, 128 + signal.SIGKILL):
            log.info("%s ended with status %d as the computation was killed; reporting it killed",
                     self.root.program, self.root.exit_status)
            self.root.exit_status = 128 + signal.SIGKILL
