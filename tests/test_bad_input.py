"""Bad input gets one clear line and DMTCP_FAIL_RC (or 2 for dmtcp_command), and never damages the last good
checkpoint."""
from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from conftest import line_count, newest_images, run, wait_for

FAIL = 99


def _one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    return lines[0]


@pytest.mark.parametrize("cmd,code", [
    (["dmtcp_launch", "--no-such-flag", "true"], FAIL),
    (["hpcckpt", "launch", "--bogus"], FAIL),
    (["dmtcp_restart", "--bogus"], FAIL),
    (["dmtcp_coordinator", "--bogus"], FAIL),
    (["dmtcp_command", "--bogus"], 2),
    (["hpcckpt", "nosuch"], 2),
])
def test_unknown_flag_one_line(cmd, code, env, tmp_path):
    r = run(cmd, env, tmp_path)
    assert r.returncode == code
    assert "error" in _one_line(r.stderr)


def test_fail_rc_is_configurable(env, tmp_path):
    env["DMTCP_FAIL_RC"] = "42"
    r = run(["dmtcp_restart", str(tmp_path / "missing.dmtcp")], env, tmp_path)
    assert r.returncode == 42


def test_missing_image(env, tmp_path):
    r = run(["dmtcp_restart", "-p", "0", str(tmp_path / "ckpt_x_1.dmtcp")], env, tmp_path)
    assert r.returncode == FAIL
    assert "no such checkpoint image" in _one_line(r.stderr)


def test_not_an_image(env, tmp_path):
    f = tmp_path / "ckpt_fake.dmtcp"
    f.write_bytes(b"\x7fELF not an image at all" * 100)
    r = run(["dmtcp_restart", "-p", "0", str(f)], env, tmp_path)
    assert r.returncode == FAIL and "not an hpcckpt checkpoint image" in _one_line(r.stderr)


def test_no_coordinator_reachable(env, tmp_path):
    r = run(["dmtcp_command", "-p", "1", "-s"], env, tmp_path)
    assert r.returncode == 2 and "no coordinator listening" in _one_line(r.stderr)
    r = run(["dmtcp_launch", "-j", "-p", "1", "true"], env, tmp_path)
    assert r.returncode == FAIL and "no coordinator" in _one_line(r.stderr)


def test_launch_of_missing_program(env, tmp_path):
    r = run(["dmtcp_launch", "-p", "0", "/no/such/program"], env, tmp_path)
    assert r.returncode == FAIL and "cannot run /no/such/program" in r.stderr.strip().splitlines()[-1]


def test_program_exit_code_comes_through(env, tmp_path):
    r = run(["dmtcp_launch", "-p", "0", "sh", "-c", "exit 7"], env, tmp_path)
    assert r.returncode == 7


@pytest.fixture
def good_checkpoint(launch, counter, tmp_path):
    """A job with one complete checkpoint; returns (job, image path, sha256 of the image)."""
    out = tmp_path / "out.txt"
    job = launch(counter, out, 16, 100000, 10000)
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    assert job.command("-bc").returncode == 0
    img = newest_images(tmp_path)[0]
    return job, img, hashlib.sha256(img.read_bytes()).hexdigest()


@pytest.mark.slow
def test_truncated_and_corrupted_images(good_checkpoint, env, tmp_path):
    job, img, digest = good_checkpoint
    job.command("-k", check=True)
    job.wait(30)
    data = img.read_bytes()
    trunc = tmp_path / "ckpt_trunc.dmtcp"
    trunc.write_bytes(data[: len(data) // 2])
    r = run(["dmtcp_restart", "-p", "0", str(trunc)], env, tmp_path)
    assert r.returncode == FAIL and "truncated" in _one_line(r.stderr)

    corrupt = tmp_path / "ckpt_corrupt.dmtcp"
    b = bytearray(data)
    b[4096 * 3 + 17] ^= 0xFF                       # flip a bit in the page data
    corrupt.write_bytes(bytes(b))
    r = run(["dmtcp_restart", "-p", "0", str(corrupt)], env, tmp_path)
    assert r.returncode == FAIL and "corrupted" in _one_line(r.stderr)
    # nothing was left running and the good image is untouched
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_image_of_another_computation_is_refused(good_checkpoint, launch, counter, env, tmp_path):
    job, img, digest = good_checkpoint
    other_out = tmp_path / "other.txt"
    other = launch(counter, other_out, 4, 100000, 10000, cwd=tmp_path)
    wait_for(lambda: line_count(other_out) >= 2, 30, "the other job to run")
    # join the other computation's coordinator with the first computation's image
    r = run(["dmtcp_restart", "-j", "-p", str(other.port), str(img)], env, tmp_path)
    assert r.returncode == FAIL
    assert "computation" in _one_line(r.stderr)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
    assert other.proc.poll() is None and job.proc.poll() is None


@pytest.mark.slow
def test_unwritable_checkpoint_dir(good_checkpoint, env, tmp_path, immutable_dir, plain_run):
    """A checkpoint into a directory that became unwritable fails cleanly: the job keeps running, the command
    says why, and the previous checkpoint is still the one the restart script restarts."""
    job, img, digest = good_checkpoint
    comp_dir = img.parent.parent
    immutable_dir(comp_dir)                 # no new generation directory can be created
    r = job.command("-bc")
    assert r.returncode == 1
    assert "not" in r.stderr and "checkpoint failed" in r.stderr
    assert job.proc.poll() is None          # still running
    st = json.loads(job.command("-s", "--json").stdout)
    assert st["running"] and st["last_failure"] and st["last_checkpoint"]["generation"] == 1
    subprocess.run(["chattr", "-i", str(comp_dir)], check=True)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
    assert "gen000001" in (tmp_path / "dmtcp_restart_script.sh").read_text()
    # launching into an unwritable directory is refused up front
    ro = tmp_path / "ro"
    ro.mkdir()
    immutable_dir(ro)
    r = run(["dmtcp_launch", "-p", "0", "--ckptdir", str(ro), "true"], env, tmp_path)
    assert r.returncode == FAIL and "not writable" in _one_line(r.stderr)


def _fault_job(launch, counter, tmp_path, env, fault, steps=100000, delay=10000, extra=()):
    """A job whose agent has a fault point armed."""
    env["HPCCKPT_FAULT"] = fault
    env["HPCCKPT_PEER_TIMEOUT"] = "3"
    out = tmp_path / "out.txt"
    job = launch(counter, out, 16, steps, delay, extra=("--no-gzip",) + tuple(extra))
    wait_for(lambda: line_count(out) >= 5, 30, "progress")
    return job, out


@pytest.mark.slow
def test_agent_killed_mid_write_keeps_previous_checkpoint(launch, counter, env, tmp_path):
    """The agent dies in the middle of writing an image: no final image name, no manifest, the restart script
    still points at the previous complete checkpoint, and the program itself survives untouched (without a PID
    namespace the launch process is the agent, and the program outlives it)."""
    job, out = _fault_job(launch, counter, tmp_path, env, "dump.after_chunk:sleep=0.3",
                          extra=("--no-pid-namespace",))
    assert job.command("-bc").returncode == 0           # generation 1 completes (slowly)
    img = newest_images(tmp_path)[0]
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    prog_pid = json.loads(job.command("-l", "--json").stdout)["peers"][0]["pid"]
    assert job.command("-c").returncode == 0            # generation 2 starts, and we kill the agent mid-write
    gen2 = img.parent.parent / "gen000002"
    wait_for(lambda: list(gen2.glob("*.tmp")), 30, "the generation-2 image being written")
    log = tmp_path / "run" / f"coord-{job.port}.log"
    job.proc.kill()
    job.proc.wait(10)
    try:
        wait_for(lambda: "generation 2 failed" in log.read_text(), 30, "the coordinator to give up on the agent")
        assert "the previous checkpoint is kept" in log.read_text()
        assert not list(gen2.glob("*.dmtcp")), "an unfinished image got a final name"
        assert not (img.parent.parent / "gen000002.json").exists()
        assert "gen000001" in (tmp_path / "dmtcp_restart_script.sh").read_text()
        assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
        n = line_count(out)                              # the orphaned program still runs correctly
        wait_for(lambda: line_count(out) > n + 5, 30, "the program to go on after its agent died")
    finally:
        import os
        import signal
        try:
            os.kill(prog_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_disk_full_during_checkpoint(launch, counter, env, tmp_path, plain_run):
    """ENOSPC while writing: the checkpoint fails with the reason, partial files are removed, the job goes on,
    and a later restart from the previous checkpoint is still exact."""
    job, out = _fault_job(launch, counter, tmp_path, env, "", steps=1500, delay=4000)
    assert job.command("-bc").returncode == 0
    img = newest_images(tmp_path)[0]
    job.command("-k")
    job.wait(30)
    env["HPCCKPT_FAULT"] = "dump.after_chunk:error=ENOSPC"
    port_file = tmp_path / "port.r"
    p = subprocess.Popen(["dmtcp_restart", "-p", "0", "--port-file", str(port_file), "--no-gzip", str(img)],
                         env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 30, "restart coordinator")
        r = run(["dmtcp_command", "--port-file", str(port_file), "-bc"], env, tmp_path)
        assert r.returncode == 1 and "No space left on device" in r.stderr
        assert not list(tmp_path.glob("ckpt_*/gen000002/*")), "partial files left behind"
        assert p.poll() is None
        run(["dmtcp_command", "--port-file", str(port_file), "-k"], env, tmp_path, check=True)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    env.pop("HPCCKPT_FAULT")
    r = run(["dmtcp_restart", "-p", "0", str(img)], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == plain_run(16, 1500)


def _rewrite_metadata(path, change) -> None:
    """Edit an image's metadata in place (keeping it valid), to make images no machine here would produce."""
    import json as _json
    import zlib
    from hpcckpt.image import format as fmt
    raw = bytearray(open(path, "rb").read())
    magic, version, flags, meta_off, meta_len, _, data_end = fmt._HEADER.unpack_from(raw)
    meta = _json.loads(raw[meta_off:meta_off + meta_len])
    change(meta)
    body = _json.dumps(meta).encode()
    raw = raw[:meta_off] + body
    raw[0:fmt._HEADER.size] = fmt._HEADER.pack(magic, version, flags, meta_off, len(body), zlib.crc32(body), data_end)
    open(path, "wb").write(bytes(raw))
    fmt.resign(path)         # signed again with the tests' key: the edit is ours, the image stays authentic


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vdso", "xstate", "mapped-file"])
def test_image_this_machine_cannot_restore(case, good_checkpoint, env, tmp_path):
    """A different kernel's vdso layout, CPU state this CPU lacks, a mapped file that changed: one line and
    DMTCP_FAIL_RC, nothing left running."""
    import base64
    job, img, _ = good_checkpoint
    job.command("-k", check=True)
    job.wait(30)
    bad = tmp_path / f"ckpt_bad_{case}.dmtcp"
    bad.write_bytes(img.read_bytes())

    def change(meta):
        proc = meta["process"]
        if case == "vdso":
            r = next(r for r in proc["regions"] if r["path"] == "[vdso]")
            r["start"] += 4096          # one page smaller (growing it would overlap the next mapping: refused earlier)
        elif case == "xstate":
            x = bytearray(base64.b64decode(proc["threads"][0]["xstate"]))
            x[512:520] = (int.from_bytes(x[512:520], "little") | (1 << 62)).to_bytes(8, "little")  # unknown component
            proc["threads"][0]["xstate"] = base64.b64encode(bytes(x)).decode()
        else:
            r = next(r for r in proc["regions"] if r["backing"] == "file")
            r["file_mtime_ns"] += 1
    _rewrite_metadata(bad, change)
    r = run(["dmtcp_restart", "-p", "0", str(bad)], env, tmp_path)
    assert r.returncode == FAIL
    line = _one_line(r.stderr)
    assert {"vdso": "vdso layout", "xstate": "CPU state", "mapped-file": "changed since the checkpoint"}[case] in line
    assert subprocess.run(["pgrep", "-f", f"counter {tmp_path}"], capture_output=True).stdout == b""


# -- issue 15 item 8: every bad input gets one specific line and the documented exit code, never a hang --------

def _special_files(tmp_path):
    import os
    fifo = tmp_path / "fifo.dmtcp"
    os.mkfifo(fifo)
    d = tmp_path / "dir.dmtcp"
    d.mkdir()
    return {"FIFO": fifo, "directory": d, "character device": "/dev/zero"}


@pytest.mark.parametrize("kind", ["FIFO", "directory", "character device"])
def test_special_file_as_image(kind, env, tmp_path):
    """A FIFO hung restart and inspect forever; a directory was an 'internal error: IsADirectoryError'."""
    path = str(_special_files(tmp_path)[kind])
    r = run(["dmtcp_restart", "-p", "0", path], env, tmp_path, timeout=20)
    assert r.returncode == FAIL and f"is a {kind}, not a checkpoint image" in _one_line(r.stderr)
    r = run(["hpcckpt", "inspect", path], env, tmp_path, timeout=20)
    assert r.returncode == 1 and f"is a {kind}, not a checkpoint image" in _one_line(r.stderr)


@pytest.mark.parametrize("content,message", [
    (b"", "bad magic"),
    (b"\xff\xfe\x00garbage" * 10, "bad magic"),
])
def test_empty_and_binary_images(content, message, env, tmp_path):
    f = tmp_path / "ckpt_x.dmtcp"
    f.write_bytes(content)
    r = run(["hpcckpt", "inspect", "--verify", str(f)], env, tmp_path)
    assert r.returncode == 1 and message in _one_line(r.stderr)


def test_metadata_not_json_with_a_valid_checksum(env, tmp_path):
    """Metadata bytes that are not UTF-8 JSON (checksum recomputed): corrupted, in one line."""
    import zlib
    from craft import write_synthetic
    from hpcckpt.image import format as fmt
    path = write_synthetic(str(tmp_path / "ckpt_x.dmtcp"))
    raw = bytearray(open(path, "rb").read())
    magic, version, flags, meta_off, meta_len, _, data_end = fmt._HEADER.unpack_from(raw)
    body = b"\xff\xfe{not json"
    raw = raw[:meta_off] + body
    raw[:fmt._HEADER.size] = fmt._HEADER.pack(magic, version, flags, meta_off, len(body), zlib.crc32(body), data_end)
    open(path, "wb").write(bytes(raw))
    for cmd in (["hpcckpt", "inspect", path], ["dmtcp_restart", "-p", "0", path]):
        r = run(cmd, env, tmp_path)
        assert r.returncode in (1, FAIL) and "not valid UTF-8 JSON" in _one_line(r.stderr)


@pytest.mark.parametrize("cmd,envs,code,message", [
    (["dmtcp_launch", "-p", "0", "true"], {"HPCCKPT_WRITERS": "abc"}, FAIL, "HPCCKPT_WRITERS"),
    (["dmtcp_restart", "-p", "0", "x.dmtcp"], {"HPCCKPT_WRITERS": "abc"}, FAIL, "HPCCKPT_WRITERS"),
    (["dmtcp_launch", "-p", "0", "true"], {"HPCCKPT_WRITERS": "0"}, FAIL, "HPCCKPT_WRITERS"),
    (["dmtcp_restart", "x.dmtcp"], {"HPCCKPT_RESTART_TIMEOUT": "abc"}, FAIL, "HPCCKPT_RESTART_TIMEOUT"),
    (["dmtcp_coordinator", "-p", "0"], {"HPCCKPT_PEER_TIMEOUT": "abc"}, FAIL, "HPCCKPT_PEER_TIMEOUT"),
    (["dmtcp_command", "-s"], {"HPCCKPT_REMOTE_TIMEOUT": ""}, 2, "HPCCKPT_REMOTE_TIMEOUT"),
    (["hpcckpt", "inspect", "x.dmtcp"], {"HPCCKPT_PEER_TIMEOUT": "-1"}, 1, "HPCCKPT_PEER_TIMEOUT"),
    (["dmtcp_launch", "-h", "", "-p", "0", "true"], {}, FAIL, "coordinator host ''"),
    (["dmtcp_restart", "-h", "", "x.dmtcp"], {}, FAIL, "coordinator host ''"),
    (["dmtcp_command", "-h", "", "-s"], {}, 2, "coordinator host ''"),
    (["dmtcp_launch", "--ckpt-signal", "KILL", "-p", "0", "true"], {}, FAIL, "SIGKILL cannot be caught"),
    (["dmtcp_launch", "--ckpt-signal", "STOP", "-p", "0", "true"], {}, FAIL, "SIGSTOP cannot be caught"),
    (["dmtcp_launch", "--ckpt-signal", "99", "-p", "0", "true"], {}, FAIL, "not a signal number"),
    (["dmtcp_launch", "--ckpt-signal", "FOO", "-p", "0", "true"], {}, FAIL, "'FOO' is not a signal name"),
    (["dmtcp_launch", "-p", "0", "true"], {"HPCCKPT_PHASE_TIMEOUT": "nan"}, FAIL, "finite number"),
    (["dmtcp_launch", "-p", "0", "true"], {"HPCCKPT_RANK_WAIT": "-1"}, FAIL, "rank_wait must be >= 0"),
    (["dmtcp_launch", "-p", "0", "true"], {"HPCCKPT_LOG_LEVEL": "loud"}, FAIL, "log level 'loud'"),
    (["dmtcp_launch", "-p", "0", "true"], {"HPCCKPT_FULL_EVERY": "0"}, FAIL, "full_every"),
    (["dmtcp_launch", "-p", "0", ""], {}, FAIL, "empty name"),
    (["dmtcp_launch", "-p", "0", "--ckptdir", "notadir", "true"], {}, FAIL, "is not a directory"),
])
def test_bad_values_one_line(cmd, envs, code, message, env, tmp_path):
    (tmp_path / "notadir").write_text("")
    env.update(envs)
    r = run(cmd, env, tmp_path, timeout=30)
    assert r.returncode == code, r.stderr
    line = _one_line(r.stderr)
    assert message in line and "internal error" not in line


def test_yaml_errors_one_line(env, tmp_path):
    """A YAML syntax error was 4 lines (PyYAML's own message); now one, with line and column."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("interval: [1,\n  2\n")
    r = run(["dmtcp_launch", "--config", str(bad), "-p", "0", "true"], env, tmp_path)
    assert r.returncode == FAIL and "not valid YAML" in _one_line(r.stderr) and "line 3" in r.stderr
    env["HPCCKPT_CONFIG"] = str(bad)
    r = run(["dmtcp_command", "-s"], env, tmp_path)
    assert r.returncode == 2 and "not valid YAML" in _one_line(r.stderr)
    del env["HPCCKPT_CONFIG"]
    (tmp_path / "binary.yaml").write_bytes(b"interval: \xff\xfe\n")
    r = run(["dmtcp_launch", "--config", "binary.yaml", "-p", "0", "true"], env, tmp_path)
    assert r.returncode == FAIL and "not UTF-8" in _one_line(r.stderr)
    job = tmp_path / "job.sh"
    job.write_text("#!/bin/sh\ntrue\n")
    for sub in ("sbatch", "qsub"):
        r = run(["hpcckpt", sub, "--config", str(bad), str(job)], env, tmp_path)
        assert r.returncode == FAIL and "not valid YAML" in _one_line(r.stderr), r.stderr


@pytest.mark.parametrize("what", ["config", "job config", "table", "port file", "from"])
def test_fifo_where_a_file_is_read(what, env, tmp_path):
    """A FIFO given as a settings file, job config, restart table or port file blocked the command forever."""
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    job = tmp_path / "job.sh"
    job.write_text("#!/bin/sh\ntrue\n")
    cmd, code = {
        "config": (["dmtcp_launch", "--config", str(fifo), "-p", "0", "true"], FAIL),
        "job config": (["hpcckpt", "sbatch", "--config", str(fifo), str(job)], FAIL),
        "table": (["dmtcp_restart", "--table", str(fifo)], FAIL),
        "port file": (["dmtcp_command", "--port-file", str(fifo), "-s"], 2),
        "from": (["dmtcp_restart", "--from", str(fifo)], FAIL),
    }[what]
    r = run(cmd, env, tmp_path, timeout=20)
    assert r.returncode == code
    line = _one_line(r.stderr)
    assert str(fifo) in line or "fifo" in line
    assert "internal error" not in line


def test_daemon_with_a_foreign_run_directory(env, tmp_path):
    """--daemon with a run directory owned by someone else: a 21-line traceback from the forked child, then
    'coordinator failed to start'; now the reason, in one line, before forking."""
    import os
    rundir = tmp_path / "foreign"
    rundir.mkdir(mode=0o700)
    os.chown(rundir, 65534, 65534)
    env["HPCCKPT_RUNDIR"] = str(rundir)
    r = run(["dmtcp_coordinator", "--daemon", "-p", "0", "--timeout", "5"], env, tmp_path, timeout=20)
    assert r.returncode == FAIL and "not a directory owned by you" in _one_line(r.stderr)


@pytest.mark.parametrize("manifest", [       # (tests/unit/image/test_fuzz.py tries many more against the parser itself)
    b"[]",
    b'{"computation": "c", "generation": 1, "created": 0, "images": [{"host": "h", "path": "/p", '
    b'"program": "p", "unique_id": "u", "pid": -4}]}',
])
def test_restart_from_a_bad_manifest(manifest, env, tmp_path):
    comp = tmp_path / "ckpt_c"
    comp.mkdir()
    (comp / "gen000001.json").write_bytes(manifest)
    r = run(["dmtcp_restart", "--from", str(tmp_path)], env, tmp_path)
    assert r.returncode == FAIL
    line = _one_line(r.stderr)
    assert "manifest" in line and "internal error" not in line


# -- issue 15 item 9: edited metadata with a recomputed checksum is checked as a whole before anything restores --

def _edit_dup_offset(meta):        # two chunks of one region read the same file bytes: wrong memory, exit 0 before
    chunks = next(r["chunks"] for r in meta["process"]["regions"] if len(r["chunks"]) >= 2)
    chunks[1][2], chunks[1][4] = chunks[0][2], chunks[0][4]


def _edit_rip_zero(meta):          # crashed the restored process right after the restore reported success
    meta["process"]["threads"][0]["regs"]["rip"] = 0


def _edit_chunk_outside_region(meta):
    r = next(r for r in meta["process"]["regions"] if r["chunks"])
    r["chunks"][-1][0] = (r["end"] - r["start"]) // 4096


def _edit_overlapping_regions(meta):
    regions = meta["process"]["regions"]
    regions[1]["start"] = regions[0]["start"]


def _edit_duplicate_fd(meta):
    fds = meta["process"]["fds"]
    fds.append(dict(fds[-1]))


def _edit_rsp_unmapped(meta):
    meta["process"]["threads"][0]["regs"]["rsp"] = 0x1000


def _edit_chunk_beyond_file(meta):
    r = next(r for r in meta["process"]["regions"] if r["chunks"])
    r["chunks"][0][2] = 1 << 40


def _edit_unknown_fd_kind(meta):
    meta["process"]["fds"][-1]["kind"] = "teleporter"


EDITS = {"duplicate chunk offset": (_edit_dup_offset, "overlaps"),
         "rip=0": (_edit_rip_zero, "instruction pointer 0x0"),
         "chunk outside its region": (_edit_chunk_outside_region, "outside its"),
         "overlapping regions": (_edit_overlapping_regions, "overlaps or precedes"),
         "duplicate fd": (_edit_duplicate_fd, "appears twice"),
         "unmapped stack pointer": (_edit_rsp_unmapped, "stack pointer"),
         "chunk beyond the file": (_edit_chunk_beyond_file, "beyond the page data"),
         "unknown fd kind": (_edit_unknown_fd_kind, "unknown kind")}


@pytest.mark.slow
def test_edited_metadata_is_refused_before_restoring(good_checkpoint, env, tmp_path):
    """Each edit (checksum recomputed by the image writer) is refused by inspect --verify and by restart with one
    line naming the image and the inconsistency; restart creates no process. The unedited copy still restores
    (no false alarm)."""
    from craft import rewrite
    job, img, _ = good_checkpoint
    job.command("-k", check=True)
    job.wait(30)
    for name, (edit, message) in EDITS.items():
        bad = str(tmp_path / f"ckpt_edited_{name.replace(' ', '_')}.dmtcp")
        rewrite(str(img), bad, edit)
        r = run(["hpcckpt", "inspect", "--verify", bad], env, tmp_path)
        assert r.returncode == 1 and message in _one_line(r.stderr), (name, r.stderr)
        if name in ("duplicate chunk offset", "rip=0"):       # the two cases of the issue, end to end
            r = run(["dmtcp_restart", "-p", "0", bad], env, tmp_path)
            assert r.returncode == FAIL, (name, r.stderr)
            line = _one_line(r.stderr)
            assert message in line and "refusing to restore" in line
            assert subprocess.run(["pgrep", "-f", f"counter {tmp_path}"], capture_output=True).stdout == b""
    same = str(tmp_path / "ckpt_unedited.dmtcp")
    rewrite(str(img), same, lambda meta: None)
    r = run(["hpcckpt", "inspect", "--verify", same], env, tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout
