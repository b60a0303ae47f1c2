"""What the agent holds about one checkpoint while it runs (and while its images are written in the
background)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..engine import tcpdrain, tree
from ..engine.freeze import FrozenProcess


@dataclass
class PendingImage:
    cap: object                  # engine.dump.Capture
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


@dataclass
class BackgroundWrite:
    """Images of a forked checkpoint being written from snapshots while the job runs."""
    state: CheckpointState
    thread: threading.Thread
    snapshots: list[int]
    error: str | None = None
    done_bytes: int = 0
