"""How image bytes reach the file: positioned writes that finish what they start, write-behind through the page
cache, and a direct-I/O descriptor for large page data (format.ImageWriter)."""
from __future__ import annotations

import ctypes
import os

DIRECT_MIN = 4 << 20                   # raw data written by one call (a full chunk) goes around the page cache;
#                                        smaller writes (small images) are left to the page cache, whose
#                                        writeback batches them (commit_images)

ZEROS = memoryview(bytes(4096))     # padding after a compressed chunk
_IOV_MAX = 1024


def open_direct(fd: int) -> int:
    """A second descriptor of the file open at fd (the same inode, reopened through /proc, never by its name),
    with O_DIRECT; -1 where the file system has none (tmpfs: EINVAL). (Off by Settings.direct_io: the writer's
    direct=False never calls this.)"""
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def pwritev_all(fd: int, buffers: list, off: int, rest_fd: int = -1) -> None:
    """Write buffers back to back at off (a few at a time within IOV_MAX; short writes continued, through
    rest_fd if given: the rest of a short direct write is no longer aligned)."""
    for i in range(0, len(buffers), _IOV_MAX):
        group = [memoryview(b) for b in buffers[i:i + _IOV_MAX]]
        want = sum(len(b) for b in group)
        done = os.pwritev(fd, group, off)
        if done < want:                          # rare (signals, huge writes): finish the rest plainly
            rest = b"".join(group)[done:]
            pwrite_all(rest_fd if rest_fd >= 0 else fd, rest, off + done)
        off += want


def pwrite_all(fd: int, data, off: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], off + done)


_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def write_behind(fd: int, off: int, length: int) -> None:
    """Start writing [off, off+length) to disk now (a hint; errors are ignored): the final fsync then finds
    little left to do, and the dirty pages of a large image never reach the kernel's dirty limit, where its
    writer would be throttled."""
    if _sync_file_range is not None:
        _sync_file_range(fd, off, length, SYNC_FILE_RANGE_WRITE)
