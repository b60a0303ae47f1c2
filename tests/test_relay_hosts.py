"""The per-node relay across hosts (simulated hosts in network namespaces with sshd: tests/hosts.py).

A computation launched with `--relay` on this host starts ranks on another host through our ssh shim (several
`ssh HOST counter ...`, so that host runs several agents): the shim forwards the relay setting, so the first
remote launch starts that host's relay and every agent there talks to the coordinator through it. Checkpoint,
the listing names every agent with its host, kill, restart with the restart script (remote parts over ssh), and
every rank goes on."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import line_count, restart_in_background, wait_for
from hosts import Hosts

pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")]

REMOTE = 3          # agents on the other host

hosts1 = Hosts.fixture(n=1, scope="module", subnet=None)


@pytest.fixture
def env(env, hosts1):
    return hosts1.ssh_env(env)


def status(job) -> dict:
    return json.loads(job.command("-s", "--json").stdout or "{}")


def remote_port_files(host: str) -> list[Path]:
    return list(Path(f"/tmp/hpcckpt-{os.getuid()}").glob(f"relay-{host}-*.port"))


@pytest.fixture(autouse=True)
def no_leftovers(hosts1):
    """(a failed test's remote relay is killed with the hosts: its port file goes with this test)"""
    yield
    for p in remote_port_files(hosts1[0].name):
        p.unlink(missing_ok=True)


def test_a_relayed_computation_across_hosts_checkpoints_lists_every_agent_and_restarts(
        hosts1, env, tmp_path, launch, counter):
    (b,) = hosts1
    env.update(HPCCKPT_RELAY="on", HPCCKPT_HEARTBEAT="0.5")      # (the relays go soon after their coordinator)
    outs = [tmp_path / "local.txt"] + [tmp_path / f"remote{k}.txt" for k in range(REMOTE)]
    prog = f"{counter} {{}} 1 100000 10000"
    script = " & ".join([prog.format(outs[0])] + [f"ssh {b.name} '{prog.format(o)}'" for o in outs[1:]])
    job = launch("bash", "-c", f"{script}; wait")
    t0 = time.monotonic()
    for o in outs:
        wait_for(lambda o=o: line_count(o) >= 3, 30, f"{o.name} to run")
    wait_for(lambda: status(job).get("num_agents") == 1 + REMOTE, 30, "every agent to join")
    # one relay per host: this host's (for the launch's one agent: bash and its children) and the other
    # host's for its agents (its run directory is that host's default: ssh does not pass ours)
    rundir = Path(env["HPCCKPT_RUNDIR"])
    log = "".join(Path(p).read_text() for p in rundir.glob("coord-*.log"))
    assert len(re.findall(r"relay \d+ joined", log)) == 2, log[-3000:]
    assert f"on {b.name}: {REMOTE} agent(s)" in log, log[-3000:]
    peers = json.loads(job.command("-l", "--json").stdout)["peers"]
    hosts = {}
    for p in peers:
        hosts.setdefault(p["host"], set()).add(p["peer"])
    assert len(hosts.get(b.name, ())) == REMOTE, peers     # every agent of the other host, each its own peer
    assert len(hosts) == 2, peers
    listing = job.command("-l").stdout
    assert listing.count(b.name) >= REMOTE, listing
    r = job.command("-bc", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    images = json.loads(r.stdout)["checkpoint"]["images"]    # (bash, counters, ssh shims, remote shells)
    # the listing has every process of every agent, each with its host
    wait_for(lambda: status(job).get("num_peers") == images, 10, "the listing to have every process")
    rows = json.loads(job.command("-l", "--json").stdout)["peers"]
    assert len(rows) == images and sum(r["host"] == b.name for r in rows) >= 2 * REMOTE, rows
    m = json.loads(sorted(tmp_path.glob("ckpt_*/gen*.json"))[-1].read_text())
    assert len({i["agent_id"] for i in m["images"] if i["host"] == b.name}) == REMOTE, m["images"]
    script_path = next(tmp_path.glob("dmtcp_restart_script_*.sh"))
    job.command("-k", check=True)
    job.wait(30)
    # the coordinator gone, the other host's relay exits and removes its port file (in that host's run
    # directory: ssh does not pass ours)
    wait_for(lambda: not remote_port_files(b.name), 20, "the other host's relay to remove its port file")
    for p in Path(f"/tmp/hpcckpt-{os.getuid()}").glob("relay-*.log"):      # (its log: a test leaves none)
        if f"for the coordinator {hosts1.root_ip}:{job.port}" in p.read_text():
            p.unlink()
    cut = [line_count(o) for o in outs]
    restarted = restart_in_background(script_path, env, tmp_path)
    try:
        wait_for(lambda: status(restarted).get("num_agents") == 1 + REMOTE, 40, "the restarted agents")
        for o, k in zip(outs, cut):
            wait_for(lambda o=o, k=k: line_count(o) > k + 3, 30, f"{o.name} to go on after the restart")
    finally:
        restarted.command("-k")
        try:
            restarted.wait(30)
        except subprocess.TimeoutExpired:
            restarted.kill()
    print(f"relayed 2-host checkpoint, kill, restart in {time.monotonic() - t0:.1f} s")
