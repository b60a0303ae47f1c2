"""Every scheduler at the length users ask for (issue 17), all at once: Slurm `--time=3`, Grid Engine
`h_rt=0:2:30` (and the documented warning, `h_rt=0:1:30,s_rt=0:1:05`), PBS walltime 3 min. Each job has more
work than its limit allows, checkpoints before the limit (the log says how long before), goes on in a rerun
(Slurm's requeue, Grid Engine's reschedule, a PBS continuation job) and finishes with the output of a plain run.

The jobs are mostly sleep (the counter waits 100 ms a step), so they run side by side: the module submits every
selected scheduler's jobs before its first check, and the suite pays for the longest one (~3 min) instead of
the sum (~7 min). The driver's policy itself (deadline, warning signal, preemption, max_restarts, ...) is tested
in seconds with the local scheduler (tests/unit/sched/test_driver_policy.py, tests/test_sched_local.py); these
show that the real schedulers' limits, signals and reruns are what the adapters expect.

- Slurm (slurm/local-cluster.sh brings up Debian's slurmctld/slurmd here): --time=3, lead 20 s, ~170 s of work.
- Grid Engine (Debian's gridengine 8.1.9, sge/local-cell.sh), two jobs (the cell has 2 slots):
  - h_rt=0:2:30, lead 20 s, ~145 s of work: the driver's own deadline (h_rt + the run's start, which 8.1.9's
    `qstat -j` does not print) triggers the checkpoint ~20 s before h_rt; exit 99 reschedules;
  - the issue's black-box case with the documented warning: h_rt=0:1:30, s_rt=0:1:05, -notify, lead 20 s,
    ~100 s of work: s_rt's SIGUSR1 arrives first; it must trigger the checkpoint and kill nothing (not the
    coordinator, not the agent, not the program); qacct shows no run killed at h_rt.
- PBS: the emulator in tests/pbs_emulator (OpenPBS 23.06's behaviour), or with PBS_EXEC set (`make test-pbs`) a
  real OpenPBS whose settings the test changes (kill_delay, acl_roots) are put back after:
  - walltime 3 min, lead 20 s, ~170 s of work, submitted from the work dir with a -v of the user's and a
    #PBS -v in the script: the continuation runs from the submit dir (its .o file lands there, not in $HOME),
    both runs see both user variables;
  - a qdel that lands after the continuation was submitted (the fault point batch.after_requeue holds the
    first job there), twice: the chain stops, the continuation never runs the program (withdrawn by the
    deleted job's driver, or stopped by its own check of how its predecessor ended).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import BIN, KEY_FILE, REPO, compile_c, run, wait_for

pytestmark = [pytest.mark.slow]

JOBS = ("pbs_chains", "slurm_job", "sge_jobs")     # the module fixtures that submit a scheduler's jobs


@pytest.fixture(scope="module", autouse=True)
def _submit_everything_first(request):
    """Every selected test's jobs are submitted before the first check waits for its own."""
    wanted = {name for item in request.session.items if item.module is request.module
              for name in item.fixturenames if name in JOBS}
    for name in JOBS:
        if name in wanted:
            request.getfixturevalue(name)


def _env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DMTCP_", "HPCCKPT_"))}
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e["HPCCKPT_KEY_FILE"] = KEY_FILE
    return e


def _workdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"hpcckpt-{prefix}-", dir="/tmp"))
    os.chmod(d, 0o755)                         # the schedulers' daemons and the job's user reach it
    return d


def _plain(d: Path, steps: int) -> str:
    subprocess.run([str(d / "counter"), str(d / "plain.txt"), "8", str(steps), "0"], check=True,
                   stdout=subprocess.DEVNULL)
    return (d / "plain.txt").read_text()


def _left(log: str) -> list[int]:
    """How long before the limit each checkpoint completed (the driver's log line)."""
    return [int(x) for x in re.findall(r"(\d+) s left before the limit", log)]


# ---------------------------------------------------------------------------------------------------- Slurm --

def _slurm_show(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


@pytest.fixture(scope="module")
def slurm_job(build_dir):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    r = subprocess.run([str(REPO / "slurm" / "local-cluster.sh"), "up"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    e = dict(_env(), SLURM_CONF=re.search(r"SLURM_CONF=(\S+)", r.stdout).group(1))
    d = _workdir("slurm")
    shutil.copy(compile_c(build_dir, "counter"), d / "counter")
    steps = 1700
    (d / "job.sh").write_text(f"""#!/bin/bash
#SBATCH -J hpcckpt-long
#SBATCH -o {d}/slurm-%j.out
echo "run ${{SLURM_RESTART_COUNT:-0}} starts"
./counter out.txt 8 {steps} 100000
echo "script done"
""")
    (d / "job.sh").chmod(0o755)
    (d / "job.yaml").write_text("lead: 20\nmin_lead: 5\n")
    r = run(["hpcckpt", "sbatch", "--config", str(d / "job.yaml"), "--time=3", str(d / "job.sh")], e, d)
    assert r.returncode == 0, r.stderr
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    yield d, job, e, steps, time.monotonic()
    subprocess.run(["scancel", job], env=e, capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- Grid Engine --

@pytest.fixture(scope="module")
def sge_cell():
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


class SgeJob:
    def __init__(self, sge: dict, build_dir: Path, name: str, steps: int, limits: str, config: str, extra=()):
        self.d = d = _workdir("sge")
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
        e = dict(_env(), **sge)
        e["PATH"] = f"{sge['SGE_BIN']}:{e['PATH']}"      # the cell's qsub/qstat before Debian's system cell
        self.env = e
        r = run(["hpcckpt", "qsub", "--scheduler", "sge", "--config", str(d / "job.yaml"), "-l", limits, *extra,
                 "-o", str(d / "job.log"), "-wd", str(d), str(d / "job.sh")], e, d)
        assert r.returncode == 0, r.stderr
        self.id = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)

    def done(self) -> bool:
        log = self.d / "job.log"
        return log.exists() and "script done" in log.read_text()

    def check(self, sge: dict) -> str:
        d = self.d
        log = (d / "job.log").read_text()
        assert (d / "out.txt").read_text() == _plain(d, self.steps), log
        assert log.count("requeued") >= 1, log
        assert "run 1 (rerun)" in log and "restarting from checkpoint generation" in log, log
        assert _left(log) and min(_left(log)) >= 3, log            # checkpointed before h_rt, and says how long
        # nothing of ours or the program died of a scheduler signal (the SIGKILL after the checkpoint is ours)
        assert not re.search(r"killed by signal (10|12|15)\b|killed by SIGUSR", log), log
        acct = subprocess.run([sge["SGE_BIN"] + "/qacct", "-j", self.id], capture_output=True, text=True).stdout
        failed = re.findall(r"^failed\s+(\d+)", acct, re.M)
        assert failed and "37" not in failed, acct                       # no run killed at h_rt
        return log


@pytest.fixture(scope="module")
def sge_jobs(sge_cell, build_dir):
    started = time.monotonic()
    jobs = [SgeJob(sge_cell, build_dir, "hrt150", 1450, "h_rt=0:2:30", "lead: 20\nmin_lead: 5\n"),
            SgeJob(sge_cell, build_dir, "srt65", 1000, "h_rt=0:1:30,s_rt=0:1:05", "lead: 20\nmin_lead: 5\n",
                   extra=["-notify"])]
    yield jobs, started
    for j in jobs:
        subprocess.run([sge_cell["SGE_BIN"] + "/qdel", j.id], capture_output=True)
        shutil.rmtree(j.d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- PBS --
# (the PBS test comes first: its short late-qdel chains run while every long job does)

@pytest.fixture(scope="module")
def pbs():
    sys.path.insert(0, str(REPO / "tests"))
    from pbs_emulator import backend
    with backend(kill_delay=10, acl_roots=["root"]) as b:
        yield b


def _pbs_submit(pbs, d: Path, name: str, steps: int, walltime: str, config: str, opts=()) -> str:
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
    e = dict(pbs.env(_env()))
    r = run(["hpcckpt", "qsub", "--scheduler", "pbs", "--config", str(d / "job.yaml"), "-l",
             f"walltime={walltime}", *opts, str(d / "job.pbs")], dict(e, PWD=str(d)), d)
    assert r.returncode == 0, r.stderr
    return re.search(r"Submitted batch job (\S+)", r.stdout).group(1)


@pytest.fixture(scope="module")
def pbs_chains(pbs, build_dir):
    """The long chain, submitted up front; the late-qdel chains are short and need a prompt qdel: the test
    submits them."""
    started = time.monotonic()
    d = _workdir("pbs")
    shutil.copy(compile_c(build_dir, "counter"), d / "counter")
    steps = 1700
    first = _pbs_submit(pbs, d, "ctr", steps, "00:03:00", "lead: 20\nmin_lead: 5\n", ["-v", "FROMCLI=c1"])
    yield d, first, steps, started
    shutil.rmtree(d, ignore_errors=True)


def test_pbs_chain_at_a_realistic_walltime_and_a_late_qdel(pbs, pbs_chains, build_dir):
    d, first, steps, started = pbs_chains
    # two short chains, each first job held by the fault point after submitting its continuation and deleted
    # then: A is stopped by its own driver (the late SIGTERM, read before the end time, withdraws the
    # continuation); B's SIGTERM is read only after its end time (it could be the walltime's), so its
    # continuation starts, finds the predecessor deleted (qstat -x -f) and stops
    qa, qb = _workdir("pbs"), _workdir("pbs")
    try:
        victims = {}
        for name, w, wall, cfg, hold in (("delA", qa, "00:00:30", "lead: 15\nmin_lead: 5\n", 5),
                                         ("delB", qb, "00:00:20", "lead: 8\nmin_lead: 5\n", 8)):
            shutil.copy(compile_c(build_dir, "counter"), w / "counter")
            victims[name] = (w, _pbs_submit(pbs, w, name, 1000, wall, cfg,
                                            ["-v", f"HPCCKPT_FAULT=batch.after_requeue:sleep={hold}"]))
        for name, (w, job) in victims.items():
            qlog = w / f"hpcckpt-{job}" / "hpcckpt-job.log"
            wait_for(lambda qlog=qlog: qlog.exists() and "continues as job" in qlog.read_text(), 90,
                     f"{name}'s first job to submit its continuation", interval=0.5)
            p = pbs.run(["qdel", job])
            assert p.returncode == 0, p.stderr
        for name, expect in (("delA", "withdrawing it"), ("delB", "not continuing the chain")):
            w, job = victims[name]
            qlog = w / f"hpcckpt-{job}" / "hpcckpt-job.log"
            nxt = re.search(r"continues as job ([^\s;]+)", qlog.read_text()).group(1)
            a = pbs.wait(nxt, timeout=60)
            time.sleep(0.5)
            text = qlog.read_text()
            assert expect in text, text
            assert "run 1 (rerun)" not in text, text                  # the continuation never ran the program
            assert a.get("Exit_status") in (None, "0"), a
            assert pbs.qstat(job).get("Exit_status") == "271", pbs.qstat(job)
    finally:
        for w in (qa, qb):
            shutil.rmtree(w, ignore_errors=True)

    # the long chain
    wait_for(lambda: any("script done" in f.read_text() for f in d.glob("ctr.o*")), 420,
             "the chain of jobs to finish the work", interval=2)
    print(f"PBS chain done in {time.monotonic() - started:.0f} s")
    history = (d / f"hpcckpt-{first}" / "hpcckpt-job.log").read_text()   # every run, in one place
    assert (d / "out.txt").read_text() == _plain(d, steps), history
    assert history.count("continues as job") >= 1, history
    assert "the program ended with exit code 0" in history, history
    assert _left(history) and min(_left(history)) >= 5, history
    outs = sorted(d.glob("ctr.o*"))
    assert len(outs) >= 2, outs                                # every run's .o file in the submit dir
    assert "vars=s1,c1" in outs[0].read_text()                 # the user's -v and #PBS -v in the first run
    for nxt in re.findall(r"continues as job ([^\s;]+)", history):   # ... and in every continuation
        variables = pbs.qstat(nxt).get("Variable_List", "")
        assert "FROMSCRIPT=s1" in variables and "FROMCLI=c1" in variables, variables
        assert f"PBS_O_WORKDIR={d}" in variables, variables
    assert pbs.qstat(first).get("Exit_status") == "0"          # checkpointed before the walltime kill


# ----------------------------------------------------------------------- Grid Engine's and Slurm's checks --

def test_sge_realistic_limits_and_warning_signal(sge_cell, sge_jobs):
    (deadline_job, warned_job), started = sge_jobs
    wait_for(lambda: deadline_job.done() and warned_job.done(), 420, "both jobs to finish", interval=2)
    print(f"both Grid Engine jobs done in {time.monotonic() - started:.0f} s")
    log = deadline_job.check(sge_cell)
    assert "wall-time deadline: checkpointing" in log, log
    log = warned_job.check(sge_cell)
    assert "got SIGUSR1 from the scheduler" in log and "warning signal: checkpointing" in log, log


@pytest.mark.slurm
def test_slurm_time_3_job_checkpoints_before_the_limit_requeues_and_completes(slurm_job):
    """--time=3 (180 s) with ~170 s of work: the first run checkpoints ~20 s before the limit (its own deadline
    from EndTime, or the --signal warning, whichever comes first), requeues, and the second run restarts and
    finishes soon after; the output equals a plain run's and the log says how long before the limit."""
    d, job, e, steps, started = slurm_job
    wait_for(lambda: _slurm_show(job, e).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 480,
             f"Slurm job {job} to end", interval=1)
    print(f"Slurm --time=3 job done {time.monotonic() - started:.0f} s after its submission")
    info = _slurm_show(job, e)
    log = (d / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) >= 1, log
    assert "wall-time deadline: checkpointing" in log or "warning signal: checkpointing" in log, log
    assert "run 0 starts" in log and "script done" in log
    assert (d / "out.txt").read_text() == _plain(d, steps)
    assert _left(log) and min(_left(log)) >= 5, log
    # what the job left behind, at a glance (hpcckpt status): its runs, the requeue, the generation restarted from
    st = json.loads(run(["hpcckpt", "status", "--json", str(d / f"hpcckpt-{job}")], e, d, check=True).stdout)
    assert st["batch"]["job"] == job and st["batch"]["runs"] >= 2 and st["batch"]["requeues"] >= 1, st["batch"]
    assert st["batch"]["finished"]["code"] == 0
    assert any(g["state"] == "complete" for c in st["computations"] for g in c["generations"])
