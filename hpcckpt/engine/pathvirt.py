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


# DMTCP's pathvirt variables. At launch DMTCP_PATH_PREFIX (or DMTCP_ORIGINAL_PATH_PREFIX) lists the path prefixes
# the computation uses, colon-separated; every image records them ("path_prefix"). At restart DMTCP_PATH_PREFIX
# (or DMTCP_NEW_PATH_PREFIX) lists where they are now, in the same order: the i-th recorded prefix becomes the
# i-th new one. A restarted computation records the new ones, for the next migration.
_RECORD_ENV = ("DMTCP_NEW_PATH_PREFIX", "DMTCP_PATH_PREFIX", "DMTCP_ORIGINAL_PATH_PREFIX")
_NEW_ENV = ("DMTCP_NEW_PATH_PREFIX", "DMTCP_PATH_PREFIX")


class PrefixError(ValueError):
    """The recorded and the new prefix lists do not pair up; one line naming both."""


def _first(environ, names) -> str:
    for n in names:
        v = (environ.get(n) or "").strip()
        if v:
            return v
    return ""


def record(environ=None) -> dict:
    """What an image records of the computation's path prefixes ({} if none are declared)."""
    import os
    v = _first(os.environ if environ is None else environ, _RECORD_ENV)
    return {"path_prefix": v} if v else {}


def prefixes_for(meta: dict, explicit: list[str] | None = None, environ=None) -> list[str]:
    """The OLD:NEW pairs for one image at restart: those given (--path-prefix, DMTCP_PATH_MAPPING), then the image's
    recorded prefixes paired with DMTCP_PATH_PREFIX's new ones."""
    import os
    out = list(explicit or [])
    old_text = meta.get("path_prefix")
    new_text = _first(os.environ if environ is None else environ, _NEW_ENV)
    if not isinstance(old_text, str) or not old_text or not new_text:
        return out
    old = [p for p in old_text.split(":") if p]
    new = [p for p in new_text.split(":") if p]
    if len(old) != len(new):
        raise PrefixError(f"DMTCP_PATH_PREFIX has {len(new)} prefix(es) ({new_text}) but the checkpoint recorded "
                          f"{len(old)} ({old_text}): give one new prefix for each, in the same order")
    for o, n in zip(old, new):
        if not o.startswith("/") or not n.startswith("/"):
            raise PrefixError(f"DMTCP_PATH_PREFIX: {o if not o.startswith('/') else n!r} is not an absolute path")
        if o.rstrip("/") != n.rstrip("/"):
            out.append(f"{o}:{n}")
    return out
