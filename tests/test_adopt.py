"""hpcckpt adopt: a process started plainly is taken over so that the batch driver's deadline logic applies to it
(cli/adopt.py). Without a cluster: the deadline comes from --deadline, and there is no scheduler to requeue to
(--scheduler none), so the continuation is a `hpcckpt restart --from DIR` the test runs itself."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import line_count, run, wait_for

MB, STEPS, DELAY = 8, 300, 30000       # ~9 s plainly with the delay


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "adopt.yaml"
    cfg.write_text("lead: 3\nmin_lead: 1\n")
    return cfg


@pytest.mark.slow
def test_adopted_program_is_checkpointed_at_the_deadline_killed_and_restarted(counter, plain_run, env, tmp_path):
    expected = plain_run(MB, STEPS)
    out = tmp_path / "out.txt"
    prog = subprocess.Popen([str(counter), str(out), str(MB), str(STEPS), str(DELAY)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    wait_for(lambda: line_count(out) >= 20, 30, "20 steps")
    d = tmp_path / "ckpt"
    r = run(["hpcckpt", "adopt", str(prog.pid), "--ckptdir", str(d), "--config", str(_config(tmp_path)),
             "--deadline", "+7", "--scheduler", "none"], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert prog.wait(10) == -9                                  # the original: killed at the hand-over
    log = (d / "hpcckpt-job.log").read_text()
    assert "wall-time deadline: checkpointing" in log
    gens = sorted(int(p.name[3:9]) for p in d.glob("ckpt_*/gen*.json"))
    assert gens[-1] >= 2 and len(list(d.glob("ckpt_*"))) == 1   # the dump's, then the deadline's
    n = line_count(out)
    assert 20 <= n < STEPS
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(d), "--from", str(d)], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == expected


@pytest.mark.slow
def test_adopted_program_that_ends_gives_its_exit_to_the_original(counter, plain_run, env, tmp_path):
    """No deadline within the run: the copy finishes; the stopped original ends with its status, so whoever
    waits for it (the job's script) sees the program's own exit."""
    expected = plain_run(MB, 150)
    out = tmp_path / "out.txt"
    prog = subprocess.Popen([str(counter), str(out), str(MB), "150", str(DELAY)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    wait_for(lambda: line_count(out) >= 10, 30, "10 steps")
    r = run(["hpcckpt", "adopt", str(prog.pid), "--ckptdir", str(tmp_path / "ckpt"), "--deadline", "+3600",
             "--scheduler", "none"], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert prog.wait(10) == 0
    assert out.read_text() == expected


def test_adopt_outside_a_job_without_deadline_is_one_line(env, tmp_path):
    r = run(["hpcckpt", "adopt", "1"], env, tmp_path)
    assert r.returncode == 99 and "--deadline" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_copy_that_cannot_start_leaves_the_original_running(counter, plain_run, env, tmp_path):
    """The restore of the copy fails (fault point): the stopped originals are let go, untouched, and finish."""
    expected = plain_run(MB, 150)
    out = tmp_path / "out.txt"
    prog = subprocess.Popen([str(counter), str(out), str(MB), "150", str(DELAY)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    wait_for(lambda: line_count(out) >= 10, 30, "10 steps")
    r = run(["hpcckpt", "adopt", str(prog.pid), "--ckptdir", str(tmp_path / "ckpt"), "--deadline", "+3600",
             "--scheduler", "none"], dict(env, HPCCKPT_FAULT="restore.before_release:error=EIO"), tmp_path,
            timeout=120)
    assert r.returncode == 99, r.stderr[-3000:]
    assert "run on as before" in r.stderr.strip().splitlines()[-1]
    assert prog.wait(30) == 0
    assert out.read_text() == expected


def test_continuation_job_restarts_from_the_checkpoint_after_this_one(tmp_path):
    """At the deadline an adopted job submits a continuation that waits for it (the job's own script knows
    nothing of hpcckpt, so a requeue would start the program afresh): the batch wrapper of hpcckpt sbatch,
    restarting from the adoption's checkpoint directory."""
    from hpcckpt.cli.adopt import Adopted
    from hpcckpt.sched.base import Requeued
    from hpcckpt.sched.config import JobConfig
    from hpcckpt.sched.slurm import Slurm

    class Slurmish(Slurm):            # the real adapter's submit side (directives, dependency), a stub job
        submitted: list = []

        @classmethod
        def detect(cls, env): return True
        def job_id(self): return "77"
        def run_count(self): return 0
        def end_time(self): return None
        def requeue(self): raise AssertionError("an adopted job is never requeued")

        def submit(self, script_path, options, cwd):
            self.submitted.append((open(script_path).read(), options))
            return "78"

    d = tmp_path / "ckpt"
    d.mkdir()
    inner = Slurmish({})
    a = Adopted(inner, None, str(d), None, JobConfig(interval=600), ["--time=1:00:00"], 1234)
    assert a.requeue() == Requeued(0, "78") and a.continuation == "78"
    text, opts = inner.submitted[0]
    assert opts == ["--dependency=afterany:77", "--open-mode=append", "--time=1:00:00"]
    assert "batch-run --scheduler slurm --config" in text and str(d / "adopted-job.yaml") in text
    assert f"ckptdir: {d}" in (d / "adopted-job.yaml").read_text()
    assert "interval: 600" in (d / "adopted-job.yaml").read_text()
