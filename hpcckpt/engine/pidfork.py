"""fork() whose child gets a PID of our choosing: clone3 with set_tid, from Python.

ns_last_pid + fork() gives the chosen PID only if nothing else in the namespace takes one in between (a thread
of ours, a child of ours); clone3's set_tid asks for exactly that PID - EEXIST if it is taken, never another
one - and leaves the namespace's allocation cursor where it is. It needs CAP_CHECKPOINT_RESTORE in the user
namespace owning the PID namespace, which the agent has (it created them).

Python has no clone3, so the system call goes through ctypes, bracketed by the interpreter's own fork hooks
(PyOS_BeforeFork / PyOS_AfterFork_*, as os.fork does) with the GIL held throughout (a PyDLL call), so the child
never waits for a GIL another thread held. The C library's fork handlers do not run: only a single-threaded
caller may use this (no other thread can hold a libc or malloc lock that the child would inherit locked). As
glibc's own fork does, the child's thread descriptor gets its new TID (CLONE_CHILD_SETTID at the address the
caller registered with set_tid_address, which glibc points at that very field).
"""
from __future__ import annotations

import ctypes
import os
import signal

from .linux import PR_GET_TID_ADDRESS, SYS, libc

CLONE_PARENT = 0x00008000
CLONE_CHILD_CLEARTID = 0x00200000
CLONE_CHILD_SETTID = 0x01000000


class CloneArgs(ctypes.Structure):
    """struct clone_args (CLONE_ARGS_SIZE_VER2, 88 bytes)."""
    _fields_ = [(n, ctypes.c_uint64) for n in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
                                                "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]


_py = ctypes.PyDLL(None, use_errno=True)         # keeps the GIL across the call (a CDLL call would drop it)
_clone3 = _py.syscall
_clone3.restype = ctypes.c_long
_clone3.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t]
_api = ctypes.pythonapi
for _name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
    getattr(_api, _name).restype = None
    getattr(_api, _name).argtypes = []


def single_threaded() -> bool:
    return len(os.listdir("/proc/self/task")) == 1


def _tid_address() -> int:
    v = ctypes.c_ulong(0)
    if libc.prctl(PR_GET_TID_ADDRESS, ctypes.byref(v), 0, 0, 0) != 0:
        return 0
    return v.value


def fork_at(pid: int, sibling: bool = False) -> int:
    """fork() whose child is `pid` in our PID namespace; returns 0 in the child, the PID in the parent. sibling:
    the child is our parent's child, not ours (CLONE_PARENT). OSError (EEXIST: taken) if it cannot be had."""
    if not single_threaded():
        raise RuntimeError("fork_at() needs a single-threaded caller")
    want = (ctypes.c_int32 * 1)(pid)
    tid_addr = _tid_address()
    flags = (CLONE_PARENT if sibling else 0) | (CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID if tid_addr else 0)
    # with CLONE_PARENT the kernel wants exit_signal 0 and gives the child our own exit signal (SIGCHLD)
    args = CloneArgs(flags=flags, child_tid=tid_addr, exit_signal=0 if sibling else signal.SIGCHLD,
                     set_tid=ctypes.addressof(want), set_tid_size=1)
    _api.PyOS_BeforeFork()
    r = _clone3(SYS.clone3, ctypes.addressof(args), ctypes.sizeof(args))
    if r == 0:
        _api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _api.PyOS_AfterFork_Parent()
    if r < 0:
        raise OSError(err, f"clone3(set_tid={pid}): {os.strerror(err)}")
    return r
