"""How an agent finds its node's relay (hpcckpt/relay/find.py): only a port file it can trust, without processes
(a listening socket stands for the relay)."""
from __future__ import annotations

import os
import socket

import pytest

from hpcckpt.relay import find


@pytest.fixture
def listening(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCCKPT_RUNDIR", str(tmp_path / "run"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    yield s.getsockname()[1], find.port_file("10.0.0.1", 7000)
    s.close()


def test_our_port_file_names_the_relay_and_the_node(listening):
    port, pf = listening
    assert os.uname().nodename in os.path.basename(pf)
    with open(pf, "w") as f:
        f.write(f"{port} 123\n")
    os.chmod(pf, 0o600)
    assert find.running_relay("10.0.0.1", 7000) == ("127.0.0.1", port)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_port_file_of_another_uid_is_ignored(listening):
    port, pf = listening
    with open(pf, "w") as f:
        f.write(f"{port}\n")
    os.chown(pf, 65534, 65534)
    assert find.running_relay("10.0.0.1", 7000) is None


def test_a_port_file_others_can_write_is_ignored(listening):
    port, pf = listening
    with open(pf, "w") as f:
        f.write(f"{port}\n")
    os.chmod(pf, 0o666)
    assert find.running_relay("10.0.0.1", 7000) is None


def test_a_symlink_at_the_port_file_is_not_followed(listening, tmp_path):
    port, pf = listening
    target = tmp_path / "elsewhere"
    target.write_text(f"{port}\n")
    os.chmod(target, 0o600)
    os.symlink(target, pf)
    assert find.running_relay("10.0.0.1", 7000) is None


@pytest.mark.parametrize("text", ["", "junk\n", "70000\n", "-5\n"])
def test_a_port_file_with_no_valid_port_is_ignored(listening, text):
    _, pf = listening
    with open(pf, "w") as f:
        f.write(text)
    os.chmod(pf, 0o600)
    assert find.running_relay("10.0.0.1", 7000) is None


def test_starts_lock_the_run_directory_or_else_a_lock_file_of_ours(tmp_path, monkeypatch):
    """The lock leaves no file where the run directory can be flocked; where it cannot (NFS), a 0600 lock file."""
    import fcntl
    monkeypatch.setenv("HPCCKPT_RUNDIR", str(tmp_path / "run"))
    pf = find.port_file("10.0.0.1", 7000)
    fd = find._lock(pf)
    os.close(fd)
    assert os.listdir(tmp_path / "run") == []
    real = fcntl.flock

    def no_dir_locks(fd, op):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(9, "Bad file descriptor")
        return real(fd, op)
    monkeypatch.setattr(fcntl, "flock", no_dir_locks)
    fd = find._lock(pf)
    os.close(fd)
    assert os.listdir(tmp_path / "run") == [os.path.basename(pf) + ".lock"]
    assert os.stat(pf + ".lock").st_mode & 0o777 == 0o600
