"""Where a model goes: which GPUs, and for vLLM what share of each. Pure functions over a list of GPUs with
the memory free for us now; the scheduler owns the bookkeeping and the eviction that makes room.

Rules (in order):
- no GPU at all: GGUF runs on the CPU; safetensors (vLLM) cannot run.
- the single GPU with the most free memory that fits the model;
- vLLM: tensor parallel over the fewest of 2, 4, 8 GPUs whose free memory each holds 1/n of the model;
- GGUF: layers split over the fewest GPUs (most free first) that hold it together;
- nothing fits now, but would fit on the GPUs if they were empty: None (the scheduler evicts or waits), unless
  none of our models holds GPU memory (`room_coming` false): then what is free is all there will be (another
  process holds the rest, as on a shared workstation), and the next rule applies;
- never fits: vLLM -> TooBig with the numbers; GGUF -> as many layers offloaded as fit, the rest on the CPU.
A model pinned to GPUs in the config runs on exactly those, all of them, as CUDA_VISIBLE_DEVICES would have
it (vLLM tensor parallel over them, GGUF layers split over them).
"""

from __future__ import annotations

import dataclasses
import math

from .gpus import Gpu
from .memory import GGUF_GPU_CONTEXT, GGUF_GPU_FIXED

GIB = 1 << 30
MAX_FRACTION = 0.95  # vLLM's share of a GPU never takes the last 5% (CUDA context, other processes)


class TooBig(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class RayCluster:
    """A Ray cluster vLLM may spread a model over: `nodes` machines of `gpus_per_node` GPUs, each GPU of
    `gpu_memory` bytes (None = like ours)."""

    nodes: int
    gpus_per_node: int
    gpu_memory: int | None = None


class NeedsGpu(TooBig):
    """The engine cannot run on this machine at all (vLLM without a GPU)."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """GPU indices (empty = CPU); for vLLM the share of each GPU's total it may take
    (--gpu-memory-utilization); for llama.cpp how many layers go to the GPUs (-1 = all)."""

    gpus: tuple[int, ...] = ()
    memory_fraction: float | None = None
    gpu_layers: int = -1
    pipeline_parallel: int = 1  # > 1 only across machines (Ray)
    tensor_parallel: int | None = None  # None = len(gpus) // pipeline_parallel; set for Ray placements
    ray: bool = False  # on the Ray cluster: vLLM's Ray executor places the workers, not CUDA_VISIBLE_DEVICES

    @property
    def tensor_size(self) -> int:
        return self.tensor_parallel or max(1, len(self.gpus) // self.pipeline_parallel)

    @property
    def processor(self) -> str:
        if self.ray:
            return f"Ray {self.pipeline_parallel}x{self.tensor_size} GPU"
        if not self.gpus:
            return "CPU"
        if self.gpu_layers >= 0:
            return "CPU/GPU " + ",".join(map(str, self.gpus))
        return "GPU " + ",".join(map(str, self.gpus))


CPU = Placement()


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def place(model_format: str, need: int, gpus: list[Gpu], pinned: tuple[int, ...] | None = None,
          layers: int | None = None, cluster: RayCluster | None = None,
          ray_gpus: int | None = None, room_coming: bool = True) -> Placement | None:
    """A placement for a model that needs `need` bytes; None when it does not fit now but would once
    other models leave; TooBig when it never can. `ray_gpus` puts a vLLM model on the Ray cluster over that
    many GPUs even where it would fit here (the per-model setting). `room_coming`: some of our models hold GPU
    memory and could leave; without, waiting would wait for ever."""
    if ray_gpus and cluster is not None and model_format == "safetensors":
        return _on_cluster(need, cluster, ray_gpus, gpus)
    if pinned is not None:
        return _pinned(model_format, need, gpus, pinned, layers, room_coming)
    candidates = gpus
    if not candidates:
        if model_format == "gguf":
            return CPU
        raise NeedsGpu("safetensors models run on vLLM, which needs a GPU; this machine has none "
                     "(pull the GGUF version of the model to run it on the CPU)")
    by_free = sorted(candidates, key=lambda g: (-g.free, g.index))
    if by_free[0].free >= need:
        return _single(model_format, need, by_free[0])
    if model_format == "gguf":
        chosen: list[Gpu] = []
        for gpu in by_free:
            chosen.append(gpu)
            if _split_holds(chosen, need):
                return Placement(tuple(sorted(g.index for g in chosen)))
        return _gguf_short_of_room(need, candidates, layers, room_coming)
    for n in (2, 4, 8):
        if n > len(candidates):
            break
        group = by_free[:n]
        if all(g.free >= need / n for g in group):
            share = need / n / min(g.total for g in group)
            return Placement(tuple(sorted(g.index for g in group)), memory_fraction=min(share, MAX_FRACTION))
    largest = max(n for n in (1, 2, 4, 8) if n <= len(candidates))
    totals = sorted((g.total for g in candidates), reverse=True)[:largest]
    if all(t * MAX_FRACTION >= need / largest for t in totals):
        if room_coming:
            return None  # fits once idle models leave
        raise TooBig(f"the model needs about {_gib(need)} of GPU memory and {_gib(by_free[0].free)} is free "
                     f"(GPU {by_free[0].index}); other processes hold the rest")
    if cluster is not None:
        return _across_machines(need, cluster, cluster.gpu_memory or min(g.total for g in candidates))
    raise TooBig(f"the model needs about {_gib(need)} of GPU memory; the largest group of GPUs vLLM can use "
                 f"({largest} x {_gib(min(totals))}) cannot hold it")


def _across_machines(need: int, cluster: RayCluster, gpu_total: int) -> Placement:
    """Tensor parallel within a machine, pipeline parallel over the fewest machines that hold the model."""
    per_machine = cluster.gpus_per_node * gpu_total * MAX_FRACTION
    machines = math.ceil(need / per_machine)
    if machines > cluster.nodes:
        raise TooBig(f"the model needs about {_gib(need)} of GPU memory; the Ray cluster's {cluster.nodes} machines "
                     f"x {cluster.gpus_per_node} GPUs hold about {_gib(cluster.nodes * per_machine)}")
    share = need / (machines * cluster.gpus_per_node) / gpu_total
    return Placement(tuple(range(cluster.gpus_per_node)), memory_fraction=min(share, MAX_FRACTION),
                     pipeline_parallel=machines, tensor_parallel=cluster.gpus_per_node, ray=True)


def _on_cluster(need: int, cluster: RayCluster, count: int, gpus: list[Gpu]) -> Placement:
    """`count` GPUs of the cluster: tensor parallel within a machine (as many of its GPUs as the count takes),
    pipeline parallel over machines."""
    tensor = min(count, cluster.gpus_per_node)
    if count % tensor or count // tensor > cluster.nodes:
        raise TooBig(f"the model is set to run on {count} GPUs of the Ray cluster, which has {cluster.nodes} "
                     f"machines x {cluster.gpus_per_node} GPUs")
    gpu_total = cluster.gpu_memory or min((g.total for g in gpus), default=0)
    if not gpu_total:
        raise TooBig("the Ray cluster's GPU memory is unknown and this machine has no GPU to compare with")
    if need / count > gpu_total * MAX_FRACTION:
        raise TooBig(f"the model needs about {_gib(need)} of GPU memory; {count} GPUs of {_gib(gpu_total)} "
                     "cannot hold it")
    return Placement(tuple(range(tensor)), memory_fraction=min(need / count / gpu_total, MAX_FRACTION),
                     pipeline_parallel=count // tensor, tensor_parallel=tensor, ray=True)


def _pinned(model_format: str, need: int, gpus: list[Gpu], pinned: tuple[int, ...],
            layers: int | None, room_coming: bool) -> Placement | None:
    chosen = [g for g in gpus if g.index in pinned]
    if len(chosen) < len(set(pinned)):
        raise TooBig(f"the model is pinned to GPUs {list(pinned)}, which this machine does not have")
    indices = tuple(sorted(g.index for g in chosen))
    if model_format == "gguf":
        if _split_holds(chosen, need):
            return Placement(indices)
        return _gguf_short_of_room(need, chosen, layers, room_coming)
    share, smallest = need / len(chosen), min(g.total for g in chosen)
    if all(g.free >= share for g in chosen):
        return Placement(indices, memory_fraction=min(share / smallest, MAX_FRACTION))
    if share <= smallest * MAX_FRACTION:
        if room_coming:
            return None
        raise TooBig(f"the model needs about {_gib(share)} on each GPU it is pinned to, and other processes "
                     f"leave only {_gib(min(g.free for g in chosen))} free on one of them")
    raise TooBig(f"the model needs about {_gib(need)} of GPU memory; the GPUs it is pinned to "
                 f"({len(chosen)} x {_gib(smallest)}) cannot hold it")


def _gguf_short_of_room(need: int, gpus: list[Gpu], layers: int | None, room_coming: bool) -> Placement | None:
    """A GGUF model the free memory of `gpus` cannot hold whole: None (wait) when it would fit once idle models
    leave, else as many of its layers as fit now on them, the rest on the CPU."""
    if room_coming and _split_holds(gpus, need, total=True):
        return None  # fits once idle models leave
    offload = _layers_that_fit(layers, need, gpus)
    return Placement(tuple(sorted(g.index for g in gpus)), gpu_layers=offload) if offload > 0 else CPU


def _split_holds(gpus: list[Gpu], need: int, total: bool = False) -> bool:
    """Whether a GGUF model that needs `need` on one GPU fits split over `gpus` (free memory, or `total`): each
    GPU past the first holds a CUDA context of its own."""
    room = sum(g.total if total else g.free for g in gpus)
    return room - GGUF_GPU_CONTEXT * (len(gpus) - 1) >= need


def _layers_that_fit(layers: int | None, need: int, gpus: list[Gpu]) -> int:
    """How many of a GGUF model's layers the GPUs' free memory holds: what each GPU holds whatever its layers
    first, then layers at the model's weights and KV cache per layer (`need` less that fixed part)."""
    per_layers = sum(g.free - GGUF_GPU_FIXED for g in gpus if g.free > GGUF_GPU_FIXED)
    if not layers or per_layers <= 0:
        return 0
    return min(layers - 1, math.floor(layers * per_layers / max(1, need - GGUF_GPU_FIXED)))


def _single(model_format: str, need: int, gpu: Gpu) -> Placement:
    if model_format == "gguf":
        return Placement((gpu.index,))
    return Placement((gpu.index,), memory_fraction=min(need / gpu.total, MAX_FRACTION))
