"""MPI-aware checkpoints: which ranks of each MPI world (or srun step) the computation should hold.

Agents report each process's rank, world and world size (agent/procs.py, from PMI_*/PMIX_*/OMPI_*/SLURM_*).
A rank that was never seen is not under our control - still starting, or started on a host or by a launcher we
do not wrap - and a checkpoint without it could never be restarted. So a checkpoint waits for every rank of
every world (up to HPCCKPT_RANK_WAIT seconds) and then fails naming the missing ranks. A rank seen once and
gone since has finished (ranks end at different times), which is fine; worlds that came back from images are
complete by construction (the restart gate checked that every host's images were restored).
"""
from __future__ import annotations


def _ranges(ranks: list[int]) -> str:
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(out)


class RankBook:
    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = {}
        self.size: dict[str, int] = {}
        self.restored: set[str] = set()

    def update(self, processes: list[dict], restarted: bool = False) -> None:
        for proc in processes:
            world, size, rank = proc.get("world"), proc.get("world_size"), proc.get("rank")
            if not world or not isinstance(size, int) or not isinstance(rank, int) or size <= 0:
                continue
            self.seen.setdefault(world, set()).add(rank)
            self.size[world] = size
            if restarted:
                self.restored.add(world)

    def missing(self) -> list[str]:
        """One text per world with ranks never seen, e.g. 'ranks 2-3 of 4 (pmi:4)'."""
        out = []
        for world, size in sorted(self.size.items()):
            if world in self.restored:
                continue
            gone = sorted(set(range(size)) - self.seen.get(world, set()))
            if gone:
                out.append(f"rank{'s' if len(gone) > 1 else ''} {_ranges(gone)} of {size} ({world})")
        return out
