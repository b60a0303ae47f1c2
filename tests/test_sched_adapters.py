"""Scheduler adapters' parsing and deadline facts, without a scheduler (issue 17)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from hpcckpt.sched import config
from hpcckpt.sched.pbs import merge_v, parse_qstat_f
from hpcckpt.sched.sge import SGE


def test_sge_deadline_is_the_run_start_plus_h_rt_never_now(tmp_path: Path):
    """8.1.9's `qstat -j` prints no start_time for a running job: the deadline must not move with the clock."""
    qstat = tmp_path / "qstat"
    qstat.write_text("#!/bin/sh\necho 'job_number:                 7'\n"
                     "echo 'hard resource_list:         h_rt=90,s_rt=65'\n")
    qstat.chmod(0o755)
    started = time.time() - 40
    sge = SGE({"JOB_ID": "7", "SGE_ROOT": "/x", "HPCCKPT_QSTAT": str(qstat), "HPCCKPT_STARTED": str(started)})
    first = sge.end_time()
    time.sleep(1.1)
    assert sge.end_time() == first == started + 90
    # nothing recorded and no sge_shepherd above us: this process's own start, still not "now"
    bare = SGE({"JOB_ID": "7", "SGE_ROOT": "/x", "HPCCKPT_QSTAT": str(qstat)})
    first = bare.end_time()
    time.sleep(1.1)
    assert bare.end_time() == first < time.time() + 90 - 1


def test_sge_h_rt_in_hms_and_start_time_where_printed(tmp_path: Path):
    qstat = tmp_path / "qstat"
    qstat.write_text("#!/bin/sh\necho 'hard resource_list:         h_rt=0:2:30'\n"
                     "echo 'start_time            1:    12/06/2026 10:00:00'\n")
    qstat.chmod(0o755)
    sge = SGE({"JOB_ID": "7", "SGE_ROOT": "/x", "HPCCKPT_QSTAT": str(qstat)})
    assert sge.end_time() == time.mktime(time.strptime("12/06/2026 10:00:00", "%m/%d/%Y %H:%M:%S")) + 150


def test_pbs_v_lists_are_merged_into_one(tmp_path: Path):
    """qsub keeps only the last -v, and one on the command line hides the script's #PBS -v: a continuation
    passes one list, the script's, then the command line's, then ours."""
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/bash\n#PBS -N x\n#PBS -v A=1,B="x,y"\necho hi\n#PBS -v NOT=directive\n')
    opts = merge_v(["-l", "walltime=3:00", "-v", "C=3", "-j", "oe", "-vD=4"], str(script),
                   {"HPCCKPT_RUN": "1", "A": "ours"})
    assert opts == ["-l", "walltime=3:00", "-j", "oe", "-v", 'A=ours,B="x,y",C=3,D=4,HPCCKPT_RUN=1']
    assert merge_v(["-N", "y"], str(tmp_path / "none"), {}) == ["-N", "y"]


def test_qstat_f_folded_lines_keep_their_spaces():
    a = parse_qstat_f("Job Id: 1.srv\n    comment = Job run at x and terminated \n\tby root@vm\n"
                      "    Exit_status = 271\n")
    assert a["comment"] == "Job run at x and terminated by root@vm" and a["Exit_status"] == "271"


def test_pbs_sigterm_at_the_walltime_is_not_a_cancel(tmp_path: Path):
    """PBS sends SIGTERM for a qdel and at the walltime alike: at or past the end time it is the limit (the
    driver checkpoints within kill_delay and continues), before it a qdel."""
    from hpcckpt.sched.pbs import PBS
    stime = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(time.time() - 100))
    for walltime, cancel in (("00:01:40", False), ("01:00:00", True)):
        qstat = tmp_path / "qstat"
        qstat.write_text(f"#!/bin/sh\necho 'Job Id: 1.srv'\necho '    stime = {stime}'\n"
                         f"echo '    Resource_List.walltime = {walltime}'\n")
        qstat.chmod(0o755)
        assert PBS({"PBS_JOBID": "1.srv", "HPCCKPT_QSTAT": str(qstat)}).cancelled() is cancel


def test_documented_config_loads_and_new_keys_are_checked(tmp_path: Path):
    repo = Path(__file__).resolve().parent.parent
    cfg = config.load(str(repo / "configs" / "slurm-job.yaml"))
    assert cfg.forward_warning_signal is False and cfg.checkpoint_timeout == 0
    bad = tmp_path / "bad.yaml"
    for text, msg in (("forward_warning_signal: maybe\n", "must be true or false"),
                      ("checkpoint_timeout: -3\n", "whole number")):
        bad.write_text(text)
        with pytest.raises(config.ConfigError, match=msg):
            config.load(str(bad))
