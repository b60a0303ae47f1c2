"""hpcckpt: transparent, distributed checkpoint/restart for long-running HPC jobs."""
__version__ = "0.1.0"
