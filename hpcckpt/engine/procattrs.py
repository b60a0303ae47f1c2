"""Process-wide attributes read from /proc: the mm layout fields, auxv, exe, cwd, umask, personality, rlimits.

The mm fields (start_code ... env_end) are what /proc/PID/cmdline, environ and the [heap]/[stack] labels are
computed from; restore hands them back to the kernel with prctl(PR_SET_MM, PR_SET_MM_MAP).
"""
from __future__ import annotations

import ctypes
import os
import struct

from .linux import SYS, check, syscall

# /proc/PID/stat field numbers (1-based, as in proc(5))
_STAT_FIELDS = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45, "end_data": 46,
                "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51}
MM_ORDER = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
            "arg_start", "arg_end", "env_start", "env_end")

RLIMITS = {"cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6, "nofile": 7,
           "memlock": 8, "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12, "nice": 13, "rtprio": 14,
           "rttime": 15}


def read_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode("utf-8", "replace")
    head, _, rest = raw.rpartition(")")
    return [head.split(" (", 1)[0], head.split(" (", 1)[1]] + rest.split()


def read_mm(pid: int) -> dict[str, int]:
    fields = read_stat(pid)
    return {name: int(fields[num - 1]) for name, num in _STAT_FIELDS.items()}


def ppid_of(pid: int) -> int:
    return int(read_stat(pid)[3])


def read_auxv(pid: int) -> bytes:
    with open(f"/proc/{pid}/auxv", "rb") as f:
        return f.read()


def read_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def read_personality(pid: int) -> int:
    with open(f"/proc/{pid}/personality") as f:
        return int(f.read().strip(), 16)


def read_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]


class _Rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]


def read_rlimits(pid: int) -> dict[str, list[int]]:
    out = {}
    for name, res in RLIMITS.items():
        old = _Rlimit()
        check(syscall(SYS.prlimit64, pid, res, 0, ctypes.addressof(old)), f"prlimit64(pid {pid})")
        out[name] = [old.cur, old.max]
    return out


def pack_mm_map(mm: dict[str, int], brk: int, auxv_addr: int, auxv_size: int, exe_fd: int) -> bytes:
    """struct prctl_mm_map (104 bytes)."""
    vals = dict(mm, brk=brk)
    return struct.pack("<11QQII", *(vals[k] for k in MM_ORDER), auxv_addr, auxv_size, exe_fd & 0xFFFFFFFF)



def read_creds(status: dict[str, str]) -> dict:
    """Credentials from /proc/PID/status: uids and gids (real, effective, saved, filesystem), supplementary
    groups, capability sets. uid/gid (the real ones) kept for images' readers that know only those."""
    uids = [int(x) for x in status["Uid"].split()]
    gids = [int(x) for x in status["Gid"].split()]
    return {"uid": uids[0], "gid": gids[0], "uids": uids, "gids": gids,
            "groups": [int(x) for x in status.get("Groups", "").split()],
            "cap_inh": int(status["CapInh"], 16), "cap_prm": int(status["CapPrm"], 16),
            "cap_eff": int(status["CapEff"], 16), "cap_bnd": int(status.get("CapBnd", "0"), 16),
            "cap_amb": int(status.get("CapAmb", "0"), 16)}


def children_of(pid: int) -> list[int]:
    """Direct children of every thread of pid (/proc/PID/task/TID/children)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out
