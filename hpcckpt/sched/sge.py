"""Grid Engine adapter (verified against Debian's gridengine 8.1.9 via sge/local-cell.sh).

Facts it is built on: `exit 99` from the job script reschedules the job (same JOB_ID, RESTARTED=1 in the
rerun); `-l s_rt=` sends SIGUSR1 at the soft limit and `-l h_rt=` is the hard limit; `-notify` sends SIGUSR2
ahead of a qdel. The deadline comes from h_rt and the job's start time (`qstat -j`), the warning from s_rt
(the config's `signal: USR1`); a qdel (SIGUSR2 with -notify, then SIGKILL) is never requeued.
"""
from __future__ import annotations

import os
import re
import time

from .base import Scheduler, SchedulerError
from .pbs import hms


class SGE(Scheduler):
    name = "sge"
    directive = "#$"

    @classmethod
    def detect(cls, env: dict) -> bool:
        return bool(env.get("JOB_ID") and (env.get("SGE_ROOT") or env.get("SGE_TASK_ID")))

    def job_id(self) -> str:
        return self.env["JOB_ID"]

    def run_count(self) -> int:
        return 1 if self.env.get("RESTARTED") == "1" else 0   # the driver keeps its own exact count

    def _cmd(self, name: str) -> str:
        return self.env.get(f"HPCCKPT_{name.upper()}") or self.env.get(f"SGE_{name.upper()}") or name

    def end_time(self) -> float | None:
        out = self.run([self._cmd("qstat"), "-j", self.job_id()])
        m = re.search(r"h_rt=(\d+(?::\d+){0,2})", out)
        if not m:
            return None
        limit = hms(m.group(1)) if ":" in m.group(1) else int(m.group(1))
        start = re.search(r"start_time\s+\d*:?\s*(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)", out)
        if start:
            t0 = time.mktime(time.strptime(start.group(1), "%m/%d/%Y %H:%M:%S"))
        else:
            t0 = float(self.env.get("HPCCKPT_STARTED", time.time()))
        return t0 + limit

    def cancelled(self) -> bool:
        return True

    def submit_dir(self) -> str:
        return self.env.get("SGE_O_WORKDIR") or os.getcwd()

    def requeue(self) -> int | None:
        return 99            # exit 99: Grid Engine reschedules the job

    def node_list(self) -> list[str]:
        """$PE_HOSTFILE's hosts ("host slots queue processors" lines; the first runs the job script)."""
        path = self.env.get("PE_HOSTFILE")
        if path and os.path.exists(path):
            with open(path) as f:
                return list(dict.fromkeys(line.split()[0] for line in f if line.strip()))
        return super().node_list()

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        """qrsh -inherit: a task of this job's parallel environment on host (the PE needs control_slaves)."""
        return [self._cmd("qrsh"), "-inherit", host, *argv]

    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        out = self.run([self._cmd("qsub"), *options, script_path])
        m = re.search(r"Your job (\d+)", out)
        if not m:
            raise SchedulerError(f"unexpected qsub output: {out.strip()}")
        return m.group(1)
