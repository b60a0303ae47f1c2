"""The application-level mode's settings: checked once, and passed from a batch job's YAML to the launch."""
from __future__ import annotations

import shlex

from ..settings import Settings, SettingsError, signal_number

ENGINES = ("ptrace", "signal")
SUFFIX = ".applevel"           # an archive of restart files stands where a process image would


def enabled(s: Settings) -> bool:
    return s.engine == "signal"


def check(s: Settings) -> None:
    """SettingsError (one line, naming the key) for a configuration the mode cannot work with."""
    if s.engine not in ENGINES:
        raise SettingsError(f"engine {s.engine!r} is not one of {', '.join(ENGINES)}")
    if not enabled(s):
        return
    if not s.app_files or not s.app_files.strip():
        raise SettingsError("engine signal needs app_files (HPCCKPT_APP_FILES): the glob of the program's "
                            "restart files")
    if not s.app_command:
        try:
            signal_number(s.app_signal)
        except ValueError as e:
            raise SettingsError(f"app_signal: {e}") from None
    if not 0 < s.app_settle < 3600:
        raise SettingsError(f"app_settle must be > 0 and < 3600 seconds, got {s.app_settle}")
    if not s.app_settle < s.app_timeout < 1e6:
        raise SettingsError(f"app_timeout ({s.app_timeout} s) must be longer than app_settle "
                            f"({s.app_settle} s)")
    if s.app_timeout + s.app_settle >= s.phase_timeout:
        raise SettingsError(f"app_timeout ({s.app_timeout} s) must be shorter than phase_timeout "
                            f"({s.phase_timeout} s), which fails a round whose phase does not end")
    for name in ("app_command", "app_restart"):
        v = getattr(s, name)
        if v is not None:
            try:
                if not shlex.split(v):
                    raise ValueError("empty")
            except ValueError as e:
                raise SettingsError(f"{name} {v!r} is not a command line: {e}") from None


def globs(s: Settings) -> list[str]:
    """app_files: one or several globs separated by whitespace or ','."""
    return [g for g in (s.app_files or "").replace(",", " ").split() if g]


# The batch job's YAML (sched/config.py) names the mode in a section of its own; the launch and restart the
# driver starts read it from these variables (they pass through the driver's environment unchanged).
_JOB_KEYS = {"signal": "HPCCKPT_APP_SIGNAL", "command": "HPCCKPT_APP_COMMAND", "files": "HPCCKPT_APP_FILES",
             "settle": "HPCCKPT_APP_SETTLE", "timeout": "HPCCKPT_APP_TIMEOUT", "restart": "HPCCKPT_APP_RESTART"}


def check_job_section(value: object, where: str) -> dict:
    """The `application:` section of a batch job's YAML: a mapping of the keys above (ValueError naming one)."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: application must be a mapping of {', '.join(_JOB_KEYS)}")
    out = {}
    for k, v in value.items():
        if k not in _JOB_KEYS:
            raise ValueError(f"{where}: application: unknown key {k!r} (known: {', '.join(_JOB_KEYS)})")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"{where}: application: {k} must be a string or a number, got {v!r}")
        out[k] = str(v)
    return out


def job_environment(engine: str, section: dict) -> dict[str, str]:
    """The variables that give a batch job's launch and restart its application-level settings."""
    if engine in ("", "ptrace"):
        return {}
    env = {"HPCCKPT_ENGINE": engine}
    env.update({_JOB_KEYS[k]: str(v) for k, v in section.items()})
    return env
