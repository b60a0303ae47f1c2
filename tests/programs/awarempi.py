"""mpi4py ranks that checkpoint collectively at step argv[3] (hpcckpt.aware.mpi) and write what they were told;
after "checkpointed" they wait (argv[4] s) to be killed, so that only a restart carries them on.
    awarempi.py OUTPREFIX STEPS ASK_AT WAIT"""
import sys
import time

from mpi4py import MPI

from hpcckpt.aware import mpi as aware_mpi

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
out = open(f"{sys.argv[1]}.{rank}", "a", buffering=1)
steps, ask_at, wait = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
total = 0
for i in range(steps):
    total += comm.allreduce(i + rank)
    out.write(f"step {i} {total}\n")
    if i == ask_at:
        result = aware_mpi.checkpoint(comm, timeout=120)
        out.write(f"checkpoint -> {result}\n")
        if result == "checkpointed":
            time.sleep(wait)
    time.sleep(0.01)
out.write("done\n")
