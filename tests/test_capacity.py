"""Capacity decisions as pure functions (daemon/capacity.py): given instances as they stand, who makes room,
who drains, what is free. They must decide without changing anything; the scheduler tests
(test_scheduler_policy.py, test_placement.py, test_sleep.py) cover the same rules through real runners."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

from mgr.daemon import capacity
from mgr.daemon.gpus import Gpu
from mgr.daemon.instances import Instance, State
from mgr.daemon.placement import Placement
from mgr.daemon.runners.base import LoadSpec

GIB = 1 << 30


def _instance(name: str, state: State, last_used: float, *, active: int = 0, gpus: tuple[int, ...] = (),
              estimate: int = 0, measured: dict[int, int] | None = None) -> Instance:
    spec = LoadSpec(name=f"{name}:latest", digest="sha256:" + "0" * 64, format="gguf", model_path=Path(name),
                    num_ctx=4096, num_parallel=4, size=GIB, estimate=estimate)
    instance = Instance(spec)
    instance.state = state
    instance.last_used = last_used
    instance.active = active
    instance.placement = Placement(gpus=gpus)
    instance.measured = measured or {}
    return instance


def _state(instances: list[Instance]) -> list[tuple[State, int, bool, float]]:
    return [(i.state, i.active, i.draining, i.last_used) for i in instances]


def test_the_least_recently_used_idle_runner_is_retired_before_any_sleeper_is_unloaded() -> None:
    async def scenario() -> None:
        busy = _instance("busy", State.READY, 1.0, active=1)
        old_idle = _instance("old", State.READY, 2.0)
        new_idle = _instance("new", State.READY, 3.0)
        sleeper = _instance("sleeper", State.SLEEPING, 0.5)
        instances = [busy, old_idle, new_idle, sleeper]
        before = _state(instances)
        assert capacity.eviction_victim(instances, lambda _: True) == (old_idle, "retire")
        assert capacity.eviction_victim([busy, sleeper], lambda _: True) == (sleeper, "unload")
        assert capacity.eviction_victim([busy], lambda _: True) is None  # a busy runner is never evicted
        assert capacity.eviction_victim(instances, lambda i: i is not old_idle) == (new_idle, "retire")
        assert _state(instances) == before  # decided, changed nothing
    asyncio.run(scenario())  # Instance holds an asyncio.Event: build them inside a loop


def test_a_starved_load_drains_the_least_recently_used_busy_runner_only_after_the_bound() -> None:
    async def scenario() -> None:
        waiting = _instance("waiting", State.PENDING, 0.0)
        first = _instance("first", State.READY, 1.0, active=2)
        second = _instance("second", State.READY, 2.0, active=1)
        instances = [waiting, first, second]
        now = waiting.created
        assert capacity.starvation_victim(waiting, instances, lambda _: True, now + 1.0) is None
        later = now + capacity.STARVATION_SECONDS
        assert capacity.starvation_victim(waiting, instances, lambda _: True, later) is first
        first.draining = True  # one drains at a time
        assert capacity.starvation_victim(waiting, instances, lambda _: True, later) is None
    asyncio.run(scenario())


def test_free_memory_discounts_what_loading_and_waking_runners_will_take() -> None:
    async def scenario() -> None:
        loading = _instance("loading", State.LOADING, 0.0, gpus=(0, 1), estimate=4 * GIB)
        waking = _instance("waking", State.WAKING, 0.0, gpus=(1,), estimate=3 * GIB, measured={1: GIB})
        ready = _instance("ready", State.READY, 0.0, gpus=(0,), estimate=8 * GIB)  # NVML shows it already
        cards = [Gpu(0, "g", 80 * GIB, 20 * GIB), Gpu(1, "g", 80 * GIB, 10 * GIB)]
        snapshot = copy.deepcopy(cards)
        free = capacity.free_gpus(cards, [loading, waking, ready])
        assert [g.free for g in free] == [18 * GIB, 10 * GIB - 2 * GIB - 2 * GIB]
        assert cards == snapshot
        asleep = _instance("asleep", State.SLEEPING, 0.0, gpus=(1,), estimate=7 * GIB, measured={1: GIB})
        assert capacity.waking_share(asleep) == 6 * GIB
        assert capacity.fits_again(asleep, free) is True
        assert capacity.fits_again(asleep, [Gpu(1, "g", 80 * GIB, 5 * GIB)]) is False
    asyncio.run(scenario())


def test_only_awake_runners_count_toward_max_loaded_models() -> None:
    async def scenario() -> None:
        states = [State.PENDING, State.LOADING, State.READY, State.WAKING, State.SLEEPING, State.UNLOADING]
        instances = [_instance(s.value, s, 0.0) for s in states]
        assert capacity.live_count(instances) == 3
        sleeper_with_queue = _instance("wanted", State.SLEEPING, 0.0)
        sleeper_with_queue.queue.append(object())  # type: ignore[arg-type]
        assert capacity.waiting_loads(instances + [sleeper_with_queue]) == [instances[0], sleeper_with_queue]
    asyncio.run(scenario())
