"""Issue 20: what the coordinator sends each agent in a checkpoint round does not grow with the number of agents.
The checkpoint phase used to carry a map of every agent to every agent - O(N) bytes to N agents, O(N^2) a round
(at 1000 agents ~28 KB to each). Now each image entry names its agent and a restart reads them from the
manifest; retention (`committed.prune`) goes to each host with its own images only. Simulated agents, real
framing and dispatch, no processes."""
from __future__ import annotations

import time

from coordsim import Sim


def bytes_per_agent(tmp_path, n: int, rounds: int = 2) -> tuple[float, float]:
    """(the most any agent received in one round, seconds per round); keep_generations=1 so that the later
    rounds also retire (prune) a generation's images."""
    sim = Sim(str(tmp_path / f"n{n}"), keep_generations=1)
    (tmp_path / f"n{n}").mkdir()
    sim.join(n)
    sim.take()
    most, t0 = 0, time.monotonic()
    for _ in range(rounds):
        sent = sim.run_round()
        assert sim.c.round is None and sim.c.last_checkpoint, sim.c.last_failure
        assert len(sent) == n
        most = max(most, max(sent.values()))
    return most, (time.monotonic() - t0) / rounds


def test_bytes_per_agent_per_round_do_not_grow_with_agents(tmp_path):
    small, _ = bytes_per_agent(tmp_path, 8)
    big, per_round = bytes_per_agent(tmp_path, 1000)
    # the same messages; only numbers (peer ids, counts) may be a few digits longer
    assert big <= small + 64, f"{big} bytes to one agent per round at N=1000 against {small} at N=8"
    assert big < 4000
    print(f"bytes to each agent per round: {small} (N=8), {big} (N=1000); {per_round:.2f} s per round at N=1000")
