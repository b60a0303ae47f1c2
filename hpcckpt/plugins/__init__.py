"""Plugins: Python classes the agent calls at the protocol's events, as DMTCP's plugins are (docs/plugins.md).

    class MyPlugin(hpcckpt.plugins.Plugin):
        def presuspend(self, ev):     # a checkpoint begins; the processes still run
        def precheckpoint(self, ev):  # every process of this agent is frozen; nothing written yet
        def resume(self, ev):         # after the checkpoint, in the run that took it
        def pre_restore(self, ev):    # before anything is restored: ev.images (the image metadata) may be changed
        def restart(self, ev):        # after a restart, processes restored and stopped, before they run;
                                      # ev.kv.publish()/query() reach every agent of the computation

Named with `--with-plugin SPEC` / `DMTCP_PLUGIN` / `HPCCKPT_PLUGINS` (comma-separated), SPEC being
`module:Class`, `/path/file.py:Class`, `/path/file.py` (its Plugin subclasses) or the name of an entry point of
group `hpcckpt.plugins`. A plugin's exception at presuspend/precheckpoint fails that checkpoint (the previous one
is kept, the job resumes); at pre_restore/restart it fails the restart before anything runs; at resume it is
logged.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

EVENTS = ("presuspend", "precheckpoint", "resume", "pre_restore", "restart")


class PluginError(RuntimeError):
    """A plugin could not be loaded, or failed at an event that must not go on without it."""


class Plugin:
    """Base class: override the events you need (each gets an Event)."""
    name = ""

    def presuspend(self, ev: Event) -> None: ...
    def precheckpoint(self, ev: Event) -> None: ...
    def resume(self, ev: Event) -> None: ...
    def pre_restore(self, ev: Event) -> None: ...
    def restart(self, ev: Event) -> None: ...


class KV:
    """The computation's key-value store at restart (the coordinator's), scoped to this restart: publish() here,
    query() anywhere waits until someone published the key; barrier(name) waits for every agent."""

    def __init__(self, agent=None):
        self.agent = agent
        self.local: dict[str, object] = {}

    def _rv(self):
        from ..agent.rendezvous import Rendezvous
        a = self.agent
        if a is None or a.conn is None:
            return None
        return Rendezvous(a.conn, a.computation or "", a.restarted_generation or 0)

    def publish(self, key: str, value) -> None:
        rv = self._rv()
        if rv is None:
            self.local[key] = value
            return
        rv.put("plugin/" + key, value)

    def query(self, key: str, timeout: float = 60.0):
        rv = self._rv()
        if rv is None:
            return self.local.get(key)
        value = rv.get("plugin/" + key, timeout)
        if rv.stash and self.agent is not None:
            self.agent.stash.extend(rv.stash)
        return value

    def barrier(self, name: str, timeout: float = 120.0) -> None:
        """Every agent of the computation reaches this point before any goes on."""
        a = self.agent
        if a is None:
            return
        self.publish(f"barrier/{name}/{a.agent_id}", True)
        for other in sorted(a.expected_agents or {a.agent_id: a.host}):
            if self.query(f"barrier/{name}/{other}", timeout) is None:
                raise PluginError(f"plugin barrier {name!r}: agent {other} did not arrive within {timeout:.0f} s")


@dataclass
class Event:
    name: str
    generation: int
    computation: str
    host: str
    agent_id: str
    pids: list[int]                       # this agent's processes (restored ones at restart, stopped)
    ckptdir: str
    kv: KV = field(default_factory=KV)
    images: list = field(default_factory=list)       # pre_restore: the ImageMeta of every image to restore
    time: float = field(default_factory=time.time)


def _from_file(path: str, cls: str | None) -> list[type]:
    spec = importlib.util.spec_from_file_location(f"hpcckpt_plugin_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if cls:
        return [getattr(mod, cls)]
    found = [c for _, c in inspect.getmembers(mod, inspect.isclass) if issubclass(c, Plugin) and c is not Plugin
             and c.__module__ == mod.__name__]
    if not found:
        raise PluginError(f"plugin {path}: no subclass of hpcckpt.plugins.Plugin in it")
    return found


def _classes(spec: str) -> list[type]:
    spec = spec.strip()
    if spec.endswith(".so") or ".so:" in spec:
        raise PluginError(f"plugin {spec}: a compiled DMTCP plugin; hpcckpt plugins are Python classes "
                          f"(docs/plugins.md)")
    path, _, cls = spec.partition(":") if ".py" in spec else (spec, "", "")
    if path.endswith(".py"):
        return _from_file(os.path.abspath(path), cls or None)
    mod_name, _, cls = spec.partition(":")
    if not cls:
        from importlib.metadata import entry_points
        eps = [e for e in entry_points(group="hpcckpt.plugins") if e.name == spec]
        if not eps:
            raise PluginError(f"plugin {spec}: give module:Class, a .py file, or an installed entry point name")
        return [eps[0].load()]
    try:
        return [getattr(importlib.import_module(mod_name), cls)]
    except (ImportError, AttributeError) as e:
        raise PluginError(f"plugin {spec}: {e}") from None


def specs_from(settings=None, environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    out = list(getattr(settings, "plugins", None) or [])
    if settings is None or not hasattr(settings, "plugins"):    # (Settings reads both variables itself)
        for var in ("HPCCKPT_PLUGINS", "DMTCP_PLUGIN"):
            out += [s for s in env.get(var, "").split(",") if s.strip()]
    if getattr(settings, "modify_env", False):      # DMTCP's --modify-env: dmtcp_env.txt at restart
        out.append("hpcckpt.plugins.builtin:ModifyEnv")
    return list(dict.fromkeys(s.strip() for s in out))


class PluginHost:
    """The loaded plugins and the calls to them, in the order they were named."""

    MUST = {"presuspend", "precheckpoint", "pre_restore", "restart"}

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins

    @classmethod
    def load(cls, specs: list[str]) -> PluginHost:
        out = []
        for spec in specs:
            try:
                for c in _classes(spec):
                    out.append(c())
            except PluginError:
                raise
            except Exception as e:
                raise PluginError(f"plugin {spec}: cannot load it: {type(e).__name__}: {e}") from None
        if out:
            log.info("plugins: %s", ", ".join(p.name or type(p).__name__ for p in out))
        return cls(out)

    def __bool__(self) -> bool:
        return bool(self.plugins)

    def call(self, event: str, ev: Event) -> None:
        for p in self.plugins:
            fn = getattr(p, event, None)
            if fn is None:
                continue
            try:
                fn(ev)
            except Exception as e:
                what = f"plugin {p.name or type(p).__name__} failed at {event}: {type(e).__name__}: {e}"
                if event in self.MUST:
                    raise PluginError(what) from None
                log.warning("%s", what)
