"""The scheduler: the one place that decides which model instances exist, and who may use them.

It runs on the daemon's event loop and is the only writer of instance state, so its decisions need no locks:
every method below mutates state without awaiting in between.

States of a model instance and what moves it (the table in DESIGN.md is the same):

    PENDING   --capacity free (or freed by evicting an idle LRU runner)-->  LOADING
    LOADING   --runner /health answers 200-->                                READY
    LOADING   --runner exits, load_timeout, engine missing-->                FAILED
    READY     --keep_alive expires while idle, unload, evicted, reload--> UNLOADING
    READY     --keep_alive expires while idle, or evicted, and it can sleep-> SLEEPING (vLLM warm tier)
    SLEEPING  --a request arrives and its GPUs have room again-->            WAKING --woken--> READY
    SLEEPING  --evicted for memory, unload-->                               UNLOADING
    READY/SLEEPING/WAKING --runner process exits (crash)-->                 (gone; its queue moves to a new PENDING)
    UNLOADING --process group gone-->                                       (gone)
    FAILED    --backoff elapsed and a new request arrives-->                (replaced by a new PENDING)

Admission: a READY instance takes up to spec.num_parallel requests at once (the fast path: no queue, no
await). Everyone else waits in that instance's FIFO queue, bounded by max_queue over all instances; past it,
QueueFull (503). Concurrent first requests for a model join the one PENDING/LOADING instance: one load.
A request whose LoadSpec differs (another num_ctx) waits at the head of the queue until the instance is idle,
then the instance is reloaded with that spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

import httpx
import psutil

from mgr.registry.store import Store

from .config import Settings
from .errors import ApiError, EngineUnavailable, LoadFailed, QueueFull
from .gpus import Gpu, GpuInventory, NvmlGpus
from .memory import estimate
from .placement import CPU, NeedsGpu, Placement, RayCluster, TooBig, place
from .runners.base import LoadSpec, Runner
from .runners.engines import DEFAULT_PARALLEL, make_runner

log = logging.getLogger("mgr.scheduler")

FAILED_BACKOFF_SECONDS = 5.0
# A load kept waiting this long because every runner is busy stops the least recently used runner from taking
# new requests ("draining"), so that it frees its place: without this, steady traffic to the loaded models
# would keep another model waiting for ever. Shorter waits are left alone, so bursts cause no reload churn.
STARVATION_SECONDS = 5.0

RunnerFactory = Callable[[LoadSpec, Settings, Placement], Runner]
MEMORY_RELEASE_SECONDS = 15.0  # how long an unloaded runner's GPU memory may take to show up as free


class State(enum.Enum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    SLEEPING = "sleeping"  # vLLM sleep mode: weights in host RAM (level 1) or dropped (level 2)
    WAKING = "waking"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclasses.dataclass(eq=False)
class Waiter:
    future: asyncio.Future[Lease]
    spec: LoadSpec
    keep_alive: float


class Instance:
    """One model in (or on its way into, or out of) a runner."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.state = State.PENDING
        self.runner: Runner | None = None
        self.placement: Placement = CPU
        self.measured: dict[int, int] = {}  # GPU index -> bytes its processes really use (NVML)
        self.transition: asyncio.Task[None] | None = None  # a sleep in flight
        self.sleep_level = 0
        self.active = 0
        self.queue: deque[Waiter] = deque()
        self.keep_alive = 0.0
        self.expiry: asyncio.TimerHandle | None = None
        self.expires_at: float | None = None  # wall clock; None = while busy, or never
        self.loaded_at: float | None = None  # wall clock
        self.load_started: float | None = None  # monotonic
        self.load_finished: float | None = None  # monotonic
        self.last_used = time.monotonic()
        self.error = ""
        self.failed_until = 0.0
        self.unloaded = asyncio.Event()
        self.created = time.monotonic()
        self.draining = False  # takes no new requests; unloads when its last one ends

    @property
    def idle(self) -> bool:
        return self.state is State.READY and self.active == 0 and not self.queue


class Lease:
    """The right to send one request to a runner; `release` it exactly once (it is idempotent)."""

    def __init__(self, scheduler: Scheduler, instance: Instance, load_seconds: float) -> None:
        self._scheduler = scheduler
        self.instance = instance
        self.load_seconds = load_seconds
        self.released = False

    @property
    def base_url(self) -> str:
        assert self.instance.runner is not None
        return self.instance.runner.base_url

    @property
    def spec(self) -> LoadSpec:
        return self.instance.spec

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._scheduler._release(self.instance)


class Scheduler:
    def __init__(self, settings: Settings, store: Store, client: httpx.AsyncClient,
                 runner_factory: RunnerFactory = make_runner, gpus: GpuInventory | None = None) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.runner_factory = runner_factory
        self.gpus: GpuInventory = gpus if gpus is not None else NvmlGpus()
        # What runners really used, by (digest, num_ctx, num_parallel): better than any estimate next time.
        self._learned: dict[tuple[str, int, int], int] = {}
        self._specs: dict[tuple[str, int | None], tuple[int, LoadSpec]] = {}  # by the store's generation
        self.instances: dict[str, Instance] = {}  # by model key; at most one live instance per model
        self.unloading: set[Instance] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def max_loaded(self) -> int:
        return self.settings.max_loaded_models or 3 * max(1, self._gpu_count)

    @functools.cached_property
    def _gpu_count(self) -> int:
        """How many GPUs this machine has: fixed for the daemon's life, so NVML is asked once."""
        return len(self.gpus.gpus())

    # requests ----------------------------------------------------------------------------------------
    def spec_for(self, name: str, num_ctx: int | None = None) -> LoadSpec:
        """Raises ModelNotFound for a model the store does not have. Cached until the store or what the
        scheduler learned changes: the fast path must not read manifests from disk."""
        key = (name.lower(), num_ctx)
        cached = self._specs.get(key)
        if cached is not None and cached[0] == self.store.generation:
            return cached[1]
        spec = self._build_spec(name, num_ctx)
        self._specs[key] = (self.store.generation, spec)
        return spec

    def _build_spec(self, name: str, num_ctx: int | None) -> LoadSpec:
        manifest = self.store.get(name)
        overrides = self.settings.for_model(manifest.name)
        ctx = num_ctx or overrides.num_ctx or self.settings.num_ctx
        if manifest.context_length:
            ctx = min(ctx, manifest.context_length)
        parallel = overrides.num_parallel or self.settings.num_parallel or DEFAULT_PARALLEL[manifest.format]
        arch = manifest.model_info.get("general.architecture")
        need = self._learned.get((manifest.digest, ctx, parallel)) or estimate(
            manifest.format, manifest.size, manifest.model_info, ctx, parallel)
        return LoadSpec(
            name=manifest.name,
            digest=manifest.digest,
            format=manifest.format,
            model_path=self.store.model_path(manifest),
            num_ctx=ctx,
            num_parallel=parallel,
            size=manifest.size,
            estimate=need,
            layers=int(manifest.model_info.get(f"{arch}.block_count") or 0),
            pinned=overrides.gpus,
        )

    def keep_alive_for(self, name: str, requested: float | None) -> float:
        if requested is not None:
            return requested
        override = self.settings.for_model(name).keep_alive
        return override if override is not None else self.settings.keep_alive

    def try_acquire(self, name: str, num_ctx: int | None = None, keep_alive: float | None = None) -> Lease | None:
        """The fast path, without awaiting: a lease when the model is READY with a free slot and nobody
        queued before us; None when the request has to wait (then call `acquire`)."""
        if self._closed:
            raise ApiError("the server is shutting down", 503)
        spec = self.spec_for(name, num_ctx)
        instance = self.instances.get(spec.name.lower())
        if instance is not None and instance.state is State.READY and instance.spec == spec \
                and instance.active < spec.num_parallel and not instance.queue and not instance.draining:
            return self._grant(instance, self.keep_alive_for(spec.name, keep_alive))
        return None

    async def acquire(self, name: str, num_ctx: int | None = None, keep_alive: float | None = None) -> Lease:
        lease = self.try_acquire(name, num_ctx, keep_alive)
        if lease is not None:
            return lease
        spec = self.spec_for(name, num_ctx)
        keep = self.keep_alive_for(spec.name, keep_alive)
        key = spec.name.lower()
        instance = self.instances.get(key)
        if instance is not None and instance.state is State.FAILED:
            if time.monotonic() < instance.failed_until:
                raise LoadFailed(instance.error)
            del self.instances[key]
            instance = None
        if sum(len(i.queue) for i in self.instances.values()) >= self.settings.max_queue:
            raise QueueFull()
        if instance is None:
            instance = self.instances[key] = Instance(spec)
            instance.keep_alive = keep  # kept even if every waiter leaves before the load ends
        waiter = Waiter(asyncio.get_running_loop().create_future(), spec, keep)
        instance.queue.append(waiter)
        arrived = time.monotonic()
        self._advance(instance)
        try:
            lease = await waiter.future
        except asyncio.CancelledError:
            # A reload or a crash may have moved the waiter to a successor instance since it queued.
            holder = next((i for i in self.instances.values() if waiter in i.queue), None)
            if holder is not None:
                holder.queue.remove(waiter)
                if holder.state is State.PENDING and not holder.queue:
                    self._forget(holder)  # nobody waits for it: nothing to load, nothing to show in ps
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                waiter.future.result().release()
            raise
        lease_instance = lease.instance
        if lease_instance.load_finished is not None and lease_instance.load_started is not None \
                and lease_instance.load_finished > arrived:
            lease.load_seconds = lease_instance.load_finished - max(arrived, lease_instance.load_started)
        return lease

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
                instance = self.instances.get(self.store.get(name).name.lower())
            except LookupError:
                instance = None
        if instance is None or instance.state is State.FAILED:
            return False
        instance.keep_alive = 0.0
        if instance.idle or self._asleep(instance):
            self._begin_unload(instance)
            await instance.unloaded.wait()
        return True

    # transitions -------------------------------------------------------------------------------------
    def _grant(self, instance: Instance, keep_alive: float) -> Lease:
        """A lease on a READY instance; `acquire` sets load_seconds on it when the request waited for a load."""
        instance.active += 1
        instance.keep_alive = keep_alive
        instance.last_used = time.monotonic()
        self._cancel_expiry(instance)
        instance.expires_at = None
        return Lease(self, instance, 0.0)

    @staticmethod
    def _cancel_expiry(instance: Instance) -> None:
        if instance.expiry is not None:
            instance.expiry.cancel()
            instance.expiry = None

    @staticmethod
    def _reject(queue: Iterable[Waiter], error: Exception) -> None:
        """Answer every waiter that is still waiting with `error`."""
        for waiter in queue:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _release(self, instance: Instance) -> None:
        instance.active -= 1
        instance.last_used = time.monotonic()
        if instance.state is State.READY:
            self._advance(instance)
            if instance.idle:
                self._schedule_expiry(instance)
                self._start_loads()  # an idle runner can now be evicted for a pending load

    def _advance(self, instance: Instance) -> None:
        """Hand free slots of a READY instance to its queue, in order; start loads for PENDING ones and
        wake SLEEPING ones."""
        if instance.state in (State.PENDING, State.SLEEPING):
            self._start_loads()
            return
        if instance.state is not State.READY:
            return
        if instance.draining:
            if instance.active == 0:
                self._begin_unload(instance)  # its queue moves to a successor, which loads after the starved one
            return
        while instance.queue:
            head = instance.queue[0]
            if head.future.done():  # its request was cancelled
                instance.queue.popleft()
                continue
            if head.spec != instance.spec:
                if instance.active == 0:
                    self._begin_unload(instance)  # reload with the spec the head asks for
                return
            if instance.active >= instance.spec.num_parallel:
                return
            instance.queue.popleft()
            head.future.set_result(self._grant(instance, head.keep_alive))

    def _schedule_expiry(self, instance: Instance) -> None:
        self._cancel_expiry(instance)
        if instance.keep_alive < 0:
            instance.expires_at = None
        elif instance.keep_alive == 0:
            self._begin_unload(instance)
        else:
            instance.expires_at = time.time() + instance.keep_alive
            instance.expiry = asyncio.get_running_loop().call_later(instance.keep_alive, self._expire, instance)

    def _expire(self, instance: Instance) -> None:
        instance.expiry = None
        if instance.idle:
            log.info("%s: keep_alive expired", instance.spec.name)
            self._retire(instance)

    def _retire(self, instance: Instance) -> None:
        """Take an idle runner off its GPU: to sleep when its engine can (it wakes in well under a second
        where a cold start takes a minute or more), else unloaded."""
        if self._can_sleep(instance):
            self._begin_sleep(instance)
        else:
            self._begin_unload(instance)

    def _can_sleep(self, instance: Instance) -> bool:
        return self.settings.vllm_sleep and bool(instance.placement.gpus) \
            and instance.runner is not None and instance.runner.supports_sleep

    @staticmethod
    def _asleep(instance: Instance) -> bool:
        """Asleep and settled: no sleep in flight, nobody waiting for it to wake."""
        return instance.state is State.SLEEPING and instance.transition is None and not instance.queue

    def _live_count(self) -> int:
        awake = (State.LOADING, State.READY, State.WAKING)
        return sum(1 for i in self.instances.values() if i.state in awake)

    def _start_loads(self) -> None:
        """Start PENDING loads in arrival order while there is room: under max_loaded_models and in GPU
        memory. Room is made by evicting idle runners, least recently used first; a busy runner is never
        evicted, and the load then waits."""
        promised = len(self.unloading)  # slots and memory that come back when those runners are gone
        waiting = [i for i in self.instances.values() if i.state is State.PENDING
                   or (i.state is State.SLEEPING and i.queue and i.transition is None)]
        for instance in waiting:
            if not instance.queue:
                self._forget(instance)
                continue
            if self._live_count() + len(self.unloading) >= self.max_loaded:
                if promised > 0:
                    promised -= 1
                    continue
                if not self._evict_one(lambda _: True):
                    self._drain_for(instance, lambda _: True)
                    return
                continue
            spec = instance.spec
            if instance.state is State.SLEEPING:  # it can only wake where its process lives
                placement: Placement | None = instance.placement if self._fits_again(instance) else None
            else:
                try:
                    placement = place(spec.format, spec.estimate, self._free_gpus(), spec.pinned, spec.layers,
                                      self._ray_cluster())
                except TooBig as e:
                    error = EngineUnavailable(str(e)) if isinstance(e, NeedsGpu) else LoadFailed(str(e))
                    self._fail(instance, str(e), error)
                    continue
            if placement is None:  # fits only once other models leave the GPUs
                if self.unloading or any(i.transition is not None for i in self.instances.values()):
                    return  # memory is on its way back
                if not self._evict_one(lambda i: bool(i.placement.gpus) and i is not instance):
                    self._drain_for(instance, lambda i: bool(i.placement.gpus))
                    return
                continue
            if instance.state is State.SLEEPING:
                self._begin_wake(instance)
            else:
                self._begin_load(instance, placement)

    def _drain_for(self, waiting: Instance, eligible: Callable[[Instance], bool]) -> None:
        """Every runner is busy: once `waiting` has waited STARVATION_SECONDS, stop feeding the least recently
        used busy runner so that it frees its place. The check runs again at every release."""
        if time.monotonic() - waiting.created < STARVATION_SECONDS:
            if waiting.expiry is None:  # look again when the bound is reached, even if nothing is released
                delay = STARVATION_SECONDS - (time.monotonic() - waiting.created) + 0.01
                waiting.expiry = asyncio.get_running_loop().call_later(delay, self._recheck, waiting)
            return
        busy = [i for i in self.instances.values()
                if i.state is State.READY and i is not waiting and eligible(i)]
        if not busy or any(i.draining for i in busy):
            return
        victim = min(busy, key=lambda i: i.last_used)
        log.info("%s: draining to make room for %s, which has waited %.1fs", victim.spec.name,
                 waiting.spec.name, time.monotonic() - waiting.created)
        victim.draining = True
        self._advance(victim)

    def _recheck(self, waiting: Instance) -> None:
        waiting.expiry = None
        self._start_loads()

    def _ray_cluster(self) -> RayCluster | None:
        if self.settings.ray_address is None:
            return None
        per_node = self.settings.ray_gpus_per_node or self._gpu_count
        return RayCluster(self.settings.ray_nodes, per_node) if per_node else None

    def _evict_one(self, eligible: Callable[[Instance], bool]) -> bool:
        """Make room: the least recently used idle runner goes to sleep (or is unloaded when it cannot
        sleep); only when no awake runner is idle does a sleeping one give up its process."""
        idle = [i for i in self.instances.values() if i.idle and eligible(i)]
        if idle:
            victim = min(idle, key=lambda i: i.last_used)
            log.info("%s: evicted (least recently used) to make room", victim.spec.name)
            self._retire(victim)
            return True
        asleep = [i for i in self.instances.values() if self._asleep(i) and eligible(i)]
        if asleep:
            victim = min(asleep, key=lambda i: i.last_used)
            log.info("%s: asleep and least recently used: unloaded to make room", victim.spec.name)
            self._begin_unload(victim)
            return True
        return False

    def _fits_again(self, instance: Instance) -> bool:
        """Whether a sleeping runner's GPUs have room for what waking takes back."""
        share = self._waking_share(instance)
        free = {g.index: g.free for g in self._free_gpus()}
        return all(free.get(index, 0) >= share for index in instance.placement.gpus)

    @staticmethod
    def _waking_share(instance: Instance) -> int:
        """What waking takes back on each of its GPUs: the estimate less what the sleeper still holds."""
        need = max(0, instance.spec.estimate - sum(instance.measured.values()))
        return need // max(1, len(instance.placement.gpus))

    def _free_gpus(self) -> list[Gpu]:
        """GPUs with what is free for a new runner: NVML's free memory less what loading runners will take
        (NVML does not show it yet)."""
        reserved: dict[int, int] = {}
        for instance in self.instances.values():
            if instance.state is State.LOADING and instance.placement.gpus:
                share = instance.spec.estimate // len(instance.placement.gpus)
            elif instance.state is State.WAKING and instance.placement.gpus:
                share = self._waking_share(instance)
            else:
                continue
            for index in instance.placement.gpus:
                reserved[index] = reserved.get(index, 0) + share
        return [Gpu(g.index, g.name, g.total, max(0, g.free - reserved.get(g.index, 0))) for g in self.gpus.gpus()]

    def _begin_sleep(self, instance: Instance) -> None:
        instance.state = State.SLEEPING
        instance.expires_at = None
        # Level 1 keeps the weights in host RAM (a fast wake); without room for them, level 2 drops them.
        level = 1 if psutil.virtual_memory().available >= instance.spec.size * 1.2 + (1 << 30) else 2
        instance.transition = self._spawn(self._sleep(instance, level))

    async def _sleep(self, instance: Instance, level: int) -> None:
        try:
            assert instance.runner is not None
            await instance.runner.sleep(self.client, level)
        except Exception as e:
            instance.transition = None
            log.warning("%s: could not sleep (%s); unloading instead", instance.spec.name, e)
            if instance.state is State.SLEEPING:
                self._begin_unload(instance)
            return
        instance.transition = None
        if instance.state is not State.SLEEPING:
            return  # it crashed or the daemon stopped meanwhile
        instance.sleep_level = level
        self._measure(instance)  # what it still holds on the GPU asleep
        log.info("%s: asleep (level %d)", instance.spec.name, level)
        if instance.keep_alive == 0 and not instance.queue:
            self._begin_unload(instance)  # `unload` was asked while it fell asleep
        self._start_loads()  # its memory is back; and it wakes if requests came meanwhile

    def _begin_wake(self, instance: Instance) -> None:
        instance.state = State.WAKING
        instance.load_started = time.monotonic()
        self._spawn(self._wake(instance))

    async def _wake(self, instance: Instance) -> None:
        try:
            assert instance.runner is not None
            await instance.runner.wake(self.client, instance.sleep_level)
        except Exception as e:
            log.warning("%s: could not wake (%s); starting it again", instance.spec.name, e)
            if instance.state is State.WAKING:
                self._begin_unload(instance)  # its waiters move to a fresh load
            return
        if instance.state is not State.WAKING:
            return
        instance.sleep_level = 0
        instance.state = State.READY
        instance.load_finished = time.monotonic()
        self._measure(instance)
        log.info("%s: awake in %.2fs", instance.spec.name, instance.load_finished - (instance.load_started or 0))
        self._advance(instance)
        if instance.idle:
            self._schedule_expiry(instance)

    def _begin_load(self, instance: Instance, placement: Placement) -> None:
        instance.state = State.LOADING
        instance.placement = placement
        instance.load_started = time.monotonic()
        self._spawn(self._load(instance))

    async def _load(self, instance: Instance) -> None:
        try:
            runner = instance.runner = self.runner_factory(instance.spec, self.settings, instance.placement)
            log.info("%s: loading on %s (%s)", instance.spec.name, runner.backend, instance.placement.processor)
            await runner.start(self.client, self.settings.load_timeout)
        except asyncio.CancelledError:
            if instance.runner is not None:  # the daemon is stopping: leave no runner behind
                await instance.runner.stop()
            raise
        except Exception as e:
            message = e.message if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
            if instance.runner is not None:
                await instance.runner.stop()
            self._fail(instance, message, e if isinstance(e, ApiError) else None)
            return
        if instance.state is not State.LOADING:  # shut down meanwhile
            await runner.stop()
            return
        instance.state = State.READY
        self._measure(instance)
        instance.loaded_at = time.time()
        instance.load_finished = time.monotonic()
        log.info("%s: ready in %.1fs", instance.spec.name, instance.load_finished - (instance.load_started or 0))
        runner.exited.add_done_callback(lambda _: self._on_exit(instance))
        self._advance(instance)
        if instance.idle:
            self._schedule_expiry(instance)

    def _measure(self, instance: Instance) -> None:
        """Learn what the runner really takes on its GPUs; the next load of this model uses that number."""
        pid = instance.runner.process.pid if instance.runner is not None else None
        if not instance.placement.gpus or pid is None:
            return
        instance.measured = self.gpus.used_by(pid)
        # llama.cpp takes what it needs, so its measured use is the better estimate next time. vLLM takes the
        # share it is granted plus its CUDA context: learning that would grow its share at every reload.
        if instance.measured and instance.spec.format == "gguf":
            spec = instance.spec
            self._learned[(spec.digest, spec.num_ctx, spec.num_parallel)] = sum(instance.measured.values())
            # the cached specs of this model estimated from what we knew before; other models' stay right
            self._specs = {key: cached for key, cached in self._specs.items() if cached[1].digest != spec.digest}

    def _fail(self, instance: Instance, message: str, error: ApiError | None) -> None:
        if not self._closed:  # at shutdown the runner was stopped on purpose
            log.warning("%s: load failed: %s", instance.spec.name, message)
        instance.state = State.FAILED
        instance.error = message
        instance.failed_until = time.monotonic() + FAILED_BACKOFF_SECONDS
        self._reject(instance.queue, error if error is not None else LoadFailed(message))
        instance.queue.clear()
        instance.unloaded.set()
        self._start_loads()

    def _on_exit(self, instance: Instance) -> None:
        if instance.state not in (State.READY, State.SLEEPING, State.WAKING):
            return  # an unload or a shutdown we asked for
        code = instance.runner.exited.result() if instance.runner else None
        log.warning("%s: runner exited unexpectedly (code %s)", instance.spec.name, code)
        instance.state = State.UNLOADING  # in-flight requests see their connection break
        self._forget(instance)
        instance.unloaded.set()
        self._requeue(instance)
        self._start_loads()

    def _begin_unload(self, instance: Instance) -> None:
        self._cancel_expiry(instance)
        instance.state = State.UNLOADING
        self._forget(instance)
        self.unloading.add(instance)
        self._requeue(instance)
        self._spawn(self._unload(instance))

    async def _unload(self, instance: Instance) -> None:
        try:
            if instance.runner is not None:
                await instance.runner.stop()
                await self._memory_released(instance)
        finally:
            self.unloading.discard(instance)
            instance.unloaded.set()
            log.info("%s: unloaded", instance.spec.name)
            self._start_loads()

    async def _memory_released(self, instance: Instance) -> None:
        """The GPU memory of a stopped runner counts as free only once NVML no longer shows it in use."""
        pid = instance.runner.process.pid if instance.runner is not None else None
        if not instance.placement.gpus or pid is None:
            return
        deadline = time.monotonic() + MEMORY_RELEASE_SECONDS
        while self.gpus.used_by(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def _requeue(self, instance: Instance) -> None:
        """Requests still queued on an instance that is going away wait for a fresh one."""
        queue = deque(w for w in instance.queue if not w.future.done())
        instance.queue.clear()
        if not queue or self._closed:
            self._reject(queue, ApiError("the server is shutting down", 503))
            return
        key = instance.spec.name.lower()
        successor = self.instances.get(key)
        if successor is None:
            successor = self.instances[key] = Instance(queue[0].spec)
        successor.queue.extend(queue)

    def _forget(self, instance: Instance) -> None:
        key = instance.spec.name.lower()
        if self.instances.get(key) is instance:
            del self.instances[key]

    def _spawn(self, coroutine: object) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # visibility and shutdown -------------------------------------------------------------------------
    def snapshot(self) -> list[Instance]:
        live = [i for i in self.instances.values() if i.state is not State.FAILED]
        return sorted(live + list(self.unloading), key=lambda i: i.spec.name)

    async def shutdown(self) -> None:
        self._closed = True
        instances = list(self.instances.values()) + list(self.unloading)
        for instance in instances:
            self._reject(instance.queue, ApiError("the server is shutting down", 503))
            instance.queue.clear()
            self._cancel_expiry(instance)
            instance.state = State.UNLOADING
        await asyncio.gather(*(i.runner.stop() for i in instances if i.runner is not None), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
