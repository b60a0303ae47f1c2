"""Computations spanning hosts (simulated hosts in network namespaces with sshd: tests/hosts.py).

The job runs on this host and starts its other half with plain `ssh HOST ...`, as an MPI launcher or a user's
script would; the two halves talk TCP to each other. Checkpoint, kill, restart with the restart script: each
host restores its own images (the remote ones over ssh), the connection between hosts comes back with no byte
lost, and the job ends as it would have. The checkpoint directory is shared by all hosts (as a cluster's
parallel filesystem is): migration to another host with --hostfile needs nothing copied.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import checkpoint_and_kill, run, wait_for
from hosts import Hosts

pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")]

PINGPONG = Path(__file__).resolve().parent / "programs" / "pingpong.py"
N = 120          # lines of the client: ~6 s of work

hosts2 = Hosts.fixture(n=2, scope="module", subnet=None)


def job_cmd(hs: Hosts, host: str, d: Path) -> list[str]:
    pf = d / "server.port"
    client = f"{sys.executable} {PINGPONG} client {hs.root_ip} {pf} {N}"
    return ["bash", "-c", f"{sys.executable} {PINGPONG} server {pf} & ssh {host} '{client}'; rc=$?; wait; exit $rc"]


def ok_lines(text: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2]) for m in re.finditer(r"^ok (\d+) (\S+)$", text, re.M)]


def start(launch, hs, env, tmp_path, host):
    job = launch(*job_cmd(hs, host, tmp_path))
    out = tmp_path / "launch.0.out"
    wait_for(lambda: len(ok_lines(out.read_text())) >= 20, 30, "the client's first answers")
    return job, out


def pingpong_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if str(PINGPONG) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def restart_script(tmp_path: Path, env: dict, moves: dict[str, str] | None = None):
    """Run the checkpoint's restart script, with a host file mapping old hosts to new ones if given."""
    extra = []
    if moves:
        hostfile = tmp_path / "hosts.txt"
        hostfile.write_text("".join(f"{old} {new}\n" for old, new in moves.items()))
        extra = ["--hostfile", str(hostfile)]
    return run(["bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0", *extra], env, tmp_path,
               timeout=120)


def assert_finished_on(r, host: str) -> list[int]:
    """The restarted client went on from its checkpoint to the end, on `host`: no number skipped or wrong."""
    assert r.returncode == 0, r.stderr[-3000:]
    after = ok_lines(r.stdout)
    assert after and {h for _, h in after} == {host}, r.stdout[-2000:]
    nums = [i for i, _ in after]
    assert nums == list(range(nums[0], N + 1)), nums
    assert r.stdout.rstrip().endswith("done")
    return nums


@pytest.fixture
def env(env, hosts2):
    """Every command of these tests (the launch fixture's too) uses the harness' ssh keys and names."""
    return hosts2.ssh_env(env)


def test_ssh_job_checkpoint_resume_and_restart_across_hosts(hosts2, env, tmp_path, launch):
    h1 = hosts2[0]
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    # Both hosts are part of the computation: the remote half joined through the ssh shim.
    listing = job.command("-l", check=True).stdout
    assert h1.name in listing, listing
    # A checkpoint the computation resumes from: it goes on across hosts.
    job.command("-bc", check=True)
    before = len(ok_lines(out.read_text()))
    wait_for(lambda: len(ok_lines(out.read_text())) >= before + 10, 20, "answers after the resumed checkpoint")
    reply = checkpoint_and_kill(job)
    assert reply.get("ok", True), reply
    seen = ok_lines(out.read_text())
    assert all(h == h1.name for _, h in seen)
    script = tmp_path / "dmtcp_restart_script.sh"
    table = script.read_text().split("<<'HPCCKPT_IMAGES'\n")[1].split("\nHPCCKPT_IMAGES")[0]
    assert {ln.split()[0] for ln in table.splitlines()} >= {h1.name}, table

    t = time.monotonic()
    nums = assert_finished_on(restart_script(tmp_path, env), h1.name)
    assert nums[0] <= seen[-1][0] + 1
    print(f"restart across 2 hosts ran to the end in {time.monotonic() - t:.1f} s")


def test_restart_migrates_to_another_host_with_a_hostfile(hosts2, env, tmp_path, launch):
    h1, h2 = hosts2
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    checkpoint_and_kill(job)
    assert_finished_on(restart_script(tmp_path, env, {h1.name: h2.name}), h2.name)


def test_restart_with_an_unreachable_host_fails_fast_and_leaves_nothing(hosts2, env, tmp_path, launch):
    h1 = hosts2[0]
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    checkpoint_and_kill(job)
    wait_for(lambda: not pingpong_processes(), 20, "the killed job's processes to go")
    t = time.monotonic()
    r = restart_script(tmp_path, env, {h1.name: "nosuchhost.invalid"})
    took = time.monotonic() - t
    assert r.returncode != 0
    assert "nosuchhost.invalid" in r.stderr, r.stderr[-2000:]
    assert took < 60, f"the failure took {took:.0f} s (the gate's timeout rather than the ssh failure)"
    assert not ok_lines(r.stdout)
    # Nothing of the computation was left running on any host.
    wait_for(lambda: not pingpong_processes(), 20, "no restored process left")
    # ... and the checkpoint is still there for a later try.
    assert (tmp_path / "dmtcp_restart_script.sh").exists()


def test_restart_gathers_a_two_host_computation_on_one_host(hosts2, env, tmp_path, launch):
    """Checkpointed on two hosts, restarted on one (the other's part maps to this host): each part comes back
    in an agent of its own, and the connection between them is rewired on the one host."""
    import socket
    h1 = hosts2[0]
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    checkpoint_and_kill(job)
    assert_finished_on(restart_script(tmp_path, env, {h1.name: socket.gethostname()}), socket.gethostname())


def remote_agents() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "--remote-io" in (p.info["cmdline"] or []) and "launch" in (p.info["cmdline"] or [])]


def test_a_host_that_stops_answering_fails_the_checkpoint_and_the_job_goes_on(hosts2, env, tmp_path, launch):
    """The other host's agent hangs (SIGSTOP) during a checkpoint: after the phase timeout the checkpoint
    fails naming that host, no generation is committed, this host's processes run again at once, and when the
    other host comes back the computation finishes as if nothing happened."""
    env["HPCCKPT_PHASE_TIMEOUT"] = "4"
    h1 = hosts2[0]
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    agents = wait_for(remote_agents, 10, "the remote agent")     # its launcher and the agent itself
    for a in agents:
        a.suspend()
    try:
        t = time.monotonic()
        r = job.command("-bc", timeout=60)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert h1.name in r.stdout + r.stderr, r.stdout + r.stderr
        assert time.monotonic() - t < 30
        assert not list(tmp_path.glob("ckpt_*/gen*.json")), "a failed checkpoint must not be committed"
        assert not (tmp_path / "dmtcp_restart_script.sh").exists()
    finally:
        for a in agents:
            a.resume()
    assert job.wait(60) == 0
    nums = [i for i, _ in ok_lines(out.read_text())]
    assert nums == list(range(1, N + 1))
    assert out.read_text().rstrip().endswith("done")


def test_restart_with_one_host_s_images_missing_names_that_host(hosts2, env, tmp_path, launch):
    """Only this host's images given: the restart waits for the other host's part (HPCCKPT_RESTART_TIMEOUT),
    then gives up naming it; nothing restored is left running."""
    import json
    import socket
    h1 = hosts2[0]
    job, out = start(launch, hosts2, env, tmp_path, h1.name)
    checkpoint_and_kill(job)
    wait_for(lambda: not pingpong_processes(), 20, "the killed job's processes to go")
    manifest = json.loads(sorted(tmp_path.glob("ckpt_*/gen*.json"))[-1].read_text())
    mine = [i["path"] for i in manifest["images"] if i["host"] == socket.gethostname()]
    assert mine and len(mine) < len(manifest["images"])
    env["HPCCKPT_RESTART_TIMEOUT"] = "5"
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), *mine], env, tmp_path, timeout=60)
    assert r.returncode != 0
    assert h1.name in r.stderr, r.stderr[-2000:]
    assert not ok_lines(r.stdout)
    wait_for(lambda: not pingpong_processes(), 20, "no restored process left")
