"""Issue 18's structure check, in the suite too (make lint runs it before pytest): no import cycle between
hpcckpt's modules (function-level imports count), no module over 600 lines. The checker itself is tested on a
small package with a cycle hidden in a function."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import check_structure  # noqa: E402


def test_hpcckpt_has_no_import_cycle_and_no_long_module(capsys):
    assert check_structure.main([]) == 0, capsys.readouterr().out


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "hpcckpt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    mods = check_structure.module_files(tmp_path)
    assert check_structure.cycles(check_structure.edges(mods)) == [["hpcckpt.sub.a", "hpcckpt.sub.b"]]
