"""The scheduler's policy, through its real code path: real runner subprocesses in their own process groups,
/health polled over loopback with real httpx, real signals. Only the engine is replaced, by the STAND-IN
runner in tests/standin/ (it loads no model and becomes healthy in milliseconds, or when a test says).

Each test drives `Scheduler.acquire / Lease.release / load / unload / snapshot / shutdown` in its own event
loop. Waits poll a condition with a short interval and a deadline; the few fixed sleeps give the scheduler a
chance to do something it must not do, and are kept short.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import gguf
import httpx
import numpy as np
import pytest
from fakehub import import_file

# tests/standin/ (pytest puts tests/ on sys.path, as tests/ has no __init__.py)
from standin.factory import StandinFactory, StandinOptions
from standin.gpus import StaticGpus

from mgr.daemon import capacity, lifecycle
from mgr.daemon.errors import LoadFailed, QueueFull, RunnerFailed
from mgr.daemon.instances import Instance, Lease, State
from mgr.daemon.scheduler import Scheduler
from mgr.registry.config import Settings
from mgr.registry.errors import MgrError
from mgr.registry.store import Store

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
MODELS = ("alpha", "beta", "gamma", "broken", "sluggish")
CONTEXT_LENGTH = 8192  # what the fake GGUFs declare; above every num_ctx used here, so nothing is clamped


# fixtures and helpers ----------------------------------------------------------------------------------
def write_tiny_gguf(path: Path, name: str, layers: int = 1, rows: int = 4) -> None:
    """A minimal but valid GGUF (a few KV fields, one tensor of `rows` x 8 floats); `name` makes each file's digest
    differ; `layers`: its block count."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_block_count(layers)
    writer.add_embedding_length(8)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.ones((rows, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("store")
    store = Store(root / "models")
    for name in MODELS:
        path = root / f"{name}.gguf"
        write_tiny_gguf(path, name)
        store.create(name, files={f"{name}.gguf": import_file(store, path)}, source={"test": "stand-in"})
    assert len({m.digest for m in store.list()}) == len(MODELS)
    return store


@dataclasses.dataclass
class Harness:
    scheduler: Scheduler
    factory: StandinFactory
    client: httpx.AsyncClient  # the tests' own, to talk to runners directly

    def loaded(self) -> dict[str, State]:
        """What the scheduler shows (as /api/ps does), by model path: {"alpha": State.READY}."""
        return {i.spec.name.rpartition(":")[0]: i.state for i in self.scheduler.live()}

    def instance(self, model: str) -> Instance:
        return self.scheduler.instances[f"{model}:latest"]

    def queued(self) -> int:
        return sum(len(i.queue) for i in self.scheduler.instances.values())


@contextlib.asynccontextmanager
async def running(store: Store, tmp_path: Path, options: dict[str, StandinOptions] | None = None,
                  gpus: StaticGpus | None = None, actual_bytes: dict[str, int] | None = None,
                  **settings: Any) -> AsyncIterator[Harness]:
    """A scheduler over the shared store with stand-in runners (on imaginary `gpus` if given, else on the
    CPU); shut down (every runner gone) afterwards."""
    config = Settings(models_dir=store.root, state_dir=tmp_path / "state", **settings)
    factory = StandinFactory(config, options, gpus, actual_bytes)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
        scheduler = Scheduler(config, store, factory, gpus=gpus or StaticGpus([]))
        try:
            yield Harness(scheduler, factory, client)
        finally:
            await scheduler.shutdown()
            for runner in factory.runners:  # a failed test must not leave a process to the next one
                if runner.pid is not None and group_alive(runner.pid):
                    os.killpg(runner.pid, signal.SIGKILL)


def run(scenario: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
    """Run one test's scenario in a fresh event loop; a hang fails the test instead of blocking the run."""
    return asyncio.run(asyncio.wait_for(scenario(), timeout))


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0, interval: float = 0.01) -> float:
    """Poll until `condition` holds; return the seconds it took. Fails the test past `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def group_alive(pid: int) -> bool:
    """Whether any process of the runner's process group (its leader's pid) is still there."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def runner_url(lease: Lease) -> str:
    return f"http://127.0.0.1:{lease.client.port}"


async def chat(client: httpx.AsyncClient, lease: Lease, stream: bool) -> list[dict[str, Any] | str] | dict[str, Any]:
    """One chat request to the lease's runner: the parsed SSE events (and "[DONE]"), or the JSON body."""
    body = {"model": lease.spec.name, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    if not stream:
        response = await client.post(f"{runner_url(lease)}/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()
    events: list[dict[str, Any] | str] = []
    async with client.stream("POST", f"{runner_url(lease)}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line:
                assert line.startswith("data: "), line
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# the stand-in itself -----------------------------------------------------------------------------------
def test_a_lease_reaches_the_standin_runner_over_http(store: Store, tmp_path: Path) -> None:
    reply = "one two three four five six"

    async def scenario() -> None:
        async with running(store, tmp_path, {"alpha": StandinOptions(reply=reply)}) as h:
            lease = await h.scheduler.acquire("alpha")
            assert lease.spec.name == "alpha:latest" and lease.instance.runner is not None
            assert lease.instance.runner.backend == "stand-in"
            events = await chat(h.client, lease, stream=True)
            assert events[-1] == "[DONE]"
            chunks = [e for e in events[:-1] if isinstance(e, dict)]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            content = [c for c in chunks if c["choices"]]
            assert len(content) > 1  # streamed in pieces, not one blob
            assert "".join(c["choices"][0]["delta"]["content"] for c in content) == reply
            assert [c["choices"][0]["finish_reason"] for c in content][-1] == "stop"
            assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(content)
            whole = await chat(h.client, lease, stream=False)
            assert isinstance(whole, dict) and whole["object"] == "chat.completion"
            assert whole["choices"][0]["message"] == {"role": "assistant", "content": reply}
            lease.release()

    run(scenario)


# admission ---------------------------------------------------------------------------------------------
def test_concurrent_first_requests_join_one_load(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, {"alpha": StandinOptions(load_seconds=0.3)}) as h:
            tasks = [asyncio.create_task(h.scheduler.acquire("alpha")) for _ in range(3)]
            await wait_until(lambda: "alpha" in h.loaded())
            assert h.loaded() == {"alpha": State.LOADING}
            assert len(h.instance("alpha").queue) == 3
            leases = await asyncio.gather(*tasks)
            assert len(h.factory.started("alpha")) == 1  # one process for all three
            assert len({lease.instance for lease in leases}) == 1
            assert len({lease.client.port for lease in leases}) == 1
            assert leases[0].instance.active == 3
            assert all(lease.load_seconds >= 0.2 for lease in leases)  # each waited for that one load
            for lease in leases:
                lease.release()
            assert leases[0].instance.active == 0

    run(scenario)


def test_parallel_cap_queues_the_rest_in_fifo_order(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, num_parallel=2) as h:
            first = await h.scheduler.acquire("alpha")
            second = await h.scheduler.acquire("alpha")  # the fast path: no queue
            instance = first.instance
            assert instance.spec.num_parallel == 2 and instance.active == 2
            granted: list[str] = []

            async def request(tag: str) -> Lease:
                lease = await h.scheduler.acquire("alpha")
                granted.append(tag)
                return lease

            tasks = {tag: asyncio.create_task(request(tag)) for tag in "cde"}
            await wait_until(lambda: len(instance.queue) == 3)
            assert granted == [] and instance.active == 2
            first.release()
            await wait_until(lambda: granted == ["c"])
            assert instance.active == 2 and len(instance.queue) == 2
            second.release()
            await wait_until(lambda: granted == ["c", "d"])
            (await tasks["c"]).release()
            await wait_until(lambda: granted == ["c", "d", "e"])
            assert not instance.queue and instance.active == 2
            (await tasks["d"]).release()
            (await tasks["e"]).release()
            assert instance.active == 0 and instance.idle
            assert len(h.factory.started("alpha")) == 1

    run(scenario)


def test_queue_bound_answers_queue_full(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, num_parallel=1, max_queue=2) as h:
            held = await h.scheduler.acquire("alpha")
            waiting = [asyncio.create_task(h.scheduler.acquire("alpha")) for _ in range(2)]
            await wait_until(lambda: h.queued() == 2)
            with pytest.raises(QueueFull) as full:
                await h.scheduler.acquire("alpha")
            assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
            with pytest.raises(QueueFull):  # the bound is over all models, and refuses before loading
                await h.scheduler.acquire("beta")
            assert h.factory.started("beta") == [] and "beta" not in h.loaded()
            # Served requests do not count: once one waiter is served, one more may wait.
            held.release()
            lease = await waiting[0]
            extra = asyncio.create_task(h.scheduler.acquire("alpha"))
            await wait_until(lambda: h.queued() == 2)
            assert not extra.done()
            lease.release()
            (await waiting[1]).release()
            (await extra).release()
            assert h.queued() == 0 and lease.instance.active == 0

    run(scenario)


# capacity ----------------------------------------------------------------------------------------------
def test_an_idle_runner_is_evicted_for_another_model(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, max_loaded_models=1) as h:
            await h.scheduler.load("alpha")
            (alpha_pid,) = h.factory.pids("alpha")
            assert h.loaded() == {"alpha": State.READY}  # keep_alive (300 s) keeps it; only eviction removes it
            lease = await h.scheduler.acquire("beta")
            assert not group_alive(alpha_pid)
            assert h.loaded() == {"beta": State.READY}
            assert group_alive(h.factory.pids("beta")[0])
            lease.release()

    run(scenario)


def test_a_busy_runner_is_never_evicted(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, max_loaded_models=1) as h:
            held = await h.scheduler.acquire("alpha")
            (alpha_pid,) = h.factory.pids("alpha")
            beta = asyncio.create_task(h.scheduler.acquire("beta"))
            await wait_until(lambda: "beta" in h.loaded())
            await asyncio.sleep(0.3)  # time enough to start a stand-in; the scheduler must not
            assert not beta.done()
            assert h.loaded() == {"alpha": State.READY, "beta": State.PENDING}
            assert h.factory.started("beta") == [] and group_alive(alpha_pid)
            held.release()
            lease = await beta
            assert not group_alive(alpha_pid)
            assert h.loaded() == {"beta": State.READY}
            lease.release()

    run(scenario)


def test_the_least_recently_used_idle_runner_is_evicted(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, max_loaded_models=2) as h:
            await h.scheduler.load("alpha")
            await h.scheduler.load("beta")
            await h.scheduler.load("alpha")  # alpha used again: beta is now the least recently used
            (alpha_pid,), (beta_pid,) = h.factory.pids("alpha"), h.factory.pids("beta")
            await h.scheduler.load("gamma")
            assert h.loaded() == {"alpha": State.READY, "gamma": State.READY}
            assert not group_alive(beta_pid) and group_alive(alpha_pid)
            assert h.factory.pids("alpha") == [alpha_pid]  # kept, not reloaded
            await h.scheduler.load("beta")  # now alpha is the least recently used
            assert h.loaded() == {"beta": State.READY, "gamma": State.READY}
            assert not group_alive(alpha_pid)

    run(scenario)


# keep-alive --------------------------------------------------------------------------------------------
def test_keep_alive_timer_starts_at_release(store: Store, tmp_path: Path) -> None:
    # Eight words in four streamed chunks with 0.15 s between events: the request holds its lease ~0.6 s,
    # twice the keep-alive, so a timer started at acquire would unload the model while it is in use.
    standin = StandinOptions(reply="a b c d e f g h", token_delay=0.15)

    async def scenario() -> None:
        async with running(store, tmp_path, {"alpha": standin}) as h:
            lease = await h.scheduler.acquire("alpha", keep_alive=0.3)
            acquired = time.monotonic()
            events = await chat(h.client, lease, stream=True)
            assert events[-1] == "[DONE]"
            assert lease.instance.state is State.READY and lease.instance.expires_at is None
            lease.release()
            released = time.monotonic()
            assert released - acquired >= 0.45
            assert lease.instance.expires_at == pytest.approx(time.time() + 0.3, abs=0.05)
            (pid,) = h.factory.pids("alpha")
            until_unload = await wait_until(lambda: lease.instance.state is not State.READY)
            assert 0.29 <= until_unload < 1.0, until_unload
            await wait_until(lambda: not group_alive(pid))
            await wait_until(lambda: h.loaded() == {})  # the unload task notices the exit a moment later

    run(scenario)


def test_keep_alive_from_settings_unloads_after_the_last_release_only(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, keep_alive=0.3) as h:
            first = await h.scheduler.acquire("alpha")
            second = await h.scheduler.acquire("alpha")
            first.release()
            await asyncio.sleep(0.4)  # past keep_alive, but a request is still running
            assert h.loaded() == {"alpha": State.READY}
            second.release()
            until_unload = await wait_until(lambda: second.instance.state is not State.READY)
            assert 0.29 <= until_unload < 1.0, until_unload

    run(scenario)


def test_keep_alive_zero_unloads_right_after_release(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, keep_alive=0) as h:
            lease = await h.scheduler.acquire("alpha")
            (pid,) = h.factory.pids("alpha")
            lease.release()
            assert lease.instance.state is State.UNLOADING  # decided in release itself, no timer
            await wait_until(lambda: not group_alive(pid), timeout=1.0)
            await wait_until(lambda: h.loaded() == {}, timeout=1.0)

    run(scenario)


def test_negative_keep_alive_keeps_the_model_loaded(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, keep_alive=0.1) as h:  # the request's -1 overrides the 0.1 s
            lease = await h.scheduler.load("alpha", keep_alive=-1)
            (pid,) = h.factory.pids("alpha")
            assert lease.instance.expiry is None and lease.instance.expires_at is None  # no timer at all
            await asyncio.sleep(0.4)
            assert h.loaded() == {"alpha": State.READY} and group_alive(pid)

    run(scenario)


# explicit unload ---------------------------------------------------------------------------------------
def test_unload_of_an_idle_model_stops_its_runner(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path) as h:
            await h.scheduler.load("alpha")
            (pid,) = h.factory.pids("alpha")
            assert await h.scheduler.unload("alpha") is True
            assert not group_alive(pid)  # unload returns once the process group is gone
            assert h.loaded() == {}
            assert await h.scheduler.unload("alpha") is False  # not loaded any more

    run(scenario)


def test_unload_of_a_busy_model_waits_for_its_request(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path) as h:
            lease = await h.scheduler.acquire("alpha", keep_alive=-1)
            (pid,) = h.factory.pids("alpha")
            assert await asyncio.wait_for(h.scheduler.unload("alpha"), 1.0) is True  # answers at once
            assert h.loaded() == {"alpha": State.READY} and group_alive(pid)  # the request keeps its runner
            lease.release()
            assert lease.instance.state is State.UNLOADING
            await wait_until(lambda: not group_alive(pid), timeout=1.0)
            await wait_until(lambda: h.loaded() == {}, timeout=1.0)

    run(scenario)


# failures ----------------------------------------------------------------------------------------------
def test_a_failed_load_fails_every_waiter_and_backs_off(store: Store, tmp_path: Path) -> None:
    options = {"broken": StandinOptions(load_seconds=0.2, fail_load=True)}

    async def scenario() -> None:
        async with running(store, tmp_path, options, max_loaded_models=1) as h:
            broken = [asyncio.create_task(h.scheduler.acquire("broken")) for _ in range(3)]
            await wait_until(lambda: h.loaded() == {"broken": State.LOADING})
            alpha = asyncio.create_task(h.scheduler.acquire("alpha"))  # waits for the one slot
            await wait_until(lambda: h.loaded().get("alpha") is State.PENDING)
            results = await asyncio.wait_for(asyncio.gather(*broken, return_exceptions=True), 5.0)
            assert all(isinstance(r, LoadFailed) for r in results), results
            for error in results:
                assert isinstance(error, LoadFailed) and error.status == 500
                assert "exited with code 3" in error.message
                assert "stand-in load failure" in error.message  # the runner's last log lines
            (runner,) = h.factory.started("broken")
            assert runner.exited.result() == 3 and not group_alive(runner.process.pid or 0)
            # The failed load gave its slot to the model waiting for one.
            lease = await asyncio.wait_for(alpha, 3.0)
            assert h.loaded() == {"alpha": State.READY}  # a FAILED model is not listed
            # Within the backoff: the same error at once, no new process.
            start = time.monotonic()
            with pytest.raises(LoadFailed) as again:
                await h.scheduler.acquire("broken")
            assert time.monotonic() - start < 0.1
            assert again.value.message == results[0].message  # type: ignore[union-attr]
            assert len(h.factory.started("broken")) == 1
            lease.release()

    run(scenario)


def test_a_failed_model_is_tried_again_after_the_backoff(store: Store, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "FAILED_BACKOFF_SECONDS", 0.3)
    options = {"broken": StandinOptions(fail_load=True)}

    async def scenario() -> None:
        async with running(store, tmp_path, options) as h:
            with pytest.raises(LoadFailed):
                await h.scheduler.acquire("broken")
            with pytest.raises(LoadFailed):
                await h.scheduler.acquire("broken")  # within the backoff: no new attempt
            assert len(h.factory.started("broken")) == 1
            await asyncio.sleep(0.3)
            with pytest.raises(LoadFailed) as retried:
                await h.scheduler.acquire("broken")
            assert len(h.factory.started("broken")) == 2  # a new load, with a new process
            assert "stand-in load failure" in retried.value.message

    run(scenario)


def test_load_timeout_fails_the_load_and_kills_the_runner(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, {"sluggish": StandinOptions(load_seconds=60)}, load_timeout=1) as h:
            start = time.monotonic()
            with pytest.raises(LoadFailed) as failed:
                await h.scheduler.acquire("sluggish")
            elapsed = time.monotonic() - start
            assert 1.0 <= elapsed < 4.0, elapsed
            assert "load_timeout" in failed.value.message
            (runner,) = h.factory.started("sluggish")
            assert runner.exited.done() and runner.exited.result() == -signal.SIGTERM
            assert not group_alive(runner.process.pid or 0)
            assert h.loaded() == {}

    run(scenario)


def test_a_crashed_runner_is_noticed_without_a_request(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, keep_alive=-1) as h:
            await h.scheduler.load("alpha")
            (old_pid,) = h.factory.pids("alpha")
            os.kill(old_pid, signal.SIGKILL)
            await wait_until(lambda: h.loaded() == {}, timeout=1.0)
            lease = await h.scheduler.acquire("alpha")
            assert len(h.factory.started("alpha")) == 2
            (new_pid,) = h.factory.pids("alpha")[1:]
            assert new_pid != old_pid and group_alive(new_pid)
            assert h.loaded() == {"alpha": State.READY}
            lease.release()

    run(scenario)


def test_a_crash_moves_queued_requests_to_a_new_runner(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, num_parallel=1, keep_alive=-1) as h:
            held = await h.scheduler.acquire("alpha")
            queued = asyncio.create_task(h.scheduler.acquire("alpha"))
            await wait_until(lambda: h.queued() == 1)
            (old_pid,) = h.factory.pids("alpha")
            os.kill(old_pid, signal.SIGKILL)
            lease = await asyncio.wait_for(queued, 3.0)
            assert lease.instance is not held.instance
            assert h.factory.pids("alpha")[1] != old_pid and len(h.factory.started("alpha")) == 2
            held.release()  # the dead runner's lease: must not touch the new instance
            assert lease.instance.active == 1 and lease.instance.state is State.READY
            lease.release()
            assert lease.instance.active == 0

    run(scenario)


def test_a_runner_that_refuses_connections_is_restarted(store: Store, tmp_path: Path) -> None:
    """Its process lives but its port refuses (a dying vLLM): the request fails, the runner is killed as hung and
    the next request gets a fresh one, instead of more refusals until the process ends by itself."""
    async def scenario() -> None:
        async with running(store, tmp_path, keep_alive=-1) as h:
            lease = await h.scheduler.acquire("alpha")
            runner = lease.instance.runner
            assert runner is not None
            (old_pid,) = h.factory.pids("alpha")
            await h.client.post(f"http://127.0.0.1:{runner.port}/standin/close-listener", json={})

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", runner.port), timeout=1).close()
                except ConnectionRefusedError:
                    return True
                return False

            await wait_until(refused, timeout=3.0)
            with pytest.raises(RunnerFailed, match="did not answer"):
                await lease.client.chat({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})
            lease.release()
            await wait_until(lambda: not group_alive(old_pid), timeout=5.0)
            # The process is gone a moment before the daemon reaps it (the runner's exit future, then _on_exit):
            # until then the old instance is still READY and would be handed out again.
            instance = lease.instance
            await wait_until(lambda: instance.state is not State.READY, timeout=5.0)
            fresh = await h.scheduler.acquire("alpha")
            assert h.factory.pids("alpha")[1:] and h.factory.pids("alpha")[-1] != old_pid
            fresh.release()

    run(scenario)


# cancellation ------------------------------------------------------------------------------------------
def test_a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, num_parallel=1) as h:
            held = await h.scheduler.acquire("alpha")
            instance = held.instance
            gone = asyncio.create_task(h.scheduler.acquire("alpha"))
            kept = asyncio.create_task(h.scheduler.acquire("alpha"))
            await wait_until(lambda: len(instance.queue) == 2)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert len(instance.queue) == 1
            held.release()
            lease = await kept  # the cancelled one took no turn
            assert instance.active == 1
            lease.release()
            assert instance.active == 0 and not instance.queue and instance.idle
            again = await asyncio.wait_for(h.scheduler.acquire("alpha"), 0.5)  # the fast path: slot free
            assert again.instance is instance and instance.active == 1
            again.release()

    run(scenario)


def test_a_waiter_cancelled_just_after_its_grant_gives_the_slot_back(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, num_parallel=1) as h:
            held = await h.scheduler.acquire("alpha")
            instance = held.instance
            waiter = asyncio.create_task(h.scheduler.acquire("alpha"))
            await wait_until(lambda: len(instance.queue) == 1)
            held.release()  # grants the waiter's lease at once...
            assert instance.active == 1 and not instance.queue
            waiter.cancel()  # ...but its task is cancelled before it could take it
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert instance.active == 0 and instance.idle

    run(scenario)


def test_a_cancelled_request_for_another_model_evicts_nothing(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, max_loaded_models=1) as h:
            held = await h.scheduler.acquire("alpha")
            beta = asyncio.create_task(h.scheduler.acquire("beta"))
            await wait_until(lambda: h.queued() == 1)
            beta.cancel()
            with pytest.raises(asyncio.CancelledError):
                await beta
            assert h.queued() == 0 and h.loaded() == {"alpha": State.READY}
            held.release()  # alpha is idle now: it must not be evicted for a request that is gone
            await asyncio.sleep(0.05)
            assert h.loaded() == {"alpha": State.READY} and h.factory.started("beta") == []

    run(scenario)


def test_a_cancelled_waiter_moved_to_a_reloading_instance_leaks_no_slot(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, {"alpha": StandinOptions(load_seconds=0.5)}, max_queue=1) as h:
            await h.scheduler.load("alpha")
            reload = asyncio.create_task(h.scheduler.acquire("alpha", num_ctx=2048))
            await wait_until(lambda: len(h.factory.started("alpha")) == 2)  # moved to the new instance
            assert h.instance("alpha").state is State.LOADING
            reload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reload
            assert h.queued() == 0
            lease = await asyncio.wait_for(h.scheduler.acquire("beta"), 3.0)  # max_queue=1 is not used up
            lease.release()

    run(scenario)


# reloads and shutdown ----------------------------------------------------------------------------------
def test_another_num_ctx_reloads_an_idle_model(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, num_ctx=4096) as h:
            first = await h.scheduler.load("alpha")
            assert first.spec.num_ctx == 4096
            (old_pid,) = h.factory.pids("alpha")
            lease = await h.scheduler.acquire("alpha", num_ctx=2048)
            assert lease.spec.num_ctx == 2048 and lease.instance is not first.instance
            assert len(h.factory.started("alpha")) == 2 and not group_alive(old_pid)
            health = await h.client.get(f"{runner_url(lease)}/health")
            assert health.json()["n_ctx"] == 2048  # the new process was started with the new spec
            lease.release()
            same = await h.scheduler.acquire("alpha", num_ctx=2048)  # same spec: no reload
            assert same.instance is lease.instance and len(h.factory.started("alpha")) == 2
            same.release()

    run(scenario)


def test_another_num_ctx_waits_for_a_busy_model_to_be_idle(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, num_ctx=4096) as h:
            held = await h.scheduler.acquire("alpha")
            reload = asyncio.create_task(h.scheduler.acquire("alpha", num_ctx=2048))
            await wait_until(lambda: h.queued() == 1)
            later = asyncio.create_task(h.scheduler.acquire("alpha"))  # the loaded spec, but behind the reload
            await wait_until(lambda: h.queued() == 2)
            assert not later.done() and len(h.factory.started("alpha")) == 1
            held.release()
            lease = await reload
            assert lease.spec.num_ctx == 2048 and len(h.factory.started("alpha")) == 2
            assert not later.done()
            lease.release()
            back = await later  # and back to 4096 once the 2048 request is done
            assert back.spec.num_ctx == 4096 and len(h.factory.started("alpha")) == 3
            back.release()

    run(scenario)


def test_shutdown_stops_every_runner(store: Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(store, tmp_path, {"gamma": StandinOptions(load_seconds=30)}) as h:
            held = await h.scheduler.acquire("alpha")  # busy
            await h.scheduler.load("beta")  # idle
            loading = asyncio.create_task(h.scheduler.acquire("gamma"))  # still loading
            await wait_until(lambda: len(h.factory.pids("gamma")) == 1)
            pids = [p for model in ("alpha", "beta", "gamma") for p in h.factory.pids(model)]
            assert len(pids) == 3 and all(group_alive(p) for p in pids)
            await asyncio.wait_for(h.scheduler.shutdown(), 5.0)
            assert not any(group_alive(p) for p in pids)
            with pytest.raises(MgrError) as waiting:
                await loading
            assert waiting.value.status == 503
            with pytest.raises(MgrError) as after:
                await h.scheduler.acquire("alpha")
            assert after.value.status == 503
            held.release()  # a request finishing after shutdown is harmless

    run(scenario)


def test_steady_traffic_to_loaded_models_does_not_starve_another(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every runner stays busy (overlapping requests, none ever idle); a third model must still load once it
    has waited STARVATION_SECONDS: the least recently used runner stops taking requests and makes room."""
    monkeypatch.setattr(capacity, "STARVATION_SECONDS", 0.3)

    async def scenario() -> None:
        async with running(store, tmp_path, max_loaded_models=2) as h:
            stop = asyncio.Event()

            async def client(model: str, offset: float) -> None:
                await asyncio.sleep(offset)
                while not stop.is_set():  # independent requests; with three clients one is always in flight
                    lease = await h.scheduler.acquire(model)
                    await asyncio.sleep(0.06)
                    lease.release()

            workers = [asyncio.create_task(client(m, i * 0.02)) for m in ("alpha", "beta") for i in range(3)]
            await wait_until(lambda: h.loaded() == {"alpha": State.READY, "beta": State.READY})
            started = time.monotonic()
            lease = await asyncio.wait_for(h.scheduler.acquire("gamma"), 5)
            waited = time.monotonic() - started
            lease.release()
            stop.set()
            await asyncio.gather(*workers)
            assert 0.3 <= waited < 3.0, waited  # not before the bound, and not for as long as the traffic lasts
            assert len(h.factory.pids("gamma")) == 1  # (once idle, gamma may be evicted for the drained model)
            assert h.scheduler.instances.get("gamma:latest") is None or not h.instance("gamma").draining

    run(scenario)
