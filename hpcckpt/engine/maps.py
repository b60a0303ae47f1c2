"""Reading a process's address-space layout: /proc/PID/maps, smaps flags and pagemap."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
from dataclasses import dataclass, field

from .linux import PAGE

log = logging.getLogger(__name__)

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


# Above this, or with MAP_NORESERVE ("nr": reserved, mostly never touched), a private region is a sparse
# reservation: per-page state (incremental hashes: 8 bytes a page; write-protect markers: page tables for the
# whole range) would cost gigabytes for a 2 TiB reservation holding a few pages, so only its pages are kept.
SPARSE_MIN = 64 << 30


def sparse_reservation(m: Mapping, runs: list[tuple[int, int]] | None = None) -> bool:
    """runs (its populated pages, when known): also a region of 1 GiB or more with under 1/64 of it populated
    (a PROT_NONE reservation, an arena barely used)."""
    if "nr" in m.vmflags or m.size > SPARSE_MIN:
        return True
    return runs is not None and m.size >= 1 << 30 and sum(n for _, n in runs) * 64 < m.npages


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
    The PAGEMAP_SCAN ioctl (Linux 6.7+) visits only the page tables that exist, so a 2 TiB MAP_NORESERVE
    reservation with a few pages costs what those pages cost; reading pagemap entries would read 4 GiB of them.
    """
    if _scan_ok:
        try:
            if anon_only:      # swapped, or present and not a page-cache page (same rule as _ANON_TABLE)
                return scan_runs(pagemap_fd, start, start + npages * PAGE, category_mask=PAGE_IS_FILE,
                                 inverted=PAGE_IS_FILE, anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
            return scan_runs(pagemap_fd, start, start + npages * PAGE, anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
        except OSError as e:
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _scan_unavailable(e)
    return _pagemap_runs(pagemap_fd, start, npages, anon_only)


def _pagemap_runs(pagemap_fd: int, start: int, npages: int, anon_only: bool) -> list[tuple[int, int]]:
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


# PAGEMAP_SCAN (include/uapi/linux/fs.h): page categories and the ioctl's argument
PAGEMAP_SCAN = 0xC0606610         # _IOWR('f', 16, struct pm_scan_arg)   (Debian 12's headers predate it)
PAGE_IS_WRITTEN, PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED = 1 << 1, 1 << 2, 1 << 3, 1 << 4
_scan_ok = True


def _scan_unavailable(e: OSError) -> None:
    global _scan_ok
    _scan_ok = False
    log.info("PAGEMAP_SCAN unavailable (%s): reading pagemap entries instead", e)


class _ScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("size", "flags", "start", "end", "walk_end", "vec", "vec_len",
                                               "max_pages", "category_inverted", "category_mask",
                                               "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_VEC = 4096


def scan_runs(pagemap_fd: int, start: int, end: int, flags: int = 0, category_mask: int = 0, inverted: int = 0,
              anyof: int = 0) -> list[tuple[int, int]]:
    """Runs (first page, pages) of [start, end) whose pages match the categories (PAGEMAP_SCAN: every bit of
    category_mask set after XOR with inverted, and one of anyof), relative to start."""
    vec = (_Region * _VEC)()
    arg = _ScanArg(size=ctypes.sizeof(_ScanArg), flags=flags, start=start, end=end, vec=ctypes.addressof(vec),
                   vec_len=_VEC, category_inverted=inverted, category_mask=category_mask,
                   category_anyof_mask=anyof, return_mask=category_mask | anyof)
    runs: list[tuple[int, int]] = []
    while True:
        n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg)       # returns the number of vec entries filled
        for r in vec[:n]:
            first, last = (r.start - start) // PAGE, (r.end - start) // PAGE
            if runs:
                # a walk resumed at walk_end reports again what it had reported past walk_end (seen here: a
                # full vector ends inside a page table whose entries were reported up to its end)
                prev_end = runs[-1][0] + runs[-1][1]
                first = max(first, prev_end)
                if first >= last:
                    continue
                if first == prev_end:
                    runs[-1] = (runs[-1][0], last - runs[-1][0])
                    continue
            runs.append((first, last - first))
        if arg.walk_end >= end or arg.walk_end <= arg.start:
            return runs
        arg.start = arg.walk_end                              # the vector was full: go on from there
