"""What the coordinator's parts share: its peers and the state every mixin of Coordinator (server.py) reads.

Coordinator is put together from one class per job - commands.py (user side), liveness.py, gather.py
(restarts), rounds.py (the checkpoint barrier), commit.py - over this base, which declares the attributes
they share and the methods they call on each other, so that each file can be read (and type-checked) alone."""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..settings import Settings
from .ranks import RankBook

if TYPE_CHECKING:
    import zmq

    from .barrier import Round
    from .gather import RestartGate

Waiter = tuple[bytes, str]          # a client waiting for a reply: (its connection, its request's nonce)


@dataclass
class Peer:
    ident: bytes
    peer_id: int
    host: str
    agent_pid: int
    processes: list[dict]
    restarted: bool
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "RUNNING"
    progress: dict = field(default_factory=dict)
    agent_id: str = ""
    # a node's relay (hpcckpt/relay/) stands for several agents: agent id -> its Member (empty: a plain agent)
    members: dict[str, Member] = field(default_factory=dict)


@dataclass
class Member:
    """One agent behind a relay: what the status lists of it."""
    peer_id: int
    agent_pid: int
    processes: list[dict]


@dataclass
class Waiting:
    """A checkpoint asked for while MPI ranks (or the agents of a restarted coordinator) are still to join."""
    since: float
    kill_after: bool
    waiters: list[Waiter] = field(default_factory=list)
    frozen: bool = False


class CoordinatorBase:
    s: Settings
    ckptdir: str
    peers: dict[bytes, Peer]
    lost_peers: dict[str, Peer]          # agent id -> Peer given up for its silence (taken back if it returns)
    computation: str | None
    generation: int
    round: Round | None
    pending_hellos: list[tuple[bytes, dict]]
    ranks: RankBook
    waiting: Waiting | None
    gate: RestartGate | None
    kv: dict[str, Any]
    kv_waiters: dict[str, list[bytes]]
    interval: int
    next_interval_ckpt: float | None
    last_checkpoint: dict | None
    last_failure: dict | None
    storage: dict[int, Any]              # generation -> its copies beyond the local level (storagestate.py)
    ever_had_peers: bool
    idle_since: float
    started: float
    next_liveness_scan: float
    quit: bool
    port: int
    key: bytes
    bound: list[str]
    sock: zmq.Socket | None

    # -- defined by the parts (server.py and its mixins); declared here so that each part may call them --
    def send(self, ident: bytes, msg: dict) -> None:
        raise NotImplementedError

    def broadcast(self, msg: dict, idents: Any = None) -> None:
        raise NotImplementedError

    def status(self) -> dict:
        raise NotImplementedError

    def answer(self, waiter: Waiter, msg: dict) -> None:
        raise NotImplementedError

    def listen_on(self, addr: str, why: str) -> str | None:
        raise NotImplementedError

    def start_checkpoint(self, kill_after: bool = False, waiter: Waiter | None = None,
                         frozen: bool = False) -> str | None:
        raise NotImplementedError

    def _on_hello(self, ident: bytes, msg: dict) -> None:
        raise NotImplementedError

    def _welcome(self, ident: bytes, peer: Peer) -> None:
        raise NotImplementedError

    def _peer_gone(self, ident: bytes, why: str, lost: bool = False) -> None:
        raise NotImplementedError

    def _check_round(self) -> None:
        raise NotImplementedError

    def _fail_round(self, why: str) -> None:
        raise NotImplementedError

    def _reset_interval(self) -> None:
        raise NotImplementedError

    def _write_status(self) -> None:
        raise NotImplementedError

    def _check_gate(self) -> None:
        raise NotImplementedError

    def _rejoin_grace(self) -> bool:
        raise NotImplementedError

    def _complete_generations(self) -> list[int]:
        raise NotImplementedError

    def _members_lost(self, peer: Peer) -> None:
        raise NotImplementedError

    def _member_returns(self, ident: bytes, agent_id: str) -> bool:
        raise NotImplementedError

    def _listed_peers(self) -> Any:
        raise NotImplementedError

    def _agent_count(self, idents: Iterable[bytes] | None = None) -> int:
        raise NotImplementedError

    def _commit(self, r: Round) -> None:
        raise NotImplementedError

    def _prune_images(self) -> list[dict]:
        raise NotImplementedError

    def _prune_list(self) -> list[int]:
        raise NotImplementedError

    def _partner_for(self, generation: int, agent_id: str) -> dict | None:
        raise NotImplementedError

    def _wait_complete(self, generation: int, waiters: list[Waiter]) -> bool:
        raise NotImplementedError

    def storage_levels(self) -> list[dict]:
        raise NotImplementedError
