"""Shared fixtures: compiled test programs, an isolated environment per test, and a helper that drives the
real commands (launch, command, restart) as subprocesses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROGRAMS = HERE / "programs"
BIN = Path(sys.executable).parent
# images and manifests are signed with the user's key (hpcckpt/image/auth.py): the tests use a throwaway one,
# never the real ~/.hpcckpt/key of whoever runs them
KEY_FILE = os.path.join(tempfile.mkdtemp(prefix="hpcckpt-testkey-"), "key")
os.environ["HPCCKPT_KEY_FILE"] = KEY_FILE


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bin")


def compile_c(build_dir: Path, name: str, *flags: str) -> Path:
    out = build_dir / name
    if not out.exists():
        src = PROGRAMS / f"{name}.c"
        subprocess.run(["gcc", "-O2", "-g", "-o", str(out), str(src), *flags], check=True)
    return out


def build_mpiring(build_dir: Path) -> Path:
    """tests/programs/mpiring.c built with the mpich wheel's mpicc (in this venv)."""
    out = build_dir / "mpiring"
    if not out.exists():
        subprocess.run([str(BIN / "mpicc"), "-O2", "-o", str(out), str(PROGRAMS / "mpiring.c")], check=True)
    return out


@pytest.fixture(scope="session")
def counter(build_dir) -> Path:
    return compile_c(build_dir, "counter")


@pytest.fixture
def env(tmp_path) -> dict:
    """Environment for one test: its own run directory (secrets, coordinator logs), the venv's commands first
    on PATH, and no DMTCP_* variables leaking in from outside."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DMTCP_", "HPCCKPT_"))}
    e["HPCCKPT_RUNDIR"] = str(tmp_path / "run")
    e["HPCCKPT_KEY_FILE"] = KEY_FILE
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    return e


class Job:
    """A program started with `dmtcp_launch` in the background."""

    def __init__(self, proc: subprocess.Popen, workdir: Path, port_file: Path, env: dict):
        self.proc = proc
        self.workdir = workdir
        self.port_file = port_file
        self.env = env

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    def command(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        return run(["dmtcp_command", "--port-file", str(self.port_file), *args], self.env, self.workdir,
                   check=check, timeout=timeout)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run(cmd, env, cwd, check=False, timeout=120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def wait_for(pred, timeout: float = 30, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def line_count(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


@pytest.fixture
def launch(env, tmp_path):
    jobs: list[Job] = []

    def _launch(*cmd, extra=(), cwd=None, stdout=None) -> Job:
        cwd = Path(cwd or tmp_path)
        port_file = cwd / f"port.{len(jobs)}"
        out = open(stdout or (cwd / f"launch.{len(jobs)}.out"), "w")
        err = open(cwd / f"launch.{len(jobs)}.err", "w")
        proc = subprocess.Popen(["dmtcp_launch", "-p", "0", "--port-file", str(port_file), "--ckptdir", str(cwd),
                                 *extra, *map(str, cmd)], env=env, cwd=cwd, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
        job = Job(proc, cwd, port_file, env)
        jobs.append(job)
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 20, "the coordinator's port file")
        return job

    yield _launch
    for j in jobs:
        j.kill()
        if j.port_file.exists():
            subprocess.run(["dmtcp_command", "--port-file", str(j.port_file), "-q"], env=env,
                           capture_output=True, timeout=20)


def newest_images(ckptdir: Path) -> list[Path]:
    gens = sorted(ckptdir.glob("ckpt_*/gen*.json"))
    assert gens, f"no complete checkpoint in {ckptdir}"
    import json
    m = json.loads(gens[-1].read_text())
    return [Path(i["path"]) for i in m["images"]]


@pytest.fixture
def plain_run(counter, tmp_path):
    """The counter's output when it runs without us: the reference every restarted run must match."""
    def _plain(mb: int, steps: int) -> str:
        out = tmp_path / f"plain-{mb}-{steps}.txt"
        if not out.exists():
            subprocess.run([str(counter), str(out), str(mb), str(steps), "0"], check=True,
                           stdout=subprocess.DEVNULL)
        return out.read_text()
    return _plain


@pytest.fixture(scope="session")
def plain_output(tmp_path_factory):
    """plain_output(prog, *args): the output file a deterministic program writes (its first argument) when it
    runs without us, run once per session for each (program, arguments): CPU-bound references (threads) cost
    seconds each time."""
    cache: dict[tuple, str] = {}
    d = tmp_path_factory.mktemp("plain-outputs")

    def _plain(prog: Path, *args) -> str:
        key = (str(prog), *map(str, args))
        if key not in cache:
            out = d / f"plain-{len(cache)}.txt"
            subprocess.run([str(prog), str(out), *map(str, args)], check=True, stdout=subprocess.DEVNULL,
                           timeout=120)
            cache[key] = out.read_text()
        return cache[key]
    return _plain


@pytest.fixture
def immutable_dir(tmp_path):
    """Make a directory unwritable even for root (chattr +i); undone after the test."""
    made = []

    def _make(d: Path) -> Path:
        if shutil.which("chattr") is None:
            pytest.skip("chattr not available")
        subprocess.run(["chattr", "+i", str(d)], check=True)
        made.append(d)
        return d
    yield _make
    for d in made:
        subprocess.run(["chattr", "-i", str(d)])


def checkpoint_and_kill(job) -> dict:
    """Blocking checkpoint, then kill the computation; returns the checkpoint reply."""
    import json
    r = job.command("-bc", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    reply = json.loads(r.stdout)
    job.command("-k", check=True)
    job.wait(30)
    return reply


def restart_in_background(script_or_images, env, cwd: Path, extra=(), stdin=None) -> Job:
    """Restart (from the restart script or from image paths) with its own coordinator; returns a Job."""
    port_file = cwd / f"port.restart.{time.monotonic_ns()}"
    if isinstance(script_or_images, Path) and script_or_images.suffix == ".sh":
        cmd = ["bash", str(script_or_images), "--coord-port", "0", "--port-file", str(port_file), *extra]
    else:
        cmd = ["dmtcp_restart", "-p", "0", "--port-file", str(port_file), "--ckptdir", str(cwd), *extra,
               *map(str, script_or_images)]
    err = open(cwd / f"restart.{port_file.suffix[1:]}.err", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err)
    job = Job(proc, cwd, port_file, env)
    wait_for(lambda: port_file.exists() and port_file.read_text().strip() or proc.poll() is not None, 60,
             "the restart's coordinator")
    assert proc.poll() is None, (cwd / f"restart.{port_file.suffix[1:]}.err").read_text()
    # the coordinator comes up while the restart restores (cli/restartcoord.py): restored once an agent joined
    wait_for(lambda: proc.poll() is not None or '"num_agents": 0' not in job.command("-s", "--json").stdout, 60,
             "the restart's agent")
    return job


class Feeder:
    """Writes a numbered line to a process's stdin every `period` seconds (for programs blocked reading)."""

    def __init__(self, proc: subprocess.Popen, period: float = 0.1):
        import threading
        self.proc, self.period, self.stop = proc, period, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        i = 0
        while not self.stop.wait(self.period):
            i += 1
            try:
                self.proc.stdin.write(f"line {i}\n".encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                return

    def close(self):
        self.stop.set()
        self.thread.join(5)
