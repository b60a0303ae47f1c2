"""CPython workload: its own dict/list state, a numpy computation (OpenBLAS starts threads), an open output
file and installed signal handlers. Writes one line per step to argv[1]; steps = argv[2]; delay = argv[3] s.
SIGUSR1 increments a counter shown in the output (handlers must survive a restart)."""
import hashlib
import signal
import sys
import time

import numpy as np

out_path, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
usr1 = 0


def on_usr1(signum, frame):
    global usr1
    usr1 += 1


signal.signal(signal.SIGUSR1, on_usr1)
state = {"history": [], "acc": 0}
rng = np.random.default_rng(1234)
a = rng.standard_normal((300, 300))
with open(out_path, "w", buffering=1) as out:
    for step in range(1, steps + 1):
        b = a @ a.T / 300.0                 # BLAS (threads)
        a = np.tanh(b + 0.01 * step)
        state["acc"] = (state["acc"] * 31 + int(abs(a).sum() * 1000)) % (1 << 61)
        state["history"].append(step * step)
        if len(state["history"]) > 50:
            state["history"].pop(0)
        digest = hashlib.sha256(a.tobytes()).hexdigest()[:16]
        out.write(f"step {step} acc {state['acc']} hist {sum(state['history'])} sha {digest} usr1 {usr1}\n")
        time.sleep(delay)
    out.write("done\n")
