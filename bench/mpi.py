#!/usr/bin/env python3
"""MPI checkpoint/restart benchmark: a 4-rank job on one host and on two hosts, against its ranks' memory.

    .venv/bin/python bench/mpi.py [--ranks 4] [--mb 256] [--runs 3] [--layouts 1,2] [--modes forked,frozen,kc]
                                  [--out bench/RESULTS-mpi.md]

The job is tests/programs/mpiring.c (built with the mpich wheel's mpicc) under `dmtcp_launch mpiexec`, each rank
filling --mb MiB with data that does not compress. Two hosts are simulated hosts of tests/hosts.py (network,
UTS and IPC namespaces with sshd; needs root): mpiexec runs on this machine, half of the ranks on each host,
the ranks talking UCX over TCP between hosts. Per layout, mode and run: `dmtcp_command -bc` (wall time, the time
the ranks were stopped, bytes written), kill, then the restart script until the job writes again; mode kc:
`dmtcp_command -kc` (the checkpoint a job stops after: written frozen), then the restart. Floor, same run:
writing and fsync'ing the images' bytes, and reading them back from the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
MiB = 1 << 20
GiB = 1 << 30
# mode -> (dmtcp_launch options, the checkpoint command): kc is the checkpoint a job stops after (-kc, and the batch
# driver's before a requeue): written frozen although forked is the job's setting
MODES = {"forked": ((), "-bc"), "frozen": (("--no-forked-checkpoint",), "-bc"), "kc": ((), "-kc")}


def lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def wait(cond, timeout: float, what: str, interval: float = 0.02) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"bench: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def agents_cpu() -> float:
    """CPU seconds (user + system, threads that ended included) of every hpcckpt agent of this venv now running
    (launch and join agents; not the coordinator): sampled around the checkpoint, it is what writing cost."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            line = b" ".join(argv)
            if str(BIN).encode() not in line or not (b"dmtcp_launch" in line or b"hpcckpt.cli" in line) or \
                    b"coordinator" in line or b"dmtcp_command" in line:
                continue
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])        # utime, stime
    return total / tick


def command(env: dict, port_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dmtcp_command"), "--port-file", str(port_file), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def one_run(env: dict, work: Path, mpiexec_args: list[str], prog: Path, ranks: int, mb: int,
            launch_args: tuple[str, ...] = (), how: str = "-bc") -> dict:
    out = work / "out.txt"
    port = work / "port.launch"
    log = open(work / "launch.err", "w")
    job = subprocess.Popen([str(BIN / "dmtcp_launch"), "-p", "0", "--port-file", str(port), "--ckptdir", str(work),
                            *launch_args, str(BIN / "mpiexec"), *mpiexec_args, "-n", str(ranks), str(prog), str(out),
                            "1000000", "20", str(mb)], env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait(lambda: lines(out) >= 20, 300, "the job's first steps")
        warm(work, ranks * mb * MiB)
        cpu0 = agents_cpu()
        t = time.perf_counter()
        r = command(env, port, how, "--json")
        ckpt_wall = time.perf_counter() - t
        agent_cpu = agents_cpu() - cpu0
        reply = json.loads(r.stdout)
        if reply.get("command_status") != "DMT_COORD_SUCCESS":
            raise SystemExit(f"bench: checkpoint failed: {reply.get('error')}")
        c = reply["checkpoint"]
        if how != "-kc":                   # (-kc: killed by the coordinator once the images are durable)
            command(env, port, "-k")
        job.wait(60)
    finally:
        if job.poll() is None:
            job.kill()
    seen = lines(out)
    rport = work / "port.restart"
    t = time.perf_counter()
    rjob = subprocess.Popen(["bash", str(work / "dmtcp_restart_script.sh"), "--coord-port", "0", "--port-file",
                             str(rport)], env=env, cwd=work, stdout=subprocess.DEVNULL,
                            stderr=open(work / "restart.err", "w"))
    try:
        wait(lambda: lines(out) > seen or rjob.poll() is not None, 300, "the restarted job to write again")
        restart = time.perf_counter() - t
        if rjob.poll() is not None:
            raise SystemExit(f"bench: the restart failed:\n{(work / 'restart.err').read_text()[-2000:]}")
        command(env, rport, "-k")
        rjob.wait(60)
    finally:
        if rjob.poll() is None:
            rjob.kill()
    return {"ckpt": ckpt_wall, "frozen": c.get("frozen_s", 0.0), "bytes": c.get("bytes_out", 0),
            "images": c.get("images", 0), "restart": restart, "phases": c.get("phase_s", {}),
            "capture": c.get("capture_s", 0.0), "image_s": c.get("write_s", 0.0), "duration": c.get("duration_s", 0.0),
            "agent_cpu": agent_cpu}


def warm(directory: Path, nbytes: int) -> None:
    """Write and delete a file a bit larger than nbytes: on this VM freed memory goes back to the host ~2 s
    after it is freed and costs ~2.5 s/GiB to touch again (bench/run.py --help); the checkpoint and the floor
    both start from recently used page-cache memory."""
    path = directory / "warm.bin"
    block = b"\1" * (16 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(nbytes // len(block) + 16):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


def floor(directory: Path, nbytes: int) -> dict:
    """Write nbytes to a file and fsync - plainly and with write-behind (as the image writers do), the better
    of the two - then read it back (page cache)."""
    from hpcckpt.image.format import write_behind
    path = directory / "floor.bin"
    block = os.urandom(16 * MiB)
    best: tuple[float, float, float] | None = None
    for behind in (False, True):
        warm(directory, nbytes)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        off = 0
        while off < nbytes:
            k = os.write(fd, block[:min(nbytes - off, len(block))])
            if behind:
                write_behind(fd, off, k)
            off += k
        w = time.perf_counter() - t
        os.fsync(fd)
        fs = time.perf_counter() - t - w
        os.close(fd)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        used = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        if best is None or w + fs < best[0] + best[1]:
            best = (w, fs, used)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MiB):
            pass
    rd = time.perf_counter() - t
    path.unlink()
    assert best is not None
    return {"write": best[0], "fsync": best[1], "read": rd, "floor_cpu": best[2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--mb", type=int, default=256, help="MiB of data per rank (default 256)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layouts", default="1,2", help="host counts to run on (default 1,2)")
    ap.add_argument("--dir", default="/var/tmp", help="where images go (default /var/tmp: a disk)")
    ap.add_argument("--modes", default="forked,frozen,kc",
                    help="forked (-bc), frozen (--no-forked-checkpoint, -bc), kc (-kc) (default all three)")
    ap.add_argument("--out", default=str(HERE / "RESULTS-mpi.md"))
    a = ap.parse_args()
    if not (BIN / "mpicc").exists():
        print("bench: needs the PyPI mpich wheel in this venv (pip install mpich mpi4py)", file=sys.stderr)
        return 2
    layouts = [int(x) for x in a.layouts.split(",")]
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="hpcckpt-bench-mpi-", dir=a.dir))
    prog = tmp / "mpiring"
    subprocess.run([str(BIN / "mpicc"), "-O2", "-o", str(prog), str(REPO / "tests" / "programs" / "mpiring.c")],
                   check=True)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    rows = []
    try:
        for nhosts in layouts:
            hosts = None
            try:
                if nhosts == 1:
                    args, e = [], env
                else:
                    from hosts import Hosts
                    hosts = Hosts(n=nhosts, subnet=None).start()
                    per = a.ranks // nhosts
                    args = ["-localhost", hosts.root_name, "-hosts", ",".join(f"{h.name}:{per}" for h in hosts)]
                    e = hosts.ssh_env(env)
                for mode in a.modes.split(","):
                    runs = []
                    for i in range(a.runs):
                        work = tmp / f"h{nhosts}-{mode}-{i}"
                        work.mkdir()
                        r = one_run(e, work, args, prog, a.ranks, a.mb, *MODES[mode])
                        r.update(floor(work, r["bytes"]))
                        r["floor"] = r["write"] + r["fsync"]
                        r["before"] = sum(r["phases"].values())
                        print(f"{nhosts} host(s) {mode} run {i + 1}: checkpoint {r['ckpt']:.2f} s (stopped "
                              f"{r['frozen']:.3f} s), restart {r['restart']:.2f} s, {r['bytes'] / MiB:.0f} MiB in "
                              f"{r['images']} images; floor write {r['write']:.2f} + fsync {r['fsync']:.2f}, read "
                              f"{r['read']:.2f}; coordinator: {r['duration']:.2f} s, phases {r['phases']}, capture "
                              f"{r['capture']:.2f} s, longest image {r['image_s']:.2f} s; CPU s/GiB agents "
                              f"{r['agent_cpu'] / (r['bytes'] / GiB):.2f}, "
                              f"floor {r['floor_cpu'] / (r['bytes'] / GiB):.2f}",
                              flush=True)
                        runs.append(r)
                        shutil.rmtree(work, ignore_errors=True)
                    rows.append((nhosts, mode, runs))
            finally:
                if hosts is not None:
                    hosts.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def mm(runs, key):
        v = [r[key] for r in runs]
        return f"{min(v):.2f} / {statistics.median(v):.2f}"

    cmd = "python bench/mpi.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    text = [f"# MPI benchmark\n\nCommand: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, "
            f"{platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, images in {a.dir}, load average "
            f"{load[0]:.2f} at the start).\n",
            f"{a.ranks} ranks of tests/programs/mpiring.c under the mpich wheel's mpiexec, {a.mb} MiB of "
            f"incompressible data each ({a.ranks * a.mb} MiB in all); two hosts = simulated hosts (tests/hosts.py) "
            f"on this one machine, so both share its 2 cores and its disk. Seconds, min / median of {a.runs} runs. "
            "*forked*: the default (images written from copy-on-write snapshots while the ranks run on); *frozen*: "
            "`--no-forked-checkpoint` (images written while the ranks are stopped); *kc*: the checkpoint a job stops "
            "after, `dmtcp_command -kc` with the default setting (forked): written frozen, then the ranks are killed "
            "(the batch driver's checkpoint before a requeue is written the same way). *checkpoint*: `dmtcp_command "
            "-bc` until every image is durable (kc: `-kc`, until the kill); *in the coordinator*: the same round as "
            "the coordinator timed it (without the command's own start); *phases*: suspend, drain, checkpoint "
            "(capture, snapshots), refill, "
            "resume; *stopped*: how long the ranks did not run; *restart*: restart script until the job writes "
            "again; *floor*: writing the same bytes + fsync (the better of plain and written-behind) in the same "
            "run, right after the checkpoint, and reading them back from the page cache. *vs floor*: median over "
            "the runs of each run's checkpoint over its own floor. Page-cache memory is warmed (a file as large "
            "written and deleted) right before the checkpoint and each floor. *CPU s/GiB*: CPU seconds (user + system) "
            "per GiB of images, of every agent during `-bc` (one host: all of the checkpoint's work; two hosts: both "
            "agents; not for kc: they exit with the job) / of the floor's writer (median over the runs).\n",
            "| hosts | mode | checkpoint | in the coordinator | phases | stopped | restart | images | floor "
            "write+fsync | floor read | checkpoint vs floor | CPU s/GiB agents / floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for nhosts, mode, runs in rows:
        ratio = statistics.median(r["ckpt"] / r["floor"] for r in runs)
        # kc: the ranks are never resumed (no stopped time is reported), and the agents have exited (or are
        # exiting) when -kc returns: their CPU cannot be sampled around it
        kc = mode == "kc"
        agents = "n/a" if kc else f"{statistics.median(r['agent_cpu'] / (r['bytes'] / GiB) for r in runs):.2f}"
        text.append(f"| {nhosts} | {mode} | {mm(runs, 'ckpt')} | {mm(runs, 'duration')} | {mm(runs, 'before')} | "
                    f"{'until killed' if kc else mm(runs, 'frozen')} | {mm(runs, 'restart')} | {runs[0]['images']}, "
                    f"{runs[0]['bytes'] / MiB:.0f} MiB | {mm(runs, 'floor')} | {mm(runs, 'read')} | {ratio:.2f}× | "
                    f"{agents} / {statistics.median(r['floor_cpu'] / (r['bytes'] / GiB) for r in runs):.2f} |")
    Path(a.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
