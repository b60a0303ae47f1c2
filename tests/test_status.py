"""`hpcckpt status`: a checkpoint directory at a glance - complete, failed, unfinished and incremental
generations, which one a restart would use, batch runs from the event journal; the table, --json and --plot."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import line_count, run, wait_for
from hpcckpt.image import journal, store


def _fake_generation(ckptdir: Path, comp: str, gen: int, needs=(), size=1000) -> None:
    gdir = Path(store.generation_dir(str(ckptdir), comp, gen))
    gdir.mkdir(parents=True)
    img = gdir / f"ckpt_prog_{gen}.dmtcp"
    img.write_bytes(b"x" * size)
    m = store.Manifest(comp, gen, time.time() - 100 + gen,
                       [store.ImageEntry("nodeA", str(img), "prog", "u1", 42, size, list(needs) or [gen])],
                       {"bytes_in": 4 * size, "bytes_out": size, "ratio": 0.25, "duration_s": 0.5, "frozen_s": 0.03})
    store.write_manifest(str(ckptdir), m)


def test_status_shows_every_kind_of_generation_and_the_batch_job(env, tmp_path):
    comp = "vm-1-abc"
    _fake_generation(tmp_path, comp, 1)
    _fake_generation(tmp_path, comp, 2, needs=(1, 2))
    (Path(store.generation_dir(str(tmp_path), comp, 4)) / "x.dmtcp.tmp").parent.mkdir(parents=True)
    journal.record(str(tmp_path), "run", scheduler="slurm", job="77", run=1, deadline=time.time() + 300)
    journal.record(str(tmp_path), "checkpoint", computation=comp, generation=3, ok=False, phase="checkpoint",
                   error="nodeA: disk full")
    journal.record(str(tmp_path), "requeue", job="77")
    (tmp_path / journal.NAME).open("a").write("not json\n")           # a damaged line is skipped

    r = run(["hpcckpt", "status", "--json", str(tmp_path)], env, tmp_path, check=True)
    st = json.loads(r.stdout)
    gens = {g["generation"]: g for g in st["computations"][0]["generations"]}
    assert [gens[g]["state"] for g in sorted(gens)] == ["complete", "complete", "failed", "unfinished"]
    assert gens[2]["incremental"] and gens[2]["needs"] == [1] and gens[2].get("restart_uses")
    assert not gens[1].get("restart_uses") and not gens[1]["incremental"]
    assert gens[3]["error"] == "nodeA: disk full" and gens[3]["phase"] == "checkpoint"
    assert gens[1]["stored_bytes"] == 1000 and gens[1]["memory_bytes"] == 4000
    assert st["batch"]["job"] == "77" and st["batch"]["requeues"] == 1 and st["batch"]["deadline"] > time.time()

    r = run(["hpcckpt", "status", str(tmp_path)], env, tmp_path, check=True)
    lines = r.stdout.splitlines()
    assert "slurm job 77" in lines[1] and "1 requeue(s)" in lines[1] and "next deadline" in lines[1]
    row = {int(ln.split()[0]): ln for ln in lines if ln.strip()[:1].isdigit()}
    assert "<- restart uses this" in row[2] and "incremental, needs 1" in row[2]
    assert "failed: checkpoint: nodeA: disk full" in row[3]
    assert "unfinished" in row[4] and "complete" in row[1]


def test_status_bad_directory_is_one_line(env, tmp_path):
    r = run(["hpcckpt", "status", str(tmp_path / "nope")], env, tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a directory" in r.stderr


@pytest.mark.slow
def test_status_of_a_real_computation_with_a_failed_checkpoint(launch, counter, env, tmp_path):
    """A real job: a full and an incremental checkpoint, then one that fails (its generation directory is taken
    by a file), all shown; the journal was written by the coordinator; --plot draws a PNG."""
    out = tmp_path / "out.txt"
    job = launch(counter, out, 8, 100000, 20, extra=("--incremental",))
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    for _ in range(2):
        assert job.command("-bc").returncode == 0
    comp = next(tmp_path.glob("ckpt_*")).name[len("ckpt_"):]
    Path(store.generation_dir(str(tmp_path), comp, 3)).write_text("in the way")
    r = job.command("-bc")
    assert r.returncode != 0
    st = json.loads(run(["hpcckpt", "status", "--json", str(tmp_path)], env, tmp_path, check=True).stdout)
    gens = {g["generation"]: g for g in st["computations"][0]["generations"]}
    assert gens[1]["state"] == "complete" and not gens[1]["incremental"]
    assert gens[2]["state"] == "complete" and gens[2]["incremental"] and gens[2].get("restart_uses")
    assert gens[3]["state"] == "failed" and gens[3]["error"]
    assert gens[1]["processes"] == 1 and gens[1]["memory_bytes"] > 8e6 and gens[1]["frozen_s"] > 0
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    run(["hpcckpt", "status", "--plot", str(png), str(tmp_path)], env, tmp_path, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
