"""Incremental checkpoints of a process with a read-only MAP_SHARED file mapping (glibc maps
gconv-modules.cache this way, so every Python under a UTF-8 locale has one): the restore must map it read-only
from the file, as it was. Older code kept page hashes for it, mapped it writable to fill it and failed with
EACCES ("cannot recreate mapping ... Permission denied") at the first restart of an incremental generation."""
from __future__ import annotations

import os

import pytest
from conftest import compile_c, line_count, run, wait_for

from hpcckpt.engine.memory import filled
from hpcckpt.image.records import RegionRecord


def test_a_shared_file_mapping_is_never_filled_even_with_page_hashes_from_an_older_image():
    r = RegionRecord(start=0x10000, end=0x12000, perms="r--s", offset=0, backing="file",
                     path="/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
                     hashes={"length": 16, "chunks": [], "algo": "xxh"})
    assert not filled(r)
    private = RegionRecord(start=0x10000, end=0x12000, perms="r--p", offset=0, backing="file", path=r.path,
                           hashes=r.hashes)
    assert filled(private)


@pytest.mark.slow
def test_incremental_generations_of_a_read_only_shared_file_mapping_restart(launch, env, tmp_path, build_dir):
    prog = compile_c(build_dir, "roshared")
    data = tmp_path / "table.bin"
    data.write_bytes(os.urandom(64 << 10))
    os.chmod(data, 0o444)
    out = tmp_path / "out.txt"
    steps = 150
    job = launch(prog, out, steps, data, extra=("--incremental",))
    wait_for(lambda: line_count(out) >= 5, 30, "the program to start")
    for _ in range(2):                        # generation 2 is incremental on generation 1
        r = job.command("-bc")
        assert r.returncode == 0, r.stderr
    job.command("-k")
    job.wait(30)
    n = line_count(out)
    r = run(["bash", str(tmp_path / "dmtcp_restart_script.sh"), "--coord-port", "0"], env, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    lines = out.read_text().splitlines()
    assert len(lines) > n and lines[-1].split()[0] == str(steps - 1)
    assert len({ln.split()[1] for ln in lines}) == 1          # the mapping read the same before and after
