"""Fuzzing the image and manifest parsers (hypothesis): whatever the bytes, reading an image (header, metadata,
semantic checks of image/validate.py, chunk checksums) gives a result or an ImageError, and reading a manifest a
Manifest or a ManifestError - never another exception - and corrupted input is never accepted as valid.

Bounded for the default suite (HPCCKPT_FUZZ_EXAMPLES examples per test, default 60: a few seconds in all). By
hand, longer (no per-test timeout): HPCCKPT_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest --timeout=0 tests/unit/image/test_fuzz.py
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st   # noqa: E402

from craft import synthetic_meta, write_synthetic                          # noqa: E402
from hpcckpt.cli.inspect import main as inspect_main                      # noqa: E402
from hpcckpt.image import format as fmt                                    # noqa: E402
from hpcckpt.image.format import ImageError, ImageReader, ImageWriter     # noqa: E402
from hpcckpt.image.store import ImageEntry, Manifest                      # noqa: E402
from hpcckpt.image.manifest_check import ManifestError                    # noqa: E402
from hpcckpt.image.validate import check_image, check_images                            # noqa: E402

EXAMPLES = int(os.environ.get("HPCCKPT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="hpcckpt-fuzz-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def good_image(workdir) -> bytes:
    path = write_synthetic(os.path.join(workdir, "good.dmtcp"))
    with ImageReader(path) as r:          # the base case is valid: a failure below is the mutation's
        check_image(path, r.meta, r.size)
        assert r.verify() == 2
    return open(path, "rb").read()


def read_all(path: str) -> bool:
    """Everything restore and inspect --verify do with an image before using it. True if it is accepted."""
    with ImageReader(path) as r:
        check_images([r])                 # (what restore runs: also the references between records)
        r.verify()
    return True


def _meaningful_offsets(image: bytes) -> list[int]:
    """Bytes that carry meaning: the header fields that are checked, the page data, the metadata (not the header's
    padding nor its reserved flags / data_end fields, which this version does not interpret)."""
    _, _, _, meta_off, _, _, _ = fmt._HEADER.unpack_from(image)
    return list(range(0, 12)) + list(range(16, 36)) + list(range(fmt.HEADER_SIZE, len(image)))


@FUZZ
@given(data=st.data())
def test_flipped_bytes_are_never_accepted(data, good_image, workdir):
    """Any change of a meaningful byte (no checksum recomputed) is refused, as an ImageError."""
    offsets = _meaningful_offsets(good_image)
    flips = data.draw(st.lists(st.tuples(st.sampled_from(offsets), st.integers(1, 255)), min_size=1, max_size=4))
    raw = bytearray(good_image)
    for off, x in flips:
        raw[off] ^= x
    if raw == good_image:
        return
    path = os.path.join(workdir, "flipped.dmtcp")
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(ImageError):
        read_all(path)


@FUZZ
@given(cut=st.integers(0, 40000), junk=st.binary(max_size=64))
def test_truncated_or_extended_images(cut, junk, good_image, workdir):
    path = os.path.join(workdir, "cut.dmtcp")
    raw = good_image[:cut] + (junk if cut < len(good_image) else b"")
    with open(path, "wb") as f:
        f.write(raw)
    if raw == good_image:
        assert read_all(path)
        return
    with pytest.raises(ImageError):
        read_all(path)


@FUZZ
@given(raw=st.binary(max_size=6000))
def test_arbitrary_bytes(raw, workdir):
    path = os.path.join(workdir, "random.dmtcp")
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(ImageError):
        read_all(path)


@FUZZ
@given(data=st.data())
def test_compressed_chunk_edited_with_its_checksum(data, workdir):
    """A compressed chunk's bytes changed and its checksum recomputed in the metadata: a frame that does not
    decompress (zstandard's own error before), or not to exactly its pages (wrong memory), is an ImageError;
    one that decompresses to other pages of the right size cannot be told from a real image without a MAC."""
    import zlib
    from craft import rewrite
    src = write_synthetic(os.path.join(workdir, "z.dmtcp"), compress=True)
    with ImageReader(src) as r:
        row = r.meta["process"]["regions"][1]["chunks"][0]
        original = bytes(r.read_chunk(fmt.Chunk.from_json(row)))
        stored = bytearray(os.pread(r.fd, row[3], row[2]))
    before = bytes(stored)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(stored) - 1), st.integers(1, 255)), min_size=1,
                               max_size=3))
    for off, x in flips:
        stored[off] ^= x
    if stored == before:
        return
    dst = os.path.join(workdir, "z-edited.dmtcp")

    def change(meta):
        meta["process"]["regions"][1]["chunks"][0][4] = zlib.crc32(stored)
    rewrite(src, dst, change)
    fd = os.open(dst, os.O_WRONLY)
    os.pwrite(fd, stored, row[2])
    os.close(fd)
    try:
        with ImageReader(dst) as r:
            check_images([r])
            got = bytes(r.read_chunk(fmt.Chunk.from_json(r.meta["process"]["regions"][1]["chunks"][0])))
    except ImageError:
        return
    # a frame edited in its (unchecked) header fields or padding may still give the same pages: then they are
    # right; what must never happen is pages of another size or an exception of another type
    assert len(got) == 3 * fmt.PAGE_SIZE


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _write_meta(path: str, meta) -> str:
    """An image with the synthetic image's page data and the given metadata, written (and checksummed) by the
    writer itself."""
    w = ImageWriter(path)
    w.add_chunk(0, 2, b"\x90" * 2 * fmt.PAGE_SIZE)
    w.add_chunk(1, 3, bytes(range(256)) * 48)
    w.drain()
    return w.finish(meta)


@FUZZ
@given(data=st.data())
def test_edited_metadata_with_valid_checksum(data, workdir):
    """Metadata with any node replaced by any JSON value (the checksum is right): accepted or an ImageError,
    never another exception; when accepted, the typed records restore builds come out of it."""
    meta = write_synthetic_meta()
    paths = list(_paths(meta))
    where = data.draw(st.sampled_from(paths))
    value = data.draw(JSON)
    meta = _replace(meta, where, value)
    path = _write_meta(os.path.join(workdir, "edited.dmtcp"), meta)
    for args in ([path], ["--verify", path]):            # inspect prints any image or says why not, in one line
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = inspect_main(args)
        assert rc in (0, 1) and "internal error" not in err.getvalue() and err.getvalue().count("\n") <= 1
    try:
        read_all(path)
    except ImageError:
        return
    from hpcckpt.image.records import ImageMeta
    ImageMeta.from_dict(meta)


def write_synthetic_meta():
    """The metadata of write_synthetic's image (same chunk offsets: the writer places them deterministically)."""
    with ImageReader(write_synthetic(os.path.join(tempfile.gettempdir(), f"hpcckpt-fuzz-{os.getpid()}.dmtcp"))) as r:
        meta = copy.deepcopy(r.meta)
    os.unlink(os.path.join(tempfile.gettempdir(), f"hpcckpt-fuzz-{os.getpid()}.dmtcp"))
    return meta


def _replace(meta, where, value):
    if not where:
        return value
    node = meta
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = value
    return meta


# semantic corruptions: each must be refused (a "valid" answer would restore wrong memory or crash the process)
def _regions(m):
    return m["process"]["regions"]


CORRUPTIONS = {
    "chunk offset shared": lambda m: _regions(m)[1]["chunks"].append(
        [3, 1] + _regions(m)[0]["chunks"][0][2:]),
    "chunk page beyond region": lambda m: _regions(m)[1]["chunks"][0].__setitem__(0, 2),
    "chunk pages overlap": lambda m: _regions(m)[1]["chunks"].append([2, 1] + _regions(m)[0]["chunks"][0][2:]),
    "chunk offset unaligned": lambda m: _regions(m)[1]["chunks"][0].__setitem__(2, 4097),
    "chunk offset in header": lambda m: _regions(m)[1]["chunks"][0].__setitem__(2, 0),
    "raw chunk short": lambda m: _regions(m)[1]["chunks"][0].__setitem__(3, 100),
    "unknown codec": lambda m: _regions(m)[1]["chunks"][0].__setitem__(5, "lzma"),
    "negative page": lambda m: _regions(m)[1]["chunks"][0].__setitem__(0, -1),
    "regions unsorted": lambda m: _regions(m).reverse(),
    "region overlap": lambda m: _regions(m)[1].__setitem__("start", _regions(m)[0]["start"] + 4096),
    "region unaligned": lambda m: _regions(m)[2].__setitem__("end", _regions(m)[2]["end"] + 1),
    "region beyond user space": lambda m: _regions(m)[2].__setitem__("end", 1 << 60),
    "empty region": lambda m: _regions(m)[2].__setitem__("end", _regions(m)[2]["start"]),
    "bad perms": lambda m: _regions(m)[0].__setitem__("perms", "rwxz"),
    "unknown backing": lambda m: _regions(m)[0].__setitem__("backing", "magic"),
    "rip zero": lambda m: m["process"]["threads"][0]["regs"].__setitem__("rip", 0),
    "rip in data": lambda m: m["process"]["threads"][0]["regs"].__setitem__("rip", _regions(m)[1]["start"]),
    "rsp unmapped": lambda m: m["process"]["threads"][0]["regs"].__setitem__("rsp", 0x1000),
    "kernel cs": lambda m: m["process"]["threads"][0]["regs"].__setitem__("cs", 0x10),
    "no threads": lambda m: m["process"].__setitem__("threads", []),
    "duplicate tid": lambda m: m["process"]["threads"].append(copy.deepcopy(m["process"]["threads"][0])),
    "zero tid": lambda m: m["process"]["threads"][0].__setitem__("tid", 0),
    "negative pid": lambda m: m["process"].__setitem__("pid", -1),
    "duplicate fd": lambda m: m["process"]["fds"].append(dict(m["process"]["fds"][1])),
    "huge fd": lambda m: m["process"]["fds"][1].__setitem__("fd", 1 << 40),
    "negative fd": lambda m: m["process"]["fds"][1].__setitem__("fd", -3),
    "unknown fd kind": lambda m: m["process"]["fds"][1].__setitem__("kind", "teleporter"),
    "fd kind a list": lambda m: m["process"]["fds"][1].__setitem__("kind", []),      # (found by the long fuzz run)
    "dangling open file": lambda m: m["process"]["fds"][1].__setitem__("ofd", "o99"),
    "bad stdio": lambda m: m["process"]["fds"][0].__setitem__("ofd", "stdio:7"),
    "generation zero": lambda m: m.__setitem__("generation", 0),
    "too many sigactions": lambda m: m["process"]["sigactions"].extend([[0, 0, 0, 0]] * 3),
    "blob beyond file": lambda m: m["process"]["blobs"].__setitem__(
        "o1", {"length": 4096, "chunks": [[0, 1, 1 << 30, 4096, 0, "raw"]]}),
    "hashes wrong size": lambda m: _regions(m)[1].__setitem__(
        "hashes", {"length": 8, "chunks": [[0, 1, 1 << 20, 4096, 0, "raw"]]}),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_semantic_corruption_is_refused(name, workdir):
    meta = write_synthetic_meta()
    CORRUPTIONS[name](meta)
    path = _write_meta(os.path.join(workdir, "corrupt.dmtcp"), meta)
    with pytest.raises(ImageError, match="invalid image metadata"):
        read_all(path)


# -- manifests ---------------------------------------------------------------------------------------------------

GOOD_MANIFEST = Manifest("c1", 3, 1.5, [ImageEntry("h", "/ck/gen000003/a.dmtcp", "prog", "u1", 10, 4096, [3], 0)],
                         {"wall_s": 1.0}).to_json()


def _check_manifest(m: Manifest) -> None:
    assert isinstance(m.computation, str) and m.computation
    assert isinstance(m.generation, int) and m.generation >= 1
    for i in m.images:
        assert isinstance(i, ImageEntry) and isinstance(i.path, str) and isinstance(i.pid, int) and i.pid > 0
        assert all(isinstance(g, int) for g in i.needs)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_manifest_arbitrary_bytes(raw):
    try:
        _check_manifest(Manifest.from_json(raw))
    except ManifestError:
        pass


@FUZZ
@given(data=st.data())
def test_manifest_edited(data):
    d = json.loads(GOOD_MANIFEST)
    where = data.draw(st.sampled_from(list(_paths(d))))
    d = _replace(d, where, data.draw(JSON))
    try:
        m = Manifest.from_json(json.dumps(d).encode())
    except ManifestError:
        return
    _check_manifest(m)


@FUZZ
@given(cut=st.integers(0, len(GOOD_MANIFEST) - 1))
def test_manifest_truncated_is_never_accepted(cut):
    with pytest.raises(ManifestError):
        Manifest.from_json(GOOD_MANIFEST[:cut])


def test_manifest_roundtrip():
    m = Manifest.from_json(GOOD_MANIFEST)
    assert m.to_json() == GOOD_MANIFEST
