"""The image writer's data path (issue 20): large raw page data goes to the disk with O_DIRECT (no page-cache copy),
falls back to the page cache where a file system has no direct I/O, images sharing one chunk pool, and images
committed together. Without processes."""
from __future__ import annotations

import ctypes
import os

import pytest

from hpcckpt.image.format import ImageReader, ImageWriter, chunk_pool, commit_images

MiB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
SYS_cachestat = 451           # (x86-64 and every other architecture: the unified syscall table, Linux 6.5)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def cached_pages(path: str) -> int:
    """Pages of the file in the page cache (cachestat(2))."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _Stat()
        if _libc.syscall(SYS_cachestat, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(st), 0) != 0:
            pytest.skip(f"no cachestat(2): {os.strerror(ctypes.get_errno())}")
        return st.cache
    finally:
        os.close(fd)


def _write(path: str, chunks: list[bytes], pool=None, durable: bool = True, direct: bool = True):
    w = ImageWriter(path, pool=pool, direct=direct)
    groups = [w.add_chunk(i * 1024, len(d) // 4096, d) for i, d in enumerate(chunks)]
    w.drain()
    w.finish({"process": {"regions": [{"chunks": [g[0].to_json() for g in groups]}]}}, durable=durable)
    return [g[0] for g in groups]


def _same(path: str, chunks, data) -> None:
    with ImageReader(path) as r:
        for c, d in zip(chunks, data):
            assert r.read_chunk(c) == d
        assert r.verify() == len(data)


@pytest.fixture
def disk_dir():
    """A directory on a disk file system (the tests' tmp_path may be tmpfs, which has no direct I/O)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="hpcckpt-wp-", dir="/var/tmp")
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@pytest.mark.parametrize("direct", ["1", "0"])
def test_large_raw_data_bypasses_the_page_cache(direct, disk_dir):
    """Settings.direct_io (HPCCKPT_DIRECT_IO) reaches the writer as direct=."""
    data = [os.urandom(4 * MiB) for _ in range(8)]
    path = os.path.join(disk_dir, "img.dmtcp")
    chunks = _write(path, data, direct=(direct == "1"))
    pages = cached_pages(path)
    if direct == "1":
        assert pages < 1024, f"{pages} pages of a 32 MiB image written with direct I/O are in the page cache"
    else:
        assert pages >= 8 * 1024
    _same(path, chunks, data)


def test_no_direct_io_falls_back_to_the_page_cache(tmp_path):
    """/dev/shm (tmpfs, a local level) has no O_DIRECT: the same image, written through the page cache."""
    d = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(d, f"hpcckpt-wp-{os.getpid()}.dmtcp")
    data = [os.urandom(4 * MiB), os.urandom(2 * MiB)]
    try:
        _same(path, _write(path, data), data)
    finally:
        os.unlink(path)


def test_images_share_a_pool_and_commit_together(disk_dir):
    """Three images written with one pool (left running for the next), none with a final name until
    commit_images(), then all of them, complete."""
    pool = chunk_pool()
    try:
        paths = [os.path.join(disk_dir, f"img{i}.dmtcp") for i in range(3)]
        data = [[os.urandom(MiB), bytes(4096) + os.urandom(4096)] for _ in paths]
        written = [_write(p, d, pool=pool, durable=False) for p, d in zip(paths, data)]
        assert sorted(os.listdir(disk_dir)) == sorted(os.path.basename(p) + ".tmp" for p in paths)
        assert not pool._shutdown, "an image shut the agent's pool down"
        commit_images(paths)
        assert sorted(os.listdir(disk_dir)) == sorted(os.path.basename(p) for p in paths)
        for p, c, d in zip(paths, written, data):
            _same(p, c, d)
    finally:
        pool.shutdown()
