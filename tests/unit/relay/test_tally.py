"""A relay's aggregation of its agents' acks and `written` (hpcckpt/relay/tally.py), without processes."""
from __future__ import annotations

from hpcckpt.relay.tally import Agent, Tally, merge_stats


def tally(n: int = 3, generation: int = 5) -> Tally:
    members = {f"i{k}".encode(): Agent(f"i{k}".encode(), f"a{k}", "node7", 100 + k, []) for k in range(n)}
    return Tally(generation, members)


def ack(phase: str, ok: bool = True, **kw) -> dict:
    return {"type": "ack", "phase": phase, "generation": 5, "ok": ok, "error": None if ok else "boom", **kw}


def test_one_ack_up_once_every_agent_acked_with_tcp_ends_named_by_agent():
    t = tally()
    t.begin("suspend")
    assert t.ack(b"i0", ack("suspend", tcp_ends=[["1.2.3.4", 5, "6.7.8.9", 10]])) is None
    assert t.ack(b"i1", ack("suspend", tcp_ends=[])) is None
    assert t.ack(b"i1", ack("suspend")) is None                        # (again: still one of three)
    up = t.ack(b"i2", ack("suspend", tcp_ends=[["a", 1, "b", 2]]))
    assert up is not None and up["ok"] and up["phase"] == "suspend" and up["generation"] == 5
    assert up["tcp_ends"] == [["a0", "1.2.3.4", 5, "6.7.8.9", 10], ["a2", "a", 1, "b", 2]]
    assert t.ack(b"i0", ack("suspend")) is None                        # (the phase went up)


def test_the_first_failure_goes_up_at_once_naming_agent_and_host():
    t = tally()
    t.begin("drain")
    t.ack(b"i0", ack("drain"))
    up = t.ack(b"i1", ack("drain", ok=False))
    assert up is not None and not up["ok"] and up["error"] == "agent a1 (pid 101) on node7: boom"


def test_stale_or_foreign_acks_are_ignored():
    t = tally(1)
    t.begin("drain")
    assert t.ack(b"i0", ack("suspend")) is None
    assert t.ack(b"i0", {**ack("drain"), "generation": 4}) is None
    assert t.ack(b"stranger", ack("drain")) is None
    assert t.ack(b"i0", ack("drain")) is not None


def test_images_name_their_agent_and_stats_merge():
    t = tally(2)
    t.begin("checkpoint")
    img = {"path": "/x", "host": "node7"}
    t.ack(b"i0", ack("checkpoint", images=[img], stats={"bytes_in": 10, "write_s": 1.0, "drained": True}))
    up = t.ack(b"i1", ack("checkpoint", images=[img], stats={"bytes_in": 5, "write_s": 3.0, "drained": True}))
    assert up is not None and up["pending"] is False
    assert [i["agent_id"] for i in up["images"]] == ["a0", "a1"]
    assert up["stats"] == {"bytes_in": 15, "write_s": 3.0, "drained": True}


def test_forked_written_once_every_pending_agent_is_durable():
    t = tally(3)
    t.begin("checkpoint")
    t.ack(b"i0", ack("checkpoint", images=[{"path": "/0"}], stats={"bytes_out": 1}))
    t.ack(b"i1", ack("checkpoint", pending=True))
    up = t.ack(b"i2", ack("checkpoint", pending=True))
    assert up is not None and up["pending"] is True and "images" not in up
    w = {"type": "written", "generation": 5, "ok": True, "stats": {"bytes_out": 2}}
    assert t.written(b"i1", {**w, "images": [{"path": "/1"}]}) is None
    done = t.written(b"i2", {**w, "images": [{"path": "/2"}]})
    assert done is not None and done["ok"] and done["stats"]["bytes_out"] == 5
    assert sorted(i["path"] for i in done["images"]) == ["/0", "/1", "/2"]
    assert t.written(b"i2", {**w, "images": []}) is None              # (sent once)


def test_a_failed_write_goes_up_at_once():
    t = tally(2)
    t.begin("checkpoint")
    t.ack(b"i0", ack("checkpoint", pending=True))
    t.ack(b"i1", ack("checkpoint", pending=True))
    up = t.written(b"i1", {"type": "written", "generation": 5, "ok": False, "error": "ENOSPC"})
    assert up is not None and not up["ok"] and up["error"] == "agent a1 (pid 101) on node7: ENOSPC"


def test_an_agent_dropped_completes_the_phase_and_its_write():
    t = tally(2)
    t.begin("resume")
    t.ack(b"i0", ack("resume", stats={"frozen_s": 0.2}))
    up = t.drop(b"i1")
    assert up is not None and up["ok"] and up["stats"]["frozen_s"] == 0.2
    t = tally(2)
    t.begin("checkpoint")
    t.ack(b"i0", ack("checkpoint", pending=True))
    t.ack(b"i1", ack("checkpoint", pending=True))
    t.written(b"i0", {"type": "written", "generation": 5, "ok": True, "images": [{"path": "/0"}]})
    t.drop(b"i1")
    w = t.written_due()
    assert w is not None and [i["path"] for i in w["images"]] == ["/0"]


def test_slow_names_who_the_round_waits_for():
    t = tally(2)
    t.begin("drain")
    t.ack(b"i0", ack("drain"))
    assert [a.agent_id for a in t.slow()] == ["a1"]


def test_merge_stats_flags_and_words():
    assert merge_stats([{"drained": True, "drain": "off"}, {"drained": False, "drain": "off"}]) == \
        {"drained": False, "drain": "off"}
    assert merge_stats([{"drained": True}, {}])["drained"] is False
    assert merge_stats([{"drain": "async"}, {"drain": "off"}])["drain"] is None


def test_each_agent_gets_only_the_other_ends_of_its_own_connections():
    from hpcckpt.relay.tally import ends_needed, index_ends
    rows = [["a0", "10.0.0.1", 5000, "10.0.0.2", 6000, 1],      # a0 <-> a1
            ["a1", "10.0.0.2", 6000, "10.0.0.1", 5000, 1],
            ["a2", "10.0.0.3", 7000, "10.0.0.4", 8000, 1],      # a2 <-> a3 (another node)
            ["a3", "10.0.0.4", 8000, "10.0.0.3", 7000, 1]]
    index = index_ends(rows)
    assert ends_needed(index, [["10.0.0.1", 5000, "10.0.0.2", 6000, 1]], "a0") == [rows[1]]
    assert ends_needed(index, [["10.0.0.3", 7000, "10.0.0.4", 8000, 1]], "a2") == [rows[3]]
    assert ends_needed(index, [["10.0.0.9", 1, "10.0.0.8", 2, 1]], "a5") == []     # (its peer is outside)
    # a connection within one agent: both ends its own, nothing to match from others
    assert ends_needed(index_ends([["a0", "h", 1, "h", 2, 1], ["a0", "h", 2, "h", 1, 1]]), [["h", 1, "h", 2, 1]],
                       "a0") == []


def test_the_suspend_acks_ends_are_kept_per_agent():
    t = tally(2)
    t.begin("suspend")
    t.ack(b"i0", ack("suspend", tcp_ends=[["x", 1, "y", 2, 1]]))
    t.ack(b"i1", ack("suspend", tcp_ends=[]))
    assert t.ends == {b"i0": [["x", 1, "y", 2, 1]], b"i1": []}
