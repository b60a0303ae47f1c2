#!/usr/bin/env python3
"""Checkpoint/restart benchmark, side by side with the physical floor measured in the same run.

    .venv/bin/python bench/run.py [--sizes 256,1024,4096] [--threads 1,4] [--runs 3] [--memory warm|cold]

For every size (MiB of touched memory) and thread count it starts bench/memhog, then measures with the engine
itself (no coordinator in the way): the time the program is stopped, the dump until the image is durable, the
image size, and the restore until the program runs again - raw and zstd-compressed, forked and frozen - as
min/median over --runs. Then incremental images: a full checkpoint, memhog changes 5 % of its pages once
(SIGUSR1), a second checkpoint.

Floors, measured in every round (before the round's runs, prepared the same way):
  read     process_vm_readv of the program's memory into a reused buffer (one thread)
  write    the same number of bytes written to a new file (page cache), then fsync
  restore  a page-cached file of that size read into fresh anonymous memory (what a restore must do at least)
  zstd-1   the zstandard package compressing the program's data (256 MiB sample) at level 1 in 4 MiB chunks
           as the image writer does, on one core and on a thread per core, and in one call with its own
           threads=all cores; a zstd checkpoint is compared with the best all-core throughput
A raw dump is compared with read + write + fsync (it may beat the sum: it reads, writes and writes back to
disk at the same time), a raw restore with the restore floor.

Memory on this VM (--memory): freed memory goes back to the host about 2 s later (free page reporting), and
touching it again costs ~2.5 s/GiB for the page cache. `warm` (default) writes and deletes a file somewhat
larger than the size right before each floor and each measured step, so page-cache memory is as on a machine
without that (up to ~2 GiB: a longer write outlives the 2 s); `cold` waits --settle seconds instead, so every
page-cache page is a first touch. Fresh anonymous memory (the restore) costs ~1 s/GiB here either way.
"""
from __future__ import annotations

import argparse
import itertools
import mmap
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hpcckpt.engine.dump import capture, snapshot, write_image  # noqa: E402
from hpcckpt.engine.forker import kill_snapshot  # noqa: E402
from hpcckpt.engine.freeze import freeze  # noqa: E402
from hpcckpt.engine.linux import buffer_address, process_vm_readv  # noqa: E402
from hpcckpt.engine.maps import vmflags_hint  # noqa: E402
from hpcckpt.engine.restore import RestoreOptions, restore_process  # noqa: E402
from hpcckpt.engine.wptrack import Tracker  # noqa: E402
from hpcckpt.image.codec import Compressor  # noqa: E402
from hpcckpt.image.format import CHUNK_PAGES, PAGE_SIZE, ImageReader, write_behind  # noqa: E402

MiB = 1 << 20
BLOCK = 64 * MiB
NCPU = os.cpu_count() or 1


def build_memhog(tmp: Path) -> Path:
    exe = tmp / "memhog"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(HERE / "memhog.c"), "-lm"], check=True)
    return exe


class Memory:
    """Puts page-cache memory into the state --memory asks for, right before each measured step."""

    def __init__(self, mode: str, directory: Path, settle: float):
        self.mode, self.directory, self.settle = mode, directory, settle
        self.block = b"\1" * (16 * MiB)

    def prepare(self, mb: int) -> None:
        if self.mode == "cold":
            time.sleep(self.settle)
            return
        path = self.directory / "warm.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(mb // 16 + 16):          # 256 MiB more than asked for
                os.write(fd, self.block)
        finally:
            os.close(fd)
            path.unlink()


def start(memhog: Path, mb: int, threads: int, pct: float = 5, pattern: str = "scattered") -> subprocess.Popen:
    p = subprocess.Popen([str(memhog), str(mb), str(threads), str(pct), pattern], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def biggest_mapping(pid: int) -> tuple[int, int]:
    rows = [line.split()[0].split("-") for line in open(f"/proc/{pid}/maps") if " rw-p " in line]
    lo, hi = max(((int(a, 16), int(b, 16)) for a, b in rows), key=lambda r: r[1] - r[0])
    return lo, hi


def _parallel(n: int, fn, parts: list) -> None:
    """fn(part) for every part, on n threads (the system calls release the GIL)."""
    if n <= 1:
        for part in parts:
            fn(part)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(fn, parts))


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def floors(memhog: Path, mb: int, mem: Memory, directory: Path, sample: bytearray) -> dict:
    """One round of floors for `mb` MiB, each the best of a plain way and a parallel or written-behind one (see
    the module docstring)."""
    n = mb * MiB
    blocks = [(off, min(BLOCK, n - off)) for off in range(0, n, BLOCK)]
    bufs = [bytearray(BLOCK) for _ in range(NCPU)]
    for b in bufs:
        b[::4096] = b"\1" * len(b[::4096])             # touched once: reading into them costs no page faults
    p = start(memhog, mb, 1)
    try:
        lo, _ = biggest_mapping(p.pid)
        slot, ids = threading.local(), itertools.count()

        def read(block, _pid=p.pid):
            if not hasattr(slot, "addr"):
                slot.addr = buffer_address(bufs[next(ids) % NCPU])      # a buffer of its own per thread
            process_vm_readv(_pid, slot.addr, [(lo + block[0], block[1])], block[1])
        read1 = _timed(_parallel, 1, read, blocks)
        slot, ids = threading.local(), itertools.count()
        read_n = _timed(_parallel, NCPU, read, blocks)
        process_vm_readv(p.pid, buffer_address(sample), [(lo, len(sample))], len(sample))
    finally:
        stop(p)
    path = directory / "floor.bin"
    writes = []
    for behind in (False, True):
        mem.prepare(mb)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        t = time.perf_counter()
        for off, k in blocks:
            os.pwrite(fd, memoryview(bufs[0])[:k], off)
            if behind:
                write_behind(fd, off, k)
        write = time.perf_counter() - t
        writes.append((write, _timed(os.fsync, fd)))
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)              # the last file written, in the page cache: restore floor
    try:
        restores = []
        for threads in (1, NCPU):
            mem.prepare(mb)
            target = mmap.mmap(-1, n)
            view = memoryview(target)
            restores.append(_timed(_parallel, threads, lambda b: os.preadv(fd, [view[b[0]:b[0] + b[1]]], b[0]),
                                   blocks))
            view.release()
            target.close()
    finally:
        os.close(fd)
        path.unlink()
    import zstandard
    zstd1 = len(sample) / _timed(_zstd_chunks, sample, 1) / 1e9
    zstd_n = len(sample) / _timed(_zstd_chunks, sample, NCPU) / 1e9
    zstd_s = len(sample) / _timed(_zstd_chunks, sample, 1, True) / 1e9
    ratio = len(zstandard.ZstdCompressor(level=1).compress(sample)) / len(sample)
    zstd_mt = len(sample) / _timed(zstandard.ZstdCompressor(level=1, threads=NCPU).compress, sample) / 1e9
    return {"read1": read1, "readN": read_n, "write": writes[0][0], "fsync": writes[0][1],
            "write_wb": writes[1][0], "fsync_wb": writes[1][1], "restore1": restores[0], "restoreN": restores[1],
            "zstd1": zstd1, "zstdN": zstd_n, "zstdMT": zstd_mt, "zstdS": zstd_s, "ratio": ratio}


def _zstd_chunks(sample: bytearray, threads: int, shuffle: bool = False) -> None:
    """zstd-1 over the sample in image-chunk pieces (4 MiB), on `threads` threads with a compressor each - as
    the image writer compresses; plain, or as the writer does it (shuffle: byte-shuffled where a sample says
    so, image/codec.py). (One zstandard call over the whole 256 MiB is ~25 % slower here: it was the one-core
    figure until 2026-12-05, which made the zstd floors lenient.)"""
    view, step = memoryview(sample), CHUNK_PAGES * PAGE_SIZE
    slot = threading.local()

    def one(off):
        if not hasattr(slot, "z"):
            slot.z = Compressor(level=1, shuffle=shuffle)
        slot.z.compress(view[off:off + step])
    _parallel(threads, one, range(0, len(sample), step))


def dump_floor(f: dict) -> float:
    return min(f["read1"], f["readN"]) + min(f["write"] + f["fsync"], f["write_wb"] + f["fsync_wb"])


def restore_floor(f: dict) -> float:
    return min(f["restore1"], f["restoreN"])


def zstd_floor(f: dict) -> float:
    """zstd-1 on all cores: the best of the zstandard package's own threads, a thread per core compressing
    chunks, and every core at the one-core speed."""
    return max(f["zstdMT"], f["zstdN"], NCPU * f["zstd1"])


def _restore_time(img: Path, mem: Memory, mb: int) -> float:
    """Seconds from image to running program, memory prepared (--memory) as before every step."""
    mem.prepare(mb)
    t = time.perf_counter()
    with ImageReader(str(img)) as r:
        rp = restore_process(r, RestoreOptions())
        rp.release()
    took = time.perf_counter() - t
    rp.kill()
    return took


def one_run(memhog: Path, mb: int, threads: int, compress: bool, forked: bool, directory: Path,
            mem: Memory) -> dict:
    p = start(memhog, mb, threads)
    img = directory / f"ckpt_bench_{mb}_{threads}_{int(compress)}_{int(forked)}.dmtcp"
    try:
        hint = vmflags_hint(p.pid)                   # as the agent does: smaps read before the freeze
        mem.prepare(mb)
        t0 = time.perf_counter()
        fp = freeze(p.pid)
        cap = capture(fp, vmflags_hint=hint, forked=forked)
        if forked:
            snapshot(cap, parent_is_agent=True)      # we are memhog's parent: the fork becomes our child
            fp.resume()
        stopped = time.perf_counter() - t0
        meta = write_image(cap, str(img), computation="bench", generation=1, unique_id="b", compress=compress)
        if not forked:
            fp.resume()
            stopped = time.perf_counter() - t0
        if cap.snapshot_pid:
            kill_snapshot(cap.snapshot_pid)
        dump = time.perf_counter() - t0
    finally:
        stop(p)
    size = img.stat().st_size
    restore = _restore_time(img, mem, mb)
    img.unlink()
    return {"stopped": stopped, "dump": dump, "restore": restore, "size": size, "bytes": meta.stats["bytes_in"]}


def checkpoint(p: subprocess.Popen, path: Path, generation: int, base: Path | None,
               tracker: Tracker | None) -> tuple[float, int, dict]:
    hint = vmflags_hint(p.pid)
    t0 = time.perf_counter()
    fp = freeze(p.pid)
    cap = capture(fp, vmflags_hint=hint, forked=True, tracker=tracker, generation=generation)
    snapshot(cap, parent_is_agent=True)
    fp.resume()
    meta = write_image(cap, str(path), computation="bench", generation=generation, unique_id="b",
                       incremental=True, base=str(base) if base else None)
    kill_snapshot(cap.snapshot_pid)
    return time.perf_counter() - t0, path.stat().st_size, meta.stats


def incremental_run(memhog: Path, mb: int, directory: Path, mem: Memory, pattern: str, track: bool) -> dict:
    """A full checkpoint (with page hashes); memhog then changes 5 % of its pages once; a second checkpoint,
    which hashes every page or (track) reads only the pages written since the first."""
    p = start(memhog, mb, 1, 5, pattern)
    full, inc = directory / "inc_full.dmtcp", directory / "inc_next.dmtcp"
    tracker = Tracker(p.pid) if track else None
    try:
        mem.prepare(mb)
        full_s, full_size, _ = checkpoint(p, full, 1, None, tracker)
        p.send_signal(signal.SIGUSR1)
        assert p.stdout.readline().strip() == b"changed"
        mem.prepare(mb // 10)
        inc_s, inc_size, stats = checkpoint(p, inc, 2, full, tracker)
        assert stats["write_tracked"] == track, stats
        stop(p)
        return {"full": full_size, "inc": inc_size, "full_s": full_s, "inc_s": inc_s,
                "pages": stats["pages_dumped"], "restore_full": _restore_time(full, mem, mb),
                "restore_chain": _restore_time(inc, mem, mb)}
    finally:
        stop(p)
        for f in (full, inc):
            if f.exists():
                f.unlink()


def fmt(vals: list[float]) -> str:
    return f"{min(vals):.3f} / {statistics.median(vals):.3f}"


MODES = ((False, True), (False, False), (True, True), (True, False))      # (compress, forked)


NOTES = "### Reading these numbers"


def zstd_cpu_floor(f: dict, mb: int) -> float:
    """Seconds a zstd dump of mb MiB takes at least on all cores: every byte read once (one thread) and
    compressed (one-core speed), the compressed bytes written (plain write), that CPU time spread evenly."""
    cpu = mb * MiB / (f["zstd1"] * 1e9) + f["read1"] + f["write"] * f["ratio"]
    return cpu / NCPU


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024,4096", help="MiB of touched memory, comma-separated")
    ap.add_argument("--threads", default="1,4", help="threads of the benchmark program, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="rounds: floors, then one run of every configuration")
    ap.add_argument("--memory", choices=("warm", "cold"), default="warm",
                    help="page-cache memory before each step: recently used (warm) or given back to the host")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds to wait before each step with --memory cold")
    ap.add_argument("--no-incremental", action="store_true")
    ap.add_argument("--only-incremental", action="store_true",
                    help="just the incremental images (hashing and write tracking; written to --out)")
    ap.add_argument("--dir", default=None, help="where images go (default: a temp dir under /var/tmp)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]
    work = Path(args.dir or tempfile.mkdtemp(prefix="hpcckpt-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    memhog = build_memhog(work)
    mem = Memory(args.memory, work, args.settle)
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    raw_rows, zstd_rows, floor_rows = [], [], []
    for mb in sizes if not args.only_incremental else []:
        sample = bytearray(min(mb, 256) * MiB)          # the program's data, for the zstd floor
        fl: list[dict] = []
        res: dict = {}
        for _ in range(args.runs):
            fl.append(floors(memhog, mb, mem, work, sample))
            print(f"{mb} MiB floors: " + ", ".join(f"{k} {v:.3f}" for k, v in fl[-1].items()), flush=True)
            for threads in thread_counts:
                for compress, forked in MODES:
                    r = one_run(memhog, mb, threads, compress, forked, work, mem)
                    print(f"  {threads} threads, {'zstd' if compress else 'raw'}, "
                          f"{'forked' if forked else 'frozen'}: " +
                          ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)), flush=True)
                    res.setdefault((threads, compress, forked), []).append(r)
        del sample
        d_floor = min(dump_floor(f) for f in fl)
        r_floor = min(restore_floor(f) for f in fl)
        z_floor = max(zstd_floor(f) for f in fl)
        z_cpu = min(zstd_cpu_floor(f, mb) for f in fl)

        def best(*keys):
            return f"{min(min(f[k] for k in keys) for f in fl):.3f}"
        floor_rows.append(
            f"| {mb} MiB | {best('read1')} / {best('readN')} | {best('write')} + {best('fsync')} | "
            f"{best('write_wb')} + {best('fsync_wb')} | **{d_floor:.3f}** | {best('restore1')} / {best('restoreN')} | "
            f"**{r_floor:.3f}** | {max(f['zstd1'] for f in fl):.2f} / {max(f['zstdN'] for f in fl):.2f} / "
            f"{max(f['zstdMT'] for f in fl):.2f} | {max(f['zstdS'] for f in fl):.2f} | "
            f"**{z_floor:.2f}** | **{z_cpu:.3f}** |")
        for (threads, compress, forked), runs in res.items():
            r = {k: [x[k] for x in runs] for k in runs[0]}
            mode = f"{'forked' if forked else 'frozen'}"
            size = f"{statistics.median(r['size']) / MiB:.0f} MiB"
            if compress:
                gbs = max(b / d for b, d in zip(r["bytes"], r["dump"])) / 1e9
                z_mt = max(f["zstdMT"] for f in fl)
                zstd_rows.append(f"| {mb} MiB | {threads} | {mode} | {fmt(r['stopped'])} | {fmt(r['dump'])} | "
                                 f"{gbs:.2f} | {gbs / z_mt:.2f}× | {gbs / z_floor:.2f}× | "
                                 f"{min(r['dump']) / z_cpu:.2f}× | {fmt(r['restore'])} | "
                                 f"{size} |")
            else:
                raw_rows.append(f"| {mb} MiB | {threads} | {mode} | {fmt(r['stopped'])} | {fmt(r['dump'])} | "
                                f"{min(r['dump']) / d_floor:.2f}× | {fmt(r['restore'])} | "
                                f"{min(r['restore']) / r_floor:.2f}× | {size} |")
    inc_rows = []
    if not args.no_incremental:
        for mb in sizes:
            for pattern in ("scattered", "contiguous"):
                r = [incremental_run(memhog, mb, work, mem, pattern, track) for track in (False, True)]
                row = (f"| {mb} MiB | {pattern} | {r[0]['full'] / MiB:.0f} MiB in {r[0]['full_s']:.2f} s | "
                       f"{r[0]['inc'] / MiB:.1f} MiB in {r[0]['inc_s']:.2f} s | "
                       f"{r[1]['inc'] / MiB:.1f} MiB in {r[1]['inc_s']:.2f} s ({r[1]['pages']} pages) | "
                       f"{100 * r[1]['inc'] / r[1]['full']:.1f} % | {r[1]['restore_full']:.2f} s | "
                       f"{r[1]['restore_chain']:.2f} s |")
                inc_rows.append(row)
                print(row, flush=True)
    load1 = os.getloadavg()
    cmd = "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = (
        f"# Benchmark results\n\nCommand: `{cmd}` ({started}, {platform.node()}, {NCPU} cores, kernel "
        f"{platform.release()}, images in {work}, memory {args.memory}; load average "
        f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end).\n\n"
        f"Times in seconds, min / median of {args.runs} rounds. *stopped*: from freeze to resume (the program does "
        "not run); *forked*: the image is written from a copy-on-write fork while the program runs on; *frozen*: "
        "the program stays stopped until its image is written. *dump*: freeze to image durable (fsync'ed). "
        "*restore*: image to running program. Floors are measured in every round, prepared like the runs "
        "(bench/run.py --help).\n\n## Floors\n\n"
        "Best of the rounds. *read*: one thread / all cores. *write + fsync*: plainly, and with write-behind "
        "(sync_file_range after every 64 MiB). *dump floor*: the faster read + the faster write and fsync. "
        "*restore*: one thread / all cores. *zstd-1*: GB/s of plain zstd-1 compressing 4 MiB chunks on one core / "
        f"on a thread per core / in one call with the zstandard package's threads; its floor: the best of those "
        f"and {NCPU} × the one-core speed. *shuffled*: GB/s on one core of what the image writer does with a "
        "chunk (byte shuffle where it pays, then zstd-1; image/codec.py). *zstd dump floor*: seconds "
        "of CPU a plain zstd dump needs at least - compress every byte at the one-core speed, read it once, write "
        f"the compressed bytes - spread evenly over the {NCPU} cores.\n\n"
        "| memory | read | write + fsync | write-behind + fsync | dump floor | restore | restore floor | zstd-1 | "
        f"shuffled | zstd-1 floor, {NCPU} cores | zstd dump floor |\n|---|---|---|---|---|---|---|---|---|---|---|\n" +
        "\n".join(floor_rows) +
        "\n\n## Raw images\n\n*vs floor*: min dump / dump floor, min restore / restore floor.\n\n"
        "| memory | threads | mode | stopped | dump | vs floor | restore | vs floor | image |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(raw_rows) +
        "\n\n## zstd-1 images\n\n*GB/s*: memory in / dump time (best run), over the zstd-1 floors: the zstandard "
        f"package's own threads (threads={NCPU}, one call), and the strict one: the best of all-core zstd-1 "
        "(floors table; the target is ≥ 0.8× of the strict one). *vs dump floor*: min dump / zstd dump floor "
        "(which also counts reading and writing).\n\n"
        "| memory | threads | mode | stopped | dump | GB/s | of zstd-1 threads | of zstd-1 floor | vs dump floor | "
        "restore | image |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(zstd_rows) + "\n")
    if args.only_incremental:
        text = (f"# Incremental images\n\nCommand: `{cmd}` ({started}, {platform.node()}, {NCPU} cores, kernel "
                f"{platform.release()}, memory {args.memory}; load average {load0[0]:.2f} at the start, "
                f"{load1[0]:.2f} at the end).\n")
    if inc_rows:
        text += ("\n## Incremental images\n\nA full checkpoint (with page hashes), then memhog changes 5 % of its "
                 "pages once (SIGUSR1) - *scattered*: single pages spread over all its memory, *contiguous*: one "
                 "run - and a second checkpoint stores what changed; forked, raw, one run each. *hashing*: the "
                 "second checkpoint reads and hashes every page; *write-tracked*: it reads only the pages "
                 "written since the first (userfaultfd write-protect, engine/wptrack.py). *restore*: image to "
                 "running program, from the full image alone and through the chain (the write-tracked "
                 "incremental image and its base).\n\n"
                 "| memory | pattern | full image | incremental, hashing | incremental, write-tracked | "
                 "of the full | restore, full | restore, chain |\n|---|---|---|---|---|---|---|---|\n" +
                 "\n".join(inc_rows) + "\n")
    out = Path(args.out)
    if out.exists() and NOTES in out.read_text():       # the hand-written reading of earlier numbers stays
        text += "\n" + NOTES + out.read_text().split(NOTES, 1)[1]
    out.write_text(text)
    print(f"written to {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
