"""PBS Pro / OpenPBS adapter (verified here against the OpenPBS emulator in tests/pbs_emulator; `make test-pbs`
with PBS_EXEC runs the same scenario on a real server).

Facts it is built on (OpenPBS 23.06): no warning signal before the walltime and no remaining-time variable,
so the deadline comes from `qstat -f $PBS_JOBID` (Resource_List.walltime, and stime, reset on each rerun); at
the limit every process gets SIGTERM, then SIGKILL after the queue's kill_delay, and the job is not rerun even
with -r y; `qrerun` from inside a job fails for ordinary users (Unauthorized Request, 159). So the default way
to go on is a continuation job: before exiting, the job submits its own wrapper again with
`-W depend=afterany:$PBS_JOBID`, carrying the checkpoint directory and a run counter (-v). `qrerun` is used only
when the config asks for it (requeue_method: qrerun), and only at a genuine deadline.
"""
from __future__ import annotations

import os
import time

from .base import Scheduler, SchedulerError


def parse_qstat_f(text: str) -> dict[str, str]:
    """`qstat -f` attributes (continuation lines folded back)."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("\t") and key:
            out[key] += line.strip()           # a folded continuation line
        elif " = " in line:
            key, _, value = line.strip().partition(" = ")
            out[key] = value
    return out


def hms(text: str) -> int:
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return h * 3600 + m * 60 + s


class PBS(Scheduler):
    name = "pbs"
    directive = "#PBS"

    @classmethod
    def detect(cls, env: dict) -> bool:
        return bool(env.get("PBS_JOBID"))

    def job_id(self) -> str:
        return self.env["PBS_JOBID"]

    def run_count(self) -> int:
        try:
            return int(self.env.get("HPCCKPT_RUN") or 0)      # continuation jobs carry it
        except ValueError:
            return 0

    def _qstat(self) -> dict[str, str]:
        return parse_qstat_f(self.run([self._cmd("qstat"), "-f", self.job_id()]))

    def _cmd(self, name: str) -> str:
        exec_dir = self.env.get("PBS_EXEC")
        return os.path.join(exec_dir, "bin", name) if exec_dir else self.env.get(f"HPCCKPT_{name.upper()}", name)

    def end_time(self) -> float | None:
        a = self._qstat()
        wall = a.get("Resource_List.walltime")
        stime = a.get("stime")
        if not wall or not stime:
            return None
        start = time.mktime(time.strptime(stime, "%a %b %d %H:%M:%S %Y"))
        return start + hms(wall)

    def cancelled(self) -> bool:
        return True      # PBS sends SIGTERM for qdel and at the walltime alike; we checkpoint before the latter

    def submit_dir(self) -> str:
        return self.env.get("PBS_O_WORKDIR") or os.getcwd()

    def node_list(self) -> list[str]:
        """$PBS_NODEFILE's hosts in its order (the first runs the job script), each once (one line per slot)."""
        path = self.env.get("PBS_NODEFILE")
        if path and os.path.exists(path):
            with open(path) as f:
                return list(dict.fromkeys(line.strip() for line in f if line.strip()))
        return super().node_list()

    remote_stdin = False            # tm_spawn: the task's standard input is not ours

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        """pbs_tmrsh (the Task Manager's rsh): the command runs as a task of this job on host, which must be
        in $PBS_NODEFILE."""
        return [self._cmd("pbs_tmrsh"), host, *argv]

    def requeue(self) -> int | None:
        """Submit the continuation (our own wrapper again, after this job) and return 0: this run ends."""
        wrapper = self.env.get("HPCCKPT_WRAPPER")
        if not wrapper or not os.path.exists(wrapper):
            raise SchedulerError("cannot continue: the wrapper script (HPCCKPT_WRAPPER) is gone")
        carry = {"HPCCKPT_RUN": str(self.run_count() + 1), "HPCCKPT_WRAPPER": wrapper,
                 "HPCCKPT_CKPTDIR": self.env.get("HPCCKPT_CKPTDIR", "")}
        try:
            import json
            with open(wrapper + ".opts") as f:          # the options the job was first submitted with
                opts = json.load(f)
        except (OSError, ValueError):
            opts = []
        out = self.run([self._cmd("qsub"), *opts, "-W", f"depend=afterany:{self.job_id()}",
                        "-v", ",".join(f"{k}={v}" for k, v in carry.items() if v), wrapper])
        self.continuation = out.strip()
        return 0

    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        return self.run([self._cmd("qsub"), *options, script_path]).strip()
