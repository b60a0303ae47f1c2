"""Signals as a pollable fd (signalfd), with the sender: the agent forwards a signal someone sent it with
kill(2) to the job, but not one the terminal sent to the whole foreground process group (the job got that
one itself already)."""
from __future__ import annotations

import ctypes
import os
import signal
import struct

from ..engine.linux import check, libc

SFD_NONBLOCK = 0o4000
SFD_CLOEXEC = 0o2000000
_INFO = struct.Struct("<IiiIIIiiIIQ")   # first fields of struct signalfd_siginfo (128 bytes)
SI_USER, SI_QUEUE, SI_TKILL = 0, -1, -6


class SignalFd:
    def __init__(self, signals: list[int]):
        self.signals = sorted(set(signals))
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        mask = ctypes.c_uint64(0)
        for s in self.signals:
            mask.value |= 1 << (s - 1)
        self.fd = check(libc.signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC), "signalfd")

    def read(self) -> list[tuple[int, int, int]]:
        """Pending signals as (signo, code, sender pid)."""
        out: list[tuple[int, int, int]] = []
        while True:
            try:
                raw = os.read(self.fd, 128)
            except BlockingIOError:
                return out
            if len(raw) < 128:
                return out
            signo, _errno, code, pid = _INFO.unpack_from(raw)[:4]
            out.append((signo, code, pid))

    @staticmethod
    def sent_by_process(code: int) -> bool:
        return code in (SI_USER, SI_QUEUE, SI_TKILL)

    def close(self) -> None:
        os.close(self.fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
