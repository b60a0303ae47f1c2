"""Collective checkpoints for mpi4py programs: every rank calls checkpoint(comm) at the same iteration boundary;
rank 0 asks for the checkpoint, the others wait for that same checkpoint, and all return the same answer
("checkpointed", or "restarted" after a restart)."""
from __future__ import annotations

from . import NotEnabled, _channel, is_enabled


def checkpoint(comm, timeout: float | None = None) -> str:
    if not is_enabled():
        raise NotEnabled("not running under hpcckpt (start the job with dmtcp_launch mpiexec ...)")
    rank = comm.Get_rank()
    # the other ranks' waits reach their agents before rank 0 asks (the barrier): no rank misses the checkpoint,
    # and an agent reads them before it freezes its processes
    waiting = _channel.ask({"op": "await"}) if rank != 0 else None
    comm.Barrier()
    if waiting is None:
        result = _channel.call({"op": "checkpoint"}, timeout)["result"]
    else:
        result = _channel.answer(*waiting, timeout)["result"]
    comm.Barrier()
    return result
