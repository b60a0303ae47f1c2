"""The checkpoint barrier as one table, modelled on DMTCP's protocol.

From each coordinator state the table names the phase to broadcast to every peer and the state reached when
every peer has acknowledged it:

    RUNNING      --suspend-->     SUSPENDED      all processes frozen
    SUSPENDED    --drain-->       DRAINED        in-flight data taken out of channels (sockets, later)
    DRAINED      --checkpoint-->  CHECKPOINTED   every image durable; the coordinator commits the generation
    CHECKPOINTED --refill-->      REFILLED       drained data put back
    REFILLED     --resume-->      RUNNING        processes run again

A failed or timed-out phase before the commit broadcasts `abort`: peers delete that generation's images and
resume, so nothing half-written survives.

Forked checkpoints: a peer may acknowledge `checkpoint` once every process is captured (state, and a
copy-on-write snapshot of its memory) with `pending`, and write its images while its processes already run
again; it reports `written` when they are durable. The generation is committed - manifest, restart script -
only when every peer's images are durable, whatever phase the round is in by then. A kill-after-checkpoint
round broadcasts `kill` instead of `refill` once the generation is committed. A log line
"phase=drain gen=3 acks=2/8" means the same at the coordinator and in every agent.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from .protocol import Phase


class State(str, Enum):
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    DRAINED = "DRAINED"
    CHECKPOINTED = "CHECKPOINTED"
    REFILLED = "REFILLED"


TABLE: dict[State, tuple[Phase, State]] = {
    State.RUNNING: (Phase.SUSPEND, State.SUSPENDED),
    State.SUSPENDED: (Phase.DRAIN, State.DRAINED),
    State.DRAINED: (Phase.CHECKPOINT, State.CHECKPOINTED),
    State.CHECKPOINTED: (Phase.REFILL, State.REFILLED),
    State.REFILLED: (Phase.RESUME, State.RUNNING),
}
# the state a peer is in once it acknowledged a phase (read off the table: the status shows it per peer)
REACHED: dict[Phase, State] = {phase: state for phase, state in TABLE.values()}


@dataclass
class Round:
    """One checkpoint in progress."""
    generation: int
    kill_after: bool
    peers: set[bytes]                        # identities taking part
    frozen: bool = False                      # images written while stopped, not from snapshots (job stops)
    state: State = State.RUNNING              # the last state every peer reached
    phase: Phase | None = None                # the phase broadcast and awaited now
    acks: dict[bytes, dict] = field(default_factory=dict)
    results: dict[bytes, dict] = field(default_factory=dict)   # checkpoint-phase payloads (images, stats)
    waiters: list[tuple[bytes, str]] = field(default_factory=list)   # clients waiting: (connection, nonce)
    started: float = field(default_factory=time.time)
    phase_started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    error: str | None = None
    committed: bool = False
    resumed: bool = False                     # processes run again (images may still be being written)
    frozen_s: float = 0.0                     # longest time a peer's processes were stopped
    durable: dict[bytes, dict] = field(default_factory=dict)   # peer -> {"images", "stats"} once on disk
    phase_times: dict[str, float] = field(default_factory=dict)
    endpoints: list = field(default_factory=list)             # [agent id, TCP end...] from the suspend acks

    def next_phase(self) -> tuple[Phase, State]:
        if self.state == State.CHECKPOINTED and self.kill_after:
            return Phase.KILL, State.RUNNING
        return TABLE[self.state]

    def begin_phase(self) -> Phase:
        self.phase, _ = self.next_phase()
        self.acks.clear()
        now = time.monotonic()
        self.phase_started = now
        self.last_progress = now
        return self.phase

    def ack(self, ident: bytes, msg: dict) -> None:
        if ident not in self.peers:             # (so that complete() can count instead of compare sets)
            return
        self.acks[ident] = msg
        self.last_progress = time.monotonic()
        if self.phase == Phase.CHECKPOINT:
            self.results[ident] = msg
            if msg.get("ok") and not msg.get("pending"):
                self.durable[ident] = msg         # written before the ack (not a forked checkpoint)

    def all_durable(self) -> bool:
        return len(self.durable) >= len(self.peers) and self.peers.issubset(self.durable)

    def failed_acks(self) -> list[str]:
        return [m.get("error") or "failed" for m in self.acks.values() if not m.get("ok", False)]

    def complete(self) -> bool:
        # called for every ack: counting first keeps a phase O(peers), not O(peers^2) (bench/scale.py)
        return len(self.acks) >= len(self.peers) and self.peers.issubset(self.acks)

    def advance(self) -> State:
        """All peers acknowledged the current phase: move to the state it leads to."""
        _, nxt = self.next_phase()
        self.phase_times[str(self.phase)] = round(time.monotonic() - self.phase_started, 6)
        self.state = nxt
        return nxt

    def acks_text(self) -> str:
        return f"phase={self.phase} gen={self.generation} acks={len(self.acks)}/{len(self.peers)}"
