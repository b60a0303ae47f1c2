"""A local OpenPBS 23.06 emulator for tests: real processes, real users, the real command-line interface
(qsub, qstat, qdel, qrerun). See README.md for what it reproduces and how to use a real PBS instead."""
from .api import Emulator, RealPBS, as_user, backend, parse_qstat_f

__all__ = ["Emulator", "RealPBS", "as_user", "backend", "parse_qstat_f"]
