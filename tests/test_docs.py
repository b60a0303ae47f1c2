"""Generated documentation stays true: docs/configuration.md is what `python -m hpcckpt.cli.configdoc` prints
(every setting, its YAML key, environment variables, flags and default)."""
from __future__ import annotations

from conftest import REPO
from hpcckpt.cli import configdoc


def test_configuration_reference_is_current():
    want = configdoc.render()
    have = (REPO / "docs" / "configuration.md").read_text()
    assert have == want, "docs/configuration.md is stale: python -m hpcckpt.cli.configdoc > docs/configuration.md"


def test_configuration_reference_names_every_setting():
    import dataclasses
    from hpcckpt.settings import Settings
    text = configdoc.render()
    for f in dataclasses.fields(Settings):
        assert f"| `{f.name}` |" in text
