"""Plain ctypes access to the Linux system calls the engine needs (x86_64 only).

python-ptrace was considered and rejected: it lacks PTRACE_SEIZE/PTRACE_INTERRUPT, NT_X86_XSTATE regsets and
rseq configuration, which a transparent checkpointer cannot do without (docs/design.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

if platform.machine() != "x86_64":  # register layouts and syscall numbers below are x86_64's
    raise ImportError("hpcckpt's engine supports x86_64 Linux only")

PAGE = os.sysconf("SC_PAGE_SIZE")
TASK_SIZE = 0x7FFFFFFFF000

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long


class SYS:
    """x86_64 system call numbers."""
    read = 0
    write = 1
    open = 2
    close = 3
    lseek = 8
    mmap = 9
    mprotect = 10
    munmap = 11
    brk = 12
    rt_sigaction = 13
    rt_sigprocmask = 14
    mremap = 25
    madvise = 28
    dup2 = 33
    getitimer = 36
    setitimer = 38
    getpid = 39
    clone = 56
    fork = 57
    exit = 60
    kill = 62
    fcntl = 72
    umask = 95
    ptrace = 101
    sigaltstack = 131
    personality = 135
    prctl = 157
    arch_prctl = 158
    gettid = 186
    futex = 202
    set_tid_address = 218
    restart_syscall = 219
    timer_create = 222
    timer_settime = 223
    timer_gettime = 224
    clock_nanosleep = 230
    exit_group = 231
    tgkill = 234
    set_robust_list = 273
    get_robust_list = 274
    rt_tgsigqueueinfo = 297
    prlimit64 = 302
    process_vm_readv = 310
    process_vm_writev = 311
    kcmp = 312
    rseq = 334
    pidfd_open = 434
    clone3 = 435
    close_range = 436
    pidfd_getfd = 438


# Kernel-internal "restart me" codes a thread frozen inside a system call carries in rax.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
RESTART_CODES = (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK)

# mmap / mremap
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE = 0x01, 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTFORK, MADV_WIPEONFORK = 10, 18

# prctl
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_SET_MM = 35
PR_SET_CHILD_SUBREAPER = 36
PR_GET_TID_ADDRESS = 40
PR_SET_MM_MAP = 14
PR_SET_VMA = 0x53564D41
PR_SET_VMA_ANON_NAME = 0

RSEQ_FLAG_UNREGISTER = 1


class PosixError(OSError):
    """An OSError from a raw system call, carrying the call's name."""


def check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise PosixError(err, f"{what}: {os.strerror(err)}")
    return ret


def syscall(nr: int, *args: int) -> int:
    cargs = [ctypes.c_ulong(a & 0xFFFFFFFFFFFFFFFF) for a in args]
    return libc.syscall(ctypes.c_long(nr), *cargs)


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _iov_array(parts):
    arr = (iovec * len(parts))()
    for i, (addr, length) in enumerate(parts):
        arr[i].iov_base = addr
        arr[i].iov_len = length
    return arr


def buffer_address(buf) -> int:
    """Address of a buffer without copying: bytes, or any writable buffer (bytearray, memoryview, an mmap
    opened with ACCESS_WRITE or ACCESS_COPY). The caller keeps the buffer alive while the address is used."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0     # (None only for b"")
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def process_vm_readv(pid: int, local_addr: int, remote: list[tuple[int, int]], total: int) -> int:
    """Read the remote ranges into local memory at local_addr (contiguous). Returns bytes read."""
    local = _iov_array([(local_addr, total)])
    rem = _iov_array(remote)
    n = syscall(SYS.process_vm_readv, pid, ctypes.addressof(local), 1, ctypes.addressof(rem), len(remote), 0)
    return check(n, f"process_vm_readv(pid {pid})")


def process_vm_writev(pid: int, local_addr: int, length: int, remote_addr: int) -> int:
    local = _iov_array([(local_addr, length)])
    rem = _iov_array([(remote_addr, length)])
    n = syscall(SYS.process_vm_writev, pid, ctypes.addressof(local), 1, ctypes.addressof(rem), 1, 0)
    return check(n, f"process_vm_writev(pid {pid}, {remote_addr:#x}+{length:#x})")


def process_vm_writev_scattered(pid: int, pieces: list[tuple[int, int, int]]) -> int:
    """Write (local address, remote address, length) pieces in one system call (at most IOV_MAX = 1024 of
    them). Returns the bytes written: the pieces in order, up to the first one that failed."""
    local = _iov_array([(a, n) for a, _, n in pieces])
    rem = _iov_array([(r, n) for _, r, n in pieces])
    n = syscall(SYS.process_vm_writev, pid, ctypes.addressof(local), len(pieces), ctypes.addressof(rem),
                len(pieces), 0)
    return check(n, f"process_vm_writev(pid {pid}, {len(pieces)} pieces)")


def tgkill(tgid: int, tid: int, sig: int) -> None:
    check(syscall(SYS.tgkill, tgid, tid, sig), f"tgkill({tgid}, {tid}, {sig})")


def get_robust_list(tid: int) -> tuple[int, int]:
    head = ctypes.c_void_p(0)
    size = ctypes.c_size_t(0)
    check(syscall(SYS.get_robust_list, tid, ctypes.addressof(head), ctypes.addressof(size)),
          f"get_robust_list({tid})")
    return head.value or 0, size.value


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    return check(syscall(SYS.pidfd_getfd, pidfd, targetfd, 0), f"pidfd_getfd(fd {targetfd})")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return check(syscall(SYS.prctl, option, a2, a3, a4, a5), f"prctl({option})")


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, off: int = 0) -> int:
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    r = libc.mmap(addr, length, prot, flags, fd, off)
    if r is None or r == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise PosixError(err, f"mmap({addr:#x}, {length:#x}): {os.strerror(err)}")
    return r


def set_next_pid(pid: int) -> None:
    """The next process or thread this PID namespace creates gets `pid` (nothing else may fork meanwhile)."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
