"""Many processes of one computation on one host (issue 20): a tree of 48 processes with a pipe from each to
its parent and distinct memory in each checkpoints, is killed, restarts, and every process checks its own
state (memory, pid, parent, the sequence of records in each pipe). bench/many.py runs the same program with
256 processes and times it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import checkpoint_and_kill, compile_c, restart_in_background, wait_for

N = 48


def _lines(out: Path, kind: str) -> set[int]:
    text = out.read_text() if out.exists() else ""
    return {int(m.group(1)) for m in re.finditer(rf"^{kind} (\d+)", text, re.M)}


def _bad(out: Path) -> list[str]:
    return [x for x in out.read_text().splitlines() if x.startswith("BAD")][:5]


@pytest.mark.slow
def test_tree_of_48_processes_with_pipes_restarts(launch, env, tmp_path, build_dir):
    prog = compile_c(build_dir, "many")
    out = tmp_path / "out.txt"
    job = launch(prog, out, N, 64, 50, 4)
    wait_for(lambda: len(_lines(out, "ready")) == N, 60, f"all {N} processes to start")
    wait_for(lambda: len(json.loads(job.command("-l", "--json").stdout)["peers"]) >= N, 30,
             f"all {N} processes to be listed")
    reply = checkpoint_and_kill(job)
    assert reply["command_status"] == "DMT_COORD_SUCCESS", reply
    before = out.read_text()
    assert not _bad(out), _bad(out)

    job2 = restart_in_background(tmp_path / "dmtcp_restart_script.sh", env, tmp_path)
    start = len(before)

    def ticked_since_restart() -> bool:
        return len({int(m.group(1)) for m in re.finditer(r"^tick (\d+)", out.read_text()[start:], re.M)}) == N
    wait_for(ticked_since_restart, 60, f"every one of the {N} restored processes to run again")
    (tmp_path / "out.txt.stop").touch()
    assert job2.wait(60) == 0
    text = out.read_text()
    assert not _bad(out), _bad(out)
    exits = {int(m.group(1)) for m in re.finditer(r"^exit (\d+) ok", text[start:], re.M)}
    assert exits == set(range(N)), f"processes that did not exit cleanly: {sorted(set(range(N)) - exits)}"
    assert text.rstrip().endswith(f"done {N}")
