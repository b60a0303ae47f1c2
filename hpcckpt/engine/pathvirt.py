"""--pathvirt with path prefixes (DMTCP_PATH_MAPPING="OLD:NEW;..." or --path-prefix OLD:NEW): a computation
restarted where its files moved (another cluster's file system, a staged copy) finds them at their new paths.

A pure transformation of an image's metadata before restore: the paths of open files and directories, of
file-backed mappings, the working directory and the executable are rewritten, OLD prefix to NEW, longest OLD
first, and only at path-component boundaries (/data does not match /database)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _pairs(prefixes: list[str]) -> list[tuple[str, str]]:
    out = []
    for p in prefixes:
        old, _, new = p.partition(":")
        if old and new:
            out.append((old.rstrip("/") or "/", new.rstrip("/") or "/"))
    return sorted(out, key=lambda t: len(t[0]), reverse=True)


def remap(path: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if path == old:
            return new
        if path.startswith(old + "/") or old == "/":
            rest = path[len(old):].lstrip("/")
            return f"{new.rstrip('/')}/{rest}"
    return path


def remap_meta(meta: dict, prefixes: list[str]) -> int:
    """Rewrite the paths of one image's metadata (as read, a dict) in place; returns how many changed."""
    pairs = _pairs(prefixes)
    if not pairs:
        return 0
    proc = meta.get("process") or {}
    changed = 0

    def fix(d: dict, key: str) -> None:
        nonlocal changed
        v = d.get(key)
        if isinstance(v, str) and v.startswith("/"):
            nv = remap(v, pairs)
            if nv != v:
                log.info("path %s -> %s", v, nv)
                d[key] = nv
                changed += 1

    fix(proc, "cwd")
    fix(proc, "exe")
    for rec in proc.get("fds") or []:
        if rec.get("kind") in ("file", "dir"):
            fix(rec, "path")
    for obj in proc.get("objects") or []:
        if obj.get("kind") in ("file", "dir") and not obj.get("shm"):
            fix(obj, "path")
    for reg in proc.get("regions") or []:
        if reg.get("backing") == "file":
            fix(reg, "path")
    return changed
