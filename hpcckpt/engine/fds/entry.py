"""The ground of the fd rooms: one descriptor of a frozen process as /proc shows it (FdEntry), listing a
process's descriptors, and what a kind may use while dumping (DumpContext). Imports nothing of fds/ above it:
every kind module, the fd table and the TCP drain build on it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ...image.fdstate import ObjectState
from ..linux import SYS, syscall
from ..uffd import is_ours

O_CLOEXEC = 0o2000000
KCMP_FILE = 0


@dataclass
class FdEntry:
    """One descriptor of one frozen process, as /proc shows it."""
    pid: int
    fd: int
    target: str
    dev: int
    ino: int
    mode: int
    flags: int               # open flags without O_CLOEXEC
    pos: int
    cloexec: bool
    info: dict
    info_text: str

    def where(self) -> str:
        return f"pid {self.pid} fd {self.fd}"


def read_fd(pid: int, fd: int) -> FdEntry | None:
    link = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(link)
        st = os.stat(link)
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    info: dict[str, str] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        info.setdefault(k.strip(), v.strip())
    flags = int(info.get("flags", "0"), 8)
    return FdEntry(pid, fd, target, st.st_dev, st.st_ino, st.st_mode, flags & ~O_CLOEXEC,
                   int(info.get("pos", "0")), bool(flags & O_CLOEXEC), info, text)


def list_fds(pid: int) -> list[FdEntry]:
    """The process's descriptors ([] if it has exited meanwhile)."""
    out: list[FdEntry] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for name in sorted(names, key=int):
        e = read_fd(pid, int(name))
        if e is not None and not is_ours(e.fd, e.target, e.info_text):     # our write tracking's descriptor
            out.append(e)
    return out


def kcmp_same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    return syscall(SYS.kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) == 0


@dataclass
class DumpContext:
    """What handlers may use while dumping: the agent's own stdio, a place for bulk data, all entries."""
    entries: dict[tuple[int, int], FdEntry]
    blobs: dict[str, bytes] = field(default_factory=dict)       # object id -> data to store as image chunks
    objects: dict[str, dict] = field(default_factory=dict)      # object id -> state
    owners: dict[str, int] = field(default_factory=dict)        # object id -> pid whose image stores it
    drained: dict = field(default_factory=dict)                 # socket inode -> bytes drained (tcp.Drained)
    index: dict[str, str] = field(default_factory=dict)        # e.g. "pipe-inode:dev:ino" -> its object id
    counter: int = 0
    stdio_pid: int = 0                                          # whose stdio is the launching command's

    def new_id(self, prefix: str = "o") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def add(self, oid: str, state: ObjectState | dict, owner: int) -> None:
        """Store an object's typed record (as its image row) in the image of `owner`."""
        if isinstance(state, ObjectState):
            state.id = oid
            state = state.to_dict()
        state["id"] = oid
        self.objects[oid] = state
        self.owners[oid] = owner
