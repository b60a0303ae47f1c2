"""How the batch driver runs, checkpoints and stops the computation: the mechanism under the driver's policy
(driver.py decides when; this module does it).

Computation is the transparent engine: a coordinator and `hpcckpt launch` / `hpcckpt restart` started in
sessions of their own, tied to the driver's life (PR_SET_PDEATHSIG), so signals the scheduler sends to the job
reach the driver, which decides; they start with the schedulers' warning signals ignored (Grid Engine may send
them to every process of the job), so a warning never kills the coordinator, the agent or the program. Another
way to take checkpoints (an application-level mode) is another class with the same methods; checkpoint() is
the one place a checkpoint is taken."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from ..applevel import config as applevel_config
from ..coordinator.client import CoordinatorUnreachable, command
from ..engine.linux import PR_SET_PDEATHSIG, prctl
from ..image import store
from .config import JobConfig

log = logging.getLogger("hpcckpt.batch")


class ComputationError(RuntimeError):
    pass


def tie_to_parent(ignore: tuple[int, ...] = ()) -> Callable[[], None]:
    """preexec_fn for a child: own session (the scheduler's signals to the job's process group miss it), death
    with the driver (so nothing outlives the job), and the scheduler's warning signals ignored. SIG_IGN survives
    exec: the coordinator and our launch process stay ignoring them, the agent reads them through its signalfd
    (blocked signals are queued, not ignored) and passes them on to the program, which starts with them ignored
    - unless it installs a handler of its own, which then gets them as the user asked."""
    def preexec() -> None:
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)
    return preexec


class Computation:
    """The job's computation under the transparent engine, driven through its coordinator."""

    def __init__(self, ckptdir: str, cfg: JobConfig, warnings: tuple[int, ...]):
        self.ckptdir = ckptdir
        self.cfg = cfg
        self.warnings = warnings
        self.coord: subprocess.Popen | None = None
        self.child: subprocess.Popen | None = None
        self.port = 0

    # ------------------------------------------------------------------------------------------ helpers --
    def _python(self) -> list[str]:
        return [sys.executable, "-m", "hpcckpt.cli.main"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HPCCKPT_BATCH"] = "1"                       # launch/agent: the driver handles signals
        env["HPCCKPT_RUNDIR"] = os.path.join(self.ckptdir, ".run")
        env.update(applevel_config.job_environment(self.cfg.engine, self.cfg.application))   # engine: signal
        return env

    def _cmd(self, cmd: str, timeout: float = 30, **args) -> dict:
        """Every request has a timeout: the driver must never hang on a coordinator that died or stalled."""
        return command("127.0.0.1", self.port, cmd, timeout=timeout, **args)

    def latest(self) -> store.Manifest | None:
        """The newest complete checkpoint in the checkpoint directory (store.ManifestError: a damaged one)."""
        best = None
        for c in store.computations_in(self.ckptdir):
            m = store.latest_manifest(self.ckptdir, c)
            if m and (best is None or m.created > best.created):
                best = m
        return best

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    # -------------------------------------------------------------------------------------------- start --
    def start(self, restart: bool, command_line: list[str], hostfile: str | None = None) -> None:
        self._start_coordinator()
        self._start_computation(restart, command_line, hostfile)

    def _start_coordinator(self) -> None:
        run = os.path.join(self.ckptdir, ".run")
        os.makedirs(run, mode=0o700, exist_ok=True)
        port_file = os.path.join(run, "coord.port")
        if os.path.exists(port_file):
            os.unlink(port_file)
        self.coord = subprocess.Popen(
            self._python() + ["coordinator", "-p", "0", "--port-file", port_file, "--ckptdir", self.ckptdir,
                              "-i", str(self.cfg.interval), "--keep", str(self.cfg.keep), "-q"],
            stdin=subprocess.DEVNULL, env=self.env(), preexec_fn=tie_to_parent(self.warnings))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.exists(port_file):
                try:
                    with open(port_file) as f:
                        self.port = int(f.read().strip())
                    return
                except ValueError:
                    pass
            if self.coord.poll() is not None:
                break
            time.sleep(0.05)
        raise ComputationError("the coordinator did not start")

    def _start_computation(self, restart: bool, command_line: list[str], hostfile: str | None) -> None:
        base = self._python()
        common = ["-j", "-p", str(self.port), "--ckptdir", self.ckptdir] + ([] if self.cfg.compress else
                                                                            ["--no-gzip"])
        if restart:
            argv = base + ["restart", *common, "--from", self.ckptdir] + (["--hostfile", hostfile] if hostfile
                                                                           else [])
        else:
            script = command_line[0]
            prog = [script] if os.access(script, os.X_OK) else ["/bin/bash", script]
            argv = base + ["launch", *common, *prog, *command_line[1:]]
        ignore = () if self.cfg.forward_warning_signal else self.warnings
        self.child = subprocess.Popen(argv, env=self.env(), preexec_fn=tie_to_parent(ignore))

    def wait_joined(self, timeout: float = 120) -> bool:
        """Has the restarted computation joined the coordinator (False: it ended first, or never did)?"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() is not None:
                return False
            try:
                if self._cmd("status", timeout=5).get("num_peers", 0) > 0:
                    return True
            except CoordinatorUnreachable:
                pass
            time.sleep(0.2)
        return False

    # -------------------------------------------------------------------------------------------- run --
    def poll(self) -> int | None:
        return self.child.poll() if self.child else 0

    def signal(self, signo: int) -> None:
        """Pass a signal to our launch process, which hands it to the agent, which signals the program."""
        if self.child:
            try:
                os.kill(self.child.pid, signo)
            except ProcessLookupError:
                pass

    def status(self) -> dict:
        """The coordinator's status (CoordinatorUnreachable when it does not answer within 5 s)."""
        return self._cmd("status", timeout=5)

    def checkpoint(self, limit: float, frozen: bool = False) -> dict:
        """Take one blocking checkpoint within limit seconds: {"ok": True, "generation": N, ...} or {"ok": False,
        "error": why}. An interval checkpoint in progress is waited for, then ours is taken. frozen: the images are
        written while the computation is stopped (it stops after this checkpoint: running on would be wasted and
        would slow the write); it runs on afterwards all the same."""
        give_up = time.monotonic() + limit
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                break
            try:
                reply = self._cmd("bcheckpoint", timeout=left, **({"frozen": True} if frozen else {}))
            except CoordinatorUnreachable as e:
                if "no answer" in str(e):
                    log.error("checkpoint request timed out: the coordinator (pid %s) gave no answer within "
                              "%.0f s", self.coord.pid if self.coord else "?", limit)
                return {"ok": False, "error": str(e)}
            if reply.get("ok") or "already in progress" not in str(reply.get("error")):
                return reply
            time.sleep(0.5)          # an interval checkpoint is running: wait for it, then take ours
        log.error("checkpoint request timed out: an earlier checkpoint was still in progress after %.0f s", limit)
        return {"ok": False, "error": f"no checkpoint could start within {limit:.0f} s"}

    def kill(self) -> None:
        try:
            self._cmd("kill", timeout=10)
        except CoordinatorUnreachable as e:
            log.warning("kill request: %s; killing our launch process instead", e)
        if self.child is None:
            return
        try:
            self.child.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("the computation did not stop within 30 s of the kill request; killing it")
            self.child.kill()
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                log.error("the launch process (pid %d) survives SIGKILL; going on without it", self.child.pid)

    def stop(self) -> None:
        """Stop the coordinator (the computation has ended or was killed)."""
        if self.coord and self.coord.poll() is None:
            self.coord.terminate()
            try:
                self.coord.wait(10)
            except subprocess.TimeoutExpired:
                self.coord.kill()
