"""The per-node relay with real processes and real ZeroMQ: several agents of one node behind one relay (relay: on)
checkpoint, restart and go on; the status lists every agent; an agent killed behind the relay during a round fails
the round (the previous generation stays); a killed relay's agents reach the coordinator directly; a relay
without the computation's secret is refused."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import zmq
from conftest import line_count, restart_in_background, run, wait_for

from hpcckpt.coordinator import protocol

AGENTS = 3


def relay_processes(port: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "relay" in cmd and "--coord-port" in cmd and cmd[cmd.index("--coord-port") + 1] == str(port):
            out.append(p)
    return out


def start(launch, counter, tmp_path: Path, env: dict, faults: dict[int, str] | None = None, **envs):
    """AGENTS counters, each under its own dmtcp_launch, all behind this node's relay."""
    env.update(HPCCKPT_RELAY="on", **envs)
    outs = [tmp_path / f"out{k}.txt" for k in range(AGENTS)]
    first = launch(counter, outs[0], 4, 100000, 10000, extra=("--no-gzip",))
    others = []
    for k in range(1, AGENTS):
        e = dict(env, **({"HPCCKPT_FAULT": faults[k]} if faults and k in faults else {}))
        others.append(subprocess.Popen(
            ["dmtcp_launch", "-j", "-p", str(first.port), "--ckptdir", str(tmp_path), "--no-gzip", str(counter),
             str(outs[k]), "4", "100000", "10000"], env=e, cwd=tmp_path, stdin=subprocess.DEVNULL,
            stdout=open(tmp_path / f"join{k}.out", "w"), stderr=open(tmp_path / f"join{k}.err", "w")))
    for o in outs:
        wait_for(lambda o=o: line_count(o) >= 3, 30, f"{o.name} to run")
    wait_for(lambda: status(first).get("num_agents") == AGENTS, 20, "every agent to join")
    return first, others, outs


def status(job) -> dict:
    return json.loads(job.command("-s", "--json").stdout or "{}")


def coordinator_log(job) -> str:
    return "".join(Path(p).read_text() for p in glob.glob(os.path.join(job.env["HPCCKPT_RUNDIR"], "coord-*.log")))


def grows(outs) -> None:
    n = [line_count(o) for o in outs]
    for o, k in zip(outs, n):
        wait_for(lambda o=o, k=k: line_count(o) > k + 3, 20, f"{o.name} to go on")


def stop(others) -> None:
    for p in others:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_agents_behind_a_relay_checkpoint_restart_and_continue(launch, counter, tmp_path, env):
    job, others, outs = start(launch, counter, tmp_path, env)
    try:
        assert len(relay_processes(job.port)) == 1, "one relay for the node"
        # the coordinator has one peer for the node, the status every agent and process
        assert "relay 1 joined" in coordinator_log(job) and "peer 2 joined" not in coordinator_log(job)
        st = status(job)
        assert st["num_agents"] == AGENTS and st["num_peers"] == AGENTS
        peers = json.loads(job.command("-l", "--json").stdout)["peers"]
        assert sorted(p["peer"] for p in peers) == [2, 3, 4] and len({p["unique_id"] for p in peers}) == AGENTS
        for _gen in (1, 2):
            r = job.command("-bc", "--json")
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert json.loads(r.stdout)["checkpoint"]["images"] == AGENTS
        m = json.loads(next(tmp_path.glob("ckpt_*/gen000002.json")).read_text())
        assert len({i["agent_id"] for i in m["images"]}) == AGENTS, "each image names its agent"
        grows(outs)
        script = next(tmp_path.glob("dmtcp_restart_script_*.sh"))
        job.command("-k", check=True)
        job.wait(30)
        for p in others:
            p.wait(30)
    finally:
        stop(others)
    cut = [line_count(o) for o in outs]
    restarted = restart_in_background(script, env, tmp_path)
    try:
        wait_for(lambda: status(restarted).get("num_agents") == AGENTS, 30, "the restarted agents")
        for o, k in zip(outs, cut):
            wait_for(lambda o=o, k=k: line_count(o) > k + 3, 30, f"{o.name} to go on after the restart")
    finally:
        restarted.command("-k")
        restarted.wait(30)


@pytest.mark.slow
def test_an_agent_killed_behind_the_relay_fails_the_round_and_the_previous_generation_stays(
        launch, counter, tmp_path, env):
    """The second agent dies right after its suspend of the second round: the relay reports it lost (silent past
    the peer timeout), the round fails naming it, generation 1 stays the newest; the others run on."""
    job, others, outs = start(launch, counter, tmp_path, env, faults={1: "agent.after_suspend:exit@2"},
                              HPCCKPT_PEER_TIMEOUT="3")
    try:
        assert job.command("-bc").returncode == 0
        r = job.command("-bc", "--json", timeout=60)
        assert r.returncode != 0
        err = json.loads(r.stdout).get("error") or ""
        assert "stopped responding" in err and "agent" in err, err
        assert sorted(p.name for p in tmp_path.glob("ckpt_*/gen*.json")) == ["gen000001.json"]
        grows([outs[0], outs[2]])
        wait_for(lambda: status(job).get("num_agents") == AGENTS - 1, 20, "the lost agent to be listed no more")
        r = job.command("-bc", "--json")
        assert r.returncode == 0, (r.stdout, r.stderr)      # the rest checkpoints again
        assert json.loads(r.stdout)["checkpoint"]["images"] == AGENTS - 1
    finally:
        stop(others)


@pytest.mark.slow
def test_a_killed_relay_leaves_its_agents_to_the_coordinator(launch, counter, tmp_path, env):
    job, others, outs = start(launch, counter, tmp_path, env, HPCCKPT_COORD_FALLBACK="1", HPCCKPT_HEARTBEAT="0.5")
    try:
        before = sorted(p["peer"] for p in json.loads(job.command("-l", "--json").stdout)["peers"])
        (relay,) = relay_processes(job.port)
        relay.send_signal(signal.SIGKILL)
        wait_for(lambda: "took the computation back" in "".join(
            (tmp_path / f"join{k}.err").read_text() for k in range(1, AGENTS)), 30, "the agents to fall back")
        wait_for(lambda: coordinator_log(job).count("connects directly (its relay gone?)") == AGENTS, 30,
                 "every agent to be back directly")
        peers = json.loads(job.command("-l", "--json").stdout)["peers"]
        assert sorted(p["peer"] for p in peers) == before, "each keeps its peer number"
        r = job.command("-bc", "--json")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["checkpoint"]["images"] == AGENTS
        grows(outs)
    finally:
        stop(others)


def test_a_relay_without_the_secret_is_refused(launch, counter, tmp_path, env):
    """A process posing as a relay with another key: its hello is refused unauthenticated and joins nothing; the
    same for one posing as an agent at the node's relay."""
    env["HPCCKPT_RELAY"] = "on"
    job = launch(counter, tmp_path / "out.txt", 4, 100000, 10000)
    wait_for(lambda: status(job).get("num_agents") == 1, 20, "the agent")
    relay_port = int(next((tmp_path / "run").glob("relay-*.port")).read_text().split()[0])
    ctx = zmq.Context()
    try:
        for port, hello in ((job.port, protocol.Hello("evil", 1, [{"pid": 1, "program": "x"}], role="relay", members=[
                {"agent_id": "intruder", "agent_pid": 1, "processes": []}])),
                            (relay_port, protocol.Hello("evil", 1, [{"pid": 1, "program": "x"}], agent_id="intruder"))):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send_multipart(protocol.encode(b"x" * 32, hello.to_dict()))
            assert sock.poll(5000), f"no answer from port {port}"
            tag, mac, body = sock.recv_multipart()
            assert mac == b"" and "authentication failed" in json.loads(body)["reason"]
            sock.close()
    finally:
        ctx.term()
    time.sleep(0.3)
    assert status(job)["num_agents"] == 1 and "intruder" not in job.command("-l", "--json").stdout


@pytest.mark.slow
def test_a_tcp_connection_between_two_agents_behind_the_relay_survives_checkpoint_and_restart(
        launch, tmp_path, env):
    """A client and a server, each under its own launch behind the node's relay, talk TCP: the relay gives each
    agent the other end of its connection at the drain (only the ends it needs); checkpointed mid-exchange, killed
    and restarted, the client goes on from where it was with every answer right."""
    import sys
    prog = Path(__file__).parent / "programs" / "pingpong.py"
    env["HPCCKPT_RELAY"] = "on"
    portfile = tmp_path / "pp.port"
    server = launch(sys.executable, prog, "server", portfile)
    client_out = tmp_path / "client.out"
    client = subprocess.Popen(
        ["dmtcp_launch", "-j", "-p", str(server.port), "--ckptdir", str(tmp_path), sys.executable, str(prog),
         "client", "127.0.0.1", str(portfile), "120"], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=open(client_out, "w"), stderr=open(tmp_path / "client.err", "w"))
    try:
        wait_for(lambda: line_count(client_out) >= 10, 30, "the client to talk")
        assert len(relay_processes(server.port)) == 1 and status(server).get("num_agents") == 2
        r = server.command("-bc", "--json")
        assert r.returncode == 0, (r.stdout, r.stderr)
        script = next(tmp_path.glob("dmtcp_restart_script_*.sh"))
        server.command("-k", check=True)
        server.wait(30)
        client.wait(30)
    finally:
        stop([client])
    # (the restarted processes' standard output is the restart command's)
    r = run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=90)
    assert r.returncode == 0, (r.stdout, r.stderr)
    got = [int(x.split()[1]) for x in (client_out.read_text() + r.stdout).splitlines() if x.startswith("ok ")]
    assert r.stdout.rstrip().endswith("done") and "bad answer" not in r.stdout, r.stdout
    assert got[-1] == 120 and sorted(set(got)) == list(range(1, 121)), "a number skipped"


@pytest.mark.slow
def test_a_slow_agent_is_named_by_its_relay_before_the_coordinators_timeout(launch, counter, tmp_path, env):
    """One agent hangs after its suspend (fault point): the relay fails the drain after 0.8 x the phase timeout,
    naming that agent and its host (the coordinator's own timeout could only name the relay); the others go on."""
    job, others, outs = start(launch, counter, tmp_path, env, faults={2: "agent.after_suspend:sleep=20"},
                              HPCCKPT_PHASE_TIMEOUT="3")
    try:
        r = job.command("-bc", "--json", timeout=60)
        err = json.loads(r.stdout).get("error") or ""
        assert r.returncode != 0 and "relay on" in err and "waiting for agent" in err and "timed out" not in err, err
        assert not list(tmp_path.glob("ckpt_*/gen*.json"))
        grows([outs[0], outs[1]])
    finally:
        stop(others)
