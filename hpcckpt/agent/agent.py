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
from collections.abc import Callable

import zmq

from .. import plugins
from ..coordinator import protocol
from ..coordinator.client import Connection, CoordinatorUnreachable
from ..engine import tree, wptrack
from ..engine.forker import left_snapshot
from ..settings import Settings
from . import remoteio
from .aware_server import AwareServer
from .background import BackgroundWrites
from .base import AgentError
from .ckptstate import BackgroundWrite, CheckpointState
from .extensions import Extensions
from .liveness import AgentLiveness, CoordinatorLink
from .namespaces import install_init_handlers
from .phases import Phases
from .procs import JobProcess, mpi_identity, new_agent_id, new_unique_id, program_of
from .sigfd import SignalFd
from .storage import StorageLevels

log = logging.getLogger("hpcckpt.agent")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)   # the job must act on these now, frozen or not


__all__ = ["Agent", "AgentError"]


class Agent(Phases, AgentLiveness, BackgroundWrites, Extensions, StorageLevels):
    """The parts and the state they share: base.py."""

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
        self.coord_address: tuple[str, int] | None = None   # the coordinator's, when we talk to a relay
        # called with the root's status when others live on (cli/jobrun.py)
        self.on_root_exit: Callable[[int], None] | None = None
        self.root_gone_told = False
        self.aware: AwareServer | None = None  # the program API (agent/aware_server.py), once serve_api() ran
        self.plugins = plugins.PluginHost.load(plugins.specs_from(settings))
        self.interval = settings.interval
        self.last_generation = restarted_generation or 0
        self.link = CoordinatorLink(conn, settings)   # is the coordinator there (liveness.py)
        self.max_generation = restarted_generation or 0   # the newest generation we took part in
        self.phases = self.phase_table()                  # phases.py
        self.handlers = self.protocol_table()
        self._storage_setup()                  # multi-level storage: self.imgdir, the drain (agent/drain.py)

    def protocol_table(self) -> dict[str, Callable[[dict], None]]:
        """Every message the coordinator sends an agent, and what handles it in the main loop: the table of
        docs/protocol.md ("Peer messages", to the agent; tests/unit/coordinator/test_dispatch.py checks it)."""
        return {
            "phase": self._on_phase,                  # phases.py: the barrier
            "heartbeat": self._on_coordinator_heartbeat,   # liveness.py
            "welcome": self._on_welcome,
            "reject": self._on_reject,
            "committed": self._on_committed,
            "kill": lambda msg: self._kill_job("killed by the coordinator"),
            # answers a restarting agent waits for before the main loop runs (restore_done, rendezvous.py);
            # one that comes late is of no use any more
            "restart": self._ignore,
            "kv": self._ignore,
        }

    # ---------------------------------------------------------------------------------------- joining --
    def _hello_msg(self, rejoin: bool = False) -> dict:
        restart = self.restarted_generation is not None and not rejoin
        return protocol.Hello(
            self.host, os.getpid(), self.public_processes(), self.computation, restart, rejoin,
            self.max_generation if rejoin else self.restarted_generation, self.agent_id, self.expected_agents,
            self.restart_ids or [self.agent_id]).to_dict()

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
                self.adopt_ckptdir(reply.get("ckptdir"))
                self.publish_job_file()
                return reply

    def send(self, msg: dict) -> None:
        self.conn.send(msg)
        self.last_sent = time.monotonic()

    def adopt_ckptdir(self, ckptdir: str | None) -> None:
        """The checkpoint directory is the coordinator's: its manifests and our images go to one place (an
        older coordinator's welcome may not say)."""
        if ckptdir and os.path.abspath(ckptdir) != self.ckptdir:
            log.info("checkpoint images go to the coordinator's directory %s (not %s)", ckptdir, self.ckptdir)
            self.ckptdir = os.path.abspath(ckptdir)
            self._storage_retarget()             # without a local level the images follow (storage.py)

    def publish_job_file(self) -> None:
        if self.job_file:
            try:
                host, port = self.coord_address or (self.conn.host, self.conn.port)
                remoteio.write_job_file(self.job_file, host, port, self.computation or "",
                                        self.ckptdir, self.s)    # (its settings reach agents on other hosts)
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
                    self._storage_flush()          # the drain's and the partner copy's reports (storage.py)
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
                    # -l shows changes within ~0.5 s
                    self.send(protocol.AgentHeartbeat(procs, {"bytes": self.writing.done_bytes} if self.writing
                                                      else None).to_dict())
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
            self._storage_finish()              # a kcheckpoint's drain (storage.py)
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
            if self.on_root_exit is not None and self.root.exit_status is not None:   # (it ended: a status)
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
        assert self.sigfd is not None
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
        handler = self.handlers.get(str(msg.get("type")))     # (unknown kinds: from a newer coordinator, ignored)
        if handler is not None:
            handler(msg)

    def _on_committed(self, msg: dict) -> None:
        # the generation is complete everywhere: its images are the bases of the next incremental ones
        m = protocol.Committed.from_dict(msg)
        self._storage_committed(int(m.generation or 0), m.partner)   # the partner copy, the drain to the shared level
        self.prev_images.update(self.pending_prev.pop(m.generation, {}))
        self.last_generation = max(self.last_generation, int(m.generation or 0))
        if self.aware is not None:
            self.aware.round_over(int(m.generation or 0), True)
        self._prune(m.prune or [])

    def _on_reject(self, msg: dict) -> None:
        if msg.get("rejoin"):
            self.link.lose(f"it does not know us: {msg.get('reason')}")
        elif msg.get("reason") != self.link.last_reject:      # (a lost agent's hellos repeat it)
            self.link.last_reject = msg.get("reason")
            log.error("coordinator: %s", msg.get("reason"))

    def _ignore(self, msg: dict) -> None:
        log.debug("%s message ignored: nothing waits for it any more", msg.get("type"))

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
