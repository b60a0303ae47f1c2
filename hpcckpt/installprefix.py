"""DMTCP's --prefix / DMTCP_PREFIX_PATH: where hpcckpt is installed on the other hosts of a computation (and for
its restart script), when that is not the same path as here. The prefix is an installation's root (a venv, or
what `pip install --prefix` made): PREFIX/bin holds its python and the hpcckpt commands."""
from __future__ import annotations

import os
import sys

ENV = "DMTCP_PREFIX_PATH"


def prefix() -> str | None:
    v = os.environ.get(ENV, "").strip()
    return v.rstrip("/") or None if v else None


def remote_python() -> str:
    """The python that runs hpcckpt on another host: PREFIX/bin/python, else the one our shims were told (the
    job's HPCCKPT_PYTHON), else ours (same path everywhere, the usual cluster installation)."""
    p = prefix()
    if p:
        return f"{p}/bin/python"
    return os.environ.get("HPCCKPT_PYTHON") or sys.executable


def command(name: str, default: str) -> str:
    """An hpcckpt command (name) as a restart script should run it: PREFIX/bin/NAME, else default."""
    p = prefix()
    return f"{p}/bin/{name}" if p else default
