"""What a Ray cluster really has, read from Ray itself: its live nodes, the GPUs each offers, how much memory
those GPUs have, and how many GPUs no one holds now. The settings MGR_RAY_NODES and MGR_RAY_GPUS_PER_NODE
stay as overrides; without a reading (Ray down, or not installed) placement falls back to them.

Ray is imported only by a short probe run with the engine's Python (the one vLLM and Ray are installed in),
never by the daemon: the daemon's own environment need not have Ray, and a probe that hangs is killed on a
timeout instead of hanging the scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from mgr.registry.config import Settings
from mgr.registry.errors import MgrError

from .placement import RayCluster

PROBE_TIMEOUT_SECONDS = 60.0

# Runs in the engine's Python: connects as a driver, asks each GPU node's NVML for its GPUs' memory (a task
# of no CPU and no GPU, pinned to the node, so it runs even while every GPU is held), prints one JSON line.
_PROBE = r"""
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, configure_logging=False)

@ray.remote(num_cpus=0)
def gpu_memory():
    try:
        import pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total) for i in range(count)]
    except Exception:
        return []

nodes = [n for n in ray.nodes() if n.get("Alive")]
refs = {n["NodeID"]: gpu_memory.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        .remote() for n in nodes if n["Resources"].get("GPU")}
memory = {}
for node_id, ref in refs.items():
    try:
        memory[node_id] = ray.get(ref, timeout=30)
    except Exception:
        memory[node_id] = []
print(json.dumps({
    "nodes": [{"id": n["NodeID"], "address": n["NodeManagerAddress"], "gpus": int(n["Resources"].get("GPU", 0)),
               "gpu_memory": min(memory.get(n["NodeID"]) or [0])} for n in nodes],
    "free_gpus": int(ray.available_resources().get("GPU", 0)),
}))
"""


class RayUnavailable(MgrError):
    """The Ray cluster could not be read, or has not got the GPUs a placement needs."""

    status = 503


@dataclasses.dataclass(frozen=True)
class RayNode:
    id: str
    address: str
    gpus: int
    gpu_memory: int  # bytes per GPU (the smallest on the node); 0 = NVML could not be read there


@dataclasses.dataclass(frozen=True)
class RayReading:
    """One reading of the cluster: a frozen snapshot, read again before each Ray placement."""

    address: str
    nodes: tuple[RayNode, ...]
    free_gpus: int  # GPUs no Ray task or actor holds now, over the whole cluster

    @property
    def gpu_nodes(self) -> tuple[RayNode, ...]:
        return tuple(n for n in self.nodes if n.gpus > 0)

    def cluster(self, settings: Settings) -> RayCluster | None:
        """The cluster placement counts on: the settings where they are given, else what Ray reported. vLLM
        places the same number of GPUs on every machine, so a machine counts for the fewest GPUs any has."""
        nodes = self.gpu_nodes
        if not nodes and settings.ray_gpus_per_node is None:
            return None
        per_node = settings.ray_gpus_per_node or min(n.gpus for n in nodes)
        count = settings.ray_nodes if settings.ray_nodes > 1 else len(nodes) or 1
        memory = min((n.gpu_memory for n in nodes if n.gpu_memory), default=0)
        return RayCluster(count, per_node, gpu_memory=memory or None)

    def describe(self) -> str:
        nodes = ", ".join(f"{n.address} ({n.gpus} GPU)" for n in self.nodes) or "no live nodes"
        return f"Ray cluster at {self.address}: {nodes}; {self.free_gpus} GPU free"


async def _reachable(address: str) -> None:
    """Fail fast where nothing listens: Ray's own connect retries for a minute before it gives up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray finds the cluster itself
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 5)
    except (OSError, TimeoutError) as e:
        raise RayUnavailable(f"the Ray cluster at {address} is not reachable ({e or 'timed out'})") from None
    writer.close()


def parse_reading(address: str, text: str) -> RayReading:
    """The probe's output; RayUnavailable if it is not what the probe prints."""
    try:
        data = json.loads(text.strip().splitlines()[-1])
        nodes = tuple(RayNode(str(n["id"]), str(n["address"]), int(n["gpus"]), int(n["gpu_memory"]))
                      for n in data["nodes"])
        return RayReading(address, nodes, int(data["free_gpus"]))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise RayUnavailable(f"could not read the Ray cluster at {address}: unexpected probe output ({e})") from None


async def read_cluster(address: str, python: str | None = None,
                       timeout: float = PROBE_TIMEOUT_SECONDS) -> RayReading:
    """Ask the cluster at `address` what it has, with the engine's Python; RayUnavailable with the reason when
    Ray is missing there, the cluster is down, or it does not answer in time."""
    await _reachable(address)
    process = await asyncio.create_subprocess_exec(
        python or sys.executable, "-c", _PROBE, address, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RayUnavailable(f"the Ray cluster at {address} did not answer within {timeout:.0f}s") from None
    if process.returncode != 0:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        if any("No module named 'ray'" in line for line in lines):
            reason = "Ray is not installed for the engine's Python (pip install 'ray[default]' next to vLLM)"
        else:
            reason = lines[-1] if lines else f"the probe exited with code {process.returncode}"
        raise RayUnavailable(f"could not reach the Ray cluster at {address}: {reason}")
    return parse_reading(address, out.decode(errors="replace"))
