#!/usr/bin/env python3
"""Many real processes of one computation on one host: checkpoint and restart times against the write floor.

    .venv/bin/python bench/many.py [--procs 256] [--kb 1024] [--runs 3] [--out bench/RESULTS-many.md]

The computation is tests/programs/many.c under `dmtcp_launch`: a tree of --procs processes (each forks up to
3 children), a pipe from each process to its parent carrying a record every 50 ms, --kb KiB of distinct
data in each. Per run: `dmtcp_command -bc` (wall time, the time the processes were stopped, bytes written),
kill, then the restart script until every one of the processes has run again (each checks its memory, pid,
parent and pipe sequence and reports), then the processes are told to stop and must all exit cleanly.
Floor, same run: writing and fsync'ing the images' bytes (bench/mpi.py's floor).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))
from mpi import floor, wait, warm  # noqa: E402

MiB = 1 << 20


def seen(out: Path, kind: str) -> set[int]:
    try:
        text = out.read_text()
    except OSError:
        return set()
    return {int(m.group(1)) for m in re.finditer(rf"^{kind} (\d+)", text, re.M)}


def ticked_since(out: Path, t0_ms: int) -> int:
    """How many processes wrote a tick at or after t0_ms (the restart cuts the file back to its size at the
    checkpoint, so a tick is told restored by its wall time)."""
    return len({int(m.group(1)) for m in re.finditer(r"^tick (\d+) \d+ (\d+)", out.read_text(), re.M)
                if int(m.group(2)) >= t0_ms})


def command(env: dict, port_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dmtcp_command"), "--port-file", str(port_file), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def one_run(env: dict, work: Path, prog: Path, procs: int, kb: int) -> dict:
    out = work / "out.txt"
    port = work / "port.launch"
    t = time.perf_counter()
    job = subprocess.Popen([str(BIN / "dmtcp_launch"), "-p", "0", "--port-file", str(port), "--ckptdir", str(work),
                            str(prog), str(out), str(procs), str(kb), "50", "4"], env=env, cwd=work,
                           stdout=subprocess.DEVNULL, stderr=open(work / "launch.err", "w"))
    try:
        wait(lambda: len(seen(out, "ready")) == procs, 300, f"all {procs} processes to start")
        wait(lambda: port.exists() and len(json.loads(command(env, port, "-l", "--json").stdout or "{}")
                                           .get("peers", [])) >= procs, 300, "every process to be listed",
             interval=0.2)
        launch = time.perf_counter() - t
        warm(work, procs * kb * 1024)
        t = time.perf_counter()
        r = command(env, port, "-bc", "--json")
        ckpt_wall = time.perf_counter() - t
        reply = json.loads(r.stdout)
        if reply.get("command_status") != "DMT_COORD_SUCCESS":
            raise SystemExit(f"bench: checkpoint failed: {reply.get('error')}")
        c = reply["checkpoint"]
        command(env, port, "-k")
        job.wait(120)
    finally:
        if job.poll() is None:
            job.kill()
    rport = work / "port.restart"
    t = time.perf_counter()
    t0_ms = int(time.time() * 1000)
    rjob = subprocess.Popen(["bash", str(work / "dmtcp_restart_script.sh"), "--coord-port", "0", "--port-file",
                             str(rport)], env=env, cwd=work, stdout=subprocess.DEVNULL,
                            stderr=open(work / "restart.err", "w"))
    try:
        wait(lambda: ticked_since(out, t0_ms) == procs or rjob.poll() is not None, 300,
             "every restored process to run again")
        restart = time.perf_counter() - t
        if rjob.poll() is not None:
            raise SystemExit(f"bench: the restart failed:\n{(work / 'restart.err').read_text()[-2000:]}")
        (work / "out.txt.stop").touch()
        rc = rjob.wait(120)
    finally:
        if rjob.poll() is None:
            rjob.kill()
    text = out.read_text()
    bad = [x for x in text.splitlines() if x.startswith("BAD")]
    if rc != 0 or bad or len(seen(out, "exit")) != procs:
        raise SystemExit(f"bench: the restored computation went wrong (rc {rc}): {bad[:5]}")
    return {"launch": launch, "ckpt": ckpt_wall, "frozen": c.get("frozen_s", 0.0), "bytes": c.get("bytes_out", 0),
            "images": c.get("images", 0), "restart": restart, "duration": c.get("duration_s", 0.0),
            "before": sum((c.get("phase_s") or {}).values())}


def floor_files(directory: Path, nbytes: int, n: int) -> float:
    """The same bytes as n files, each written, fsync'ed and renamed in turn (what n images cost the disk)."""
    block = os.urandom(max(1, nbytes // n))
    warm(directory, nbytes)
    t = time.perf_counter()
    for i in range(n):
        tmp = directory / f"floor{i}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, directory / f"floor{i}")
    dfd = os.open(directory, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    took = time.perf_counter() - t
    for i in range(n):
        (directory / f"floor{i}").unlink()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=256)
    ap.add_argument("--kb", type=int, default=1024, help="KiB of distinct data per process (default 1024)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="where images go (default /var/tmp: a disk)")
    ap.add_argument("--out", default=str(HERE / "RESULTS-many.md"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpcckpt-bench-many-", dir=a.dir))
    prog = tmp / "many"
    subprocess.run(["gcc", "-O2", "-o", str(prog), str(REPO / "tests" / "programs" / "many.c")], check=True)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    runs = []
    load = os.getloadavg()
    try:
        for i in range(a.runs):
            work = tmp / f"run{i}"
            work.mkdir()
            r = one_run(env, work, prog, a.procs, a.kb)
            r.update(floor(work, r["bytes"]))
            r["floor"] = r["write"] + r["fsync"]
            r["floor_n"] = floor_files(work, r["bytes"], r["images"])
            print(f"run {i + 1}: launch {r['launch']:.2f} s, checkpoint {r['ckpt']:.2f} s "
                  f"(stopped {r['frozen']:.3f} s), "
                  f"restart {r['restart']:.2f} s, {r['bytes'] / MiB:.0f} MiB in {r['images']} images; floor "
                  f"write+fsync {r['floor']:.2f} s ({r['ckpt'] / r['floor']:.1f}x), as {r['images']} files "
                  f"{r['floor_n']:.2f} s ({r['ckpt'] / r['floor_n']:.1f}x); coordinator {r['duration']:.2f} s, phases "
                  f"{r['before']:.2f} s", flush=True)
            runs.append(r)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def mm(key: str) -> str:
        v = [r[key] for r in runs]
        return f"{min(v):.2f} / {statistics.median(v):.2f}"

    ratio = statistics.median(r["ckpt"] / r["floor"] for r in runs)
    ratio_n = statistics.median(r["ckpt"] / r["floor_n"] for r in runs)
    cmd = "python bench/many.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    text = [f"# Many processes on one host\n\nCommand: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, "
            f"{platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, images in {a.dir}, "
            f"load average {load[0]:.2f} at the start).\n",
            f"{a.procs} processes of tests/programs/many.c (a tree, fan-out 3, a pipe from each process to its "
            f"parent with a record every 50 ms, {a.kb} KiB of distinct data each). Seconds, min / median of "
            f"{a.runs} runs. *launch*: `dmtcp_launch` until every process is running and listed; *checkpoint*: "
            "`dmtcp_command -bc` until every image is durable; *stopped*: how long the processes did not run; "
            "*in the coordinator*: the same round as the coordinator timed it; *phases*: suspend, drain, checkpoint, "
            "refill, resume (everything before the images are written); "
            "*restart*: restart script until every process has run again (each checks its memory, pid, parent "
            "and pipe sequence); *floor*: writing the same bytes + fsync in the same run (bench/mpi.py's floor: "
            "one file); *floor, N files*: the same bytes as one file per image, each written, fsync'ed and renamed "
            "in turn; the ratios are medians of each run's checkpoint over its own floors.\n",
            "| processes | launch | checkpoint | in the coordinator | phases | stopped | restart | images | "
            "floor write+fsync | floor, N files | vs floor | vs floor, N files |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {a.procs} | {mm('launch')} | {mm('ckpt')} | {mm('duration')} | {mm('before')} | {mm('frozen')} | "
            f"{mm('restart')} | {runs[0]['images']}, {runs[0]['bytes'] / MiB:.0f} MiB | {mm('floor')} | "
            f"{mm('floor_n')} | {ratio:.1f}× | {ratio_n:.1f}× |"]
    Path(a.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
