"""PBS at the length users ask for (issues 8 and 17): a job longer than its walltime carries on in continuation
jobs until the program is done, with the output of a plain run.

No PBS server exists in Debian or on PyPI: by default this runs against the emulator in tests/pbs_emulator
(OpenPBS 23.06's behaviour, see its README); with PBS_EXEC set (`make test-pbs`) the same test runs against a
real OpenPBS installation, and the server settings it changes (kill_delay, acl_roots) are put back after.

One test, chains side by side (the long one's wait covers the short one):
  - walltime 3 min, lead 20 s, ~170 s of work, submitted from the work dir with a -v of the user's and a
    #PBS -v in the script: the job checkpoints ~20 s before the walltime (the log says how long before), its
    continuation runs from the submit dir (its .o file lands there, not in $HOME), both runs see both user
    variables, the output equals a plain run's;
  - a qdel that lands after the continuation was submitted (the fault point batch.after_requeue holds the
    first job there), twice: the chain stops, the continuation never runs the program (withdrawn by the
    deleted job's driver, or stopped by its own check of how its predecessor ended)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, compile_c, run, wait_for

pytestmark = [pytest.mark.slow]


def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-pbs-", dir="/tmp"))
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
    with backend(kill_delay=10, acl_roots=["root"]) as b:
        yield b


def _submit(pbs, env, d: Path, name: str, steps: int, walltime: str, config: str, opts=()) -> str:
    (d / "job.pbs").write_text(f"""#!/bin/bash
#PBS -N {name}
#PBS -j oe
#PBS -v FROMSCRIPT=s1
cd {d}
echo "run ${{HPCCKPT_RUN:-0}} vars=$FROMSCRIPT,$FROMCLI"
./counter out.txt 8 {steps} 100000
echo "script done"
""")
    (d / "job.yaml").write_text(config)
    e = dict(pbs.env(env))
    e.pop("HPCCKPT_RUNDIR", None)
    r = run(["hpcckpt", "qsub", "--scheduler", "pbs", "--config", str(d / "job.yaml"), "-l",
             f"walltime={walltime}", *opts, str(d / "job.pbs")], dict(e, PWD=str(d)), d)
    assert r.returncode == 0, r.stderr
    return re.search(r"Submitted batch job (\S+)", r.stdout).group(1)


def test_pbs_chain_at_a_realistic_walltime_and_a_late_qdel(pbs, env, build_dir):
    started = time.monotonic()
    d, qa, qb = _workdir(), _workdir(), _workdir()
    try:
        for w in (d, qa, qb):
            shutil.copy(compile_c(build_dir, "counter"), w / "counter")
        steps = 1700
        first = _submit(pbs, env, d, "ctr", steps, "00:03:00", "lead: 20\nmin_lead: 5\n",
                        ["-v", "FROMCLI=c1"])
        # two short chains, each first job held by the fault point after submitting its continuation and
        # deleted then: A is stopped by its own driver (the late SIGTERM, read before the end time, withdraws
        # the continuation); B's SIGTERM is read only after its end time (it could be the walltime's), so its
        # continuation starts, finds the predecessor deleted (qstat -x -f) and stops
        victims = {}
        for name, w, wall, cfg, hold in (("delA", qa, "00:00:30", "lead: 15\nmin_lead: 5\n", 5),
                                         ("delB", qb, "00:00:20", "lead: 8\nmin_lead: 5\n", 8)):
            victims[name] = _submit(pbs, env, w, name, 1000, wall, cfg,
                                    ["-v", f"HPCCKPT_FAULT=batch.after_requeue:sleep={hold}"])
        for name, w in (("delA", qa), ("delB", qb)):
            qlog = w / f"hpcckpt-{victims[name]}" / "hpcckpt-job.log"
            wait_for(lambda: qlog.exists() and "continues as job" in qlog.read_text(), 90,
                     f"{name}'s first job to submit its continuation", interval=0.5)
            p = pbs.run(["qdel", victims[name]])
            assert p.returncode == 0, p.stderr
        for name, w, expect in (("delA", qa, "withdrawing it"), ("delB", qb, "not continuing the chain")):
            qlog = w / f"hpcckpt-{victims[name]}" / "hpcckpt-job.log"
            nxt = re.search(r"continues as job ([^\s;]+)", qlog.read_text()).group(1)
            a = pbs.wait(nxt, timeout=60)
            time.sleep(0.5)
            text = qlog.read_text()
            assert expect in text, text
            assert "run 1 (rerun)" not in text, text                  # the continuation never ran the program
            assert a.get("Exit_status") in (None, "0"), a
            assert pbs.qstat(victims[name]).get("Exit_status") == "271", pbs.qstat(victims[name])

        # the long chain
        wait_for(lambda: any("script done" in f.read_text() for f in d.glob("ctr.o*")), 420,
                 "the chain of jobs to finish the work", interval=2)
        print(f"PBS chain done in {time.monotonic() - started:.0f} s")
        history = (d / f"hpcckpt-{first}" / "hpcckpt-job.log").read_text()   # every run, in one place
        assert (d / "out.txt").read_text() == _plain(d, steps), history
        assert history.count("continues as job") >= 1, history
        assert "the program ended with exit code 0" in history, history
        left = [int(x) for x in re.findall(r"(\d+) s left before the limit", history)]
        assert left and min(left) >= 5, history
        outs = sorted(d.glob("ctr.o*"))
        assert len(outs) >= 2, outs                                # every run's .o file in the submit dir
        assert "vars=s1,c1" in outs[0].read_text()                 # the user's -v and #PBS -v in the first run
        for nxt in re.findall(r"continues as job ([^\s;]+)", history):   # ... and in every continuation
            variables = pbs.qstat(nxt).get("Variable_List", "")
            assert "FROMSCRIPT=s1" in variables and "FROMCLI=c1" in variables, variables
            assert f"PBS_O_WORKDIR={d}" in variables, variables
        assert pbs.qstat(first).get("Exit_status") == "0"          # checkpointed before the walltime kill
    finally:
        for w in (d, qa, qb):
            shutil.rmtree(w, ignore_errors=True)
