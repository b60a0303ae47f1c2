"""The coordinator's side of partner copies (coordinator/storagestate.py, docs/storage.md), with simulated agents
on two hosts: it pairs them from the partner listeners they announced (no file in the checkpoint directory), tells
each its partner in its own `committed` (O(1) bytes an agent), and reports the generation complete - restart
script, last_checkpoint, a blocking checkpoint's reply, `-s --json` - only once every partner copy is made."""
from __future__ import annotations

import os
from pathlib import Path

from coordsim import Sim

from hpcckpt.coordinator import protocol
from hpcckpt.image import store

N = 4     # agents, on two hosts


class LocalSim(Sim):
    """Agents whose images are on their node's local level, each with a partner listener."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(str(tmp_path / "shared"), keep_generations=3)
        self.local = tmp_path / "local"

    def ack(self, ident: bytes, phase: dict, ok: bool = True, error: str | None = None) -> None:
        k = self.agents.index(ident)
        if phase["phase"] != "checkpoint":
            return super().ack(ident, phase, ok, error)
        gdir = store.generation_dir(str(self.local / f"node{k % 2}"), self.c.computation or "", phase["generation"])
        stats = {"bytes_in": 4096, "bytes_out": 4096, "drain": "async",
                 "partner_addr": {"addresses": [f"10.0.0.{k % 2 + 1}"], "port": 5000 + k}}
        self.deliver(ident, protocol.Ack("checkpoint", phase["generation"], True, None, pending=False, stats=stats,
                                         images=[{"host": f"node{k % 2}", "path": os.path.join(gdir, f"sim-u{k}.dmtcp"),
                                                  "program": "sim", "unique_id": f"u{k}", "pid": 100 + k,
                                                  "size": 4096, "needs": [], "rank": None,
                                                  "agent_id": f"a{k:06d}"}]).to_dict())

    def join2(self) -> None:
        self.join(N, hosts_of=1)
        for ident in self.agents:                  # (join put agent k on node<k>: two hosts instead)
            peer = self.c.peers[ident]
            peer.host = f"node{self.agents.index(ident) % 2}"
        self.take()

    def blocking_round(self) -> list[tuple[bytes, dict, int]]:
        assert self.c.start_checkpoint(waiter=(b"client", "n1")) is None
        sent: list[tuple[bytes, dict, int]] = []
        while True:
            got = self.take()
            sent += got
            phases = [(to, m) for to, m, _ in got if m["type"] == "phase"]
            if not phases:
                return sent
            for to, m in phases:
                self.ack(to, m)

    def stored(self, k: int, gen: int, ok: bool = True, error: str | None = None, level: str = "partner") -> None:
        self.deliver(self.agents[k], protocol.Stored(gen, level, ok, error).to_dict())


def replies(sent) -> list[dict]:
    return [m for to, m, _ in sent if to == b"client"]


def test_partners_are_paired_by_the_coordinator_and_the_generation_completes_once_copies_are_made(tmp_path):
    sim = LocalSim(tmp_path)
    sim.join2()
    sent = sim.blocking_round()
    committed = {to: m for to, m, _ in sent if m["type"] == "committed"}
    # each agent is told its partner: the next agent (by id) on the other host, with the address it announced
    for k, ident in enumerate(sim.agents):
        p = committed[ident]["partner"]
        assert p["host"] != f"node{k % 2}" and p["agent_id"] == f"a{(k + 1) % N:06d}", p
        assert p["port"] == 5000 + (k + 1) % N and p["addresses"] == [f"10.0.0.{(k + 1) % 2 + 1}"]
    assert max(size for to, m, size in sent if m["type"] == "committed") < 400      # O(1) an agent
    shared = tmp_path / "shared"
    assert not list(shared.glob("**/partners"))          # nothing goes through the checkpoint directory
    # durable on the local level, the program runs: but not complete until the partner copies are made
    assert replies(sent) == []
    assert not (shared / "dmtcp_restart_script.sh").exists()
    st = sim.c.status()
    assert st["last_checkpoint"] is None
    assert st["levels"] == [{"generation": 1, "local": True, "shared": False, "partner": "running",
                             "drain": "running", "complete": False}]
    for k in range(N - 1):
        sim.stored(k, 1)
    assert replies(sim.take()) == []
    sim.stored(N - 1, 1)
    (reply,) = replies(sim.take())
    assert reply["ok"] and reply["checkpoint"]["levels"] == "local+partner", reply
    assert reply["checkpoint"]["frozen_s"] == 0.01          # (the resume's, which came after the commit)
    assert "checkpoint generation 1" in (shared / "dmtcp_restart_script.sh").read_text()
    assert sim.c.status()["levels"][0]["complete"] and sim.c.status()["levels"][0]["partner"] == "done"


def test_a_failed_partner_copy_keeps_the_previous_generation_complete_until_the_shared_copy_arrives(tmp_path):
    sim = LocalSim(tmp_path)
    sim.join2()
    sim.blocking_round()
    for k in range(N):
        sim.stored(k, 1)
    sim.take()
    sent = sim.blocking_round()
    assert replies(sent) == []
    sim.stored(0, 2)
    sim.stored(1, 2, ok=False, error="partner node1 port 5002 unreachable")
    (reply,) = replies(sim.take())
    # said at once, in one line naming the host; the restart script stays at generation 1
    assert not reply["ok"] and "node1" in reply["error"] and "unreachable" in reply["error"], reply
    shared = tmp_path / "shared"
    assert "checkpoint generation 1" in (shared / "dmtcp_restart_script.sh").read_text()
    row = sim.c.status()["levels"][-1]
    assert row["generation"] == 2 and not row["complete"] and row["partner"].startswith("failed: node1")
    assert sim.c.status()["last_checkpoint"]["generation"] == 1
    # the drain brings it to the shared level after all: now it is complete
    m = store.Manifest(sim.c.computation or "", 2, 0.0, [])
    store.write_manifest(str(shared), m)
    sim.stored(0, 2, level="shared")
    assert "checkpoint generation 2" in (shared / "dmtcp_restart_script.sh").read_text()
    assert sim.c.status()["last_checkpoint"]["levels"] == "local+shared"


def test_an_agent_lost_before_its_partner_copy_leaves_the_generation_incomplete(tmp_path):
    sim = LocalSim(tmp_path)
    sim.join2()
    sim.blocking_round()
    sim.stored(0, 1)
    sim.deliver(sim.agents[1], {"type": "bye", "reason": "node lost"})
    sim.c._storage_tick(0.0)
    (reply,) = replies(sim.take())
    assert not reply["ok"] and "node1" in reply["error"] and "left before" in reply["error"], reply
    assert not (tmp_path / "shared" / "dmtcp_restart_script.sh").exists()


def test_with_a_sync_drain_the_generation_is_complete_at_the_commit(tmp_path):
    sim = LocalSim(tmp_path)
    sim.join2()
    ack = sim.ack

    def synced(ident, phase, ok=True, error=None):         # (each image copied to the shared level when written)
        if phase["phase"] == "checkpoint":
            k = sim.agents.index(ident)
            gdir = store.generation_dir(str(sim.local / f"node{k % 2}"), sim.c.computation or "", phase["generation"])
            stats = {"bytes_in": 1, "bytes_out": 1, "drain": "sync", "drained": True,
                     "partner_addr": {"addresses": ["10.0.0.1"], "port": 5000}}
            img = {"host": f"node{k % 2}", "path": os.path.join(gdir, f"s-u{k}.dmtcp"), "program": "s",
                   "unique_id": f"u{k}", "pid": 1, "size": 0, "needs": [], "rank": None, "agent_id": f"a{k:06d}"}
            sim.deliver(ident, protocol.Ack("checkpoint", phase["generation"], True, None, pending=False, stats=stats,
                                            images=[img]).to_dict())
            return None
        return ack(ident, phase, ok, error)
    sim.ack = synced            # type: ignore[method-assign]
    (reply,) = replies(sim.blocking_round())
    assert reply["ok"] and reply["checkpoint"]["levels"] == "local+shared", reply
    assert (tmp_path / "shared" / "dmtcp_restart_script.sh").exists()


def test_a_kcheckpoint_names_the_partners_before_the_kill_and_completes_as_the_agents_leave(tmp_path):
    """dmtcp_command -kc with partner copies: each agent is told its partner (and how many copies it keeps for
    others) before the kill, so it makes them before it exits; the generation is complete once they are reported,
    even though the agents leave one by one (a partner gone after its copy arrived is no lost node)."""
    sim = LocalSim(tmp_path)
    sim.join2()
    assert sim.c.start_checkpoint(kill_after=True, waiter=(b"client", "n1")) is None
    order: list[str] = []
    sent: list[tuple[bytes, dict, int]] = []
    while True:
        got = sim.take()
        sent += got
        order += [m["type"] if m["type"] != "phase" else m["phase"] for _, m, _ in got]
        phases = [(to, m) for to, m, _ in got if m["type"] == "phase"]
        if not phases:
            break
        for to, m in phases:
            sim.ack(to, m)
    assert order.index("committed") < order.index("kill"), order
    partner = {to: m["partner"] for to, m, _ in sent if m["type"] == "committed" and m.get("partner")}
    # (a ring on two hosts: the one that sends to me is on my partner's host)
    assert len(partner) == N and all(p["expect"] == [p["host"]] for p in partner.values()), partner
    assert replies(sent) == [] and not (tmp_path / "shared" / "dmtcp_restart_script.sh").exists()
    for k in range(N):             # each reports its copy made, then leaves; the tick in between gives nothing up
        sim.stored(k, 1)
        sim.deliver(sim.agents[k], {"type": "bye", "reason": "checkpointed and killed"})
        sim.c._storage_tick(0.0)
    (reply,) = replies(sim.take())
    assert reply["ok"] and reply["checkpoint"]["levels"] == "local+partner", reply
    assert "checkpoint generation 1" in (tmp_path / "shared" / "dmtcp_restart_script.sh").read_text()


def test_a_kcheckpoint_agent_that_leaves_without_its_partner_copy_leaves_the_generation_incomplete(tmp_path):
    sim = LocalSim(tmp_path)
    sim.join2()
    assert sim.c.start_checkpoint(kill_after=True, waiter=(b"client", "n1")) is None
    while True:
        phases = [(to, m) for to, m, _ in sim.take() if m["type"] == "phase"]
        if not phases:
            break
        for to, m in phases:
            sim.ack(to, m)
    sim.stored(0, 1)
    sim.deliver(sim.agents[0], {"type": "bye", "reason": "checkpointed and killed"})
    sim.c._storage_tick(0.0)
    assert replies(sim.take()) == []                  # (its partner left after the copy arrived: nothing lost)
    sim.deliver(sim.agents[1], {"type": "bye", "reason": "checkpointed and killed"})     # no report: copy not made
    sim.c._storage_tick(0.0)
    (reply,) = replies(sim.take())
    assert not reply["ok"] and "node1" in reply["error"] and "left before" in reply["error"], reply
    assert not (tmp_path / "shared" / "dmtcp_restart_script.sh").exists()
