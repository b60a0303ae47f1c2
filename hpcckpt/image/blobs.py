"""Objects' bulk data in an image (a deleted file's content, a pipe's queued bytes, ...): stored as chunks
after the pages, found again through the blob table of the image's metadata."""
from __future__ import annotations

from .format import CHUNK_PAGES, PAGE_SIZE, Chunk, ImageReader, ImageWriter


def write_blobs(writer: ImageWriter, blobs: dict[str, bytes]) -> dict[str, dict]:
    """Store objects' bulk data (e.g. a deleted file's content) as chunks; returns the blob table."""
    out = {}
    for oid, data in blobs.items():
        padded = data + b"\0" * ((-len(data)) % PAGE_SIZE)
        chunks = []
        for off in range(0, len(padded), CHUNK_PAGES * PAGE_SIZE):
            piece = padded[off:off + CHUNK_PAGES * PAGE_SIZE]
            chunks.append(writer.add_chunk(off // PAGE_SIZE, len(piece) // PAGE_SIZE, piece))
        out[oid] = {"length": len(data), "chunks": chunks}
    return out


def read_blob(reader: ImageReader, spec: dict) -> bytes:
    parts = [reader.read_chunk(Chunk.from_json(c)) for c in spec["chunks"]]
    return b"".join(parts)[: spec["length"]]
