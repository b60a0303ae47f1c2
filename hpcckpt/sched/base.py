"""One interface for batch schedulers: Slurm, PBS and Grid Engine differ only in their adapter modules; the
deadline -> checkpoint -> requeue policy (driver.py) is written once, above them."""
from __future__ import annotations

import os
import shlex
import subprocess
from abc import ABC, abstractmethod

CANCELLED_MARK = ".hpcckpt-cancelled"     # in the checkpoint dir: the ids of runs the user cancelled


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
        """The nodes of this run's allocation, in the scheduler's order (the first runs the batch script)."""
        return [os.uname().nodename]

    def this_node(self, nodes: list[str]) -> str:
        """Which of nodes (node_list()) this process runs on: the one named like this host, else the first."""
        me = os.uname().nodename
        for n in nodes:
            if n == me or n.split(".")[0] == me.split(".")[0]:
                return n
        return nodes[0] if nodes else me

    # -- starting a command on another node of the job ----------------------------------------------------------
    remote_stdin = True             # does remote_command hand the command our standard input?

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        """The command line that runs argv on host, a node of this job, as part of the job (restarting a
        computation's part there). Default: ssh."""
        return ssh_command(host, argv)

    # -- submitting -------------------------------------------------------------------------------------------
    @abstractmethod
    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        """Submit a batch script; returns the job id."""

    def predecessor_stopped(self, ckptdir: str) -> str | None:
        """Why this run must not go on although the scheduler started it (a PBS continuation whose
        predecessor the user deleted), else None."""
        return None

    def cancel_continuation(self) -> None:
        """The user cancelled this run after its continuation was submitted: withdraw the continuation."""

    def run(self, cmd: list[str], timeout: float = 30, cwd: str | None = None) -> str:
        env = self.env if cwd is None else dict(self.env, PWD=cwd)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        except FileNotFoundError:
            raise SchedulerError(f"{cmd[0]}: command not found (is {self.name} installed and on PATH?)") from None
        except subprocess.TimeoutExpired:
            raise SchedulerError(f"{' '.join(cmd)} did not answer within {timeout:.0f} s") from None
        if r.returncode != 0:
            raise SchedulerError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
        return r.stdout


def ssh_command(host: str, argv: list[str]) -> list[str]:
    return ["ssh", host, shlex.join(argv)]


class Ssh:
    """Not a scheduler: how other hosts are reached outside any batch job."""
    name = "ssh"
    remote_stdin = True

    def __init__(self, env: dict | None = None):
        self.env = dict(os.environ if env is None else env)

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        return ssh_command(host, argv)


LAUNCHERS = ("ssh", "srun", "pbs", "sge")


def remote_launcher(name: str | None = None, env: dict | None = None) -> Scheduler | Ssh:
    """The way to run a command on another node: name is one of LAUNCHERS ("srun": Slurm's, "pbs": pbs_tmrsh,
    "sge": qrsh -inherit), or None for the scheduler whose job this process runs in (ssh outside any job)."""
    env = dict(os.environ if env is None else env)
    if name is None:
        return detect(env) or Ssh()
    from .pbs import PBS
    from .sge import SGE
    from .slurm import Slurm
    try:
        return {"ssh": Ssh, "srun": Slurm, "slurm": Slurm, "pbs": PBS, "sge": SGE}[name](env)
    except KeyError:
        raise ValueError(f"unknown launcher {name!r} (known: {', '.join(LAUNCHERS)})") from None


def detect(env: dict | None = None) -> Scheduler | None:
    env = dict(os.environ if env is None else env)
    from .pbs import PBS
    from .sge import SGE
    from .slurm import Slurm
    for cls in (Slurm, PBS, SGE):
        if cls.detect(env):
            return cls(env)
    return None


def process_start(pid: int | str = "self") -> float | None:
    """Epoch seconds at which process pid started (from /proc: boot time + its start in clock ticks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def ancestor_named(prefix: str, pid: int | None = None) -> int | None:
    """The nearest ancestor of pid (default: this process) whose command name starts with prefix."""
    pid = os.getppid() if pid is None else pid
    for _ in range(64):
        if pid <= 1:
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            return None
        comm = text[text.index("(") + 1:text.rindex(")")]
        if comm.startswith(prefix):
            return pid
        pid = int(text.rsplit(")", 1)[1].split()[1])
    return None
