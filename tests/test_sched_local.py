"""The local scheduler end to end with the real engine (issue 18): `hpcckpt qsub --scheduler local` submits an
ordinary script; the job (a process group with a wall time the local scheduler enforces) is checkpointed before
its limit, requeued, restarted from the checkpoint and finishes with the output of a plain run. And the
driver's failure paths with the real engine, in seconds instead of a Slurm job's minute: a checkpoint that
fails (injected ENOSPC) keeps the program running without requeue; max_restarts stops requeueing.

The three jobs are autonomous (the local scheduler's wall time and its warning signal, `--signal=USR1@S`, at
the same point of every run, drive them) and mostly sleep: the module submits them together and the checks
wait for each, so the module costs about the longest job."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, KEY_FILE, compile_c, run, wait_for

pytestmark = pytest.mark.slow

# name: (steps of 50 ms, job config, local scheduler options, extra environment)
JOBS = {
    "deadline": (120, "lead: 4\nmin_lead: 0\n", ["--time=9"], {}),
    # the warning ~3 s into the run; the wall time (60 s) is never reached
    "enospc": (120, "lead: 0\n", ["--time=60", "--signal=USR1@57"],
               {"HPCCKPT_FAULT": "dump.after_chunk:error=ENOSPC"}),
    "max_restarts": (150, "lead: 0\nmax_restarts: 1\n", ["--time=60", "--signal=USR1@57"], {}),
}


class LocalJob:
    def __init__(self, d: Path, counter: Path, steps: int, config: str, opts: list[str], extra_env: dict):
        self.d, self.counter, self.steps = d, counter, steps
        (d / "job.sh").write_text(f"#!/bin/bash\ncd {d}\necho \"run $HPCCKPT_LOCAL_RUN starts\"\n"
                                  f"{counter} out.txt 8 {steps} 50000\necho script done\n")
        (d / "job.yaml").write_text(config)
        e = {k: v for k, v in os.environ.items() if not k.startswith(("DMTCP_", "HPCCKPT_"))}
        e.update(PATH=f"{BIN}:{e.get('PATH', '')}", HPCCKPT_KEY_FILE=KEY_FILE, HPCCKPT_LOCAL_SPOOL=str(d / "spool"),
                 **extra_env)
        r = run(["hpcckpt", "qsub", "--scheduler", "local", "--config", str(d / "job.yaml"), "-o", str(d / "job.log"),
                 *opts, str(d / "job.sh")], e, d)
        assert r.returncode == 0, r.stderr
        self.id = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
        self.jobdir = d / "spool" / self.id

    def state(self) -> dict:
        try:
            return json.loads((self.jobdir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, timeout: float = 120) -> tuple[dict, str]:
        wait_for(lambda: self.state().get("state") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout,
                 f"local job {self.id} to end", interval=0.2)
        return self.state(), (self.d / "job.log").read_text()

    def written(self) -> list[tuple[str, int]]:
        """How each checkpoint's images were written (journal: frozen/forked, snapshot forks made)."""
        [path] = self.d.rglob("hpcckpt-events.jsonl")
        events = [json.loads(line) for line in path.read_text().splitlines()]
        return [(e.get("written"), e.get("snapshots")) for e in events if e["event"] == "checkpoint"]

    def output_is_a_plain_run_s(self) -> bool:
        subprocess.run([str(self.counter), str(self.d / "plain.txt"), "8", str(self.steps), "0"], check=True,
                       stdout=subprocess.DEVNULL)
        return (self.d / "out.txt").read_text() == (self.d / "plain.txt").read_text()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, build_dir):
    counter = compile_c(build_dir, "counter")
    return {name: LocalJob(tmp_path_factory.mktemp(f"local-{name}"), counter, *spec) for name, spec in JOBS.items()}


def test_a_job_longer_than_its_wall_time_checkpoints_requeues_and_completes(jobs):
    st, log = jobs["deadline"].wait()
    assert st["state"] == "COMPLETED" and st["runs"] >= 1, log
    assert "wall-time deadline: checkpointing" in log and "requeued" in log, log
    assert "restarting from checkpoint generation" in log and "script done" in log, log
    left = [int(x) for x in re.findall(r"(\d+) s left before the limit", log)]
    assert left and min(left) >= 1, log
    assert jobs["deadline"].output_is_a_plain_run_s()


def test_a_failed_checkpoint_keeps_the_program_running_without_requeue(jobs):
    """The real engine's checkpoint fails (ENOSPC injected while writing): the previous checkpoint (none) is
    kept, the job is not requeued, the program runs on to the end with the output of a plain run."""
    st, log = jobs["enospc"].wait()
    assert st["state"] == "COMPLETED" and st["runs"] == 0, log
    assert "got SIGUSR1 from the scheduler" in log, log
    assert "checkpoint failed" in log and "No space left on device" in log and "not requeueing" in log, log
    # it would have requeued: written frozen (stopped while writing, not killed), and it ran on all the same
    assert "writing frozen: the job stops after this checkpoint" in log, log
    assert jobs["enospc"].output_is_a_plain_run_s()


def test_max_restarts(jobs):
    """max_restarts: 1 and a warning in every run: the first run checkpoints and requeues, the second
    checkpoints and runs on to the end. The first checkpoint, the job stopping after it, is written frozen (no
    snapshot fork); the second, after which the program goes on, forked."""
    st, log = jobs["max_restarts"].wait()
    assert st["state"] == "COMPLETED" and st["runs"] == 1, log
    assert log.count("got SIGUSR1 from the scheduler") == 2 and "restored" in log, log
    assert "max_restarts (1) reached" in log, log
    assert log.count("writing frozen: the job stops after this checkpoint") == 1, log
    (first, n0), (last, n1) = jobs["max_restarts"].written()
    assert (first, n0) == ("frozen", 0) and last == "forked" and n1 >= 1, jobs["max_restarts"].written()
    assert jobs["max_restarts"].output_is_a_plain_run_s()
