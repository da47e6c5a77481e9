"""What GPUs there are, how much memory each has free, and how much each process really uses.

The scheduler sees GPUs only through `GpuInventory`, so tests can hand it imaginary ones (tests/standin/gpus.py).
`NvmlGpus` reads NVIDIA's management library (nvidia-ml-py); without a driver it reports no GPUs, and
models run on the CPU. NVML numbers are the truth the scheduler learns from: a runner's estimate is replaced
by what its processes use once it is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Protocol

import psutil

log = logging.getLogger("mgr.gpus")


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes, as the driver reports now


class GpuInventory(Protocol):
    def gpus(self) -> list[Gpu]:
        """Every GPU with its free memory now; empty when there are none."""

    def used_by(self, pid: int) -> dict[int, int]:
        """Bytes of GPU memory held by this process and its children, by GPU index."""


def _tree(pid: int) -> set[int]:
    try:
        process = psutil.Process(pid)
        return {pid, *(child.pid for child in process.children(recursive=True))}
    except psutil.Error:
        return {pid}


class NvmlGpus:
    def __init__(self) -> None:
        self._nvml: Any = None
        self._lock = threading.Lock()
        self._trees: dict[int, set[int]] = {}
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # no driver, no library: a CPU machine
            log.info("no NVIDIA GPUs (%s); models run on the CPU", e)

    def gpus(self) -> list[Gpu]:
        if self._nvml is None:
            return []
        nvml = self._nvml
        with self._lock:
            result = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                result.append(Gpu(index, name.decode() if isinstance(name, bytes) else name,
                                  int(memory.total), int(memory.free)))
            return result

    def used_by(self, pid: int) -> dict[int, int]:
        if self._nvml is None:
            return {}
        # Remember the tree: vLLM's engine core is a child that holds the memory, and it must still count
        # after its parent has exited.
        pids = self._trees[pid] = self._trees.get(pid, set()) | _tree(pid)
        nvml = self._nvml
        used: dict[int, int] = {}
        with self._lock:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if process.pid in pids and process.usedGpuMemory:
                        used[index] = used.get(index, 0) + int(process.usedGpuMemory)
        if not used and not any(psutil.pid_exists(p) for p in pids):
            del self._trees[pid]  # the runner is gone and holds nothing: nothing more to remember
        return used
