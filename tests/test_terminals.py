"""Terminals and inotify across checkpoint/restart, with real programs.

Pseudo-terminals the job creates itself (ptypair.c): the bytes in flight both ways at the checkpoint (typed
lines the child has not read, an unfinished line, answers the parent has not read) are neither lost nor
duplicated, whether the job goes on after the checkpoint or is killed and restarted (twice); the child keeps
the slave as controlling terminal with its group in the foreground, and its /dev/tty descriptor works.
Engine level, on real pseudo-terminals of this process: unread input (complete lines, a line ended by EOF, an
empty EOF, an unfinished line) and unread output are read and queued again exactly, with and without TIOCSTI.

The launching terminal (ttyprog.c run inside a pty made here): the settings the program made (echo off, raw)
are applied to the terminal the restart runs in, its group is in the foreground, its /dev/tty works, a
different window size is announced with SIGWINCH, and typed lines are answered. Restarted without any
terminal, the restart still works (/dev/tty becomes /dev/null, with a warning).

inotify (inotifywatch.c): watches come back with their original descriptors (with a gap where one was
removed), on the very directory even when it was renamed meanwhile; a watched directory deleted before the
restart is left out with a warning and its number stays unused.
"""
from __future__ import annotations

import base64
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import test_unprivileged
from conftest import REPO, checkpoint_and_kill, compile_c, restart_in_background, run, wait_for

sandbox = test_unprivileged.sandbox        # fixture: a world-readable copy of hpcckpt for uid 65534

# --------------------------------------------------------------------------------- own pseudo-terminals --


def _ptypair_ok(out: Path, n: int) -> None:
    text = out.read_text()
    assert text.endswith("done\n"), text[-200:]
    assert "BAD" not in text, [x for x in text.splitlines() if "BAD" in x][:5]
    got = [int(x) for x in re.findall(r"got in (\d+)", text)]
    assert got == list(range(1, n + 1)), "an answer was lost or duplicated"
    # every typed line is echoed once (an answer may come between a typed line and its newline's echo)
    echoed = [int(x) for x in re.findall(r"(?<!got )in (\d+)", text)]
    assert echoed == list(range(1, n + 1)), "an echo was lost or duplicated"


@pytest.fixture(scope="session")
def ptypair(build_dir):
    return compile_c(build_dir, "ptypair")


def _pty_state(images) -> list[dict]:
    """The pty objects stored in checkpoint images (as hpcckpt inspect shows them)."""
    import json
    found = []
    for img in images:
        r = subprocess.run([str(Path(sys.executable).parent / "hpcckpt"), "inspect", "--json", str(img)],
                           capture_output=True, text=True, check=True)

        def walk(o):
            if isinstance(o, dict):
                if o.get("kind") == "pty":
                    found.append(o)
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
        walk(json.loads(r.stdout))
    return found


@pytest.mark.slow
def test_ptypair_killed_and_restarted_twice(launch, env, tmp_path, ptypair):
    """Checkpoint with typed lines queued at the slave and answers queued at the master, kill, restart; again
    from the restarted job; every answer and every echo exactly once, the pty still the child's terminal."""
    from conftest import newest_images
    out = tmp_path / "out.txt"
    n = 300          # the checks need 80 answers; typing twice as fast as the child reads keeps lines queued
    job = launch(ptypair, out, n)
    wait_for(lambda: "got in 40\n" in out.read_text() if out.exists() else False, 30, "progress")
    checkpoint_and_kill(job)
    st = _pty_state(newest_images(tmp_path))
    assert len(st) == 1 and st[0]["sid"] and st[0]["fg"] == st[0]["sid"], st
    assert st[0]["bytes"][0] > 0, "nothing was queued at the slave: the test does not test the queues"
    script = tmp_path / "dmtcp_restart_script.sh"
    job2 = restart_in_background(script, env, tmp_path)
    k = out.read_text().count("got in")
    wait_for(lambda: out.read_text().count("got in") >= k + 40, 30, "progress after the restart")
    checkpoint_and_kill(job2)
    r = run(["bash", str(script), "--coord-port", "0"], env, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    _ptypair_ok(out, n)


@pytest.mark.slow
def test_ptypair_goes_on_after_checkpoints(launch, tmp_path, ptypair):
    """Three checkpoints of a running job (the queues are read and put back each time): nothing lost or
    duplicated in the job that goes on."""
    out = tmp_path / "out.txt"
    n = 300          # the third checkpoint comes at answer 120: the child still has lines queued to read
    job = launch(ptypair, out, n)
    for i in range(3):
        want = f"got in {40 * (i + 1)}\n"
        wait_for(lambda: want in out.read_text() if out.exists() else False, 30, "progress")
        r = job.command("-bc")
        assert r.returncode == 0, (r.stdout, r.stderr)
    assert job.wait(60) == 0
    _ptypair_ok(out, n)


@pytest.mark.slow
def test_hung_up_pty(launch, env, tmp_path):
    """A slave whose master was closed, and /dev/tty on it, come back hung up (end of file, EIO)."""
    out = tmp_path / "out.txt"
    n = 300
    job = launch(sys.executable, Path(__file__).parent / "programs" / "hungpty.py", out, n)
    wait_for(lambda: out.exists() and out.read_text().count("tick") >= 20, 30, "progress")
    checkpoint_and_kill(job)
    r = run(["bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0"], env, tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[-1] == "done" and not [x for x in lines if "BAD" in x], [x for x in lines if "BAD" in x][:3]
    assert [int(x.split()[1]) for x in lines[:-1]] == list(range(1, n + 1))


@pytest.mark.slow
def test_ptypair_as_unprivileged_user(sandbox, build_dir):
    """As an ordinary user (no TIOCSTI on a terminal that is not one's own): the unread input goes back
    through the master; still every answer and echo exactly once."""
    import shutil
    from test_unprivileged import _cycle, _run
    local = sandbox / "bin" / "ptypair"
    shutil.copy(compile_c(build_dir, "ptypair"), local)
    work = sandbox / "work"
    for f in work.glob("ckpt_*"):
        shutil.rmtree(f)
    out = work / "ptypair.txt"
    _cycle(sandbox, [str(local), str(out), "300"], out, 60)
    r = _run(["bash", str(work / "dmtcp_restart_script.sh"), "--coord-port", "0"], sandbox, timeout=60)
    assert r.returncode == 0, r.stderr
    _ptypair_ok(out, 300)


# engine level: the queues of a real pseudo-terminal of this process

_SNIPPET = r"""
import base64, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from hpcckpt.engine.fds.terminals import ptys
m, s = os.openpty()
t = ptys.get_termios(m)
os.write(m, base64.b64decode(sys.argv[2]))           # typed at the terminal
os.write(s, b"answer\n")                             # written by the program, not read by the master yet
time.sleep(0.1)
os.set_blocking(m, False)
inp, direct, out = ptys._drain_and_put_back(m, s, t)
try:
    again = os.read(m, 4096)                          # nothing more may be echoed
except BlockingIOError:
    again = b""
lines = [os.read(s, 4096) for _ in range(int(sys.argv[3]))]
t2 = dict(t, lflag=t["lflag"] & ~ptys.termios.ICANON, cc=list(t["cc"]))
t2["cc"][ptys.termios.VMIN] = t2["cc"][ptys.termios.VTIME] = 0
ptys.set_termios(s, t2)
rest = os.read(s, 4096)
print(json.dumps({k: base64.b64encode(v).decode() for k, v in
                  dict(again=again, rest=rest, out=out, **{f"l{i}": x for i, x in enumerate(lines)}).items()}))
"""


@pytest.mark.parametrize("tiocsti", [True, False], ids=["tiocsti", "through-master"])
def test_pty_queues_put_back_exactly(tiocsti):
    """Two lines (one typed with CR), a line ended by EOF, an empty EOF and an unfinished line with an erase
    read back identically after the dump took them; the unread output (with the echo) is still there.
    Without CAP_SYS_ADMIN (TIOCSTI refused) the input goes through the master instead."""
    import json
    if os.geteuid() != 0:
        pytest.skip("needs root")
    typed = b"one\rtwo\nthree\x04\x04four\x7fR"
    cmd = [sys.executable, "-c", _SNIPPET, str(REPO), base64.b64encode(typed).decode(), "4"]
    if not tiocsti:
        cmd = ["setpriv", "--bounding-set", "-sys_admin", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    got = {k: base64.b64decode(v) for k, v in json.loads(r.stdout).items()}
    assert got["out"].count(b"answer\r\n") == 1 and b"three" in got["out"]   # the echo and the answer
    assert got["again"] == got["out"], "unread output changed or was echoed again"
    assert [got[f"l{i}"] for i in range(4)] == [b"one\n", b"two\n", b"three", b""]
    assert got["rest"] == b"fouR"


_BIG_SNIPPET = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from hpcckpt.engine.fds.terminals import ptys
m, s = os.openpty()
t = ptys.get_termios(m)
os.set_blocking(m, False)
os.set_blocking(s, False)
data = b"".join(b"line %05d\n" % i for i in range(1600)) + b"unfinished"
echo = b""
def drain_echo():
    global echo
    try:
        echo += os.read(m, 65536)
    except BlockingIOError:
        pass
done = 0
while done < len(data):                             # typed far ahead: most of it waits in the flip buffers
    try:
        done += os.write(m, data[done:done + 100])
    except BlockingIOError:
        drain_echo()
        time.sleep(0.01)
idle = 0
while idle < 20:                                    # until the line discipline has echoed all it holds
    n = len(echo)
    drain_echo()
    idle = idle + 1 if len(echo) == n else 0
    time.sleep(0.01)
inp, direct, out = ptys._drain_and_put_back(m, s, t)
assert out == b"", out                              # the echo so far was read before
assert 0 < direct < len(inp), (direct, len(inp))
got, idle = b"", 0
while idle < 50:                                    # the program reads everything
    try:
        got += os.read(s, 65536)
        idle = 0
    except BlockingIOError:
        time.sleep(0.01)
        idle += 1
    drain_echo()
assert got == data[:-10], (len(got), len(data))
assert echo == data.replace(b"\n", b"\r\n"), (len(echo), echo[-100:])   # every byte echoed exactly once
print("ok")
"""


def test_pty_input_beyond_the_line_discipline():
    """17 KB typed ahead (the line discipline holds 4 KB, the rest waits in the flip buffers): all of it is read
    back in order after the dump took it, and echoed exactly once."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    r = subprocess.run([sys.executable, "-c", _BIG_SNIPPET, str(REPO)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ----------------------------------------------------------------------------------- launching terminal --

class Term:
    """A pseudo-terminal made here, with a command running in it as its session leader (controlling terminal),
    like a user's shell window."""

    def __init__(self, cmd, env, cwd: Path, rows: int, cols: int, err: Path):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))
        self.proc = subprocess.Popen(["setsid", "-c", *map(str, cmd)], stdin=slave, stdout=slave,
                                     stderr=open(err, "w"), env=env, cwd=cwd)
        os.close(slave)
        self.buf = b""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 15) -> re.Match:
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} on the terminal; it shows {self.buf[-500:]!r}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.1))
            if r:
                try:
                    self.buf += os.read(self.master, 4096)
                except OSError:                 # EIO: every slave descriptor is closed
                    time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def terms():
    made: list[Term] = []

    def _make(*a, **kw) -> Term:
        t = Term(*a, **kw)
        made.append(t)
        return t
    yield _make
    for t in made:
        t.close()


@pytest.fixture(scope="session")
def ttyprog(build_dir):
    return compile_c(build_dir, "ttyprog")


_STATE = r"state echo=(\d) icanon=(\d) opost=(\d) fg=(\d) tty=(\d) size=(\d+)x(\d+) winch=(\d+)"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["noecho", "raw"])
def test_launching_terminal_settings_follow_the_restart(mode, env, tmp_path, ttyprog, terms):
    """Launched in one terminal (24x80), restarted in another (30x100): the program's echo/canonical/output
    settings are those it made, it is in the foreground, /dev/tty works, one SIGWINCH told it of the new size;
    typed lines are answered (and not echoed) both before and after."""
    eol = "\r"
    t1 = terms(["dmtcp_launch", "-p", "0", "--port-file", tmp_path / "port", "--ckptdir", tmp_path, ttyprog, mode],
               env, tmp_path, 24, 80, tmp_path / "launch.err")
    t1.expect("ready")
    t1.type("hello" + eol)
    t1.expect("got HELLO")
    t1.type("state" + eol)
    before = t1.expect(_STATE).groups()
    want = (b"0", b"1", b"1") if mode == "noecho" else (b"0", b"0", b"0")
    assert before == (*want, b"1", b"1", b"24", b"80", b"0")
    assert b"hello" not in t1.buf
    r = run(["dmtcp_command", "--port-file", str(tmp_path / "port"), "-bc"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    run(["dmtcp_command", "--port-file", str(tmp_path / "port"), "-k"], env, tmp_path)
    t1.proc.wait(20)

    t2 = terms(["bash", tmp_path / "dmtcp_restart_script.sh", "--coord-port", "0"], env, tmp_path, 30, 100,
               tmp_path / "restart.err")
    wait_for(lambda: "restored" in (tmp_path / "restart.err").read_text(), 20, "the restart")
    t2.type("again" + eol)
    t2.expect("got AGAIN")
    t2.type("state" + eol)
    after = t2.expect(_STATE).groups()
    assert after == (*want, b"1", b"1", b"30", b"100", b"1"), after
    t2.type("tty" + eol)
    t2.expect("via-tty")
    t2.type("quit" + eol)
    t2.expect("bye")
    assert t2.proc.wait(20) == 0
    assert b"again" not in t2.buf.lower().replace(b"got again", b"")
    assert "Traceback" not in (tmp_path / "restart.err").read_text()


@pytest.mark.slow
def test_shell_and_script_in_the_terminal(env, tmp_path, ttyprog, terms):
    """A terminal session as a user has it: `script` (a pty of the job's own) running an interactive bash with
    job control, which runs ttyprog in the foreground. After a restart in a bigger terminal, script passes the
    new size on (it reads SIGWINCH from a signalfd) and ttyprog sees it, keeps its settings, foreground and
    /dev/tty (on the job's pty); after it quits, the shell goes on and exits."""
    import shutil
    if shutil.which("script") is None:
        pytest.skip("needs script(1)")
    t1 = terms(["dmtcp_launch", "-p", "0", "--port-file", tmp_path / "port", "--ckptdir", tmp_path, "script", "-q",
                "-c", "bash --norc --noprofile -i", "/dev/null"], env, tmp_path, 24, 80, tmp_path / "launch.err")
    t1.expect(r"[#$] ")
    t1.type(f"{ttyprog} noecho\r")
    t1.expect("ready")
    t1.type("state\r")
    assert t1.expect(_STATE).groups() == (b"0", b"1", b"1", b"1", b"1", b"24", b"80", b"0")
    r = run(["dmtcp_command", "--port-file", str(tmp_path / "port"), "-bc"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    run(["dmtcp_command", "--port-file", str(tmp_path / "port"), "-k"], env, tmp_path)
    t1.proc.wait(20)
    t2 = terms(["bash", tmp_path / "dmtcp_restart_script.sh", "--coord-port", "0"], env, tmp_path, 30, 100,
               tmp_path / "restart.err")
    wait_for(lambda: "restored" in (tmp_path / "restart.err").read_text(), 20, "the restart")
    t2.type("again\r")
    t2.expect("got AGAIN")
    t2.type("state\r")
    assert t2.expect(_STATE).groups() == (b"0", b"1", b"1", b"1", b"1", b"30", b"100", b"1")
    t2.type("tty\r")
    t2.expect("via-tty")
    t2.type("quit\r")
    t2.expect("bye")
    t2.type("echo shell-$((6*7))\r")
    t2.expect("shell-42")
    t2.type("exit\r")
    assert t2.proc.wait(20) == 0
    assert "Traceback" not in (tmp_path / "restart.err").read_text()


@pytest.mark.slow
def test_restart_without_a_terminal(env, tmp_path, ttyprog, terms):
    """Launched in a terminal, restarted with /dev/null as standard input and no controlling terminal: it
    restarts (the program sees end of input and exits); /dev/tty is /dev/null, with a warning."""
    t1 = terms(["dmtcp_launch", "-p", "0", "--port-file", tmp_path / "port", "--ckptdir", tmp_path, ttyprog,
                "noecho"], env, tmp_path, 24, 80, tmp_path / "launch.err")
    t1.expect("ready")
    r = run(["dmtcp_command", "--port-file", str(tmp_path / "port"), "-bc"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    run(["dmtcp_command", "--port-file", str(tmp_path / "port"), "-k"], env, tmp_path)
    t1.proc.wait(20)
    r = run(["setsid", "bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0"], env, tmp_path,
            timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "/dev/null" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------- inotify --

@pytest.fixture(scope="session")
def inotifywatch(build_dir):
    return compile_c(build_dir, "inotifywatch")


def _events(out: Path) -> list[tuple[int, str]]:
    return [(int(x.split()[1]), x.split()[3]) for x in out.read_text().splitlines() if x.startswith("event")]


@pytest.mark.slow
def test_inotify_watches_keep_their_numbers(launch, env, tmp_path, inotifywatch):
    """Watches 1 and 3 (2 removed) come back as 1 and 3: on the very directory although it was renamed
    before the restart; a second round from the restarted job too."""
    w = tmp_path / "w"
    for d in "abc":
        (w / d).mkdir(parents=True)
    out = tmp_path / "out.txt"
    job = launch(inotifywatch, w, out)
    wait_for(lambda: out.exists() and "ready 1 3\n" in out.read_text(), 20, "the watches")
    (w / "a" / "before").write_text("x")
    wait_for(lambda: (1, "before") in _events(out), 10, "the first event")
    checkpoint_and_kill(job)
    (w / "c").rename(w / "c2")
    script = tmp_path / "dmtcp_restart_script.sh"
    job2 = restart_in_background(script, env, tmp_path)
    (w / "a" / "x1").write_text("x")
    (w / "b" / "unwatched").write_text("x")
    (w / "c2" / "y1").write_text("x")
    wait_for(lambda: {(1, "x1"), (3, "y1")} <= set(_events(out)), 10, "events after the restart")
    checkpoint_and_kill(job2)
    job3 = restart_in_background(script, env, tmp_path)
    (w / "c2" / "y2").write_text("x")
    (w / "a" / "stop").write_text("x")
    assert job3.wait(20) == 0
    text = out.read_text()
    assert text.endswith("done\n") and "BAD" not in text, text
    ev = _events(out)
    assert {wd for wd, _ in ev} == {1, 3}, ev
    assert [n for wd, n in ev if wd == 1 and n != "-"] == ["before"] * 2 + ["x1"] * 2 + ["stop"]
    assert [n for wd, n in ev if wd == 3] == ["y1", "y1", "y2", "y2"]


@pytest.mark.slow
def test_inotify_watched_directory_gone(launch, env, tmp_path, inotifywatch):
    """A watched directory deleted between checkpoint and restart: the restart goes on with a warning, the
    other watch keeps its number 3."""
    w = tmp_path / "w"
    for d in "abc":
        (w / d).mkdir(parents=True)
    out = tmp_path / "out.txt"
    job = launch(inotifywatch, w, out)
    wait_for(lambda: out.exists() and "ready 1 3\n" in out.read_text(), 20, "the watches")
    checkpoint_and_kill(job)
    (w / "a").rmdir()
    job2 = restart_in_background(tmp_path / "dmtcp_restart_script.sh", env, tmp_path)
    (w / "c" / "z").write_text("x")
    (w / "c" / "stop").write_text("x")
    assert job2.wait(20) == 0
    assert [n for wd, n in _events(out)] == ["z", "z", "stop"]
    assert {wd for wd, _ in _events(out)} == {3}
    err = "".join(p.read_text() for p in tmp_path.glob("restart.*.err"))
    assert "not re-armed" in err or "no name" in err, err


@pytest.mark.slow
def test_inotify_as_unprivileged_user(sandbox, build_dir):
    """As an ordinary user (no open_by_handle_at) the watched directories are found by searching from the
    job's working directory: the watches come back as 1 and 3."""
    import shutil
    from test_unprivileged import NOBODY, _cycle, _env
    local = sandbox / "bin" / "inotifywatch"
    shutil.copy(compile_c(build_dir, "inotifywatch"), local)
    work = sandbox / "work"
    for f in work.glob("ckpt_*"):
        shutil.rmtree(f)
    w = work / "w"
    shutil.rmtree(w, ignore_errors=True)
    for d in "abc":
        (w / d).mkdir(parents=True)
    for d in (w, *w.iterdir()):
        os.chown(d, NOBODY, NOBODY)
    out = work / "inotify.txt"
    out.unlink(missing_ok=True)
    _cycle(sandbox, [str(local), str(w), str(out)], out, 1)
    port = work / "port"
    port.unlink(missing_ok=True)
    p = subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--",
                          "bash", str(work / "dmtcp_restart_script.sh"), "--coord-port", "0", "--port-file",
                          str(port)], env=_env(sandbox), cwd=work, stdout=subprocess.DEVNULL,
                         stderr=open(work / "restart.err", "w"))
    try:
        wait_for(lambda: "restored" in (work / "restart.err").read_text(), 30, "the restart")
        (w / "c" / "y").write_text("x")
        (w / "a" / "x").write_text("x")
        (w / "a" / "stop").write_text("x")
        assert p.wait(20) == 0, (work / "restart.err").read_text()
    finally:
        if p.poll() is None:
            p.kill()
    assert _events(out) == [(3, "y"), (3, "y"), (1, "x"), (1, "x"), (1, "stop")], out.read_text()
