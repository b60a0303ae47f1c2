"""Reading a generation manifest defensively: any bytes give a Manifest or one ManifestError line, never another
exception (a manifest is a file in a shared directory: hand-edited, truncated, or not a manifest at all)."""
from __future__ import annotations

import dataclasses
import json


class ManifestError(ValueError):
    """A manifest that is not authentic or not well formed; the message is one line naming it."""


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise ManifestError(f"not a checkpoint manifest: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def parse_manifest(manifest_cls, entry_cls, data: bytes):
    """A Manifest from JSON bytes, every field checked for its type; keys this version does not know are
    ignored (a newer writer may add some)."""
    try:
        d = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"not valid UTF-8 JSON ({str(e)[:80]})") from None
    _want(isinstance(d, dict), "not a JSON object")
    _want(isinstance(d.get("computation"), str) and d["computation"] != "", "no computation id")
    _want(_is_int(d.get("generation")) and d["generation"] >= 1, f"generation {d.get('generation')!r}")
    _want(_is_num(d.get("created")), f"creation time {d.get('created')!r}")
    _want(isinstance(d.get("images", []), list), "images is not a list")
    _want(isinstance(d.get("stats", {}), dict), "stats is not a mapping")
    known = {f.name for f in dataclasses.fields(entry_cls)}
    images = []
    for n, i in enumerate(d.get("images", [])):
        _want(isinstance(i, dict), f"image {n} is not a mapping")
        for key in ("host", "path", "program", "unique_id"):
            _want(isinstance(i.get(key), str) and i[key] != "", f"image {n} has no {key}")
        _want(_is_int(i.get("pid")) and i["pid"] > 0, f"image {n} pid {i.get('pid')!r}")
        _want(_is_int(i.get("size", 0)) and i.get("size", 0) >= 0, f"image {n} size {i.get('size')!r}")
        needs = i.get("needs", [])
        _want(isinstance(needs, list) and all(_is_int(g) and g >= 1 for g in needs), f"image {n} needs {needs!r}")
        rank = i.get("rank")
        _want(rank is None or _is_int(rank) and rank >= 0, f"image {n} rank {rank!r}")
        images.append(entry_cls(**{k: v for k, v in i.items() if k in known}))
    mknown = {f.name for f in dataclasses.fields(manifest_cls)}
    fields = {k: v for k, v in d.items() if k in mknown and k != "images"}
    return manifest_cls(images=images, **fields)
