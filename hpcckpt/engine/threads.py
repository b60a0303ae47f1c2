"""Per-thread state: registers, extended FPU state, signal mask, rseq, robust list, clear_child_tid,
alternate signal stack and name. Dump reads it from a frozen thread; restore puts it into a new one."""
from __future__ import annotations

import struct

from ..image.records import ThreadRecord, b64, unb64
from . import ptrace, signals
from .errors import XstateMismatch
from .inject import Injector, normalize_restart, original_syscall
from .linux import PR_GET_TID_ADDRESS, PR_SET_NAME, SYS, get_robust_list
from .ptrace import Regs
from .remote import Scratch

_STACK_T = struct.Struct("<QiiQ")   # stack_t: ss_sp, ss_flags, (pad), ss_size
SS_ONSTACK, SS_DISABLE = 1, 2


def dump_thread(inj: Injector, regs: Regs, scratch: Scratch, pid: int) -> ThreadRecord:
    tid = inj.tid
    rseq = ptrace.get_rseq(tid)
    head, hlen = get_robust_list(tid)
    inj.check("prctl(PR_GET_TID_ADDRESS)", SYS.prctl, PR_GET_TID_ADDRESS, scratch.addr)
    inj.check("sigaltstack", SYS.sigaltstack, 0, scratch.addr + 64)
    raw = scratch.read(0, 64 + _STACK_T.size)
    tid_addr = int.from_bytes(raw[0:8], "little")
    ss_sp, ss_flags, _, ss_size = _STACK_T.unpack_from(raw, 64)
    in_syscall = original_syscall(pid, tid, regs)
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            comm = f.read().rstrip("\n")
    except OSError:
        comm = ""
    return ThreadRecord(
        tid=tid, regs=regs.to_dict(), xstate=b64(ptrace.get_xstate(tid)), sigmask=inj.orig_mask,
        rseq=[rseq.rseq_abi_pointer, rseq.rseq_abi_size, rseq.signature] if rseq.rseq_abi_pointer else None,
        robust_list=[head, hlen], clear_child_tid=tid_addr, sigaltstack=[ss_sp, ss_flags & ~SS_ONSTACK, ss_size],
        in_syscall=in_syscall, pending=[b64(i) for i in signals.dump_pending(tid, shared=False)], comm=comm)


def check_xstate(image_xstate: bytes, here_xstate: bytes) -> None:
    """Refuse an image whose FPU/vector state uses features this CPU/kernel does not enable."""
    need = ptrace.xstate_bv(image_xstate) | ptrace.xstate_features(image_xstate)
    have = ptrace.xstate_features(here_xstate)
    missing = ptrace.xstate_bv(image_xstate) & ~have
    if missing:
        raise XstateMismatch(f"the image uses CPU state components {missing:#x} this CPU does not provide "
                             f"(image XCR0 {need:#x}, here {have:#x}); restart on a CPU like the original")
    if len(image_xstate) > len(here_xstate):
        raise XstateMismatch(f"the image's xstate is {len(image_xstate)} bytes, this CPU's only "
                             f"{len(here_xstate)}; restart on a CPU like the original")


def restore_thread_state(inj: Injector, rec: ThreadRecord, scratch: Scratch) -> None:
    """Kernel-side per-thread state, by injection into the thread itself (before its registers are set)."""
    head, hlen = rec.robust_list
    if head:
        inj.check("set_robust_list", SYS.set_robust_list, head, hlen)
    inj.check("set_tid_address", SYS.set_tid_address, rec.clear_child_tid)
    sp, flags, size = rec.sigaltstack
    if not flags & SS_DISABLE:
        scratch.write(0, _STACK_T.pack(sp, flags & ~SS_ONSTACK, 0, size))
        inj.check("sigaltstack", SYS.sigaltstack, scratch.addr, 0)
    if rec.comm:
        scratch.write(0, rec.comm.encode()[:15] + b"\0")
        inj.check("prctl(PR_SET_NAME)", SYS.prctl, PR_SET_NAME, scratch.addr)
    if rec.rseq:
        ptr, size, sig = rec.rseq
        inj.check("rseq(register)", SYS.rseq, ptr, size, 0, sig)
    if rec.pending:
        signals.requeue_pending(inj, scratch, [unb64(p) for p in rec.pending], process_wide=False)


_CAP_VERSION_3 = 0x20080522


def restore_credentials(inj: Injector, creds: dict, scratch: Scratch) -> None:
    """Give the thread the capabilities the original had (a restore helper may hold more: it is a copy of the
    agent, which in a user namespace has every capability there). Capabilities can only be dropped here."""
    if not creds or "cap_eff" not in creds:
        return
    eff, prm, inh = creds["cap_eff"], creds["cap_prm"], creds["cap_inh"]
    data = struct.pack("<II", _CAP_VERSION_3, 0) + struct.pack(
        "<6I", eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, inh & 0xFFFFFFFF, eff >> 32, prm >> 32, inh >> 32)
    scratch.write(0, data)
    r = inj.call(126, scratch.addr, scratch.addr + 8)     # capset(header, data)
    if r < 0:
        import logging
        logging.getLogger(__name__).warning("tid %d: capabilities not restored (%s)", inj.tid, r)


def set_final_registers(inj: Injector, rec: ThreadRecord) -> None:
    """Registers, xstate and mask last: from here the thread is the image's thread, ready to run."""
    ptrace.set_xstate(inj.tid, unb64(rec.xstate))
    ptrace.setsigmask(inj.tid, rec.sigmask)
    ptrace.setregs(inj.tid, normalize_restart(Regs.from_dict(rec.regs), new_process=True, syscall_nr=rec.in_syscall))
