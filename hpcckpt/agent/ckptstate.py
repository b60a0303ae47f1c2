"""What the agent holds about one checkpoint while it runs (and while its images are written in the
background)."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..engine import procattrs, tree
from ..engine.fds.tcp import drain as tcpdrain
from ..engine.freeze import FrozenProcess

if TYPE_CHECKING:
    from ..engine.dump import Capture

log = logging.getLogger("hpcckpt.agent")


@dataclass
class PendingImage:
    cap: Capture
    path: str
    program: str
    unique_id: str
    rank: int | None = None      # MPI rank, named if the image goes missing at restart


@dataclass
class CheckpointState:
    generation: int
    frozen: list[FrozenProcess] = field(default_factory=list)
    procs: dict[int, tree.ProcInfo] = field(default_factory=dict)   # every process of the job, zombies too
    images: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)               # ImageEntry rows of images written
    pending: list[PendingImage] = field(default_factory=list)       # to write from snapshots after resume
    hints: dict[int, dict] = field(default_factory=dict)            # VmFlags read before the freeze
    frozen_at: float = 0.0
    stats: dict = field(default_factory=dict)
    drainer: tcpdrain.Drainer | None = None                         # TCP data taken out until the refill
    drained: dict = field(default_factory=dict)                     # socket inode -> tcpdrain.Drained
    agents: dict = field(default_factory=dict)                      # agent id -> host, of every agent taking part
    done: dict[str, int] = field(default_factory=dict)              # image path -> bytes written so far
    reported: bool = False       # our images were reported durable: the coordinator may commit them any time


@dataclass
class BackgroundWrite:
    """Images of a forked checkpoint being written from snapshots while the job runs."""
    state: CheckpointState
    thread: threading.Thread
    snapshots: list[int]
    error: str | None = None
    done: dict[str, int] = field(default_factory=dict)             # image path -> bytes written so far
    finished: bool = False       # the writer thread is done (a cancelled one may finish long after)

    @property
    def done_bytes(self) -> int:
        return sum(self.done.values())


def fork_fits_in_memory(pids: list[int]) -> bool:
    """A snapshot costs memory for every page the job changes while the images are written; fork only when
    the machine could hold a second copy of the job's anonymous memory."""
    need = 0
    for pid in pids:
        try:
            need += int(procattrs.read_status(pid).get("RssAnon", "0 kB").split()[0]) * 1024
        except (OSError, ValueError):
            pass
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail < need:
        log.info("not forking for this checkpoint: %.1f GB available, the job holds %.1f GB", avail / 1e9,
                 need / 1e9)
        return False
    return True
