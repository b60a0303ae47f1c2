"""Typed records stored in an image's metadata (documented field by field in docs/image-format.md).

Everything the engine dumps about a process ends up in one of these; they serialize to plain JSON so
`hpcckpt inspect` can print any image and a reader never has to reverse-engineer bytes.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import typing
from dataclasses import dataclass, field

SCHEMA = "hpcckpt-process-image"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


@functools.cache
def _hints(cls) -> dict:
    # typing.get_type_hints evaluates every (string) annotation again on each call: once per record class, not
    # once per region of every image (it was a third of restoring an incremental chain)
    return typing.get_type_hints(cls)


def _from_dict(cls, d):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        t = hints[f.name]
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = _from_dict(t, v)
        elif origin is list and args and dataclasses.is_dataclass(args[0]):
            v = [_from_dict(args[0], x) for x in v]
        kwargs[f.name] = v
    return cls(**kwargs)


def _plain(v):
    """JSON-ready copy of a record: dataclasses become dicts; lists and dicts are copied down to the first level
    of plain values (dataclasses.asdict deep-copies every leaf: a third of an incremental checkpoint's time when
    an image has thousands of chunk rows)."""
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        if v and isinstance(v[0], (int, str, float)):
            return list(v)
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class Record:
    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict):
        return _from_dict(cls, d)


@dataclass
class ThreadRecord(Record):
    tid: int
    regs: dict                      # user_regs_struct by name, exactly as stopped
    xstate: str                     # NT_X86_XSTATE regset, base64
    sigmask: int                    # blocked signals
    rseq: list | None = None        # [abi pointer, abi size, signature] or None
    robust_list: list = field(default_factory=lambda: [0, 0])   # [head, len]
    clear_child_tid: int = 0
    sigaltstack: list = field(default_factory=lambda: [0, 2, 0])  # [ss_sp, ss_flags, ss_size] (2 = SS_DISABLE)
    in_syscall: int = -1            # syscall number the thread was blocked in, -1 if none
    pending: list = field(default_factory=list)   # thread-directed pending signals: base64 siginfo
    comm: str = ""                  # thread name


@dataclass
class RegionRecord(Record):
    start: int
    end: int
    perms: str                      # "rw-p" as in /proc/PID/maps
    offset: int
    path: str
    dev: str = ""
    inode: int = 0
    vmflags: list = field(default_factory=list)
    backing: str = "anon"           # how restore maps it: anon | file | shared-anon | special | sysv (a SysV shm
                                    # attachment: inode is the segment's shmid, contents in its sysvshm object)
    file_size: int = -1             # identity of the backing file at checkpoint time
    file_mtime_ns: int = -1
    chunks: list = field(default_factory=list)   # image.format.Chunk rows
    shm: str = ""                   # shared memory object ("dev:inode") it maps, shared across processes
    hashes: dict | None = None      # incremental images: page hashes, 8 bytes per page ({"length", "chunks", "algo"})


@dataclass
class FdRecord(Record):
    fd: int
    kind: str                       # one of fdstate.FD_KINDS
    path: str = ""
    flags: int = 0                  # open flags (fdinfo)
    pos: int = 0
    cloexec: bool = False
    size: int = -1                  # file size at checkpoint (writable files are cut back to it on restart)
    ofd: str = ""                   # the open file description: an object id, or "stdio:N" (the launcher's fd N)


@dataclass
class ProcessRecord(Record):
    pid: int
    ppid: int
    comm: str
    exe: str
    cwd: str
    umask: int
    personality: int
    brk: int
    mm: dict                        # start_code ... env_end as PR_SET_MM_MAP wants them
    auxv: str                       # base64
    threads: list[ThreadRecord]
    sigactions: list                # 64 rows [handler, flags, restorer, mask], index = signal - 1
    regions: list[RegionRecord]
    fds: list[FdRecord]
    rlimits: dict = field(default_factory=dict)
    itimers: list = field(default_factory=list)    # ITIMER_REAL/VIRTUAL/PROF: [int_sec, int_usec, sec, usec]
    posix_timers: list = field(default_factory=list)  # {id, clock, signo, sigval, notify, target, spec}
    pending: list = field(default_factory=list)   # process-directed pending signals: base64 siginfo
    argv: list = field(default_factory=list)
    creds: dict = field(default_factory=dict)      # uid, gid, capabilities (CapInh/CapPrm/CapEff as ints)
    objects: list = field(default_factory=list)    # open files, pipes, ... this image stores (see fdtable.py)
    blobs: dict = field(default_factory=dict)      # object id -> {"length", "chunks"}: bulk data of an object
    pgid: int = 0
    sid: int = 0
    root: bool = False                              # the process the computation was launched as
    zombies: list = field(default_factory=list)    # children that exited unreaped: {pid, pgid, sid, status}
    pid_namespace: bool = False                     # taken inside hpcckpt's own PID namespace


@dataclass
class ImageMeta(Record):
    schema: str
    hpcckpt_version: str
    computation: str                # computation id: images of one computation restart together
    generation: int
    unique_id: str                  # this process's id within the computation
    hostname: str
    created: float
    program: str
    process: ProcessRecord
    stats: dict = field(default_factory=dict)
    base: str = ""                  # incremental: the image this one builds on (path relative to this one's dir)
    needs: list = field(default_factory=list)     # generations whose images a restore from this one reads
    agent_id: str = ""              # the agent that made it (one per host of the computation)
    agents: dict = field(default_factory=dict)    # agent id -> host, every agent of this checkpoint
    path_prefix: str = ""           # DMTCP_PATH_PREFIX at checkpoint: where the paths lived (engine/pathvirt.py)
