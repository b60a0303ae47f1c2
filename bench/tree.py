#!/usr/bin/env python3
"""Checkpoint and restart of a process tree through the commands a user runs, next to the physical floor.

    .venv/bin/python bench/tree.py [--procs 16] [--sizes 16,64] [--runs 3] [--out bench/RESULTS-tree.md]

bench/tree.c: a pipeline of --procs processes joined by pipes, each with SIZE MiB of touched memory, tokens
flowing through all of them. Per run: `dmtcp_launch` it, `dmtcp_command -bc` (the computation's checkpoint:
freeze of every process, drain, images durable; the program is stopped only for `frozen`), `-k`, then
`dmtcp_restart` of its images until the pipeline's output moves again. Floors in the same run: memcpy of the
sum of the processes' resident memory, and writing that many bytes to the checkpoint directory + fsync.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MiB = 1 << 20


def build(tmp: Path) -> Path:
    exe = tmp / "tree"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "tree.c")], check=True)
    return exe


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise SystemExit(f"bench/tree.py: timed out waiting for {what}")


def progress(out: Path) -> int:
    try:
        return int(out.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def tree_rss(exe: Path) -> tuple[int, int]:
    """(processes, bytes resident) of every running copy of exe."""
    n = rss = 0
    for p in psutil.process_iter(["exe", "memory_info"]):
        if p.info["exe"] == str(exe) and p.info["memory_info"]:
            n += 1
            rss += p.info["memory_info"].rss
    return n, rss


def cmd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, **kw)


def one_run(exe: Path, procs: int, mb: int, d: Path, env: dict) -> dict:
    out = d / "progress"
    pf = d / "port"
    launch = subprocess.Popen([str(BIN / "dmtcp_launch"), "-p", "0", "--port-file", str(pf), "--ckptdir", str(d),
                               str(exe), str(procs), str(mb), str(out)], stdout=subprocess.PIPE,
                              stderr=open(d / "launch.err", "w"), env=env, cwd=d)
    try:
        assert launch.stdout.readline() == b"ready\n"
        wait_for(lambda: progress(out) > 0, 20, "the pipeline's output")
        nproc, rss = tree_rss(exe)
        t = time.perf_counter()
        r = cmd("dmtcp_command", "--port-file", pf, "-bc", "--json", env=env, timeout=600)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"checkpoint failed: {r.stdout} {r.stderr}")
        ck = json.loads(r.stdout).get("checkpoint", {})
        cmd("dmtcp_command", "--port-file", pf, "-k", env=env, timeout=60)
        launch.wait(60)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    wait_for(lambda: tree_rss(exe)[0] == 0, 30, "the killed pipeline to go")
    gens = sorted(d.glob("ckpt_*/gen*.json"))
    images = [i["path"] for i in json.loads(gens[-1].read_text())["images"]]
    before = progress(out)
    pf2 = d / "port2"
    t = time.perf_counter()
    rst = subprocess.Popen([str(BIN / "dmtcp_restart"), "-p", "0", "--port-file", str(pf2), "--ckptdir", str(d),
                            *images], stdout=subprocess.DEVNULL, stderr=open(d / "restart.err", "w"), env=env, cwd=d)
    try:
        # the pipeline writes its progress file once a second: a count above the checkpoint's means it runs
        wait_for(lambda: progress(out) > before or rst.poll() is not None, 60, "the restarted pipeline")
        restart_wall = time.perf_counter() - t
        engine = None
        for line in (d / "restart.err").read_text().splitlines():
            if "restored" in line and "process(es) in" in line:
                engine = float(line.split("process(es) in")[1].split()[0])
    finally:
        cmd("dmtcp_command", "--port-file", pf2, "-q", env=env, timeout=60)
        rst.wait(60)
    return {"procs": nproc, "rss": rss, "ckpt_wall": wall, "frozen": ck.get("frozen_s"),
            "ckpt_duration": ck.get("duration_s"), "image_bytes": ck.get("bytes_out"), "restore_engine": engine,
            "restart_wall": restart_wall, "images": len(images)}


def floors(n: int, d: Path) -> dict:
    a, b = bytearray(n), bytearray(n)
    a[::4096] = b"\1" * len(a[::4096])
    b[::4096] = b"\1" * len(b[::4096])
    t = time.perf_counter()
    ctypes.memmove((ctypes.c_char * n).from_buffer(b), (ctypes.c_char * n).from_buffer(a), n)
    memcpy = time.perf_counter() - t
    del b
    path = d / "floor.bin"
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    view = memoryview(a)
    for off in range(0, n, 16 * MiB):
        os.write(fd, view[off:off + 16 * MiB])
    os.fsync(fd)
    write = time.perf_counter() - t
    os.close(fd)
    path.unlink()
    return {"memcpy": memcpy, "write_fsync": write}


def mm(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.3f} / {statistics.median(xs):.3f}" if xs else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--sizes", default="16,64", help="MiB touched per process (comma-separated)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "RESULTS-tree.md"))
    ap.add_argument("--dir", default="/var/tmp", help="where checkpoints are written")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMTCP_", "HPCCKPT_"))}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcckpt-tree-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        env["HPCCKPT_RUNDIR"] = str(tmp / "run")
        exe = build(tmp)
        for mb in [int(x) for x in args.sizes.split(",")]:
            runs = []
            for i in range(args.runs):
                d = tmp / f"{mb}-{i}"
                d.mkdir()
                r = one_run(exe, args.procs, mb, d, env)
                print(f"{args.procs} x {mb} MiB run {i + 1}: {r}", flush=True)
                runs.append(r)
            fl = floors(max(r["rss"] for r in runs), tmp)
            rows.append((mb, runs, fl))
    when = time.strftime("%Y-%m-%d %H:%M")
    command = "python bench/tree.py " + shlex.join(sys.argv[1:])
    lines = ["# Process-tree benchmark\n",
             f"Command: `{command}` ({when}, {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, "
             f"checkpoints under {args.dir}).\n",
             "A pipeline of processes joined by pipes (bench/tree.c), checkpointed and restarted with the user "
             "commands (coordinator, agent, forked checkpoint: the defaults). Seconds, min / median of the runs. "
             "*frozen*: the program stopped; *checkpoint*: `dmtcp_command -bc` until every image is durable; "
             "*restore*: the engine's restore of all processes (stopped, then released); *restart*: "
             "`dmtcp_restart` until the pipeline's output moves again (it writes it once a second, so up to 1 s "
             "of this is the program's). Floors for the sum of the processes' resident memory, same run.\n",
             "| processes | resident (sum) | image | frozen | checkpoint | restore | restart | memcpy | write+fsync |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mb, runs, fl in rows:
        r0 = runs[0]
        lines.append(f"| {r0['procs']} × {mb} MiB | {max(r['rss'] for r in runs) / MiB:.0f} MiB | "
                     f"{(r0['image_bytes'] or 0) / MiB:.0f} MiB | {mm([r['frozen'] for r in runs])} | "
                     f"{mm([r['ckpt_wall'] for r in runs])} | {mm([r['restore_engine'] for r in runs])} | "
                     f"{mm([r['restart_wall'] for r in runs])} | {fl['memcpy']:.3f} | {fl['write_fsync']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
