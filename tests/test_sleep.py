"""The vLLM warm tier, through the scheduler's real code path with stand-in runners that answer vLLM's sleep
endpoints, on imaginary GPUs: keep-alive expiry puts a model to sleep instead of killing it, a request wakes
the same process, eviction sleeps before it kills, and a sleeping model gives way when memory is needed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from standin.factory import StandinOptions
from standin.gpus import StaticGpus
from test_scheduler_policy import group_alive, run, running, store, wait_until  # noqa: F401 (store: fixture)

from mgr.daemon.scheduler import State
from mgr.registry.store import Store

MIB = 1 << 20
SLEEPER = {"alpha": StandinOptions(sleeps=True), "gamma": StandinOptions(sleeps=True)}


async def put_to_sleep(h, model: str) -> int:  # type: ignore[no-untyped-def]
    """Use the model once with a short keep_alive and wait until it is asleep; returns its runner's pid."""
    (await h.scheduler.acquire(model, keep_alive=0.1)).release()
    await wait_until(lambda: h.loaded() == {model: State.SLEEPING} and h.instance(model).transition is None)
    return h.factory.pids(model)[0]


def test_keep_alive_expiry_sleeps_and_a_request_wakes_the_same_process(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([2000 * MIB])

    async def scenario() -> None:
        async with running(store, tmp_path, SLEEPER, gpus=cards) as h:
            (await h.scheduler.acquire("alpha", keep_alive=0.2)).release()
            pid = h.factory.pids("alpha")[0]
            await wait_until(lambda: h.loaded() == {"alpha": State.SLEEPING} and h.instance("alpha").transition is None)
            assert os.path.exists(f"/proc/{pid}")  # asleep, not killed
            awake_bytes = h.instance("alpha").spec.estimate
            assert sum(cards.used_by(pid).values()) == awake_bytes // 10  # most of its GPU memory is back
            lease = await h.scheduler.acquire("alpha")
            assert h.loaded() == {"alpha": State.READY} and h.factory.pids("alpha") == [pid]  # same process
            assert lease.load_seconds < 1.0 and sum(cards.used_by(pid).values()) == awake_bytes
            lease.release()

    run(scenario)


def test_eviction_sleeps_before_it_kills(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([1000 * MIB])  # one model awake at a time

    async def scenario() -> None:
        async with running(store, tmp_path, SLEEPER, gpus=cards, max_loaded_models=5) as h:
            (await h.scheduler.acquire("alpha")).release()
            alpha_pid = h.factory.pids("alpha")[0]
            (await h.scheduler.acquire("beta")).release()  # alpha is idle: put to sleep for beta's memory
            assert h.loaded() == {"alpha": State.SLEEPING, "beta": State.READY}
            assert group_alive(alpha_pid)
            lease = await h.scheduler.acquire("alpha")  # beta cannot sleep: unloaded; alpha wakes
            assert h.loaded() == {"alpha": State.READY} and h.factory.pids("alpha") == [alpha_pid]
            lease.release()
            (await h.scheduler.acquire("gamma")).release()  # alpha sleeps again for gamma
            assert h.loaded() == {"alpha": State.SLEEPING, "gamma": State.READY}
            # gamma busy, alpha asleep: beta needs the memory of the sleeper, not of the busy runner
            busy = await h.scheduler.acquire("gamma")
            beta = asyncio.ensure_future(h.scheduler.acquire("beta"))
            await wait_until(lambda: "alpha" not in h.loaded())  # the sleeper gave up its process
            await wait_until(lambda: not group_alive(alpha_pid))
            assert not beta.done()  # 1000 MiB: still no room next to busy gamma
            busy.release()
            (await beta).release()

    run(scenario)


def test_models_on_the_cpu_never_sleep(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, SLEEPER) as h:  # no GPUs at all
            (await h.scheduler.acquire("alpha", keep_alive=0.1)).release()
            await wait_until(lambda: "alpha" not in h.loaded())

    run(scenario)


def test_unload_of_a_sleeping_model_ends_its_process(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([2000 * MIB])

    async def scenario() -> None:
        async with running(store, tmp_path, SLEEPER, gpus=cards) as h:
            pid = await put_to_sleep(h, "alpha")
            assert await h.scheduler.unload("alpha")
            assert h.loaded() == {} and not group_alive(pid) and cards.used_by(pid) == {}

    run(scenario)


def test_a_sleeping_runner_that_crashes_is_forgotten(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([2000 * MIB])

    async def scenario() -> None:
        async with running(store, tmp_path, SLEEPER, gpus=cards) as h:
            pid = await put_to_sleep(h, "alpha")
            os.kill(pid, 9)
            await wait_until(lambda: h.loaded() == {})
            lease = await h.scheduler.acquire("alpha")
            assert h.factory.pids("alpha")[-1] != pid and lease.instance.state is State.READY
            lease.release()

    run(scenario)
