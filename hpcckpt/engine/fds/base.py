"""The contract of an fd kind, as CRIU's `struct file_desc_ops`: what the fd table (fdtable.py) asks of each
kind, and nothing else. A kind is a class; the table calls it, never an instance.

Required: `KIND` (the name in images), `matches(entry)` (is this descriptor mine?), `dump(ctx, oid, ofd)`
(save one open file description - every descriptor of `ofd` shares it - as a typed record of image/fdstate.py
with ctx.add), `create(factory, state)` (make the object again in the agent from its record; returns an fd).
A kind whose objects only come from another kind's dump (a pipe's inode, a pty pair, the launching terminal)
sets DERIVED and needs only `create` (which may refuse: such an object is never handed out on its own).

Optional hooks, no-ops by default: `describe(entry)` (what a descriptor nobody can save is, for the refusal
message), `reset()` (drop per-scan caches before a dump), `dump_computation(ctx, pids, stdio, records)` (state
behind no one descriptor, after every descriptor is dumped), `prepare(factory)` (make objects that must be made
together before any is handed out), `cleanup(factory)` (close what the kind kept once the restore is done).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ...image.records import FdRecord
    from .entry import DumpContext, FdEntry
    from .fdtable import ObjectFactory


class FdKind:
    KIND: ClassVar[str] = ""
    DERIVED: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.KIND:
            raise TypeError(f"fd kind {cls.__name__} has no KIND")
        required = ("create",) if cls.DERIVED else ("matches", "dump", "create")
        missing = [m for m in required if cls.__dict__.get(m) is None]
        if missing:
            raise TypeError(f"fd kind {cls.__name__} ({cls.KIND}) does not define {', '.join(missing)}")

    # ------------------------------------------------------------------------------------------ required --
    @staticmethod
    def matches(e: FdEntry) -> bool:
        return False                     # (DERIVED kinds: no descriptor is theirs)

    @staticmethod
    def dump(ctx: DumpContext, oid: str, ofd: list[FdEntry]) -> None:
        raise NotImplementedError

    @staticmethod
    def create(factory: ObjectFactory, state: Any) -> int:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- hooks --
    @staticmethod
    def describe(e: FdEntry) -> str | None:
        return None

    @staticmethod
    def reset() -> None:
        pass

    @staticmethod
    def dump_computation(ctx: DumpContext, pids: list[int], stdio: list[FdEntry],
                         records: dict[int, list[FdRecord]]) -> None:
        pass

    @staticmethod
    def prepare(factory: ObjectFactory) -> None:
        pass

    @staticmethod
    def cleanup(factory: ObjectFactory) -> None:
        pass
