"""DMTCP's own options and variables (issue 19): every option of dmtcp_launch, dmtcp_restart, dmtcp_command and
dmtcp_coordinator (DMTCP 3.x-5.0) is accepted and means what DMTCP documents (docs/dmtcp-compat.md); the ones
with behaviour are run for real."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import compile_c, newest_images, restart_in_background, run, wait_for
from hpcckpt.cli import command as command_cli
from hpcckpt.cli import coordinator as coordinator_cli
from hpcckpt.cli import dmtcpopts
from hpcckpt.cli import launch as launch_cli
from hpcckpt.cli import restart as restart_cli
from hpcckpt.cli.common import settings_from
from hpcckpt.settings import load


def _settings(parser, argv, environ=None):
    args = parser.parse_args(argv)
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(environ or {})
        return args, settings_from(args)
    finally:
        os.environ.clear()
        os.environ.update(old)


# ------------------------------------------------------------------------------------------------ parsing --
LAUNCH_OPTIONS = [
    ["--checkpoint-open-files"], ["--ckpt-open-files"], ["--allow-file-overwrite"], ["--tmpdir", "/tmp/t"],
    ["-t", "/tmp/t"], ["--gzip"], ["--no-gzip"], ["-c", "/tmp"],
    ["--ckptdir", "/tmp"], ["--ckpt-signal", "10"], ["--with-plugin", "/a.so:/b.so"], ["--modify-env"],
    ["--pathvirt"], ["--disable-alloc-plugin"], ["--disable-dl-plugin"], ["--disable-ipc-plugin"],
    ["--disable-svipc-plugin"], ["--disable-timer-plugin"], ["--disable-pid-plugin"], ["--disable-event-plugin"],
    ["--disable-all-plugins"], ["--no-plugins"], ["--enable-unique-checkpoint-filenames"],
    ["--disable-unique-checkpoint-filenames"], ["--coord-logfile", "/tmp/l"], ["-q"], ["-q", "-q"], ["--quiet"],
    ["--kernel-loader"], ["--mpi"], ["--ptrace"], ["--batch-queue"], ["--rm"], ["--ib"], ["--infiniband"],
    ["--ib2tcp"], ["--explicit-srun"], ["--hbict"], ["--no-hbict"], ["--prefix", "/opt"], ["-i5"], ["-i", "5"],
    ["--interval", "5"], ["-p0"], ["-p", "0"], ["--coord-port", "0"], ["--port", "0"], ["-h", "localhost"],
    ["--coord-host", "localhost"], ["--host", "localhost"], ["--port-file", "/tmp/p"], ["-j"],
    ["--join-coordinator"], ["--join"], ["--new-coordinator"], ["--any-coordinator"]]
RESTART_OPTIONS = [
    ["--no-strict-checking"], ["--restartdir", "/tmp"], ["-r", "/tmp"], ["--debug-restart-pause", "1"],
    ["--gdb", "2"], ["--tmpdir", "/tmp/t"], ["-t", "/tmp/t"], ["--coord-logfile", "/tmp/l"], ["-c", "/tmp"],
    ["--ckptdir", "/tmp"], ["-q"], ["-q", "-q"], ["--mpi"], ["-i5"], ["-p0"], ["--port-file", "/tmp/p"], ["-j"],
    ["--join-coordinator"], ["--new-coordinator"], ["--any-coordinator"], ["--allow-file-overwrite"],
    ["--with-plugin", "/a.so"], ["--modify-env"], ["--pathvirt"]]
COORDINATOR_OPTIONS = [
    ["--exit-on-last"], ["--exit-after-ckpt"], ["--daemon"], ["--coord-logfile", "/tmp/l"], ["-i", "5"], ["-i5"],
    ["--interval", "5"], ["-p", "0"], ["-p0"], ["--port", "0"], ["--coord-port", "0"], ["--port-file", "/tmp/p"],
    ["-c", "/tmp"], ["--ckptdir", "/tmp"], ["-t", "/tmp/t"], ["--tmpdir", "/tmp/t"], ["-q"], ["--quiet"],
    ["--timeout", "5"], ["--stale-timeout", "5"], ["--write-kv-data"], ["--mpi"], ["7779"]]
COMMAND_WORDS = {"-s": "status", "--status": "status", "s": "status", "-l": "list", "--list": "list",
                 "l": "list", "-c": "checkpoint", "--checkpoint": "checkpoint", "c": "checkpoint",
                 "-bc": "bcheckpoint", "--bcheckpoint": "bcheckpoint", "bc": "bcheckpoint",
                 "-kc": "kcheckpoint", "--kcheckpoint": "kcheckpoint", "kc": "kcheckpoint", "-xc": "kcheckpoint",
                 "xc": "kcheckpoint", "-k": "kill", "--kill": "kill", "k": "kill", "-q": "quit", "--quit": "quit",
                 "q": "quit"}


@pytest.mark.parametrize("opts", LAUNCH_OPTIONS, ids=lambda o: " ".join(o))
def test_launch_accepts_dmtcp_option(opts):
    args = launch_cli.parser("dmtcp_launch").parse_args([*opts, "/bin/true", "-x"])
    assert args.command == ["/bin/true", "-x"]


@pytest.mark.parametrize("opts", RESTART_OPTIONS, ids=lambda o: " ".join(o))
def test_restart_accepts_dmtcp_option(opts):
    restart_cli.parser("dmtcp_restart").parse_args([*opts, "a.dmtcp"])


@pytest.mark.parametrize("opts", COORDINATOR_OPTIONS, ids=lambda o: " ".join(o))
def test_coordinator_accepts_dmtcp_option(opts):
    coordinator_cli.parser("dmtcp_coordinator").parse_args(opts)


@pytest.mark.parametrize("word", sorted(COMMAND_WORDS))
def test_command_accepts_dmtcp_command_words(word):
    args = command_cli.parser("dmtcp_command").parse_args(dmtcpopts.command_argv(["--json", word]))
    assert args.cmd == COMMAND_WORDS[word]


@pytest.mark.parametrize("argv", [["-i5"], ["-i", "5"], ["--interval", "5"], ["i", "5"]])
def test_command_interval_spellings(argv):
    assert command_cli.parser("dmtcp_command").parse_args(dmtcpopts.command_argv(argv)).interval_value == 5


def test_options_reach_settings():
    _, s = _settings(launch_cli.parser("dmtcp_launch"),
                     ["--ckpt-open-files", "--allow-file-overwrite", "-q", "-q", "--with-plugin", "/a/x.so:/b/y.so",
                      "--path-prefix", "/old:/new", "--disable-pid-plugin", "--enable-unique-checkpoint-filenames",
                      "--tmpdir", "/tmp/t", "--coord-logfile", "/tmp/l", "--modify-env", "/bin/true"])
    assert s.ckpt_open_files and s.allow_file_overwrite and s.quiet == 2 and s.modify_env
    assert s.plugins == ["/a/x.so", "/b/y.so"] and s.path_prefixes == ["/old:/new"] and s.pathvirt
    assert s.pid_namespace is False and s.keep_generations > 10 ** 6          # unique names: nothing pruned
    assert s.tmpdir == "/tmp/t" and s.coord_logfile == "/tmp/l"
    _, s = _settings(restart_cli.parser("dmtcp_restart"), ["--no-strict-checking", "--debug-restart-pause", "3",
                                                          "x.dmtcp"])
    assert s.no_strict_checking and s.restart_pause == 3
    _, s = _settings(coordinator_cli.parser("dmtcp_coordinator"), ["--exit-after-ckpt"])
    assert s.exit_after_ckpt


@pytest.mark.parametrize("var,value,field,expect", [
    ("DMTCP_QUIET", "0", "quiet", 0), ("DMTCP_QUIET", "1", "quiet", 1), ("DMTCP_QUIET", "2", "quiet", 2),
    ("DMTCP_CHECKPOINT_OPEN_FILES", "1", "ckpt_open_files", True),
    ("DMTCP_ALLOW_FILE_OVERWRITE", "1", "allow_file_overwrite", True),
    ("DMTCP_TMPDIR", "/tmp/x", "tmpdir", "/tmp/x"),
    ("DMTCP_DISABLE_STRICT_CHECKING", "1", "no_strict_checking", True),
    ("DMTCP_RESTART_PAUSE", "2", "restart_pause", 2),
    ("DMTCP_UNIQUE_CKPT_PLUGIN", "1", "unique_ckpt", True),
    ("DMTCP_COORD_LOG_FILENAME", "/tmp/c.log", "coord_logfile", "/tmp/c.log"),
    ("DMTCP_PLUGIN", "/x/a.so:/y/b.so", "plugins", ["/x/a.so", "/y/b.so"]),
    ("DMTCP_PLUGIN", "mymod:MyPlugin", "plugins", ["mymod:MyPlugin"]),
    ("DMTCP_PATH_MAPPING", "/v:/p;/a=/b", "path_prefixes", ["/v:/p", "/a:/b"])])
def test_dmtcp_variables(var, value, field, expect):
    assert getattr(load({}, None, {var: value}), field) == expect


def test_version_names_dmtcp(env, tmp_path):
    for prog in ("dmtcp_launch", "dmtcp_restart", "dmtcp_command", "dmtcp_coordinator"):
        r = run([prog, "--version"], env, tmp_path)
        assert r.returncode == 0 and "hpcckpt" in r.stdout and "DMTCP 3.0-5.0" in r.stdout, (prog, r.stdout)


# ----------------------------------------------------------------------------------------- dmtcp_command --json --
def _json(r):
    d = json.loads(r.stdout)
    assert d["schema_version"] == 1 and isinstance(d["command_status"], str)
    assert not {"ok", "type", "phase"} & set(d), d         # DMTCP's readers reject these
    assert isinstance(d["coordinator_host"], str) and isinstance(d["coordinator_port"], int)
    return d


def test_command_json_is_dmtcps(launch, counter, env, tmp_path):
    r = run(["dmtcp_command", "--json", "-p", "1", "-s"], env, tmp_path)
    d = _json(r)
    assert r.returncode == 2 and r.stderr == "" and d["command"] == "DMT_STATUS" and \
        d["command_status"] == "DMT_COORD_NOT_FOUND"
    r = run(["dmtcp_command", "--json", "--bogus"], env, tmp_path)
    assert r.returncode == 2 and _json(r)["command_status"] == "DMT_COORD_INVALID_COMMAND"
    assert _json(run(["dmtcp_command", "--json", "--version"], env, tmp_path))["command"] == "DMT_VERSION"

    job = launch(counter, tmp_path / "out.txt", 4, 100000, 10000)
    wait_for(lambda: _json(job.command("--json", "s")).get("num_peers") == 1, 20, "the program to join")
    st = _json(job.command("--json", "s"))
    assert st["command"] == "DMT_STATUS" and st["command_status"] == "DMT_COORD_SUCCESS"
    assert st["num_peers"] == 1 and st["running"] is True and st["checkpoint_interval"] == 0
    lst = _json(job.command("--json", "--list"))
    assert lst["command"] == "DMT_LIST" and "counter" in lst["workers"] and lst["peers"]     # ours beside
    bc = _json(job.command("--json", "-bc"))
    assert bc["command"] == "DMT_BLOCKING_CKPT" and bc["command_status"] == "DMT_COORD_SUCCESS", bc
    assert bc["num_peers"] == 1 and bc["checkpoint"]["images"] == 1
    iv = _json(job.command("--json", "-i7"))
    assert iv["command"] == "DMT_UPDATE_CKPT_INTERVAL" and iv["checkpoint_interval"] == 7
    kc = _json(job.command("--json", "xc"))
    assert kc["command"] == "DMT_KILL_AFTER_CKPT" and kc["command_status"] == "DMT_COORD_SUCCESS", kc
    job.wait(30)


# ---------------------------------------------------------------------------------------------- behaviour --
def test_missing_checkpoint_directory_is_created(launch, counter, tmp_path):
    ckdir = tmp_path / "new" / "ckpt"
    job = launch(counter, tmp_path / "out.txt", 4, 100000, 10000, extra=["--ckptdir", str(ckdir)])
    assert job.command("-bc").returncode == 0
    assert newest_images(ckdir)
    job.command("-k")
    job.wait(30)


def test_quiet_levels(env, tmp_path):
    """DMTCP_QUIET=0 says what happens (INFO), 1 and 2 leave notes out (DMTCP's 2 was rejected as not yes/no)."""
    for level, says in (("0", True), ("1", False), ("2", False)):
        r = run(["dmtcp_launch", "-p", "0", "--port-file", str(tmp_path / f"pf{level}"), "--disable-ipc-plugin",
                 "/bin/true"], {**env, "DMTCP_QUIET": level}, tmp_path)
        assert r.returncode == 0, r.stderr
        assert ("--disable-ipc-plugin" in r.stderr) == says, (level, r.stderr)


def test_unique_checkpoint_filenames_keep_every_generation(launch, counter, tmp_path):
    job = launch(counter, tmp_path / "out.txt", 4, 100000, 10000,
                 extra=["--enable-unique-checkpoint-filenames"])
    for _ in range(3):
        assert job.command("-bc").returncode == 0
    gens = sorted(tmp_path.glob("ckpt_*/gen*.json"))
    assert len(gens) == 3, gens                       # default keeps 2
    job.command("-k")
    job.wait(30)


def test_coordinator_logfile_and_exit_after_ckpt(counter, env, tmp_path):
    logf = tmp_path / "coord.log"
    pf = tmp_path / "port"
    coord = subprocess.Popen(["dmtcp_coordinator", "-p", "0", "--port-file", str(pf), "--coord-logfile", str(logf),
                              "--exit-after-ckpt", "--ckptdir", str(tmp_path)], env=env, cwd=tmp_path,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: pf.exists() and pf.read_text().strip(), 20, "the coordinator's port")
        c = run(["dmtcp_command", "--port-file", str(pf), "--json", "-c"], env, tmp_path)
        assert c.returncode == 2 and _json(c)["command_status"] == "DMT_COORD_NOT_RUNNING"   # nothing to checkpoint
        job = subprocess.Popen(["dmtcp_launch", "-j", "-p", "0", "--port-file", str(pf), counter, tmp_path / "out.txt", "4",
                                "100000", "10000"], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: json.loads(run(["dmtcp_command", "--port-file", str(pf), "-s", "--json"], env,
                                        tmp_path).stdout).get("num_peers") == 1, 20, "the program to join")
        assert run(["dmtcp_command", "--port-file", str(pf), "-c"], env, tmp_path).returncode == 0
        assert job.wait(30) == 128 + 9               # killed once the checkpoint was complete
        assert newest_images(tmp_path)
        assert "checkpoint" in logf.read_text()
    finally:
        coord.kill()
        coord.wait()


def test_tmpdir_is_created_and_holds_the_coordinator_log(launch, counter, env, tmp_path):
    tmpdir = tmp_path / "mytmp"
    job = launch(counter, tmp_path / "out.txt", 4, 100000, 10000, extra=["--tmpdir", str(tmpdir)])
    assert tmpdir.is_dir() and (tmpdir.stat().st_mode & 0o777) == 0o700
    wait_for(lambda: list(tmpdir.glob("coord-*.log")), 10, "the started coordinator's log in the tmpdir")
    job.command("-k")
    job.wait(30)


# ----------------------------------------------------------------------------------- --checkpoint-open-files --
@pytest.fixture
def openfile(build_dir):
    return compile_c(build_dir, "openfile")


def _ckpt_open_file_job(launch, openfile, tmp_path, extra=("--checkpoint-open-files",)):
    data, go = tmp_path / "data.txt", tmp_path / "go"
    job = launch(openfile, data, go, extra=list(extra))
    wait_for(lambda: data.exists() and data.stat().st_size > 0, 20, "the data file")
    assert job.command("-bc").returncode == 0
    job.command("-k")
    job.wait(30)
    return data, go, newest_images(tmp_path)


def test_open_file_deleted_after_checkpoint_is_restored(launch, openfile, env, tmp_path):
    data, go, images = _ckpt_open_file_job(launch, openfile, tmp_path)
    saved = data.read_bytes()
    data.unlink()
    job = restart_in_background(images, env, tmp_path)
    assert data.read_bytes() == saved               # put back from the image
    go.touch()
    assert job.wait(30) == 0                        # and the program reads it through its open descriptor


def test_open_file_changed_refused_then_overwritten_when_allowed(launch, openfile, env, tmp_path):
    data, go, images = _ckpt_open_file_job(launch, openfile, tmp_path)
    saved = data.read_bytes()
    data.write_bytes(b"changed after the checkpoint\n")
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), *map(str, images)], env, tmp_path, timeout=60)
    assert r.returncode != 0 and str(data) in r.stderr and "--allow-file-overwrite" in r.stderr, r.stderr
    assert data.read_bytes() == b"changed after the checkpoint\n"      # left alone
    job = restart_in_background(images, env, tmp_path, extra=["--allow-file-overwrite"])
    assert data.read_bytes() == saved
    backups = list(tmp_path.glob("data.txt.*.bk"))
    assert len(backups) == 1 and backups[0].read_bytes() == b"changed after the checkpoint\n"
    go.touch()
    assert job.wait(30) == 0


def test_without_the_option_a_deleted_file_is_not_restored(launch, openfile, env, tmp_path):
    data, go, images = _ckpt_open_file_job(launch, openfile, tmp_path, extra=())
    data.unlink()
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), *map(str, images)], env, tmp_path, timeout=60)
    assert r.returncode != 0 and str(data) in r.stderr


# ------------------------------------------------------------------------------------ --debug-restart-pause --
def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _host_pid(nspid: int, name: str) -> int:
    for d in Path("/proc").iterdir():
        try:
            st = (d / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in st.splitlines() if ":\t" in line)
        if fields.get("Name") == name and fields.get("NSpid", "").split()[-1] == str(nspid):
            return int(d.name)
    raise AssertionError(f"no process {name} with namespace PID {nspid}")


def test_debug_restart_pause_waits_for_the_debugger(launch, openfile, env, tmp_path):
    """As DMTCP's harness runs it: a coordinator up, the restart joins it; with the pause the restored process
    stays stopped and untraced (a debugger can attach) and the coordinator sees nobody until it is continued."""
    import re
    data, go, images = _ckpt_open_file_job(launch, openfile, tmp_path, extra=())
    pf, err = tmp_path / "coord.port", tmp_path / "restart.err"
    coord = subprocess.Popen(["dmtcp_coordinator", "-p", "0", "--port-file", str(pf), "--ckptdir", str(tmp_path)],
                             env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    restart = None
    try:
        wait_for(lambda: pf.exists() and pf.read_text().strip(), 20, "the coordinator's port")

        def status():
            return json.loads(run(["dmtcp_command", "--port-file", str(pf), "-s", "--json"], env, tmp_path).stdout)
        with open(err, "w") as e:
            restart = subprocess.Popen(["dmtcp_restart", "-j", "-p", "0", "--port-file", str(pf),
                                        "--debug-restart-pause", "1", *map(str, images)], env=env, cwd=tmp_path,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=e)
        m = wait_for(lambda: re.search(r"openfile pid (\d+)", err.read_text()), 30, "the paused process's PID")
        pid = _host_pid(int(m.group(1)), "openfile")        # (the PID printed is the one in the job's namespace)
        wait_for(lambda: _proc_state(pid) == "T", 10, "the restored process to be stopped")
        assert "TracerPid:\t0" in Path(f"/proc/{pid}/status").read_text()     # free for gdb -p
        st = status()
        assert st["num_peers"] == 0 and st["running"] is False, st               # the restart has not joined
        assert restart.poll() is None
        os.kill(pid, 18)                                                      # SIGCONT: the restart goes on
        wait_for(lambda: status()["num_peers"] == 1, 30, "the restart to join")
        go.touch()
        assert restart.wait(30) == 0
    finally:
        for p in (restart, coord):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_restartdir_restarts_the_newest_checkpoint(launch, openfile, env, tmp_path):
    data, go, _ = _ckpt_open_file_job(launch, openfile, tmp_path, extra=())
    job = restart_in_background([], env, tmp_path, extra=["--restartdir", str(tmp_path)])
    go.touch()
    assert job.wait(30) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs to give an image to another user")
def test_strict_checking_refuses_another_users_image(launch, openfile, env, tmp_path):
    data, go, images = _ckpt_open_file_job(launch, openfile, tmp_path, extra=())
    for img in images:
        os.chown(img, 4242, 4242)
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), *map(str, images)], env, tmp_path, timeout=60)
    assert r.returncode == 99 and "uid 4242" in r.stderr and "--no-strict-checking" in r.stderr, r.stderr
    job = restart_in_background(images, env, tmp_path, extra=["--no-strict-checking"])
    go.touch()
    assert job.wait(30) == 0


def test_pathvirt_finds_moved_files(launch, openfile, env, tmp_path):
    """DMTCP's pathvirt: the data directory moved after the checkpoint; with its OLD:NEW prefix the restart
    reopens the file at its new path (without, it cannot)."""
    old, new = tmp_path / "virtual", tmp_path / "physical"
    old.mkdir()
    data, go = old / "data.txt", tmp_path / "go"
    job = launch(openfile, data, go)
    wait_for(lambda: data.exists() and data.stat().st_size > 0, 20, "the data file")
    assert job.command("-bc").returncode == 0
    job.command("-k")
    job.wait(30)
    images = newest_images(tmp_path)
    old.rename(new)
    r = run(["dmtcp_restart", "-p", "0", "--ckptdir", str(tmp_path), *map(str, images)], env, tmp_path, timeout=60)
    assert r.returncode != 0 and str(data) in r.stderr
    job = restart_in_background(images, {**env, "DMTCP_PATH_MAPPING": f"{old}:{new}"}, tmp_path,
                                extra=["--pathvirt"])
    go.touch()
    assert job.wait(30) == 0


def test_pathvirt_prefix_boundaries():
    from hpcckpt.engine.pathvirt import _pairs, remap
    pairs = _pairs(["/data:/scratch/data", "/data/big:/fast"])
    assert remap("/data/x", pairs) == "/scratch/data/x" and remap("/data", pairs) == "/scratch/data"
    assert remap("/database/x", pairs) == "/database/x"                     # whole components only
    assert remap("/data/big/y", pairs) == "/fast/y"                          # the longest prefix wins


def test_modify_env_file_format():
    from hpcckpt.cli.modifyenv import EnvFileError, parse
    changes = parse("# a comment\n\nTARGET=after-restart\nREMOVE\nDISP=$DISPLAY:${N}\n", {"DISPLAY": ":0", "N": "1"})
    assert changes == {"TARGET": "after-restart", "REMOVE": None, "DISP": ":0:1"}
    with pytest.raises(EnvFileError):
        parse("1BAD=x\n", {})


def test_command_help_and_no_command_in_json(env, tmp_path):
    r = run(["dmtcp_command", "--json"], env, tmp_path)
    assert r.returncode == 0 and _json(r)["command"] == "DMT_HELP"
    r = run(["dmtcp_command", "-h"], env, tmp_path)
    assert r.returncode == 0 and "usage" in r.stdout


def test_open_file_that_only_grew_is_not_changed(launch, openfile, env, tmp_path):
    """A file appended to after the checkpoint (a log) still starts with its saved contents: no refusal, and the
    writable file is cut back to its checkpoint length."""
    data, go, images = _ckpt_open_file_job(launch, openfile, tmp_path)
    saved = data.read_bytes()
    with open(data, "ab") as f:
        f.write(b"appended after the checkpoint\n")
    job = restart_in_background(images, env, tmp_path)
    go.touch()
    assert job.wait(30) == 0
    assert data.read_bytes() == saved
