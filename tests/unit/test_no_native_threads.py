"""Our long-lived processes take signals through signalfd (the batch driver, the agent): a signal blocked in
the main thread but not in a native thread that some library started at import is delivered to that thread and
its default action kills the process. numpy's BLAS pool did that to the batch driver's warning signal."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import os
import hpcckpt.sched.driver, hpcckpt.sched.computation, hpcckpt.agent.agent, hpcckpt.coordinator.server
import hpcckpt.image.codec, hpcckpt.image.levels, hpcckpt.cli.main
print(len(os.listdir("/proc/self/task")), os.environ.get("OPENBLAS_NUM_THREADS"))
"""


def test_importing_our_modules_starts_no_native_thread_and_leaves_the_environment_alone():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["1", "None"], f"threads after import, OPENBLAS_NUM_THREADS: {out}"
