"""Incremental images: a generation stores only the pages whose content changed since the previous one.

There is no soft-dirty tracking on this kernel, so changes are found by content: every page written gets an
8-byte hash (XXH3-64: 0.08 s/GiB on one core here, ten times less than SHA-256 with SHA-NI; it finds changed
pages, it does not defend against an adversary writing colliding pages into its own memory), stored with the
image and tagged with the algorithm: hashes of another algorithm (images of older versions, SHA-256) are not
compared, the next generation is then a full one. The next generation hashes again and stores a page only if
its hash differs from the previous generation's (an all-zero page is never stored: a fresh mapping reads as
zeros).

Restore resolves each page of the newest image: its hash says what the content is, and the content comes
from the newest image in the chain (newest -> base -> its base ...) that stored that page with that hash.
A full image is taken every `full_every` generations, so chains stay short; retention never deletes a
generation a kept one still needs (manifest entries list the generations each image needs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from xxhash import xxh3_64_digest

from ..image.format import Chunk, ImageError, ImageReader

HASH_SIZE = 8
HASH_ALGO = "xxh3-64"         # in each region's hash blob; a blob without one holds SHA-256 hashes (older images)
UNPOPULATED = bytes(HASH_SIZE)


def page_hash(page) -> bytes:
    h = xxh3_64_digest(page)
    return h if h != UNPOPULATED else b"\1" + h[1:]       # 0 means "no page"


ZERO_HASH = page_hash(bytes(4096))
_ZERO_INT = int.from_bytes(ZERO_HASH, "little")    # as memoryview.cast("Q") reads it (x86-64, little-endian)


def region_key(r) -> tuple:
    return (r.start, r.end, r.perms, r.backing, r.path)


@dataclass
class HashSpec:
    """For one submitted run of pages: where its hashes go, and the previous generation's (or None)."""
    out: memoryview
    prev: bytes | None


def changed_runs(view: memoryview, npages: int, spec: HashSpec, zero_skip: bool) -> list[tuple[int, int]]:
    """Hash every page into spec.out; return the runs of pages to store (changed, and not all zero)."""
    hashes = [xxh3_64_digest(view[i * 4096:(i + 1) * 4096]) for i in range(npages)]
    if UNPOPULATED in hashes:
        hashes = [h if h != UNPOPULATED else b"\1" + h[1:] for h in hashes]      # as page_hash does
    joined = b"".join(hashes)
    spec.out[:len(joined)] = joined
    prev = spec.prev
    if prev is None:
        if not zero_skip or ZERO_HASH not in hashes:
            return [(0, npages)] if npages else []
    elif prev == joined:
        return []                              # nothing changed: the common case in an incremental image
    # compare as integers, one list comprehension per chunk: a Python loop over every page costs ~1 s per 4 GiB
    cur = memoryview(joined).cast("Q").tolist()
    if prev is None:                           # (only here with zero_skip: see above)
        keep = [i for i, h in enumerate(cur) if h != _ZERO_INT]
    else:
        old = memoryview(prev).cast("Q").tolist()
        keep = [i for i, (h, o) in enumerate(zip(cur, old)) if h != o and h != _ZERO_INT]
    runs: list[list[int]] = []
    for i in keep:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(first, n) for first, n in runs]


def changed_runs_scattered(view: memoryview, runs: list, hashes, prev: bytes,
                           zero_skip: bool) -> list[tuple[int, int, int]]:
    """changed_runs for runs of a region's pages [(first page, pages)] packed into one buffer: their hashes go to
    their places in the region's `hashes`, compared with `prev` (the region's previous ones). Returns (page in
    the buffer, pages, page in the region) to store."""
    npages = sum(n for _, n in runs)
    out = bytearray(npages * HASH_SIZE)
    joined_prev = b"".join([prev[f * HASH_SIZE:(f + n) * HASH_SIZE] for f, n in runs])
    found = changed_runs(view, npages, HashSpec(memoryview(out), joined_prev), zero_skip)
    where = []                                 # region page of every buffer page
    pos = 0
    for first, n in runs:
        hashes[first * HASH_SIZE:(first + n) * HASH_SIZE] = out[pos * HASH_SIZE:(pos + n) * HASH_SIZE]
        where += range(first, first + n)
        pos += n
    merged: list[list[int]] = []
    for b, k in found:
        for i in range(b, b + k):
            if merged and merged[-1][0] + merged[-1][1] == i and merged[-1][2] + merged[-1][1] == where[i]:
                merged[-1][1] += 1
            else:
                merged.append([i, 1, where[i]])
    return [(b, k, page) for b, k, page in merged]


def previous_hashes(path: str | None) -> dict[tuple, bytes]:
    """Region key -> page hashes of an earlier image ({} if there is none, or it has no hashes)."""
    if not path or not os.path.exists(path):
        return {}
    from ..image.records import RegionRecord
    from .memory import read_blob
    out = {}
    with ImageReader(path) as r:
        for row in r.meta["process"]["regions"]:
            reg = RegionRecord.from_dict(row)
            if reg.hashes and reg.hashes.get("algo") == HASH_ALGO:
                out[region_key(reg)] = read_blob(r, reg.hashes)
    return out


@dataclass
class ChainLink:
    reader: ImageReader
    regions: dict[tuple, object]      # key -> RegionRecord
    hashes: dict[tuple, bytes]


def open_chain(reader: ImageReader, max_length: int = 64) -> list[ChainLink]:
    """The image and every base it builds on, newest first."""
    from ..image.records import RegionRecord
    from .memory import read_blob
    chain = []
    r = reader
    own = True
    while True:
        regions = {}
        hashes = {}
        for row in r.meta["process"]["regions"]:
            reg = RegionRecord.from_dict(row)
            regions[region_key(reg)] = reg
            if reg.hashes:
                hashes[region_key(reg)] = read_blob(r, reg.hashes)
        chain.append(ChainLink(r, regions, hashes))
        base = r.meta.get("base")
        if not base:
            return chain
        if len(chain) >= max_length:
            raise ImageError(f"{reader.path}: chain of incremental images longer than {max_length}")
        path = os.path.normpath(os.path.join(os.path.dirname(r.path), base))
        try:
            r = ImageReader(path)
        except ImageError as e:
            for link in chain[1 if own else 0:]:
                link.reader.close()
            raise ImageError(f"{reader.path} is incremental and needs {path}: {e}") from None


def resolve(chain: list[ChainLink], key: tuple, npages: int):
    """For one region of the newest image: yield (reader, chunk, [(first, count) page runs to take from it])."""
    target = chain[0].hashes.get(key)
    if target is None:
        raise ImageError(f"{chain[0].reader.path}: incremental image without page hashes")
    done = bytearray(npages)
    for link in chain:
        reg = link.regions.get(key)
        theirs = link.hashes.get(key)
        if reg is None or theirs is None:
            break
        for row in reg.chunks:
            c = Chunk.from_json(row)
            lo, hi = c.page * HASH_SIZE, (c.page + c.npages) * HASH_SIZE
            if theirs[lo:hi] == target[lo:hi] and not any(done[c.page:c.page + c.npages]):
                done[c.page:c.page + c.npages] = b"\1" * c.npages
                yield link.reader, c, [(c.page, c.npages)]
                continue
            # page by page, as integers in one comprehension: a Python loop over every page of a 1 GiB base
            # image took 0.5 s of a restore
            mine = memoryview(target[lo:hi]).cast("Q").tolist()
            old = memoryview(theirs[lo:hi]).cast("Q").tolist()
            wanted = done[c.page:c.page + c.npages]
            take = [i for i, (a, b, d) in enumerate(zip(mine, old, wanted)) if a == b and not d]
            runs: list[list[int]] = []
            for i in take:
                done[c.page + i] = 1
                if runs and runs[-1][0] + runs[-1][1] == c.page + i:
                    runs[-1][1] += 1
                else:
                    runs.append([c.page + i, 1])
            if runs:
                yield link.reader, c, [(f, n) for f, n in runs]
    pos = done.find(0)
    while pos != -1:                           # pages no image gave: they must be unpopulated or all zero
        end = done.find(1, pos)
        end = npages if end == -1 else end
        for lo in range(pos, end, 65536):
            hi = min(end, lo + 65536)
            for i, h in enumerate(memoryview(target)[lo * HASH_SIZE:hi * HASH_SIZE].cast("Q").tolist()):
                if h != 0 and h != _ZERO_INT:
                    raise ImageError(f"{chain[0].reader.path}: page {lo + i} of the region at {key[0]:#x} is in "
                                     f"no image of its chain (a base image was deleted or replaced?)")
        pos = done.find(0, end)
