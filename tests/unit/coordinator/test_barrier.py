"""The barrier's state machine (coordinator/barrier.py) alone: no coordinator, no sockets, no processes."""
from __future__ import annotations

import pytest

from hpcckpt.coordinator.barrier import REACHED, TABLE, Round, State
from hpcckpt.coordinator.protocol import Phase

A, B, C = b"a", b"b", b"c"


def ack_all(r: Round, *peers: bytes, **msg) -> None:
    for p in peers:
        r.ack(p, {"ok": True, "phase": r.phase, **msg})


def test_a_round_walks_the_table_back_to_running():
    r = Round(1, False, {A, B})
    seen = []
    while True:
        seen.append(r.begin_phase())
        ack_all(r, A, B)
        assert r.complete()
        if r.advance() == State.RUNNING:
            break
    assert seen == [Phase.SUSPEND, Phase.DRAIN, Phase.CHECKPOINT, Phase.REFILL, Phase.RESUME]
    assert set(r.phase_times) == {"suspend", "drain", "checkpoint", "refill", "resume"}


def test_kill_after_checkpoint_replaces_refill():
    r = Round(1, True, {A})
    for _ in range(3):
        r.begin_phase()
        ack_all(r, A)
        r.advance()
    assert r.state == State.CHECKPOINTED
    assert r.begin_phase() == Phase.KILL


def test_a_phase_is_complete_only_when_every_participant_acked():
    r = Round(1, False, {A, B})
    r.begin_phase()
    ack_all(r, A)
    r.ack(C, {"ok": True})                   # not taking part: not counted
    assert not r.complete() and r.acks_text() == "phase=suspend gen=1 acks=1/2"
    ack_all(r, B)
    assert r.complete()
    r.begin_phase()                          # a new phase starts with no acks
    assert not r.acks and not r.complete()


def test_failed_acks_name_their_reason():
    r = Round(1, False, {A, B})
    r.begin_phase()
    r.ack(A, {"ok": False, "error": "nodeA: disk full"})
    r.ack(B, {"ok": False})
    assert r.complete() and sorted(r.failed_acks()) == ["failed", "nodeA: disk full"]


def test_images_are_durable_at_the_ack_unless_they_are_written_later():
    r = Round(1, False, {A, B})
    for _ in range(2):
        r.begin_phase()
        ack_all(r, A, B)
        r.advance()
    assert r.begin_phase() == Phase.CHECKPOINT
    r.ack(A, {"ok": True, "images": [], "pending": False})
    r.ack(B, {"ok": True, "images": [], "pending": True})       # forked: `written` comes later
    assert set(r.results) == {A, B} and set(r.durable) == {A}
    assert not r.all_durable()
    r.durable[B] = {"images": []}
    assert r.all_durable()


@pytest.mark.parametrize("phase", list(REACHED))
def test_each_phase_of_the_table_names_the_state_it_reaches(phase):
    assert (phase, REACHED[phase]) in TABLE.values()
    assert phase.value == str(phase) == f"{phase}"      # the wire's and the logs' word
