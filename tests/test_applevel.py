"""Application-level mode (engine: signal): a program that writes its own restart files on SIGUSR1 is
checkpointed through the coordinator's usual round, killed, and restarted with its restart command
(hpcckpt/applevel/, docs/applevel.md)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import compile_c, wait_for

STEPS = 120          # ~5 s plainly (40 ms a step)


@pytest.fixture(scope="module")
def appckpt(build_dir) -> Path:
    return compile_c(build_dir, "appckpt")


def _app_env(env: dict, prog: Path, settle: float = 0.8, timeout: float = 20) -> dict:
    env.update({"HPCCKPT_ENGINE": "signal", "HPCCKPT_APP_SIGNAL": "USR1", "HPCCKPT_APP_FILES": "state.dat",
                "HPCCKPT_APP_SETTLE": str(settle), "HPCCKPT_APP_TIMEOUT": str(timeout),
                "HPCCKPT_APP_RESTART": f"{prog} out.txt state.dat {STEPS} --restart"})
    return env


class _Plain:
    """The program run without us, in the background (it mostly sleeps, 40 ms a step) while the test drives the
    checkpointed one: the reference output, waited for only when the test compares."""

    def __init__(self, prog: Path, d: Path, steps: int):
        d.mkdir()
        self.d = d
        self.proc = subprocess.Popen([str(prog), "out.txt", "state.dat", str(steps)], cwd=d,
                                     stdout=subprocess.DEVNULL)

    def text(self) -> str:
        assert self.proc.wait(60) == 0
        return (self.d / "out.txt").read_text()


@pytest.fixture(scope="module")
def plain(appckpt, tmp_path_factory) -> _Plain:
    """One plain run of STEPS steps for the whole module (the output depends only on the step count)."""
    return _Plain(appckpt, tmp_path_factory.mktemp("appckpt-plain") / "plain", STEPS)


def _generations(d: Path) -> list[int]:
    return sorted(int(p.name[3:9]) for p in d.glob("ckpt_*/gen*.json"))


def _restart(env: dict, d: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dmtcp_restart", "-p", "0", "--ckptdir", str(d), "--from", str(d), *extra], env=env,
                          cwd=d, capture_output=True, text=True, timeout=90)


def _lines(d: Path) -> int:
    try:
        return (d / "out.txt").read_text().count("\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_signal_engine_checkpoints_twice_kill_restart_identical(appckpt, plain, env, launch, tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    _app_env(env, appckpt)
    job = launch(appckpt, "out.txt", "state.dat", STEPS, cwd=d)
    for n in (10, 30):
        wait_for(lambda n=n: _lines(d) >= n, 30, f"{n} steps")
        r = job.command("-bc", "--json")
        assert r.returncode == 0, (r.stdout, r.stderr, (d / "launch.0.err").read_text())
    assert _generations(d) == [1, 2]
    m = json.loads(sorted(d.glob("ckpt_*/gen000002.json"))[0].read_text())
    assert [Path(i["path"]).suffix for i in m["images"]] == [".applevel"]
    wait_for(lambda: _lines(d) >= 45, 30, "steps after the checkpoint")    # (state.dat and out.txt move on)
    job.command("-k", check=True)
    job.wait(30)
    r = _restart(env, d)
    assert r.returncode == 0, r.stderr
    assert "restarted at step" in r.stderr
    assert (d / "out.txt").read_text() == plain.text()


@pytest.mark.slow
def test_restart_script_and_later_checkpoints_continue_the_computation(appckpt, plain, env, launch, tmp_path):
    """The restarted program is under an agent: it is checkpointed again (generation 2 of the same computation)
    and restarted a second time, from the restart script."""
    d = tmp_path / "job"
    d.mkdir()
    _app_env(env, appckpt)
    job = launch(appckpt, "out.txt", "state.dat", STEPS, cwd=d)
    wait_for(lambda: _lines(d) >= 10, 30, "10 steps")
    assert job.command("-kc").returncode == 0
    job.wait(30)
    port = d / "port.r"
    p = subprocess.Popen(["dmtcp_restart", "-p", "0", "--port-file", str(port), "--ckptdir", str(d), "--from",
                          str(d)], env=env, cwd=d, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: port.exists() and port.read_text().strip(), 30, "the restart's coordinator")
    wait_for(lambda: _lines(d) >= 40, 30, "steps after the restart")
    r = subprocess.run(["dmtcp_command", "--port-file", str(port), "-kc"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    p.wait(30)
    assert _generations(d) == [1, 2] and len(list(d.glob("ckpt_*"))) == 1
    r = subprocess.run(["bash", str(d / "dmtcp_restart_script.sh"), "--coord-port", "0"], env=env, cwd=d,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert (d / "out.txt").read_text() == plain.text()


@pytest.mark.slow
def test_files_that_never_settle_fail_the_round_and_keep_the_previous(appckpt, env, launch, tmp_path):
    """APPCKPT_CHURN: from the second request on, the program rewrites its state file without end."""
    d = tmp_path / "job"
    d.mkdir()
    _app_env(env, appckpt, settle=0.8, timeout=3)["APPCKPT_CHURN"] = "1"
    job = launch(appckpt, "out.txt", "state.dat", STEPS * 4, cwd=d)
    wait_for(lambda: _lines(d) >= 5, 30, "5 steps")
    assert job.command("-bc").returncode == 0          # generation 1: the first write settles
    r = job.command("-bc")
    assert r.returncode != 0
    assert "still changing" in r.stdout + r.stderr, r.stdout + r.stderr
    assert _generations(d) == [1]
    assert not list(d.glob("ckpt_*/gen000002*"))            # nothing of the failed round left
    assert len(list(d.glob("ckpt_*/gen000001/*.applevel"))) == 1
    assert job.proc.poll() is None                           # the program runs on


def test_tampered_recorded_file_is_refused_at_restart(appckpt, env, launch, tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    _app_env(env, appckpt)
    job = launch(appckpt, "out.txt", "state.dat", STEPS, cwd=d)
    wait_for(lambda: _lines(d) >= 5, 30, "5 steps")
    assert job.command("-kc").returncode == 0
    job.wait(30)
    arch = sorted(d.glob("ckpt_*/gen000001/*.applevel"))[0]
    data = bytearray(arch.read_bytes())
    data[1000] ^= 0xFF               # inside the recorded state.dat
    arch.write_bytes(bytes(data))
    before = (d / "state.dat").read_bytes()
    r = subprocess.run(["hpcckpt", "inspect", "--verify", str(arch)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "state.dat does not match its checksum" in r.stderr
    r = _restart(env, d)
    assert r.returncode == 99
    assert "does not match its checksum" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (d / "state.dat").read_bytes() == before           # nothing put back
    assert not list(d.glob("state.dat.*.tmp"))


def test_settings_are_checked_in_one_line(appckpt, env, tmp_path):
    env.update({"HPCCKPT_ENGINE": "signal"})
    r = subprocess.run(["dmtcp_launch", "-p", "0", str(appckpt), "o", "s", "1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 99 and "app_files" in r.stderr
    env.update({"HPCCKPT_ENGINE": "magic"})
    r = subprocess.run(["dmtcp_launch", "-p", "0", str(appckpt), "o", "s", "1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 99 and "engine 'magic'" in r.stderr


DRIVER = r'''
import json, logging, os, sys, time
from hpcckpt.sched.base import Requeued, Scheduler
from hpcckpt.sched.config import load
from hpcckpt.sched.driver import JobDriver

class FakeSched(Scheduler):
    """The batch code path without a cluster: this run's end and its requeue come from the test."""
    name = "fake"
    @classmethod
    def detect(cls, env): return True
    def job_id(self): return "42"
    def run_count(self): return int(self.env["FAKE_RUN"])
    def end_time(self):
        return float(self.env["FAKE_END"]) if self.env.get("FAKE_END") else None
    def requeue(self):
        open("requeued", "a").write(self.env["FAKE_RUN"] + "\n")
        return Requeued(0)
    def submit(self, *a): raise NotImplementedError

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
cfg = load(sys.argv[1])
sys.exit(JobDriver(FakeSched(), cfg, sys.argv[2:]).run())
'''


@pytest.mark.slow
def test_batch_driver_checkpoints_before_the_deadline_requeues_and_restarts(appckpt, env, tmp_path):
    """The scheduler driver's own code (sched/driver.py) with a scheduler whose end time is 8 s away: the
    deadline checkpoint is application-level (engine: signal in the job YAML), the run requeues, the next run
    puts the files back and runs the restart command; the output is a plain run's."""
    steps = 250      # 10 s: the first run must still be running at its deadline
    plain = _Plain(appckpt, tmp_path / "plain", steps)     # alongside the job: both mostly sleep
    d = tmp_path / "job"
    d.mkdir()
    (d / "driver.py").write_text(DRIVER)
    (d / "job.sh").write_text(f"#!/bin/bash\nexec {appckpt} out.txt state.dat {steps}\n")
    (d / "job.sh").chmod(0o755)
    (d / "job.yaml").write_text(
        f"ckptdir: {d / 'ckpt'}\nlead: 4\nmin_lead: 1\nengine: signal\n"
        f"application:\n  signal: USR1\n  files: state.dat\n  settle: 0.8\n  timeout: 20\n"
        f"  restart: {appckpt} out.txt state.dat {steps} --restart\n")
    import time
    for run, end in ((0, time.time() + 8), (1, None)):
        e = dict(env, FAKE_RUN=str(run), FAKE_END=str(end) if end else "")
        r = subprocess.run([str(Path(subprocess.sys.executable)), "driver.py", "job.yaml", str(d / "job.sh")],
                           env=e, cwd=d, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        if run == 0:
            assert (d / "requeued").read_text() == "0\n", r.stderr[-3000:]
            assert _lines(d) < steps
    assert (d / "out.txt").read_text() == plain.text()
    log = (d / "ckpt" / "hpcckpt-job.log").read_text()
    assert "wall-time deadline: checkpointing" in log and "restarting from checkpoint generation 1" in log


@pytest.mark.slow
def test_moved_job_restarts_with_dmtcp_path_prefix(appckpt, plain, env, launch, tmp_path):
    """The job's directory moved after the checkpoint: DMTCP_PATH_PREFIX (recorded at launch, the new one at
    restart) puts the restart files back, and runs the restart command, in the new place."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    _app_env(env, appckpt)["DMTCP_PATH_PREFIX"] = str(old)
    job = launch(appckpt, "out.txt", "state.dat", STEPS, cwd=old)
    wait_for(lambda: _lines(old) >= 10, 30, "10 steps")
    assert job.command("-kc").returncode == 0
    job.wait(30)
    old.rename(new)
    r = _restart(dict(env, DMTCP_PATH_PREFIX=str(new)), new)
    assert r.returncode == 0, r.stderr
    assert (new / "out.txt").read_text() == plain.text() and not old.exists()


@pytest.mark.slow
def test_interval_and_non_blocking_requests_take_application_level_checkpoints(appckpt, env, launch, tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    _app_env(env, appckpt, settle=0.5)
    # a 2 s interval (was 3 s): the test is about the checkpoints it takes, not how often
    job = launch(appckpt, "out.txt", "state.dat", STEPS * 2, cwd=d, extra=["-i", "2"])
    wait_for(lambda: len(_generations(d)) >= 2, 30, "two interval checkpoints")
    assert job.command("-i", "0").returncode == 0            # interval off: only requests from here on
    before = max(_generations(d))
    assert job.command("-c").returncode == 0                   # not blocking: it returns before the files settle
    wait_for(lambda: max(_generations(d)) > before, 30, "the requested checkpoint")
    wait_for(lambda: len(list(d.glob("ckpt_*/gen*/*.applevel"))) <= 2, 10, "retention")
    assert len(list(d.glob("ckpt_*/gen*.json"))) <= 2           # retention (keep 2) applies as to images
    assert job.proc.poll() is None


def test_app_command_asks_instead_of_the_signal_and_its_failure_fails_the_round(appckpt, env, launch, tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    _app_env(env, appckpt, settle=0.5)["HPCCKPT_APP_COMMAND"] = \
        "sh -c 'test -e fail && exit 3; echo $HPCCKPT_GENERATION >> asked; kill -USR1 $HPCCKPT_PIDS'"
    job = launch(appckpt, "out.txt", "state.dat", STEPS, cwd=d)
    wait_for(lambda: _lines(d) >= 3, 30, "3 steps")
    r = job.command("-bc")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (d / "asked").read_text() == "1\n" and _generations(d) == [1]
    (d / "fail").write_text("")
    r = job.command("-bc")
    assert r.returncode != 0 and "failed with status 3" in r.stdout + r.stderr
    assert _generations(d) == [1] and job.proc.poll() is None
