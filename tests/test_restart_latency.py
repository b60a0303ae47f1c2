"""What restart-to-running is made of (issue 20), as behaviour: the coordinator a restart needs is started while
the agent restores, not after; a restore that fails its checks still stops before the program runs a single
instruction, and leaves no coordinator behind. How long it takes is bench/latency.py's business."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest
from conftest import line_count, newest_images, run, wait_for

from hpcckpt.coordinator.client import port_is_open
from hpcckpt.image.format import ImageReader, iter_chunks

FAIL = 99


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def checkpointed(launch, counter, tmp_path):
    """A counter checkpointed once and killed: (its output file, its image)."""
    out = tmp_path / "out.txt"
    job = launch(counter, out, 16, 100000, 10000)
    wait_for(lambda: line_count(out) >= 3, 30, "progress")
    assert job.command("-bc").returncode == 0
    job.command("-k", check=True)
    job.wait(30)
    return out, newest_images(tmp_path)[0]


def test_coordinator_starts_while_the_agent_restores(checkpointed, env, tmp_path):
    out, img = checkpointed
    port = _free_port()
    # the agent stays in front of its restore for 30 s: the coordinator must come up meanwhile, not after
    proc = subprocess.Popen(["dmtcp_restart", "-p", str(port), "--ckptdir", str(tmp_path), str(img)],
                            env={**env, "HPCCKPT_FAULT": "restart.before_restore:sleep=30"}, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_is_open("127.0.0.1", port) or proc.poll() is not None, 20,
                 "the restart's coordinator while the agent restores")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert port_is_open("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait(10)
        run(["dmtcp_command", "-p", str(port), "-q"], env, tmp_path)


def test_failed_check_stops_before_the_program_runs_and_leaves_no_coordinator(checkpointed, env, tmp_path):
    out, img = checkpointed
    with ImageReader(str(img)) as r:
        last = max(iter_chunks(r.meta), key=lambda c: c.off)     # read last: the others are restored by then
    data = bytearray(img.read_bytes())
    data[last.off + last.length // 2] ^= 0xFF
    bad = tmp_path / "ckpt_altered.dmtcp"
    bad.write_bytes(bytes(data))
    lines = line_count(out)
    port = _free_port()
    r = run(["dmtcp_restart", "-p", str(port), "--ckptdir", str(tmp_path), str(bad)], env, tmp_path)
    assert r.returncode == FAIL and "corrupted or altered image" in r.stderr, r.stderr
    time.sleep(1)                    # a restored counter would have written a line by now (every 10 ms)
    assert line_count(out) == lines
    # the coordinator started for this restart while it restored is stopped with it
    wait_for(lambda: not port_is_open("127.0.0.1", port), 10, "the unused coordinator to quit")


def test_restart_refused_before_restoring_leaves_no_coordinator(env, tmp_path):
    """The coordinator is on its way from the restart's first moments; a restart refused right after (an image
    that is not one) says its one line alone and the coordinator started for it goes away."""
    bad = tmp_path / "ckpt_not_an_image.dmtcp"
    bad.write_bytes(b"not an image at all\n" * 100)
    port = _free_port()
    r = run(["dmtcp_restart", "-p", str(port), "--ckptdir", str(tmp_path), str(bad)], env, tmp_path)
    assert r.returncode == FAIL and len(r.stderr.strip().splitlines()) == 1, r.stderr
    time.sleep(0.5)
    wait_for(lambda: not port_is_open("127.0.0.1", port), 15, "the unused coordinator to quit")
    assert not list((tmp_path / "run").glob(f"coord-{port}.secret"))


# what the coordinator process imports, checked after it served and quit: its start is on the critical path of
# every restart (a new interpreter started by the restart's starter), so it must not pay for numpy, the image
# codec or the engine, none of which it uses (issue 20: ~60 ms of its ~105 ms of imports were those)
COORDINATOR_MODULES = """
import json, sys
from hpcckpt.cli.main import main
rc = main(["coordinator", "-p", "0", "--port-file", sys.argv[1], "--exit-on-last"])
heavy = sorted(m for m in sys.modules if m == "numpy" or m.startswith(("hpcckpt.engine", "hpcckpt.agent.agent"))
               or m in ("hpcckpt.image.codec", "hpcckpt.image.format", "hpcckpt.image.fdstate"))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


def test_the_coordinator_process_imports_no_numpy_codec_or_engine(env, tmp_path):
    import json
    import sys
    port_file = tmp_path / "coord.port"
    proc = subprocess.Popen([sys.executable, "-c", COORDINATOR_MODULES, str(port_file)], env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip() or proc.poll() is not None, 20,
                 "the coordinator's port file")
        port = int(port_file.read_text())
        run(["dmtcp_command", "-p", str(port), "-s"], env, tmp_path)       # it serves a request first
        run(["dmtcp_command", "-p", str(port), "-q"], env, tmp_path)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"rc": 0, "heavy": []}, err


def test_the_daemon_coordinators_starting_process_still_reports_its_port(env, tmp_path):
    # the path a restart's starter takes (agent/join.start_coordinator): the starting process exits as soon as
    # the daemon listens, without the interpreter's teardown, and still says where it listens
    port = _free_port()
    r = subprocess.run(["hpcckpt", "coordinator", "--daemon", "--exit-on-last", "--timeout", "30", "-p", str(port)],
                       env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    try:
        assert r.returncode == 0, r.stderr
        assert f"listening on port {port} (daemon)" in r.stderr
        assert port_is_open("127.0.0.1", port)
    finally:
        run(["dmtcp_command", "-p", str(port), "-q"], env, tmp_path)
