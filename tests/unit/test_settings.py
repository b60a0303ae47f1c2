"""Settings: defaults < YAML < environment < flags, with clear errors."""
from __future__ import annotations

import pytest

from hpcckpt.settings import SettingsError, load


def test_layering(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("interval: 30\ncoord-port: 9000\ncompress: false\n")
    s = load({}, str(cfg), environ={})
    assert (s.interval, s.coord_port, s.compress) == (30, 9000, False)
    s = load({}, str(cfg), environ={"DMTCP_PORT": "9100", "DMTCP_CHECKPOINT_INTERVAL": "40"})
    assert (s.interval, s.coord_port) == (40, 9100)
    s = load({"coord_port": "9200", "interval": None}, str(cfg), environ={"DMTCP_PORT": "9100"})
    assert s.coord_port == 9200 and s.interval == 30
    assert load({}, None, environ={}).coord_port == 7779


def test_dmtcp_env_names(tmp_path):
    s = load({}, None, environ={"DMTCP_COORD_HOST": "h1", "DMTCP_GZIP": "0", "DMTCP_FAIL_RC": "42",
                                "DMTCP_SIGCKPT": "USR2", "DMTCP_CHECKPOINT_DIR": "/x"})
    assert (s.coord_host, s.compress, s.fail_rc, s.ckpt_signal, s.ckptdir) == ("h1", False, 42, 12, "/x")
    # DMTCP_COORD_HOST wins over the older DMTCP_HOST
    assert load({}, None, environ={"DMTCP_HOST": "a", "DMTCP_COORD_HOST": "b"}).coord_host == "b"


@pytest.mark.parametrize("text,msg", [("intervall: 3\n", "unknown setting 'intervall'"),
                                      ("interval: soon\n", "bad value for interval"),
                                      ("- 1\n", "mapping"), ("coord_port: 70000\n", "out of range")])
def test_bad_yaml(tmp_path, text, msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SettingsError, match=msg):
        load({}, str(cfg), environ={})


def test_bad_env():
    with pytest.raises(SettingsError, match="environment DMTCP_PORT"):
        load({}, None, environ={"DMTCP_PORT": "x"})
