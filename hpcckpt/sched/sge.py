"""Grid Engine adapter (verified against Debian's gridengine 8.1.9 via sge/local-cell.sh).

Facts it is built on: `exit 99` from the job script reschedules the job (same JOB_ID, RESTARTED=1 in the
rerun); `-l s_rt=` sends SIGUSR1 at the soft limit and `-l h_rt=` is the hard limit; `-notify` sends SIGUSR2
ahead of a qdel. The deadline comes from h_rt and the run's start (8.1.9's `qstat -j` prints no start_time for a
running job: the start of the job's sge_shepherd, our ancestor, else the driver's own recorded start - never
"now"), the warning from s_rt (the config's `signal: USR1`); a qdel (SIGUSR2 with -notify, then SIGKILL) is never
requeued.
"""
from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

from .base import QSUB_FLAGS, Requeued, Scheduler, SchedulerError, ancestor_named, hms, process_start

if TYPE_CHECKING:
    from .config import JobConfig


class SGE(Scheduler):
    name = "sge"
    directive = "#$"
    launcher = "sge"
    warns_every_process = True      # s_rt's and -notify's signals go to every process of the job
    wrapper_commands = ("qsub", "qstat")
    option_flags = QSUB_FLAGS
    option_pairs = frozenset({"-pe"})

    @classmethod
    def detect(cls, env: dict) -> bool:
        return bool(env.get("JOB_ID") and (env.get("SGE_ROOT") or env.get("SGE_TASK_ID")))

    def job_id(self) -> str:
        return self.env["JOB_ID"]

    def run_count(self) -> int:
        return 1 if self.env.get("RESTARTED") == "1" else 0   # the driver keeps its own exact count

    def command(self, name: str) -> str:
        return self.env.get(f"HPCCKPT_{name.upper()}") or self.env.get(f"SGE_{name.upper()}") or name

    def end_time(self) -> float | None:
        """The run's start (never "now": that would move the deadline with the clock) plus h_rt."""
        limit = self.hard_limit()
        if limit is None:
            return None
        return self.run_started() + limit

    def hard_limit(self) -> int | None:
        """h_rt in seconds from `qstat -j` ("hard resource_list: h_rt=90" on 8.1.9; also H:M:S forms)."""
        out = self.run([self.command("qstat"), "-j", self.job_id()])
        m = re.search(r"\bh_rt=(\d+(?::\d+){0,2})", out)
        if not m:
            return None
        return hms(m.group(1)) if ":" in m.group(1) else int(m.group(1))

    def run_started(self) -> float:
        """When this run began: `qstat -j`'s start_time where the version prints one (8.1.9 does not for a
        running job), else the start of this job's sge_shepherd (the execd starts one per run; it is our
        ancestor), else the start the driver recorded first (HPCCKPT_STARTED), else this process's own."""
        out = ""
        try:
            out = self.run([self.command("qstat"), "-j", self.job_id()])
        except SchedulerError:
            pass
        m = re.search(r"start_time\s+\d*:?\s*(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)", out)
        if m:
            return time.mktime(time.strptime(m.group(1), "%m/%d/%Y %H:%M:%S"))
        shepherd = ancestor_named("sge_shepherd")
        t0 = process_start(shepherd) if shepherd else None
        if t0 is None and self.env.get("HPCCKPT_STARTED"):
            t0 = float(self.env["HPCCKPT_STARTED"])
        return t0 if t0 is not None else (process_start() or time.time())

    def cancelled(self) -> bool:
        return True

    def submit_dir(self) -> str:
        return self.env.get("SGE_O_WORKDIR") or os.getcwd()

    def requeue(self) -> Requeued:
        return Requeued(exit_code=99)            # exit 99: Grid Engine reschedules the job

    def node_list(self) -> list[str]:
        """$PE_HOSTFILE's hosts ("host slots queue processors" lines; the first runs the job script)."""
        path = self.env.get("PE_HOSTFILE")
        if path and os.path.exists(path):
            with open(path) as f:
                return list(dict.fromkeys(line.split()[0] for line in f if line.strip()))
        return super().node_list()

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        """qrsh -inherit: a task of this job's parallel environment on host (the PE needs control_slaves)."""
        return [self.command("qrsh"), "-inherit", host, *argv]

    # -- the submit side --------------------------------------------------------------------------------------
    @classmethod
    def installed(cls, env: dict[str, str]) -> bool:
        return bool(env.get("SGE_ROOT"))

    def wrapper_directives(self, cfg: JobConfig) -> list[str]:
        return ["#$ -r y"]                       # exit 99 reschedules

    def after_job_options(self, job_id: str) -> list[str]:
        return ["-hold_jid", job_id]

    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        out = self.run([self.command("qsub"), *options, script_path])
        m = re.search(r"Your job (\d+)", out)
        if not m:
            raise SchedulerError(f"unexpected qsub output: {out.strip()}")
        return m.group(1)
