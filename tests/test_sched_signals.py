"""Scheduler signals and a stalled coordinator, without a scheduler (issue 17): the batch driver runs as
inside a Grid Engine job (JOB_ID, SGE_ROOT, a stand-in qstat that reports h_rt) and the test plays the
scheduler.

- Grid Engine can send s_rt's SIGUSR1 and -notify's SIGUSR2 to every process of the job, whatever its session:
  the test signals every process under the driver. The checkpoint is taken, nothing of ours and not the
  program dies of it, the job is rescheduled (exit 99) and the rerun completes with the output of a plain run.
- A coordinator that stops answering (SIGSTOPped) must not hang the driver: the checkpoint request times out
  (checkpoint_timeout), says so in one line, and the run is not requeued.
- As inside a PBS job (PBS_JOBID, stand-in qstat/qsub): the SIGTERM PBS sends at the walltime is the limit, not
  a qdel: checkpoint and continuation."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_for


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                text = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(text.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _sge_env(env: dict, d: Path, h_rt: int, run: int) -> dict:
    qstat = d / "qstat"
    qstat.write_text(f"#!/bin/sh\necho 'job_number: 7'\necho 'hard resource_list:         h_rt={h_rt}'\n")
    qstat.chmod(0o755)
    e = dict(env, JOB_ID="7", SGE_ROOT=str(d), HPCCKPT_QSTAT=str(qstat), SGE_O_WORKDIR=str(d))
    e.pop("HPCCKPT_RUNDIR", None)
    if run:
        e["RESTARTED"] = "1"
    return e


def _batch_run(e: dict, d: Path, config: str, script: str) -> subprocess.Popen:
    (d / "job.yaml").write_text(config)
    return subprocess.Popen(["hpcckpt", "batch-run", "--scheduler", "sge", "--config", str(d / "job.yaml"), "--",
                             script], env=e, cwd=d, stdout=open(d / "job.log", "a"), stderr=subprocess.STDOUT)


def _job_script(d: Path, counter: Path, steps: int) -> str:
    (d / "job.sh").write_text(f"#!/bin/bash\ncd {d}\n{counter} out.txt 8 {steps} 20000\necho script done\n")
    return str(d / "job.sh")


@pytest.mark.slow
def test_warning_signals_to_every_process_checkpoint_and_kill_nothing(env, tmp_path, counter):
    d = tmp_path
    steps = 400
    script = _job_script(d, counter, steps)
    drv = _batch_run(_sge_env(env, d, 3600, 0), d, "lead: 5\n", script)
    try:
        wait_for(lambda: (d / "out.txt").exists() and (d / "out.txt").read_text().count("\n") > 50, 60,
                 "the program to run")
        procs = _descendants(drv.pid)
        assert len(procs) >= 4, [(p, _comm(p)) for p in procs]   # coordinator, launch, agent, bash, counter
        for sig in (signal.SIGUSR2, signal.SIGUSR1):              # -notify's, then s_rt's, to everyone
            for p in [drv.pid] + procs:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        assert drv.wait(60) == 99                                 # rescheduled
        log = (d / "job.log").read_text()
        assert "got SIGUSR1 from the scheduler" in log and "checkpoint generation 1:" in log, log
        assert "killed by signal 10" not in log and "killed by signal 12" not in log, log
        assert "requeued" in log, log
        # the rerun restarts from the checkpoint and finishes
        drv = _batch_run(_sge_env(env, d, 3600, 1), d, "lead: 5\n", script)
        assert drv.wait(120) == 0, (d / "job.log").read_text()
    finally:
        if drv.poll() is None:
            drv.kill()
    log = (d / "job.log").read_text()
    assert "restarting from checkpoint generation 1" in log and "script done" in log, log
    subprocess.run([str(counter), str(d / "plain.txt"), "8", str(steps), "0"], check=True, stdout=subprocess.DEVNULL)
    assert (d / "out.txt").read_text() == (d / "plain.txt").read_text()


@pytest.mark.slow
def test_a_stalled_coordinator_times_out_the_checkpoint_instead_of_hanging(env, tmp_path, counter):
    d = tmp_path
    script = _job_script(d, counter, 100000)
    drv = _batch_run(_sge_env(env, d, 3600, 0), d, "lead: 5\ncheckpoint_timeout: 3\n", script)
    coord = None
    try:
        wait_for(lambda: (d / "out.txt").exists(), 60, "the program to run")
        coord = next(p for p in _descendants(drv.pid)
                     if b"coordinator" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(coord, signal.SIGSTOP)
        t0 = time.monotonic()
        os.kill(drv.pid, signal.SIGUSR1)
        wait_for(lambda: "checkpoint request timed out" in (d / "job.log").read_text(), 20,
                 "the driver to give up on the checkpoint")
        assert time.monotonic() - t0 < 10
        log = (d / "job.log").read_text()
        assert "not requeueing" in log and drv.poll() is None, log    # still watching the computation
    finally:
        if coord:
            os.kill(coord, signal.SIGCONT)
        drv.terminate()
        try:
            drv.wait(60)
        except subprocess.TimeoutExpired:
            drv.kill()


@pytest.mark.slow
def test_pbs_sigterm_at_the_walltime_checkpoints_and_continues(env, tmp_path, counter):
    """PBS has no warning signal: at the walltime every process of the job gets SIGTERM, and SIGKILL kill_delay
    later. A driver that missed its own deadline takes that SIGTERM as the limit (not a qdel): it checkpoints
    and submits the continuation (from the submit dir, one merged -v), instead of stopping the chain. Stand-ins:
    qstat reports an 8 s walltime from now, qsub records how it was called."""
    d = tmp_path
    script = _job_script(d, counter, 100000)
    stime = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime())
    t0 = time.time()
    (d / "qstat").write_text(f"#!/bin/sh\necho 'Job Id: 1.srv'\necho '    stime = {stime}'\n"
                             "echo '    Resource_List.walltime = 00:00:08'\n")
    (d / "qsub").write_text(f"#!/bin/sh\necho \"cwd=$(pwd) $*\" > {d}/qsub.args\necho 2.srv\n")
    for f in ("qstat", "qsub"):
        (d / f).chmod(0o755)
    wrapper = d / "wrapper.sh"
    wrapper.write_text("#!/bin/bash\n#PBS -v FROMSCRIPT=s1\nexit 0\n")
    (d / "wrapper.sh.opts").write_text('["-v", "FROMCLI=c1", "-j", "oe"]')
    e = dict(env, PBS_JOBID="1.srv", PBS_O_WORKDIR=str(d), HPCCKPT_QSTAT=str(d / "qstat"),
             HPCCKPT_QSUB=str(d / "qsub"), HPCCKPT_WRAPPER=str(wrapper))
    e.pop("HPCCKPT_RUNDIR", None)
    (d / "job.yaml").write_text("lead: 0\n")
    drv = subprocess.Popen(["hpcckpt", "batch-run", "--scheduler", "pbs", "--config", str(d / "job.yaml"), "--",
                            script], env=e, cwd="/", stdout=open(d / "job.log", "a"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (d / "out.txt").exists(), 30, "the program to run")
        time.sleep(max(0.0, t0 + 6.5 - time.time()))               # the walltime's SIGTERM, 1.5 s early
        os.kill(drv.pid, signal.SIGTERM)
        assert drv.wait(60) == 0
    finally:
        if drv.poll() is None:
            drv.kill()
    log = (d / "job.log").read_text()
    assert "SIGTERM at the job's end time" in log and "continues as job 2.srv" in log, log
    assert "cancelled" not in log, log
    args = (d / "qsub.args").read_text()
    assert args.startswith(f"cwd={d} ") and "depend=afterany:1.srv" in args, args
    assert "FROMSCRIPT=s1,FROMCLI=c1," in args and "HPCCKPT_PREV=1.srv" in args and "-j oe" in args, args
