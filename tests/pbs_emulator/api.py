"""Python API for tests: the emulator (Emulator) and a real OpenPBS install (RealPBS) behind one interface.

    from pbs_emulator import backend
    with backend(kill_delay=2, operators=["nobody"]) as pbs:      # RealPBS if $PBS_EXEC is set
        jid = pbs.qsub(["job.sh"], user="nobody", cwd=workdir)
        attrs = pbs.wait(jid)                                     # until job_state F
        assert attrs["Exit_status"] == "0"

Commands always go through the real command-line tools (the emulator's or the install's), as a user would."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time

from . import control

COMMANDS = ("qsub", "qstat", "qdel", "qrerun")


def parse_qstat_f(text: str) -> dict[str, dict[str, str]]:
    """`qstat -f` output -> {jobid: {"Resource_List.walltime": "00:01:00", ...}} (folded lines joined)."""
    jobs: dict[str, dict[str, str]] = {}
    cur: dict[str, str] | None = None
    key = None
    for line in text.splitlines():
        if line.startswith("Job Id: "):
            cur = jobs.setdefault(line[8:].strip(), {})
            key = None
        elif line.startswith("\t") and cur is not None and key:
            cur[key] += line[1:]
        elif line.startswith("    ") and " = " in line and cur is not None:
            key, _, value = line[4:].partition(" = ")
            cur[key] = value
    return jobs


def as_user(argv: list[str], user: str | int | None) -> list[str]:
    """argv run as another user (needs root): setpriv with that user's uid/gid and no supplementary groups."""
    if user is None:
        return list(argv)
    pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    return ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid), "--clear-groups", *argv]


class _Backend:
    bin_dir: str

    def env(self, base: dict | None = None, user: str | None = None) -> dict:
        e = dict(os.environ if base is None else base)
        e["PATH"] = f"{self.bin_dir}:{e.get('PATH', '/usr/bin:/bin')}"
        if user is not None:
            pw = pwd.getpwnam(user)
            e.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        return e

    def run(self, argv: list[str], *, user: str | None = None, cwd: str | None = None, env: dict | None = None,
            input: str | None = None, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        """Run a command (a bare qsub/qstat/qdel/qrerun name means this backend's) and capture its output."""
        argv = list(argv)
        if argv[0] in COMMANDS:
            argv[0] = os.path.join(self.bin_dir, argv[0])
        e = env if env is not None else self.env(user=user)
        if cwd is not None:
            e = dict(e, PWD=cwd)
        return subprocess.run(as_user(argv, user), cwd=cwd, env=e, input=input, text=True, capture_output=True,
                              timeout=timeout, check=check)

    def qsub(self, args: list[str], **kw) -> str:
        """Submit; returns the job id. Raises CalledProcessError (with stderr) when qsub fails."""
        p = self.run(["qsub", *args], **kw)
        if p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, p.args, p.stdout, p.stderr)
        return p.stdout.strip()

    def qstat(self, jobid: str, **kw) -> dict[str, str]:
        """`qstat -x -f JOBID` parsed ({} if the job is unknown)."""
        p = self.run(["qstat", "-x", "-f", jobid], **kw)
        return parse_qstat_f(p.stdout).get(jobid, {})

    def wait(self, jobid: str, states: str = "F", timeout: float = 60, poll: float = 0.2,
             until=None) -> dict[str, str]:
        """Poll qstat until job_state is one of `states` (and until(attrs) is true, if given)."""
        deadline = time.monotonic() + timeout
        attrs: dict[str, str] = {}
        while time.monotonic() < deadline:
            attrs = self.qstat(jobid)
            if (attrs.get("job_state") or "?") in states and (until is None or until(attrs)):
                return attrs
            time.sleep(poll)
        raise TimeoutError(f"job {jobid} not in state {states} after {timeout}s: {attrs}")


class Emulator(_Backend):
    """The local emulator. Settings: kill_delay, operators, managers, acl_roots, mom_poll, walltime_slack,
    passwd ({user: {"home":..., "shell":...}}), job_requeue_timeout; at start also server_name, first_job_id.
    Without state_dir a fresh world-readable directory under /tmp is used (and removed by stop())."""

    def __init__(self, state_dir: str | None = None, *, python: str | None = None, **settings):
        self._own_dir = state_dir is None
        self.state_dir = os.path.abspath(state_dir or tempfile.mkdtemp(prefix="pbs-emu-", dir="/tmp"))
        os.makedirs(self.state_dir, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        self.bin_dir = os.path.join(self.state_dir, "bin")
        self.python = python
        self.settings = settings

    def start(self) -> "Emulator":
        control.start(self.state_dir, self.settings, self.python)
        return self

    def stop(self) -> None:
        control.stop(self.state_dir)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def set(self, **settings) -> dict:
        return control.set_config(self.state_dir, settings)

    def config(self) -> dict:
        return control.get_config(self.state_dir)

    def running(self) -> bool:
        return control.ping(self.state_dir) is not None

    def env(self, base: dict | None = None, user: str | None = None) -> dict:
        e = super().env(base, user)
        e["PBS_EMU_DIR"] = self.state_dir
        return e

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RealPBS(_Backend):
    """A real OpenPBS whose server runs on this host: commands from $PBS_EXEC/bin, settings through qmgr
    (needs root or a PBS manager): kill_delay -> queue workq, operators/managers/acl_roots -> server."""

    def __init__(self, pbs_exec: str | None = None, **settings):
        self.pbs_exec = pbs_exec or os.environ.get("PBS_EXEC") or "/opt/pbs"
        self.bin_dir = os.path.join(self.pbs_exec, "bin")
        self.settings = settings

    def qmgr(self, command: str) -> None:
        subprocess.run([os.path.join(self.bin_dir, "qmgr"), "-c", command], check=True, capture_output=True,
                       text=True)

    def set(self, **settings) -> dict:
        for k, v in settings.items():
            if k == "kill_delay":
                self.qmgr(f"set queue workq kill_delay = {int(v)}")
            elif k in ("operators", "managers", "acl_roots"):
                value = ",".join(f"{u}@*" for u in v) if k != "acl_roots" else ",".join(v)
                self.qmgr(f"set server {k} = {value}" if v else f"unset server {k}")
            elif k in ("passwd", "mom_poll", "walltime_slack", "job_requeue_timeout"):
                continue              # emulator-only knobs: a real site has real users and its own MoM config
            else:
                raise ValueError(f"no qmgr equivalent for {k}")
        return settings

    def _current(self, key: str) -> str | None:
        """A setting's value now (None: unset), to put it back in stop()."""
        target = "queue workq" if key == "kill_delay" else "server"
        p = subprocess.run([os.path.join(self.bin_dir, "qmgr"), "-c", f"list {target} {key}"],
                           capture_output=True, text=True)
        for line in p.stdout.splitlines():
            name, eq, value = line.strip().partition(" = ")
            if eq and name == key:
                return value
        return None

    def start(self) -> "RealPBS":
        # what the tests change on the server is put back by stop(): a real site's settings are not ours
        self.saved = {k: self._current(k) for k in self.settings
                      if k in ("kill_delay", "operators", "managers", "acl_roots")}
        self.set(**self.settings)
        return self

    def stop(self) -> None:
        for key, value in getattr(self, "saved", {}).items():
            target = "queue workq" if key == "kill_delay" else "server"
            self.qmgr(f"set {target} {key} = {value}" if value is not None else f"unset {target} {key}")

    def running(self) -> bool:
        return subprocess.run([os.path.join(self.bin_dir, "qstat"), "-B"], capture_output=True).returncode == 0

    def __enter__(self) -> "RealPBS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def backend(**settings) -> _Backend:
    """RealPBS when $PBS_EXEC points at an OpenPBS install, else a fresh Emulator (not yet started)."""
    if os.environ.get("PBS_EXEC"):
        return RealPBS(**settings)
    return Emulator(**settings)
