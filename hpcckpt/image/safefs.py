"""Creating files safely in directories other users may share (a checkpoint directory like /tmp).

hpcckpt often runs as root and writes where users point it. Every file it creates goes through this module:

- A directory is used only through a descriptor opened with O_DIRECTORY (and O_NOFOLLOW for every name below a
  directory the user gave) and checked with fstat, the "directory rule":
      owned by us (the effective uid) or by root, and
      not writable by group or others, unless the sticky bit is set (like /tmp: others may add names but can
      neither remove nor rename ours).
  The directory a user names (--ckptdir, --port-file's directory, ...) is opened following symlinks in its path,
  except a symlink another user owns in a sticky world-writable directory (what the kernel's
  fs.protected_symlinks refuses, when on), and only if every directory its real path goes through passes the
  same rule (as OpenSSH's StrictModes), so no other user can redirect it later; every directory hpcckpt makes below it
  (ckpt_<computation>, gen<N>) is opened with O_NOFOLLOW and must pass the same rule, so a ckpt_<computation>
  pre-created by another user, or a symlink planted in its place, is refused with one line.
- A file is created relative to such a descriptor with O_CREAT|O_EXCL|O_NOFOLLOW at a random name
  (secrets.token_hex), written, fsynced, and renamed over its final name (rename replaces a directory entry and
  never follows a symlink found there); the directory is then fsynced.
- A file is read relative to a checked descriptor with O_NOFOLLOW, and must be a regular file owned by us or root.

Errors are UnsafePath (an OSError) with one line naming the path and what the user can do.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OVERFLOW_UID = 65534           # /proc/sys/kernel/overflowuid: what an unmapped owner shows as


class UnsafePath(OSError):
    """A directory or file fails the directory rule (or is a symlink where none may be)."""

    def __init__(self, msg: str):
        super().__init__(errno.EPERM, msg)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


_IN_USERNS: bool | None = None


def _in_user_namespace() -> bool:
    global _IN_USERNS
    if _IN_USERNS is None:
        try:
            with open("/proc/self/uid_map") as f:
                _IN_USERNS = f.read().split() != ["0", "0", "4294967295"]
        except OSError:
            _IN_USERNS = False
    return _IN_USERNS


def trusted_owner(uid: int) -> bool:
    """Us or root. Inside a user namespace (an unprivileged job, agent/namespaces.py) root's files show as the
    overflow uid, indistinguishable from other users' but no threat either: we are not really root there."""
    return uid in (os.geteuid(), 0) or (uid == _OVERFLOW_UID and _in_user_namespace())


def check_dir(fd: int, path: str) -> os.stat_result:
    """The directory rule on an open directory (see the module's docstring)."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is not a directory")
    if not trusted_owner(st.st_uid):
        raise UnsafePath(f"directory {path} belongs to uid {st.st_uid}, not to you: another user may control "
                         f"it; remove it or use another directory")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"directory {path} is writable by other users and not sticky: chmod go-w (or +t) it, "
                         f"or use another directory")
    return st


def _shared(st: os.stat_result) -> bool:
    return bool(st.st_mode & 0o002 and st.st_mode & stat.S_ISVTX)


def check_path(path: str) -> None:
    """The way to a directory a user named: no symlink another user planted in a sticky shared directory (the
    kernel's fs.protected_symlinks, which may be off), and every directory the real path goes through owned
    by us or root and not writable by others unless sticky, so nobody else can swap a part of it for a link
    after we looked."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        parent, p = "/" + "/".join(parts[:i - 1]), "/" + "/".join(parts[:i])
        try:
            st = os.lstat(p)
        except OSError:
            return                       # (nothing there yet: makedirs or open says what is wrong)
        if stat.S_ISLNK(st.st_mode):
            pst = os.stat(parent)
            if _shared(pst) and st.st_uid not in (os.geteuid(), pst.st_uid):
                raise UnsafePath(f"{p} is a symlink of uid {st.st_uid} in the shared directory {parent}: not "
                                 f"followed; use a path without it")
    real = os.path.realpath(path)
    rparts = real.strip("/").split("/")
    for i in range(0, len(rparts)):
        a = "/" + "/".join(rparts[:i])
        try:
            st = os.stat(a)
        except OSError:
            return
        if not trusted_owner(st.st_uid):
            raise UnsafePath(f"{path} lies in {a}, which belongs to uid {st.st_uid}: that user could redirect it; "
                             f"use a directory of yours")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePath(f"{path} lies in {a}, which other users may write to: they could redirect it; "
                             f"use a directory of yours")


def open_dir(path: str, create: bool = False, mode: int = 0o700) -> int:
    """Open (creating with its parents if asked) a directory a user named, and check it and the way to it
    (check_path). Returns an fd."""
    path = os.path.abspath(path)
    check_path(path)
    if create:
        try:
            os.makedirs(path, mode=mode, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create directory {path}: {e.strerror}") from None
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        raise OSError(e.errno, f"cannot open directory {path}: {e.strerror}") from None
    try:
        check_dir(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_subdir(dirfd: int, name: str, where: str, create: bool = False, mode: int = 0o700) -> int:
    """Open (creating if asked) the directory `name` below a checked directory, never through a symlink, and
    check it. where: the parent's path, for messages."""
    path = os.path.join(where, name)
    if create:
        try:
            os.mkdir(name, mode, dir_fd=dirfd)
        except FileExistsError:
            pass
        except OSError as e:
            raise OSError(e.errno, f"cannot create directory {path}: {e.strerror}") from None
    try:
        fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{path} is a symlink or not a directory (planted by another user?): remove it, "
                             f"or use another directory") from None
        raise OSError(e.errno, f"cannot open directory {path}: {e.strerror}") from None
    try:
        check_dir(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dirs(root: str, names: list[str], create: bool = False) -> int:
    """open_dir(root) then each of names below it, in turn; returns the last one's fd."""
    fd = open_dir(root, create=create)
    where = os.path.abspath(root)
    try:
        for n in names:
            sub = open_subdir(fd, n, where, create=create)
            os.close(fd)
            fd, where = sub, os.path.join(where, n)
    except BaseException:
        os.close(fd)
        raise
    return fd


def makedirs(path: str, mode: int = 0o700) -> None:
    """Create a directory the user named (with its parents) and check it."""
    os.close(open_dir(path, create=True, mode=mode))


def temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(8)}.tmp"


def create_file(dirfd: int, name: str, mode: int = 0o600) -> int:
    """A new file, never an existing name nor through a symlink. Returns a writable fd."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
    try:
        os.fchmod(fd, mode)           # whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_temp(dirfd: int, name: str, data: bytes, mode: int = 0o600) -> str:
    """data in a new file at a random name next to `name`, durable; returns the temporary name (rename it)."""
    tmp = temp_name(name)
    fd = create_file(dirfd, tmp, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink(dirfd, tmp)
        raise
    os.close(fd)
    return tmp


def unlink(dirfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass


def replace(dirfd: int, tmp: str, name: str) -> None:
    """Rename tmp over name in the same directory and make it durable."""
    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    os.fsync(dirfd)


def write_at(dirfd: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Atomically (re)place the file `name` of a checked directory with data."""
    tmp = write_temp(dirfd, name, data, mode)
    try:
        replace(dirfd, tmp, name)
    except BaseException:
        unlink(dirfd, tmp)
        raise


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Atomically (re)place the file at path; its directory must pass the directory rule."""
    path = os.path.abspath(path)
    fd = open_dir(os.path.dirname(path))
    try:
        write_at(fd, os.path.basename(path), data, mode)
    finally:
        os.close(fd)


def symlink_at(dirfd: int, target: str, name: str) -> None:
    """Atomically point the symlink `name` of a checked directory at target."""
    tmp = temp_name(name)
    os.symlink(target, tmp, dir_fd=dirfd)
    try:
        replace(dirfd, tmp, name)
    except BaseException:
        unlink(dirfd, tmp)
        raise


def _is_link(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_file(dirfd: int, name: str, where: str) -> int:
    """Open an existing regular file of a checked directory for reading, never through a symlink."""
    path = os.path.join(where, name)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirfd)
    except OSError:
        if _is_link(dirfd, name):
            raise UnsafePath(f"{path} is a symlink (planted by another user?): remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not trusted_owner(st.st_uid):
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file of yours (uid {st.st_uid}): remove it")
    return fd


def read_at(dirfd: int, name: str, where: str) -> bytes:
    fd = open_file(dirfd, name, where)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_file(path: str) -> bytes:
    """A file's contents, its directory checked and the file opened without following a symlink."""
    path = os.path.abspath(path)
    fd = open_dir(os.path.dirname(path))
    try:
        return read_at(fd, os.path.basename(path), os.path.dirname(path))
    finally:
        os.close(fd)


def open_append(path: str, mode: int = 0o600) -> int:
    """A log file opened for appending (created if missing): in a checked directory, never through a symlink,
    and only a regular file of ours (appending to another user's file would hand them our log)."""
    path = os.path.abspath(path)
    dfd = open_dir(os.path.dirname(path))
    try:
        try:
            fd = os.open(os.path.basename(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW |
                         os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dfd)
        except OSError:
            if _is_link(dfd, os.path.basename(path)):
                raise UnsafePath(f"{path} is a symlink (planted by another user?): remove it") from None
            raise
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file of yours (uid {st.st_uid}): remove it")
    os.set_blocking(fd, True)
    return fd
