"""The one list of schedulers: name -> adapter class. The submit side (cli/batch.py), the driver's detection
(which scheduler's job is this?) and the remote launchers (cli/multihost.py) all look here.

Adding a scheduler: write its adapter (a Scheduler subclass in one module of sched/) and add it to SCHEDULERS."""
from __future__ import annotations

from .base import Scheduler, Ssh
from .local import Local
from .pbs import PBS
from .sge import SGE
from .slurm import Slurm

# in detection order: the first whose detect() sees its job's variables wins (the local scheduler last: a real
# scheduler's job started from a local one is that scheduler's)
SCHEDULERS: dict[str, type[Scheduler]] = {"slurm": Slurm, "pbs": PBS, "sge": SGE, "local": Local}

# how another node of a job is reached (restart --launcher): ssh outside any job, else a scheduler's own way
LAUNCHERS: tuple[str, ...] = ("ssh",) + tuple(c.launcher for c in SCHEDULERS.values() if c.launcher)


def get(name: str, env: dict[str, str] | None = None) -> Scheduler:
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})") from None
    return cls(env)


def detect(env: dict[str, str] | None = None) -> Scheduler | None:
    """The scheduler whose job this process runs in (from the environment), else None."""
    import os
    env = dict(os.environ if env is None else env)
    for cls in SCHEDULERS.values():
        if cls.detect(env):
            return cls(env)
    return None


def remote_launcher(name: str | None = None, env: dict[str, str] | None = None) -> Scheduler | Ssh:
    """The way to run a command on another node: name is one of LAUNCHERS ("srun": Slurm's, "pbs": pbs_tmrsh,
    "sge": qrsh -inherit), or None for the scheduler whose job this process runs in (ssh outside any job)."""
    if name is None:
        return detect(env) or Ssh(env)
    if name == "ssh":
        return Ssh(env)
    for key, cls in SCHEDULERS.items():
        if name in (key, cls.launcher):
            return cls(env)
    raise ValueError(f"unknown launcher {name!r} (known: {', '.join(LAUNCHERS)})")
