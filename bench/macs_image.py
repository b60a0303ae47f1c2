"""Cost of chunk tags in whole image writes and reads: 1 GiB through ImageWriter (raw chunks, its worker threads)
then read back and checked as a restore does (chunk_ok over a private mapping), with the tag keyed BLAKE3
(blake3-128), HMAC-SHA256 (hmac-sha256-128) or none, interleaved round by round. Wall and CPU seconds
(process CPU, less sensitive to other load on the machine), min over the rounds.

    .venv/bin/python bench/macs_image.py [--mib 1024] [--rounds 5] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time

from hpcckpt.image import auth
from hpcckpt.image.format import CHUNK_PAGES, PAGE_SIZE, ImageReader, ImageWriter, iter_chunks


class _NoTag(auth.ChunkTagger):
    def tag(self, data) -> str:
        return ""


def one(path: str, mib: int, src: bytes, algo: str | None) -> tuple[float, float, float, float]:
    orig = auth.ChunkTagger
    if algo is None:
        auth.ChunkTagger = _NoTag
    else:
        auth.ChunkTagger = lambda key, a=algo: orig(key, a)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        w = ImageWriter(path)
        n = mib * 1024 * 1024 // (CHUNK_PAGES * PAGE_SIZE)
        rows = []
        for i in range(n):
            def produce(buf, i=i):
                buf[:len(src)] = src
                buf[0:8] = i.to_bytes(8, "little")
            rows.append(w.submit(i * CHUNK_PAGES, CHUNK_PAGES, produce))
        w.drain()
        w.finish({"process": {"regions": [{"chunks": [c.to_json() for g in rows for c in g]}]}})
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        auth.ChunkTagger = orig
    with ImageReader(path) as r:
        if algo is None:
            r._tagger = None
        t2, c2 = time.perf_counter(), time.process_time()
        m = mmap.mmap(r.fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        view = memoryview(m)
        from concurrent.futures import ThreadPoolExecutor
        chunks = list(iter_chunks(r.meta))
        with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
            ok = all(ex.map(lambda c: r.chunk_ok(c, view[c.off:c.off + c.length]), chunks))
        t3, c3 = time.perf_counter(), time.process_time()
        view.release()
        m.close()
    assert ok
    os.unlink(path)
    return t1 - t0, c1 - c0, t3 - t2, c3 - c2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    src = os.urandom(CHUNK_PAGES * PAGE_SIZE)
    d = tempfile.mkdtemp(prefix="hpcckpt-macs-", dir=a.dir)
    modes = {"none": None, auth.CHUNK_BLAKE3: auth.CHUNK_BLAKE3, auth.CHUNK_HMAC: auth.CHUNK_HMAC}
    best: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for name, algo in modes.items():
            got = one(os.path.join(d, "img.dmtcp"), a.mib, src, algo)
            best[name] = [min(x, y) for x, y in zip(best.get(name, got), got)]
    os.rmdir(d)
    print(f"{a.mib} MiB, {a.rounds} rounds, min: write wall / CPU, check wall / CPU (s)")
    for name, (w, wc, r, rc) in best.items():
        print(f"  {name:16s} write {w:.3f} / {wc:.3f}   check {r:.3f} / {rc:.3f}")


if __name__ == "__main__":
    main()
