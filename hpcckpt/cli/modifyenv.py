"""--modify-env: <ckptdir>/dmtcp_env.txt says how the restarted processes' environment changes (DMTCP's format,
read by engine/environ.py's parse_env_file, the one parser of it). Applying the changes inside the restored
processes is the shipped ModifyEnv plugin's job (plugins/builtin.py; Settings.modify_env loads it)."""
from __future__ import annotations

import os

from ..engine.environ import ENV_FILE, EnvFileError, parse_env_file

__all__ = ["ENV_FILE", "EnvFileError", "parse", "read"]

parse = parse_env_file


def read(ckptdir: str, environ: dict | None = None) -> dict[str, str | None]:
    """The changes of <ckptdir>/dmtcp_env.txt ({} if there is none)."""
    path = os.path.join(ckptdir, ENV_FILE)
    try:
        with open(path) as f:
            return parse_env_file(f.read(), environ, path)
    except FileNotFoundError:
        return {}
