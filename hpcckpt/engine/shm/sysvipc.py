"""SysV semaphore sets and message queues (semget/msgget): values and queued messages saved once per object,
recreated with the same ids at restart (next to SysV shared memory, sysvshm.py, which drives the restore).

Which objects belong to the computation (decided while every process is frozen; neither kind appears in
/proc/PID/maps or the fd table):
  - a semaphore set one of whose semaphores was last changed (semop, SETVAL, SETALL: `GETPID`) by a job
    process or by us (we set the values at a restart); a queue whose last sender or receiver (lspid/lrpid in
    /proc/sysvipc/msg) is a job process or us;
  - an object a job thread is blocked on right now (`/proc/PID/task/TID/syscall`: semop/semtimedop/msgsnd/
    msgrcv and its first argument, the id);
  - an object nobody has used yet (every pid above 0) that the job's user created since the job's oldest
    process started (ctime in /proc/sysvipc/*, which creation sets): created, not used yet.
An object of the same user last used by a process outside the job is left out (another job's).

Saved: key, id, mode, owner; semaphores' values (GETALL); a queue's messages in order (msgrcv with MSG_COPY
reads the i-th message without taking it out) and its byte limit (msg_qbytes). Not saved, because the kernel
shows them to nobody: semaphore undo values (SEM_UNDO adjustments a process would have applied at its exit) -
a program relying on them sees them dropped after a restart (docs/design.md). Threads blocked in semop/msgrcv
re-issue their call after the restore and block again on the restored values.

Restore: in the restarted job's own IPC namespace (sysvshm.new_ipc_namespace, entered before the helpers
are forked) /proc/sys/kernel/sem_next_id and msg_next_id give every object its original id; without one,
where the sysctl is not writable, objects get new ids (logged). A key held by the killed original's leftover
(every last user gone) is taken back; any other holder fails the restart. A failed restore removes what it
created.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import time

from ...image.fdstate import SysvMsgState, SysvSemState
from ..errors import IpcError
from ..linux import libc

log = logging.getLogger(__name__)

IPC_PRIVATE = 0
IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
GETPID, GETVAL, GETALL, SETVAL, SETALL = 11, 12, 13, 16, 17
MSG_COPY = 0o40000
MSG_NOERROR = 0o10000
SEM_NEXT_ID = "/proc/sys/kernel/sem_next_id"
MSG_NEXT_ID = "/proc/sys/kernel/msg_next_id"
SYS_SEMOP, SYS_SEMTIMEDOP, SYS_MSGSND, SYS_MSGRCV = 65, 220, 69, 70
KINDS = ("sysvsem", "sysvmsg")
MAX_MSG = 1 << 20            # no message is bigger than msgmax, which cannot exceed this by default settings


class ipc_perm(ctypes.Structure):
    _fields_ = [("key", ctypes.c_int), ("uid", ctypes.c_uint), ("gid", ctypes.c_uint), ("cuid", ctypes.c_uint),
                ("cgid", ctypes.c_uint), ("mode", ctypes.c_ushort), ("pad1", ctypes.c_ushort),
                ("seq", ctypes.c_ushort), ("pad2", ctypes.c_ushort), ("r1", ctypes.c_ulong), ("r2", ctypes.c_ulong)]


class semid_ds(ctypes.Structure):           # x86_64 glibc layout (104 bytes)
    _fields_ = [("perm", ipc_perm), ("otime", ctypes.c_long), ("r1", ctypes.c_ulong), ("ctime", ctypes.c_long),
                ("r2", ctypes.c_ulong), ("nsems", ctypes.c_ulong), ("r3", ctypes.c_ulong), ("r4", ctypes.c_ulong)]


class msqid_ds(ctypes.Structure):           # x86_64 glibc layout (120 bytes)
    _fields_ = [("perm", ipc_perm), ("stime", ctypes.c_long), ("rtime", ctypes.c_long), ("ctime", ctypes.c_long),
                ("cbytes", ctypes.c_ulong), ("qnum", ctypes.c_ulong), ("qbytes", ctypes.c_ulong),
                ("lspid", ctypes.c_int), ("lrpid", ctypes.c_int), ("r4", ctypes.c_ulong), ("r5", ctypes.c_ulong)]


assert ctypes.sizeof(semid_ds) == 104 and ctypes.sizeof(msqid_ds) == 120

libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
libc.semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
libc.msgget.argtypes = [ctypes.c_int, ctypes.c_int]
libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
libc.msgrcv.restype = ctypes.c_ssize_t


def _err() -> str:
    return os.strerror(ctypes.get_errno())


def _signed(key: int) -> int:
    return key - (1 << 32) if key >= 1 << 31 else key


def _table(kind: str) -> dict[int, dict]:
    """/proc/sysvipc/sem or msg of our IPC namespace, by id."""
    idcol = {"sem": "semid", "msg": "msqid"}[kind]
    out = {}
    try:
        with open(f"/proc/sysvipc/{kind}") as f:
            head = f.readline().split()
            for line in f:
                row = dict(zip(head, line.split()))
                if idcol in row:
                    vals = {k: int(v, 8 if k == "perms" else 10) for k, v in row.items()}
                    out[vals[idcol]] = vals
    except FileNotFoundError:
        pass
    return out


def blocked_on(pids: list[int]) -> dict[str, set[int]]:
    """Ids the job's threads are blocked on now: {"sem": {...}, "msg": {...}}."""
    out: dict[str, set[int]] = {"sem": set(), "msg": set()}
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
            if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
                continue
            nr, first = int(fields[0]), int(fields[1], 16)
            if nr in (SYS_SEMOP, SYS_SEMTIMEDOP):
                out["sem"].add(first)
            elif nr in (SYS_MSGSND, SYS_MSGRCV):
                out["msg"].add(first)
    return out


def _start_times(pids) -> dict[int, float]:
    """When each process started (epoch seconds); processes gone are left out."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[pid] = btime + int(f.read().rsplit(")", 1)[1].split()[19]) / hz
        except (OSError, IndexError, ValueError):
            continue
    return out


def _sem_pids(semid: int, nsems: int) -> list[int]:
    return [libc.semctl(semid, i, GETPID, None) for i in range(nsems)]


def _member(users: list[tuple[int, int]], starts: dict[int, float], uid: int, ctime: int, since: float,
            blocked: bool) -> bool:
    """Is this set/queue the job's? users: (pid of the last operation, its time in epoch seconds) pairs. A pid of
    ours counts only if that process already ran at the time of the operation: the pid of another user's process
    that has since exited may have been reused by one of the job's (which then made a checkpoint of a foreign,
    unreadable set fail: "Permission denied")."""
    if blocked or any(p in starts and starts[p] <= when + 1 for p, when in users):
        return True
    if any(p > 0 for p, _ in users):
        return False                  # last used by someone else
    return uid == os.geteuid() and ctime >= int(since) - 1


def scan(ctx, pids: list[int]) -> None:
    """Add one object per semaphore set and message queue of the computation to the dump context."""
    sems, msgs = _table("sem"), _table("msg")
    if not sems and not msgs:
        return
    starts = _start_times(set(pids) | {os.getpid()})
    blocked = blocked_on(pids)
    since = min((starts[p] for p in pids if p in starts), default=time.time())   # the job's oldest process
    owner = min(pids)
    for semid, row in sorted(sems.items()):
        # (a semaphore's pid is set by semop - otime - and by SETVAL/SETALL - ctime -, as a restore does)
        last = max(row["otime"], row["ctime"])
        users = [(p, last) for p in _sem_pids(semid, row["nsems"])]
        if not _member(users, starts, row["cuid"], row["ctime"], since, semid in blocked["sem"]):
            continue
        values = (ctypes.c_ushort * max(1, row["nsems"]))()
        if libc.semctl(semid, 0, GETALL, ctypes.cast(values, ctypes.c_void_p)) != 0:
            raise IpcError(f"cannot read SysV semaphore set {semid} (key {row['key'] & 0xFFFFFFFF:#010x}): "
                           f"{_err()}")
        oid = ctx.new_id("sem")
        ctx.add(oid, SysvSemState(semid=semid, key=row["key"] & 0xFFFFFFFF, nsems=row["nsems"],
                                  mode=row["perms"] & 0o777, uid=row["uid"], gid=row["gid"],
                                  values=list(values)[:row["nsems"]]), owner)
    for msqid, row in sorted(msgs.items()):
        users = [(row["lspid"], row["stime"]), (row["lrpid"], row["rtime"])]
        if not _member(users, starts, row["cuid"], row["ctime"], since, msqid in blocked["msg"]):
            continue
        ds = msqid_ds()
        if libc.msgctl(msqid, IPC_STAT, ctypes.byref(ds)) != 0:
            raise IpcError(f"cannot read SysV message queue {msqid}: {_err()}")
        messages, data = _read_messages(msqid, ds.qnum)
        oid = ctx.new_id("msq")
        ctx.add(oid, SysvMsgState(msqid=msqid, key=row["key"] & 0xFFFFFFFF, mode=row["perms"] & 0o777,
                                  uid=row["uid"], gid=row["gid"], qbytes=ds.qbytes, messages=messages), owner)
        ctx.blobs[oid] = data


def _read_messages(msqid: int, qnum: int) -> tuple[list[list[int]], bytes]:
    """Every queued message without taking it out: ([[type, length], ...], their bytes in order)."""
    buf = ctypes.create_string_buffer(8 + MAX_MSG)
    out, parts = [], []
    for i in range(qnum):
        n = libc.msgrcv(msqid, buf, MAX_MSG, i, IPC_NOWAIT | MSG_COPY | MSG_NOERROR)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.ENOMSG:       # fewer than qnum: cannot happen while the job is frozen
                break
            hint = " (the kernel lacks CONFIG_CHECKPOINT_RESTORE)" if err == errno.ENOSYS else ""
            raise IpcError(f"cannot read message {i} of SysV queue {msqid}: {os.strerror(err)}{hint}")
        mtype = struct.unpack_from("l", buf.raw, 0)[0]
        out.append([mtype, n])
        parts.append(buf.raw[8:8 + n])
    return out, b"".join(parts)


# ---------------------------------------------------------------------------------------------- restore --

def write_sysctl(path: str, value) -> bool:
    """Write a /proc/sys value (the next id to hand out); False where not permitted."""
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
        return True
    except OSError:
        return False


def _gone(users: list[int]) -> bool:
    """Left behind by the killed original: it was used, and every process that used it last is gone (an object
    nobody has used yet could be anyone's, just created)."""
    used = [p for p in users if p > 0]
    return bool(used) and not any(os.path.exists(f"/proc/{p}") for p in used)


def _leftover_sem(semid: int) -> bool:
    ds = semid_ds()
    if libc.semctl(semid, 0, IPC_STAT, ctypes.cast(ctypes.pointer(ds), ctypes.c_void_p)) != 0:
        return False
    return _gone(_sem_pids(semid, ds.nsems))


def _leftover_msg(msqid: int) -> bool:
    ds = msqid_ds()
    if libc.msgctl(msqid, IPC_STAT, ctypes.byref(ds)) != 0:
        return False
    return _gone([ds.lspid, ds.lrpid])


class IpcObjects:
    """The computation's semaphore sets and message queues at restore, created in the agent."""

    def __init__(self, objects: list[dict], read_blob):
        self.sems = sorted((SysvSemState.from_dict(o) for o in objects if o.get("kind") == "sysvsem"),
                           key=lambda o: o.semid)
        self.msgs = sorted((SysvMsgState.from_dict(o) for o in objects if o.get("kind") == "sysvmsg"),
                           key=lambda o: o.msqid)
        self.read_blob = read_blob
        self.created: list[tuple[str, int]] = []        # ("sem"|"msg", id now)
        self._next_ok: dict[str, bool | None] = {"sem": None, "msg": None}

    def create(self) -> None:
        self._check_keys()
        for sem in self.sems:
            self._create_sem(sem)
        for msg in self.msgs:
            self._create_msg(msg)

    def _check_keys(self) -> None:
        for kind, objs in (("sem", self.sems), ("msg", self.msgs)):
            for st in objs:
                if st.key == IPC_PRIVATE:
                    continue
                other = self._get(kind, st.key)
                if other >= 0 and not (_leftover_sem(other) if kind == "sem" else _leftover_msg(other)):
                    what = "semaphore set" if kind == "sem" else "message queue"
                    raise IpcError(f"SysV {what} key {st.key:#010x} is in use by another {what} (id {other}) "
                                   f"that a live process uses; cannot restore the job's {what} "
                                   f"{st.semid if isinstance(st, SysvSemState) else st.msqid}")

    @staticmethod
    def _get(kind: str, key: int) -> int:
        return libc.semget(_signed(key), 0, 0) if kind == "sem" else libc.msgget(_signed(key), 0)

    def _make(self, kind: str, key: int, want: int, create, retry: bool = True) -> int:
        path = SEM_NEXT_ID if kind == "sem" else MSG_NEXT_ID
        if retry and (_leftover_sem(want) if kind == "sem" else _leftover_msg(want)):
            # the killed original's object still holds the id (a private one has no key to find it by)
            log.info("removing SysV %s %d, left behind by the checkpointed job", kind, want)
            _remove(kind, want)
        if self._next_ok[kind] is not False:
            self._next_ok[kind] = write_sysctl(path, want)
            if not self._next_ok[kind]:
                log.warning("cannot choose SysV %s ids here (%s not writable): they get new ids; a program that "
                            "uses an id it kept will fail", kind, path)
        got = create()
        err = ctypes.get_errno()
        if self._next_ok[kind]:
            write_sysctl(path, -1)
        if got < 0 and err == errno.EEXIST and retry:
            other = self._get(kind, key)
            if other >= 0 and (_leftover_sem(other) if kind == "sem" else _leftover_msg(other)):
                log.info("removing SysV %s %d (key %#010x), left behind by the checkpointed job", kind, other, key)
                _remove(kind, other)
                return self._make(kind, key, want, create, retry=False)
        if got < 0:
            raise IpcError(f"cannot recreate SysV {kind} {want} (key {key:#010x}): {os.strerror(err)}")
        self.created.append((kind, got))
        if got != want:
            log.warning("SysV %s %d (key %#010x) restored as id %d: the program's later calls with the old id "
                        "will fail", kind, want, key, got)
        return got

    def _create_sem(self, st: SysvSemState) -> None:
        flags = IPC_CREAT | IPC_EXCL | (st.mode & 0o777)
        got = self._make("sem", st.key, st.semid,
                         lambda: libc.semget(_signed(st.key), st.nsems, flags))
        values = (ctypes.c_ushort * max(1, st.nsems))(*st.values)
        if libc.semctl(got, 0, SETALL, ctypes.cast(values, ctypes.c_void_p)) != 0:
            raise IpcError(f"cannot set the values of SysV semaphore set {got}: {_err()}")
        ds = semid_ds()
        if libc.semctl(got, 0, IPC_STAT, ctypes.cast(ctypes.pointer(ds), ctypes.c_void_p)) == 0 and \
                (ds.perm.uid, ds.perm.gid) != (st.uid, st.gid):
            ds.perm.uid, ds.perm.gid = st.uid, st.gid
            if libc.semctl(got, 0, IPC_SET, ctypes.cast(ctypes.pointer(ds), ctypes.c_void_p)) != 0:
                log.info("SysV semaphore set %d: owner %d:%d not restored (%s)", got, st.uid, st.gid, _err())

    def _create_msg(self, st: SysvMsgState) -> None:
        flags = IPC_CREAT | IPC_EXCL | (st.mode & 0o777)
        got = self._make("msg", st.key, st.msqid, lambda: libc.msgget(_signed(st.key), flags))
        ds = msqid_ds()
        if libc.msgctl(got, IPC_STAT, ctypes.byref(ds)) == 0:
            total = sum(n for _, n in st.messages)
            if ds.qbytes < max(st.qbytes, total):
                # a limit the program raised (or messages that need it): a limit above msgmnb needs
                # CAP_SYS_RESOURCE, which the job's own IPC namespace gives us over itself
                ds.qbytes = max(st.qbytes, total)
                if libc.msgctl(got, IPC_SET, ctypes.byref(ds)) != 0:
                    log.info("SysV queue %d: byte limit %d not restored (%s)", got, ds.qbytes, _err())
        data = self.read_blob(st.id) if st.messages else b""
        off = 0
        buf = ctypes.create_string_buffer(8 + MAX_MSG)
        for mtype, n in st.messages:
            struct.pack_into("l", buf, 0, mtype)
            ctypes.memmove(ctypes.addressof(buf) + 8, data[off:off + n], n)
            off += n
            if libc.msgsnd(got, buf, n, IPC_NOWAIT) != 0:
                raise IpcError(f"cannot put a message back into SysV queue {got}: {_err()}")
        ds = msqid_ds()
        if libc.msgctl(got, IPC_STAT, ctypes.byref(ds)) == 0 and (ds.perm.uid, ds.perm.gid) != (st.uid, st.gid):
            ds.perm.uid, ds.perm.gid = st.uid, st.gid
            if libc.msgctl(got, IPC_SET, ctypes.byref(ds)) != 0:
                log.info("SysV queue %d: owner %d:%d not restored (%s)", got, st.uid, st.gid, _err())

    def abort(self) -> None:
        for kind, got in self.created:
            _remove(kind, got)
        self.created.clear()


def _remove(kind: str, ident: int) -> None:
    if kind == "sem":
        libc.semctl(ident, 0, IPC_RMID, None)
    else:
        libc.msgctl(ident, IPC_RMID, None)
