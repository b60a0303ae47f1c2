"""dmtcp_command's quick path (cli/cmdquick.py) and its plain-Python ZMTP connection (coordinator/zmtp.py,
client.CommandConnection): the same answers as the full path, libzmq and the settings machinery never imported,
and the protocol's authentication kept (requests MACed, stamped and fresh; replies taken only when authentic and
naming our request). Timing is bench/latency.py's business, not these tests'."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest
import zmq
from conftest import run, wait_for

from hpcckpt.cli import cmdquick
from hpcckpt.coordinator import client, protocol


@pytest.fixture
def coordinator(env, tmp_path):
    port_file = tmp_path / "coord.port"
    p = subprocess.Popen(["dmtcp_coordinator", "-p", "0", "--port-file", str(port_file), "--ckptdir", str(tmp_path)],
                         env=env, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 20, "coordinator port")
    yield int(port_file.read_text())
    if p.poll() is None:
        p.kill()
        p.wait()


def _norm(text: str) -> str:
    """Output with what differs between two calls (the reply's nonce and time) taken out."""
    return re.sub(r'"(nonce|ts)": [^,}]+', r'"\1": X', text)


def test_parse_takes_only_the_simple_cases():
    env = {"HPCCKPT_RUNDIR": "/x", "PATH": "/bin", "HPCCKPT_KEY_FILE": "/k"}
    q = cmdquick.parse(["-s"], env)
    assert q is not None and (q.cmd, q.host, q.port, q.as_json) == ("status", "127.0.0.1", 7779, False)
    q = cmdquick.parse(["--json", "l", "-h", "node1", "-p", "4000"], env)
    assert q is not None and (q.cmd, q.host, q.port, q.as_json) == ("list", "node1", 4000, True)
    q = cmdquick.parse(["-c", "-p4001"], {**env, "DMTCP_HOST": "a", "DMTCP_COORD_HOST": "b"})
    assert q is not None and (q.cmd, q.host, q.port) == ("checkpoint", "b", 4001)
    q = cmdquick.parse(["-q"], {**env, "DMTCP_PORT": "4002"})
    assert q is not None and (q.cmd, q.port) == ("quit", 4002)
    for argv, extra in ((["-s"], {"HPCCKPT_CONFIG": "/c.yaml"}),          # a config file: only settings knows
                        (["-s"], {"HPCCKPT_PEER_TIMEOUT": "abc"}),        # a bad value the full path reports
                        (["-s"], {"DMTCP_QUIET": "1"}),
                        (["-s", "--config", "c.yaml"], {}), (["-s", "--port-file", "f"], {}),
                        (["-bc"], {}), (["-kc"], {}), (["-i", "5"], {}), (["-i5"], {}),    # blocking, interval
                        (["-s", "-l"], {}), ([], {}), (["-h"], {}), (["--help"], {}), (["--version"], {}),
                        (["-s", "-p", "0"], {}), (["-s", "-p", "70000"], {}), (["-s", "-p", "x"], {}),
                        (["-s", "-h", "-p"], {}), (["-s", "-h", "a b"], {}), (["-s", "-h", ""], {}),
                        (["-s"], {"DMTCP_PORT": "x"}), (["-s", "--timeout", "3"], {}), (["bogus"], {})):
        assert cmdquick.parse(argv, {**env, **extra}) is None, (argv, extra)


def test_quick_path_reads_only_harmless_variables():
    """The variables the quick path accepts are ones settings reads for the address alone, or none at all."""
    from hpcckpt import settings
    read_by_settings = {v for f in settings._FIELDS.values() for v in f.metadata.get("env", ())}
    assert cmdquick._KNOWN_ENV & read_by_settings == {"DMTCP_COORD_HOST", "DMTCP_HOST", "DMTCP_COORD_PORT",
                                                      "DMTCP_PORT"}
    assert not cmdquick._KNOWN_ENV & set(settings.ENV_SECONDS)
    assert (cmdquick.DEFAULT_HOST, cmdquick.DEFAULT_PORT) == (settings.Settings().coord_host, settings.DEFAULT_PORT)


def test_quick_and_full_paths_answer_alike(coordinator, env, tmp_path):
    port = str(coordinator)
    full = {**env, "DMTCP_QUIET": "0"}        # a variable the quick path leaves to the full one
    for args in (["-s"], ["--json", "-s"], ["l"], ["--list", "--json"], ["-c"], ["--json", "-c"],
                 ["-s", "-h", "127.0.0.1"]):
        a = run(["dmtcp_command", "-p", port, *args], env, tmp_path)
        b = run(["dmtcp_command", "-p", port, *args], full, tmp_path)
        assert (a.returncode, _norm(a.stdout), a.stderr) == (b.returncode, _norm(b.stdout), b.stderr), args
        assert a.returncode == (2 if "-c" in args else 0)    # -c: no processes to checkpoint
    # nobody listening: the same line and exit status
    for args in (["-s"], ["--json", "-s"]):
        a = run(["dmtcp_command", "-p", "1", *args], env, tmp_path)
        b = run(["dmtcp_command", "-p", "1", *args], full, tmp_path)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr) and a.returncode == 2
    r = run(["dmtcp_command", "-p", port, "-q"], env, tmp_path)
    assert r.returncode == 0
    wait_for(lambda: not client.port_is_open("127.0.0.1", coordinator), 10, "coordinator gone after -q")


def test_quick_path_imports_neither_libzmq_nor_settings(coordinator, env, tmp_path):
    code = ("import sys; from hpcckpt.cli.main import dmtcp_command; sys.argv = ['dmtcp_command', '-s', '-p', "
            f"'{coordinator}']; rc = dmtcp_command(); "
            "print('LOADED', sorted(m for m in ('zmq', 'argparse', 'hpcckpt.settings', 'logging', 'numpy') "
            "if m in sys.modules), rc)")
    r = run([sys.executable, "-c", code], env, tmp_path)
    assert "NUM_PEERS=0" in r.stdout and r.stdout.strip().endswith("LOADED [] 0"), r.stdout + r.stderr


def test_a_wrong_secret_is_refused_in_one_line(coordinator, env, tmp_path):
    secret = tmp_path / "wrong.secret"
    secret.write_text("00" * 32 + "\n")
    secret.chmod(0o600)
    r = run(["dmtcp_command", "-p", str(coordinator), "-s"], {**env, "HPCCKPT_SECRET_FILE": str(secret)}, tmp_path)
    assert r.returncode == 2 and "refused us: bad or missing secret" in r.stderr and not r.stdout


class FakeRouter:
    """A libzmq ROUTER standing in for the coordinator: records what it gets, answers as told."""

    def __init__(self, key: bytes, answer):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.key, self.answer = key, answer
        self.got: list[tuple[bytes, list[bytes]]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        if self.sock.poll(10000):
            ident, *frames = self.sock.recv_multipart()
            self.got.append((ident, frames))
            for reply in self.answer(protocol.decode(self.key, frames, protocol.Freshness())):
                self.sock.send_multipart([ident, *reply])

    def close(self):
        self.thread.join(15)
        self.sock.close()
        self.ctx.term()


def test_requests_are_authenticated_and_only_the_authentic_reply_is_taken(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv("HPCCKPT_SECRET", key.hex())

    def answer(req):
        forged = protocol.encode(os.urandom(32), {"type": "answer", "re": req["nonce"], "who": "forger"})
        other = protocol.encode(key, {"type": "answer", "re": protocol.new_nonce(), "who": "other request"})
        mine = protocol.encode(key, {"type": "answer", "re": req["nonce"], "who": "coordinator"})
        return [forged, [b"garbage"], other, mine]
    fake = FakeRouter(key, answer)
    try:
        reply = client.command("127.0.0.1", fake.port, "status", timeout=10)
    finally:
        fake.close()
    assert reply["who"] == "coordinator"
    ident, frames = fake.got[0]
    assert ident.startswith(b"c") and len(ident) == 13              # its own routing id, as libzmq's client had
    body = json.loads(frames[2])
    assert frames[0] == protocol.PROTO_TAG and body["cmd"] == "status" and len(body["nonce"]) == 24
    fresh = protocol.Freshness()
    protocol.decode(key, frames, fresh)                              # authentic and fresh ...
    with pytest.raises(protocol.Refused, match="replayed"):
        protocol.decode(key, frames, fresh)                          # ... and refused when replayed


def test_a_coordinator_that_closes_without_answering_is_reported(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv("HPCCKPT_SECRET", key.hex())
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def close_after_greeting():
        c, _ = srv.accept()
        c.recv(64)
        c.close()
    t = threading.Thread(target=close_after_greeting, daemon=True)
    t.start()
    with pytest.raises(client.CoordinatorUnreachable, match="does not answer as a coordinator"):
        client.command("127.0.0.1", srv.getsockname()[1], "status", timeout=5)
    t.join(5)
    srv.close()


def test_a_coordinator_that_accepts_but_never_greets_times_out_within_the_command_s_timeout(tmp_path, monkeypatch):
    """A stopped coordinator's connections are still accepted by the kernel: the command's timeout bounds the
    greeting too, and the error says it got no answer (the batch driver's timeout message depends on it)."""
    import socket
    import time

    from hpcckpt.coordinator import wire
    from hpcckpt.coordinator.client import CoordinatorUnreachable, command
    monkeypatch.setenv("HPCCKPT_RUNDIR", str(tmp_path / "run"))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                      # never accepts, never greets
    port = silent.getsockname()[1]
    wire.create_secret(port)
    try:
        t0 = time.monotonic()
        with pytest.raises(CoordinatorUnreachable, match="no answer from coordinator"):
            command("127.0.0.1", port, "status", timeout=1.0)
        assert time.monotonic() - t0 < 3
    finally:
        silent.close()
        wire.remove_secret(port)
