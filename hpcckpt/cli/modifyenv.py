"""--modify-env: <ckptdir>/dmtcp_env.txt says how the restarted processes' environment changes (DMTCP's format):

    NAME=VALUE      set NAME (VALUE may use $VAR / ${VAR} of the restart's own environment, e.g. DISPLAY=$DISPLAY)
    NAME            unset NAME
    # comment       (and blank lines) ignored

This module reads the file into changes; applying them inside the restored processes is the plugin mechanism's
job (Settings.modify_env tells it to)."""
from __future__ import annotations

import os
import re

ENV_FILE = "dmtcp_env.txt"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REF = re.compile(r"\$(\w+|\{\w+\})")


class EnvFileError(ValueError):
    pass


def parse(text: str, environ: dict | None = None, where: str = ENV_FILE) -> dict[str, str | None]:
    """NAME -> new value, or None for unset; in the file's order."""
    environ = os.environ if environ is None else environ
    out: dict[str, str | None] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip()
        if not _NAME.match(name):
            raise EnvFileError(f"{where} line {n}: {name!r} is not a variable name")
        out[name] = _REF.sub(lambda m: environ.get(m.group(1).strip("{}"), ""), value) if eq else None
    return out


def read(ckptdir: str, environ: dict | None = None) -> dict[str, str | None]:
    path = os.path.join(ckptdir, ENV_FILE)
    try:
        with open(path) as f:
            return parse(f.read(), environ, path)
    except FileNotFoundError:
        return {}
