"""Crafted images for the bad-input tests: a small synthetic image that passes every metadata check, and edited
copies of real images. Everything is written through ImageWriter (its finish() computes the checksum, and
whatever else the writer adds to an image), so crafted images stay readable when the format grows."""
from __future__ import annotations

import copy
import os

from hpcckpt.image.format import HEADER_SIZE, PAGE_SIZE, ImageReader, ImageWriter

CODE = 0x400000          # a synthetic process: code, data and a stack


def synthetic_meta() -> dict:
    regions = [
        {"start": CODE, "end": CODE + 2 * PAGE_SIZE, "perms": "r-xp", "offset": 0, "path": "/bin/prog",
         "backing": "anon", "chunks": []},
        {"start": CODE + 0x10000, "end": CODE + 0x10000 + 4 * PAGE_SIZE, "perms": "rw-p", "offset": 0,
         "path": "", "backing": "anon", "chunks": []},
        {"start": 0x7FFF0000_0000, "end": 0x7FFF0000_0000 + 2 * PAGE_SIZE, "perms": "rw-p", "offset": 0,
         "path": "[stack]", "backing": "anon", "chunks": []},
    ]
    regs = {"rip": CODE + 0x10, "rsp": 0x7FFF0000_0000 + PAGE_SIZE, "cs": 0x33, "ss": 0x2B, "rax": 0, "eflags": 0x202}
    proc = {"pid": 100, "ppid": 1, "root": True, "comm": "prog", "exe": "/bin/prog", "cwd": "/", "umask": 18, "personality": 0,
            "brk": CODE + 0x20000, "mm": {}, "auxv": "",
            "threads": [{"tid": 100, "regs": regs, "xstate": "", "sigmask": 0}],
            "sigactions": [[0, 0, 0, 0] for _ in range(64)], "regions": regions,
            "fds": [{"fd": 0, "kind": "stdio", "path": "/dev/null", "ofd": "stdio:0"},
                    {"fd": 3, "kind": "file", "path": "/tmp/x", "ofd": "o1"}],
            "objects": [{"id": "o1", "kind": "file", "path": "/tmp/x"}], "blobs": {}}
    return {"schema": "hpcckpt-process-image", "hpcckpt_version": "test", "computation": "c1", "generation": 1,
            "unique_id": "u1", "hostname": "h", "created": 0.0, "program": "prog", "process": proc}


def write_synthetic(path: str, change=None, compress: bool = False) -> str:
    """A synthetic image: the code region's 2 pages and 3 data pages stored (raw, or zstd), then change(meta)."""
    meta = synthetic_meta()
    w = ImageWriter(path, compress=compress)
    code = w.add_chunk(0, 2, b"\x90" * 2 * PAGE_SIZE)
    data = w.add_chunk(1, 3, bytes(range(256)) * 48)
    w.drain()
    meta["process"]["regions"][0]["chunks"] = [c.to_json() for c in code]
    meta["process"]["regions"][1]["chunks"] = [c.to_json() for c in data]
    if change:
        change(meta)
    return w.finish(meta)


def rewrite(src: str, dst: str, change) -> str:
    """A copy of image src with change(meta) applied to its metadata: the page data is copied as one block to
    the same file offsets (so every chunk row stays valid), the metadata written by ImageWriter.finish."""
    with ImageReader(src) as r:
        meta = copy.deepcopy(r.meta)
        ends = [c[2] + c[3] for reg in meta["process"]["regions"] for c in reg["chunks"]]
        ends += [c[2] + c[3] for spec in meta["process"].get("blobs", {}).values() for c in spec["chunks"]]
        ends += [c[2] + c[3] for reg in meta["process"]["regions"] if reg.get("hashes")
                 for c in reg["hashes"]["chunks"]]
        end = max(ends + [HEADER_SIZE])
        end += (-end) % PAGE_SIZE
        data = os.pread(r.fd, end - HEADER_SIZE, HEADER_SIZE)
    w = ImageWriter(dst)
    if data:
        w.add_chunk(0, len(data) // PAGE_SIZE, data)
        w.drain()
    change(meta)
    return w.finish(meta)
