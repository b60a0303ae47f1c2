"""The local scheduler end to end with the real engine (issue 18): `hpcckpt qsub --scheduler local` submits an
ordinary script; the job (a process group with a wall time the local scheduler enforces) is checkpointed before
its limit, requeued, restarted from the checkpoint and finishes with the output of a plain run. And the
driver's failure paths with the real engine, in seconds instead of a Slurm job's minute: a checkpoint that
fails (injected ENOSPC) keeps the program running without requeue; max_restarts stops requeueing."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run, wait_for

pytestmark = pytest.mark.slow


def _submit(env: dict, d: Path, counter: Path, steps: int, delay_us: int, config: str, *opts: str) -> tuple[str, Path]:
    (d / "job.sh").write_text(f"#!/bin/bash\ncd {d}\necho \"run $HPCCKPT_LOCAL_RUN starts\"\n"
                              f"{counter} out.txt 8 {steps} {delay_us}\necho script done\n")
    (d / "job.yaml").write_text(config)
    e = dict(env, HPCCKPT_LOCAL_SPOOL=str(d / "spool"))
    e.pop("HPCCKPT_RUNDIR", None)
    r = run(["hpcckpt", "qsub", "--scheduler", "local", "--config", str(d / "job.yaml"), "-o", str(d / "job.log"),
             *opts, str(d / "job.sh")], e, d)
    assert r.returncode == 0, r.stderr
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    return job, d / "spool" / job


def _state(jobdir: Path) -> dict:
    try:
        return json.loads((jobdir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _done(jobdir: Path, timeout: float) -> dict:
    return wait_for(lambda: (lambda s: s if s.get("state") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                             else None)(_state(jobdir)), timeout, "the local job to end", interval=0.2)


def _plain(counter: Path, d: Path, steps: int) -> str:
    subprocess.run([str(counter), str(d / "plain.txt"), "8", str(steps), "0"], check=True, stdout=subprocess.DEVNULL)
    return (d / "plain.txt").read_text()


def _lines(d: Path) -> int:
    p = d / "out.txt"
    return p.read_text().count("\n") if p.exists() else 0


def test_a_job_longer_than_its_wall_time_checkpoints_requeues_and_completes(env, tmp_path, counter):
    steps = 120
    job, jobdir = _submit(env, tmp_path, counter, steps, 50000, "lead: 4\nmin_lead: 0\n", "--time=9")
    st = _done(jobdir, 90)
    log = (tmp_path / "job.log").read_text()
    assert st["state"] == "COMPLETED" and st["runs"] >= 1, log
    assert "wall-time deadline: checkpointing" in log and "requeued" in log, log
    assert "restarting from checkpoint generation" in log and "script done" in log, log
    left = [int(x) for x in re.findall(r"(\d+) s left before the limit", log)]
    assert left and min(left) >= 1, log
    assert (tmp_path / "out.txt").read_text() == _plain(counter, tmp_path, steps)


def test_a_failed_checkpoint_keeps_the_program_running_without_requeue(env, tmp_path, counter):
    """The real engine's checkpoint fails (ENOSPC injected while writing): the previous checkpoint (none) is
    kept, the job is not requeued, the program runs on to the end with the output of a plain run."""
    steps = 80
    job, jobdir = _submit(dict(env, HPCCKPT_FAULT="dump.after_chunk:error=ENOSPC"), tmp_path, counter, steps, 50000,
                          "lead: 0\n")
    wait_for(lambda: _lines(tmp_path) >= 10, 60, "progress")
    os.kill(_state(jobdir)["pid"], signal.SIGUSR1)
    st = _done(jobdir, 60)
    log = (tmp_path / "job.log").read_text()
    assert st["state"] == "COMPLETED" and st["runs"] == 0, log
    assert "checkpoint failed" in log and "No space left on device" in log and "not requeueing" in log, log
    assert (tmp_path / "out.txt").read_text() == _plain(counter, tmp_path, steps)


def test_max_restarts(env, tmp_path, counter):
    steps = 100
    job, jobdir = _submit(env, tmp_path, counter, steps, 50000, "lead: 0\nmax_restarts: 1\n")
    wait_for(lambda: _lines(tmp_path) >= 10, 60, "progress")
    os.kill(_state(jobdir)["pid"], signal.SIGUSR1)
    wait_for(lambda: _state(jobdir).get("runs") == 1 and "restored" in (tmp_path / "job.log").read_text(), 60,
             "the rerun")
    n = _lines(tmp_path)
    wait_for(lambda: _lines(tmp_path) > n + 5, 60, "progress after the rerun")
    t0 = time.monotonic()
    os.kill(_state(jobdir)["pid"], signal.SIGUSR1)
    st = _done(jobdir, 60)
    log = (tmp_path / "job.log").read_text()
    assert st["state"] == "COMPLETED" and st["runs"] == 1, log
    assert "max_restarts (1) reached" in log, log
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "out.txt").read_text() == _plain(counter, tmp_path, steps)
