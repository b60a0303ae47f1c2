"""A Python program that cooperates with its checkpoints (hpcckpt.aware): hooks for every event, a critical
section in delayed_checkpoints(), and a checkpoint it asks for itself at step argv[3]; after that it waits
(argv[4] seconds) to be killed, so that only a restart carries it on.

    awareprog.py OUT STEPS ASK_AT WAIT
Lines: "step N", "hook <event>", "checkpoint -> <result>", "enabled <bool>", "critical enter/leave <time>"."""
import sys
import time

from hpcckpt import aware

out = open(sys.argv[1], "a", buffering=1)
steps, ask_at, wait = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
out.write(f"enabled {aware.is_enabled()}\n")
if not aware.is_enabled():
    try:
        aware.checkpoint()
    except aware.NotEnabled:
        out.write("checkpoint -> NotEnabled\n")
    sys.exit(0)
for event in aware.EVENTS:
    aware.on(event, lambda event=event: out.write(f"hook {event}\n"))
st = aware.status()
out.write(f"status computation {bool(st['computation'])} restarted {st['restarted']}\n")
for i in range(steps):
    out.write(f"step {i}\n")
    time.sleep(0.01)
    if i == ask_at:
        result = aware.checkpoint()
        out.write(f"checkpoint -> {result}\n")
        if result == "checkpointed":
            time.sleep(wait)
    if i == ask_at + 5:
        with aware.delayed_checkpoints():
            with aware.delayed_checkpoints():          # nesting counts once
                out.write(f"critical enter {time.time():.3f}\n")
                time.sleep(1.5)
                out.write(f"critical leave {time.time():.3f}\n")
out.write("done\n")
