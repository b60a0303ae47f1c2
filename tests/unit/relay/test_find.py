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
