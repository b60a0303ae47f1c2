"""The job's processes as the agent reports them: identities, program names, MPI ranks."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from ..image import store


@dataclass
class JobProcess:
    pid: int
    unique_id: str
    program: str
    exit_status: int | None = None      # shell-style exit code once reaped

    def public(self) -> dict:
        return {"pid": self.pid, "unique_id": self.unique_id, "program": self.program}


def new_unique_id(pid: int) -> str:
    host = store.safe_name(socket.gethostname().split(".")[0])[:16]
    return f"{host}-{pid}-{int(time.time() * 1000) & 0xFFFFFFFFFF:x}"


def new_agent_id() -> str:
    return os.urandom(6).hex()


def program_of(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)"))
    except OSError:
        return "unknown"


# Where MPI launchers put a process's rank (MPICH/Hydra: PMI_RANK; PMIx/Open MPI; Slurm's srun tasks)
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")


def _environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition(b"=")
        if sep:
            env.setdefault(k.decode(errors="replace"), v.decode(errors="replace"))
    return env


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def mpi_identity(pid: int) -> dict | None:
    """{"rank", "world", "world_size"} of an MPI rank (or srun task), from the environment its launcher gave
    it; None if it is not one. `world` names the set of ranks started together (world_size None: unknown)."""
    env = _environ(pid)
    if env is None:
        return None
    rank = next((r for r in (_int(env.get(v)) for v in RANK_VARIABLES) if r is not None), None)
    if rank is None:
        return None
    if "PMIX_NAMESPACE" in env or "OMPI_COMM_WORLD_SIZE" in env:       # Open MPI / PMIx
        size = _int(env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMIX_SIZE"))
        world = f"pmix:{env.get('PMIX_NAMESPACE', '')}"
    elif "PMI_RANK" in env:                                             # MPICH's Hydra (PMI-1/2)
        size = _int(env.get("PMI_SIZE"))
        world = f"pmi:{size}"
    elif env.get("SLURM_STEP_ID", "").isdigit() and int(env["SLURM_STEP_ID"]) < 0xFFFFFFF0:   # an srun task
        size = _int(env.get("SLURM_STEP_NUM_TASKS"))          # (not the batch or extern step's)
        world = f"slurm:{env.get('SLURM_JOB_ID', '')}.{env['SLURM_STEP_ID']}"
    else:
        return {"rank": rank, "world": "", "world_size": None}
    return {"rank": rank, "world": world, "world_size": size}




def environ_var(pid: int, name: str) -> str | None:
    """A variable of a (restored) process's environment as it was at exec (/proc/PID/environ), None if unset."""
    key = name.encode() + b"="
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(key):
                    return item[len(key):].decode()
    except OSError:
        pass
    return None
