"""ptrace(2) through ctypes: requests, register sets and wait-status decoding (x86_64).

Every call must come from the thread that attached (ptrace is per tracer thread); the agent does all
tracing from its main thread.
"""
from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass
from typing import Literal, overload

from .linux import SYS, PosixError, iovec, syscall

TRACEME = 0
PEEKDATA = 2
POKEDATA = 5
CONT = 7
KILL = 8
GETREGS = 12
SETREGS = 13
DETACH = 17
SYSCALL = 24
SETOPTIONS = 0x4200
GETEVENTMSG = 0x4201
GETSIGINFO = 0x4202
GETREGSET = 0x4204
SETREGSET = 0x4205
SEIZE = 0x4206
INTERRUPT = 0x4207
LISTEN = 0x4208
PEEKSIGINFO = 0x4209
GETSIGMASK = 0x420A
SETSIGMASK = 0x420B
GET_RSEQ_CONFIGURATION = 0x420F

O_TRACESYSGOOD = 0x1
O_TRACEFORK = 0x2
O_TRACEVFORK = 0x4
O_TRACECLONE = 0x8
O_TRACEEXEC = 0x10
O_TRACEEXIT = 0x40
O_EXITKILL = 0x100000

EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_EXEC = 4
EVENT_EXIT = 6
EVENT_STOP = 128

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202

__WALL = 0x40000000

REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi",
             "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs",
             "gs")


class Regs(ctypes.Structure):
    """struct user_regs_struct."""
    _fields_ = [(n, ctypes.c_ulonglong) for n in REG_NAMES]

    def to_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in REG_NAMES}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Regs:
        r = cls()
        for n in REG_NAMES:
            setattr(r, n, d[n] & 0xFFFFFFFFFFFFFFFF)
        return r

    def copy(self) -> Regs:
        r = Regs()
        ctypes.memmove(ctypes.byref(r), ctypes.byref(self), ctypes.sizeof(Regs))
        return r


def signed(v: int) -> int:
    return v - (1 << 64) if v & (1 << 63) else v


class RseqConfig(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PtraceError(PosixError):
    pass


def _ptrace(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    r = syscall(SYS.ptrace, req, pid, addr, data)
    if r == -1:
        err = ctypes.get_errno()
        raise PtraceError(err, f"ptrace({req:#x}, tid {pid}): {os.strerror(err)}")
    return r


def seize(tid: int, options: int) -> None:
    _ptrace(SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _ptrace(INTERRUPT, tid)


def setoptions(tid: int, options: int) -> None:
    _ptrace(SETOPTIONS, tid, 0, options)


def cont(tid: int, sig: int = 0) -> None:
    _ptrace(CONT, tid, 0, sig)


def trace_syscall(tid: int, sig: int = 0) -> None:
    _ptrace(SYSCALL, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    _ptrace(DETACH, tid, 0, sig)


def listen(tid: int) -> None:
    _ptrace(LISTEN, tid)


def geteventmsg(tid: int) -> int:
    v = ctypes.c_ulong(0)
    _ptrace(GETEVENTMSG, tid, 0, ctypes.addressof(v))
    return v.value


def getregs(tid: int) -> Regs:
    r = Regs()
    _ptrace(GETREGS, tid, 0, ctypes.addressof(r))
    return r


def setregs(tid: int, r: Regs) -> None:
    _ptrace(SETREGS, tid, 0, ctypes.addressof(r))


XSTATE_MAX = 64 * 1024


def get_xstate(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(XSTATE_MAX)
    iov = iovec(ctypes.addressof(buf), XSTATE_MAX)
    _ptrace(GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    return buf.raw[: iov.iov_len]


def set_xstate(tid: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = iovec(ctypes.addressof(buf), len(data))
    _ptrace(SETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))


def xstate_features(xstate: bytes) -> int:
    """XCR0 the kernel reports in the software-reserved bytes of the FXSAVE area (offset 464)."""
    return int.from_bytes(xstate[464:472], "little")


def xstate_bv(xstate: bytes) -> int:
    """XSTATE_BV of the XSAVE header: which components hold non-initial state."""
    return int.from_bytes(xstate[512:520], "little")


def getsigmask(tid: int) -> int:
    v = ctypes.c_uint64(0)
    _ptrace(GETSIGMASK, tid, 8, ctypes.addressof(v))
    return v.value


def setsigmask(tid: int, mask: int) -> None:
    v = ctypes.c_uint64(mask & 0xFFFFFFFFFFFFFFFF)
    _ptrace(SETSIGMASK, tid, 8, ctypes.addressof(v))


def get_rseq(tid: int) -> RseqConfig:
    c = RseqConfig()
    _ptrace(GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(c), ctypes.addressof(c))
    return c


class PeekSiginfoArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128


def peek_siginfo(tid: int, shared: bool) -> list[bytes]:
    """Pending signals (raw 128-byte siginfo records) of a thread or of its whole process, not consumed."""
    out: list[bytes] = []
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * 32)
    while True:
        args = PeekSiginfoArgs(len(out), PEEKSIGINFO_SHARED if shared else 0, 32)
        n = _ptrace(PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
        if n <= 0:
            return out
        out.extend(buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))


def getsiginfo(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    _ptrace(GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


@dataclass(frozen=True)
class WaitStatus:
    """A decoded waitpid status."""
    pid: int
    status: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status)

    @property
    def signaled(self) -> bool:
        return os.WIFSIGNALED(self.status)

    @property
    def gone(self) -> bool:
        return self.exited or self.signaled

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.status)

    @property
    def stopsig(self) -> int:
        return os.WSTOPSIG(self.status) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF if self.stopped else 0

    @property
    def is_syscall_stop(self) -> bool:
        return self.stopped and self.stopsig == (signal.SIGTRAP | 0x80)

    @property
    def exit_code(self) -> int:
        """Shell convention: the exit status, or 128 + signal number."""
        if self.exited:
            return os.WEXITSTATUS(self.status)
        if self.signaled:
            return 128 + os.WTERMSIG(self.status)
        return -1

    def describe(self) -> str:
        if self.exited:
            return f"exited with status {os.WEXITSTATUS(self.status)}"
        if self.signaled:
            return f"killed by signal {signal.Signals(os.WTERMSIG(self.status)).name}"
        if self.stopped:
            ev = f" event {self.event}" if self.event else ""
            return f"stopped by signal {self.stopsig}{ev}"
        return f"status {self.status:#x}"


@overload
def wait(pid: int, nohang: Literal[False] = False) -> WaitStatus: ...
@overload
def wait(pid: int, nohang: Literal[True]) -> WaitStatus | None: ...
def wait(pid: int, nohang: bool = False) -> WaitStatus | None:
    """waitpid(pid, __WALL); EINTR is retried. Returns None for WNOHANG with nothing to report."""
    while True:
        try:
            wpid, status = os.waitpid(pid, __WALL | (os.WNOHANG if nohang else 0))
        except InterruptedError:
            continue
        if wpid == 0:
            return None
        return WaitStatus(wpid, status)


