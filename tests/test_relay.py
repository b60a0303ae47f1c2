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
        assert f": {AGENTS} agent(s)" in coordinator_log(job), "the round's log line counts agents"
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


@pytest.mark.slow
def test_checkpoint_progress_counts_agents_not_relays(launch, counter, tmp_path, env):
    """During a round `-s --json`'s checkpoint_progress counts 3 agents, not the one relay that stands for them
    (the progress line `dmtcp_command -bc` shows on a terminal reads the same fields)."""
    job, others, outs = start(launch, counter, tmp_path, env, faults={1: "agent.after_suspend:sleep=2"})
    try:
        bc = subprocess.Popen(["dmtcp_command", "--port-file", str(job.port_file), "-bc"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cp = wait_for(lambda: status(job).get("checkpoint_progress"), 10, "the round to show")
        assert cp["agents"] == AGENTS and cp["agents_durable"] <= AGENTS, cp
        assert bc.wait(30) == 0
    finally:
        stop(others)


@pytest.mark.slow
def test_a_killed_relay_leaves_nothing_and_the_next_launch_starts_a_new_one(launch, counter, tmp_path, env):
    """SIGKILL the relay: no lock file, no copy of the secret in the run directory (the only secret there is the
    coordinator's); its port file is stale and the next launch on the node removes it and starts a new relay,
    whose log has its first line."""
    env.update(HPCCKPT_RELAY="on", HPCCKPT_COORD_FALLBACK="1", HPCCKPT_HEARTBEAT="0.5")
    rundir = tmp_path / "run"
    job = launch(counter, tmp_path / "out0.txt", 1, 100000, 10000)
    wait_for(lambda: status(job).get("num_agents") == 1, 20, "the agent")
    (relay,) = relay_processes(job.port)
    (pf,) = rundir.glob("relay-*.port")
    old_port = int(pf.read_text().split()[0])
    assert (pf.stat().st_mode & 0o077) == 0
    relay.send_signal(signal.SIGKILL)
    relay.wait(10)
    names = sorted(p.name for p in rundir.iterdir())
    assert not [n for n in names if n.endswith(".lock")], names
    assert [n for n in names if n.endswith(".secret")] == [f"coord-{job.port}.secret"], names
    second = subprocess.Popen(
        ["dmtcp_launch", "-j", "-p", str(job.port), "--ckptdir", str(tmp_path), str(counter),
         str(tmp_path / "out1.txt"), "1", "100000", "10000"], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "join1.err", "w"))
    try:
        wait_for(lambda: "connects directly (its relay gone?)" in coordinator_log(job), 30, "the first agent back")
        wait_for(lambda: status(job).get("num_agents") == 2, 30, "both agents")
        (new,) = relay_processes(job.port)
        new_port = int(pf.read_text().split()[0])
        assert new.pid != relay.pid and new_port != old_port
        first = (rundir / f"relay-{new_port}.log").read_text().splitlines()[0]
        assert f"on 127.0.0.1:{new_port} for the coordinator" in first, first
        assert job.command("-bc").returncode == 0
        names = sorted(p.name for p in rundir.iterdir())
        assert [n for n in names if n.endswith(".secret")] == [f"coord-{job.port}.secret"], names
        # the coordinator gone, the new relay exits and removes its port file
        job.command("-k", check=True)
        wait_for(lambda: not pf.exists(), 20, "the relay to remove its port file")
    finally:
        stop([second])


NOBODY = 65534


def as_nobody(script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--",
                             "/usr/bin/python3", "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, **kw)


# A stranger's listener: says where it listens, then whether anyone connected before the test closed its input.
FAKE_RELAY = r'''
import select, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
ready = select.select([s, sys.stdin], [], [], 60)[0]
print("connected" if s in ready else "nobody", flush=True)
'''

# A stranger sends junk to the relay's port: a bad greeting, then random bytes after a valid one.
JUNK = r'''
import os, socket, sys, time
port = int(sys.argv[1])
for greeting in (os.urandom(64), b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32):
    s = socket.socket(); s.connect(("127.0.0.1", port))
    s.sendall(greeting + os.urandom(4096)); time.sleep(0.3); s.close()
print("done", flush=True)
'''


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"), reason="needs root and setpriv")
def test_a_strangers_port_file_is_not_used_and_junk_at_the_relay_is_refused(launch, counter, tmp_path, env):
    """uid 65534 listens on a port and a port file of its own names it where the node's relay's goes: the agent
    ignores it (not ours), starts a real relay, and nobody connects to the stranger. Then junk from the stranger
    at the relay's port, and an authentic message replayed, are refused; the relay serves on."""
    from hpcckpt.relay import find
    fake = as_nobody(FAKE_RELAY)
    assert fake.stdout is not None and fake.stdin is not None
    fake_port = int(fake.stdout.readline())
    coord_port = _free_port()
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    env.update(HPCCKPT_RELAY="on")
    os.environ["HPCCKPT_RUNDIR"] = str(rundir)          # (find.port_file: this test's run directory)
    try:
        pf = Path(find.port_file("127.0.0.1", coord_port))
    finally:
        del os.environ["HPCCKPT_RUNDIR"]
    pf.write_text(f"{fake_port}\n")
    os.chown(pf, NOBODY, NOBODY)
    job = launch(counter, tmp_path / "out.txt", 1, 100000, 10000, extra=("-p", str(coord_port)))
    wait_for(lambda: status(job).get("num_agents") == 1, 20, "the agent")
    fake.stdin.close()
    assert fake.stdout.readline().strip() == "nobody", "the agent connected to the stranger's port"
    fake.wait(10)
    assert pf.stat().st_uid == os.getuid(), "the real relay's port file replaces the stranger's"
    relay_port = int(pf.read_text().split()[0])
    assert relay_port != fake_port and len(relay_processes(job.port)) == 1
    junk = as_nobody(JUNK, str(relay_port))
    assert junk.communicate(timeout=20)[0].strip() == "done"
    # an authentic message (signed with the secret) sent twice: the second is a replay
    key = bytes.fromhex((rundir / f"coord-{job.port}.secret").read_text())
    frames = protocol.encode(key, {"type": "heartbeat"})
    ctx = zmq.Context()
    try:
        answers = []
        for _ in range(2):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{relay_port}")
            sock.send_multipart(frames)
            assert sock.poll(5000), "no answer from the relay"
            answers.append(json.loads(sock.recv_multipart()[2])["reason"])
            sock.close()
    finally:
        ctx.term()
    assert "unknown agent" in answers[0] and "replayed" in answers[1], answers
    assert len(relay_processes(job.port)) == 1 and status(job)["num_agents"] == 1
    r = job.command("-bc", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A stranger takes a port: accepts connections and says nothing, until its input closes.
SQUATTER = r'''
import select, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
print("listening", flush=True)
held = []
while True:
    ready = select.select([s, sys.stdin], [], [])[0]
    if sys.stdin in ready:
        break
    held.append(s.accept()[0])
'''


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"), reason="needs root and setpriv")
def test_an_agent_falls_back_when_a_stranger_takes_its_dead_relays_port(launch, counter, tmp_path, env):
    """The relay killed, uid 65534 binds its port at once and accepts every connection without a word: the agent
    does not wait on it forever - a relay port that never completes a handshake counts as closed, and after
    coord_fallback the agent is back at the coordinator directly, and checkpoints."""
    env.update(HPCCKPT_RELAY="on", HPCCKPT_COORD_FALLBACK="1", HPCCKPT_HEARTBEAT="0.5")
    job = launch(counter, tmp_path / "out0.txt", 1, 100000, 10000)
    wait_for(lambda: status(job).get("num_agents") == 1, 20, "the agent")
    (relay,) = relay_processes(job.port)
    port = int(next((tmp_path / "run").glob("relay-*.port")).read_text().split()[0])
    relay.send_signal(signal.SIGKILL)
    relay.wait(10)
    squatter = as_nobody(SQUATTER, str(port))
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "listening"
        wait_for(lambda: "connects directly (its relay gone?)" in coordinator_log(job), 30, "the agent back directly")
        r = job.command("-bc", "--json")
        assert r.returncode == 0, (r.stdout, r.stderr)
    finally:
        assert squatter.stdin is not None
        squatter.stdin.close()
        squatter.wait(10)
