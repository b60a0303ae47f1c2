"""How a compressed chunk's bytes are encoded: zstd, optionally after a byte shuffle.

Numeric memory (arrays of doubles, 64-bit integers) has structure zstd cannot see byte by byte: the sign and
exponent bytes of neighbouring values repeat while the low mantissa bytes look random. Storing byte 0 of
every 8-byte word, then byte 1, ... (the "shuffle" filter of HDF5 and Blosc) puts the repeating bytes side by
side: on bench/memhog's doubles zstd-1 then saves 35 % instead of 5 % and runs at ~3 GB/s per core instead
of ~0.85 (the shuffle itself ~3 GB/s with numpy). Memory that is not numeric can compress worse shuffled, so
each chunk takes the encoding that compresses a 64 KiB sample of it better (~5 % of the work).

Shuffling needs numpy (a transpose at memory speed; a pure-Python shuffle holds the GIL at ~0.6 GB/s and
would make dumps slower): without it chunks are plain zstd. Unshuffling works without numpy (1.6 GB/s), so
any installation restores any image.

numpy is imported on first use (the first shuffled chunk, written or read), not with this module: importing it
costs ~50 ms, which every process that merely reads image metadata (the coordinator, `dmtcp_command`, the
restart of an image without shuffled chunks) would pay (issue 20: restart-to-running).
"""
from __future__ import annotations

import os
import threading
from typing import Any

_NOT_YET: Any = object()
_np: Any = _NOT_YET             # numpy once imported, None without it
_np_lock = threading.Lock()


def _numpy():
    """numpy (or None), imported the first time a chunk needs it: by a writer or restore thread, so under a lock
    (one import, and the environment below changed by one thread at a time)."""
    global _np
    if _np is _NOT_YET:
        with _np_lock:
            if _np is _NOT_YET:
                _np = _import_numpy()
    return _np


def _import_numpy():
    """numpy without its BLAS thread pool: the shuffle is a transpose, no BLAS, and a native thread started at
    import does not have the signals our processes take through signalfd blocked (the batch driver's warning
    signal went to that thread and killed the driver). The variables are put back: the job must not see them
    (they are set for the ~50 ms of the import only; a child started by another thread in that window would
    inherit them)."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        import numpy
        return numpy
    except ImportError:   # pragma: no cover - numpy is a dependency; without it nothing is shuffled
        return None
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


CODEC_ZSTD = "zstd"
CODEC_ZSTD_SHUFFLE8 = "zstd-shuffle8"     # zstd of the chunk byte-shuffled in 8-byte words
CODECS = (CODEC_ZSTD, CODEC_ZSTD_SHUFFLE8)
WORD = 8
SAMPLE = 64 * 1024


class Compressor:
    """zstd at one level, choosing per chunk between plain and shuffled bytes (one per writer thread)."""

    def __init__(self, level: int = 1, shuffle: bool = True):
        import zstandard
        self._z = zstandard.ZstdCompressor(level=level)
        self.shuffle = shuffle and _numpy() is not None
        self._buf: Any = None             # numpy array, reused

    def compress(self, view: memoryview) -> tuple[bytes, str]:
        """(stored bytes, codec) for one chunk of page data (a multiple of 8 bytes)."""
        z = self._z
        if self.shuffle and len(view) >= 2 * SAMPLE:
            mid = (len(view) // 2) & ~(WORD - 1)
            sample = view[mid:mid + SAMPLE]
            if len(z.compress(self._shuffled(sample))) < len(z.compress(sample)):
                return z.compress(self._shuffled(view)), CODEC_ZSTD_SHUFFLE8
        return z.compress(view), CODEC_ZSTD

    def _shuffled(self, view: memoryview):
        """The bytes of view grouped by their position in each 8-byte word (into a reused buffer)."""
        n = len(view) // WORD
        np = _numpy()
        if self._buf is None or self._buf.size < n * WORD:
            self._buf = np.empty(max(n * WORD, 4 << 20), np.uint8)
        out = self._buf[:n * WORD].reshape(WORD, n)
        out[...] = np.frombuffer(view, np.uint8).reshape(n, WORD).T
        return out


_local = threading.local()


def decompress(stored: bytes, codec: str, length: int, out=None):
    """The chunk's page data (length bytes at most) from its stored bytes; a shuffled chunk is unshuffled into
    out (a writable buffer) when it is given and large enough."""
    d = getattr(_local, "zstd", None)
    if d is None:
        import zstandard
        d = _local.zstd = zstandard.ZstdDecompressor()
    data = d.decompress(stored, max_output_size=length)
    if codec == CODEC_ZSTD:
        return data
    return unshuffle(data, out)


def unshuffle(data: bytes, out=None):
    n = len(data) // WORD
    np = _numpy()
    src = None if np is None else np.frombuffer(data, np.uint8).reshape(WORD, n)
    if src is not None and out is not None and len(out) >= len(data):
        # into the caller's buffer: a fresh 4 MiB array per chunk costs its page faults at every restore
        np.frombuffer(out, np.uint8)[:n * WORD].reshape(n, WORD).T[...] = src
        return memoryview(out)[:n * WORD]
    if src is not None:
        dst = np.empty((n, WORD), np.uint8)
        dst.T[...] = src
        return memoryview(dst).cast("B")
    buf = bytearray(len(data))
    for k in range(WORD):
        buf[k::WORD] = data[k * n:(k + 1) * n]
    return buf
