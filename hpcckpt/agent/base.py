"""What the agent's parts share: Agent (agent.py) is put together from one class per job - phases.py (the
checkpoint phases), liveness.py, background.py (forked checkpoints' writes), extensions.py (program API,
plugins) - over this base, which declares the attributes they share and the methods they call on each other,
so that each file can be read (and type-checked) alone."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..settings import Settings

if TYPE_CHECKING:
    from .. import plugins
    from ..coordinator.client import Connection
    from ..coordinator.protocol import Phase, PhaseMsg
    from ..engine import tree, wptrack
    from .aware_server import AwareServer
    from .ckptstate import BackgroundWrite, CheckpointState, PendingImage
    from .liveness import CoordinatorLink
    from .procs import JobProcess


class AgentError(Exception):
    """A failure of ours (not the program's): reported in one line, exit with DMTCP_FAIL_RC."""


class AgentBase:
    s: Settings
    conn: Connection
    link: CoordinatorLink
    root: JobProcess
    host: str
    ckptdir: str                          # the coordinator's (its welcome says): manifests, the shared level
    imgdir: str                           # where this node writes its images (storage.py: local level or ckptdir)
    computation: str | None
    restarted_generation: int | None
    agent_id: str
    expected_agents: dict[str, str]
    interval: int
    heartbeat_s: float
    last_sent: float
    last_generation: int
    max_generation: int
    pid_namespace: bool
    ckpt: CheckpointState | None          # the round our processes are frozen for
    writing: BackgroundWrite | None       # a forked checkpoint's images being written
    prev_images: dict[str, tuple[str, list]]
    pending_prev: dict[int, dict]
    trackers: dict[int, wptrack.Tracker]
    write_lock: threading.Lock
    wake_w: int
    aware: AwareServer | None
    plugins: plugins.PluginHost
    phases: dict[Phase, Callable[[PhaseMsg], None]]

    @property
    def comp(self) -> str:
        """The computation id: set by the coordinator's welcome, before any phase or write runs."""
        return self.computation or ""

    # -- defined by the parts (agent.py and its mixins); declared here so that each part may call them --
    def send(self, msg: dict) -> None:
        raise NotImplementedError

    def job(self) -> list[tree.ProcInfo]:
        raise NotImplementedError

    def unique_id(self, pid: int) -> str:
        raise NotImplementedError

    def publish_job_file(self) -> None:
        raise NotImplementedError

    def _hello_msg(self, rejoin: bool = False) -> dict:
        raise NotImplementedError

    def _kill_job(self, why: str) -> None:
        raise NotImplementedError

    def _storage_kill(self, gen: int) -> None:
        raise NotImplementedError

    def plugin_event(self, event: str, gen: int, **extra: Any) -> None:
        raise NotImplementedError

    def _resume_frozen(self) -> float:
        raise NotImplementedError

    def _abort(self, gen: int, reason: str, quiet: bool = False) -> None:
        raise NotImplementedError

    def _abandon(self, why: str) -> None:
        raise NotImplementedError

    def _write_images(self, c: CheckpointState, todo: list[PendingImage], report: bool = False) -> None:
        raise NotImplementedError

    def _progress(self, path: str, done: int) -> None:
        raise NotImplementedError

    def _start_writes(self, c: CheckpointState) -> None:
        raise NotImplementedError

    def _cancel_writes(self, why: str) -> None:
        raise NotImplementedError

    def _reap_snapshots(self, pids: list[int]) -> None:
        raise NotImplementedError

    def adopt_ckptdir(self, ckptdir: str | None) -> None:
        raise NotImplementedError

    def _storage_written(self, c: CheckpointState, path: str) -> None:
        raise NotImplementedError

    def _storage_retarget(self) -> None:
        raise NotImplementedError
