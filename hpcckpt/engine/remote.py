"""Reading and writing another process's memory, and a scratch page inside it for injected calls."""
from __future__ import annotations

import ctypes

from .inject import Injector
from .linux import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, SYS, process_vm_readv, process_vm_writev


def read(pid: int, addr: int, n: int) -> bytes:
    buf = ctypes.create_string_buffer(n)
    got = process_vm_readv(pid, ctypes.addressof(buf), [(addr, n)], n)
    return buf.raw[:got]


def write(pid: int, addr: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    process_vm_writev(pid, ctypes.addressof(buf), len(data), addr)


class Scratch:
    """A private page mapped into a stopped process for the arguments and results of injected calls.
    It is unmapped again before memory is dumped, so it never appears in an image."""

    SIZE = 64 * 1024

    def __init__(self, inj: Injector):
        self.inj = inj
        self.pid = inj.tgid
        self.addr = inj.check("mmap(scratch)", SYS.mmap, 0, self.SIZE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)

    def read(self, off: int, n: int) -> bytes:
        return read(self.pid, self.addr + off, n)

    def write(self, off: int, data: bytes) -> None:
        write(self.pid, self.addr + off, data)

    def write_abs(self, addr: int, data: bytes) -> None:
        write(self.pid, addr, data)

    def release(self) -> None:
        if self.addr:
            self.inj.call(SYS.munmap, self.addr, self.SIZE)
            self.addr = 0
