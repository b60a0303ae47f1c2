"""A small MPI job for checkpoint tests: every step each rank passes a block of numbers around a ring
(Sendrecv), mixes it with its own (deterministically), and all ranks agree on a sum (Allreduce). Rank 0 appends
one line per step to OUT and, at the end, the checksum of everything; at the start it writes the host of every
rank to OUT.hosts (for tests spanning hosts). The result does not depend on timing, so a
checkpointed/restarted run must print exactly what a plain run prints.

usage: python mpiring.py OUT STEPS [DELAY_SECONDS]
"""
import socket
import sys
import time
from array import array

from mpi4py import MPI


def main() -> int:
    out, steps = sys.argv[1], int(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    M = (1 << 61) - 1
    n = 4096
    mine = array("q", (((rank + 1) * 1000003 + i * 7919) % M for i in range(n)))
    recv = array("q", bytes(8 * n))
    check = 0
    hosts = comm.gather(socket.gethostname(), root=0)
    if rank == 0:
        with open(out + ".hosts", "w") as h:
            h.write("".join(f"rank {r} {name}\n" for r, name in enumerate(hosts)))
    f = open(out, "a") if rank == 0 else None
    for step in range(steps):
        comm.Sendrecv(mine, dest=(rank + 1) % size, recvbuf=recv, source=(rank - 1) % size)
        mine = array("q", ((a * 31 + b * 17 + step) % M for a, b in zip(mine, recv)))
        local = array("q", [sum(mine) % M])
        total = array("q", [0])
        comm.Allreduce(local, total, op=MPI.SUM)
        obj = comm.bcast({"step": step, "total": total[0]} if rank == 0 else None, root=0)
        check = (check * 1000003 + obj["total"] + obj["step"]) % M
        if f:
            f.write(f"step {step} total {total[0]}\n")
            f.flush()
        time.sleep(delay)
    allchecks = comm.gather(check, root=0)
    if f:
        f.write(f"checksum {allchecks[0]} agree {len(set(allchecks)) == 1} ranks {size}\n")
        f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
