"""Slurm (issues 5 and 17), against a real Slurm: slurm/local-cluster.sh brings up Debian's slurmctld/slurmd on this
machine. A job longer than its wall time checkpoints before the limit, requeues itself and finishes with the
output of a plain run; signals, preemption, cancel, program failure, failed checkpoints and max_restarts."""
from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def long_job(slurm, tmp_path_factory, build_dir):
    """The realistic-length job (issue 17): --time=3, lead 20 s, ~170 s of work. Submitted by the first test of
    the module so that it runs while the others do (the node has 2 CPUs); the last test checks it."""
    from conftest import BIN
    d = tmp_path_factory.mktemp("slurm-long")
    shutil.copy(compile_c(build_dir, "counter"), d / "counter")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DMTCP_", "HPCCKPT_"))}
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e.update(slurm)
    steps = 1700
    _job_script(d, steps, 100000)
    job = _submit(d, e, "lead: 20\nmin_lead: 5\n", "--time=3")
    return d, job, e, steps, time.monotonic()


def test_realistic_length_job_is_submitted_first(long_job):
    d, job, e, _, _ = long_job
    assert _state(job, e) in ("PENDING", "RUNNING", "CONFIGURING")


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
    time.sleep(8)                                   # a wrong requeue would show up by now
    info = _show(job, e)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    assert subprocess.run(["pgrep", "-f", f"{job_dir}/counter"], capture_output=True).stdout == b""


def test_failed_checkpoint_is_not_requeued(slurm, job_dir, env):
    """A checkpoint that fails (disk full, injected) keeps the previous one, says so, and does not requeue:
    the program simply runs on."""
    e = _env(env, slurm)
    e["HPCCKPT_FAULT"] = "dump.after_chunk:error=ENOSPC"
    steps = 120
    _job_script(job_dir, steps, 50000)
    job = _submit(job_dir, e, "lead: 30\n", "--time=10", "--export=ALL")
    wait_for(lambda: _lines(job_dir) >= 20, 60, "progress")
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=e, check=True)
    _wait_state(job, e, {"COMPLETED", "FAILED"}, 120)
    info, log = _show(job, e), _log(job_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "checkpoint failed" in log and "No space left on device" in log and "not requeueing" in log
    assert (job_dir / "out.txt").read_text() == _plain(job_dir, steps)


def test_max_restarts(slurm, job_dir, env):
    e = _env(env, slurm)
    steps = 200
    _job_script(job_dir, steps, 50000)
    job = _submit(job_dir, e, "lead: 30\nmax_restarts: 1\n", "--time=10")
    wait_for(lambda: _lines(job_dir) >= 20, 60, "progress")
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=e, check=True)
    wait_for(lambda: "run 1" in _log(job_dir, job) and "restored" in _log(job_dir, job), 60, "the rerun")
    n = _lines(job_dir)
    wait_for(lambda: _lines(job_dir) > n + 10, 60, "progress after the rerun")
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=e, check=True)
    _wait_state(job, e, {"COMPLETED", "FAILED"}, 120)
    info, log = _show(job, e), _log(job_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "max_restarts (1) reached" in log
    assert (job_dir / "out.txt").read_text() == _plain(job_dir, steps)


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


def test_realistic_length_job_checkpoints_before_the_limit_and_completes(long_job):
    """--time=3 (180 s) with ~170 s of work: the first run checkpoints ~20 s before the limit (its own deadline
    from EndTime, or the --signal warning, whichever comes first), requeues, and the second run restarts and
    finishes soon after; the output equals a plain run's and the log says how long before the limit."""
    d, job, e, steps, started = long_job
    _wait_state(job, e, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 480)
    print(f"Slurm --time=3 job done {time.monotonic() - started:.0f} s after its submission")
    info = _show(job, e)
    log = _log(d, job)
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) >= 1, log
    assert "wall-time deadline: checkpointing" in log or "warning signal: checkpointing" in log, log
    assert "run 0 starts" in log and "script done" in log
    assert (d / "out.txt").read_text() == _plain(d, steps)
    left = [int(x) for x in re.findall(r"checkpoint generation \d+: [\d.]+ s, [\d.]+ MB.*, (\d+) s left before the "
                                       r"limit", log)]
    assert left and min(left) >= 5, log
    # what the job left behind, at a glance (hpcckpt status): its runs, the requeue, the generation restarted from
    st = json.loads(run(["hpcckpt", "status", "--json", str(d / f"hpcckpt-{job}")], e, d, check=True).stdout)
    assert st["batch"]["job"] == job and st["batch"]["runs"] >= 2 and st["batch"]["requeues"] >= 1, st["batch"]
    assert st["batch"]["finished"]["code"] == 0
    assert any(g["state"] == "complete" for c in st["computations"] for g in c["generations"])
