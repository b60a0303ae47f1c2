"""image/codec.py imports numpy on the first chunk that needs it, not with the module (issue 20: ~50 ms that
the coordinator, dmtcp_command and a restart of unshuffled images paid for nothing), and the import keeps the
BLAS-thread guard: no native thread, the job's environment left alone."""
from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import array, json, os, sys
import hpcckpt.image.format, hpcckpt.image.codec as codec
before = "numpy" in sys.modules
data = memoryview(array.array("d", [i * 1.5 for i in range(300000)]).tobytes())   # doubles: shuffled
stored, kind = codec.Compressor(1, shuffle=True).compress(data)
back = bytes(codec.decompress(stored, kind, len(data)))
print(json.dumps({"before": before, "after": "numpy" in sys.modules, "codec": kind, "same": back == bytes(data),
                  "threads": len(os.listdir("/proc/self/task")), "env": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


def test_numpy_is_imported_on_the_first_shuffled_chunk_without_native_threads():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout
    assert json.loads(out) == {"before": False, "after": True, "codec": "zstd-shuffle8", "same": True,
                               "threads": 1, "env": None}
