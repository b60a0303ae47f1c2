"""The batch driver's policy in seconds, without a cluster (issue 18): real jobs of the local scheduler
(hpcckpt/sched/local.py: a process group, a wall time enforced by SIGTERM then SIGKILL, requeue = rerun) run the
real JobDriver; only the computation is a stand-in (standin_job.py: a real process whose progress a checkpoint
records and a restart resumes). Deadline and lead, the warning signal, preemption, cancel, program failure,
failed checkpoints, max_restarts and the node mapping of a rerun on another allocation."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from hpcckpt.sched.local import STATES_DONE, Local, read_state

HERE = Path(__file__).resolve().parent


@pytest.fixture
def local(tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    monkeypatch.setenv("HPCCKPT_LOCAL_SPOOL", str(spool))
    monkeypatch.delenv("HPCCKPT_RUNDIR", raising=False)
    monkeypatch.delenv("HPCCKPT_CKPTDIR", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return Local()


class Job:
    def __init__(self, sched: Local, d: Path, config: str, work: float, *options: str, exit_code: int = 0):
        self.sched, self.d = sched, d
        (d / "job.yaml").write_text(config)
        (d / "job.sh").write_text(f"#!/bin/bash\nexec {sys.executable} {HERE / 'standin_job.py'} {d / 'job.yaml'} "
                                  f"{work} {exit_code}\n")
        self.id = sched.submit(str(d / "job.sh"), ["-o", str(d / "job.out"), *options], str(d))
        self.dir = Path(sched.env["HPCCKPT_LOCAL_SPOOL"]) / self.id

    def state(self) -> dict:
        return read_state(str(self.dir))

    def wait(self, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st.get("state") in STATES_DONE:
                return st
            time.sleep(0.02)
        raise AssertionError(f"local job {self.id} did not end within {timeout} s: {self.log()}")

    def running(self, run: int = 0, timeout: float = 10) -> int:
        """The driver's pid once it watches the stand-in program of that run (a signal that comes earlier, while
        it starts the computation, is not handled yet: docs/reliability/s3-sched.md)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st.get("runs") == run and st.get("pid") and self.calls().count("watching") > run:
                return int(st["pid"])
            time.sleep(0.02)
        raise AssertionError(f"run {run} of local job {self.id} did not start: {self.log()}")

    def ckptdir(self) -> Path:
        return self.d / f"hpcckpt-{self.id}"

    def calls(self) -> str:
        p = self.ckptdir() / "standin.log"
        return " ".join(line.split()[0] for line in p.read_text().splitlines()) if p.exists() else ""

    def log(self) -> str:
        p = self.d / "job.out"
        return p.read_text() if p.exists() else ""

    def progress(self) -> float:
        return float(json.loads((self.ckptdir() / "standin.json").read_text())["done"])


def test_deadline_checkpoints_lead_seconds_before_the_limit_requeues_and_completes(local, tmp_path):
    job = Job(local, tmp_path, "lead: 1\nmin_lead: 0\n", 1.0, "--time=2")
    st = job.wait()
    log = job.log()
    assert st["state"] == "COMPLETED" and st["runs"] >= 1, log
    assert "wall-time deadline: checkpointing" in log and "requeued" in log, log
    assert "restarting from checkpoint generation 1" in log and "the program ended with exit code 0" in log, log
    left = [float(x) for x in re.findall(r"(\d+) s left before the limit", log)]
    assert left and min(left) >= 0, log                      # taken before the limit, and the log says so
    assert job.calls().startswith("start watching checkpoint kill"), job.calls()


def test_the_warning_signal_checkpoints_and_requeues(local, tmp_path):
    """The local scheduler's --signal (Slurm's --signal=B:USR1@S): lead 0, so only the warning can trigger."""
    job = Job(local, tmp_path, "lead: 0\nmin_lead: 0\n", 1.6, "--time=3", "--signal=B:USR1@1.5")
    st = job.wait()
    log = job.log()
    assert st["state"] == "COMPLETED" and st["runs"] >= 1, log
    assert "got SIGUSR1 from the scheduler" in log and "warning signal: checkpointing" in log, log
    assert "wall-time deadline" not in log, log


def test_preemption_sigterm_without_a_cancel_checkpoints_and_requeues(local, tmp_path):
    job = Job(local, tmp_path, "lead: 0\n", 0.6)
    os.kill(job.running(0), signal.SIGTERM)
    st = job.wait()
    log = job.log()
    assert st["state"] == "COMPLETED" and st["runs"] == 1, log
    assert "preemption (on_preempt: requeue)" in log and "restarting from checkpoint generation 1" in log, log


def test_a_cancel_stops_the_computation_without_requeue(local, tmp_path):
    job = Job(local, tmp_path, "lead: 0\n", 30)
    job.running(0)
    local.cancel(job.id)
    st = job.wait()
    log = job.log()
    assert st["state"] == "CANCELLED" and st["runs"] == 0, log
    assert "the job was cancelled; stopping the computation without requeue" in log, log
    assert "checkpoint" not in job.calls() and job.calls().endswith("kill"), job.calls()


def test_a_failing_program_is_not_requeued(local, tmp_path):
    job = Job(local, tmp_path, "lead: 0\n", 0.1, exit_code=3)
    st = job.wait()
    assert st["state"] == "FAILED" and st["exit_code"] == 3 and st["runs"] == 0, job.log()
    assert "the program ended with exit code 3; not requeueing" in job.log()


def test_a_failed_checkpoint_keeps_the_last_good_one_and_does_not_requeue(local, tmp_path):
    local.env["STANDIN_FAIL"] = "1"                            # every checkpoint fails, as on a full disk
    job = Job(local, tmp_path, "lead: 0\n", 0.6)
    os.kill(job.running(0), signal.SIGUSR1)
    st = job.wait()
    log = job.log()
    assert st["state"] == "COMPLETED" and st["runs"] == 0, log            # the program simply ran on
    assert "checkpoint failed: [Errno 28] No space left on device; the last good checkpoint (generation none) " \
        "is kept; not requeueing" in log, log


def test_max_restarts_makes_the_last_run_checkpoint_without_requeue(local, tmp_path):
    job = Job(local, tmp_path, "lead: 0\nmax_restarts: 1\n", 0.8)
    os.kill(job.running(0), signal.SIGUSR1)
    os.kill(job.running(1), signal.SIGUSR1)
    st = job.wait()
    log = job.log()
    assert st["state"] == "COMPLETED" and st["runs"] == 1, log
    assert "max_restarts (1) reached; this run is the last, not requeueing" in log, log
    assert job.calls().count("checkpoint") == 2 and job.calls().count("start") == 2, job.calls()
    assert job.progress() > 0.0
    # the first run's checkpoint precedes a requeue: written frozen; the last run's does not (the program goes on)
    ckpts = [line.split()[-1] for line in (job.ckptdir() / "standin.log").read_text().splitlines()
             if line.startswith("checkpoint ")]
    assert ckpts == ["frozen", "forked"], ckpts
    assert log.count("writing frozen: the job stops after this checkpoint") == 1, log


def test_past_its_limit_a_job_is_stopped_by_the_scheduler(local, tmp_path):
    """requeue: false (checkpoint and let the limit end it): the local scheduler enforces the wall time, SIGTERM
    then SIGKILL, and the job ends TIMEOUT with the checkpoint taken before the limit."""
    job = Job(local, tmp_path, "lead: 1\nmin_lead: 0\nrequeue: false\n", 30, "--time=2", "--kill-delay=0.3")
    st = job.wait()
    log = job.log()
    assert st["state"] == "TIMEOUT" and st["runs"] == 0, log
    assert "wall-time deadline: checkpointing" in log and "requeued" not in log, log
    assert job.calls().startswith("start watching checkpoint"), job.calls()


def test_a_rerun_on_another_allocation_moves_the_lost_node_s_part(local, tmp_path):
    """The checkpoint ran on n1 n2 n3; n2 is drained before the rerun, which gets n1 n4 n3: n2's part moves to
    n4, the others stay (the hostfile the restart gets), and the batch node's part stays here."""
    job = Job(local, tmp_path, "lead: 0\n", 0.4, "--nodes=n1,n2,n3")
    pid = job.running(0)
    spec = json.loads((job.dir / "job.json").read_text())
    spec["nodes"] = "n1,n4,n3"
    (job.dir / "job.json").write_text(json.dumps(spec))
    os.kill(pid, signal.SIGUSR1)
    st = job.wait()
    log = job.log()
    assert st["state"] == "COMPLETED" and st["runs"] == 1, log
    assert "the checkpoint ran on n1 n2 n3; this run has n1 n4 n3: n2 -> n4" in log, log
    hostfile = next(ln.split()[1:] for ln in (job.ckptdir() / "standin.log").read_text().splitlines()
                    if ln.startswith("hostfile"))
    assert dict(zip(hostfile[::2], hostfile[1::2])) == {"n1": "n1", "n2": "n4", "n3": "n3"}, hostfile
