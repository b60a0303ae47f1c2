"""hpcckpt adopt PID... — inside a running batch job, take over a process tree started without hpcckpt, so the
usual deadline -> checkpoint -> requeue cycle applies to it from then on (docs/dmtcp-compat.md, "adopt").

The processes are seized and written as generation 1 of a new computation (hpcckpt dump's attach path), and
left stopped; their copy is restarted from that generation under an agent and a coordinator and watched by the
batch driver (sched/driver.py): checkpoints on the config's interval and before the wall-time deadline, then a
continuation. The stopped originals keep the job's batch script waiting on them: when the copy ends, the
original ends with the copy's exit status (an exit_group injected into it), so the script goes on as if
nothing had happened. If the copy cannot be started, the originals are let go again, untouched.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import sys
import time

from ..engine import tree
from ..engine.freeze import FreezeError
from ..engine.inject import ProcessGone
from ..engine.linux import SYS
from ..image import store
from ..sched import config as jobconfig
from ..sched import registry
from ..sched.base import Requeued, Scheduler, SchedulerError
from ..sched.computation import Computation
from ..sched.driver import EVER_COMPLETED, JobDriver
from .common import Fail, Parser, env_fail_rc, run_main, setup_logging
from .dump import dump

log = logging.getLogger("hpcckpt.adopt")

DEADLINE_ENV = "HPCCKPT_DEADLINE"


def parser(prog: str) -> Parser:
    p = Parser(prog, __doc__.split("\n\n")[1])
    p.add_argument("pids", nargs="+", metavar="PID", help="the processes to adopt (the first is the program whose "
                                                          "exit ends the computation)")
    p.add_argument("--tree", action="store_true", help="also every descendant of the processes given")
    p.add_argument("--ckptdir", metavar="DIR", help="where checkpoints go (default: ./hpcckpt-adopt-<job id>)")
    p.add_argument("--config", metavar="YAML", help="batch settings (configs/slurm-job.yaml: interval, lead, keep...)")
    p.add_argument("--deadline", metavar="EPOCH|+S", help=f"the run's end (seconds since the epoch, or +S from now; "
                                                         f"env {DEADLINE_ENV}); default: the scheduler's")
    p.add_argument("--scheduler", choices=("auto", "slurm", "pbs", "sge", "none"), default="auto",
                   help="default: detected from the environment; none: only --deadline, no continuation job")
    p.add_argument("--submit-options", metavar="OPTS", default="",
                   help="options of the continuation job (e.g. \"--time=24:00:00 -p long\"); it waits for this one")
    p.add_argument("--force", action="store_true", help="adopt although some descriptors cannot be saved (they "
                                                        "come back as /dev/null)")
    return p


def parse_deadline(text: str | None) -> float | None:
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        raise Fail(f"--deadline {text!r}: seconds since the epoch, or +S from now", code=2) from None
    return time.time() + v if text.strip().startswith("+") else v


class Adopted(Scheduler):
    """The job as adoption sees it: the scheduler's own (if any) for its end time, nodes and submissions, a
    fresh chain of runs, and a continuation job instead of a requeue (the job's script knows nothing of us)."""
    name = "adopted"

    def __init__(self, inner: Scheduler | None, deadline: float | None, ckptdir: str, cfg_path: str | None,
                 cfg: jobconfig.JobConfig, submit_options: list[str], root: int):
        super().__init__(inner.env if inner is not None else None)
        self.inner, self.deadline, self.ckptdir = inner, deadline, ckptdir
        self.cfg_path, self.cfg, self.continuation_options, self.root = cfg_path, cfg, submit_options, root
        self.continuation: str | None = None

    @classmethod
    def detect(cls, env: dict) -> bool:
        return False

    def job_id(self) -> str:
        return self.inner.job_id() if self.inner is not None else f"adopt-{self.root}"

    def run_count(self) -> int:
        return 0

    def end_time(self) -> float | None:
        if self.deadline is not None:
            return self.deadline
        return self.inner.end_time() if self.inner is not None else None

    def cancelled(self) -> bool:
        return self.inner.cancelled() if self.inner is not None else False

    def node_list(self) -> list[str]:
        return self.inner.node_list() if self.inner is not None else super().node_list()

    def remote_command(self, host: str, argv: list[str]) -> list[str]:
        return self.inner.remote_command(host, argv) if self.inner is not None else super().remote_command(host,
                                                                                                            argv)

    def submit(self, script_path: str, options: list[str], cwd: str) -> str:
        if self.inner is None:
            raise SchedulerError("no scheduler to submit to")
        return self.inner.submit(script_path, options, cwd)

    def requeue(self) -> Requeued:
        """A continuation job that restarts from the checkpoint directory (its first run finds the checkpoint
        and restarts; the script it names is never run), after this job ends."""
        if self.inner is None:
            log.info("no scheduler: continue with  hpcckpt restart --from %s", self.ckptdir)
            return Requeued(0)
        from .batch import render_wrapper
        stub = os.path.join(self.ckptdir, "adopted-job.sh")
        store.atomic_write(stub, b"#!/bin/sh\necho 'hpcckpt adopt: no checkpoint to continue from' >&2\nexit 99\n",
                           mode=0o700)
        cfg_path = os.path.join(self.ckptdir, "adopted-job.yaml")
        store.atomic_write(cfg_path, dataclasses.replace(self.cfg, ckptdir=self.ckptdir).to_yaml().encode())
        dep = self.inner.after_job_options(self.job_id())
        text = render_wrapper(self.inner, stub, [], cfg_path, self.cfg)
        path = os.path.join(self.ckptdir, "adopted-continuation.sh")
        store.atomic_write(path, text.encode(), mode=0o700)
        self.continuation = self.inner.submit(path, dep + self.continuation_options, os.getcwd())
        return Requeued(0, self.continuation)


class AdoptComputation(Computation):
    """The batch driver's computation, which must see the restored copy join before the originals are given up
    on."""

    def start(self, restart: bool, command_line: list[str], hostfile: str | None = None) -> None:
        super().start(restart, command_line, hostfile)
        if not self.wait_joined():
            raise AdoptFailed("the restored copy did not start (see the messages above)")


class AdoptFailed(RuntimeError):
    pass


def end_original(pid: int, status: int) -> None:
    """Make the stopped original end with the copy's status: exit_group(status) run in it (injected), or the
    same signal; SIGKILL if that fails. Its parent (the job's script) sees the program's own exit."""
    try:
        if status > 128:
            os.kill(pid, status - 128)
            os.kill(pid, signal.SIGCONT)
            return
        frozen = tree.freeze_all(lambda: [i for i in [tree.read_proc(pid)] if i is not None])
        fp = frozen.get(pid)
        if fp is None:
            return
        try:
            fp.injector().call(SYS.exit_group, status)
        except ProcessGone:
            return
        raise RuntimeError("exit_group returned")
    except ProcessLookupError:
        pass
    except (FreezeError, ProcessGone, OSError, RuntimeError) as e:
        log.warning("pid %d: cannot give it the exit status %d (%s); killing it", pid, status, e)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None, prog: str = "hpcckpt adopt") -> int:
    def body(argv: list[str] | None) -> int:
        args = parser(prog).parse_args(argv)
        setup_logging("adopt", 0, os.environ.get("HPCCKPT_LOG_LEVEL", "INFO"))
        try:
            pids = [int(p) for p in args.pids]
        except ValueError:
            raise Fail(f"a PID is a number: {' '.join(args.pids)}", code=2) from None
        deadline = parse_deadline(args.deadline or os.environ.get(DEADLINE_ENV))
        try:
            cfg = jobconfig.load(args.config)
        except jobconfig.ConfigError as e:
            raise Fail(str(e)) from None
        inner: Scheduler | None = None
        if args.scheduler != "none":
            inner = registry.get(args.scheduler) if args.scheduler in registry.SCHEDULERS else registry.detect()
            if inner is None and deadline is None:
                raise Fail("not inside a batch job of a known scheduler (SLURM_JOB_ID, PBS_JOBID, JOB_ID unset); "
                           "give --deadline (and --scheduler none) to adopt outside one")
        job = inner.job_id() if inner is not None else f"adopt-{pids[0]}"
        ckptdir = os.path.abspath(args.ckptdir or cfg.ckptdir or f"hpcckpt-adopt-{job}")
        cfg = dataclasses.replace(cfg, ckptdir=ckptdir)
        os.makedirs(ckptdir, mode=0o700, exist_ok=True)
        got = dump(pids, ckptdir, tree_too=args.tree, force=args.force, kill=False, stop=True,
                   compress=cfg.compress, stdio_pid=os.getpid())
        store.atomic_write(os.path.join(ckptdir, EVER_COMPLETED), b"")
        sched = Adopted(inner, deadline, ckptdir, args.config, cfg, shlex.split(args.submit_options), pids[0])
        driver = JobDriver(sched, cfg, [os.path.join(ckptdir, "adopted-job.sh")], fail_rc=env_fail_rc(),
                           computation=AdoptComputation)
        try:
            code = driver.run()
        except AdoptFailed as e:
            driver._kill_computation()
            driver._stop_coordinator()
            _signal_all(got.pids, signal.SIGCONT)
            raise Fail(f"{e}; the adopted processes run on as before (untouched)") from None
        except BaseException:
            _signal_all(got.pids, signal.SIGCONT)
            raise
        others = [p for p in got.pids if p != pids[0]]
        if driver.requeued:
            if inner is None:
                _signal_all(got.pids, signal.SIGKILL)
            else:                 # the job ends at its limit; the continuation job carries on
                log.info("the original processes stay stopped until the job ends%s",
                         f"; continuation job {sched.continuation}" if sched.continuation else "")
            return code
        _signal_all(others, signal.SIGKILL)
        end_original(pids[0], code)
        return code
    return run_main(prog, body, argv)


if __name__ == "__main__":
    sys.exit(main())
