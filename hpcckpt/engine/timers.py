"""Timers: the three interval timers (setitimer/alarm) and POSIX timers (timer_create).

Both are read by injecting getitimer/timer_gettime into the process (values are relative: time left and
interval) and recreated the same way at restore. POSIX timers come back with their own IDs, which programs
hold as timer_t: kernels from 6.16 on let a restorer choose the ID (prctl PR_TIMER_CREATE_RESTORE_IDS);
on older kernels IDs are handed out in order, so timers are created in ID order, with placeholders deleted
again to fill gaps. Time spent checkpointed does not count: a timer due in 30 ms is due 30 ms after restart.
"""
from __future__ import annotations

import logging
import struct
from typing import Any

from .inject import Injector
from .linux import SYS

log = logging.getLogger(__name__)

_ITIMERVAL = struct.Struct("<qqqq")       # it_interval {sec, usec}, it_value {sec, usec}
_ITIMERSPEC = struct.Struct("<qqqq")      # it_interval {sec, nsec}, it_value {sec, nsec}
_SIGEVENT = struct.Struct("<Qiii44x")     # sigev_value, sigev_signo, sigev_notify, _tid (+ padding to 64 bytes)
PR_TIMER_CREATE_RESTORE_IDS = 77
SIGEV_NOTIFY = {"signal": 0, "none": 1, "thread": 4}


def dump_itimers(inj: Injector, scratch) -> list[list[int]]:
    out = []
    for which in range(3):
        inj.check(f"getitimer({which})", SYS.getitimer, which, scratch.addr)
        out.append(list(_ITIMERVAL.unpack(scratch.read(0, _ITIMERVAL.size))))
    return out


def restore_itimers(inj: Injector, scratch, rows: list[list[int]]) -> None:
    for which, row in enumerate(rows):
        if any(row):
            scratch.write(0, _ITIMERVAL.pack(*row))
            inj.check(f"setitimer({which})", SYS.setitimer, which, scratch.addr, 0)


def _parse_proc_timers(pid: int) -> list[dict]:
    timers: list[dict] = []
    cur: dict[str, Any] | None = None
    try:
        with open(f"/proc/{pid}/timers") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        key, _, val = line.partition(":")
        val = val.strip()
        if key == "ID":
            cur = {"id": int(val)}
            timers.append(cur)
        elif key == "signal" and cur is not None:
            signo, _, sigval = val.partition("/")
            cur["signo"], cur["sigval"] = int(signo), int(sigval or "0", 16)
        elif key == "notify" and cur is not None:
            how, _, target = val.partition("/")
            cur["notify"] = how
            cur["target"] = int(target.split(".")[-1]) if "." in target else 0
        elif key == "ClockID" and cur is not None:
            cur["clock"] = int(val)
    return timers


def dump_posix_timers(inj: Injector, scratch, pid: int) -> list[dict]:
    out = []
    for t in _parse_proc_timers(pid):
        inj.check(f"timer_gettime({t['id']})", SYS.timer_gettime, t["id"], scratch.addr)
        t["spec"] = list(_ITIMERSPEC.unpack(scratch.read(0, _ITIMERSPEC.size)))
        r = inj.call(225, t["id"])                     # timer_getoverrun
        t["overrun"] = max(0, r)
        out.append(t)
    return out


def restore_posix_timers(inj: Injector, scratch, timers: list[dict], tid_map: dict[int, int]) -> None:
    if not timers:
        return
    by_id = sorted(timers, key=lambda t: t["id"])
    chosen_ids = inj.call(SYS.prctl, PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0) == 0
    try:
        placeholders = []
        for t in by_id:
            notify = SIGEV_NOTIFY.get(t.get("notify", "signal"), 0)
            target = tid_map.get(t.get("target", 0), t.get("target", 0)) if notify == 4 else 0
            scratch.write(0, _SIGEVENT.pack(t["sigval"], t["signo"], notify, target))
            while True:
                scratch.write(128, struct.pack("<i", t["id"]))
                r = inj.call(SYS.timer_create, t["clock"], scratch.addr, scratch.addr + 128)
                if r < 0:
                    raise OSError(-r, f"timer_create for timer {t['id']} failed")
                got = struct.unpack("<i", scratch.read(128, 4))[0]
                if got == t["id"]:
                    break
                if chosen_ids or got > t["id"]:
                    raise OSError(0, f"timer {t['id']} came back as {got}; programs holding its ID would break")
                placeholders.append(got)       # older kernels: fill the gap, delete later
            scratch.write(0, _ITIMERSPEC.pack(*t["spec"]))
            inj.check(f"timer_settime({t['id']})", SYS.timer_settime, t["id"], 0, scratch.addr, 0)
        for got in placeholders:
            inj.call(226, got)                          # timer_delete
    finally:
        if chosen_ids:
            inj.call(SYS.prctl, PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0)


SI_KERNEL, SI_TIMER = 0x80, -2
SIGALRM = 14


def fire_due_timers(itimers: list[list[int]], posix_timers: list[dict], pending: list[bytes]) -> list[bytes]:
    """A periodic timer whose signal is still pending shows "no time left": the kernel re-arms it only when
    that very signal is delivered. A copy of the signal queued again after a restart would not re-arm it, so
    instead such a timer is made due at once (it fires, and re-arms itself, right after the restart) and its
    pending signal is dropped. Returns the pending signals to keep."""
    drop_alarm = False
    real = itimers[0] if itimers else None
    if real and real[2:] == [0, 0] and real[:2] != [0, 0]:
        real[3] = 1
        drop_alarm = True
    due_timers = set()
    for t in posix_timers:
        if t["spec"][2:] == [0, 0] and t["spec"][:2] != [0, 0]:
            t["spec"][3] = 1
            due_timers.add(t["id"])
    keep = []
    for info in pending:
        signo, _, code = struct.unpack_from("<iii", info)
        if drop_alarm and signo == SIGALRM and code == SI_KERNEL:
            continue
        if code == SI_TIMER and struct.unpack_from("<i", info, 16)[0] in due_timers:
            continue
        keep.append(info)
    return keep
