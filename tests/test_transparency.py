"""Transparency (issue 16): what a program can tell about being checkpointed.

- Blocking calls: a checkpoint stops every thread the way a stop signal does, and on Linux some calls
  (epoll_wait, semop, sigtimedwait, SO_RCVTIMEO sockets...) then fail with EINTR even without a handler. The
  engine re-issues them: the program sees no EINTR, neither in the running job nor after a restart.
- MAP_NORESERVE reservations (Go, Java, sanitizers) come back as reservations, with their PROT_NONE guards.
- A descriptor open on /proc/PID/... of a job process is reopened for the restored process.
Each with a small C program, through two or more checkpoint/restart rounds, compared with a plain run.
"""
from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from conftest import checkpoint_and_kill, compile_c, line_count, restart_in_background, run, wait_for


@pytest.fixture
def sem_key():
    """A SysV semaphore key for one test; the set is removed afterwards (a killed job leaves it behind)."""
    key = random.randrange(0x10000000, 0x7FFFFF00)
    yield key
    subprocess.run(["ipcrm", "-S", hex(key)], capture_output=True)


def _plain(prog: Path, out: Path, *args) -> str:
    r = subprocess.run([str(prog), str(out), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, out.read_text()[-500:] if out.exists() else "")
    return out.read_text()


def _rounds(launch, env, tmp_path: Path, out: Path, cmd: list, rounds: int, extra=(), live_checkpoints: int = 2,
            min_lines: int = 3) -> subprocess.CompletedProcess:
    """launch, then `rounds` times: checkpoint (after `live_checkpoints` - 1 checkpoints the running job goes on
    from) -> kill -> restart; the last restart runs to the end. Returns the last restart's result."""
    job = launch(*cmd, extra=extra)
    script = tmp_path / "dmtcp_restart_script.sh"
    for rnd in range(rounds):
        n = line_count(out)
        wait_for(lambda: line_count(out) >= n + min_lines, 60, f"progress in round {rnd + 1}")
        for _ in range(live_checkpoints - 1):       # the job goes on after these: EINTR would show at once
            r = job.command("-bc")
            assert r.returncode == 0, (r.stdout, r.stderr, out.read_text()[-300:])
            time.sleep(0.15)
        checkpoint_and_kill(job)
        assert "Interrupted" not in out.read_text()
        if rnd < rounds - 1:
            job = restart_in_background(script, env, tmp_path)
    return run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=300)


@pytest.mark.parametrize("mode", ["forked", pytest.param("frozen", marks=pytest.mark.slow),
                                  pytest.param("incremental", marks=pytest.mark.slow)])
def test_blocking_calls_never_see_eintr(mode, launch, env, tmp_path, build_dir, sem_key):
    """Twelve threads, each blocked in another call (semop, epoll_wait, poll, select, read on a pipe, futex
    wait, nanosleep, clock_nanosleep, accept, recv with SO_RCVTIMEO, waitpid, sigtimedwait), checkpointed while
    running on and before each kill, through two restarts: no call ever fails with EINTR, output as a plain
    run's. Forked and frozen checkpoints, and incremental ones (write tracking arms a userfaultfd by
    injection)."""
    prog = compile_c(build_dir, "blockers", "-pthread")
    ticks = 45
    expected = _plain(prog, tmp_path / "plain.txt", ticks, sem_key)
    extra = {"forked": (), "frozen": ("--no-forked-checkpoint",), "incremental": ("--incremental",)}[mode]
    out = tmp_path / "out.txt"
    r = _rounds(launch, env, tmp_path, out, [prog, out, ticks, sem_key], rounds=2, extra=extra)
    assert r.returncode == 0, (r.stderr[-1000:], out.read_text()[-300:])
    assert out.read_text() == expected
