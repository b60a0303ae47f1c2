"""PBS (issue 8): a job longer than its limit completes across at least two continuations /
reschedules with the output of a plain run.

Grid Engine is real (Debian's packages, sge/local-cell.sh). No PBS server exists in Debian or on PyPI: PBS
runs against the emulator in tests/pbs_emulator, which reproduces OpenPBS 23.06's behaviour (walltime kill with
SIGTERM then SIGKILL, no rerun at the limit, qrerun refused to ordinary users, depend=afterany, appended
output); with PBS_EXEC set (`make test-pbs`) the same test runs against a real PBS installation instead."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, compile_c, run, wait_for

pytestmark = [pytest.mark.slow]


def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-batch-", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


def _plain(d: Path, steps: int) -> str:
    subprocess.run([str(d / "counter"), str(d / "plain.txt"), "8", str(steps), "0"], check=True,
                   stdout=subprocess.DEVNULL)
    return (d / "plain.txt").read_text()


@pytest.fixture(scope="module")
def pbs():
    sys.path.insert(0, str(REPO / "tests"))
    from pbs_emulator import backend
    with backend(kill_delay=3, acl_roots=["root"], mom_poll=2) as b:
        yield b


def test_pbs_job_continues_until_done(pbs, env, build_dir):
    """walltime 20 s, about 45 s of work: the job checkpoints at its own deadline (from qstat -f), submits its
    continuation (depend=afterany) and exits; the chain ends when the program does."""
    d = _workdir()
    try:
        shutil.copy(compile_c(build_dir, "counter"), d / "counter")
        steps = 450
        (d / "job.pbs").write_text(f"""#!/bin/bash
#PBS -N ctr
#PBS -j oe
cd {d}
echo "run ${{HPCCKPT_RUN:-0}} on $(hostname)"
./counter out.txt 8 {steps} 100000
echo "script done"
""")
        (d / "job.yaml").write_text("lead: 8\nmin_lead: 5\n")
        e = dict(pbs.env(env))
        e.pop("HPCCKPT_RUNDIR", None)
        r = run(["hpcckpt", "qsub", "--scheduler", "pbs", "--config", str(d / "job.yaml"), "-l", "walltime=00:00:20",
                 "-o", str(d / "job.log"), str(d / "job.pbs")], e, d)
        assert r.returncode == 0, r.stderr
        first = re.search(r"Submitted batch job (\S+)", r.stdout).group(1)
        wait_for(lambda: (d / "out.txt").exists() and (d / "out.txt").read_text().count("\n") >= steps, 240,
                 "the chain of jobs to finish the work", interval=1)
        wait_for(lambda: "script done" in (d / "job.log").read_text() if (d / "job.log").exists() else False,
                 60, "the last job's log", interval=1)
        history = (d / f"hpcckpt-{first}" / "hpcckpt-job.log").read_text()   # every run, in one place
        assert (d / "out.txt").read_text() == _plain(d, steps)
        assert history.count("continues as job") >= 2, history
        assert "the program ended with exit code 0" in history
        assert pbs.qstat(first).get("Exit_status") == "0"           # checkpointed before the walltime kill
    finally:
        shutil.rmtree(d, ignore_errors=True)
