"""Many processes of one computation on one host (issue 20): a tree of 48 processes with a pipe from each to
its parent and distinct memory in each checkpoints, is killed, restarts, and every process checks its own
state (memory, pid, parent, the sequence of records in each pipe). bench/many.py runs the same program with
256 processes and times it."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import checkpoint_and_kill, compile_c, restart_in_background, wait_for

N = 48


def _lines(out: Path, kind: str) -> set[int]:
    text = out.read_text() if out.exists() else ""
    return {int(m.group(1)) for m in re.finditer(rf"^{kind} (\d+)", text, re.M)}


@contextlib.contextmanager
def _restarted(env, tmp_path: Path):
    """The restart script in the background; whatever happens, the restored computation is killed after."""
    job = restart_in_background(tmp_path / "dmtcp_restart_script.sh", env, tmp_path)
    try:
        yield job
    finally:
        if job.proc.poll() is None:
            job.command("-k")
            try:
                job.wait(30)
            except subprocess.TimeoutExpired:
                job.kill()


def _ticked_since(out: Path, t0_ms: int) -> set[int]:
    """The processes that wrote a tick at or after t0_ms (wall clock)."""
    return {int(m.group(1)) for m in re.finditer(r"^tick (\d+) \d+ (\d+)", out.read_text(), re.M)
            if int(m.group(2)) >= t0_ms}


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


def _untraced(pid: int) -> bool:
    try:
        return "\nTracerPid:\t0\n" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _bad(out: Path) -> list[str]:
    return [x for x in out.read_text().splitlines() if x.startswith("BAD")][:5]


@pytest.mark.slow
def test_tree_of_48_processes_with_pipes_restarts(launch, env, tmp_path, build_dir):
    prog = compile_c(build_dir, "many")
    out = tmp_path / "out.txt"
    job = launch(prog, out, N, 64, 50, 4)
    wait_for(lambda: len(_lines(out, "ready")) == N, 60, f"all {N} processes to start")
    wait_for(lambda: len(json.loads(job.command("-l", "--json").stdout)["peers"]) >= N, 30,
             f"all {N} processes to be listed")
    reply = checkpoint_and_kill(job)
    assert reply["command_status"] == "DMT_COORD_SUCCESS", reply
    assert not _bad(out), _bad(out)

    t0 = int(time.time() * 1000)
    with _restarted(env, tmp_path) as job2:
        # (the restart cuts out.txt back to its size at the checkpoint: restored ticks are told by wall time)
        wait_for(lambda: _ticked_since(out, t0) == set(range(N)), 60,
                 f"every one of the {N} restored processes to run again")
        (tmp_path / "out.txt.stop").touch()
        assert job2.wait(60) == 0
    text = out.read_text()
    assert not _bad(out), _bad(out)
    exits = {int(m.group(1)) for m in re.finditer(r"^exit (\d+) ok", text, re.M)}
    assert exits == set(range(N)), f"processes that did not exit cleanly: {sorted(set(range(N)) - exits)}"
    assert text.rstrip().endswith(f"done {N}")


def test_signal_dispositions_survive_with_fewer_injected_calls(launch, env, tmp_path, build_dir):
    """Only caught and ignored signals (and SIGCHLD) are read from inside the process at a checkpoint and only
    those that differ from the restore helper's are written back: a caught handler with its flags and mask,
    ignored signals, SIGCHLD's SA_NOCLDWAIT under SIG_DFL and every other signal at SIG_DFL (not the helper's
    inherited SIG_IGN) all come back."""
    prog = compile_c(build_dir, "sigdisp")
    out = tmp_path / "out.txt"
    job = launch(prog, out)
    wait_for(lambda: out.exists() and out.read_text().count("ok ") >= 3, 30, "the program's first checks")
    checkpoint_and_kill(job)
    with _restarted(env, tmp_path):
        pids = wait_for(lambda: [int(p) for p in os.listdir("/proc") if p.isdigit()
                                 and _cmdline(int(p)) == [str(prog), str(out)] and _untraced(int(p))], 30,
                        "the restored process, let go by the restart")
        assert len(pids) == 1, pids           # (its pid in our namespace: the job has its own)
        os.kill(pids[0], signal.SIGUSR1)
        # (the restart cuts out.txt back to its checkpoint size: "usr1" and what follows are the restored one's)
        wait_for(lambda: "usr1\nok " in out.read_text(), 10, "the restored SIGUSR1 handler to run, then a check")
    assert not _bad(out), _bad(out)
