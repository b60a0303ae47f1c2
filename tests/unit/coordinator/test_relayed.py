"""The coordinator's side of relays (coordinator/relayed.py) through its real dispatch, no processes: a relay is
one peer for its agents; each agent keeps its peer number and its line in the listing; the round counts the relay;
prune goes to it by agent id; an agent back directly keeps its number; the plain path is untouched."""
from __future__ import annotations

import os

from coordsim import Sim

from hpcckpt.coordinator import protocol
from hpcckpt.image import store

RELAY = b"relay-1"


def members(n: int, first: int = 0) -> list[dict]:
    return [{"agent_id": f"r{k}", "agent_pid": 1, "processes": [{"pid": 10 + k, "unique_id": f"ru{k}",
                                                                 "program": "sim"}]} for k in range(first, n)]


def relay_hello(sim: Sim, n: int) -> dict:
    sim.deliver(RELAY, protocol.Hello("node9", 77, [], role="relay", members=members(n)).to_dict())
    (to, welcome, _), = sim.take()
    assert to == RELAY and welcome["type"] == "welcome"
    return welcome


def test_a_relay_is_one_peer_for_its_agents_each_listed(tmp_path):
    sim = Sim(str(tmp_path))
    sim.join(1)
    sim.take()
    w = relay_hello(sim, 3)
    assert w["peer_ids"] == {"r0": 3, "r1": 4, "r2": 5} and w["peer_id"] == 2
    assert len(sim.c.peers) == 2
    st = sim.c.status()
    assert st["num_agents"] == 4 and st["num_peers"] == 4
    listing = sim.c.listing()
    assert [r["peer"] for r in listing] == [1, 3, 4, 5] and {r["host"] for r in listing[1:]} == {"node9"}
    # one joins: the relay says hello again; the others keep their numbers
    sim.deliver(RELAY, protocol.Hello("node9", 77, [], role="relay", members=members(4)).to_dict())
    (_, w, _), = sim.take()
    assert w["peer_ids"] == {"r0": 3, "r1": 4, "r2": 5, "r3": 6}
    # one leaves: the relay's bye names it
    sim.deliver(RELAY, protocol.Bye("exited", agent_id="r1").to_dict())
    assert [r["peer"] for r in sim.c.listing()] == [1, 3, 5, 6] and RELAY in sim.c.peers


def test_a_round_counts_the_relay_once_and_commits_its_agents_images(tmp_path):
    sim = Sim(str(tmp_path))
    relay_hello(sim, 2)
    assert sim.c.start_checkpoint() is None
    while True:
        phases = [m for to, m, _ in sim.take() if m["type"] == "phase"]
        if not phases:
            break
        (p,) = phases                      # one message for the node
        extra: dict = {}
        if p["phase"] == "suspend":
            extra["tcp_ends"] = [["r0", "1.1.1.1", 1, "2.2.2.2", 2]]
        if p["phase"] == "checkpoint":
            gdir = store.generation_dir(sim.c.ckptdir, sim.c.computation or "", p["generation"])
            extra.update(pending=False, stats={"bytes_in": 8, "bytes_out": 8}, images=[
                {"host": "node9", "path": os.path.join(gdir, f"sim-ru{k}.dmtcp"), "program": "sim",
                 "unique_id": f"ru{k}", "pid": 10 + k, "size": 4, "needs": [], "rank": None, "agent_id": f"r{k}"}
                for k in range(2)])
        if p["phase"] == "drain":
            assert p["tcp_ends"] == [["r0", "1.1.1.1", 1, "2.2.2.2", 2]]      # (already named: not prefixed again)
        sim.deliver(RELAY, protocol.Ack(p["phase"], p["generation"], True, None, **extra).to_dict())
    m = store.read_manifest(sim.c.ckptdir, sim.c.computation or "", 1)
    assert sorted(i.agent_id for i in m.images) == ["r0", "r1"]
    assert sim.c.round is None and sim.c.last_checkpoint and sim.c.last_checkpoint["images"] == 2


def test_prune_entries_of_a_relays_agents_go_to_the_relay(tmp_path):
    sim = Sim(str(tmp_path))
    relay_hello(sim, 2)
    sim.c._send_committed(3, [{"generation": 1, "host": "node9", "path": "/p0", "agent_id": "r0"},
                              {"generation": 1, "host": "node9", "path": "/p1", "agent_id": "r1"}])
    (to, msg, _), = sim.take()
    assert to == RELAY and [e["path"] for e in msg["prune"]] == ["/p0", "/p1"]


def test_an_agent_back_directly_keeps_its_number_and_the_empty_relay_goes(tmp_path):
    sim = Sim(str(tmp_path))
    relay_hello(sim, 2)
    comp = sim.c.computation
    for k in range(2):
        sim.deliver(f"agent-r{k}".encode(), protocol.Hello("node9", 1, members(k + 1, k)[0]["processes"], comp,
                                                           rejoin=True, agent_id=f"r{k}").to_dict())
    welcomes = [(to, m) for to, m, _ in sim.take() if m["type"] == "welcome"]
    assert [(to, m["peer_id"]) for to, m in welcomes] == [(b"agent-r0", 2), (b"agent-r1", 3)]
    assert RELAY not in sim.c.peers and sorted(r["peer"] for r in sim.c.listing()) == [2, 3]


def test_a_lost_relays_agents_are_kept_as_lost(tmp_path):
    sim = Sim(str(tmp_path))
    relay_hello(sim, 2)
    sim.c._members_lost(sim.c.peers[RELAY])
    assert sorted(sim.c.lost_peers) == ["r0", "r1"] and sim.c.lost_peers["r1"].peer_id == 3


def test_a_relay_during_a_round_waits_and_a_restart_is_refused(tmp_path):
    sim = Sim(str(tmp_path))
    sim.join(1)
    sim.take()
    assert sim.c.start_checkpoint() is None
    sim.take()
    sim.deliver(RELAY, protocol.Hello("node9", 77, [], role="relay", members=members(1)).to_dict())
    assert not sim.take() and sim.c.pending_hellos[-1][0] == RELAY
    sim2 = Sim(str(tmp_path / "2"))
    sim2.deliver(RELAY, protocol.Hello("node9", 77, [], restart=True, role="relay", members=members(1)).to_dict())
    (_, msg, _), = sim2.take()
    assert msg["type"] == "reject" and "directly" in msg["reason"]


def test_the_last_agent_of_a_relay_leaving_is_the_last_peer_leaving(tmp_path):
    sim = Sim(str(tmp_path), exit_on_last=True)
    relay_hello(sim, 2)
    sim.deliver(RELAY, protocol.Bye("exited", agent_id="r0").to_dict())
    assert RELAY in sim.c.peers and not sim.c.quit
    sim.deliver(RELAY, protocol.Bye("exited", agent_id="r1").to_dict())
    assert RELAY not in sim.c.peers and sim.c.quit


def test_an_agent_behind_a_new_relay_moves_with_its_number(tmp_path):
    sim = Sim(str(tmp_path))
    relay_hello(sim, 2)
    sim.deliver(b"relay-2", protocol.Hello("node9", 78, [], role="relay", members=members(2)).to_dict())
    (_, w, _), = sim.take()
    assert w["peer_ids"] == {"r0": 2, "r1": 3}
    assert RELAY not in sim.c.peers and sorted(r["peer"] for r in sim.c.listing()) == [2, 3]
