"""Processes of one computation started by separate `dmtcp_launch`es (as DMTCP's users and harnesses do), talking
over TCP, each blocked reading a standard input the harness keeps open: after every restart they still talk,
none reads EOF (each agent's share restarts with the restart command's standard input, as one restart would
give it), and a line written to the restart's standard input reaches one of them."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROGRAMS, line_count, run, wait_for

pytestmark = pytest.mark.slow

ROUNDS = 250


def _start_trio(tmp_path: Path, tag: str, prefix: list[str], env: dict) -> list[subprocess.Popen]:
    port_file = tmp_path / f"{tag}.port"
    prog = [sys.executable, str(PROGRAMS / "tcptrio.py")]
    roles = [("server", ROUNDS), ("client", 1), ("client", 2)]
    procs = []
    for i, (role, arg) in enumerate(roles):
        procs.append(subprocess.Popen([*prefix, *prog, role, str(tmp_path / f"{tag}.{i}.out"), str(port_file),
                                       str(arg)], env=env, cwd=tmp_path, stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{tag}.{i}.err", "w")))
        if i == 0:
            wait_for(port_file.exists, 30, "the server's port")
    return procs


def _outputs(tmp_path: Path, tag: str) -> list[list[str]]:
    return [[ln for ln in (tmp_path / f"{tag}.{i}.out").read_text().splitlines() if not ln.startswith("stdin:")]
            for i in range(3)]


def _ckpt_kill(env, tmp_path, port: str) -> None:
    r = run(["dmtcp_command", "-p", port, "-bc", "--json"], env, tmp_path, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["command_status"] == "DMT_COORD_SUCCESS", (r.stdout, r.stderr)
    run(["dmtcp_command", "-p", port, "-k"], env, tmp_path, check=True)


def test_separately_launched_processes_keep_stdin_and_tcp_across_restarts(env, tmp_path):
    plain = _start_trio(tmp_path, "plain", [], env)     # alongside the job (all of them mostly sleep)
    coord = subprocess.Popen(["dmtcp_coordinator", "-p", "0", "--port-file", str(tmp_path / "cport"), "--ckptdir",
                              str(tmp_path)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "coord.err", "w"))
    held = []
    try:
        wait_for(lambda: (tmp_path / "cport").exists() and (tmp_path / "cport").read_text().strip(), 20, "port")
        port = (tmp_path / "cport").read_text().strip()
        held = _start_trio(tmp_path, "job", ["dmtcp_launch", "-j", "-p", port, "--ckptdir", str(tmp_path)], env)
        out0 = tmp_path / "job.0.out"
        wait_for(lambda: line_count(out0) >= 40, 60, "progress")
        for cycle in range(2):
            _ckpt_kill(env, tmp_path, port)
            for p in held:
                p.wait(30)
            gens = sorted(tmp_path.glob("ckpt_*/gen*.json"))
            images = [i["path"] for i in json.loads(gens[-1].read_text())["images"]]
            assert len(images) == 3
            restart = subprocess.Popen(["dmtcp_restart", "-p", port, "--ckptdir", str(tmp_path), *images], env=env,
                                       cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=open(tmp_path / f"restart{cycle}.err", "w"))
            held.append(restart)
            n = line_count(out0)
            wait_for(lambda: line_count(out0) >= n + 40 or restart.poll() is not None, 60, "progress after restart")
            assert restart.poll() is None, (tmp_path / f"restart{cycle}.err").read_text()
            time.sleep(0.3)
            for i in range(3):
                assert "stdin EOF" not in (tmp_path / f"job.{i}.out").read_text(), f"process {i} read EOF"
        restart.stdin.write(b"hello\n")
        restart.stdin.flush()
        assert restart.wait(90) == 0, (tmp_path / "restart1.err").read_text()
        got = [ln for i in range(3) for ln in (tmp_path / f"job.{i}.out").read_text().splitlines()
               if ln.startswith("stdin")]
        assert got == ["stdin: hello"]
        for p in plain:
            assert p.wait(60) == 0
        expected = _outputs(tmp_path, "plain")
        assert expected[0][-1] == "done" and not any("BAD" in ln for ln in expected[0])
        assert _outputs(tmp_path, "job") == expected
    finally:
        for p in [*plain, *held]:
            if p.poll() is None:
                p.kill()
        subprocess.run(["dmtcp_command", "-p", (tmp_path / "cport").read_text().strip(), "-q"], env=env,
                       capture_output=True, timeout=20)
        coord.wait(20)


def test_children_that_outlive_the_launched_process_go_on(launch, env, tmp_path, build_dir):
    """The launched process exits (status 7) leaving a child running, as daemons and nohup'ed programs do:
    dmtcp_launch returns 7 at once (as DMTCP's, which is the launched program), and the computation goes on:
    the child is listed, checkpointed, killed, restarted and finishes with exactly a plain run's output."""
    from conftest import compile_c
    prog = compile_c(build_dir, "outlive")
    steps = 300
    # the plain run goes on alongside the job (both mostly sleep); its child is waited for at the end
    assert subprocess.run([str(prog), str(tmp_path / "plain.txt"), str(steps)], timeout=30).returncode == 7
    out = tmp_path / "out.txt"
    job = launch(prog, out, steps)
    assert job.wait(30) == 7                          # the root's status, while its child runs on
    n = line_count(out)
    wait_for(lambda: line_count(out) > n + 5, 30, "the child running on")
    listing = job.command("-l").stdout
    assert "outlive" in listing, listing
    r = job.command("-bc")
    assert r.returncode == 0, r.stderr
    job.command("-k", check=True)
    time.sleep(0.5)
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), "--from", str(tmp_path)], env, tmp_path,
            timeout=120)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "child done" in (tmp_path / "plain.txt").read_text(), 30, "the plain run's child")
    assert out.read_text() == (tmp_path / "plain.txt").read_text()
