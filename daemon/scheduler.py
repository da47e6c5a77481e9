"""The scheduler: the one place that decides which model instances exist, and who may use them.

It runs on the daemon's event loop and is the only writer of instance state, so its decisions need no locks:
no method awaits between reading state and changing it. It is two halves of one writer: this one admits
requests (leases, the queue, keep-alive), lifecycle.py loads, puts to sleep, wakes and unloads runners.
Capacity (what fits, who makes room) is decided by the pure functions of capacity.py; load specs come from
specs.py; the instance states are drawn in instances.py.

Admission: a READY instance takes up to spec.num_parallel requests at once (the fast path: no queue, no
await). Everyone else waits in that instance's FIFO queue, bounded by max_queue over all instances; past it,
QueueFull (503). Concurrent first requests for a model join the one PENDING/LOADING instance: one load.
A request whose LoadSpec differs (another num_ctx) waits at the head of the queue until the instance is idle,
then the instance is reloaded with that spec. Models that share their files (specs.runner_key: aliases from
`mgr cp`) share one instance, shown under the name last asked for; each lease still carries its own model's spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from mgr.registry.config import Settings
from mgr.registry.errors import MgrError
from mgr.registry.store import Store

from . import capacity
from .errors import LoadFailed, QueueFull, ShuttingDown
from .gpus import GpuInventory, NvmlGpus
from .instances import Instance, InstanceStatus, Lease, State, Waiter
from .lifecycle import Lifecycle
from .placement import Placement
from .runners.base import LoadSpec, Runner
from .specs import SpecBook, runner_key, same_load

log = logging.getLogger("mgr.scheduler")

RunnerFactory = Callable[[LoadSpec, Placement], Runner]


class Scheduler:
    def __init__(self, settings: Settings, store: Store, runner_factory: RunnerFactory,
                 gpus: GpuInventory | None = None) -> None:
        self.settings = settings
        self.store = store
        self.specs = SpecBook(settings, store)
        self.instances: dict[str, Instance] = {}  # by model key; at most one live instance per model
        self.unloading: set[Instance] = set()
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.lifecycle = Lifecycle(self, runner_factory, gpus if gpus is not None else NvmlGpus())

    # requests ----------------------------------------------------------------------------------------
    def spec_for(self, name: str, num_ctx: int | None = None) -> LoadSpec:
        return self.specs.spec_for(name, num_ctx)

    def try_acquire(self, name: str, num_ctx: int | None = None, keep_alive: float | None = None) -> Lease | None:
        """The fast path, without awaiting: a lease when the model is READY with a free slot and nobody
        queued before us; None when the request has to wait (then call `acquire`)."""
        if self.closed:
            raise ShuttingDown()
        spec = self.specs.spec_for(name, num_ctx)
        instance = self.find(spec)
        if instance is not None and instance.state is State.READY and same_load(instance.spec, spec) \
                and instance.active < spec.num_parallel and not instance.queue and not instance.draining:
            return self._grant(instance, self.specs.keep_alive_for(spec.name, keep_alive), None, spec)
        return None

    def find(self, spec: LoadSpec) -> Instance | None:
        """The instance of this model: under its own name, or under the name of a model with the same files
        (specs.runner_key), whose runner it then shares."""
        instance = self.instances.get(spec.name.lower())
        if instance is not None:
            return instance
        key = runner_key(spec)
        return next((i for i in self.instances.values() if runner_key(i.spec) == key), None)

    async def acquire(self, name: str, num_ctx: int | None = None, keep_alive: float | None = None) -> Lease:
        lease = self.try_acquire(name, num_ctx, keep_alive)
        if lease is not None:
            return lease
        spec = self.specs.spec_for(name, num_ctx)
        keep = self.specs.keep_alive_for(spec.name, keep_alive)
        instance = self.find(spec)
        if instance is not None and instance.state is State.FAILED:
            if time.monotonic() < instance.failed_until:
                raise LoadFailed(instance.error)
            self.forget(instance)
            instance = None
        if sum(len(i.queue) for i in self.instances.values()) >= self.settings.max_queue:
            raise QueueFull()
        if instance is None:
            instance = self.instances[spec.name.lower()] = Instance(spec)
            instance.keep_alive = keep  # kept even if every waiter leaves before the load ends
        waiter = Waiter(asyncio.get_running_loop().create_future(), spec, keep)
        instance.queue.append(waiter)
        log.debug("%s: a request waits (%s, %d in its queue)", spec.name, instance.state.value, len(instance.queue))
        self.advance(instance)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # A reload or a crash may have moved the waiter to a successor instance since it queued.
            holder = next((i for i in self.instances.values() if waiter in i.queue), None)
            if holder is not None:
                holder.queue.remove(waiter)
                if holder.state is State.PENDING and not holder.queue:
                    self.forget(holder)  # nobody waits for it: nothing to load, nothing to show in ps
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                waiter.future.result().release()
            raise

    async def load(self, name: str, num_ctx: int | None = None, keep_alive: float | None = None) -> Lease:
        """Load (or keep) a model without a request: Ollama's empty prompt. Returns the released lease."""
        lease = await self.acquire(name, num_ctx, keep_alive)
        lease.release()
        return lease

    async def unload(self, name: str) -> bool:
        """Unload now when idle; when busy, as soon as the last request ends. False if it was not loaded."""
        instance = self.instances.get(name.lower())
        if instance is None:
            try:
                instance = self.find(self.specs.spec_for(name))
            except LookupError:
                instance = None
        if instance is None or instance.state is State.FAILED:
            return False
        instance.keep_alive = 0.0
        if instance.idle or capacity.is_asleep(instance):
            self.lifecycle.begin_unload(instance)
            await instance.unloaded.wait()
        return True

    # admission ---------------------------------------------------------------------------------------
    def _grant(self, instance: Instance, keep_alive: float, arrived: float | None, spec: LoadSpec) -> Lease:
        """A lease on a READY instance for a request on `spec`'s model (the instance's, or an alias's);
        `arrived` (a queued request's) tells how long it waited for a load."""
        instance.active += 1
        instance.shown_name = spec.name
        instance.keep_alive = keep_alive
        instance.reason = "request"  # until its keep_alive runs out or it is evicted
        instance.last_used = time.monotonic()
        self.cancel_expiry(instance)
        instance.expires_at = None
        load_seconds = instance.load_seconds_for(arrived) if arrived is not None else 0.0
        return Lease(instance, load_seconds, self._release, spec)

    def _release(self, instance: Instance) -> None:
        instance.active -= 1
        instance.last_used = time.monotonic()
        if instance.state is State.READY:
            self.advance(instance)
            if instance.idle:
                self.schedule_expiry(instance)
                self.lifecycle.start_loads()  # an idle runner can now be evicted for a pending load

    def advance(self, instance: Instance) -> None:
        """Hand free slots of a READY instance to its queue, in order; start loads for PENDING ones and
        wake SLEEPING ones."""
        if instance.state in (State.PENDING, State.SLEEPING):
            self.lifecycle.start_loads()
            return
        if instance.state is not State.READY:
            return
        if instance.draining:
            if instance.active == 0:
                self.lifecycle.begin_unload(instance)  # its queue moves to a successor, loaded after the starved one
            return
        while instance.queue:
            head = instance.queue[0]
            if head.future.done():  # its request was cancelled
                instance.queue.popleft()
                continue
            if not same_load(head.spec, instance.spec):
                if instance.active == 0:
                    self.lifecycle.begin_unload(instance)  # reload with the spec the head asks for
                return
            if instance.active >= instance.spec.num_parallel:
                return
            instance.queue.popleft()
            head.future.set_result(self._grant(instance, head.keep_alive, head.arrived, head.spec))

    @staticmethod
    def reject(queue: Iterable[Waiter], error: Exception) -> None:
        """Answer every waiter that is still waiting with `error`."""
        for waiter in queue:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def requeue(self, instance: Instance) -> None:
        """Requests still queued on an instance that is going away wait for a fresh one."""
        queue = deque(w for w in instance.queue if not w.future.done())
        instance.queue.clear()
        if not queue or self.closed:
            self.reject(queue, ShuttingDown())
            return
        successor = self.find(instance.spec)
        if successor is None:
            successor = self.instances[instance.spec.name.lower()] = Instance(queue[0].spec)
        successor.queue.extend(queue)

    def forget(self, instance: Instance) -> None:
        key = next((k for k, i in self.instances.items() if i is instance), None)  # an alias's: not its name
        if key is not None:
            del self.instances[key]

    # keep-alive --------------------------------------------------------------------------------------
    def schedule_expiry(self, instance: Instance) -> None:
        self.cancel_expiry(instance)
        if instance.keep_alive < 0:
            instance.expires_at = None
        elif instance.keep_alive == 0:
            self.lifecycle.begin_unload(instance)
        else:
            instance.expires_at = time.time() + instance.keep_alive
            instance.expiry = asyncio.get_running_loop().call_later(instance.keep_alive, self._expire, instance)

    @staticmethod
    def cancel_expiry(instance: Instance) -> None:
        if instance.expiry is not None:
            instance.expiry.cancel()
            instance.expiry = None

    def _expire(self, instance: Instance) -> None:
        instance.expiry = None
        if instance.idle:
            log.info("%s: keep_alive expired", instance.spec.name)
            instance.reason = "idle"
            self.lifecycle.retire(instance)

    # tasks, visibility and shutdown ------------------------------------------------------------------
    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def live(self) -> list[Instance]:
        """Instances with or on their way to a runner, and those still unloading (for tests and status)."""
        live = [i for i in self.instances.values() if i.state is not State.FAILED]
        return sorted(live + list(self.unloading), key=lambda i: i.spec.name)

    async def status_with_caches(self) -> list[InstanceStatus]:
        """status(), each with the tokens its runner's prompt cache holds (the runners asked at once)."""
        live = self.live()
        counts = await asyncio.gather(*(i.cached_tokens() for i in live))
        return [dataclasses.replace(i.status(), cached_tokens=n) for i, n in zip(live, counts, strict=True)]

    def status(self) -> list[InstanceStatus]:
        """Frozen snapshots for /api/ps, /api/queue and `mgr ps`."""
        return [i.status() for i in self.live()]

    def stop_admitting(self) -> None:
        """The daemon drains (SIGTERM): no new leases from now on (ShuttingDown, 503), and requests still waiting
        for a slot or a load are answered so at once; requests that hold a lease go on."""
        self.closed = True
        for instance in list(self.instances.values()):
            self.reject(instance.queue, ShuttingDown())
            instance.queue.clear()

    def end_answers(self, error: MgrError) -> None:
        """The drain's deadline: every answer still coming from a runner ends now, a stream with a last error
        event (runners/http.py), which the APIs pass on as their own last line."""
        for instance in self.live():
            if instance.runner is not None:
                instance.runner.client.end_open(error)

    async def shutdown(self) -> None:
        self.closed = True
        instances = list(self.instances.values()) + list(self.unloading)
        for instance in instances:
            self.reject(instance.queue, ShuttingDown())
            instance.queue.clear()
            self.cancel_expiry(instance)
            instance.state = State.UNLOADING
        await asyncio.gather(*(i.runner.stop() for i in instances if i.runner is not None), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

