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


def dump_dispositions(inj: Injector, scratch: Scratch) -> list[list[int]]:
    rows = []
    for sig in range(1, NSIG + 1):
        off = (sig - 1) * _SIGACTION.size
        r = inj.call(SYS.rt_sigaction, sig, 0, scratch.addr + off, 8)
        if r < 0:
            raise OSError(-r, f"rt_sigaction({sig}) in pid {inj.tgid}")
    raw = scratch.read(0, NSIG * _SIGACTION.size)
    for sig in range(NSIG):
        rows.append(list(_SIGACTION.unpack_from(raw, sig * _SIGACTION.size)))
    return rows


def restore_dispositions(inj: Injector, scratch: Scratch, rows: list[list[int]]) -> None:
    scratch.write(0, b"".join(_SIGACTION.pack(*row) for row in rows))
    for sig in range(1, NSIG + 1):
        if sig in (SIGKILL, SIGSTOP):
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
