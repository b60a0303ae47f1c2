"""Page hashes of incremental images: every page written gets an 8-byte hash (XXH3-64: 0.08 s/GiB on one core
here, ten times less than SHA-256 with SHA-NI; it finds changed pages, it does not defend against an adversary
writing colliding pages into its own memory), stored with the image and tagged with the algorithm; a page is
stored only if its hash differs from the previous generation's (incremental.py has the chain of images).
Used by the image writer (format.py) as it stores pages, so it imports nothing of the image layer."""
from __future__ import annotations

from dataclasses import dataclass

from xxhash import xxh3_64_digest

HASH_SIZE = 8
HASH_ALGO = "xxh3-64"         # in each region's hash blob; a blob without one holds SHA-256 hashes (older images)
UNPOPULATED = bytes(HASH_SIZE)


def page_hash(page) -> bytes:
    h = xxh3_64_digest(page)
    return h if h != UNPOPULATED else b"\1" + h[1:]       # 0 means "no page"


ZERO_HASH = page_hash(bytes(4096))
ZERO_INT = int.from_bytes(ZERO_HASH, "little")    # as memoryview.cast("Q") reads it (x86-64, little-endian)



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
        keep = [i for i, h in enumerate(cur) if h != ZERO_INT]
    else:
        old = memoryview(prev).cast("Q").tolist()
        keep = [i for i, (h, o) in enumerate(zip(cur, old)) if h != o and h != ZERO_INT]
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
    where: list[int] = []                      # region page of every buffer page
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
