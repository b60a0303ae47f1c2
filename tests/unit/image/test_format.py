"""The image file format and the checkpoint store, without processes."""
from __future__ import annotations

import os
import stat

import pytest

from hpcckpt.image import store
from hpcckpt.image.format import ImageError, ImageReader, ImageWriter


@pytest.mark.parametrize("compress", [False, True])
def test_roundtrip_and_alignment(tmp_path, compress):
    path = str(tmp_path / "ckpt_x_1.dmtcp")
    w = ImageWriter(path, compress=compress)
    data = [bytes([i]) * 4096 * (i + 1) for i in range(5)]
    groups = [w.add_chunk(i, i + 1, d) for i, d in enumerate(data)]
    assert os.path.exists(path + ".tmp") and not os.path.exists(path)   # never a final name while writing
    w.drain()                                   # chunk offsets are known once written
    chunks = [g[0] for g in groups]
    w.finish({"process": {"regions": [{"chunks": [c.to_json() for c in chunks]}]}, "x": 1})
    assert not os.path.exists(path + ".tmp")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with ImageReader(path) as r:
        assert r.meta["x"] == 1
        for c, d in zip(chunks, data):
            assert c.off % 4096 == 0
            assert r.read_chunk(c) == d
        assert r.verify() == 5


def test_abort_leaves_nothing(tmp_path):
    path = str(tmp_path / "img.dmtcp")
    w = ImageWriter(path)
    w.add_chunk(0, 1, b"\1" * 4096)
    w.abort()
    assert os.listdir(tmp_path) == []


def test_corruption_detected(tmp_path):
    path = tmp_path / "img.dmtcp"
    w = ImageWriter(str(path))
    g = w.add_chunk(0, 2, b"\7" * 8192)
    w.drain()
    w.finish({"process": {"regions": [{"chunks": [g[0].to_json()]}]}})
    raw = bytearray(path.read_bytes())
    raw[4096 + 100] ^= 1
    path.write_bytes(bytes(raw))
    with ImageReader(str(path)) as r:
        with pytest.raises(ImageError, match="corrupted"):
            r.verify()
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1                                # metadata
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="metadata checksum"):
        ImageReader(str(path))
    path.write_bytes(bytes(raw[:5000]))
    with pytest.raises(ImageError, match="truncated"):
        ImageReader(str(path))


def test_retention_never_touches_the_newest():
    assert store.generations_to_prune([1, 2, 3, 4], 2) == [1, 2]
    assert store.generations_to_prune([3], 1) == []
    assert store.generations_to_prune([1, 2], 5) == []


def test_manifest_marks_completeness(tmp_path):
    assert store.latest_manifest(str(tmp_path), "c1") is None
    store.write_manifest(str(tmp_path), store.Manifest("c1", 3, 0.0, [store.ImageEntry("h", "/p", "prog", "u", 1)]))
    store.write_manifest(str(tmp_path), store.Manifest("c1", 1, 0.0, []))
    assert store.complete_generations(str(tmp_path), "c1") == [1, 3]
    m = store.latest_manifest(str(tmp_path), "c1")
    assert m.generation == 3 and m.images[0].program == "prog"


@pytest.mark.parametrize("compress", [False, True])
def test_zero_pages_cost_nothing(tmp_path, compress):
    """All-zero pages of anonymous memory are left out of the image (they read back as zeros)."""
    path = str(tmp_path / "z.dmtcp")
    w = ImageWriter(path, compress=compress)
    data = bytearray(4096 * 8)
    data[4096 * 2] = 1                          # pages 2 and 5 hold data, the rest are zero
    data[4096 * 5 + 7] = 2
    g = w.submit(10, 8, lambda buf: buf.__setitem__(slice(0, len(data)), data), zero_skip=True)
    w.drain()
    assert [(c.page, c.npages) for c in g] == [(12, 1), (15, 1)]
    assert w.zero_pages == 6
    w.finish({"process": {"regions": [{"chunks": [c.to_json() for c in g]}]}})
    with ImageReader(path) as r:
        assert r.read_chunk(g[0])[0] == 1 and r.read_chunk(g[1])[7] == 2
    assert os.stat(path).st_blocks * 512 < 4096 * 8     # the file holds no zero pages


def test_incremental_page_hashes_find_changed_pages():
    """changed_runs hashes every page and returns the runs to store: all non-zero pages without a previous
    generation; then only pages whose content changed (a page that became zero is not stored either)."""
    from hpcckpt.image.pagehash import HASH_SIZE, HashSpec, changed_runs, page_hash
    pages = [os.urandom(4096) for _ in range(16)]
    pages[3] = pages[4] = bytes(4096)
    out = bytearray(HASH_SIZE * 16)
    runs = changed_runs(memoryview(b"".join(pages)), 16, HashSpec(memoryview(out), None), zero_skip=True)
    assert runs == [(0, 3), (5, 11)]
    assert bytes(out) == b"".join(page_hash(p) for p in pages)
    prev = bytes(out)
    for i in (0, 1, 9):
        pages[i] = os.urandom(4096)
    pages[12] = bytes(4096)
    runs = changed_runs(memoryview(b"".join(pages)), 16, HashSpec(memoryview(out), prev), zero_skip=True)
    assert runs == [(0, 2), (9, 1)]
    assert changed_runs(memoryview(b"".join(pages)), 16, HashSpec(memoryview(out), bytes(out)), True) == []


def test_written_pages_packed_into_one_job():
    """With write tracking only the written runs of a region are read, packed into one buffer: their pages are
    hashed in place (hashes land at each run's own position) and the changed ones come back as runs of the
    region; the runs to read are the populated pages that were written."""
    from hpcckpt.engine.memory import intersect_runs
    from hpcckpt.image.pagehash import changed_runs_scattered, page_hash
    assert intersect_runs([(0, 10), (20, 5)], [(2, 3), (8, 14), (30, 1)]) == [(2, 3), (8, 2), (20, 2)]
    assert intersect_runs([(0, 4)], []) == [] and intersect_runs([], [(0, 4)]) == []
    region = [os.urandom(4096) for _ in range(32)]
    hashes = bytearray(b"".join(page_hash(p) for p in region))
    prev = bytes(hashes)
    region[5], region[6], region[20] = os.urandom(4096), os.urandom(4096), bytes(4096)   # 7 and 21: rewritten as is
    packed = b"".join(region[5:8] + region[20:22])
    runs = changed_runs_scattered(memoryview(packed), [(5, 3), (20, 2)], memoryview(hashes), prev, zero_skip=True)
    assert runs == [(0, 2, 5)]                      # buffer pages 0-1 are region pages 5-6; page 20 is zero now
    assert bytes(hashes) == b"".join(page_hash(p) for p in region)


@pytest.mark.parametrize("algo", ["xxh3-64", None])
def test_previous_hashes_only_of_the_same_algorithm(tmp_path, algo):
    """The previous generation's page hashes are used only if they were made with today's algorithm; hashes
    without a tag (SHA-256, older versions) are ignored, so the next generation is a full image."""
    from hpcckpt.image.blobs import write_blobs
    from hpcckpt.image.incremental import previous_hashes
    from hpcckpt.image.pagehash import HASH_ALGO, page_hash
    from hpcckpt.image.records import RegionRecord
    path = str(tmp_path / "prev.dmtcp")
    w = ImageWriter(path)
    hashes = page_hash(b"\1" * 4096) * 2
    blob = write_blobs(w, {"h": hashes})["h"]
    w.drain()
    blob["chunks"] = [c.to_json() for g in blob["chunks"] for c in g]
    if algo:
        blob["algo"] = algo
    region = RegionRecord(start=0x10000, end=0x12000, perms="rw-p", offset=0, path="", hashes=blob)
    w.finish({"process": {"regions": [region.to_dict()]}})
    got = previous_hashes(path)
    assert got == ({(0x10000, 0x12000, "rw-p", "anon", ""): hashes} if algo == HASH_ALGO else {})


def test_chain_resolution_takes_each_page_from_the_newest_image_holding_it():
    """Restore through an incremental chain: each page comes from the newest image that stored its current
    content; unpopulated and all-zero pages from none; a page whose content no image holds is an error naming
    it (a base image was replaced)."""
    from types import SimpleNamespace

    from hpcckpt.image.format import ImageError
    from hpcckpt.image.incremental import ChainLink, resolve
    from hpcckpt.image.pagehash import HASH_SIZE, ZERO_HASH, page_hash
    key = (0x1000, 0x9000, "rw-p", "anon", "")
    base_h = [page_hash(bytes([i]) * 4096) for i in range(8)]
    base_h[5] = bytes(HASH_SIZE)                                      # never touched
    new_h = list(base_h)
    new_h[2], new_h[3], new_h[6] = page_hash(b"x" * 4096), page_hash(b"y" * 4096), ZERO_HASH
    base = ChainLink(SimpleNamespace(path="base"), {key: SimpleNamespace(chunks=[[0, 5, 4096, 5 * 4096, 0, "raw"],
                                                                                [6, 2, 0x6000, 2 * 4096, 0, "raw"]])},
                     {key: b"".join(base_h)})
    # page 4 was changed in a generation between and written back as it was: the newest image stores it, and
    # the base (same content) must not give it again
    newest = ChainLink(SimpleNamespace(path="new"), {key: SimpleNamespace(chunks=[[2, 1, 4096, 4096, 0, "raw"],
                                                                                 [3, 1, 8192, 4096, 0, "raw"],
                                                                                 [4, 1, 0x3000, 4096, 0, "raw"]])},
                       {key: b"".join(new_h)})
    got = [(r.path, c.page, runs) for r, c, runs in resolve([newest, base], key, 8)]
    assert got == [("new", 2, [(2, 1)]), ("new", 3, [(3, 1)]), ("new", 4, [(4, 1)]), ("base", 0, [(0, 2)]),
                   ("base", 6, [(7, 1)])]
    new_h[1] = page_hash(b"z" * 4096)                                 # stored nowhere
    newest.hashes[key] = b"".join(new_h)
    with pytest.raises(ImageError, match="page 1 of the region at 0x1000 is in no image"):
        list(resolve([newest, base], key, 8))


def test_numeric_chunks_are_byte_shuffled_before_zstd(tmp_path, monkeypatch):
    """Compressed chunks of numeric data (doubles) are stored byte-shuffled (much smaller, and faster to
    compress); chunks of other data take whichever encoding compresses a sample better; every chunk reads
    back exactly, also into a caller's buffer and without numpy."""
    import math
    import struct

    from hpcckpt.image import codec
    doubles = struct.pack("<262144d", *(math.sin(i * 1e-3) * 1e3 for i in range(262144)))     # 2 MiB
    text = b"".join(b"line %d of a log file, status ok\n" % i for i in range(60000))[:2 << 20]
    w = ImageWriter(str(tmp_path / "z.dmtcp"), compress=True)
    groups = [w.add_chunk(0, 512, doubles), w.add_chunk(0, 512, text)]
    w.drain()
    w.finish({})
    (num,), (txt,) = groups
    assert num.codec == "zstd-shuffle8" and num.length < len(doubles) * 0.75
    assert txt.codec in codec.CODECS
    assert len(codec.Compressor(shuffle=False).compress(memoryview(doubles))[0]) > num.length * 1.3
    with ImageReader(str(tmp_path / "z.dmtcp")) as r:
        assert bytes(r.read_chunk(num)) == doubles and bytes(r.read_chunk(txt)) == text
        room = bytearray(4 << 20)
        assert bytes(r.read_chunk(num, memoryview(room))) == doubles and room[:len(doubles)] == doubles
        monkeypatch.setattr(codec, "_np", None)
        assert bytes(r.read_chunk(num)) == doubles
