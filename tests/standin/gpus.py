"""STAND-IN GPUs: an imaginary GpuInventory, for placement and warm-tier tests on a machine without GPUs."""

from __future__ import annotations

from mgr.daemon.gpus import Gpu


class StaticGpus:
    """Imaginary GPUs for tests: memory is taken by `allocate(pid, index, bytes)` and given back by `free`."""

    def __init__(self, totals: list[int], name: str = "Imaginary GPU") -> None:
        self.totals = totals
        self.name = name
        self.allocations: dict[int, dict[int, int]] = {}  # pid -> gpu index -> bytes

    def allocate(self, pid: int, index: int, size: int) -> None:
        self.allocations.setdefault(pid, {})[index] = size

    def free(self, pid: int) -> None:
        self.allocations.pop(pid, None)

    def gpus(self) -> list[Gpu]:
        used = [sum(a.get(i, 0) for a in self.allocations.values()) for i in range(len(self.totals))]
        return [Gpu(i, self.name, total, total - used[i]) for i, total in enumerate(self.totals)]

    def used_by(self, pid: int) -> dict[int, int]:
        return dict(self.allocations.get(pid, {}))
