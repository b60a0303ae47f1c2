"""Grid Engine at the lengths users ask for (issue 17; Debian's gridengine 8.1.9, sge/local-cell.sh).

Two jobs run side by side in one test (the cell has 2 slots; the work is mostly sleep), so the suite pays
for the longer one only:
  - h_rt=0:2:30, lead 20 s, ~145 s of work: the driver's own deadline (h_rt + the run's start, which 8.1.9's
    `qstat -j` does not print) triggers the checkpoint ~20 s before h_rt; exit 99 reschedules; the second run
    restarts and finishes;
  - the issue's black-box case with the documented warning: h_rt=0:1:30, s_rt=0:1:05, -notify, lead 20 s,
    ~100 s of work: s_rt's SIGUSR1 arrives first; it must trigger the checkpoint and kill nothing (not the
    coordinator, not the agent, not the program), then the job is rescheduled and completes.
Both: output identical to a plain run, at least one reschedule, the log says how long before h_rt the
checkpoint completed, and qacct shows no run killed at h_rt."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, compile_c, run, wait_for

pytestmark = [pytest.mark.slow]


def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-sge-", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


def _plain(d: Path, steps: int) -> str:
    subprocess.run([str(d / "counter"), str(d / "plain.txt"), "8", str(steps), "0"], check=True,
                   stdout=subprocess.DEVNULL)
    return (d / "plain.txt").read_text()


@pytest.fixture(scope="module")
def sge():
    if os.geteuid() != 0:
        pytest.skip("the local Grid Engine cell needs root")
    r = subprocess.run([str(REPO / "sge" / "local-cell.sh"), "up"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    found = dict(re.findall(r"(\w+)=(\S+)", " ".join(line.replace("export ", "") for line in
                                                        r.stdout.splitlines())))
    cell = {k: v.strip('"') for k, v in found.items() if k.startswith("SGE_")}
    cell["SGE_BIN"] = found["PATH"].split(":")[0]
    yield cell
    subprocess.run([str(REPO / "sge" / "local-cell.sh"), "down"], capture_output=True, timeout=120)


class Job:
    def __init__(self, sge, env, build_dir, name: str, steps: int, limits: str, config: str, extra=()):
        self.d = d = _workdir()
        self.steps = steps
        shutil.copy(compile_c(build_dir, "counter"), d / "counter")
        (d / "job.sh").write_text(f"""#!/bin/bash
#$ -N {name}
#$ -j y
cd {d}
echo "run restarted=${{RESTARTED:-0}}"
./counter out.txt 8 {steps} 100000
echo "script done"
""")
        (d / "job.yaml").write_text(config)
        e = dict(env, **sge)
        e["PATH"] = f"{sge['SGE_BIN']}:{env['PATH']}"      # the cell's qsub/qstat before Debian's system cell
        e.pop("HPCCKPT_RUNDIR", None)
        self.env = e
        r = run(["hpcckpt", "qsub", "--scheduler", "sge", "--config", str(d / "job.yaml"), "-l", limits, *extra,
                 "-o", str(d / "job.log"), "-wd", str(d), str(d / "job.sh")], e, d)
        assert r.returncode == 0, r.stderr
        self.id = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)

    def done(self) -> bool:
        log = self.d / "job.log"
        return log.exists() and "script done" in log.read_text()

    def check(self, sge) -> str:
        d = self.d
        log = (d / "job.log").read_text()
        assert (d / "out.txt").read_text() == _plain(d, self.steps), log
        assert log.count("requeued") >= 1, log
        assert "run 1 (rerun)" in log and "restarting from checkpoint generation" in log, log
        left = [int(x) for x in re.findall(r"(\d+) s left before the limit", log)]
        assert left and min(left) >= 3, log                  # checkpointed before h_rt, and says how long
        # nothing of ours or the program died of a scheduler signal (the SIGKILL after the checkpoint is ours)
        assert not re.search(r"killed by signal (10|12|15)\b|killed by SIGUSR", log), log
        acct = subprocess.run([sge["SGE_BIN"] + "/qacct", "-j", self.id], capture_output=True, text=True).stdout
        failed = re.findall(r"^failed\s+(\d+)", acct, re.M)
        assert failed and "37" not in failed, acct                       # no run killed at h_rt
        return log


def test_sge_realistic_limits_and_warning_signal(sge, env, build_dir):
    started = time.monotonic()
    deadline_job = Job(sge, env, build_dir, "hrt150", 1450, "h_rt=0:2:30", "lead: 20\nmin_lead: 5\n")
    warned_job = Job(sge, env, build_dir, "srt65", 1000, "h_rt=0:1:30,s_rt=0:1:05", "lead: 20\nmin_lead: 5\n",
                     extra=["-notify"])
    try:
        wait_for(lambda: deadline_job.done() and warned_job.done(), 420, "both jobs to finish", interval=2)
        print(f"both Grid Engine jobs done in {time.monotonic() - started:.0f} s")
        log = deadline_job.check(sge)
        assert "wall-time deadline: checkpointing" in log, log
        log = warned_job.check(sge)
        assert "got SIGUSR1 from the scheduler" in log and "warning signal: checkpointing" in log, log
    finally:
        for j in (deadline_job, warned_job):
            subprocess.run([sge["SGE_BIN"] + "/qdel", j.id], capture_output=True)
            shutil.rmtree(j.d, ignore_errors=True)
