"""Slurm (issues 5 and 17), against a real Slurm: slurm/local-cluster.sh brings up Debian's slurmctld/slurmd on this
machine. Slurm's own ways into the driver: its warning signal (`scancel -b -s USR1`, as --signal sends it) and a
SIGTERM that is not a cancel (preemption) checkpoint and requeue (`scontrol requeue`, SLURM_RESTART_COUNT in the
rerun) and the job finishes with the output of a plain run; a program failure and an scancel are not requeued;
config errors at submit time; an srun step inside the job.

The job at a real limit (--time=3, ~170 s of work) is in tests/test_sched_realistic.py, side by side with Grid
Engine's and PBS's; the failure paths that do not depend on the scheduler (a failed checkpoint, max_restarts) run
in seconds under the local scheduler (tests/test_sched_local.py, tests/unit/sched/test_driver_policy.py)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, compile_c, run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    r = subprocess.run([str(REPO / "slurm" / "local-cluster.sh"), "up"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    conf = re.search(r"SLURM_CONF=(\S+)", r.stdout).group(1)
    yield {"SLURM_CONF": conf}
    subprocess.run(["scancel", "--user", "root"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True)


@pytest.fixture
def job_dir(tmp_path, build_dir):
    d = Path(tmp_path)
    shutil.copy(compile_c(build_dir, "counter"), d / "counter")
    return d


def _env(env, slurm):
    e = dict(env, **slurm)
    e.pop("HPCCKPT_RUNDIR", None)
    return e


def _job_script(d: Path, steps: int, delay_us: int, exit_code: int = 0) -> Path:
    js = d / "job.sh"
    js.write_text(f"""#!/bin/bash
#SBATCH -J hpcckpt-test
#SBATCH -o {d}/slurm-%j.out
echo "run ${{SLURM_RESTART_COUNT:-0}} starts"
./counter out.txt 8 {steps} {delay_us}
echo "script done"
exit {exit_code}
""")
    js.chmod(0o755)
    return js


def _submit(d: Path, env: dict, config: str, *sbatch_opts: str) -> str:
    (d / "job.yaml").write_text(config)
    r = run(["hpcckpt", "sbatch", "--config", str(d / "job.yaml"), *sbatch_opts, str(d / "job.sh")], env, d)
    assert r.returncode == 0, r.stderr
    return re.search(r"Submitted batch job (\d+)", r.stdout).group(1)


def _show(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def _state(job, env):
    return _show(job, env).get("JobState", "")


def _wait_state(job, env, states, timeout):
    return wait_for(lambda: (lambda s: s if s in states else None)(_state(job, env)), timeout,
                    f"job {job} to reach {states}", interval=0.5)


def _log(d: Path, job: str) -> str:
    p = d / f"slurm-{job}.out"
    return p.read_text() if p.exists() else ""


def _plain(d: Path, steps: int) -> str:
    subprocess.run([str(d / "counter"), str(d / "plain.txt"), "8", str(steps), "0"], check=True,
                   stdout=subprocess.DEVNULL)
    return (d / "plain.txt").read_text()


def _lines(d: Path) -> int:
    p = d / "out.txt"
    return p.read_text().count("\n") if p.exists() else 0


def test_warning_signal_requeues(slurm, job_dir, env):
    e = _env(env, slurm)
    steps = 150
    _job_script(job_dir, steps, 50000)
    job = _submit(job_dir, e, "lead: 30\n", "--time=10")
    wait_for(lambda: _lines(job_dir) >= 20, 60, "progress")
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=e, check=True)
    _wait_state(job, e, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    info, log = _show(job, e), _log(job_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "got SIGUSR1" in log and "requeued" in log
    assert (job_dir / "out.txt").read_text() == _plain(job_dir, steps)


def test_preemption_checkpoints_and_requeues(slurm, job_dir, env):
    """SIGTERM that is not a cancel (what preemption with a grace time sends) checkpoints at once and
    requeues. Stand-in: `scancel -s TERM` signals the job without cancelling it."""
    e = _env(env, slurm)
    steps = 150
    _job_script(job_dir, steps, 50000)
    job = _submit(job_dir, e, "lead: 30\n", "--time=10")
    wait_for(lambda: _lines(job_dir) >= 20, 60, "progress")
    subprocess.run(["scancel", "-b", "-s", "TERM", job], env=e, check=True)
    _wait_state(job, e, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    info, log = _show(job, e), _log(job_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "preemption" in log
    assert (job_dir / "out.txt").read_text() == _plain(job_dir, steps)


def test_program_failure_is_not_requeued(slurm, job_dir, env):
    e = _env(env, slurm)
    _job_script(job_dir, 20, 10000, exit_code=3)
    job = _submit(job_dir, e, "lead: 30\n", "--time=10")
    _wait_state(job, e, {"COMPLETED", "FAILED"}, 60)
    info, log = _show(job, e), _log(job_dir, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", log
    assert "ended with exit code 3; not requeueing" in log


def test_scancel_is_not_requeued(slurm, job_dir, env):
    e = _env(env, slurm)
    _job_script(job_dir, 100000, 50000)
    job = _submit(job_dir, e, "lead: 30\n", "--time=10")
    wait_for(lambda: _lines(job_dir) >= 10, 60, "progress")
    subprocess.run(["scancel", job], env=e, check=True)
    _wait_state(job, e, {"CANCELLED"}, 60)
    time.sleep(4)                 # a wrong requeue would show up by now (sched_interval=1, no requeue delay)
    info = _show(job, e)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    assert subprocess.run(["pgrep", "-f", f"{job_dir}/counter"], capture_output=True).stdout == b""


def test_config_errors_at_submit_time(slurm, job_dir, env):
    e = _env(env, slurm)
    _job_script(job_dir, 10, 0)
    for text, msg in (("lead: soon\n", "lead must be"), ("intervall: 3\n", "unknown key 'intervall'"),
                      ("on_preempt: panic\n", "on_preempt must be one of")):
        (job_dir / "bad.yaml").write_text(text)
        r = run(["hpcckpt", "sbatch", "--config", str(job_dir / "bad.yaml"), str(job_dir / "job.sh")], e, job_dir)
        assert r.returncode == 99 and msg in r.stderr
    r = run(["hpcckpt", "sbatch", "--dry-run", "--time=5", str(job_dir / "job.sh")], e, job_dir)
    assert r.returncode == 0 and "#SBATCH -J hpcckpt-test" in r.stdout and "--requeue" in r.stdout
    assert "#SBATCH --open-mode=append" in r.stdout and "--signal=B:USR1@" in r.stdout


def test_srun_inside_the_job_is_checkpointed_and_requeued(slurm, job_dir, env):
    """The job script starts its other half with `srun` (a job step): through our srun shim it runs under an
    agent of the same computation, talking TCP with the first half. USR1 checkpoints both, the job requeues,
    and the next run restarts both parts (each in an agent of its own) and finishes: every answer once, in
    order, across the two runs. (The local cluster's nodes are all this machine: the step lands here.)"""
    import sys
    e = _env(env, slurm)
    prog = REPO / "tests" / "programs" / "pingpong.py"
    n = 160
    js = job_dir / "job.sh"
    js.write_text(f"""#!/bin/bash
#SBATCH -J hpcckpt-srun
#SBATCH -o {job_dir}/slurm-%j.out
echo "run ${{SLURM_RESTART_COUNT:-0}} starts"
{sys.executable} {prog} server {job_dir}/server.port &
srun -n 1 {sys.executable} {prog} client 127.0.0.1 {job_dir}/server.port {n} > {job_dir}/client.out
rc=$?
wait
echo "script done $rc"
""")
    js.chmod(0o755)
    job = _submit(job_dir, e, "lead: 30\n", "--time=10")
    client = job_dir / "client.out"

    def answers():
        return [int(x) for x in re.findall(r"^ok (\d+)", client.read_text() if client.exists() else "", re.M)]
    wait_for(lambda: len(answers()) >= 20, 90, "the srun step's answers")
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=e, check=True)
    _wait_state(job, e, {"COMPLETED", "FAILED", "CANCELLED"}, 150)
    info, log = _show(job, e), _log(job_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "script done 0" in log, log
    # client.out is opened again (truncated) by nobody after the restart: the restored client writes on
    # where it was, so the file holds every answer exactly once, in order.
    assert answers() == list(range(1, n + 1)), client.read_text()[-500:]
    assert client.read_text().rstrip().endswith("done")
