"""SysV semaphore sets and message queues across checkpoint/restart, with a real program (programs/sysvipc.c):
a thread blocked in semop and one in msgrcv, a backlog of queued messages, a private set known only by its
id. Values, queued messages (in order, with their types), ids, keys and modes come back; two rounds in the
job's own namespaces, one without them (the killed original's leftovers are replaced, ids kept)."""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from conftest import checkpoint_and_kill, compile_c, line_count, restart_in_background, run, wait_for

pytestmark = pytest.mark.slow


def _rows(kind: str, keys) -> list[str]:
    rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
    return [r for r in rows if int(r.split()[0]) & 0xFFFFFFFF in keys]


@pytest.fixture
def ipc_key():
    """A key no other test uses; the killed job's leftovers with it (and key+1) are removed afterwards."""
    key = random.randrange(0x10000000, 0x7FFFFF00) & ~1
    yield key
    for row in _rows("sem", {key}):
        subprocess.run(["ipcrm", "-s", row.split()[1]], capture_output=True)
    for row in _rows("msg", {key + 1}):
        subprocess.run(["ipcrm", "-q", row.split()[1]], capture_output=True)


def _plain(prog: Path, tmp_path: Path, key: int, rounds: int) -> str:
    out = tmp_path / "plain.txt"
    subprocess.run([str(prog), str(out), hex(key), str(rounds), "0"], check=True, timeout=60)
    return out.read_text()


def test_semaphores_and_queues_survive_two_restarts(launch, env, tmp_path, build_dir, ipc_key):
    prog = compile_c(build_dir, "sysvipc", "-pthread")
    rounds = 120
    plain = _plain(prog, tmp_path, ipc_key + 2, rounds)
    out = tmp_path / "out.txt"
    job = launch(prog, out, hex(ipc_key), rounds, 20)
    wait_for(lambda: line_count(out) >= 20, 30, "progress")
    checkpoint_and_kill(job)
    script = tmp_path / "dmtcp_restart_script.sh"
    job2 = restart_in_background(script, env, tmp_path)
    n = line_count(out)
    wait_for(lambda: line_count(out) >= n + 20, 60, "progress after the first restart")
    checkpoint_and_kill(job2)
    r = run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == plain


def test_semaphores_and_queues_without_namespaces_keep_their_ids(launch, env, tmp_path, build_dir, ipc_key):
    """In the current IPC namespace the killed original's leftovers (same keys, their users gone) are
    replaced and sem_next_id/msg_next_id give the original ids back (the program checks semget/msgget by key
    against the ids it kept); at the end the program removes them itself."""
    prog = compile_c(build_dir, "sysvipc", "-pthread")
    rounds = 80
    plain = _plain(prog, tmp_path, ipc_key + 2, rounds)
    out = tmp_path / "out.txt"
    extra = ("--no-pid-namespace",)
    job = launch(prog, out, hex(ipc_key), rounds, 20, extra=extra)
    wait_for(lambda: line_count(out) >= 20, 30, "progress")
    checkpoint_and_kill(job)
    assert len(_rows("sem", {ipc_key})) == 1 and len(_rows("msg", {ipc_key + 1})) == 1   # the leftovers
    r = run(["bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0", *extra], env, tmp_path,
            timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == plain
    assert _rows("sem", {ipc_key}) == [] and _rows("msg", {ipc_key + 1}) == []
