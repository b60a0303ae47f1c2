"""Every command answers --help and --version under both its names; the coordinator refuses strangers."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import zmq

from conftest import run, wait_for

COMMANDS = [["hpcckpt"], ["hpcckpt", "coordinator"], ["hpcckpt", "launch"], ["hpcckpt", "restart"],
            ["hpcckpt", "command"], ["hpcckpt", "inspect"], ["dmtcp_coordinator"], ["dmtcp_launch"],
            ["dmtcp_checkpoint"], ["dmtcp_restart"], ["dmtcp_command"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_and_version(cmd, env, tmp_path):
    r = run(cmd + ["--help"], env, tmp_path)
    assert r.returncode == 0 and "usage" in r.stdout.lower()
    r = run(cmd + ["--version"], env, tmp_path)
    assert r.returncode == 0 and "0." in r.stdout


def test_dmtcp_launch_h_is_the_host_option(env, tmp_path):
    # DMTCP convention: -h names the coordinator host, --help is help
    r = run(["dmtcp_command", "-h", "127.0.0.1", "-p", "1", "-s"], env, tmp_path)
    assert r.returncode == 2 and "127.0.0.1:1" in r.stderr


@pytest.fixture
def coordinator(env, tmp_path):
    port_file = tmp_path / "coord.port"
    p = subprocess.Popen(["dmtcp_coordinator", "-p", "0", "--port-file", str(port_file), "--ckptdir", str(tmp_path)],
                         env=env, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 20, "coordinator port")
    yield p, int(port_file.read_text())
    if p.poll() is None:
        p.kill()
        p.wait()


def test_coordinator_rejects_messages_without_the_secret(coordinator, env, tmp_path):
    proc, port = coordinator
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    body = json.dumps({"type": "command", "cmd": "quit"}).encode()
    s.send_multipart([b"HPCCKPT/1", b"\0" * 32, body])          # right framing, wrong MAC
    assert s.poll(5000), "no answer"
    tag, mac, reply = s.recv_multipart()
    assert mac == b"" and json.loads(reply)["type"] == "reject"
    s.send_multipart([body])                                      # no framing at all
    time.sleep(0.5)
    s.close()
    ctx.term()
    # still alive and obeying its owner
    r = run(["dmtcp_command", "-p", str(port), "-s", "--json"], env, tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["num_peers"] == 0
    run(["dmtcp_command", "-p", str(port), "-q"], env, tmp_path, check=True)
    proc.wait(10)
    log = proc.stderr.read()
    assert "bad or missing secret" in log and "not an hpcckpt protocol message" in log


def test_secret_file_is_private(coordinator, env, tmp_path):
    import os
    import stat
    _, port = coordinator
    secret = tmp_path / "run" / f"coord-{port}.secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(secret.parent).st_mode) == 0o700
    # a wrong secret file gives a clear refusal and exit 2
    env2 = dict(env, HPCCKPT_SECRET="00" * 32)
    r = run(["dmtcp_command", "-p", str(port), "-s"], env2, tmp_path)
    assert r.returncode == 2 and "refused" in r.stderr


def test_command_json_status_fields(coordinator, env, tmp_path):
    _, port = coordinator
    r = run(["dmtcp_command", "-p", str(port), "-s", "--json"], env, tmp_path)
    d = json.loads(r.stdout)
    for key in ("schema_version", "command", "command_status", "coordinator_host", "coordinator_port", "num_peers",
                "running", "checkpoint_interval"):
        assert key in d
    assert d["command"] == "DMT_STATUS" and d["running"] is False
    r = run(["dmtcp_command", "-p", str(port), "-s"], env, tmp_path)
    assert "NUM_PEERS=0" in r.stdout and "RUNNING=no" in r.stdout and "CKPT_INTERVAL=0" in r.stdout
    r = run(["dmtcp_command", "-p", str(port), "-i", "5", "--json"], env, tmp_path)
    assert json.loads(r.stdout)["checkpoint_interval"] == 5
    r = run(["dmtcp_command", "-p", str(port), "-c"], env, tmp_path)
    assert r.returncode == 2 and "no processes" in r.stderr      # refused: nothing to checkpoint


def test_coordinator_console(coordinator, env, tmp_path):
    proc, port = coordinator
    out, _ = proc.communicate("s\ni 7\n?\nq\n", timeout=20)
    assert "NUM_PEERS=0" in out and "interval: 7" in out and "checkpoint, then kill" in out
    assert proc.returncode == 0


def test_coordinator_port_busy(coordinator, env, tmp_path):
    _, port = coordinator
    r = run(["dmtcp_coordinator", "-p", str(port), "--daemon"], env, tmp_path)
    assert r.returncode == 99 and "cannot listen" in r.stderr


def test_list_shows_mpi_ranks(launch, tmp_path):
    """-l names the MPI rank (or srun task) of each process that has one, from what its launcher set."""
    job = launch("bash", "-c", "PMI_RANK=3 sleep 30 & SLURM_PROCID=5 sleep 30 & wait")
    def ranks():
        peers = json.loads(job.command("-l", "--json").stdout).get("peers", [])
        return sorted(p["rank"] for p in peers if p.get("rank") is not None)
    wait_for(lambda: len(ranks()) == 2, 15, "both ranks listed")
    assert ranks() == [3, 5]
    assert ", rank 3" in job.command("-l").stdout


def test_checkpoint_waits_for_every_mpi_rank_and_fails_naming_the_missing_one(launch, env, tmp_path):
    """A checkpoint waits for every rank of an MPI world to be ours (rank 1 starts 2 s late), and fails naming
    the rank that never joined (rank 3 of world pmi:4 is nowhere: started by a launcher we do not wrap)."""
    env["HPCCKPT_RANK_WAIT"] = "5"
    job = launch("bash", "-c", "PMI_RANK=0 PMI_SIZE=2 sleep 60 & sleep 2; touch started2; "
                 "PMI_RANK=1 PMI_SIZE=2 sleep 60 & sleep 3; PMI_RANK=0 PMI_SIZE=4 sleep 60 & "
                 "PMI_RANK=1 PMI_SIZE=4 sleep 60 & PMI_RANK=2 PMI_SIZE=4 sleep 60 & touch started4; wait")
    wait_for(lambda: any(p.get("rank") == 0 for p in json.loads(job.command("-l", "--json").stdout)
                         .get("peers", [])), 15, "rank 0 to be listed")
    r = job.command("-bc", "--json")
    reply = json.loads(r.stdout)
    assert r.returncode == 0 and reply["command_status"] == "DMT_COORD_SUCCESS", reply
    assert (tmp_path / "started2").exists()         # it was taken only once rank 1 had started
    assert reply["checkpoint"]["images"] >= 3
    wait_for(lambda: (tmp_path / "started4").exists(), 20, "the 4-rank world")
    time.sleep(1)
    r = job.command("-bc", "--json", timeout=60)
    reply = json.loads(r.stdout)
    assert r.returncode != 0 and reply["command_status"] != "DMT_COORD_SUCCESS", reply
    assert "rank 3 of 4 (pmi:4) never joined" in reply["error"], reply
    assert reply["generation"] == 1
    job.kill()


def test_blocking_checkpoint_shows_progress_on_a_terminal(launch, env, tmp_path, build_dir):
    """-bc on a terminal rewrites one progress line (phase, MB written, agents done) while the images are being
    written, then prints the outcome; -s --json carries the same numbers as checkpoint_progress."""
    import os
    import pty
    from conftest import compile_c
    prog = compile_c(build_dir, "sparse")
    env["HPCCKPT_FAULT"] = "dump.after_chunk:sleep=0.2"        # 64 MiB = 16 chunks: ~3 s of writing
    job = launch(prog, tmp_path / "out.txt", 64, 100000, 10000)
    wait_for(lambda: (tmp_path / "out.txt").exists() and (tmp_path / "out.txt").stat().st_size, 20, "progress")
    assert json.loads(job.command("-s", "--json").stdout)["checkpoint_progress"] is None
    master, slave = pty.openpty()
    try:
        p = subprocess.run(["dmtcp_command", "--port-file", str(job.port_file), "-bc"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0 and "checkpoint generation 1 complete" in p.stdout
    assert b"\r" in shown and b"MB written" in shown and b"checkpoint 1:" in shown, shown
    assert shown.endswith(b"\r\x1b[K")                 # the line is cleared before the outcome is printed
    last = json.loads(job.command("-s", "--json").stdout)["last_checkpoint"]
    assert last["pages_dumped"] * 4096 >= 64 << 20 and last["pages_skipped"] > 0 and 0.9 < last["ratio"] <= 1.01
    assert {"suspend", "drain", "checkpoint"} <= set(last["phase_s"]) and last["write_s"] >= 3 * 0.2
    text = job.command("-s").stdout
    assert "LAST_CHECKPOINT=generation 1, " in text and "zero pages left out" in text, text
