"""One source of truth for run values (issue 18, move 5): tunables that were read from the environment outside
Settings are Settings fields, the commands' flags come from the Settings fields, and the coordinator owns the
checkpoint directory. In-process, no processes."""
from __future__ import annotations

import time

import pytest
from coordsim import Sim

from hpcckpt.agent.agent import Agent
from hpcckpt.agent.join import checkpoint_agents
from hpcckpt.agent.procs import JobProcess
from hpcckpt.cli import coordinator as coordinator_cli
from hpcckpt.cli import launch as launch_cli
from hpcckpt.cli.common import settings_from
from hpcckpt.coordinator import binding, protocol
from hpcckpt.image import store
from hpcckpt.settings import Settings, SettingsError, load


def test_coordinator_bind_is_a_setting(monkeypatch):
    assert load(environ={"HPCCKPT_COORD_BIND": "127.0.0.2, 127.0.0.3"}).bind == ["127.0.0.2", "127.0.0.3"]
    assert load(yaml_section={"bind": ["127.0.0.4"]}, environ={}).bind == ["127.0.0.4"]
    monkeypatch.setenv("HPCCKPT_COORD_BIND", "127.0.0.2")
    monkeypatch.setattr(binding, "allocation_address", lambda: None)
    # the plan is made from the setting alone (binding.py reads no environment)
    assert [a for a, _, _ in binding.plan("127.0.0.1", load().bind)] == ["127.0.0.1", "127.0.0.2"]
    assert [a for a, _, _ in binding.plan("127.0.0.1", [])] == ["127.0.0.1"]


def test_restart_timeout_is_a_setting_the_gate_uses(tmp_path):
    assert load(environ={"HPCCKPT_RESTART_TIMEOUT": "7"}).restart_timeout == 7.0
    for bad in ("abc", "0", "-3"):
        with pytest.raises(SettingsError, match="restart_timeout|HPCCKPT_RESTART_TIMEOUT"):
            load(environ={"HPCCKPT_RESTART_TIMEOUT": bad})
    sim = Sim(str(tmp_path), restart_timeout=7.0)
    sim.deliver(b"r1", protocol.Hello(host="h1", computation="c1", restart=True, generation=3, agent_id="a1",
                                      agents={"a1": "h1", "a2": "h2"}, agent_ids=["a1"]).to_dict())
    gate = sim.c.gate
    assert gate is not None and set(gate.missing()) == {"a2"}
    assert 6.0 < gate.deadline - time.monotonic() <= 7.0


def test_incremental_unset_means_the_images_decide():
    assert load(environ={}).incremental is None
    assert load(environ={"HPCCKPT_INCREMENTAL": "1"}).incremental is True
    assert load(environ={"HPCCKPT_INCREMENTAL": "0"}).incremental is False


def test_flags_come_from_the_settings_fields(monkeypatch):
    monkeypatch.delenv("HPCCKPT_COORD_BIND", raising=False)
    s = settings_from(coordinator_cli.parser("dmtcp_coordinator").parse_args(
        ["--bind", "127.0.0.9", "--keep", "5", "-i", "30", "--exit-after-ckpt"]))
    assert (s.bind, s.keep_generations, s.interval, s.exit_after_ckpt) == (["127.0.0.9"], 5, 30, True)
    s = settings_from(launch_cli.parser("dmtcp_launch").parse_args(
        ["--incremental", "--no-gzip", "--ckpt-open-files", "--disable-pid-plugin", "prog"]))
    assert (s.incremental, s.compress, s.ckpt_open_files, s.pid_namespace) == (True, False, True, False)


class FakeConn:
    host, port, sock = "127.0.0.1", 0, None

    def __init__(self, replies: list[dict]):
        self.sent: list[dict] = []
        self.replies = replies

    def send(self, msg: dict) -> str:
        self.sent.append(msg)
        return "nonce"

    def recv(self, timeout=None):
        return self.replies.pop(0) if self.replies else None


def test_the_agent_writes_where_the_coordinator_says(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "coordinators"
    conn = FakeConn([protocol.Welcome(1, "comp", ckptdir=str(theirs)).to_dict()])
    a = Agent(Settings(ckptdir=str(mine)), conn, [JobProcess(1, "u1", "prog")])   # type: ignore[arg-type]
    a.hello()
    assert "ckptdir" not in conn.sent[0]            # the coordinator never read it
    assert a.ckptdir == str(theirs)


class Reader:
    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta


def test_a_restart_learns_every_agent_from_the_manifest(tmp_path):
    gdir = store.make_generation_dir(str(tmp_path), "comp", 2)
    entries = [store.ImageEntry(f"host{k}", f"{gdir}/p{k}.dmtcp", "p", f"u{k}", 10 + k, agent_id=f"a{k}")
               for k in range(3)]
    store.write_manifest(str(tmp_path), store.Manifest("comp", 2, time.time(), entries))
    # this host restores agent a0's image; the gate must wait for a1 and a2 as well
    meta = {"computation": "comp", "generation": 2, "agent_id": "a0", "agents": {"a0": "host0"},
            "hostname": "host0"}
    assert checkpoint_agents([Reader(f"{gdir}/p0.dmtcp", meta)]) == {"a0": "host0", "a1": "host1", "a2": "host2"}
    # an image moved away from its manifest names its own agent (older images: every agent of theirs)
    assert checkpoint_agents([Reader(str(tmp_path / "elsewhere" / "x" / "p0.dmtcp"), meta)]) == {"a0": "host0"}
