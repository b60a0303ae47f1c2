#!/usr/bin/env python3
"""CPU and wall time per GiB of writing one process's image, against the floor (issue 20: MPI at 1.5x the floor).

    .venv/bin/python bench/writecost.py [--mb 512] [--runs 3] [--dir /var/tmp]

A process (bench/memhog.c) fills --mb MiB; it is frozen with the engine, captured, and its image written (a) while
it is frozen (process_vm_readv) and (b) from a copy-on-write snapshot fork (/proc/PID/mem), each followed by the
floor: the same number of bytes written from a buffer with write-behind and fsync'ed. For each: wall seconds and
CPU seconds (user + system of this process: the chunk writers are its threads) per GiB, and the parts of the
writer's per-byte work measured alone on 4 MiB buffers (reading the process, CRC-32, the chunk tag, pwrite).
Page-cache memory is warmed before each write (bench/mpi.py's warm()).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
GiB = 1 << 30
MiB = 1 << 20


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(work: Path) -> Path:
    exe = work / "memhog"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(exe), str(HERE / "memhog.c"), "-lm"], check=True)
    return exe


def floor(directory: Path, nbytes: int) -> tuple[float, float]:
    from mpi import warm

    from hpcckpt.image.format import write_behind
    warm(directory, nbytes)
    block = os.urandom(4 * MiB)
    path = directory / "floor.bin"
    c, t = cpu(), time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    off = 0
    while off < nbytes:
        k = os.pwrite(fd, block, off)
        write_behind(fd, off, k)
        off += k
    os.fsync(fd)
    os.close(fd)
    wall, used = time.perf_counter() - t, cpu() - c
    path.unlink()
    return wall, used


def one(pid: int, directory: Path, forked: bool) -> tuple[float, float, int]:
    from mpi import warm

    from hpcckpt.engine import dump as engine_dump
    from hpcckpt.engine import tree
    from hpcckpt.engine.forker import kill_snapshot
    frozen = tree.freeze_all(lambda: [i for i in [tree.read_proc(pid)] if i is not None])
    fp = frozen[pid]
    path = str(directory / "bench.dmtcp")
    try:
        cap = engine_dump.capture(fp, forked=forked)
        if forked:
            engine_dump.snapshot(cap, parent_is_agent=False)
        warm(directory, 600 * MiB)
        c, t = cpu(), time.perf_counter()
        meta = engine_dump.write_image(cap, path, computation="bench", generation=1, unique_id="bench")
        wall, used = time.perf_counter() - t, cpu() - c
        if cap.snapshot_pid:
            kill_snapshot(cap.snapshot_pid)
    finally:
        fp.resume()
    os.unlink(path)
    return wall, used, meta.stats["bytes_in"]


def parts(pid: int, mb: int) -> dict[str, float]:
    """CPU seconds per GiB of each step of the writer alone, 4 MiB at a time (one thread)."""
    import hmac  # noqa: F401  (imported by auth)

    from hpcckpt.image import auth
    from hpcckpt.image.format import crc32
    n = min(mb, 256) * MiB // (4 * MiB)
    buf = bytearray(4 * MiB)
    tagger = auth.ChunkTagger(os.urandom(32))
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/maps") as f:
        big = max(((int(a, 16), int(b, 16)) for a, b in (ln.split()[0].split("-") for ln in f)),
                  key=lambda r: r[1] - r[0])
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    c = cpu()
    for i in range(n):
        os.preadv(fd, [buf], big[0] + i * len(buf))
    out["read /proc/PID/mem"] = cpu() - c
    os.close(fd)
    for name, f in (("crc32", crc32), ("chunk tag " + tagger.algo, tagger.tag)):
        c = cpu()
        for _ in range(n):
            f(buf)
        out[name] = cpu() - c
    path = "/var/tmp/writecost.bin"
    from mpi import warm
    warm(Path("/var/tmp"), n * len(buf))
    wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    c = cpu()
    for i in range(n):
        os.pwrite(wfd, buf, i * len(buf))
    out["pwrite (page cache)"] = cpu() - c
    os.close(wfd)
    os.unlink(path)
    scale = GiB / (n * 4 * MiB)
    return {k: v * scale for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="writecost-", dir=a.dir))
    exe = build(work)
    p = subprocess.Popen([str(exe), str(a.mb), "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        while "ready" not in p.stdout.readline():
            pass
        print(f"load {os.getloadavg()[0]:.2f}; {a.mb} MiB; seconds per GiB, wall / CPU")
        for k, v in parts(p.pid, a.mb).items():
            print(f"  part {k:32s} CPU {v:.3f}")
        for r in range(a.runs):
            for forked in (False, True):
                w, c, n = one(p.pid, work, forked)
                fw, fc = floor(work, n)
                g = n / GiB
                print(f"  run {r} {'snapshot' if forked else 'frozen  '}: image {w / g:.3f} / {c / g:.3f}   "
                      f"floor {fw / g:.3f} / {fc / g:.3f}   ratio wall {w / fw:.2f} CPU {c / fc:.2f}")
    finally:
        p.kill()
        p.wait()
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        print(f"load {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
