"""Every error the engine raises about the computation (not the OS errors of one call: linux.PosixError,
ptrace.PtraceError). Callers above the engine catch these by name; each message is one line naming the
process, descriptor, segment or file and what the user can do."""
from __future__ import annotations


class FreezeError(RuntimeError):
    """The computation could not be stopped for a checkpoint."""


class VforkBusy(FreezeError):
    """A thread is blocked in vfork() until its child execs or exits: it cannot be stopped meanwhile."""

    def __init__(self, pid: int, tid: int, child: int, comm: str):
        self.pid, self.tid, self.child = pid, tid, child
        super().__init__(f"pid {pid} ({comm}) is in vfork(), waiting for its child {child} to exec or exit")


class ProcessGone(RuntimeError):
    """The traced thread or process exited (or was killed) while we worked on it."""


class InjectionError(RuntimeError):
    """A system call injected into a stopped thread could not be run."""


class SnapshotError(RuntimeError):
    """The forked snapshot of a process (background checkpoints) could not be made."""


class XstateMismatch(RuntimeError):
    """The image's extended register state does not fit this CPU."""


class UnsupportedFd(RuntimeError):
    """A descriptor this engine cannot checkpoint; the message names process, fd and kind."""


class UnsupportedMapping(RuntimeError):
    """A memory mapping this engine cannot checkpoint (a device's, ...)."""


class SysvError(RuntimeError):
    """A SysV shared memory segment cannot be saved or recreated; the message names it."""


class IpcError(RuntimeError):
    """A SysV semaphore set or message queue cannot be saved or recreated; the message names it."""


class ShmFileError(RuntimeError):
    """A shared memory file cannot be saved or put back; the message names it."""


class IdentityError(Exception):
    """Credentials that cannot be restored safely; one line naming the image and what to do."""


class RestoreError(RuntimeError):
    """Restore failed; the message says why (the helper processes have been killed)."""
