"""Event descriptors: eventfd, timerfd, signalfd and epoll.

Each is read from /proc/PID/fdinfo (eventfd count and semaphore mode; timerfd clock, time left, interval and
expirations not yet read; signalfd mask; epoll's registered descriptors with their events and data) and
recreated in the agent. Epoll registrations are made again by the restore helper of a process that had the
watched descriptor at the same number, so the epoll item keys (file, fd number) are the original ones and
later EPOLL_CTL_MOD/DEL calls of the program find them.

Not restorable: a timerfd's absolute TFD_TIMER_ABSTIME deadline is kept as time left (it fires after the same
delay); inotify/fanotify and userfaultfd are refused at checkpoint time.
"""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import re

from ...image.fdstate import EpollState, EventFdState, SignalFdState, TimerFdState
from ..errors import UnsupportedFd
from ..linux import check, libc
from .base import FdKind
from .entry import FdEntry

log = logging.getLogger(__name__)

EFD_SEMAPHORE = 1
TFD_IOC_SET_TICKS = 0x40085400
O_ACCMODE = 0o3


def _anon(e: FdEntry, name: str) -> bool:
    return e.target == f"anon_inode:[{name}]" or e.target == f"anon_inode:{name}"


def _keep_flags(flags: int) -> int:
    return flags & os.O_NONBLOCK


class EventFd(FdKind):
    KIND = "eventfd"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return _anon(e, "eventfd")

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        ctx.add(oid, EventFdState(count=int(e.info.get("eventfd-count", "0"), 16),
                                  semaphore=e.info.get("eventfd-semaphore", "0") == "1", flags=e.flags),
                min(x.pid for x in ofd))

    @staticmethod
    def create(factory, s: EventFdState) -> int:
        flags = os.EFD_CLOEXEC | (EFD_SEMAPHORE if s.semaphore else 0) | _keep_flags(s.flags)
        return os.eventfd(s.count, flags)


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


def _pair(text: str) -> tuple[int, int]:
    m = re.match(r"\((\d+),\s*(\d+)\)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class TimerFd(FdKind):
    KIND = "timerfd"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return _anon(e, "timerfd")

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        ctx.add(oid, TimerFdState(clock=int(e.info.get("clockid", "1")), ticks=int(e.info.get("ticks", "0")),
                                  value=_pair(e.info.get("it_value", "(0, 0)")),
                                  interval=_pair(e.info.get("it_interval", "(0, 0)")), flags=e.flags),
                min(x.pid for x in ofd))

    @staticmethod
    def create(factory, s: TimerFdState) -> int:
        libc.timerfd_create.restype = ctypes.c_int
        fd = check(libc.timerfd_create(s.clock, os.O_CLOEXEC | _keep_flags(s.flags)), "timerfd_create")
        value = tuple(s.value)
        if value == (0, 0) and tuple(s.interval) != (0, 0):
            value = (0, 1)                    # due right away (it was due while we were checkpointed)
        spec = _Itimerspec(_Timespec(*s.interval), _Timespec(*value))
        if value != (0, 0):
            check(libc.timerfd_settime(fd, 0, ctypes.byref(spec), None), "timerfd_settime")
        if s.ticks:
            ticks = ctypes.c_uint64(s.ticks)
            try:
                fcntl.ioctl(fd, TFD_IOC_SET_TICKS, ticks)
            except OSError as e:
                log.warning("timerfd: %d unread expirations not restored (%s)", s.ticks, e.strerror)
        return fd


class SignalFd(FdKind):
    KIND = "signalfd"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return _anon(e, "signalfd")

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        ctx.add(oid, SignalFdState(mask=int(e.info.get("sigmask", "0"), 16), flags=e.flags), min(x.pid for x in ofd))

    @staticmethod
    def create(factory, s: SignalFdState) -> int:
        mask = ctypes.c_uint64(s.mask)
        return check(libc.signalfd(-1, ctypes.byref(mask), os.O_CLOEXEC | _keep_flags(s.flags)), "signalfd")


_TFD = re.compile(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s+pos:\s*\d+\s+ino:\s*([0-9a-f]+)"
                  r"\s+sdev:\s*([0-9a-f]+)")


class Epoll(FdKind):
    KIND = "epoll"

    @staticmethod
    def matches(e: FdEntry) -> bool:
        return _anon(e, "eventpoll")

    @staticmethod
    def dump(ctx, oid: str, ofd: list[FdEntry]) -> None:
        e = ofd[0]
        holders = sorted({x.pid for x in ofd})
        items = []
        for m in _TFD.finditer(e.info_text):
            tfd, events, data, ino, sdev = int(m[1]), int(m[2], 16), int(m[3], 16), int(m[4], 16), int(m[5], 16)
            # who registered it: a process holding this epoll whose fd tfd is still the watched file
            registrar = next((p for p in holders if (p, tfd) in ctx.entries and ctx.entries[(p, tfd)].ino == ino
                              and os.major(ctx.entries[(p, tfd)].dev) == os.major(sdev)
                              and os.minor(ctx.entries[(p, tfd)].dev) == os.minor(sdev)), None)
            if registrar is None:
                raise UnsupportedFd(f"{e.where()}: epoll watches fd {tfd}, which is no longer open as the watched "
                                    f"file in any process of the computation")
            items.append({"tfd": tfd, "events": events, "data": data, "pid": registrar})
        ctx.add(oid, EpollState(flags=e.flags, items=items), min(holders))

    @staticmethod
    def create(factory, s: EpollState) -> int:
        return check(libc.epoll_create1(os.O_CLOEXEC), "epoll_create1")


class _EpollEvent(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def register_epoll_items(regs: list[tuple[int, int, int, int]]) -> None:
    """In a restore helper, with its descriptors in place: epoll_ctl(ADD) each (epfd, tfd, events, data)."""
    for epfd, tfd, events, data in regs:
        ev = _EpollEvent(events & 0xFFFFFFFF, data)
        if libc.epoll_ctl(epfd, 1, tfd, ctypes.byref(ev)) != 0:      # EPOLL_CTL_ADD
            err = ctypes.get_errno()
            raise OSError(err, f"epoll_ctl(ADD fd {tfd} to epoll fd {epfd}): {os.strerror(err)}")
