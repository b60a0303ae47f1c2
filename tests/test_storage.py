"""Multi-level storage with real processes on one host (docs/storage.md): the program resumes once its images
are on the node-local level, a background drain makes the shared copy (verified, then the shared manifest),
the status shows both levels, a restart picks the fastest valid copy, and a drain killed before it finished
leaves the previous shared generation the restart point."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import line_count, run, wait_for

from hpcckpt.image import journal, levels, store

MB, DELAY = 8, 10000


def start(launch, counter, tmp_path, steps, extra=()):
    out = tmp_path / "out.txt"
    job = launch(counter, out, MB, steps, DELAY, extra=["--ckptdir", str(tmp_path / "shared"),
                                                        "--local-dir", str(tmp_path / "local-{host}"), *extra])
    wait_for(lambda: line_count(out) >= 10, 30, "the program to make progress")
    return job, out


def checkpoint(job) -> dict:
    r = job.command("-bc", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def program_running(out: Path) -> bool:
    return any(str(out) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE
               for p in psutil.process_iter(["cmdline"]))


def computation_of(shared: Path) -> str:
    (comp,) = store.computations_in(str(shared))
    return comp


@pytest.mark.slow
def test_local_level_first_then_verified_drain_and_restart_picks_the_fastest_copy(launch, counter, tmp_path, env):
    job, out = start(launch, counter, tmp_path, steps=200)
    shared, local = tmp_path / "shared", tmp_path / f"local-{socket.gethostname()}"
    reply = checkpoint(job)
    # complete as soon as the image is on the node: the coordinator's reply says "local"
    assert reply["last_checkpoint"]["levels"] == "local"
    comp = computation_of(shared)
    (img,) = Path(store.generation_dir(str(local), comp, 1)).glob("*.dmtcp")
    assert (shared / f"ckpt_{comp}" / "gen000001.local.json").exists()
    # the drain copies it in the background; the shared manifest follows once it is there and verified
    wait_for(lambda: store.complete_generations(str(shared), comp) == [1], 20, "the shared manifest")
    copy = Path(store.generation_dir(str(shared), comp, 1)) / img.name
    assert copy.read_bytes() == img.read_bytes()
    st = json.loads(job.command("-s", "--json").stdout)
    # both levels per generation, with the drain's state; no partner copies asked for ("off")
    assert st["levels"] == [{"generation": 1, "local": True, "shared": True, "partner": "off", "drain": "done",
                             "complete": True}]
    assert "LEVELS=1:local+shared" in job.command("-s").stdout
    events = [(e["event"], e.get("level") or e.get("ok")) for e in map(json.loads,
                                                                       (shared / "hpcckpt-events.jsonl").open())]
    assert ("level", "local") in events and ("drain", True) in events and ("level", "shared") in events
    r = run(["hpcckpt", "status", str(shared)], env, tmp_path)
    assert "[local+shared]" in r.stdout, r.stdout
    job.command("-k")
    job.wait(30)
    # restart from the shared directory's manifest: this node's local copy is read (fastest) ...
    cmd = ["dmtcp_restart", "-p", "0", "--ckptdir", str(shared), "--local-dir", str(tmp_path / "local-{host}"),
           "--from", str(shared)]
    shutil.copy(img, tmp_path / "saved.dmtcp")
    img.unlink()          # ... and without it, the shared copy: the program still ends as a plain run does
    r = run(cmd, env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"using the shared copy {copy}" in r.stderr, r.stderr
    assert line_count(out) == 200


@pytest.mark.slow
def test_a_drain_killed_leaves_the_previous_shared_generation_the_restart_point(launch, counter, tmp_path, env):
    env["HPCCKPT_FAULT"] = "drain.start:sleep=60@2"      # the second generation's drain hangs ...
    job, out = start(launch, counter, tmp_path, steps=100000)
    shared = tmp_path / "shared"
    checkpoint(job)
    comp = computation_of(shared)
    wait_for(lambda: store.complete_generations(str(shared), comp) == [1], 20, "generation 1 drained")
    checkpoint(job)
    assert levels.local_generations(str(shared), comp) == [1, 2]
    assert not levels.wait_drained(str(shared), 1.0, comp)      # what the batch driver waits for before a requeue
    agents = [p for p in psutil.Process(job.proc.pid).children(recursive=True) if "counter" not in p.name()]
    for a in agents + [psutil.Process(job.proc.pid)]:            # ... and is killed with its agent
        a.kill()
    job.proc.wait(10)
    wait_for(lambda: not program_running(out), 10, "the program to die with its agent (PID namespace init)")
    r = run(["hpcckpt", "status", str(shared)], env, tmp_path)
    assert "local only" in r.stdout and "restart uses this" in r.stdout.splitlines()[-2], r.stdout
    assert store.complete_generations(str(shared), comp) == [1]
    # a rerun on other nodes (no local copies): generation 1 from the shared level
    port_file = tmp_path / "port.r"
    p = subprocess.Popen(["dmtcp_restart", "-p", "0", "--port-file", str(port_file), "--ckptdir", str(shared),
                          "--from", str(shared)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "r.err", "w"))
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, "the restart")
        # (the coordinator is up while the restart restores: restored once its agent joined)
        wait_for(lambda: json.loads(run(["dmtcp_command", "--port-file", str(port_file), "-s", "--json"], env,
                                        tmp_path).stdout).get("num_peers") == 1, 30, "the restart to join")
        err = (tmp_path / "r.err").read_text()          # generation 1, from the shared level, saying why not 2
        assert "generation 2 of" in err and "restarting generation 1 from" in err, err
        # its next checkpoint is generation 3: the local-only generation 2's number is never reused (its stale
        # images could otherwise pass for the new generation's on the shared level)
        r = run(["dmtcp_command", "--port-file", str(port_file), "-bc", "--json"], env, tmp_path)
        assert json.loads(r.stdout)["generation"] == 3, r.stdout
    finally:
        run(["dmtcp_command", "--port-file", str(port_file), "-k"], env, tmp_path)
        p.wait(30)


def test_sync_drain_completes_both_levels_before_the_reply_and_keep_local_prunes(launch, counter, tmp_path):
    job, out = start(launch, counter, tmp_path, steps=100000, extra=["--drain", "sync", "--keep-local", "1"])
    shared, local = tmp_path / "shared", tmp_path / f"local-{socket.gethostname()}"
    assert checkpoint(job)["last_checkpoint"]["levels"] == "local+shared"
    comp = computation_of(shared)
    assert store.complete_generations(str(shared), comp) == [1]      # no waiting: there at the reply
    assert checkpoint(job)["last_checkpoint"]["levels"] == "local+shared"
    # keep_local 1: the older generation leaves the node once the newer one is complete (it is shared too)
    wait_for(lambda: not Path(store.generation_dir(str(local), comp, 1)).exists(), 10, "generation 1 pruned locally")
    assert list(Path(store.generation_dir(str(local), comp, 2)).glob("*.dmtcp"))
    m = store.read_manifest(str(shared), comp, 2)
    assert all(Path(i.path).parent == Path(store.generation_dir(str(shared), comp, 2)) for i in m.images)
    job.command("-k")
    job.wait(30)


@pytest.mark.slow
def test_batch_requeue_waits_for_the_drain_and_a_rerun_on_new_nodes_reads_the_shared_copy(env, tmp_path, counter):
    """As inside a Grid Engine job (the stand-ins of test_sched_signals.py): the scheduler's warning signal
    checkpoints; the requeue waits until the (paced, ~2 s) drain made the shared copy; the rerun, on a node with
    another (empty) local directory, restarts from the shared level and ends as a plain run does."""
    import os
    import signal

    from test_sched_signals import _batch_run, _job_script, _sge_env
    d, steps = tmp_path, 300
    script = _job_script(d, counter, steps)
    e = dict(_sge_env(env, d, 3600, 0), HPCCKPT_LOCAL_DIR=str(d / "node-a"), HPCCKPT_DRAIN_RATE="4M")
    drv = _batch_run(e, d, "lead: 5\n", script)
    try:
        wait_for(lambda: line_count(d / "out.txt") > 30, 60, "the program to run")
        os.kill(drv.pid, signal.SIGUSR1)
        assert drv.wait(60) == 99, (d / "job.log").read_text()
        (journal_file,) = d.glob("**/hpcckpt-events.jsonl")
        events = [json.loads(line) for line in journal_file.read_text().splitlines()]
        shared = [e["time"] for e in events if e["event"] == "level" and e.get("level") == "shared"]
        requeue = [e["time"] for e in events if e["event"] == "requeue"]
        drained = [e["seconds"] for e in events if e["event"] == "drain" and e.get("ok")]
        assert shared and requeue and shared[0] <= requeue[0], events      # the shared copy came first
        assert drained[0] >= 1.0, drained                                   # (paced: the wait was needed)
        e2 = dict(_sge_env(env, d, 3600, 1), HPCCKPT_LOCAL_DIR=str(d / "node-b"))
        drv = _batch_run(e2, d, "lead: 5\n", script)
        assert drv.wait(120) == 0, (d / "job.log").read_text()
    finally:
        if drv.poll() is None:
            drv.kill()
    log = (d / "job.log").read_text()
    assert "restarting from checkpoint generation 1" in log and "using the shared copy" in log, log
    assert "checkpoint generation 1: levels local [drain running]" in log, log     # both levels in the job log
    subprocess.run([str(counter), str(d / "plain.txt"), "8", str(steps), "0"], check=True, stdout=subprocess.DEVNULL)
    assert (d / "out.txt").read_text() == (d / "plain.txt").read_text()


@pytest.mark.slow
def test_the_drain_keeps_its_rate_limit_under_a_competing_writer(launch, counter, tmp_path):
    """The drain under load: a `dd` writing (and fsyncing) to the same filesystem all along; the drain's rate
    (bytes over its journaled time, which counts its fsync and read-back verification) stays within 20 % of the
    limit: never much above it (the program's bandwidth), and not starved far below it."""
    rate = 6 << 20
    job, out = start(launch, counter, tmp_path, steps=100000, extra=["--drain-rate", "6M", "--no-gzip"])
    shared = tmp_path / "shared"
    dd = subprocess.Popen(["bash", "-c", f"while :; do dd if=/dev/zero of={tmp_path}/dd.out bs=1M count=64 "
                           "conv=fsync status=none; done"])
    try:
        checkpoint(job)
        comp = computation_of(shared)
        wait_for(lambda: store.complete_generations(str(shared), comp) == [1], 60, "the paced drain")
    finally:
        dd.kill()
        dd.wait()
    (ev,) = [e for e in map(json.loads, (shared / "hpcckpt-events.jsonl").open()) if e["event"] == "drain"]
    assert ev["bytes"] >= MB << 20, ev                       # (the image is about the program's memory)
    got = ev["bytes"] / ev["seconds"]
    print(f"drain: {ev['bytes'] / 2**20:.1f} MiB in {ev['seconds']:.2f} s under dd: {got / 2**20:.2f} MiB/s")
    assert 0.8 * rate <= got <= 1.2 * rate, f"{got / 2**20:.2f} MiB/s against a limit of 6 MiB/s ({ev})"
    job.command("-k")
    job.wait(30)


def test_a_kcheckpoint_finishes_its_drain_before_the_agent_exits(launch, counter, tmp_path):
    """dmtcp_command -kc: checkpoint, then kill the job (a batch job's last act). The node-local level does not
    outlive the job ($TMPDIR goes with it), so the agent finishes the (paced, ~1 s) drain before it exits: when
    dmtcp_launch returns, the generation is complete on the shared level."""
    job, out = start(launch, counter, tmp_path, steps=100000, extra=["--drain-rate", "8M"])
    shared = tmp_path / "shared"
    r = job.command("-kc")
    assert r.returncode == 0, r.stderr
    job.wait(60)
    comp = computation_of(shared)
    assert store.complete_generations(str(shared), comp) == [1]        # no waiting: there at the exit
    assert levels.wait_drained(str(shared), 0.1, comp)
    err = (tmp_path / "launch.0.err").read_text()
    assert "finishing the drain" in err and "drain finished" in err, err[-2000:]


@pytest.mark.slow
def test_a_kcheckpoint_makes_its_partner_copies_before_the_agents_exit(launch, counter, tmp_path, env):
    """dmtcp_command -kc with --partner: two agents on two "hosts" (the second in its own UTS namespace, under
    another host name, so each has its own local level and the other is its partner). Before, a kcheckpoint made
    no partner copies: until the drain, each node's disk was the only copy. Now each agent sends its images to
    its partner and keeps the other's before it exits, the coordinator hears it, and the generation is complete
    on local+partner (restart script, last_checkpoint) without any drain."""
    other = "hpcckpt-kc-b"
    extra = ["--partner", "--drain", "off"]          # (no shared copy: the partner's is the only other one)
    job, out = start(launch, counter, tmp_path, steps=100000, extra=extra)
    shared, out2 = tmp_path / "shared", tmp_path / "out2.txt"
    port = job.port_file.read_text().strip()
    err2 = open(tmp_path / "launch.b.err", "w")
    second = subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", f'hostname {other} && exec "$@"', "sh", "dmtcp_launch", "--join",
         "-h", "127.0.0.1", "-p", port, "--ckptdir", str(shared), "--local-dir", str(tmp_path / "local-{host}"),
         *extra, str(counter), str(out2), str(MB), "100000", str(DELAY)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err2, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: line_count(out2) >= 10, 30, "the second program to make progress")
        r = job.command("-kc")
        assert r.returncode == 0, r.stderr
        job.wait(60)
        assert second.wait(60) is not None
    finally:
        if second.poll() is None:
            second.kill()
    comp = computation_of(shared)
    here = socket.gethostname()
    for mine, theirs in ((here, other), (other, here)):
        kept = list(Path(store.generation_dir(levels.partner_root(str(tmp_path / f"local-{mine}")), comp, 1))
                    .glob("*.dmtcp"))
        assert len(kept) == 1, f"{mine} keeps no partner copy of {theirs}'s image"
    assert store.complete_generations(str(shared), comp) == []
    events = [e for e in journal.read(str(shared)) if e.get("event") == "level" and e.get("generation") == 1]
    assert events and events[-1].get("level") == "local+partner", events
    assert (shared / "dmtcp_restart_script.sh").exists()
    err = (tmp_path / "launch.0.err").read_text() + (tmp_path / "launch.b.err").read_text()
    assert "partner copies of generation 1 kept here" in err, err[-3000:]
