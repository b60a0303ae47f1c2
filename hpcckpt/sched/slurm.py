"""Slurm adapter.

Facts it is built on (verified against Debian's Slurm 22.05 here): the job learns its end from
`scontrol show job` (EndTime, local time) or `squeue -h -j ID -o %L` (time left; UNLIMITED jobs show
364-23:59:58); slurmctld checks limits only every 30 s, so `--signal=B:USR1@W` arrives W to W+30 s before the
end; a job that reaches TIMEOUT is not requeued even with --requeue, so the checkpoint and `scontrol requeue`
must happen before the limit; SLURM_RESTART_COUNT tells a rerun; array tasks are requeued as ARRAYID_TASKID.
"""
from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

from .base import Requeued, Scheduler, SchedulerError

if TYPE_CHECKING:
    from .config import JobConfig

# sbatch options that take no value (everything else starting with "-" and without "=" takes the next word)
SBATCH_FLAGS = frozenset({
    "--requeue", "--no-requeue", "--exclusive", "-H", "--hold", "--parsable", "-W", "--wait", "--test-only", "-v",
    "--verbose", "-Q", "--quiet", "-O", "--overcommit", "--contiguous", "--spread-job", "--use-min-nodes",
    "--ignore-pbs", "--no-kill", "-k", "--oversubscribe", "-s", "--get-user-env", "--reboot", "--thread-spec"})


def parse_duration(text: str) -> int | None:
    """Slurm's [D-]HH:MM:SS / MM:SS / MM forms in seconds; None for UNLIMITED/INVALID."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INVALID", "NOT_SET", "N/A"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = 0, parts[0], 0
    return ((days * 24 + h) * 60 + m) * 60 + s


class Slurm(Scheduler):
    name = "slurm"
    directive = "#SBATCH"
    launcher = "srun"
    keeps_wrapper = False           # sbatch keeps its own copy of the script; a requeue reruns that
    option_flags = SBATCH_FLAGS

    @classmethod
    def detect(cls, env: dict) -> bool:
        return bool(env.get("SLURM_JOB_ID"))

    def job_id(self) -> str:
        if self.env.get("SLURM_ARRAY_JOB_ID") and self.env.get("SLURM_ARRAY_TASK_ID"):
            return f"{self.env['SLURM_ARRAY_JOB_ID']}_{self.env['SLURM_ARRAY_TASK_ID']}"
        return self.env["SLURM_JOB_ID"]

    def run_count(self) -> int:
        try:
            return int(self.env.get("SLURM_RESTART_COUNT") or 0)
        except ValueError:
            return 0

    def _show(self) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", self.env["SLURM_JOB_ID"]])
        fields: dict[str, str] = {}
        for m in re.finditer(r"(\S+?)=(\S*)", out):
            fields.setdefault(m.group(1), m.group(2))
        return fields

    def end_time(self) -> float | None:
        try:
            f = self._show()
            if f.get("TimeLimit", "").upper() == "UNLIMITED":
                return None
            end = f.get("EndTime", "")
            if end and end not in ("Unknown", "None"):
                return time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
        except (SchedulerError, ValueError):
            pass
        left = parse_duration(self.run(["squeue", "-h", "-j", self.env["SLURM_JOB_ID"], "-o", "%L"]))
        if left is None or left >= 364 * 86400:
            return None
        return time.time() + left

    def requeue(self) -> Requeued:
        self.run(["scontrol", "requeue", self.job_id()])
        return Requeued(exit_code=None)          # Slurm stops this run itself

    def cancelled(self) -> bool:
        """scancel shows as COMPLETING (then CANCELLED) by the time the job gets its SIGTERM; a preemption
        (or a bare signal) leaves it RUNNING or PREEMPTED."""
        try:
            state = self._show().get("JobState", "").upper()
        except SchedulerError:
            return False
        return state.startswith("CANCEL") or state in ("COMPLETING", "TIMEOUT", "DEADLINE")

    def submit_dir(self) -> str:
        return self.env.get("SLURM_SUBMIT_DIR") or os.getcwd()

    def node_list(self) -> list[str]:
        nodes = self.env.get("SLURM_JOB_NODELIST")
        if not nodes:
            return super().node_list()
        return self.run(["scontrol", "show", "hostnames", nodes]).split()

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        """A job step of one task on host, sharing the allocation's CPUs with the steps already there
        (--overlap); our standard input goes to it."""
        return ["srun", "--overlap", "-N", "1", "-n", "1", "-w", host, "--input", "0", *argv]

    def this_node(self, nodes: list[str]) -> str:
        return self.env.get("SLURMD_NODENAME") or super().this_node(nodes)

    # -- the submit side --------------------------------------------------------------------------------------
    def option_values(self, opt: str) -> int:
        """sbatch's way: --opt=value and bundled short options (-N2) are one word; the flags none; every other
        option takes the next word."""
        bundled = not opt.startswith("--") and len(opt) > 2
        return 0 if "=" in opt or opt in self.option_flags or bundled else 1

    def wrapper_directives(self, cfg: JobConfig) -> list[str]:
        """Requeue on, the output appended across reruns, and the warning signal as the backup trigger:
        slurmctld sends it up to 30 s late (it checks limits every 30 s), so it is asked for with a shorter lead
        than the driver's own deadline."""
        lead = cfg.lead if cfg.lead != "auto" else cfg.min_lead
        return ["#SBATCH --requeue", "#SBATCH --open-mode=append",
                f"#SBATCH --signal=B:{cfg.signal}@{max(10, int(lead) // 3)}"]

    def after_job_options(self, job_id: str) -> list[str]:
        return [f"--dependency=afterany:{job_id}", "--open-mode=append"]

    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        out = self.run(["sbatch", "--parsable", *options, script_path])
        return out.strip().split(";")[0]
