"""The coordinator against other users of the machine (docs/reliability/netsec.md): it listens on loopback for a
single-host computation, refuses a captured command replayed by another uid from another address (no status in
the refusal), stays small under oversize frames and keeps a short log under a flood of bad messages.

The attacker runs as uid 65534 with Debian's /usr/bin/python3 and speaks raw ZMTP 3.0 over a plain socket
(it has neither pyzmq nor the secret): what a stranger on the host or the network can do."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from conftest import run, wait_for
from hpcckpt.coordinator import protocol
from hpcckpt.coordinator.ratelog import RateLimitedLog

NOBODY = 65534
SYSTEM_PY = "/usr/bin/python3"

# The attacker: connects from 127.0.0.2 (another address than the legitimate client's), then per mode sends
# a captured byte stream again, oversize frames, or a flood of bad messages; prints what came back (hex).
ATTACKER = r'''
import os, socket, struct, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
def frame(data, more=False):
    flags = 0x01 if more else 0
    if len(data) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(data)) + data
    return bytes([flags, len(data)]) + data
def ready():
    prop = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    body = b"\x05READY" + prop
    return bytes([0x04, len(body)]) + body
def connect(greeting=GREETING):
    """A connection past the greeting (libzmq wants it answered before the rest comes)."""
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", port))
    s.sendall(greeting)
    got = b""
    while len(got) < 64:
        d = s.recv(64 - len(got))
        if not d:
            raise SystemExit("the coordinator closed the connection during the greeting")
        got += d
    return s
def drain(s, secs):
    s.settimeout(0.2)
    got, end = b"", time.time() + secs
    while time.time() < end:
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not d:
            break
        got += d
    return got
if mode == "replay":
    stream = bytes.fromhex(sys.stdin.read().strip())
    s = connect(stream[:64])
    s.sendall(stream[64:])
    print(drain(s, 3).hex())
elif mode == "oversize":
    chunk = b"\0" * (1 << 20)
    for i in range(5):
        s = connect()
        try:
            s.sendall(ready())
            s.sendall(b"\x01\x09HPCCKPT/1" + b"\x01\x20" + b"\0" * 32 + b"\x02" + struct.pack(">Q", 100 << 20))
            for _ in range(100):
                s.sendall(chunk)
        except OSError as e:
            print("cut off:", e.__class__.__name__, file=sys.stderr)
        s.close()
    print("done")
elif mode == "flood":
    n = int(sys.argv[3])
    one = frame(b"HPCCKPT/1", True) + frame(b"\1" * 32, True) + frame(b'{"type":"command","cmd":"status"}')
    junk = frame(b"hello?")
    s = connect()
    s.sendall(ready())
    batch = (one + junk) * 1000
    for i in range(n // 2000):
        s.sendall(batch)
    s.close()
    print("done")
'''


@pytest.fixture(scope="module")
def attacker_script():
    if os.geteuid() != 0:
        pytest.skip("needs root to run the attacker as another uid")
    if not (os.path.exists(SYSTEM_PY) and shutil.which("setpriv")):
        pytest.skip("needs /usr/bin/python3 and setpriv")
    d = Path(tempfile.mkdtemp(prefix="hpcckpt-attacker-"))
    d.chmod(0o755)
    script = d / "attacker.py"
    script.write_text(ATTACKER)
    script.chmod(0o644)
    yield script
    shutil.rmtree(d, ignore_errors=True)


def attack(script: Path, *args, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--",
           SYSTEM_PY, str(script), *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


@pytest.fixture
def coordinator(env, tmp_path):
    port_file = tmp_path / "coord.port"
    log = tmp_path / "coord.log"
    with open(log, "w") as err:
        p = subprocess.Popen(["dmtcp_coordinator", "-p", "0", "--port-file", str(port_file), "--ckptdir",
                              str(tmp_path)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 20, "coordinator port")
    yield p, int(port_file.read_text()), log
    if p.poll() is None:
        p.kill()
        p.wait()


def status(env, tmp_path, port: int, timeout: float = 30) -> dict:
    r = run(["dmtcp_command", "-p", str(port), "-s", "--json"], env, tmp_path, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def listening(port: int) -> set[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.split()[3].endswith(f":{port}")}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


# ------------------------------------------------------------------------------------------------ binding --

def test_single_host_coordinator_listens_on_loopback_only(coordinator, env, tmp_path):
    proc, port, _ = coordinator
    assert listening(port) == {"127.0.0.1"}
    assert status(env, tmp_path, port)["listening"] == ["127.0.0.1"]


def test_launched_job_coordinator_listens_on_loopback_only(launch, env, tmp_path):
    job = launch("sleep", "30")
    wait_for(lambda: listening(job.port), 10, "the coordinator listening")
    assert listening(job.port) == {"127.0.0.1"}


def test_listen_opens_only_an_address_of_this_host(coordinator, env, tmp_path, monkeypatch):
    from hpcckpt.coordinator.binding import open_towards
    from hpcckpt.coordinator.client import CoordinatorUnreachable
    from hpcckpt.hostnames import local_ipv4s
    proc, port, _ = coordinator
    monkeypatch.setenv("HPCCKPT_RUNDIR", env["HPCCKPT_RUNDIR"])
    for bad, why in (("192.0.2.7", "not an address of this host"), ("0.0.0.0", "every interface needs --bind"),
                     ("nonsense", "not an IPv4 address")):
        with pytest.raises(CoordinatorUnreachable, match=why):
            open_towards(port, bad)
    assert listening(port) == {"127.0.0.1"}
    other = next((ip for ip in local_ipv4s() if not ip.startswith("127.")), None)
    if other is None:
        pytest.skip("this host has no address besides loopback")
    open_towards(port, other)
    assert listening(port) == {"127.0.0.1", other}


def test_bind_option_and_coord_host(env, tmp_path):
    port_file = tmp_path / "p"
    p = subprocess.Popen(["dmtcp_coordinator", "-p", "0", "--port-file", str(port_file), "--bind", "0.0.0.0",
                          "--daemon", "--exit-on-last", "--timeout", "5"], env=env, cwd=tmp_path)
    assert p.wait(20) == 0
    port = int(port_file.read_text())
    assert listening(port) == {"0.0.0.0"}
    run(["dmtcp_command", "-p", str(port), "-q"], env, tmp_path, check=True)
    r = run(["dmtcp_coordinator", "-p", "0", "--bind", "192.0.2.7", "--daemon"], env, tmp_path)
    assert r.returncode != 0 and "192.0.2.7" in r.stderr


@pytest.mark.parametrize("nodes", [1, 2])
def test_batch_job_over_several_nodes_listens_towards_the_other_nodes(nodes, env, tmp_path):
    """Inside a PBS job (the same code path for Slurm and Grid Engine: the scheduler's node list) over several
    nodes, the coordinator also listens on the interface towards the other nodes; over one node, loopback only."""
    from hpcckpt.hostnames import local_ipv4s
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{os.uname().nodename}\n" + ("192.0.2.1\n" if nodes == 2 else ""))
    port_file = tmp_path / "p"
    r = run(["dmtcp_coordinator", "-p", "0", "--port-file", str(port_file), "--daemon", "--timeout", "5"],
            {**env, "PBS_JOBID": "1.server", "PBS_NODEFILE": str(nodefile)}, tmp_path)
    assert r.returncode == 0, r.stderr
    port = int(port_file.read_text())
    try:
        got = listening(port)
        if nodes == 1:
            assert got == {"127.0.0.1"}
        else:
            assert "127.0.0.1" in got and len(got) == 2 and "0.0.0.0" not in got
            assert (got - {"127.0.0.1"}) <= set(local_ipv4s())
    finally:
        run(["dmtcp_command", "-p", str(port), "-q"], env, tmp_path)


# ------------------------------------------------------------------------------------------------- replay --

class Recorder:
    """A TCP relay to the coordinator that keeps what clients sent: a capture of the wire."""

    def __init__(self, port: int):
        self.lsk = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsk.getsockname()[1]
        self.target = port
        self.sent: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsk.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            buf = bytearray()
            self.sent.append(buf)
            threading.Thread(target=self._pump, args=(c, u, buf), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, None), daemon=True).start()

    @staticmethod
    def _pump(a, b, keep):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                if keep is not None:
                    keep.extend(d)
                b.sendall(d)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_replayed_command_from_another_uid_and_address_gets_no_status(coordinator, env, tmp_path,
                                                                      attacker_script):
    proc, port, log = coordinator
    rec = Recorder(port)
    secret = Path(env["HPCCKPT_RUNDIR"]) / f"coord-{port}.secret"
    r = run(["dmtcp_command", "-p", str(rec.port), "-s", "--json"], {**env, "HPCCKPT_SECRET_FILE": str(secret)},
            tmp_path)
    assert r.returncode == 0 and "num_peers" in json.loads(r.stdout), r.stderr     # the victim's own command
    stream = max(rec.sent, key=len)
    assert b'"cmd":"status"' in stream
    out = attack(attacker_script, "replay", port, stdin=stream.hex())
    assert out.returncode == 0, out.stderr
    got = bytes.fromhex(out.stdout.strip())
    assert b"replayed message" in got                       # an authenticated refusal that says why...
    for field in (b"num_peers", b"computation", b"ckptdir", b"coordinator_version"):
        assert field not in got                             # ...and nothing of the status
    assert status(env, tmp_path, port)["num_peers"] == 0   # the owner still gets it
    assert "refused a message" in log.read_text()


def test_stale_message_is_refused_even_with_a_new_nonce(coordinator, env, tmp_path, monkeypatch):
    """A message dated outside the freshness window (a replay after the nonces are forgotten, or a host whose
    clock is off) is refused with an authenticated reason and no status."""
    proc, port, _ = coordinator
    monkeypatch.setenv("HPCCKPT_RUNDIR", env["HPCCKPT_RUNDIR"])
    key = protocol.read_secret(port)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        for ts, why in ((time.time() - 3600, "stale message"), (time.time() + 3600, "in the future")):
            body = json.dumps({"type": "command", "cmd": "status", "nonce": protocol.new_nonce(), "ts": ts}).encode()
            s.send_multipart([protocol.PROTO_TAG, hmac.new(key, body, hashlib.sha256).digest(),
                              body])
            assert s.poll(5000)
            reply = protocol.decode(key, s.recv_multipart())
            assert reply["type"] == "reject" and why in reply["reason"] and "num_peers" not in reply
    finally:
        s.close()
        ctx.term()


def test_a_client_whose_clock_is_off_is_told_why(coordinator, env, tmp_path, monkeypatch):
    """A command (or agent) on a host whose clock is 20 minutes ahead fails with one line naming the cause."""
    import types
    from hpcckpt.coordinator.client import CoordinatorUnreachable, command
    proc, port, _ = coordinator
    monkeypatch.setenv("HPCCKPT_RUNDIR", env["HPCCKPT_RUNDIR"])
    real = time.time
    from hpcckpt.coordinator import wire
    monkeypatch.setattr(wire, "time", types.SimpleNamespace(time=lambda: real() + 1200))
    with pytest.raises(CoordinatorUnreachable, match=r"refused us: message dated 1[12]\d\d s in the future \(clocks"):
        command("127.0.0.1", port, "status", timeout=5)


def test_client_takes_only_the_reply_to_its_own_request(env, tmp_path, monkeypatch):
    """A reply naming another request (an earlier one, or none) is not taken for ours."""
    from hpcckpt.coordinator.client import Connection
    key = b"k" * 32
    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    conn = Connection("127.0.0.1", port, key=key, ctx=ctx)
    try:
        def serve():
            ident, *frames = srv.recv_multipart()
            req = protocol.decode(key, frames, protocol.Freshness())
            for msg in ({"type": "reply", "ok": False, "which": "old", "re": protocol.new_nonce()},
                        {"type": "reply", "ok": False, "which": "none"},
                        {"type": "reply", "ok": True, "which": "ours", "re": req["nonce"]}):
                srv.send_multipart([ident] + protocol.encode(key, msg))
        t = threading.Thread(target=serve)
        t.start()
        reply = conn.recv(5, reply_to=conn.send({"type": "command", "cmd": "status"}))
        assert reply is not None and reply["which"] == "ours"
        t.join()
    finally:
        conn.sock.setsockopt(zmq.LINGER, 0)
        conn.close()                       # (its connection monitor too: else term() waits for ever)
        srv.close(0)
        ctx.term()


def test_freshness_memory_is_bounded_and_forgets_stale_nonces():
    f = protocol.Freshness(window=10, max_nonces=1000)
    t0 = 1_000_000.0
    for i in range(900):
        f.check(f"nonce-{i:06d}", t0, now=t0)
    with pytest.raises(protocol.Refused, match="replayed"):
        f.check("nonce-000001", t0, now=t0 + 1)
    with pytest.raises(protocol.Refused, match="stale"):
        f.check("nonce-000001", t0, now=t0 + 11)           # after the window: stale, whatever the nonce
    f.check("fresh-000001", t0 + 30, now=t0 + 30)          # the purge forgot every nonce of t0
    assert len(f.seen) == 1
    body = b'{"type":"command","cmd":"status"}'           # an older hpcckpt's message: authentic, unstamped
    with pytest.raises(protocol.Refused, match="no nonce"):
        protocol.decode(b"k", [protocol.PROTO_TAG, hmac.new(b"k", body, hashlib.sha256).digest(), body],
                        protocol.Freshness())


# ------------------------------------------------------------------------------------------- size, flood --

def test_oversize_frames_do_not_grow_the_coordinator(coordinator, env, tmp_path, attacker_script):
    proc, port, _ = coordinator
    status(env, tmp_path, port)
    before = rss_kb(proc.pid)
    out = attack(attacker_script, "oversize", port)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    assert out.stderr.count("cut off") == 5, out.stderr       # each connection dropped at the frame's header
    grown = rss_kb(proc.pid) - before
    assert grown < 40_000, f"coordinator grew by {grown} kB under five 100 MB frames"
    assert status(env, tmp_path, port)["num_peers"] == 0


def test_a_message_over_the_limit_is_refused_by_its_sender_and_dropped(env, tmp_path, caplog):
    """The sender logs that its message exceeds HPCCKPT_MAX_MESSAGE (it would be dropped on the way)."""
    big = {"type": "ack", "tcp_ends": [["10.0.0.1", 1, "10.0.0.2", 2, 1]] * 10}
    from hpcckpt.coordinator import wire
    old = wire.MAX_MESSAGE_BYTES
    wire.MAX_MESSAGE_BYTES = 100
    try:
        protocol.encode(b"k", big)
    finally:
        wire.MAX_MESSAGE_BYTES = old
    assert "exceeds the coordinator's limit" in caplog.text and "HPCCKPT_MAX_MESSAGE" in caplog.text


@pytest.mark.slow
def test_a_flood_of_bad_messages_keeps_the_log_short_and_the_coordinator_responsive(coordinator, env, tmp_path,
                                                                                   attacker_script):
    proc, port, log = coordinator
    t = time.monotonic()
    out = attack(attacker_script, "flood", port, 200_000)
    assert out.returncode == 0, out.stderr
    st = status(env, tmp_path, port, timeout=60)
    assert st["num_peers"] == 0
    print(f"200k bad messages, then a status answered, in {time.monotonic() - t:.1f} s")
    text = log.read_text()
    assert len(text) < 10_000, f"log grew to {len(text)} bytes"
    assert text.count("rejected a message") <= 10


def test_rate_limited_log_summarises_what_it_left_out(caplog):
    import logging
    rl = RateLimitedLog(logging.getLogger("hpcckpt.test"), "rejected messages", burst=3, period=60)
    t0 = rl.start
    for i in range(1000):
        rl.warning("rejected %d", i)
    rl.flush(t0 + 30)
    assert caplog.text.count("rejected ") == 3
    rl.flush(t0 + 61)
    assert "suppressed 997 more rejected messages" in caplog.text
    rl.warning("rejected again")
    assert "rejected again" in caplog.text


# ------------------------------------------------------------------------------------------------ hosts --

try:
    from hosts import Hosts
    hosts2 = Hosts.fixture(n=2, scope="module", subnet=None)
except ImportError:          # pragma: no cover - the harness is part of the tests
    hosts2 = None


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.skipif(os.geteuid() != 0, reason="the multi-host harness needs root")
def test_a_job_spanning_hosts_opens_only_the_interface_towards_them(hosts2, env, tmp_path):
    """A job that starts its other half with `ssh HOST` (through our shim): the coordinator listens on loopback
    and on the bridge towards the hosts, never on every interface."""
    from test_multihost import job_cmd, ok_lines
    env = hosts2.ssh_env(env)
    port_file = tmp_path / "port"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        job = subprocess.Popen(["dmtcp_launch", "-p", "0", "--port-file", str(port_file), "--ckptdir", str(tmp_path),
                                *job_cmd(hosts2, hosts2[0].name, tmp_path)], env=env, cwd=tmp_path, stdout=out,
                               stderr=err, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 20, "the coordinator's port")
        port = int(port_file.read_text())
        wait_for(lambda: len(ok_lines((tmp_path / "out").read_text())) >= 5, 30, "the remote client's answers")
        assert listening(port) == {"127.0.0.1", hosts2.root_ip}
        st = status(env, tmp_path, port)
        assert st["num_agents"] == 2 and sorted(st["listening"]) == sorted(["127.0.0.1", hosts2.root_ip])
    finally:
        job.kill()
        job.wait()
        subprocess.run(["dmtcp_command", "--port-file", str(port_file), "-q"], env=env, capture_output=True,
                       timeout=20)
