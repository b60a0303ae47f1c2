"""File descriptors of a whole computation: which fds share an open file description, what kind of object each
one is, and recreating those objects so processes share them again after a restart.

Dump: every fd of every frozen process is looked at once. fds that refer to the same open file description
(same offset and flags; dup'ed or inherited across fork) are grouped with kcmp(KCMP_FILE) and become one
*object* with one id, stored in the image of the first process (lowest PID) that holds it; every FdRecord
names its object. Descriptors that are the agent's own standard input/output/error (the launching command's)
are `stdio` and reconnect to the restarting command's. Each kind of object has a small handler module (files,
pipes, ...) with a class following the kind contract (base.py), listed in registry.KINDS in the order restore
needs.

Restore: the agent creates every object once (holding an fd of its own, above every fd number the
computation uses), and the restore helpers, forked from the agent, duplicate the ones they need into place
- which is how sharing between processes comes back.
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Any

from ...image.fdstate import FD_STATES, ObjectState
from ...image.records import FdRecord
from ..errors import UnsupportedFd
from ..shm import shmfiles, sysvshm
from .base import FdKind
from .entry import DumpContext, FdEntry, kcmp_same_file, list_fds, read_fd
from .registry import KINDS

log = logging.getLogger(__name__)


def describe_kind(e: FdEntry) -> str:
    """What a descriptor is, for the message refusing it: a kind may know (a UDP socket), else its type."""
    for k in KINDS:
        said = k.describe(e)
        if said:
            return said
    t = e.target
    if t.startswith("pipe:"):
        return "pipe"
    if t.startswith("socket:"):
        return "socket"
    if t.startswith("anon_inode:"):
        return t[len("anon_inode:"):].strip("[]")
    if stat.S_ISCHR(e.mode):
        return "character device"
    if stat.S_ISBLK(e.mode):
        return "block device"
    if stat.S_ISFIFO(e.mode):
        return "FIFO"
    return "file"


class FdTable:
    """Scans the descriptors of a set of frozen processes (dump side)."""

    def __init__(self, pids: list[int], stdio_pid: int | None = None, drained: dict | None = None,
                 force: bool = False):
        self.kinds: list[type[FdKind]] = KINDS
        for k in self.kinds:
            k.reset()                        # per-scan caches (e.g. the sock_diag table)
        self.pids = sorted(pids)
        self.stdio_pid = stdio_pid if stdio_pid is not None else os.getpid()
        self.force = force        # descriptors no kind can save are recorded as "null" (/dev/null at restore)
        self.problems: list[str] = []
        self.stdio = [e for e in (read_fd(self.stdio_pid, n) for n in (0, 1, 2)) if e is not None]
        self.ctx = DumpContext({}, drained=drained or {}, stdio_pid=self.stdio_pid)
        self.records: dict[int, list[FdRecord]] = {}

    def _stdio_of(self, e: FdEntry) -> int | None:
        for s in self.stdio:
            if (s.dev, s.ino) == (e.dev, e.ino) and kcmp_same_file(self.stdio_pid, s.fd, e.pid, e.fd):
                return s.fd
        # the same terminal or pipe through another open (e.g. /dev/tty reopened): also the launcher's
        for s in self.stdio:
            if (s.dev, s.ino) == (e.dev, e.ino) and (stat.S_ISCHR(e.mode) or stat.S_ISFIFO(e.mode)):
                return s.fd
        return None

    def check(self) -> None:
        """Refuse unsupported descriptors before anything is frozen (the job keeps running untouched)."""
        for pid in self.pids:
            for e in list_fds(pid):
                if self._stdio_of(e) is None and self._handler(e) is None:
                    raise UnsupportedFd(f"{e.where()}: {describe_kind(e)} ({e.target}) cannot be checkpointed")

    def _handler(self, e: FdEntry):
        for k in self.kinds:
            if k.matches(e):
                return k
        return None

    def scan(self) -> None:
        entries = {(pid, e.fd): e for pid in self.pids for e in list_fds(pid)}
        self.ctx.entries = entries
        # group descriptors into open file descriptions
        groups: dict[tuple[int, int], list[list[FdEntry]]] = {}
        for key in sorted(entries):
            e = entries[key]
            ofds = groups.setdefault((e.dev, e.ino), [])
            for ofd in ofds:
                rep = ofd[0]
                if kcmp_same_file(rep.pid, rep.fd, e.pid, e.fd):
                    ofd.append(e)
                    break
            else:
                ofds.append([e])
        ofd_of: dict[tuple[int, int], str] = {}
        handled: list[tuple] = []
        for ofds in groups.values():
            for ofd in ofds:
                first = ofd[0]
                io = self._stdio_of(first)
                if io is not None:
                    for e in ofd:
                        ofd_of[(e.pid, e.fd)] = f"stdio:{io}"
                    continue
                h = self._handler(first)
                if h is None and self.force:
                    self._give_up(f"{first.where()}: {describe_kind(first)} ({first.target}) cannot be "
                                  f"checkpointed", ofd, ofd_of)
                    continue
                if h is None:
                    raise UnsupportedFd(f"{first.where()}: {describe_kind(first)} ({first.target}) cannot be "
                                        f"checkpointed")
                oid = self.ctx.new_id()
                for e in ofd:
                    ofd_of[(e.pid, e.fd)] = oid
                handled.append((h, oid, ofd))
        # kinds dump in KINDS order: e.g. pipe inodes before the ends that refer to them
        order = {k: i for i, k in enumerate(self.kinds)}
        for h, oid, ofd in sorted(handled, key=lambda t: order[t[0]]):
            try:
                h.dump(self.ctx, oid, ofd)
            except UnsupportedFd as err:
                if not self.force:
                    raise
                self._give_up(str(err), ofd, ofd_of)
                self.ctx.objects.pop(oid, None)
                self.ctx.blobs.pop(oid, None)
        sysvshm.scan(self.ctx, self.pids)    # shared by processes without a descriptor; stored like the objects above
        shmfiles.scan(self.ctx, self.pids)   # named POSIX shared memory files: saved whole, put back at restart
        for (pid, fd), e in sorted(entries.items()):
            oid = ofd_of[(pid, fd)]
            kind = "stdio" if oid.startswith("stdio:") else "null" if oid == "null:" else self.ctx.objects[oid]["kind"]
            path = e.target
            self.records.setdefault(pid, []).append(
                FdRecord(fd=fd, kind=kind, path=path, flags=e.flags, pos=e.pos, cloexec=e.cloexec, ofd=oid,
                         size=self.ctx.objects.get(oid, {}).get("size", -1)))
        for k in self.kinds:                 # state not behind any one descriptor (the launching terminal)
            k.dump_computation(self.ctx, self.pids, self.stdio, self.records)

    def _give_up(self, why: str, ofd: list, ofd_of: dict) -> None:
        """(force) A descriptor no kind can save: recorded as "null", /dev/null after a restart."""
        log.warning("%s; it comes back as /dev/null", why)
        self.problems.append(why)
        for e in ofd:
            ofd_of[(e.pid, e.fd)] = "null:"

    def objects_of(self, pid: int) -> list[dict]:
        """The objects whose state goes into pid's image."""
        return [s for oid, s in self.ctx.objects.items() if self.ctx.owners[oid] == pid]

    def blobs_of(self, pid: int) -> dict[str, bytes]:
        return {oid: b for oid, b in self.ctx.blobs.items() if self.ctx.owners.get(oid) == pid}


class ObjectFactory:
    """Creates the computation's objects in the agent, once each (restore side)."""

    def __init__(self, objects: dict[str, dict], read_blob, base: int = 10):
        self.by_kind: dict[str, type[FdKind]] = {k.KIND: k for k in KINDS}
        self.objects = objects               # object id -> its image row (every kind, shm ones too)
        self._states: dict[str, ObjectState] = {}
        self.base = base                     # every fd we hand out is at or above this (above the job's fds)
        self.read_blob = read_blob           # object id -> bytes (from the owner's image)
        self.fds: dict[str, int] = {}        # object id -> fd in the agent
        self.extra: dict[str, Any] = {}   # handler scratch (e.g. pipe inode -> (r, w))
        self.after: list = []                # callables run once every process is restored and stopped
        self.rendezvous: Any = None              # the coordinator's key-value store, for objects spanning hosts

    def prepare(self) -> None:
        """Kinds whose objects must be made all at once, before any is handed out (`prepare(factory)`)."""
        for k in self.by_kind.values():
            k.prepare(self)

    def fd_for(self, oid: str) -> int:
        """The agent's fd for an object (or for "stdio:N": a copy of our own fd N), created on first use."""
        if oid not in self.fds:
            if oid == "null:":            # could not be saved (hpcckpt dump --force)
                fd = os.open(os.devnull, os.O_RDWR)
            elif oid.startswith("stdio:"):
                n = int(oid.split(":")[1])
                try:
                    fd = os.dup(n)
                except OSError:
                    fd = os.open(os.devnull, os.O_RDWR)     # we have no such stdio: like DMTCP, /dev/null
            else:
                state = self.objects.get(oid)
                if state is None:
                    raise UnsupportedFd(f"object {oid} is not in any image given (restart needs every image "
                                        f"of the checkpoint)")
                fd = self.by_kind[state["kind"]].create(self, self.state(oid))
            self.fds[oid] = self.high(fd)
        return self.fds[oid]

    def state(self, oid: str) -> Any:
        """The typed record (image/fdstate.py) of an fd kind's object, read from its image row once."""
        if oid not in self._states:
            row = self.objects[oid]
            self._states[oid] = FD_STATES[row["kind"]].from_dict(row)
        return self._states[oid]

    def states_of(self, kind: str) -> list[Any]:
        """Every object of one fd kind, as typed records, in id order of the images."""
        return [self.state(oid) for oid, row in self.objects.items() if row.get("kind") == kind]

    def shm_fd(self, key: str, size: int) -> int:
        """The memfd standing for shared memory object `key` (MAP_SHARED anonymous memory, a memfd, a deleted
        /dev/shm file) across every process that maps or opens it; grown to at least `size` bytes."""
        shms = self.extra.setdefault("shm", {})
        if key not in shms:
            fd = os.memfd_create("hpcckpt-shm", os.MFD_CLOEXEC)
            shms[key] = self.high(fd)
            self.fds[f"shm:{key}"] = shms[key]      # closed with the other objects
        fd = shms[key]
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return fd

    def high(self, fd: int) -> int:
        """Move fd above every fd number of the computation, so helpers can dup2 freely below it."""
        if fd >= self.base:
            return fd
        import fcntl
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, self.base)
        os.close(fd)
        return new

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        for k in self.by_kind.values():
            k.cleanup(self)
