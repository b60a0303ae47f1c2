"""Reading a process's address-space layout: /proc/PID/maps, smaps flags and pagemap."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .linux import PAGE

SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


@dataclass
class Mapping:
    start: int
    end: int
    perms: str          # e.g. "rw-p"
    offset: int
    dev: str
    inode: int
    path: str           # "" for anonymous; "[heap]", "[stack]", "/lib/...", "/x (deleted)"
    vmflags: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return self.size // PAGE

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def prot(self) -> int:
        return (1 if self.perms[0] == "r" else 0) | (2 if self.perms[1] == "w" else 0) | \
            (4 if self.perms[2] == "x" else 0)

    @property
    def special(self) -> bool:
        return self.path in SPECIAL

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


def read_maps(pid: int | str, with_flags: bool = True) -> list[Mapping]:
    """The process's mappings; with_flags adds smaps VmFlags (e.g. 'gd' for grows-down stacks)."""
    out: list[Mapping] = []
    src = f"/proc/{pid}/smaps" if with_flags else f"/proc/{pid}/maps"
    with open(src) as f:
        for line in f:
            m = _LINE.match(line)
            if m:
                out.append(Mapping(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5], int(m[6]),
                                   m[7].rstrip("\n")))
            elif line.startswith("VmFlags:") and out:
                out[-1].vmflags = line.split()[1:]
    return out


def read_maps_fast(pid: int | str, vmflags_hint: dict | None) -> list[Mapping]:
    """/proc/PID/maps (cheap) with VmFlags from a hint read earlier ({(start, end, perms, inode): flags});
    smaps (which walks the page tables: ~12 ms per GiB) only if a mapping is new since the hint."""
    maps = read_maps(pid, with_flags=False)
    if vmflags_hint is None:
        return read_maps(pid, with_flags=True)
    for m in maps:
        flags = vmflags_hint.get((m.start, m.end, m.perms, m.inode))
        if flags is None:
            return read_maps(pid, with_flags=True)
        m.vmflags = flags
    return maps


def vmflags_hint(pid: int | str) -> dict:
    return {(m.start, m.end, m.perms, m.inode): m.vmflags for m in read_maps(pid, with_flags=True)}


# pagemap high-byte bits: 63 present, 62 swapped, 61 file-page or shared-anon
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20


def _table(pred) -> bytes:
    return bytes(0x31 if pred(b) else 0x30 for b in range(256))   # b"1" / b"0"


_ANY_TABLE = _table(lambda b: b & (_PRESENT | _SWAPPED))
_ANON_TABLE = _table(lambda b: (b & _SWAPPED) or ((b & _PRESENT) and not (b & _FILE)))
_RUN = re.compile(rb"1+")


def populated_runs(pagemap_fd: int, start: int, npages: int, anon_only: bool) -> list[tuple[int, int]]:
    """Runs (first_page, npages) of pages that hold data, relative to start.

    anon_only: only pages that are private copies (written to) — for private file mappings, whose other pages
    are read back from the file at restore. Never-touched pages are skipped either way.
    """
    runs: list[tuple[int, int]] = []
    table = _ANON_TABLE if anon_only else _ANY_TABLE
    step = 1 << 18                     # 1 GiB of address space per 2 MiB pagemap read
    for base in range(0, npages, step):
        n = min(step, npages - base)
        raw = os.pread(pagemap_fd, n * 8, (start // PAGE + base) * 8)
        flags = raw[7::8].translate(table)   # the high byte of each 64-bit entry, mapped to b"0"/b"1"
        for m in _RUN.finditer(flags):
            s, e = m.span()
            if runs and runs[-1][0] + runs[-1][1] == base + s:
                runs[-1] = (runs[-1][0], runs[-1][1] + e - s)
            else:
                runs.append((base + s, e - s))
    return runs
