"""Changing the environment of a restored, still stopped process (DMTCP's --modify-env / dmtcp_env.txt): the C
library's `environ` is pointed at a new array of strings in a page mapped into the process for it, so getenv()
and the environment passed to exec'd children have the new values.

`environ` (glibc exports it as `__environ`, `environ`, `_environ`) is found in the dynamic symbol table of the
C library mapped in the process (its ELF file), or in the program's own symbol table for a static executable.
The process's /proc/PID/environ (the block the kernel put on the stack at exec) is left as it was, as it is
after a setenv(); so are copies a language runtime made at start (Python's os.environ is read once at start).
"""
from __future__ import annotations

import logging
import os
import re
import struct

from . import remote
from .inject import Injector, find_syscall_insn
from .linux import SYS

log = logging.getLogger(__name__)

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
NAMES = (b"__environ", b"environ", b"_environ")


class EnvError(RuntimeError):
    pass


def _symbol(path: str, names=NAMES) -> int | None:
    """st_value of the first of `names` in the ELF file's .dynsym (or .symtab), None if absent."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for want in (11, 2):                          # SHT_DYNSYM, then SHT_SYMTAB
        for sec in sections:
            if sec[1] != want:
                continue
            strtab = sections[sec[6]]
            str_off = strtab[4]
            off, size, entsize = sec[4], sec[5], sec[9] or 24
            for i in range(size // entsize):
                st_name, st_info, _, st_shndx, st_value, _ = struct.unpack_from("<IBBHQQ", data, off + i * entsize)
                if not st_value or not st_shndx:
                    continue
                end = data.index(b"\0", str_off + st_name)
                if data[str_off + st_name:end] in names:
                    return st_value
    return None


def _maps(pid: int) -> list[tuple[int, int, int, str, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, int(parts[2], 16), parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def environ_address(pid: int) -> int:
    """Where the process's `environ` variable is."""
    maps = _maps(pid)
    candidates = [p for p in dict.fromkeys(m[4] for m in maps) if "/libc.so" in p or "/libc-" in p]
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    for path in candidates + [exe]:
        if not path or not os.path.exists(path):
            continue
        value = _symbol(path)
        if value is None:
            continue
        base = min(m[0] - m[2] for m in maps if m[4] == path)   # the load bias (the mapping at file offset 0)
        with open(path, "rb") as f:
            f.seek(0x10)
            e_type, = struct.unpack("<H", f.read(2))
        return value if e_type == 2 else base + value          # ET_EXEC: absolute addresses
    raise EnvError(f"pid {pid}: no C library `environ` found (not a glibc program?)")


def read_environ(pid: int, addr: int) -> list[bytes]:
    """The strings of the process's current environment (through its `environ` at addr)."""
    ptr, = struct.unpack("<Q", remote.read(pid, addr, 8))
    out: list[bytes] = []
    while ptr:
        block = remote.read(pid, ptr, 8 * 64)
        for i in range(64):
            p, = struct.unpack_from("<Q", block, 8 * i)
            if not p:
                return out
            s = b""
            while b"\0" not in s:
                s += remote.read(pid, p + len(s), 256)
            out.append(s[:s.index(b"\0")])
        ptr += 8 * 64
    return out


def apply(current: list[bytes], changes: dict[str, str | None]) -> list[bytes]:
    """current with the changes (None: unset), in their original order, new names at the end."""
    out, done = [], set()
    for item in current:
        name = item.split(b"=", 1)[0].decode("utf-8", "surrogateescape")
        if name in changes:
            done.add(name)
            if changes[name] is not None:
                out.append(f"{name}={changes[name]}".encode("utf-8", "surrogateescape"))
        else:
            out.append(item)
    for name, value in changes.items():
        if name not in done and value is not None:
            out.append(f"{name}={value}".encode("utf-8", "surrogateescape"))
    return out


def set_environment(pid: int, changes: dict[str, str | None]) -> list[bytes]:
    """Apply changes to the stopped (restored, not yet released) process pid; returns its new environment."""
    addr = environ_address(pid)
    new = apply(read_environ(pid, addr), changes)
    strings = b"".join(s + b"\0" for s in new)
    table_len = 8 * (len(new) + 1)
    size = (table_len + len(strings) + 4095) & ~4095
    vdso = next((m for m in _maps(pid) if m[4] == "[vdso]"), None)
    if vdso is None:
        raise EnvError(f"pid {pid}: no [vdso] to run a system call from")
    inj = Injector(pid, pid, find_syscall_insn(pid, vdso[0], vdso[1]))
    try:
        page = inj.check("mmap for the new environment", SYS.mmap, 0, size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1 & 0xFFFFFFFFFFFFFFFF, 0)
    finally:
        inj.finish()
    ptrs, off = [], page + table_len
    for s in new:
        ptrs.append(off)
        off += len(s) + 1
    remote.write(pid, page, struct.pack(f"<{len(ptrs) + 1}Q", *ptrs, 0) + strings)
    remote.write(pid, addr, struct.pack("<Q", page))
    log.info("pid %d: environment changed (%s)", pid, ", ".join(f"{k}={v}" if v is not None else f"-{k}"
                                                              for k, v in changes.items()))
    return new


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_FILE = "dmtcp_env.txt"


class EnvFileError(EnvError, ValueError):
    """A line of dmtcp_env.txt that is not NAME=VALUE or NAME; the message names the file and the line."""


def parse_env_file(text: str, environ: dict[str, str] | None = None,
                   where: str = ENV_FILE) -> dict[str, str | None]:
    """The one reader of DMTCP's dmtcp_env.txt (--modify-env, the ModifyEnv plugin): NAME -> new value, or None
    to unset NAME, in the file's order.

        NAME=VALUE        $NAME and ${NAME} in VALUE come from the restarting environment (empty if unset)
        NAME="a b c"      double quotes keep spaces (and '#') in a value
        NAME              unset NAME
        # comment         also after an entry: HOME=/new  # why
    """
    env = os.environ if environ is None else environ
    out: dict[str, str | None] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        name, eq, value = _split_line(raw, where, n)
        if not name:
            continue
        if not _NAME.fullmatch(name):
            raise EnvFileError(f"{where} line {n}: {name!r} is not a variable name")
        out[name] = _VAR.sub(lambda m: env.get(m[1] or m[2], ""), value) if eq else None
    return out


def _split_line(raw: str, where: str, n: int) -> tuple[str, bool, str]:
    """(name, has '=', value) of one line, comments and quotes taken off."""
    name, eq, rest = raw.strip().partition("=")
    if "#" in name:
        name, eq, rest = name.split("#", 1)[0], "", ""
    name = name.strip()
    value: list[str] = []
    quoted = False
    for i, ch in enumerate(rest):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "#":
            break
        elif not quoted and ch.isspace():
            tail = rest[i:].strip()
            if value and tail and not tail.startswith("#"):
                raise EnvFileError(f"{where} line {n}: spaces in the value of {name} (quote it: "
                                   f'{name}="...")')
            if value:
                break
        else:
            value.append(ch)
    if quoted:
        raise EnvFileError(f"{where} line {n}: unterminated quote in the value of {name}")
    return name, bool(eq), "".join(value)
