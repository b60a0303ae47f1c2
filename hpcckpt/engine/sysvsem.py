"""SysV semaphore sets of the computation: key, semid, mode, owner and every semaphore's value.

Which sets (decided while every process is frozen): those in which a job process was the last to change a
semaphore (semctl GETPID: semop, SETVAL and SETALL set it) and those a job thread is blocked on
(/proc/PID/task/TID/syscall shows semop/semtimedop and the semid). Stored like SysV segments, as objects of
kind "sysvsem" in the image of the lowest PID concerned.

Restore (in the agent, after the segments, so in the same IPC namespace): a set still present with the same
semid, key and size - the killed original's, restarting on the same host - gets the saved values; otherwise
the set is created with its key at its semid (/proc/sys/kernel/sem_next_id, where permitted; else another
semid, logged: the program keeps semids in memory). A key held by another set fails the restart. Not saved:
the processes' SEM_UNDO adjustments (a restarted process that exits does not undo operations made before the
checkpoint), and the waiting counts (the blocked threads re-issue their semop and wait again).
"""
from __future__ import annotations

import ctypes
import logging
import os

from .linux import libc
from .sysvshm import IPC_CREAT, IPC_EXCL, IPC_PRIVATE, IPC_SET, IPC_STAT, SysvError, _write, ipc_perm

log = logging.getLogger(__name__)

GETPID, GETALL, SETALL = 11, 13, 17
NEXT_ID = "/proc/sys/kernel/sem_next_id"
SEMOP, SEMTIMEDOP = 64, 220


class semid_ds(ctypes.Structure):
    _fields_ = [("perm", ipc_perm), ("otime", ctypes.c_long), ("r1", ctypes.c_ulong), ("ctime", ctypes.c_long),
                ("r2", ctypes.c_ulong), ("nsems", ctypes.c_ulong), ("r3", ctypes.c_ulong), ("r4", ctypes.c_ulong)]


libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
libc.semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


def read_table() -> dict[int, dict]:
    """/proc/sysvipc/sem of our IPC namespace, by semid."""
    out = {}
    try:
        with open("/proc/sysvipc/sem") as f:
            head = f.readline().split()
            for line in f:
                row = dict(zip(head, line.split()))
                if "semid" in row:
                    vals = {k: int(v, 8 if k == "perms" else 10) for k, v in row.items()}
                    out[vals["semid"]] = vals
    except FileNotFoundError:
        pass
    return out


def _values(semid: int, nsems: int) -> list[int] | None:
    arr = (ctypes.c_ushort * nsems)()
    if libc.semctl(semid, 0, GETALL, ctypes.addressof(arr)) < 0:
        return None
    return list(arr)


def _blocked_on(pids: list[int]) -> set[int]:
    """semids job threads are blocked on (semop/semtimedop)."""
    out = set()
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                    fields = f.read().split()
            except OSError:
                continue
            if len(fields) > 1 and fields[0] in (str(SEMOP), str(SEMTIMEDOP)):
                out.add(int(fields[1], 16))
    return out


def scan(ctx, pids: list[int]) -> None:
    """Add one object per semaphore set of the computation to the dump context."""
    table = read_table()
    if not table:
        return
    blocked = _blocked_on(pids)
    for semid, row in sorted(table.items()):
        nsems = row["nsems"]
        last = [libc.semctl(semid, i, GETPID, None) for i in range(nsems)]
        users = [p for p in last if p in pids]
        if not users and semid not in blocked:
            continue
        values = _values(semid, nsems)
        if values is None:
            raise SysvError(f"cannot read SysV semaphore set {semid} ({os.strerror(ctypes.get_errno())})")
        oid = ctx.new_id("sem")
        ctx.add(oid, {"kind": "sysvsem", "semid": semid, "key": row["key"] & 0xFFFFFFFF,
                      "mode": row["perms"] & 0o777, "uid": row["uid"], "gid": row["gid"], "values": values},
                min(users or pids))


def _signed(key: int) -> int:
    return key - (1 << 32) if key & (1 << 31) else key


def restore(objects: list[dict]) -> None:
    """Put every saved set back in the current IPC namespace (see the module notes). Raises SysvError."""
    if not objects:
        return
    table = read_table()
    by_key = {r["key"] & 0xFFFFFFFF: sid for sid, r in table.items() if r["key"] != IPC_PRIVATE}
    for st in sorted(objects, key=lambda s: s["semid"]):
        n, key = len(st["values"]), st["key"]
        row = table.get(st["semid"])
        if row is not None and (row["key"] & 0xFFFFFFFF) == key and row["nsems"] == n:
            semid = st["semid"]                        # the original's set, still here: values as saved
        else:
            if key != IPC_PRIVATE and key in by_key:
                raise SysvError(f"SysV semaphore key {key:#x} is held by set {by_key[key]}, not the job's; remove "
                                f"it (ipcrm -S {key:#x}) or restart where the key is free")
            if row is None:
                _write(NEXT_ID, st["semid"])
            semid = libc.semget(_signed(key), n, IPC_CREAT | IPC_EXCL | st["mode"])
            _write(NEXT_ID, -1)
            if semid < 0:
                raise SysvError(f"cannot recreate SysV semaphore set {st['semid']} (key {key:#x}): "
                                f"{os.strerror(ctypes.get_errno())}")
            if semid != st["semid"]:
                log.warning("SysV semaphore set %d comes back as %d: a program using the old id will fail",
                            st["semid"], semid)
        arr = (ctypes.c_ushort * n)(*st["values"])
        if libc.semctl(semid, 0, SETALL, ctypes.addressof(arr)) < 0:
            raise SysvError(f"cannot set the values of SysV semaphore set {semid}: {os.strerror(ctypes.get_errno())}")
        ds = semid_ds()
        if libc.semctl(semid, 0, IPC_STAT, ctypes.addressof(ds)) == 0 and \
                (ds.perm.uid, ds.perm.gid, ds.perm.mode & 0o777) != (st["uid"], st["gid"], st["mode"]):
            ds.perm.uid, ds.perm.gid, ds.perm.mode = st["uid"], st["gid"], st["mode"]
            if libc.semctl(semid, 0, IPC_SET, ctypes.addressof(ds)) < 0:
                log.warning("SysV semaphore set %d: owner/mode not restored (%s)", semid,
                            os.strerror(ctypes.get_errno()))
