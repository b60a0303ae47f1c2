"""The objects of an image, one typed record per kind: what a file descriptor's open file description (an fd
kind of engine/fds/) or a piece of shared state (engine/shm/) saves, as ImageMeta.process.objects rows.

Each record is a dataclass; `to_dict()` gives the row as images store it - "kind" first, the fields in their
order, a field marked OPTIONAL left out while it is None (so rows are exactly what earlier versions wrote) -
and `from_dict()` reads a row back, taking defaults for fields an older image does not have. Nested rows
(lock rows, inotify watches, epoll items, socket options, termios) stay plain dicts; docs/image-format.md
lists every field. The object's "id" is set when the engine adds it to the dump (fds/entry.DumpContext.add).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

OPTIONAL = {"optional": True}          # left out of the row while None (absent in images of earlier versions)

T = TypeVar("T", bound="ObjectState")


def _opt() -> Any:
    return field(default=None, metadata=OPTIONAL)


@dataclass(kw_only=True)
class ObjectState:
    KIND: ClassVar[str] = ""
    id: str = ""

    def to_dict(self) -> dict:
        row: dict[str, Any] = {"kind": self.KIND}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "id" or (f.metadata.get("optional") and value is None):
                continue
            row[f.name] = value
        if self.id:
            row["id"] = self.id
        return row

    @classmethod
    def from_dict(cls: type[T], row: dict) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


# ------------------------------------------------------------------------------------------ fd kinds --
@dataclass(kw_only=True)
class FileState(ObjectState):
    """A regular file: reopened by path at its offset; a deleted one from its saved bytes (the blob)."""
    KIND = "file"
    path: str
    flags: int
    pos: int
    deleted: bool = False
    size: int = 0
    shm: str | None = _opt()                # deleted /dev/shm or memfd file: the shared memory key "maj:min:ino"
    mode: int | None = _opt()               # deleted file: its permission bits
    saved: dict | None = _opt()             # --checkpoint-open-files: {sha256, size, mode} of the blob
    locks: list | None = _opt()             # flock/POSIX/OFD lock rows held through this description


@dataclass(kw_only=True)
class DirState(ObjectState):
    KIND = "dir"
    path: str
    flags: int
    pos: int
    locks: list | None = _opt()


@dataclass(kw_only=True)
class DeviceState(ObjectState):
    """A stateless device (/dev/null, /dev/zero, /dev/full, /dev/[u]random)."""
    KIND = "dev"
    path: str
    flags: int


@dataclass(kw_only=True)
class ProcFileState(ObjectState):
    """/proc/PID[/task/TID]/... of a job process: reopened by the restored process for its new PID."""
    KIND = "procfile"
    path: str
    flags: int
    pos: int


@dataclass(kw_only=True)
class PipeInodeState(ObjectState):
    """A pipe or FIFO itself, referred to by its ends: capacity and the bytes in it (base64)."""
    KIND = "pipe-inode"
    fifo: str | None = None                 # the FIFO's path; None for an anonymous pipe
    capacity: int = 65536
    data: str = ""
    bytes: int = 0


@dataclass(kw_only=True)
class PipeEndState(ObjectState):
    KIND = "pipe"
    pipe: str                               # the pipe-inode object's id
    end: str                                # "r", "w" or "rw"
    flags: int


@dataclass(kw_only=True)
class AwareState(ObjectState):
    """A program's connection to hpcckpt's program API (aware/): its subscriptions and pending messages."""
    KIND = "aware"
    flags: int = 0
    pid: int = 0
    events: list = field(default_factory=list)
    delay: Any = None
    pending: list = field(default_factory=list)


@dataclass(kw_only=True)
class UnixState(ObjectState):
    KIND = "unix"
    ino: int
    type: str                               # "stream", "dgram" or "seqpacket"
    listening: bool
    name: str | None                        # bound name (None: unbound; "@..." abstract)
    peer: int                               # the peer's inode (0: none)
    shutdown: int
    flags: int
    queue: list = field(default_factory=list)   # datagrams / stream bytes not read yet (base64)
    peer_name: str | None = _opt()


@dataclass(kw_only=True)
class TcpState(ObjectState):
    KIND = "tcp"
    ino: int
    family: int
    state: int                              # TCP state number (tcp/info.py)
    state_name: str
    local: list                             # [address, port]
    remote: list
    bound: bool
    flags: int
    opts: dict                              # socket options by name
    peer: int | None = None                 # the peer end's inode when it is in the computation on this host
    data: str = ""                          # bytes not read yet (base64), unless data_blob
    where: str = ""                         # "pid P fd N: TCP socket a:p", for messages at restart
    remote_end: bool | None = _opt()        # the other end is on another host of the computation
    conn: str | None = _opt()               # (remote_end) the connection's key, the same on both hosts
    server: bool | None = _opt()            # (remote_end) this end listens when the connection is made again
    data_blob: bool | None = _opt()         # the unread bytes are the object's blob


@dataclass(kw_only=True)
class EventFdState(ObjectState):
    KIND = "eventfd"
    count: int
    semaphore: bool
    flags: int


@dataclass(kw_only=True)
class TimerFdState(ObjectState):
    KIND = "timerfd"
    clock: int
    ticks: int
    value: Any                              # [seconds, nanoseconds] to the next expiry
    interval: Any
    flags: int


@dataclass(kw_only=True)
class SignalFdState(ObjectState):
    KIND = "signalfd"
    mask: int
    flags: int


@dataclass(kw_only=True)
class EpollState(ObjectState):
    KIND = "epoll"
    flags: int
    items: list = field(default_factory=list)   # {tfd, events, data, pid (who registered it)}


@dataclass(kw_only=True)
class InotifyState(ObjectState):
    KIND = "inotify"
    flags: int
    watches: list = field(default_factory=list)  # {wd, ino, sdev, mask, handle, htype, path, link}
    queued: int = 0                              # bytes of events not read (not restored)


@dataclass(kw_only=True)
class PtyState(ObjectState):
    """A pseudo-terminal pair of the computation, referred to by its master and slave descriptors."""
    KIND = "pty"
    index: int
    hung: bool = False                      # its master was closed
    input: list = field(default_factory=list)   # [base64 chunk, ends a line] typed but not read
    output: str = ""                        # written but not read on the master (base64)
    termios: dict | None = _opt()
    winsize: list | None = _opt()
    packet: bool | None = _opt()
    locked: bool | None = _opt()
    path: str | None = _opt()               # the master's /dev/ptmx path
    exclusive: bool | None = _opt()
    sid: int | None = _opt()                # session whose controlling terminal it is (0: none)
    fg: int | None = _opt()                 # its foreground process group
    input_held: int | None = _opt()
    bytes: list | None = _opt()             # [input bytes, output bytes]


@dataclass(kw_only=True)
class PtyMasterState(ObjectState):
    KIND = "ptmx"
    pty: str                                # the pty object's id
    flags: int


@dataclass(kw_only=True)
class PtySlaveState(ObjectState):
    KIND = "pts"
    pty: str
    flags: int
    path: str


@dataclass(kw_only=True)
class DevTtyState(ObjectState):
    KIND = "devtty"
    flags: int
    of: str                                 # "hung", "launch" (the launching terminal) or a pty object's id


@dataclass(kw_only=True)
class TerminalState(ObjectState):
    """The launching command's terminal: the settings the computation made, which stdio is it, who has it."""
    KIND = "terminal"
    stdio: list
    ctty: bool
    rdev: int
    termios: dict
    winsize: list
    members: list                           # PIDs whose controlling terminal it is
    fg: int


# ------------------------------------------------------------------------------- shared memory (engine/shm/) --
@dataclass(kw_only=True)
class ShmFileState(ObjectState):
    """A named shared memory file (/dev/shm, tmpfs, or a regular file mapped shared): written back at its path."""
    KIND = "shmfile"
    path: str
    size: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    extents: list                           # [file offset, length] of the data extents, whose bytes are the blob


@dataclass(kw_only=True)
class SysvShmState(ObjectState):
    KIND = "sysvshm"
    shmid: int
    key: int
    size: int
    mode: int
    rmid: bool                              # marked IPC_RMID
    locked: bool                            # SHM_LOCK
    uid: int
    gid: int
    runs: list                              # [first page, npages] of the non-zero pages, whose bytes are the blob
    attached: int = 0                       # attachments in the job


@dataclass(kw_only=True)
class SysvSemState(ObjectState):
    KIND = "sysvsem"
    semid: int
    key: int
    nsems: int
    mode: int
    uid: int
    gid: int
    values: list


@dataclass(kw_only=True)
class SysvMsgState(ObjectState):
    KIND = "sysvmsg"
    msqid: int
    key: int
    mode: int
    uid: int
    gid: int
    qbytes: int
    messages: list                          # [mtype, length] in queue order; the bytes are the blob


FD_STATES: dict[str, type[ObjectState]] = {c.KIND: c for c in (
    ProcFileState, FileState, DirState, DeviceState, PipeInodeState, PipeEndState, AwareState, UnixState, TcpState,
    EventFdState, TimerFdState, SignalFdState, EpollState, InotifyState, PtyState, PtyMasterState, PtySlaveState,
    DevTtyState, TerminalState)}

# Every kind a file descriptor (FdRecord.kind) may have: the fd kinds above (one handler each in
# engine/fds/registry.py; tests/unit/engine/test_rooms.py checks the two agree), the launcher's "stdio", and "null"
# (`hpcckpt dump --force`: a descriptor no kind could save, /dev/null after a restart; its ofd is "null:").
FD_KINDS = frozenset(FD_STATES) | {"stdio", "null"}

SHM_STATES: dict[str, type[ObjectState]] = {c.KIND: c for c in (ShmFileState, SysvShmState, SysvSemState,
                                                                 SysvMsgState)}
