"""`hpcckpt dump PID`: checkpointing processes started WITHOUT hpcckpt. A 4-thread program (AVX state, mutexes,
condition variables) and a parent with a child, started plainly, are dumped (killed, or left running) and
`hpcckpt restart --from DIR` finishes them with exactly a plain run's output; what cannot be saved is listed
before anything is frozen."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from conftest import compile_c, line_count, run, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def threads_prog(build_dir):
    return compile_c(build_dir, "threads", "-pthread", "-mavx2", "-mfma")


@pytest.mark.parametrize("mode", ["kill", "leave-running"])
def test_dump_a_threaded_program_started_plainly_and_restart_it(env, tmp_path, threads_prog, plain_output, mode):
    rounds = 300
    expected = plain_output(threads_prog, rounds)
    out = tmp_path / "out.txt"
    ckdir = tmp_path / "ck"                       # does not exist yet: created
    p = subprocess.Popen([str(threads_prog), str(out), str(rounds)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: line_count(out) >= 40, 60, "progress")
        r = run(["hpcckpt", "dump", str(p.pid), "--ckptdir", str(ckdir), f"--{mode}"], env, tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        if mode == "kill":
            assert p.wait(10) == -9
        else:
            n = line_count(out)
            wait_for(lambda: line_count(out) > n + 5, 30, "the original running on")
            assert p.poll() is None
            p.kill()
            p.wait(10)
        manifests = list(ckdir.glob("ckpt_*/gen*.json"))
        assert len(manifests) == 1 and json.loads(manifests[0].read_text())["images"]
        r = run(["hpcckpt", "restart", "-p", "0", "--ckptdir", str(ckdir), "--from", str(ckdir)], env, tmp_path,
                timeout=180)
        assert r.returncode == 0, r.stderr
        assert out.read_text() == expected
    finally:
        if p.poll() is None:
            p.kill()


def test_dump_a_process_tree_and_later_checkpoints_work(env, tmp_path, build_dir):
    """--tree: a shell pipeline's processes (parent, children, a pipe between them) dumped together; the restart
    runs under an agent, so a checkpoint of the restarted computation works too."""
    counter = compile_c(build_dir, "counter")
    out = tmp_path / "out.txt"
    script = f"{counter} {out} 4 1500 2000 | cat > {tmp_path / 'cat.txt'}; echo end >> {tmp_path / 'cat.txt'}"
    p = subprocess.Popen(["bash", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ckdir = tmp_path / "ck"
    try:
        wait_for(lambda: line_count(out) >= 50, 60, "progress")
        r = run(["hpcckpt", "dump", str(p.pid), "--tree", "--kill", "--ckptdir", str(ckdir)], env, tmp_path,
                timeout=120)
        assert r.returncode == 0, r.stderr
        p.wait(10)
        m = json.loads(next(ckdir.glob("ckpt_*/gen*.json")).read_text())
        assert len(m["images"]) == 3                 # bash, counter, cat
        port_file = tmp_path / "rport"
        rp = subprocess.Popen(["hpcckpt", "restart", "-p", "0", "--port-file", str(port_file), "--ckptdir",
                               str(ckdir), "--from", str(ckdir)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "restart.err", "w"))
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 60, "the restart's coordinator")
        def joined():
            r = run(["dmtcp_command", "--port-file", str(port_file), "-s", "--json"], env, tmp_path)
            return r.returncode == 0 and json.loads(r.stdout).get("num_agents", 0) >= 1
        wait_for(joined, 60, "the restarted agent joining")
        c = run(["dmtcp_command", "--port-file", str(port_file), "-bc"], env, tmp_path, timeout=60)
        assert c.returncode == 0, c.stderr
        assert rp.wait(120) == 0, (tmp_path / "restart.err").read_text()
        lines = out.read_text().splitlines()
        assert [int(ln.split()[1]) for ln in lines] == list(range(1, 1501))
        assert (tmp_path / "cat.txt").read_text().splitlines()[-1] == "end"
    finally:
        if p.poll() is None:
            p.kill()


def test_dump_lists_what_cannot_be_saved_before_freezing(env, tmp_path):
    """A socket to a process outside the set: refused with one line per object and nothing frozen; --force
    dumps it (the socket comes back as /dev/null)."""
    a, b = socket.socketpair()
    prog = ["python3", "-c", "import os, sys, time\nfd = int(sys.argv[1])\nwhile True: time.sleep(0.05)",
            str(b.fileno())]
    p = subprocess.Popen(prog, pass_fds=(b.fileno(),), stdin=subprocess.DEVNULL)
    b.close()
    try:
        time.sleep(0.5)
        r = run(["hpcckpt", "dump", str(p.pid), "--ckptdir", str(tmp_path / "ck")], env, tmp_path)
        assert r.returncode == 99
        assert "cannot attach: pid" in r.stdout and "socket" in r.stdout and "--force" in r.stderr
        assert not list((tmp_path / "ck").glob("ckpt_*/gen*.json"))
        with open(f"/proc/{p.pid}/status") as f:
            assert "TracerPid:\t0" in f.read()          # never touched
        r = run(["hpcckpt", "dump", str(p.pid), "--force", "--kill", "--ckptdir", str(tmp_path / "ck")], env,
                tmp_path)
        assert r.returncode == 0, r.stderr
        assert "/dev/null" in r.stderr
    finally:
        a.close()
        if p.poll() is None:
            p.kill()


def test_dump_bad_pid_is_one_line(env, tmp_path):
    for args, code in ((["abc"], 2), (["999999999"], 2), (["1"], 2)):
        r = run(["hpcckpt", "dump", *args, "--ckptdir", str(tmp_path)], env, tmp_path)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, (args, r.stderr)
