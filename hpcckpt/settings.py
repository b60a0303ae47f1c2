"""The one settings object: defaults < YAML file < environment < command-line flags.

Every command builds a Settings with `load(flags, config_path)`; the YAML file comes from --config or
HPCCKPT_CONFIG. DMTCP's environment variable names are honoured (DMTCP_COORD_HOST, DMTCP_PORT, ...), so
scripts written for DMTCP keep working.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 7779
DEFAULT_FAIL_RC = 99


class SettingsError(ValueError):
    """A wrong key, type or value in flags, environment or YAML; the message names where it came from."""


def _env(*names: str) -> dict:
    return {"env": names}


@dataclass
class Settings:
    # coordinator address
    coord_host: str = field(default="127.0.0.1", metadata=_env("DMTCP_COORD_HOST", "DMTCP_HOST"))
    coord_port: int = field(default=DEFAULT_PORT, metadata=_env("DMTCP_COORD_PORT", "DMTCP_PORT"))
    port_file: str | None = None
    status_file: str | None = None
    # checkpointing
    interval: int = field(default=0, metadata=_env("DMTCP_CHECKPOINT_INTERVAL"))
    ckptdir: str = field(default=".", metadata=_env("DMTCP_CHECKPOINT_DIR"))
    # Off by default, by measurement (bench/RESULTS.md): on numeric data zstd-1 saves ~5 % of the bytes but
    # costs ~0.5 GB/s of CPU per core, while the program itself runs on (forked checkpoints) - slower than
    # writing raw pages to the page cache. DMTCP_GZIP=1 / --gzip turn it on (worth it on slow filesystems and
    # compressible memory).
    compress: bool = field(default=False, metadata=_env("DMTCP_GZIP"))
    compress_level: int = field(default=1, metadata=_env("HPCCKPT_ZSTD_LEVEL"))
    keep_generations: int = field(default=2, metadata=_env("HPCCKPT_KEEP"))
    ckpt_signal: int = field(default=0, metadata=_env("DMTCP_SIGCKPT"))
    pid_namespace: bool = field(default=True, metadata=_env("HPCCKPT_PID_NAMESPACE"))
    forked: bool = field(default=True, metadata=_env("DMTCP_FORKED_CHECKPOINT"))
    incremental: bool = field(default=False, metadata=_env("HPCCKPT_INCREMENTAL"))
    full_every: int = field(default=8, metadata=_env("HPCCKPT_FULL_EVERY"))
    # incremental images read only the pages written since the last checkpoint (engine/wptrack.py)
    write_tracking: bool = field(default=True, metadata=_env("HPCCKPT_WRITE_TRACKING"))
    # failure handling
    fail_rc: int = field(default=DEFAULT_FAIL_RC, metadata=_env("DMTCP_FAIL_RC"))
    phase_timeout: float = field(default=300.0, metadata=_env("HPCCKPT_PHASE_TIMEOUT"))
    rank_wait: float = field(default=30.0, metadata=_env("HPCCKPT_RANK_WAIT"))   # for MPI ranks to join
    # the program API (hpcckpt.aware): how long a checkpoint waits for delayed_checkpoints() blocks to end, and
    # for the programs' pre_checkpoint hooks, before it goes on
    aware_delay_max: float = field(default=60.0, metadata=_env("HPCCKPT_AWARE_DELAY_MAX"))
    aware_hook_max: float = field(default=30.0, metadata=_env("HPCCKPT_AWARE_HOOK_MAX"))
    # coordinator lifetime
    exit_on_last: bool = False
    timeout: float = 0.0
    stale_timeout: float = 8 * 3600.0
    # 0: everything, 1: no notes (warnings and errors), 2: errors only (DMTCP_QUIET=0|1|2; -q, -q -q)
    quiet: int = field(default=0, metadata=_env("DMTCP_QUIET"))
    log_level: str = field(default="INFO", metadata=_env("HPCCKPT_LOG_LEVEL"))
    # --- DMTCP compatibility (docs/dmtcp-compat.md) -----------------------------------------------------------
    # save the contents of every regular file open at checkpoint (up to open_file_max_bytes each) and put them
    # back at restart (engine/openfiles.py)
    ckpt_open_files: bool = field(default=False, metadata=_env("DMTCP_CHECKPOINT_OPEN_FILES",
                                                               "DMTCP_CKPT_OPEN_FILES"))
    open_file_max_bytes: int = field(default=256 << 20, metadata=_env("HPCCKPT_OPEN_FILE_MAX_BYTES"))
    # with ckpt_open_files: a file that exists at restart with other contents is overwritten by the saved copy
    # (else the restart refuses, naming the file)
    allow_file_overwrite: bool = field(default=False, metadata=_env("DMTCP_ALLOW_FILE_OVERWRITE",
                                                                    "DMTCP_ALLOW_OVERWRITE_WITH_CKPTED_FILES"))
    # our temporary files (the log of a coordinator we start); created 0700 if missing, exported to what we start
    tmpdir: str | None = field(default=None, metadata=_env("DMTCP_TMPDIR"))
    # restart checks that refuse: image owned by another user, image of another machine architecture
    no_strict_checking: bool = field(default=False, metadata=_env("DMTCP_DISABLE_STRICT_CHECKING"))
    # 1..7: the restarted processes are left stopped for a debugger before they run (cli/dmtcpcompat.py)
    restart_pause: int = field(default=0, metadata=_env("DMTCP_RESTART_PAUSE", "MTCP_RESTART_PAUSE"))
    # every checkpoint kept under its own generation directory (none pruned)
    unique_ckpt: bool = field(default=False, metadata=_env("DMTCP_UNIQUE_CKPT_PLUGIN", "DMTCP_UNIQUE_CKPT"))
    coord_logfile: str | None = field(default=None, metadata=_env("DMTCP_COORD_LOG_FILENAME"))
    exit_after_ckpt: bool = False         # coordinator: kill the computation once a checkpoint is complete
    # plugins ("module:Class" or file paths; DMTCP_PLUGIN is colon-separated), wired by the plugin mechanism
    plugins: list = field(default_factory=list, metadata=_env("DMTCP_PLUGIN", "HPCCKPT_PLUGINS"))
    # --modify-env: apply <ckptdir>/dmtcp_env.txt (NAME=VALUE / NAME lines) to the restarted processes
    modify_env: bool = field(default=False, metadata=_env("HPCCKPT_MODIFY_ENV"))
    # --pathvirt: "OLD:NEW" path prefixes rewritten in the image's file paths at restart (DMTCP_PATH_MAPPING,
    # several separated by ';' or newlines)
    pathvirt: bool = field(default=False, metadata=_env("HPCCKPT_PATHVIRT"))
    path_prefixes: list = field(default_factory=list, metadata=_env("DMTCP_PATH_MAPPING", "HPCCKPT_PATH_PREFIXES"))

    def replace(self, **kw) -> "Settings":
        return dataclasses.replace(self, **kw)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_TRUE = {"1", "yes", "true", "on", "y"}
_FALSE = {"0", "no", "false", "off", "n", ""}


def _coerce(name: str, value: Any, source: str) -> Any:
    f = _FIELDS[name]
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if value is None:
            if "None" in typ:
                return None
            raise ValueError("a value is required")
        if name in _DMTCP_SPECIAL:
            return _DMTCP_SPECIAL[name](value)
        if typ.startswith("bool"):
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(f"expected yes/no, got {value!r}")
        if typ.startswith("int"):
            if isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            if name == "ckpt_signal" and isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                import signal
                v = value.strip().upper()
                return int(getattr(signal, v if v.startswith("SIG") else "SIG" + v))
            return int(value)
        if typ.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        return str(value)
    except (ValueError, TypeError, AttributeError) as e:
        raise SettingsError(f"{source}: bad value for {name}: {e}") from None


def _quiet(value: Any) -> int:
    """DMTCP_QUIET=0|1|2 and -q (1) / -q -q (2); yes/no still accepted."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return max(0, min(2, value))
    v = str(value).strip().lower()
    if v.isdigit():
        return max(0, min(2, int(v)))
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    raise ValueError(f"expected 0, 1 or 2, got {value!r}")


def _list_of_plugins(value: Any) -> list:
    """DMTCP_PLUGIN is a colon-separated list of paths; ours may also name "module:Class" (no '/'): entries are
    separated by ',' or whitespace, and an entry holding a '/' is further split at ':'."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v)]
    out: list[str] = []
    for tok in str(value).replace(",", " ").split():
        out.extend(p for p in (tok.split(":") if "/" in tok else [tok]) if p)
    return out


def _list_of_prefixes(value: Any) -> list:
    """OLD:NEW (or OLD=NEW) pairs, separated by ';' or newlines (DMTCP_PATH_MAPPING)."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace("\n", ";").split(";")
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        sep = "=" if "=" in item else ":"
        old, _, new = item.partition(sep)
        if not old.startswith("/") or not new.startswith("/"):
            raise ValueError(f"expected OLD:NEW absolute path prefixes, got {item!r}")
        out.append(f"{old.rstrip('/') or '/'}:{new.rstrip('/') or '/'}")
    return out


def _pause(value: Any) -> int:
    v = int(value)
    if not 0 <= v <= 7:
        raise ValueError(f"expected 0..7, got {value!r}")
    return v


_DMTCP_SPECIAL = {"quiet": _quiet, "plugins": _list_of_plugins, "path_prefixes": _list_of_prefixes,
                  "restart_pause": _pause}


def _validate(s: Settings) -> Settings:
    if s.unique_ckpt:
        s.keep_generations = 1 << 30       # DMTCP's unique checkpoint names: no checkpoint is overwritten
    if not 0 <= s.coord_port <= 65535:
        raise SettingsError(f"coordinator port {s.coord_port} is out of range 0..65535")
    if s.interval < 0:
        raise SettingsError(f"checkpoint interval must be >= 0 seconds, got {s.interval}")
    if s.keep_generations < 1:
        raise SettingsError(f"keep_generations must be >= 1, got {s.keep_generations}")
    if not 0 <= s.fail_rc <= 255:
        raise SettingsError(f"DMTCP_FAIL_RC must be 0..255, got {s.fail_rc}")
    if not 1 <= s.compress_level <= 22:
        raise SettingsError(f"compress_level must be 1..22, got {s.compress_level}")
    return s


def load_yaml(path: str) -> dict:
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise SettingsError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings at the top level")
    return data


def load(flags: dict[str, Any] | None = None, config: str | None = None,
         environ: dict[str, str] | None = None, yaml_section: dict | None = None) -> Settings:
    """Build settings. flags: values given on the command line (None = not given)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config = config or environ.get("HPCCKPT_CONFIG")
    data = yaml_section if yaml_section is not None else (load_yaml(config) if config else {})
    for key, v in data.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise SettingsError(f"{config}: unknown setting {key!r} (known: {known})")
        values[name] = _coerce(name, v, f"{config}: {key}")
    for name, f in _FIELDS.items():
        for var in f.metadata.get("env", ()):
            if var in environ and environ[var] != "":
                values[name] = _coerce(name, environ[var], f"environment {var}")
                break
    for name, v in (flags or {}).items():
        if v is not None:
            values[name] = _coerce(name, v, f"option --{name.replace('_', '-')}")
    return _validate(Settings(**values))
