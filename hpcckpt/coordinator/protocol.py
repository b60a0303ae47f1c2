"""The coordinator protocol (docs/protocol.md): the peer messages as typed records and the Phase enum, over the
wire of wire.py (framing, authentication, freshness, the secret), whose names this module also offers."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar

from .wire import (  # noqa: F401 - the wire's names, offered here too
    FRESHNESS_S,
    MAX_MESSAGE_BYTES,
    MAX_NONCES,
    NONCES_PER_AGENT_HEARTBEATS,
    PROTO_TAG,
    PROTOCOL_VERSION,
    STATUS_SCHEMA_VERSION,
    Freshness,
    ProtocolError,
    Refused,
    SecretError,
    answers,
    create_secret,
    decode,
    encode,
    encode_request,
    new_nonce,
    read_secret,
    remove_secret,
    rundir,
    secret_path,
)

# ------------------------------------------------------------------------------------------------ messages --
# The peer messages as typed records (docs/protocol.md, "Peer messages": tests/unit/coordinator/test_dispatch.py
# checks that table against these classes and the handlers). to_dict() is the body encode() frames; fields
# marked optional are left out while None, as the wire format always did. from_dict() takes what it knows and
# leaves the rest: a newer peer may send more.

class Phase(str, Enum):
    """The barrier's phases (barrier.py), in the words every log line and the wire use."""
    SUSPEND = "suspend"
    DRAIN = "drain"
    CHECKPOINT = "checkpoint"
    REFILL = "refill"
    RESUME = "resume"
    KILL = "kill"          # instead of refill, once a kcheckpoint's generation is committed
    ABORT = "abort"        # the round failed before its commit: delete its images, resume

    def __str__(self) -> str:      # "suspend", not "Phase.SUSPEND", in logs and f-strings
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str(self), spec)


def _opt(default: Any = None) -> Any:
    return field(default=default, metadata={"optional": True})


def _list() -> Any:
    return field(default_factory=list)


def _dict() -> Any:
    return field(default_factory=dict)


M = TypeVar("M", bound="Message")


@dataclass
class Message:
    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.metadata.get("optional"):
                continue
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[M], msg: dict[str, Any]) -> M:
        return cls(**{f.name: msg[f.name] for f in fields(cls) if f.name in msg})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# -- agent -> coordinator --
@dataclass
class Hello(Message):
    """Join (or, rejoin, come back); a restarted agent names its computation, generation and the checkpoint's
    agents. The checkpoint directory is the coordinator's (Welcome.ckptdir): the agent does not send one."""
    TYPE = "hello"
    host: str = "?"
    agent_pid: int = 0
    processes: list[dict] = _list()
    computation: str | None = None
    restart: bool = False
    rejoin: bool = False
    generation: int | None = None
    agent_id: str = ""
    agents: dict[str, str] = _dict()          # restart: every agent (id -> host) of the checkpoint
    agent_ids: list[str] = _list()            # restart: the agents whose images this one restores
    role: str = "peer"                        # "relay": a node's relay, which stands for the agents in members
    members: list[dict] | None = _opt()       # relay: its agents [{agent_id, agent_pid, processes}]


@dataclass
class AgentHeartbeat(Message):
    TYPE = "heartbeat"
    processes: list[dict] | None = _opt()
    progress: dict | None = _opt()            # {"bytes": written so far}, while images are written
    members: dict | None = _opt()             # relay: its agents' processes {agent id: processes} when they changed


@dataclass
class Ack(Message):
    TYPE = "ack"
    phase: str = ""
    generation: int = 0
    ok: bool = False
    error: str | None = None
    images: list[dict] | None = _opt()        # checkpoint: the ImageEntry rows written (each names its agent_id)
    stats: dict | None = _opt()               # checkpoint: the agent's stats; resume: {"frozen_s"}
    pending: bool | None = _opt()             # checkpoint: forked, the images come later in `written`
    tcp_ends: list | None = _opt()            # suspend: the agent's connected TCP ends


@dataclass
class Written(Message):
    TYPE = "written"
    generation: int = 0
    ok: bool = False
    error: str | None = _opt()
    images: list[dict] | None = _opt()
    stats: dict | None = _opt()


@dataclass
class Abandon(Message):
    TYPE = "abandon"
    generation: int | None = None
    reason: str = ""
    agent_id: str = ""


@dataclass
class Request(Message):
    TYPE = "request"
    cmd: str = "checkpoint"


@dataclass
class Bye(Message):
    TYPE = "bye"
    reason: str = ""
    agent_id: str | None = _opt()             # relay: one of its agents left (without: the relay itself)


@dataclass
class Stored(Message):
    """A copy of the agent's images of a committed generation made on another level (docs/storage.md): its
    partner's (level "partner") or the shared directory (level "shared"), or why not."""
    TYPE = "stored"
    generation: int = 0
    level: str = ""
    ok: bool = False
    error: str | None = _opt()
    bytes: int | None = _opt()
    seconds: float | None = _opt()
    partner: str | None = _opt()              # partner: the host that keeps the copy


@dataclass
class Restored(Message):
    TYPE = "restored"
    error: str | None = None


@dataclass
class KvPut(Message):
    TYPE = "kv_put"
    key: str = ""
    value: Any = None


@dataclass
class KvGet(Message):
    TYPE = "kv_get"
    key: str = ""
    wait: bool = False


@dataclass
class Command(Message):
    """From a client (dmtcp_command); extra arguments ride beside cmd (value, reason, address, why, frozen)."""
    TYPE = "command"
    cmd: str = ""


# -- coordinator -> agent --
@dataclass
class Welcome(Message):
    TYPE = "welcome"
    peer_id: int = 0
    computation: str | None = None
    interval: int = 0
    generation: int = 0
    ckptdir: str = ""                          # where the agent writes its images: the coordinator's
    heartbeat: float = 2.0
    peer_timeout: float = 90.0
    complete: list[int] = _list()              # the computation's committed generations
    round: int | None = None                   # the round in progress this agent takes part in
    protocol: int = PROTOCOL_VERSION
    peer_ids: dict | None = _opt()             # to a relay: the peer number of each of its agents


@dataclass
class Reject(Message):
    TYPE = "reject"
    reason: str = ""
    rejoin: bool | None = _opt()               # it does not know this connection: say hello again
    re: str | None = _opt()                    # the refused request's nonce


@dataclass
class CoordHeartbeat(Message):
    TYPE = "heartbeat"
    generation: int | None = None              # the round this agent takes part in (None: none)
    phase: str | None = None


@dataclass
class PhaseMsg(Message):
    TYPE = "phase"
    phase: str = ""
    generation: int = 0
    computation: str | None = None
    forked_ok: bool = True                     # images may be written after resume (not when the job stops)
    tcp_ends: list | None = _opt()             # drain: every agent's TCP ends [agent id, end...]
    reason: str | None = _opt()                # abort: why


@dataclass
class Kill(Message):
    TYPE = "kill"


@dataclass
class Committed(Message):
    TYPE = "committed"
    generation: int = 0
    prune: list[dict] = _list()                # images of retired generations [{generation, host, path}]
    partner: dict | None = _opt()              # where to send the partner copy {agent_id, host, addresses, port}


@dataclass
class Restart(Message):
    TYPE = "restart"
    go: bool = False
    reason: str | None = _opt()


@dataclass
class Kv(Message):
    TYPE = "kv"
    key: str = ""
    value: Any = None
    found: bool = False


TO_COORDINATOR: dict[str, type[Message]] = {c.TYPE: c for c in (
    Hello, AgentHeartbeat, Ack, Written, Abandon, Request, Bye, Stored, Restored, KvPut, KvGet, Command)}
TO_AGENT: dict[str, type[Message]] = {c.TYPE: c for c in (
    Welcome, Reject, CoordHeartbeat, PhaseMsg, Kill, Committed, Restart, Kv)}
