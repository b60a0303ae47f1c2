#!/usr/bin/env python3
"""Checkpoint/restart benchmark, side by side with the physical floor measured in the same run.

    .venv/bin/python bench/run.py [--sizes 256,1024,4096] [--threads 1,4] [--runs 3] [--out bench/RESULTS.md]

For every size (MiB of touched memory) and thread count it starts bench/memhog, then measures with the engine
itself (no coordinator in the way): the time the program is stopped, the dump, the image size, and the restore
until the program runs again — raw and zstd-compressed — as min/median over --runs. Floors, same run: memcpy,
reading the process's memory (process_vm_readv), writing to the page cache, fsync, zstd-1 on one core.
Results are printed and written as a Markdown table with the command that produced them.

This VM backs guest memory lazily: the first use of never-touched RAM costs ~2.5 s/GiB. The benchmark warms
memory first (a file twice the largest size, written then deleted), so figures are those of a machine that has
been running for a while.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hpcckpt.engine.dump import capture, snapshot, write_image  # noqa: E402
from hpcckpt.engine.forker import kill_snapshot  # noqa: E402
from hpcckpt.engine.maps import vmflags_hint  # noqa: E402
from hpcckpt.engine.freeze import freeze  # noqa: E402
from hpcckpt.engine.linux import buffer_address, process_vm_readv  # noqa: E402
from hpcckpt.engine.restore import RestoreOptions, restore_process  # noqa: E402
from hpcckpt.image.format import ImageReader  # noqa: E402

MiB = 1 << 20


def build_memhog(tmp: Path) -> Path:
    exe = tmp / "memhog"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(HERE / "memhog.c"), "-lm"], check=True)
    return exe


def warm_memory(directory: Path, mb: int) -> None:
    path = directory / "warm.bin"
    block = b"\1" * (16 * MiB)
    with open(path, "wb") as f:
        for _ in range(max(1, mb // 16)):
            f.write(block)
    path.unlink()


def start(memhog: Path, mb: int, threads: int) -> subprocess.Popen:
    p = subprocess.Popen([str(memhog), str(mb), str(threads)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    return p


def floors(memhog: Path, mb: int, directory: Path) -> dict:
    n = mb * MiB
    a, b = bytearray(n), bytearray(n)
    a[::4096] = b"\1" * len(a[::4096])
    b[::4096] = b"\1" * len(b[::4096])
    t = time.perf_counter()
    ctypes.memmove(buffer_address(b), buffer_address(a), n)
    memcpy = time.perf_counter() - t
    del b
    p = start(memhog, mb, 1)
    try:
        heap = max((line.split() for line in open(f"/proc/{p.pid}/maps") if "rw-p" in line),
                   key=lambda f: int(f[0].split("-")[1], 16) - int(f[0].split("-")[0], 16))
        lo = int(heap[0].split("-")[0], 16)
        t = time.perf_counter()
        done = 0
        chunk = 16 * MiB
        while done < n:
            k = min(chunk, n - done)
            done += process_vm_readv(p.pid, buffer_address(a) + done, [(lo + done, k)], k)
        read = time.perf_counter() - t
    finally:
        p.kill()
        p.wait()
    path = directory / "floor.bin"
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    view = memoryview(a)
    for off in range(0, n, 16 * MiB):
        os.write(fd, view[off:off + 16 * MiB])
    write = time.perf_counter() - t
    t = time.perf_counter()
    os.fsync(fd)
    fsync = time.perf_counter() - t
    os.close(fd)
    path.unlink()
    t = time.perf_counter()
    zlib.crc32(a)
    crc = time.perf_counter() - t
    import zstandard
    sample = bytes(a[: min(n, 256 * MiB)])
    t = time.perf_counter()
    zstandard.ZstdCompressor(level=1).compress(sample)
    zstd_gbs = len(sample) / (time.perf_counter() - t) / 1e9
    return {"memcpy": memcpy, "read": read, "write": write, "fsync": fsync, "crc": crc, "zstd1_gbs_core": zstd_gbs}


def one_run(memhog: Path, mb: int, threads: int, compress: bool, forked: bool, directory: Path) -> dict:
    p = start(memhog, mb, threads)
    img = directory / f"ckpt_bench_{mb}_{threads}_{int(compress)}_{int(forked)}.dmtcp"
    try:
        t0 = time.perf_counter()
        hint = vmflags_hint(p.pid)                   # as the agent does: smaps read before the freeze
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
        p.kill()
        p.wait()
    size = img.stat().st_size
    t = time.perf_counter()
    with ImageReader(str(img)) as r:
        rp = restore_process(r, RestoreOptions())
        rp.release()
    restore = time.perf_counter() - t
    rp.kill()
    img.unlink()
    return {"stopped": stopped, "dump": dump, "restore": restore, "size": size,
            "mem_s": meta.stats["memory_s"], "bytes": meta.stats["bytes_in"]}


def incremental_run(memhog: Path, mb: int, directory: Path) -> dict:
    """A full checkpoint, then one after the program changed ~5 % of its pages (memhog 5: 5 % per second)."""
    p = start_args(memhog, [str(mb), "1", "5"])
    full = directory / "inc_full.dmtcp"
    inc = directory / "inc_next.dmtcp"
    try:
        sizes, times = [], []
        for path, base in ((full, None), (inc, str(full))):
            hint = vmflags_hint(p.pid)
            t0 = time.perf_counter()
            fp = freeze(p.pid)
            cap = capture(fp, vmflags_hint=hint, forked=True)
            snapshot(cap, parent_is_agent=True)
            fp.resume()
            write_image(cap, str(path), computation="bench", generation=1 if base is None else 2, unique_id="b",
                        incremental=True, base=base)
            kill_snapshot(cap.snapshot_pid)
            times.append(time.perf_counter() - t0)
            sizes.append(path.stat().st_size)
            time.sleep(1.0)
        return {"full": sizes[0], "inc": sizes[1], "full_s": times[0], "inc_s": times[1]}
    finally:
        p.kill()
        p.wait()
        for f in (full, inc):
            if f.exists():
                f.unlink()


def start_args(memhog: Path, args: list[str]) -> subprocess.Popen:
    p = subprocess.Popen([str(memhog), *args], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    return p


def fmt(vals: list[float]) -> str:
    return f"{min(vals):.3f} / {statistics.median(vals):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024,4096", help="MiB of touched memory, comma-separated")
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where images go (default: a temp dir under /var/tmp)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]
    work = Path(args.dir or tempfile.mkdtemp(prefix="hpcckpt-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    memhog = build_memhog(work)
    warm_mb = max(4 * max(sizes), int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.7) // MiB)
    print(f"warming {warm_mb} MiB of memory ...", flush=True)
    warm_memory(work, warm_mb)
    rows = []
    for mb in sizes:
        fl = [floors(memhog, mb, work) for _ in range(args.runs)]
        f = {k: min(x[k] for x in fl) if k != "zstd1_gbs_core" else max(x[k] for x in fl) for k in fl[0]}
        print(f"{mb} MiB floors: " + ", ".join(f"{k} {v:.3f}" for k, v in f.items()), flush=True)
        for threads in thread_counts:
            for compress, forked in ((False, True), (False, False), (True, True), (True, False)):
                runs = [one_run(memhog, mb, threads, compress, forked, work) for _ in range(args.runs)]
                r = {k: [x[k] for x in runs] for k in runs[0]}
                floor_ckpt = f["read"] + f["write"] + f["fsync"]      # an image is durable: fsync is part of it
                mode = f"{'zstd-1' if compress else 'raw'}, {'forked' if forked else 'frozen'}"
                row = (f"| {mb} MiB | {threads} | {mode} | {fmt(r['stopped'])} | "
                       f"{fmt(r['dump'])} | {min(r['dump']) / floor_ckpt:.2f}× | {fmt(r['restore'])} | "
                       f"{statistics.median(r['size']) / MiB:.0f} MiB | {f['memcpy']:.3f} | {f['read']:.3f} | "
                       f"{f['write']:.3f} + fsync {f['fsync']:.3f} |")
                rows.append(row)
                print(row, flush=True)
    inc_rows = []
    for mb in sizes:
        r = incremental_run(memhog, mb, work)
        row = (f"| {mb} MiB | {r['full'] / MiB:.0f} MiB in {r['full_s']:.2f} s | {r['inc'] / MiB:.1f} MiB in "
               f"{r['inc_s']:.2f} s | {100 * r['inc'] / r['full']:.1f} % |")
        inc_rows.append(row)
        print(row, flush=True)
    cmd = "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    header = (f"# Benchmark results\n\nCommand: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
              f"{os.cpu_count()} cores, kernel {platform.release()}, images in {work}).\n\n"
              "Times in seconds, min / median of "
              f"{args.runs} runs. *stopped*: from freeze to resume (the program does not run); *forked*: the "
              "images are written from a copy-on-write fork while the program runs on, *frozen*: the program "
              "stays stopped until its images are written. *dump*: "
              "freeze to image durable (fsync'ed). *vs floor*: min dump / (read + page-cache write + fsync floors). "
              "*restore*: image to running program. Floors measured in the same run for the same size: "
              "memcpy, process_vm_readv of the program's memory, write to the page cache (+ fsync).\n\n"
              "| memory | threads | mode | stopped | dump | vs floor | restore | image | memcpy | read | write |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    inc_header = ("\n## Incremental images\n\nA full checkpoint (with page hashes), then one a second later, after the "
                  "program changed about 5 % of its pages (bench/memhog MB 1 5), forked, raw.\n\n"
                  "| memory | full image | incremental image | of the full |\n|---|---|---|---|\n")
    Path(args.out).write_text(header + "\n".join(rows) + "\n" + inc_header + "\n".join(inc_rows) + "\n")
    print(f"written to {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
