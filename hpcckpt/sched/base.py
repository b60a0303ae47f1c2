"""One interface for batch schedulers: Slurm, PBS, Grid Engine and the local scheduler differ only in their
adapter modules, listed in registry.py; the deadline -> checkpoint -> requeue policy (driver.py) is written once,
above them, and so is the submit side (cli/batch.py), which asks the adapter for everything scheduler-specific:
the wrapper's directives and environment, how its options split, how a job is submitted.

This module is the ground of sched/: it imports no adapter (registry.py does) and nothing above sched/."""
from __future__ import annotations

import os
import shlex
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import JobConfig

CANCELLED_MARK = ".hpcckpt-cancelled"     # in the checkpoint dir: the ids of runs the user cancelled

# qsub options without a value (PBS's and Grid Engine's, as `hpcckpt qsub` has always split them)
QSUB_FLAGS = frozenset({"-V", "-h", "-I", "-z", "-f", "-X", "-cwd", "-notify", "-now"})


class SchedulerError(RuntimeError):
    pass


@dataclass(frozen=True)
class Requeued:
    """What Scheduler.requeue() did. exit_code: what this run ends with now (None: the scheduler stops this run
    itself, as Slurm's requeue does); continuation: the id of the job that carries on (a PBS continuation),
    None when the same job runs again."""
    exit_code: int | None
    continuation: str | None = None


class Scheduler(ABC):
    name = "base"
    directive = "#"                 # prefix of in-script options (#SBATCH, #PBS, #$)
    launcher: str | None = None     # its name as a --launcher (registry.LAUNCHERS), if it starts remote commands
    warns_every_process = False     # does its warning signal reach every process of the job (Grid Engine)?
    keeps_wrapper = True            # submit: keep the generated wrapper (a PBS continuation submits it again)
    wrapper_commands: tuple[str, ...] = ()   # scheduler commands the job must find where the submit did
    option_flags: frozenset[str] = frozenset()     # submit options without a value
    option_pairs: frozenset[str] = frozenset()     # submit options with two values (Grid Engine's -pe)

    def __init__(self, env: dict[str, str] | None = None):
        self.env: dict[str, str] = dict(os.environ if env is None else env)

    # -- inside a job -----------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def detect(cls, env: dict[str, str]) -> bool:
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
    def requeue(self) -> Requeued:
        """Make the job run again later; says what happened (Requeued)."""

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

    def predecessor_stopped(self, ckptdir: str) -> str | None:
        """Why this run must not go on although the scheduler started it (a PBS continuation whose
        predecessor the user deleted), else None."""
        return None

    def cancel_continuation(self, continuation: str) -> None:  # noqa: B027 - optional: no continuations by default
        """The user cancelled this run after its continuation (Requeued.continuation) was submitted: withdraw
        it."""

    # -- starting a command on another node of the job ----------------------------------------------------------
    remote_stdin = True             # does remote_command hand the command our standard input?

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        """The command line that runs argv on host, a node of this job, as part of the job (restarting a
        computation's part there). Default: ssh."""
        return ssh_command(host, argv)

    # -- the submit side --------------------------------------------------------------------------------------
    @classmethod
    def installed(cls, env: dict[str, str]) -> bool:
        """Does the environment point at this scheduler (for a submit that does not name one)?"""
        return False

    def option_values(self, opt: str) -> int:
        """How many following words are the value of a submit option: none for option_flags, two for
        option_pairs, else one (a scheduler with --opt=value or bundled short options says so here)."""
        return 0 if opt in self.option_flags else (2 if opt in self.option_pairs else 1)

    def split_options(self, args: list[str]) -> tuple[list[str], list[str]]:
        """(the scheduler's submit options, [job script, its args...]) of a submit command line; how many words
        each option takes: option_values()."""
        opts: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                return opts, args[i + 1:]
            if not a.startswith("-") or a == "-":
                return opts, args[i:]
            opts.append(a)
            take = self.option_values(a)
            opts.extend(args[i + 1:i + 1 + take])
            i += 1 + take
        return opts, []

    def script_directives(self, script: str) -> list[str]:
        """The script's own directive lines (#SBATCH ...), verbatim: they go into the wrapper."""
        return read_directives(script, self.directive)

    def wrapper_directives(self, cfg: JobConfig) -> list[str]:
        """Directives the wrapper adds after the script's own (requeue on, the warning signal, ...)."""
        return []

    def wrapper_env(self) -> dict[str, str]:
        """Variables the wrapper exports before the driver starts: the scheduler's commands at the paths the
        submit found them (the job's PATH may lack them)."""
        import shutil
        out: dict[str, str] = {}
        for c in self.wrapper_commands:
            path: str | None = self.command(c)
            if path and not os.path.isabs(path):
                path = shutil.which(path)
            if path:
                out[f"HPCCKPT_{c.upper()}"] = path
        return out

    def submit_options(self, opts: list[str], wrapper: str) -> list[str]:
        """The options the wrapper is submitted with (the user's, adjusted where the scheduler needs it)."""
        return list(opts)

    def after_job_options(self, job_id: str) -> list[str]:
        """Submit options that hold a job until job_id has ended, whatever its state (hpcckpt adopt's
        continuation job)."""
        raise SchedulerError(f"{self.name}: cannot hold a job until another one ends")

    @abstractmethod
    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        """Submit a batch script; returns the job id."""

    # -- running the scheduler's commands ---------------------------------------------------------------------
    def command(self, name: str) -> str:
        """The path or name of one of the scheduler's commands (HPCCKPT_<NAME> overrides)."""
        return self.env.get(f"HPCCKPT_{name.upper()}") or name

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

    def __init__(self, env: dict[str, str] | None = None):
        self.env = dict(os.environ if env is None else env)

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        return ssh_command(host, argv)


def read_directives(script: str, prefix: str) -> list[str]:
    """The scheduler's in-script option lines (#SBATCH ...) at the top of the script, verbatim."""
    out = []
    with open(script, errors="replace") as f:
        for n, line in enumerate(f):
            s = line.strip()
            if n == 0 and s.startswith("#!"):
                continue
            if s.startswith(prefix):
                out.append(s)
            elif s and not s.startswith("#"):
                break                 # like sbatch: directives end at the first command
    return out


def hms(text: str) -> int:
    """[[H:]M:]S in seconds (PBS walltime, Grid Engine h_rt)."""
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return h * 3600 + m * 60 + s


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
