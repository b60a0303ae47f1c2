"""The protocol table: every message kind has its handler on the side that receives it, docs/protocol.md's table
says the same (kinds and fields), and a full round goes through the coordinator's dispatch (simulated agents,
real framing; no processes)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from coordsim import Sim

from hpcckpt.agent.agent import Agent
from hpcckpt.agent.procs import JobProcess
from hpcckpt.coordinator import protocol
from hpcckpt.coordinator.protocol import Phase
from hpcckpt.image import store
from hpcckpt.settings import Settings

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"


def doc_table() -> list[tuple[str, str, list[str]]]:
    """(direction, type, field names) of each row of the "Peer messages" table."""
    text = DOC.read_text().split("## Peer messages", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[1].startswith("`"):
            continue
        kind = cells[1].strip("`")
        names = re.sub(r"\{[^}]*\}|\([^)]*\)", "", cells[2])           # sub-fields, remarks
        fields = [f.strip(" `[]") for f in re.split(r",|\bor\b", names)]
        rows.append((cells[0], kind, [f for f in fields if f]))
    return rows


class FakeConn:
    host, port, sock = "127.0.0.1", 0, None


def agent(tmp_path) -> Agent:
    return Agent(Settings(ckptdir=str(tmp_path)), FakeConn(), [JobProcess(1, "u1", "prog")])  # type: ignore[arg-type]


def test_every_message_to_the_coordinator_has_a_handler_and_a_record(tmp_path):
    assert set(Sim(str(tmp_path)).c.protocol_table()) == set(protocol.TO_COORDINATOR)


def test_every_message_to_an_agent_has_a_handler_and_a_record(tmp_path):
    assert set(agent(tmp_path).protocol_table()) == set(protocol.TO_AGENT)


def test_the_agent_runs_every_phase():
    from hpcckpt.agent.phases import Phases
    assert set(Phases.phase_table(Phases())) == set(Phase)      # (bound methods: nothing is called)


def test_docs_protocol_table_is_the_code():
    rows = doc_table()
    to_coord = {k: f for d, k, f in rows if d.endswith("coord")}
    to_agent = {k: f for d, k, f in rows if d.endswith("agent")}
    assert set(to_coord) == set(protocol.TO_COORDINATOR), "docs/protocol.md: messages to the coordinator"
    assert set(to_agent) == set(protocol.TO_AGENT), "docs/protocol.md: messages to an agent"
    for table, records in ((to_coord, protocol.TO_COORDINATOR), (to_agent, protocol.TO_AGENT)):
        for kind, fields in table.items():
            assert fields == records[kind].field_names(), f"docs/protocol.md: fields of {kind}"


def test_unknown_kinds_are_refused_without_a_handler(tmp_path, caplog):
    sim = Sim(str(tmp_path))
    sim.deliver(b"x", {"type": "_on_frames"})        # (getattr-based dispatch would have called a method)
    sim.deliver(b"x", {"type": "peers"})
    assert "unknown message type" in caplog.text and not sim.take()


def test_a_round_through_the_dispatch_commits_every_agents_image(tmp_path):
    sim = Sim(str(tmp_path))
    sim.join(3)
    welcomes = sim.take()
    assert [m["type"] for _, m, _ in welcomes] == ["welcome"] * 3
    assert all(m["ckptdir"] == str(tmp_path) for _, m, _ in welcomes)     # the coordinator's directory
    sim.run_round()
    c = sim.c
    assert c.round is None and c.last_checkpoint and c.last_checkpoint["images"] == 3
    m = store.read_manifest(str(tmp_path), c.computation, 1)
    # each entry names its agent: a restart's gate reads the hosts to wait for from the manifest
    assert {i.agent_id: i.host for i in m.images} == {f"a{k:06d}": "node0" for k in range(3)}
    assert all(p.state == "RUNNING" for p in c.peers.values())


def test_retired_images_go_to_the_agent_that_wrote_them(tmp_path):
    sim = Sim(str(tmp_path), keep_generations=1)
    sim.join(3)
    sim.run_round()
    sim.run_round()                 # generation 1 is retired: each agent deletes its own image of it
    committed = [(to, m) for to, m, _ in sim.log if m["type"] == "committed" and m["generation"] == 2]
    assert len(committed) == 3
    for to, m in committed:
        k = sim.agents.index(to)
        assert [os.path.basename(e["path"]) for e in m["prune"]] == [f"sim-u{k}.dmtcp"]
        assert m["prune"][0]["generation"] == 1
        assert m["prune"][0]["host"] == "node0"


def test_a_failed_ack_aborts_the_round_everywhere(tmp_path):
    sim = Sim(str(tmp_path))
    sim.join(2)
    sim.take()
    assert sim.c.start_checkpoint() is None
    phases = sim.take()
    sim.ack(phases[0][0], phases[0][1], ok=False, error="node0: no space")
    sim.ack(phases[1][0], phases[1][1])
    aborts = [m for _, m, _ in sim.take() if m["type"] == "phase"]
    assert [m["phase"] for m in aborts] == ["abort", "abort"] and aborts[0]["reason"] == "node0: no space"
    assert sim.c.round is None and sim.c.last_failure["phase"] == "suspend"


@pytest.mark.parametrize("kind", sorted(protocol.TO_COORDINATOR.keys() | protocol.TO_AGENT.keys()))
def test_records_round_trip_through_the_wire_format(kind):
    cls = protocol.TO_COORDINATOR.get(kind) or protocol.TO_AGENT[kind]
    d = cls().to_dict()
    assert d["type"] == kind and cls.from_dict(d) == cls()


def test_peer_messages_reach_their_handlers(tmp_path):
    sim = Sim(str(tmp_path))
    sim.deliver(b"ghost", protocol.AgentHeartbeat().to_dict())          # an agent we do not know: say hello
    (to, reply, _), = sim.take()
    assert to == b"ghost" and reply["type"] == "reject" and reply["rejoin"] is True
    sim.join(2)
    sim.take()
    a, b = sim.agents
    sim.deliver(a, protocol.KvGet("k", wait=True).to_dict())             # waits until someone puts it
    assert not sim.take()
    sim.deliver(b, protocol.KvPut("k", [1, 2]).to_dict())
    (to, kv, _), = sim.take()
    assert to == a and protocol.Kv.from_dict(kv) == protocol.Kv("k", [1, 2], True)
    sim.deliver(a, protocol.Request("checkpoint").to_dict())             # --ckpt-signal: a round starts
    assert {m["phase"] for _, m, _ in sim.take() if m["type"] == "phase"} == {"suspend"}
    sim.deliver(b, protocol.Bye("exited with status 0").to_dict())       # leaves during the round: it fails
    assert sim.c.round is None and "left" in sim.c.last_failure["error"] and list(sim.c.peers) == [a]


def test_the_agent_dispatches_by_its_table(tmp_path, monkeypatch):
    ag = agent(tmp_path)
    ag.computation = "comp"
    ag.host = "node0"
    removed = []
    monkeypatch.setattr(store, "remove_generation_images", lambda d, c, g, paths: removed.append((g, paths)))
    ag._on_message(protocol.Committed(3, [{"generation": 1, "host": "node0", "path": "/x/a"},
                                          {"generation": 1, "host": "node1", "path": "/x/b"}]).to_dict())
    assert ag.last_generation == 3 and removed == [(1, ["/x/a"])]
    ag._on_message(protocol.Reject("unknown peer", rejoin=True).to_dict())
    assert not ag.link.joined                                             # lost: it says hello again
    ag._on_message({"type": "from-a-newer-coordinator"})                  # ignored


def test_a_round_whose_peers_all_leave_after_the_commit_still_ends(tmp_path):
    """The program ends right after its images are committed: the phases left go to no one and complete at once
    (a phase sent to no peer gets no ack to complete it); a `-bc` waiting on the round is answered."""
    sim = Sim(str(tmp_path))
    sim.join(1)
    sim.take()
    assert sim.c.start_checkpoint() is None
    while sim.c.round is not None and not sim.c.round.committed:
        for to, msg, _ in sim.take():
            if msg["type"] == "phase":
                sim.ack(to, msg)
    assert sim.c.round is not None, "the round should still have phases to go after its commit"
    sim.deliver(sim.agents[0], protocol.Bye().to_dict())
    assert sim.c.round is None
    assert sim.c.last_checkpoint and sim.c.last_checkpoint["generation"] == 1
