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
RANK_VARIABLES = (b"PMI_RANK=", b"PMIX_RANK=", b"OMPI_COMM_WORLD_RANK=", b"SLURM_PROCID=")


def mpi_rank_of(pid: int) -> int | None:
    """The MPI rank (or srun task number) a process was started as, from its environment; None if not one."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for var in RANK_VARIABLES:
        for item in env:
            if item.startswith(var):
                try:
                    return int(item[len(var):])
                except ValueError:
                    break
    return None
