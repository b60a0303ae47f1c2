"""Collective checkpoints for mpi4py programs: every rank calls checkpoint(comm) at the same iteration boundary;
rank 0 asks for the checkpoint, the others wait for that same checkpoint, and all return the same answer
("checkpointed", or "restarted" after a restart)."""
from __future__ import annotations

import threading

from . import AwareError, NotEnabled, _channel, is_enabled


def checkpoint(comm, timeout: float | None = None) -> str:
    if not is_enabled():
        raise NotEnabled("not running under hpcckpt (start the job with dmtcp_launch mpiexec ...)")
    _channel.connect()
    rank = comm.Get_rank()
    if rank != 0:
        # registered with our agent before rank 0 asks (the barrier below): no rank misses the checkpoint; the
        # agent reads it before it freezes us
        ident = next(_channel.ids)
        ev, box = threading.Event(), []
        _channel.waiting[ident] = (ev, box)
        with _channel.lock:
            _channel._send({"op": "await", "id": ident})
    comm.Barrier()
    if rank == 0:
        result = _channel.call({"op": "checkpoint"}, timeout)["result"]
    else:
        try:
            if not ev.wait(timeout):
                raise AwareError(f"no checkpoint within {timeout:.0f} s")
        finally:
            _channel.waiting.pop(ident, None)
        reply = box[0]
        if reply.get("error"):
            raise AwareError(reply["error"])
        result = reply["result"]
    comm.Barrier()
    return result
