"""Liveness both ways: nothing of the job stays frozen for a coordinator that is gone, a blocking checkpoint never
waits for ever, pauses (of the coordinator or of an agent) shorter than the peer timeout are tolerated and a peer
that comes back is taken back, and a stalled image write times out (bytes count as progress, heartbeats do not)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import line_count, run, wait_for


def coordinator_of(job) -> psutil.Process:
    """The coordinator the launch started (a daemon listening on the job's port)."""
    port = job.port
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "coordinator" in cmd and "--port-file" in cmd and str(job.port_file) in cmd:
            return p
    for c in psutil.net_connections("tcp"):
        if c.status == "LISTEN" and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    raise AssertionError(f"no coordinator on port {port}")


def program_pid(out) -> int:
    """The counter's PID as seen from here (the job has its own PID namespace)."""
    return next(p.pid for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[0].endswith("/counter") and str(out) in p.info["cmdline"])


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("t", "T")


def start_job(launch, counter, tmp_path, env, *extra, **envs):
    env.update(envs)
    out = tmp_path / "out.txt"
    job = launch(counter, out, 16, 100000, 10000, extra=("--no-gzip",) + extra)
    wait_for(lambda: line_count(out) >= 5, 30, "the program to start")
    return job, out


def bc_in_background(job) -> subprocess.Popen:
    return subprocess.Popen(["dmtcp_command", "--port-file", str(job.port_file), "-bc"], env=job.env,
                            cwd=job.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def runs_on(out, what: str) -> None:
    n = line_count(out)
    wait_for(lambda: line_count(out) > n + 5, 20, what)


@pytest.mark.slow
def test_coordinator_killed_while_frozen_job_resumes_bc_fails_and_a_new_coordinator_takes_over(
        launch, counter, tmp_path, env):
    """The coordinator is SIGKILLed while the processes are frozen for a --no-forked-checkpoint write: the agent
    resumes them at once and the job runs on, -bc exits non-zero in bounded time, nothing is committed, and a
    coordinator started again on the same port takes the computation back: the next checkpoint works (with the
    next generation number) and the images of the lost round are removed."""
    job, out = start_job(launch, counter, tmp_path, env, "--no-forked-checkpoint",
                         HPCCKPT_FAULT="dump.after_chunk:sleep=0.2", HPCCKPT_COORD_FALLBACK="0")
    pid = program_pid(out)
    coord = coordinator_of(job)
    bc = bc_in_background(job)
    wait_for(lambda: list(tmp_path.glob("ckpt_*/gen000001/*.tmp")), 30, "the image being written while frozen")
    assert stopped(pid)
    coord.kill()
    t = time.monotonic()
    try:
        rc = bc.wait(20)
    finally:
        if bc.poll() is None:
            bc.kill()
    err = bc.stderr.read()
    assert rc == 1 and "lost the coordinator" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t < 10
    wait_for(lambda: not stopped(pid), 10, "the program to be resumed")
    runs_on(out, "the program to run on without its coordinator")
    assert not list(tmp_path.glob("ckpt_*/gen*.json")), "nothing may be committed"
    # a coordinator restarted on the same port takes the computation back
    env.pop("HPCCKPT_FAULT")
    run(["dmtcp_coordinator", "--daemon", "-p", str(job.port), "--ckptdir", str(tmp_path), "--exit-on-last"],
        env, tmp_path, check=True)
    r = job.command("-bc", "--json")            # at once: a just started coordinator waits for its agents
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["generation"] == 2          # generation numbers go on
    assert not list(tmp_path.glob("ckpt_*/gen000001/*")), "the lost round's images were left behind"
    assert job.proc.poll() is None


@pytest.mark.slow
def test_lost_coordinator_replaced_by_the_launch_itself(launch, counter, tmp_path, env):
    """Nobody starts a coordinator again: after HPCCKPT_COORD_FALLBACK seconds the launch starts one on the same
    port itself, which adopts the computation; checkpoints work again."""
    job, out = start_job(launch, counter, tmp_path, env, HPCCKPT_COORD_FALLBACK="2")
    coordinator_of(job).kill()
    runs_on(out, "the program to run on")
    wait_for(lambda: json.loads(job.command("-s", "--json").stdout or "{}").get("num_peers"), 40,
             "a fallback coordinator with the computation")
    r = job.command("-bc")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert list(tmp_path.glob("ckpt_*/gen000001.json"))


def test_sigterm_to_launch_while_frozen_ends_the_job(launch, counter, tmp_path, env):
    """SIGTERM to dmtcp_launch while the processes are frozen (a checkpoint stuck on a stopped coordinator): the
    agent resumes them so the program gets the signal and the job ends with it, instead of staying stopped."""
    job, out = start_job(launch, counter, tmp_path, env, "--no-forked-checkpoint",
                         HPCCKPT_FAULT="dump.after_chunk:sleep=0.1")
    pid = program_pid(out)
    coord = coordinator_of(job)
    assert job.command("-c").returncode == 0
    wait_for(lambda: list(tmp_path.glob("ckpt_*/gen000001/*.tmp")), 30, "the image being written while frozen")
    coord.suspend()                   # the round cannot go on: the agent stays frozen after its write
    try:
        wait_for(lambda: list(tmp_path.glob("ckpt_*/gen000001/*.dmtcp")), 30, "the image written")
        time.sleep(0.5)
        assert stopped(pid)
        job.proc.send_signal(signal.SIGTERM)
        assert job.wait(10) == 128 + signal.SIGTERM
    finally:
        coord.resume()


@pytest.mark.slow
def test_stalled_image_write_times_out(launch, counter, tmp_path, env):
    """A forked checkpoint's image write hangs (a dead file system): heartbeats keep coming but no bytes, so the
    round times out after the phase timeout; the program never stopped and runs on; nothing is committed."""
    job, out = start_job(launch, counter, tmp_path, env, HPCCKPT_FAULT="dump.after_chunk:sleep=120",
                         HPCCKPT_PHASE_TIMEOUT="4")
    t = time.monotonic()
    r = job.command("-bc", timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "timed out" in r.stderr
    assert time.monotonic() - t < 20
    runs_on(out, "the program to run on")
    assert not list(tmp_path.glob("ckpt_*/gen*.json"))


@pytest.mark.slow
def test_coordinator_paused_20s_keeps_its_job(launch, counter, tmp_path, env):
    """The coordinator is stopped for 20 s (SIGSTOP/SIGCONT, a slow node): neither side gives the other up (the
    tolerance is HPCCKPT_PEER_TIMEOUT, default 90 s), and checkpoints work afterwards."""
    job, out = start_job(launch, counter, tmp_path, env)
    coord = coordinator_of(job)
    coord.suspend()
    time.sleep(20)
    coord.resume()
    time.sleep(3)
    assert coord.is_running()
    st = json.loads(job.command("-s", "--json", check=True).stdout)
    assert st["num_agents"] == 1
    r = job.command("-bc")
    assert r.returncode == 0, (r.stdout, r.stderr)
    runs_on(out, "the program to run on")


@pytest.mark.slow
def test_agent_paused_beyond_peer_timeout_is_taken_back(launch, counter, tmp_path, env):
    """An agent stopped longer than the peer timeout is given up by the coordinator - which does not exit
    (--exit-on-last is for agents that leave) - and taken back when it returns: checkpoints work again."""
    job, out = start_job(launch, counter, tmp_path, env, HPCCKPT_PEER_TIMEOUT="3")
    agent = psutil.Process(psutil.Process(program_pid(out)).ppid())
    log = tmp_path / "run" / f"coord-{job.port}.log"
    agent.suspend()
    try:
        wait_for(lambda: "silent for" in log.read_text(), 20, "the coordinator to give the agent up")
    finally:
        agent.resume()
    wait_for(lambda: "is back" in log.read_text() or "joined" in log.read_text().rsplit("silent for")[1],
             20, "the agent to be taken back")
    r = job.command("-bc")
    assert r.returncode == 0, (r.stdout, r.stderr)
    runs_on(out, "the program to run on")
    assert job.proc.poll() is None


@pytest.mark.slow
def test_bc_gives_up_on_a_silent_coordinator(launch, counter, tmp_path, env):
    """-bc waits at most the peer timeout for a coordinator that stops answering (stopped, not dead: its
    connection stays open), then exits 1 with one line; the coordinator, let go again, finishes the checkpoint."""
    job, out = start_job(launch, counter, tmp_path, env, HPCCKPT_FAULT="dump.after_chunk:sleep=0.1")
    coord = coordinator_of(job)
    bc = subprocess.Popen(["dmtcp_command", "--port-file", str(job.port_file), "-bc"],
                          env=dict(env, HPCCKPT_PEER_TIMEOUT="3"), cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(tmp_path.glob("ckpt_*/gen000001/*.tmp")), 30, "the image being written")
    coord.suspend()
    try:
        t = time.monotonic()
        rc = bc.wait(20)
        err = bc.stderr.read()
        assert rc == 1 and "has not answered for" in err and len(err.strip().splitlines()) == 1, err
        assert time.monotonic() - t < 10
    finally:
        if bc.poll() is None:
            bc.kill()
        coord.resume()
    wait_for(lambda: list(tmp_path.glob("ckpt_*/gen000001.json")), 30, "the checkpoint to complete anyway")
    runs_on(out, "the program to run on")


@pytest.mark.slow
def test_coordinator_paused_while_frozen_job_resumes_and_a_late_commit_stays_valid(launch, counter, tmp_path, env):
    """The coordinator stops during a --no-forked-checkpoint write for longer than the phase timeout: the agent
    resumes its processes on its own after that time (not for ever), but keeps the images it reported durable;
    the coordinator, let go again, reads the ack before the abandon and commits: the committed images exist."""
    from conftest import newest_images
    job, out = start_job(launch, counter, tmp_path, env, "--no-forked-checkpoint",
                         HPCCKPT_FAULT="dump.after_chunk:sleep=0.2", HPCCKPT_PHASE_TIMEOUT="3")
    pid = program_pid(out)
    coord = coordinator_of(job)
    bc = bc_in_background(job)
    wait_for(lambda: list(tmp_path.glob("ckpt_*/gen000001/*.tmp")), 30, "the image being written while frozen")
    coord.suspend()
    try:
        wait_for(lambda: list(tmp_path.glob("ckpt_*/gen000001/*.dmtcp")), 30, "the image written")
        wait_for(lambda: not stopped(pid), 15, "the agent to resume its processes without its coordinator")
        runs_on(out, "the program to run on")
    finally:
        coord.resume()
    assert bc.wait(30) == 0, bc.stderr.read()
    assert all(p.exists() for p in newest_images(tmp_path))


def test_coordinator_killed_in_the_freeze_window_of_a_forked_checkpoint(launch, counter, tmp_path, env):
    """The default forked checkpoint keeps the processes frozen only briefly; the coordinator dying in that window
    (made long here by the agent.after_suspend fault point) must not leave them frozen either."""
    job, out = start_job(launch, counter, tmp_path, env, HPCCKPT_FAULT="agent.after_suspend:sleep=2",
                         HPCCKPT_COORD_FALLBACK="0")
    pid = program_pid(out)
    coord = coordinator_of(job)
    bc = bc_in_background(job)
    wait_for(lambda: stopped(pid), 20, "the processes to be frozen")
    coord.kill()
    try:
        assert bc.wait(10) == 1
    finally:
        if bc.poll() is None:
            bc.kill()
    wait_for(lambda: not stopped(pid), 10, "the processes to be resumed")
    runs_on(out, "the program to run on")
    assert not list(tmp_path.glob("ckpt_*/gen*/*")) and not list(tmp_path.glob("ckpt_*/gen*.json"))


def test_liveness_settings():
    from hpcckpt.settings import SettingsError, load
    s = load(environ={"HPCCKPT_PEER_TIMEOUT": "120", "HPCCKPT_COORD_FALLBACK": "0"})
    assert (s.peer_timeout, s.coord_fallback, s.heartbeat_s()) == (120.0, 0.0, 2.0)
    assert load(environ={}).peer_timeout >= 60                   # a minute's pause is tolerated by default
    assert load(environ={"HPCCKPT_PEER_TIMEOUT": "3"}).heartbeat_s() == 1.0
    for bad in ({"HPCCKPT_PEER_TIMEOUT": "0"}, {"HPCCKPT_HEARTBEAT": "-1"}, {"HPCCKPT_COORD_FALLBACK": "-5"}):
        with pytest.raises(SettingsError):
            load(environ=bad)
