"""bench/run.py with the chunk tag chosen (docs/image-format.md): blake3 (the default), hmac (HMAC-SHA256-128:
the blake3 module hidden), none (empty tags: what the tags cost, not a usable mode).

    .venv/bin/python bench/run_with_tag.py none --sizes 1024 --threads 1 --runs 3 --no-incremental
"""
import runpy, sys
mode = sys.argv.pop(1)
if mode == "hmac":
    sys.modules["blake3"] = None
from hpcckpt.image import auth
if mode == "hmac":
    assert auth.CHUNK_ALGO == auth.CHUNK_HMAC
elif mode == "none":
    auth.ChunkTagger.tag = lambda self, data: ""
sys.argv[0] = "bench/run.py"
runpy.run_path("bench/run.py", run_name="__main__")
