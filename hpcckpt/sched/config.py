"""The batch-job configuration (YAML), shared by every scheduler adapter. Every key has a default; a wrong key
or type is an error at submit time, naming the key and the file (configs/ has documented examples)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


PREEMPT_ACTIONS = ("requeue", "checkpoint", "ignore")


@dataclass
class JobConfig:
    ckptdir: str | None = None          # default: <submit dir>/hpcckpt-<job id>
    interval: int = 0                   # periodic checkpoints (seconds, 0 = off)
    keep: int = 2                       # complete checkpoints kept
    compress: bool = False              # zstd (see hpcckpt/settings.py for why it is off by default)
    lead: int | str = "auto"            # seconds before the wall-time limit to checkpoint; "auto": from the
                                        # last checkpoint's duration (x3, + 30 s), at least min_lead
    min_lead: int = 60                  # the least lead, whatever "auto" computes (seconds)
    max_restarts: int = 20              # runs after the first; then the job is not requeued again
    requeue: bool = True                # requeue before the limit (else: checkpoint and let it end)
    on_preempt: str = "requeue"         # SIGTERM that is not a cancel: requeue | checkpoint | ignore
    pre_checkpoint: str | None = None   # shell command run before each deadline/preemption checkpoint
    post_restart: str | None = None     # shell command run after each restart from a checkpoint
    signal: str = "USR1"                # the early-warning signal requested from the scheduler
    forward_warning_signal: bool = False  # the program gets the scheduler's warning signals (else it starts
                                        # with them ignored: Grid Engine sends them to every process of the job)
    checkpoint_timeout: int = 0         # seconds a deadline checkpoint may take (0: until 5 s before the limit)
    gather: bool = False                # a rerun on fewer nodes than the checkpoint ran on: put several nodes'
                                        # parts on one (false: stop with an error)
    engine: str = "ptrace"              # "signal": the program writes its own restart files (docs/applevel.md)
    application: dict = field(default_factory=dict)   # engine signal: signal, command, files, settle, timeout, restart
    extra: dict = field(default_factory=dict)

    def lead_seconds(self, last_checkpoint_s: float | None) -> int:
        if self.lead != "auto":
            return int(self.lead)
        if last_checkpoint_s is None:
            return self.min_lead
        return max(self.min_lead, int(3 * last_checkpoint_s + 30))

    def to_yaml(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return yaml.safe_dump(d, sort_keys=False)


_FIELDS = {f.name: f for f in dataclasses.fields(JobConfig) if f.name != "extra"}


def _check(name: str, value, where: str):
    t = str(_FIELDS[name].type)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{where}: {name} must not be empty")
    if name == "application":          # (hpcckpt/applevel/config.py)
        from ..applevel.config import check_job_section
        try:
            return check_job_section(value, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if name == "engine" and value not in ("ptrace", "signal"):
        raise ConfigError(f"{where}: engine must be ptrace or signal, got {value!r}")
    if name == "lead":
        if value == "auto":
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ConfigError(f"{where}: lead must be 'auto' or a number of seconds, got {value!r}")
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: {name} must be a whole number >= 0, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
    if name == "on_preempt" and value not in PREEMPT_ACTIONS:
        raise ConfigError(f"{where}: on_preempt must be one of {', '.join(PREEMPT_ACTIONS)}, got {value!r}")
    if name == "signal":
        import signal as _s
        v = value.upper().removeprefix("SIG")
        if not hasattr(_s, "SIG" + v):
            raise ConfigError(f"{where}: signal {value!r} is not a signal name")
        return v
    return value


def load(path: str | None) -> JobConfig:
    if not path:
        return JobConfig()
    from ..settings import SettingsError, read_config_text, yaml_error_line
    try:
        data = yaml.safe_load(read_config_text(path, "job config")) or {}
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(yaml_error_line(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(_FIELDS))})")
        values[name] = _check(name, value, path)
    cfg = JobConfig(**values)
    if cfg.ckptdir:
        cfg.ckptdir = os.path.expanduser(cfg.ckptdir)
    return cfg
