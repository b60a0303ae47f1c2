"""A batch job's driver with a stand-in computation, for tests of the driver's policy (test_driver_policy.py).

Run as the job script of a local-scheduler job (hpcckpt/sched/local.py):

    standin_job.py CONFIG WORK_S [EXIT_CODE]

The real JobDriver runs with the real local scheduler; only the computation is a stand-in: a real process
(`sleep` for the work left) in a session of its own, whose progress a "checkpoint" records in the checkpoint
directory (standin.json) and a restart resumes. STANDIN_FAIL=1 in the environment makes every checkpoint fail
(as a full disk would). What the driver asked of it goes to standin.log there (one line per call).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from hpcckpt.sched import registry
from hpcckpt.sched.computation import Computation
from hpcckpt.sched.config import JobConfig, load
from hpcckpt.sched.driver import JobDriver


class StandIn(Computation):
    work_s = 1.0
    exit_code = 0
    nodes: list[str] = []

    def __init__(self, ckptdir: str, cfg: JobConfig, warnings: tuple[int, ...]):
        super().__init__(ckptdir, cfg, warnings)
        self.state_file = os.path.join(ckptdir, "standin.json")
        self.started = 0.0
        self.done_before = 0.0
        self.proc: subprocess.Popen | None = None
        self.polled = False

    def _note(self, text: str) -> None:
        with open(os.path.join(self.ckptdir, "standin.log"), "a") as f:
            f.write(text + "\n")

    def _saved(self) -> dict | None:
        try:
            with open(self.state_file) as f:
                return dict(json.load(f))
        except OSError:
            return None

    def latest(self):                                    # a manifest's fields the driver reads
        s = self._saved()
        if s is None:
            return None
        return SimpleNamespace(generation=s["generation"], created=s["created"], computation="standin",
                               images=[SimpleNamespace(host=h) for h in s["hosts"]])

    def start(self, restart: bool, command_line: list[str], hostfile: str | None = None) -> None:
        s = self._saved() if restart else None
        self.done_before = s["done"] if s else 0.0
        if hostfile:
            with open(hostfile) as f:
                self._note("hostfile " + " ".join(f.read().split()))
        self._note(f"start restart={restart} done={self.done_before:.2f}")
        left = max(0.0, self.work_s - self.done_before)
        self.started = time.monotonic()
        self.polled = False
        self.proc = subprocess.Popen(["/bin/sh", "-c", f"sleep {left:.3f}; exit {self.exit_code}"],
                                     start_new_session=True)

    def wait_joined(self, timeout: float = 120) -> bool:
        return self.poll() is None

    def poll(self) -> int | None:
        if not self.polled:                  # the driver is watching: its signal handling is in place
            self.polled = True
            self._note("watching")
        return self.proc.poll() if self.proc else 0

    def signal(self, signo: int) -> None:
        self._note(f"signal {signal.Signals(signo).name}")

    def status(self) -> dict:
        s = self._saved()
        if not s:
            return {}
        return {"last_checkpoint": {"generation": s["generation"], "duration_s": 0.01, "bytes_out": 0,
                                    "frozen_s": 0.0}}

    def checkpoint(self, limit: float, frozen: bool = False) -> dict:
        if os.environ.get("STANDIN_FAIL"):
            self._note("checkpoint failed")
            return {"ok": False, "error": "[Errno 28] No space left on device"}
        s = self._saved() or {"generation": 0}
        done = self.done_before + time.monotonic() - self.started
        state = {"generation": s["generation"] + 1, "created": time.time(), "done": done, "hosts": self.nodes}
        with open(self.state_file + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(self.state_file + ".tmp", self.state_file)
        self._note(f"checkpoint {state['generation']} done={done:.2f} {'frozen' if frozen else 'forked'}")
        return {"ok": True, "generation": state["generation"]}

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._note("kill")

    def stop(self) -> None:
        pass

    def env(self) -> dict[str, str]:
        return dict(os.environ)


def main() -> int:
    config, work = sys.argv[1], float(sys.argv[2])
    StandIn.work_s = work
    StandIn.exit_code = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sched = registry.detect()
    assert sched is not None and sched.name == "local", "not inside a local-scheduler job"
    StandIn.nodes = sched.node_list()
    JobDriver.poll_s = 0.05
    here = sched.this_node(StandIn.nodes)
    driver = JobDriver(sched, load(config), ["standin"], computation=StandIn, is_local=lambda h: h == here)
    return driver.run()


if __name__ == "__main__":
    sys.exit(main())
