"""SysV shared memory segments (shmget/shmat): saved once per segment, recreated as real segments, attached
again in every process at the original address.

Which segments belong to the computation (decided with the fd scan, while every process is frozen):
  - every segment a job process has attached (/proc/PID/maps shows `/SYSV<key> (deleted)`; the inode there is
    the shmid);
  - a segment nobody in the job has attached but that a job process created or attached/detached last
    (cpid or lpid in /proc/sysvipc/shm is a job process, or us: we created it at a restart or read it at the
    last checkpoint), unless it is marked for removal (such a segment is gone once its last user detaches).
    A segment created by a process that has exited since and that no job process touched is not saved.
/proc/sysvipc/shm gives size, mode, owner, nattch and the current key; a segment marked IPC_RMID shows key 0
(IPC_PRIVATE) and SHM_DEST (01000) in its mode, but its maps name still carries the key it was created with.

Contents: the agent attaches each segment read-only and keeps the pages that exist (mincore; every page when
part of the segment is swapped out) and are not all zero. They are stored once, in the image of the lowest
PID that uses the segment, as an object of kind "sysvshm" (the attachments are RegionRecords with backing
"sysv" whose inode is the shmid). A forked checkpoint's snapshot detaches its copies at once (dump.snapshot),
so the job never sees nattch grow.

Restore (before the helpers are forked): inside our own PID namespace the agent first enters a new IPC
namespace of its own, so keys and shmids are free and /proc/sys/kernel/shm_next_id (which needs
CAP_CHECKPOINT_RESTORE over the IPC namespace, ours there even unprivileged) gives every segment its original
shmid - programs keep shmids in memory and call shmat/shmctl with them later. Without our own namespaces the
current IPC namespace is used: shm_next_id where permitted, else a new shmid (logged: a later shmat by the old
id would fail or find another segment). A key still held there by an unattached segment of the same size whose
creator is gone is taken to be the killed original's leftover and replaced; any other holder fails the
restart. Segments marked for removal are created first, attached by the agent and marked again at once (their
key is then free for a newer segment with the same key); the agent lets go of them once the processes have
attached. A failed restore removes every segment it created.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os

from ...image.fdstate import SysvShmState
from ..errors import IpcError, SysvError
from ..linux import PAGE, libc
from . import sysvipc

log = logging.getLogger(__name__)

IPC_PRIVATE = 0
IPC_CREAT, IPC_EXCL = 0o1000, 0o2000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
SHM_LOCK = 11
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
SHM_HUGETLB = 0o4000
SHM_DEST, SHM_LOCKED = 0o1000, 0o2000
CLONE_NEWIPC = 0x08000000
MADV_DONTFORK = 10
NEXT_ID = "/proc/sys/kernel/shm_next_id"
IPC_LIMITS = ("shmmax", "shmall", "shmmni", "shm_rmid_forced")
SYS_SHMAT = 30
MAX_SEGMENT_BYTES = 8 << 30
KINDS = ("sysvshm",) + sysvipc.KINDS       # the objects Segments recreates (semaphores, queues: sysvipc.py)

libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_FAILED = ctypes.c_void_p(-1).value


class ipc_perm(ctypes.Structure):
    _fields_ = [("key", ctypes.c_int), ("uid", ctypes.c_uint), ("gid", ctypes.c_uint), ("cuid", ctypes.c_uint),
                ("cgid", ctypes.c_uint), ("mode", ctypes.c_ushort), ("pad1", ctypes.c_ushort),
                ("seq", ctypes.c_ushort), ("pad2", ctypes.c_ushort), ("r1", ctypes.c_ulong), ("r2", ctypes.c_ulong)]


class shmid_ds(ctypes.Structure):
    _fields_ = [("perm", ipc_perm), ("segsz", ctypes.c_size_t), ("atime", ctypes.c_long), ("dtime", ctypes.c_long),
                ("ctime", ctypes.c_long), ("cpid", ctypes.c_int), ("lpid", ctypes.c_int), ("nattch", ctypes.c_ulong),
                ("r4", ctypes.c_ulong), ("r5", ctypes.c_ulong)]


def pages(size: int) -> int:
    return (size + PAGE - 1) // PAGE


def read_table() -> dict[int, dict]:
    """/proc/sysvipc/shm of our IPC namespace, by shmid."""
    out = {}
    try:
        with open("/proc/sysvipc/shm") as f:
            head = f.readline().split()
            for line in f:
                row = dict(zip(head, line.split()))
                if "shmid" in row:
                    vals = {k: int(v, 8 if k == "perms" else 10) for k, v in row.items()}   # perms in octal
                    out[vals["shmid"]] = vals
    except FileNotFoundError:
        pass
    return out


def attachments(pids: list[int]) -> dict[int, list[tuple[int, str]]]:
    """shmid -> [(pid, maps name)] for every SysV mapping of the processes."""
    out: dict[int, list[tuple[int, str]]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/SYSV" not in line:
                        continue
                    parts = line.split(None, 5)
                    out.setdefault(int(parts[4]), []).append((pid, parts[5].strip()))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def check(pids: list[int]) -> None:
    """Refuse, before anything is frozen, segments of an IPC namespace other than ours (their shmids mean
    nothing here)."""
    mine = os.readlink("/proc/self/ns/ipc")
    for shmid, users in attachments(pids).items():
        for pid, _ in users:
            try:
                theirs = os.readlink(f"/proc/{pid}/ns/ipc")
            except OSError:
                continue
            if theirs != mine:
                raise SysvError(f"pid {pid}: SysV shared memory segment {shmid} belongs to another IPC namespace "
                                f"(the process unshared it) and cannot be checkpointed")


def _key_of_name(name: str) -> int:
    """The key a segment was created with, from its maps name `/SYSV1234abcd (deleted)`."""
    try:
        return int(name[5:13], 16)
    except ValueError:
        return 0


def scan(ctx, pids: list[int]) -> None:
    """Add one object (and its contents) per segment of the computation to the dump context."""
    table = read_table()
    users = attachments(pids)
    ours = set(pids) | {os.getpid()}
    for shmid in sorted(set(table) | set(users)):
        row = table.get(shmid)
        if row is None:
            raise SysvError(f"pid {users[shmid][0][0]} maps SysV segment {shmid}, which /proc/sysvipc/shm does not "
                            f"list (another IPC namespace?)")
        dest = bool(row["perms"] & SHM_DEST)
        if shmid in users:
            owner = min(p for p, _ in users[shmid])
        elif not dest and (row["cpid"] in ours or row["lpid"] in ours):
            owner = next((p for p in (row["cpid"], row["lpid"]) if p in pids), min(pids))
        else:
            continue
        key = row["key"] & 0xFFFFFFFF
        if dest and shmid in users:
            key = _key_of_name(users[shmid][0][1])     # IPC_RMID made it IPC_PRIVATE; the name remembers
        if row["size"] > MAX_SEGMENT_BYTES:
            raise SysvError(f"SysV segment {shmid} is {row['size']} bytes; only up to {MAX_SEGMENT_BYTES} are saved")
        runs, data = _read_contents(shmid, row["size"], swapped=row.get("swap", 0) > 0)
        oid = ctx.new_id("sysv")
        ctx.add(oid, SysvShmState(shmid=shmid, key=key, size=row["size"], mode=row["perms"] & 0o777, rmid=dest,
                                  locked=bool(row["perms"] & SHM_LOCKED), uid=row["uid"], gid=row["gid"], runs=runs,
                                  attached=len(users.get(shmid, ()))), owner)
        ctx.blobs[oid] = data
    sysvipc.scan(ctx, pids)


def _read_contents(shmid: int, size: int, swapped: bool) -> tuple[list[list[int]], bytes]:
    """Pages of the segment that exist and are not all zero: ([[first page, count], ...], their bytes)."""
    n = pages(size)
    addr = libc.shmat(shmid, None, SHM_RDONLY)
    if addr is None or addr == _FAILED:
        err = ctypes.get_errno()
        raise SysvError(f"cannot read SysV segment {shmid}: shmat: {os.strerror(err)}")
    try:
        if swapped:
            present = b"\1" * n     # mincore does not see tmpfs pages out in swap: read every page
        else:
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(addr, n * PAGE, vec) != 0:
                raise SysvError(f"mincore on SysV segment {shmid}: {os.strerror(ctypes.get_errno())}")
            present = bytes(vec)
        zero = bytes(PAGE)
        runs: list[list[int]] = []
        parts = []
        i = 0
        while i < n:
            if not present[i] & 1:
                i += 1
                continue
            j = i
            while j < n and present[j] & 1:
                j += 1
            chunk = ctypes.string_at(addr + i * PAGE, (j - i) * PAGE)
            for k in range(j - i):
                page = chunk[k * PAGE:(k + 1) * PAGE]
                if page == zero:
                    continue
                if runs and runs[-1][0] + runs[-1][1] == i + k:
                    runs[-1][1] += 1
                else:
                    runs.append([i + k, 1])
                parts.append(page)
            i = j
        return runs, b"".join(parts)
    finally:
        libc.shmdt(addr)


# ---------------------------------------------------------------------------------------------- restore --

def _stat(shmid: int) -> shmid_ds | None:
    ds = shmid_ds()
    if libc.shmctl(shmid, IPC_STAT, ctypes.byref(ds)) < 0:
        return None
    return ds


def new_ipc_namespace() -> bool:
    """Move the agent (and so every helper forked later) into a new IPC namespace with the same limits."""
    limits = {}
    for name in IPC_LIMITS:
        try:
            with open(f"/proc/sys/kernel/{name}") as f:
                limits[name] = f.read().strip()
        except OSError:
            pass
    if libc.unshare(CLONE_NEWIPC) != 0:
        log.warning("cannot create an IPC namespace for the restarted job (%s); SysV segments are recreated in "
                    "the current one", os.strerror(ctypes.get_errno()))
        return False
    for name, value in limits.items():
        sysvipc.write_sysctl(f"/proc/sys/kernel/{name}", value)
    log.info("restarted job has an IPC namespace of its own (SysV shared memory keeps its shmids)")
    return True


class Segments:
    """The computation's SysV segments at restore: created in the agent before the helpers are forked."""

    def __init__(self, objects: list[dict], read_blob, own_namespace: bool):
        self.ipc = sysvipc.IpcObjects(objects, read_blob)         # semaphore sets and message queues
        segments = [SysvShmState.from_dict(o) for o in objects if o.get("kind", "sysvshm") == "sysvshm"]
        self.objects = sorted(segments, key=lambda s: (not s.rmid, s.shmid))
        self.read_blob = read_blob
        self.own_namespace = own_namespace
        self.ids: dict[int, tuple[int, int]] = {}      # image shmid -> (shmid now, size)
        self.held: dict[int, int] = {}                 # shmid now -> our attach address (segments marked RMID)
        self.done = False
        self._next_id_ok: bool | None = None

    def create(self) -> None:
        if not self.objects and not self.ipc.sems and not self.ipc.msgs:
            return
        if self.own_namespace:
            new_ipc_namespace()
        self._check_keys()
        try:
            self.ipc.create()
        except IpcError as e:
            raise SysvError(str(e)) from None
        for st in self.objects:
            self._create_one(st)

    def _check_keys(self) -> None:
        """Fail before changing anything if a key we need belongs to someone else."""
        for st in self.objects:
            if st.rmid or st.key == IPC_PRIVATE:
                continue
            other = libc.shmget(_signed(st.key), 0, 0)
            if other >= 0 and not self._leftover(other, st):
                ds = _stat(other)
                raise SysvError(f"SysV shared memory key {st.key:#010x} is in use by another segment (shmid "
                                f"{other}, {ds.nattch if ds else '?'} attached); cannot restore the job's segment "
                                f"{st.shmid}")

    @staticmethod
    def _leftover(shmid: int, st: SysvShmState) -> bool:
        """The segment left behind by the killed original: nobody attached, same size, its creator gone."""
        ds = _stat(shmid)
        if ds is None or ds.nattch or ds.segsz != st.size:
            return False
        return ds.cpid <= 0 or not os.path.exists(f"/proc/{ds.cpid}")

    def _shmget(self, key: int, size: int, flags: int, want: int) -> int:
        if self._next_id_ok is not False:
            self._next_id_ok = sysvipc.write_sysctl(NEXT_ID, want)
            if not self._next_id_ok:
                log.warning("cannot choose SysV shmids here (%s not writable): segments get new ids; a program that "
                            "calls shmat/shmctl later with an id it kept will fail", NEXT_ID)
        got = libc.shmget(_signed(key), size, flags)
        err = ctypes.get_errno()
        if self._next_id_ok:
            sysvipc.write_sysctl(NEXT_ID, -1)     # not consumed when shmget failed before allocating an id
        return got if got >= 0 else -err

    def _create_one(self, st: SysvShmState) -> None:
        key, size, want = st.key, st.size, st.shmid
        flags = IPC_CREAT | IPC_EXCL | (st.mode & 0o777)
        got = self._shmget(key, size, flags, want)
        if got == -errno.EEXIST and st.rmid:
            key = IPC_PRIVATE                # marked for removal: nobody finds it by key anyway
            got = self._shmget(key, size, flags, want)
        elif got == -errno.EEXIST:
            other = libc.shmget(_signed(key), 0, 0)
            if other >= 0 and self._leftover(other, st):
                log.info("removing SysV segment %d (key %#010x), left behind by the checkpointed job", other, key)
                libc.shmctl(other, IPC_RMID, None)
                got = self._shmget(key, size, flags, want)
        if got < 0:
            raise SysvError(f"cannot recreate SysV segment {want} (key {key:#010x}, {size} bytes): "
                            f"{os.strerror(-got)}")
        self.ids[want] = (got, size)
        if got != want:
            log.warning("SysV segment %d (key %#010x) restored as shmid %d: the program's later shmat/shmctl with "
                        "the old id will fail", want, key, got)
        addr = libc.shmat(got, None, 0)
        if addr is None or addr == _FAILED:
            raise SysvError(f"cannot attach the restored SysV segment {got}: {os.strerror(ctypes.get_errno())}")
        try:
            data = self.read_blob(st.id)
            off = 0
            for first, n in st.runs:
                ctypes.memmove(addr + first * PAGE, data[off:off + n * PAGE], n * PAGE)
                off += n * PAGE
        except BaseException:
            libc.shmdt(addr)
            raise
        if st.rmid:
            # we stay attached until the processes are (else marking it would destroy it); helpers forked
            # meanwhile need not inherit our attachment
            libc.madvise(addr, pages(size) * PAGE, MADV_DONTFORK)
            self.held[got] = addr
            libc.shmctl(got, IPC_RMID, None)
        else:
            libc.shmdt(addr)
        self._set_owner(got, st)

    @staticmethod
    def _set_owner(shmid: int, st: SysvShmState) -> None:
        ds = _stat(shmid)
        if ds is not None and (ds.perm.uid, ds.perm.gid) != (st.uid, st.gid):
            ds.perm.uid, ds.perm.gid = st.uid, st.gid
            if libc.shmctl(shmid, IPC_SET, ctypes.byref(ds)) < 0:
                log.info("SysV segment %d: owner %d:%d not restored (%s)", shmid, st.uid, st.gid,
                         os.strerror(ctypes.get_errno()))
        if st.locked and libc.shmctl(shmid, SHM_LOCK, None) < 0:
            log.info("SysV segment %d: SHM_LOCK not restored (%s)", shmid, os.strerror(ctypes.get_errno()))

    def finish(self) -> None:
        """Every process has attached its segments: let go of ours (segments marked for removal then live as
        long as the processes keep them attached)."""
        for addr in self.held.values():
            libc.shmdt(addr)
        self.held.clear()
        self.done = True

    def abort(self) -> None:
        """The restore failed: remove every segment (semaphore set, queue) we created."""
        self.ipc.abort()
        for got, _ in self.ids.values():
            libc.shmctl(got, IPC_RMID, None)
        for addr in self.held.values():
            libc.shmdt(addr)
        self.held.clear()
        self.ids.clear()


def _signed(key: int) -> int:
    return key - (1 << 32) if key >= 1 << 31 else key


# ---------------------------------------------------------------------- in the restored process --------

def attach_all(inj, regions, ids: dict[int, tuple[int, int]]) -> None:
    """shmat every attachment of the image at its address by an injected call, before any other mapping exists
    (an attachment may have been partly unmapped: the parts no longer there are unmapped again), then give
    each part its protection."""
    from ..linux import SYS
    from ..memory import prot_of
    groups: dict[tuple[int, int], list] = {}
    for r in regions:
        if r.backing == "sysv":
            groups.setdefault((r.inode, r.start - r.offset), []).append(r)
    for (shmid, base), regs in sorted(groups.items(), key=lambda kv: kv[0][1]):
        if shmid not in ids:
            raise SysvError(f"SysV segment {shmid} mapped at {base:#x} is not in the images")
        now, size = ids[shmid]
        writable = any(("mw" in r.vmflags) if r.vmflags else r.perms[1] == "w" for r in regs)
        execable = any(r.perms[2] == "x" for r in regs)
        flags = (0 if writable else SHM_RDONLY) | (SHM_EXEC if execable else 0)
        got = inj.call(SYS_SHMAT, now, base, flags)
        if got != base:
            err = os.strerror(-got) if -4096 < got < 0 else f"landed at {got:#x}"
            raise SysvError(f"cannot attach SysV segment {now} at {base:#x}: {err}")
        end = base + pages(size) * PAGE
        cursor = base
        for r in sorted(regs, key=lambda r: r.start):
            if r.start > cursor:
                inj.check(f"munmap({cursor:#x})", SYS.munmap, cursor, r.start - cursor)
            cursor = r.end
        if cursor < end:
            inj.check(f"munmap({cursor:#x})", SYS.munmap, cursor, end - cursor)
        attached = "r" + ("w" if writable else "-") + ("x" if execable else "-")
        for r in regs:
            if r.perms[:3] != attached:
                inj.check(f"mprotect({r.start:#x})", SYS.mprotect, r.start, r.end - r.start, prot_of(r.perms))
