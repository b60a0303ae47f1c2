"""The local scheduler: batch jobs on this machine, without a cluster (as submitit's local executor).

A job is the batch script run in a process group of its own by a supervisor process
(`python -m hpcckpt.sched.local supervise JOBDIR`, detached from the submitter), which enforces what a real
scheduler does at its limits:
  - the wall time (`--time=SECONDS`): at the end every process of the group gets SIGTERM, SIGKILL
    `--kill-delay` seconds later (default 5), and the job ends TIMEOUT;
  - the warning signal (`--signal=[B:]SIG@SECONDS`): SIG to the batch script that many seconds before the end;
  - a requeue (Local.requeue from inside the job): the run ends, the supervisor runs the script again (a new
    wall time, HPCCKPT_LOCAL_RUN one higher);
  - a cancel (`python -m hpcckpt.sched.local cancel ID`): marked (so cancelled() is true), then SIGTERM to the
    group, SIGKILL after the kill delay; never rerun.
`--nodes=a,b` names the nodes the job's allocation has (node_list; all run here), for tests of the driver's
node mapping; the supervisor reads job.json again at every run, so a changed "nodes" there is what the next run
gets (as when a node was drained). Jobs live in $HPCCKPT_LOCAL_SPOOL (default ~/.hpcckpt/local-jobs)/ID:
job.json (what was submitted), state.json (state, runs, exit code, the running script's pid), requeue and
cancel marks, and the job's output (`-o FILE`, default ID.out in the submit directory), appended across runs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .base import Requeued, Scheduler, SchedulerError

STATES_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def spool(env: dict[str, str]) -> str:
    return env.get("HPCCKPT_LOCAL_SPOOL") or os.path.join(os.path.expanduser("~"), ".hpcckpt", "local-jobs")


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_state(jobdir: str) -> dict:
    try:
        with open(os.path.join(jobdir, "state.json")) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {"state": "PENDING", "runs": 0}


class Local(Scheduler):
    name = "local"
    directive = "#LOCAL"

    @classmethod
    def detect(cls, env: dict[str, str]) -> bool:
        return bool(env.get("HPCCKPT_LOCAL_JOB_ID"))

    def job_id(self) -> str:
        return self.env["HPCCKPT_LOCAL_JOB_ID"]

    def _jobdir(self, job: str | None = None) -> str:
        return os.path.join(spool(self.env), job or self.job_id())

    def run_count(self) -> int:
        return int(self.env.get("HPCCKPT_LOCAL_RUN") or 0)

    def end_time(self) -> float | None:
        end = self.env.get("HPCCKPT_LOCAL_END")
        return float(end) if end else None

    def requeue(self) -> Requeued:
        with open(os.path.join(self._jobdir(), "requeue"), "w"):
            pass
        return Requeued(exit_code=0)             # this run ends; the supervisor runs the job again

    def cancelled(self) -> bool:
        return os.path.exists(os.path.join(self._jobdir(), "cancel"))

    def submit_dir(self) -> str:
        return self.env.get("HPCCKPT_LOCAL_SUBMIT_DIR") or os.getcwd()

    def node_list(self) -> list[str]:
        nodes = [n for n in self.env.get("HPCCKPT_LOCAL_NODES", "").split(",") if n]
        return nodes or super().node_list()

    # -- the submit side --------------------------------------------------------------------------------------
    def option_values(self, opt: str) -> int:
        return 0 if "=" in opt else 1

    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        words = [w for line in self.script_directives(script_path) for w in line[len(self.directive):].split()]
        spec = parse_options(words + options)
        spec.update(script=os.path.abspath(script_path), cwd=cwd)
        os.makedirs(spool(self.env), mode=0o700, exist_ok=True)
        job = _new_id(spool(self.env))
        jobdir = self._jobdir(job)
        spec.setdefault("output", os.path.join(cwd, f"{job}.out"))
        _write_json(os.path.join(jobdir, "job.json"), spec)
        subprocess.Popen([sys.executable, "-m", "hpcckpt.sched.local", "supervise", jobdir], cwd=cwd,
                         env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(jobdir, "supervisor.log"), "ab"), start_new_session=True)
        return job

    def cancel(self, job: str) -> None:
        """Like scancel: marked cancelled, then the supervisor stops the run (TERM, then KILL)."""
        jobdir = self._jobdir(job)
        if not os.path.isdir(jobdir):
            raise SchedulerError(f"local job {job}: no such job in {spool(self.env)}")
        with open(os.path.join(jobdir, "cancel"), "w"):
            pass
        pid = read_state(jobdir).get("pid")
        if pid:
            try:
                os.killpg(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def _new_id(root: str) -> str:
    n = 1 + max((int(x) for x in os.listdir(root) if x.isdigit()), default=0)
    while True:
        try:
            os.mkdir(os.path.join(root, str(n)), 0o700)
            return str(n)
        except FileExistsError:
            n += 1


def parse_options(words: list[str]) -> dict:
    """--time=S, --signal=[B:]SIG@S, --kill-delay=S, --nodes=a,b, -o FILE (also `--opt value`)."""
    spec: dict = {"time": None, "signal": None, "signal_lead": 0.0, "kill_delay": 5.0, "nodes": ""}
    i = 0
    while i < len(words):
        w = words[i]
        name, eq, value = w.partition("=")
        if not eq:
            if i + 1 >= len(words):
                raise SchedulerError(f"local scheduler: option {w} needs a value")
            value = words[i + 1]
            i += 1
        if name in ("--time", "-t"):
            spec["time"] = float(value)
        elif name == "--signal":
            sig, _, lead = value.removeprefix("B:").partition("@")
            spec["signal"] = "SIG" + sig.upper().removeprefix("SIG")
            spec["signal_lead"] = float(lead or 60)
        elif name == "--kill-delay":
            spec["kill_delay"] = float(value)
        elif name == "--nodes":
            spec["nodes"] = value
        elif name in ("-o", "--output"):
            spec["output"] = value
        else:
            raise SchedulerError(f"local scheduler: unknown option {name} (known: --time, --signal, "
                                 "--kill-delay, --nodes, -o)")
        i += 1
    return spec


# ------------------------------------------------------------------------------------------ the supervisor --

def _stop_group(proc: subprocess.Popen, kill_delay: float) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(kill_delay)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # what is left of the group, the script or what it started
    except ProcessLookupError:
        pass
    proc.wait()


def supervise(jobdir: str) -> int:
    """Run the job until it ends without asking for a requeue; state.json says how it went."""
    job = os.path.basename(jobdir)
    runs = 0
    while True:
        with open(os.path.join(jobdir, "job.json")) as f:
            spec = json.load(f)             # read at every run: a changed "nodes" is the next run's allocation
        if os.path.exists(os.path.join(jobdir, "requeue")):
            os.unlink(os.path.join(jobdir, "requeue"))
        start = time.time()
        end = start + spec["time"] if spec["time"] else None
        env = dict(os.environ, HPCCKPT_LOCAL_JOB_ID=job, HPCCKPT_LOCAL_RUN=str(runs),
                   HPCCKPT_LOCAL_SUBMIT_DIR=spec["cwd"], HPCCKPT_LOCAL_NODES=spec["nodes"],
                   HPCCKPT_LOCAL_SPOOL=os.path.dirname(jobdir))
        if end:
            env["HPCCKPT_LOCAL_END"] = f"{end:.3f}"
        with open(spec["output"], "ab") as out:
            proc = subprocess.Popen(["/bin/bash", spec["script"]], cwd=spec["cwd"], env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _write_json(os.path.join(jobdir, "state.json"), {"state": "RUNNING", "runs": runs, "pid": proc.pid})
        state = _watch(proc, spec, end, jobdir)
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        requeued = os.path.exists(os.path.join(jobdir, "requeue"))
        if os.path.exists(os.path.join(jobdir, "cancel")):
            state = "CANCELLED"            # however the run ended after the cancel (it may stop by itself first)
        if state == "ENDED" and requeued:
            runs += 1
            continue
        if state == "ENDED":
            state = "COMPLETED" if code == 0 else "FAILED"
        _write_json(os.path.join(jobdir, "state.json"), {"state": state, "runs": runs, "exit_code": code})
        return 0


def _watch(proc: subprocess.Popen, spec: dict, end: float | None, jobdir: str) -> str:
    warned = spec["signal"] is None
    while proc.poll() is None:
        now = time.time()
        if os.path.exists(os.path.join(jobdir, "cancel")):
            _stop_group(proc, spec["kill_delay"])
            return "CANCELLED"
        if end is not None and not warned and now >= end - spec["signal_lead"]:
            warned = True
            try:
                os.kill(proc.pid, getattr(signal, spec["signal"]))     # B: the batch script only
            except ProcessLookupError:
                pass
        if end is not None and now >= end:
            _stop_group(proc, spec["kill_delay"])
            return "TIMEOUT"
        try:
            proc.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    return "ENDED"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "supervise":
        return supervise(argv[1])
    if len(argv) == 2 and argv[0] == "cancel":
        Local().cancel(argv[1])
        return 0
    print("usage: python -m hpcckpt.sched.local supervise JOBDIR | cancel ID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
