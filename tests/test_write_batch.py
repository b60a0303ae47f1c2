"""The agent's write path for many images (issue 20, bench/RESULTS-many.md): all images of a generation are
written first and made durable together (fsync each, then rename each, then the directory), and one chunk pool
of the agent serves every image instead of a pool of threads per image. A generation is committed only when
every image is durable: a failure between the writes and the fsyncs fails the round and keeps the previous one.
Real processes: tests/programs/many.c, a tree of N processes with distinct memory each."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import compile_c, wait_for
from test_engine_faults import agent_of

N = 12


def _start(launch, build_dir, tmp_path: Path, env: dict, fault: str = "", extra=()):
    if fault:
        env["HPCCKPT_FAULT"] = fault
    prog = compile_c(build_dir, "many")
    out = tmp_path / "out.txt"
    job = launch(prog, out, N, 256, 50, 4, extra=tuple(extra))
    wait_for(lambda: out.exists() and out.read_text().count("ready") >= N, 60, f"all {N} processes to start")
    wait_for(lambda: len(json.loads(job.command("-l", "--json").stdout)["peers"]) >= N, 30,
             f"all {N} processes to be listed")
    return job


def _gen_dir(tmp_path: Path, gen: int) -> Path | None:
    found = list(tmp_path.glob(f"ckpt_*/gen{gen:06d}"))
    return found[0] if found else None


def _files(d: Path | None, suffix: str) -> list[Path]:
    return [] if d is None else [p for p in d.iterdir() if p.name.endswith(suffix)]


@pytest.mark.parametrize("mode", ["forked", "frozen"])
def test_images_of_a_generation_become_durable_together(mode, launch, build_dir, tmp_path, env):
    """Between the last image written and the first fsync, every image of the agent is complete under its
    .tmp name and none has its final name yet; when the round completes all have it and none is left as .tmp
    (frozen: written while the job is stopped, forked: from snapshots)."""
    job = _start(launch, build_dir, tmp_path, env, "dump.before_fsync:sleep=2",
                 extra=() if mode == "forked" else ("--no-forked-checkpoint",))
    r: dict = {}
    t = threading.Thread(target=lambda: r.update(rc=job.command("-bc", timeout=120).returncode))
    t.start()
    try:
        def all_written_none_final():
            d = _gen_dir(tmp_path, 1)
            return len(_files(d, ".tmp")) == N and not _files(d, ".dmtcp")
        wait_for(all_written_none_final, 60, f"all {N} images written, none renamed, at the fault point")
        assert not list(tmp_path.glob("ckpt_*/gen000001.json")), "a manifest before the images were durable"
    finally:
        t.join(120)
    assert r.get("rc") == 0
    d = _gen_dir(tmp_path, 1)
    assert len(_files(d, ".dmtcp")) == N and not _files(d, ".tmp")
    assert list(tmp_path.glob("ckpt_*/gen000001.json"))


def test_a_failure_before_the_images_are_durable_keeps_the_last_good_generation(launch, build_dir, tmp_path,
                                                                                 env):
    """An I/O error after every image of generation 2 was written but before they were fsync'ed (the fsync of
    a failing disk): the round fails naming the error, no image of it is left, the restart script still
    points at generation 1, the job runs on, and the next checkpoint (3) completes."""
    job = _start(launch, build_dir, tmp_path, env, "dump.before_fsync:error=EIO@2")
    assert job.command("-bc").returncode == 0
    r = job.command("-bc")
    assert r.returncode != 0 and "Input/output error" in r.stderr, (r.stdout, r.stderr)
    assert not list(tmp_path.glob("ckpt_*/gen000002.json"))
    d = _gen_dir(tmp_path, 2)
    assert not _files(d, ".dmtcp") and not _files(d, ".tmp"), "images of the failed generation left behind"
    assert "gen000001" in (tmp_path / "dmtcp_restart_script.sh").read_text()
    assert len(json.loads(job.command("-l", "--json").stdout)["peers"]) >= N, "the job did not run on"
    assert job.command("-bc").returncode == 0
    assert list(tmp_path.glob("ckpt_*/gen000003.json"))
    assert "gen000003" in (tmp_path / "dmtcp_restart_script.sh").read_text()


def _tids(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def test_one_chunk_pool_serves_every_image_of_an_agent(launch, build_dir, tmp_path, env):
    """The threads the agent starts while it writes 12 images (chunks slowed down so that every thread lives
    long enough to be seen): the image writers and one chunk pool, not a pool per image; a second checkpoint
    starts no chunk writer at all (the pool is the agent's, kept)."""
    job = _start(launch, build_dir, tmp_path, env, "dump.after_chunk:sleep=0.02")
    agent = agent_of(job.proc.pid)
    cores = os.cpu_count() or 1
    image_threads = 1 + min(N, 4)                 # the background writer and its image writers
    chunk_threads = min(4, cores + 1)

    def new_threads_during_checkpoint() -> int:
        before, seen, stop = _tids(agent), set(), threading.Event()

        def sample():
            while not stop.is_set():
                seen.update(_tids(agent))
                time.sleep(0.002)
        s = threading.Thread(target=sample)
        s.start()
        try:
            assert job.command("-bc", timeout=120).returncode == 0
        finally:
            stop.set()
            s.join()
        return len(seen - before)

    first = new_threads_during_checkpoint()
    assert first <= image_threads + chunk_threads, f"{first} threads started to write {N} images"
    second = new_threads_during_checkpoint()
    assert second <= image_threads, f"{second} threads started at the second checkpoint"


@pytest.mark.slow
def test_agent_killed_between_the_writes_and_the_fsyncs_keeps_the_last_good_generation(launch, counter, tmp_path,
                                                                                         env):
    """The agent dies after writing every image of generation 2 and before making any durable (a crash at
    the worst moment of the batched commit): no image of generation 2 has a final name, the coordinator fails
    the round and keeps generation 1 (byte for byte), and the program itself runs on (without a PID namespace
    it outlives its agent)."""
    import hashlib
    import signal
    env["HPCCKPT_FAULT"] = "dump.before_fsync:exit@2"
    env["HPCCKPT_PEER_TIMEOUT"] = "3"
    out = tmp_path / "out.txt"
    job = launch(counter, out, 16, 100000, 10000, extra=("--no-gzip", "--no-pid-namespace"))
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 5, 30, "progress")
    prog_pid = json.loads(job.command("-l", "--json").stdout)["peers"][0]["pid"]
    try:
        assert job.command("-bc").returncode == 0
        gen1 = _gen_dir(tmp_path, 1)
        assert gen1 is not None
        img = _files(gen1, ".dmtcp")[0]
        digest = hashlib.sha256(img.read_bytes()).hexdigest()
        job.command("-c")
        log = tmp_path / "run" / f"coord-{job.port}.log"
        wait_for(lambda: "generation 2 failed" in log.read_text(), 60, "the coordinator to give up on the agent")
        assert "the previous checkpoint is kept" in log.read_text()
        assert job.proc.wait(10) is not None                    # the agent (the launch process) is gone
        assert not _files(_gen_dir(tmp_path, 2), ".dmtcp"), "an image that was never fsync'ed got a final name"
        assert not list(tmp_path.glob("ckpt_*/gen000002.json"))
        assert "gen000001" in (tmp_path / "dmtcp_restart_script.sh").read_text()
        assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
        n = len(out.read_text().splitlines())
        wait_for(lambda: len(out.read_text().splitlines()) > n + 3, 30, "the program to go on after its agent died")
    finally:
        try:
            os.kill(prog_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
