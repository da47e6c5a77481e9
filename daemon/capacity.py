"""Capacity as pure functions over the instances as they are now: what is free on each GPU, what fits, who
makes room, who drains for a starved load. They decide and return; they neither log nor change anything (the
scheduler does both with what they return), as llama-swap's EvictionFor."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Literal

from .gpus import Gpu
from .instances import Instance, State

# A load kept waiting this long because every runner is busy stops the least recently used runner from taking
# new requests ("draining"), so that it frees its place: without this, steady traffic to the loaded models
# would keep another model waiting for ever. Shorter waits are left alone, so bursts cause no reload churn.
STARVATION_SECONDS = 5.0

Eligible = Callable[[Instance], bool]
Eviction = tuple[Instance, Literal["retire", "unload"]]


def is_asleep(instance: Instance) -> bool:
    """Asleep and settled: no sleep in flight, nobody waiting for it to wake."""
    return instance.state is State.SLEEPING and instance.transition is None and not instance.queue


def live_count(instances: Iterable[Instance]) -> int:
    """Runners that count toward max_loaded_models (sleeping ones do not)."""
    return sum(1 for i in instances if i.state in (State.LOADING, State.READY, State.WAKING))


def waiting_loads(instances: Iterable[Instance]) -> list[Instance]:
    """Instances that want a runner, in arrival order: new loads, and sleepers someone waits for."""
    return [i for i in instances if i.state is State.PENDING
            or (i.state is State.SLEEPING and i.queue and i.transition is None)]


def waking_share(instance: Instance) -> int:
    """What waking takes back on each of its GPUs: the estimate less what the sleeper still holds."""
    need = max(0, instance.spec.estimate - sum(instance.measured.values()))
    return need // max(1, len(instance.placement.gpus))


def free_gpus(gpus: Iterable[Gpu], instances: Iterable[Instance]) -> list[Gpu]:
    """GPUs with what is free for a new runner: NVML's free memory less what loading and waking runners will
    take (NVML does not show it yet)."""
    reserved: dict[int, int] = {}
    for instance in instances:
        if instance.state is State.LOADING and instance.placement.gpus:
            share = instance.spec.estimate // len(instance.placement.gpus)
        elif instance.state is State.WAKING and instance.placement.gpus:
            share = waking_share(instance)
        else:
            continue
        for index in instance.placement.gpus:
            reserved[index] = reserved.get(index, 0) + share
    return [Gpu(g.index, g.name, g.total, max(0, g.free - reserved.get(g.index, 0))) for g in gpus]


def room_coming(instance: Instance, instances: Iterable[Instance], unloading: Sized) -> bool:
    """Some other model of ours holds GPU memory, or is leaving. Without one, nothing we could evict would free
    any: what is free is all there will be (another process holds the rest)."""
    return bool(unloading) or any(other is not instance and other.placement.gpus for other in instances)


def fits_again(sleeper: Instance, free: Iterable[Gpu]) -> bool:
    """Whether a sleeping runner's GPUs have room for what waking takes back."""
    share = waking_share(sleeper)
    room = {g.index: g.free for g in free}
    return all(room.get(index, 0) >= share for index in sleeper.placement.gpus)


def eviction_victim(instances: Iterable[Instance], eligible: Eligible) -> Eviction | None:
    """Who makes room: the least recently used idle runner is retired (put to sleep, or unloaded when it
    cannot sleep); only when no awake runner is idle does a sleeping one give up its process."""
    candidates = [i for i in instances if eligible(i)]
    idle = [i for i in candidates if i.idle]
    if idle:
        return min(idle, key=lambda i: i.last_used), "retire"
    asleep = [i for i in candidates if is_asleep(i)]
    if asleep:
        return min(asleep, key=lambda i: i.last_used), "unload"
    return None


def starvation_victim(waiting: Instance, instances: Iterable[Instance], eligible: Eligible,
                      now: float) -> Instance | None:
    """Every runner is busy: once `waiting` has waited STARVATION_SECONDS, the least recently used busy runner
    should drain; None while the wait is shorter, or when one is draining already."""
    if now - waiting.created < STARVATION_SECONDS:
        return None
    busy = [i for i in instances if i.state is State.READY and i is not waiting and eligible(i)]
    if not busy or any(i.draining for i in busy):
        return None
    return min(busy, key=lambda i: i.last_used)
