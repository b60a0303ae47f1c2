"""Signal state: the 64 dispositions of a process, and its pending signals.

Dispositions are read and written by injecting rt_sigaction into the process itself: the kernel shows
handler addresses to nobody else. glibc's sa_restorer must come back too, or returning from a handler jumps
to nowhere. A Python restore helper inherits SIG_IGN for SIGPIPE and SIGXFSZ, so every signal is set, not
just the non-default ones.
"""
from __future__ import annotations

import struct

from . import ptrace
from .inject import Injector
from .linux import SYS
from .remote import Scratch

NSIG = 64
_SIGACTION = struct.Struct("<QQQQ")   # struct kernel_sigaction: handler, flags, restorer, mask
SIGKILL, SIGSTOP = 9, 19


SIGCHLD = 17


def _set_dispositions(pid: int) -> int:
    """Mask of the signals a process ignores or catches (/proc status SigIgn | SigCgt); all 64 when unreadable."""
    mask = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("SigIgn", "SigCgt"):
                    mask |= int(val, 16)
    except (OSError, ValueError):
        return (1 << NSIG) - 1
    return mask


def dump_dispositions(inj: Injector, scratch: Scratch) -> list[list[int]]:
    """Only the signals the process ignores or catches are asked from inside it (an injected call each, ~50 µs:
    a process that never called sigaction cost 64 of them); a signal with SIG_DFL records all zeros, which
    restores the same behaviour (flags and mask mean nothing without a handler), except SIGCHLD whose
    SA_NOCLDWAIT/SA_NOCLDSTOP count even with SIG_DFL: it is always asked."""
    wanted = _set_dispositions(inj.tgid) | 1 << (SIGCHLD - 1)
    for sig in range(1, NSIG + 1):
        if wanted & 1 << (sig - 1):
            r = inj.call(SYS.rt_sigaction, sig, 0, scratch.addr + (sig - 1) * _SIGACTION.size, 8)
            if r < 0:
                raise OSError(-r, f"rt_sigaction({sig}) in pid {inj.tgid}")
    raw = scratch.read(0, NSIG * _SIGACTION.size)
    return [list(_SIGACTION.unpack_from(raw, i * _SIGACTION.size)) if wanted & 1 << i else [0, 0, 0, 0]
            for i in range(NSIG)]


def restore_dispositions(inj: Injector, scratch: Scratch, rows: list[list[int]]) -> None:
    scratch.write(0, b"".join(_SIGACTION.pack(*row) for row in rows))
    # a signal the helper leaves at SIG_DFL (flags and mask cleared by its exec) that must stay SIG_DFL needs
    # no call: most of them in most programs (an injected call each)
    set_now = _set_dispositions(inj.tgid) | 1 << (SIGCHLD - 1)
    for sig in range(1, NSIG + 1):
        if sig in (SIGKILL, SIGSTOP) or (not set_now & 1 << (sig - 1) and not any(rows[sig - 1])):
            continue
        inj.check(f"rt_sigaction({sig})", SYS.rt_sigaction, sig, scratch.addr + (sig - 1) * _SIGACTION.size,
                  0, 8)


def dump_pending(tid: int, shared: bool) -> list[bytes]:
    """Pending signals, without consuming them (PTRACE_PEEKSIGINFO). SIGKILL/SIGSTOP are not carried over."""
    out = []
    for info in ptrace.peek_siginfo(tid, shared):
        sig = int.from_bytes(info[0:4], "little")
        if sig not in (SIGKILL, SIGSTOP):
            out.append(info)
    return out


def requeue_pending(inj: Injector, scratch: Scratch, infos: list[bytes], process_wide: bool) -> None:
    """Make signals pending again in a restored process with their original siginfo. Sending to oneself is
    allowed any si_code, so the call is made from inside the process."""
    for info in infos:
        sig = int.from_bytes(info[0:4], "little")
        scratch.write(0, info)
        if process_wide:
            inj.check(f"rt_sigqueueinfo({sig})", 129, inj.tgid, sig, scratch.addr)   # rt_sigqueueinfo
        else:
            inj.check(f"rt_tgsigqueueinfo({sig})", SYS.rt_tgsigqueueinfo, inj.tgid, inj.tid, sig, scratch.addr)
