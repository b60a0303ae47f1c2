"""One interface for batch schedulers: Slurm, PBS and Grid Engine differ only in their adapter modules; the
deadline -> checkpoint -> requeue policy (driver.py) is written once, above them."""
from __future__ import annotations

import os
import subprocess
from abc import ABC, abstractmethod


class SchedulerError(RuntimeError):
    pass


class Scheduler(ABC):
    name = "base"
    directive = "#"                 # prefix of in-script options (#SBATCH, #PBS, #$)

    def __init__(self, env: dict | None = None):
        self.env = dict(os.environ if env is None else env)

    # -- inside a job -----------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def detect(cls, env: dict) -> bool:
        """Is this process running inside a job of this scheduler?"""

    @abstractmethod
    def job_id(self) -> str:
        """The id to requeue/continue this job with (array jobs: the task's own id)."""

    @abstractmethod
    def run_count(self) -> int:
        """0 on the first run, then how many times the job was requeued/continued."""

    @abstractmethod
    def end_time(self) -> float | None:
        """Epoch seconds at which the scheduler will end this run (None: no limit)."""

    @abstractmethod
    def requeue(self) -> int | None:
        """Make the job run again later. Returns the exit code this run should end with now, or None when the
        scheduler itself stops this run (Slurm's requeue kills it)."""

    def cancelled(self) -> bool:
        """Was the job cancelled by its user (as opposed to preempted)?"""
        return False

    def submit_dir(self) -> str:
        return os.getcwd()

    def node_list(self) -> list[str]:
        return [os.uname().nodename]

    # -- submitting -------------------------------------------------------------------------------------------
    @abstractmethod
    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        """Submit a batch script; returns the job id."""

    def run(self, cmd: list[str], timeout: float = 30) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        except FileNotFoundError:
            raise SchedulerError(f"{cmd[0]}: command not found (is {self.name} installed and on PATH?)") from None
        except subprocess.TimeoutExpired:
            raise SchedulerError(f"{' '.join(cmd)} did not answer within {timeout:.0f} s") from None
        if r.returncode != 0:
            raise SchedulerError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
        return r.stdout


def detect(env: dict | None = None) -> Scheduler | None:
    env = dict(os.environ if env is None else env)
    from .pbs import PBS
    from .sge import SGE
    from .slurm import Slurm
    for cls in (Slurm, PBS, SGE):
        if cls.detect(env):
            return cls(env)
    return None
