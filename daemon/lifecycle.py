"""The scheduler's other half: runners in and out of memory. Starting loads while there is room (making room
by evicting or draining, as capacity.py decides), and the transitions load, sleep, wake, unload, fail and
crash. Like scheduler.py it never awaits between reading state and changing it; the awaits are the runner's
own work (start, sleep, wake, stop), after which state is checked again."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Literal

import psutil

from mgr.registry.errors import MgrError

from . import capacity, metrics
from .errors import EngineUnavailable, LoadFailed
from .gpus import Gpu, GpuInventory
from .instances import Instance, State
from .placement import NeedsGpu, Placement, RayCluster, TooBig, place
from .ray_cluster import RayReading, RayUnavailable, read_cluster
from .runners.base import LoadSpec
from .runners.process import kill_group

if TYPE_CHECKING:
    from .scheduler import RunnerFactory, Scheduler

log = logging.getLogger("mgr.scheduler")

FAILED_BACKOFF_SECONDS = 5.0
MEMORY_RELEASE_SECONDS = 15.0  # how long an unloaded runner's GPU memory may take to show up as free


def _other_on_a_gpu(loading: Instance, other: Instance) -> bool:
    return bool(other.placement.gpus) and other is not loading


class Lifecycle:
    def __init__(self, scheduler: Scheduler, runner_factory: RunnerFactory, gpus: GpuInventory) -> None:
        self.scheduler = scheduler
        self.settings = scheduler.settings
        self.runner_factory = runner_factory
        self.gpus = gpus
        self._gpu_count: int | None = None
        self._killed: set[int] = set()  # runners killed as hung, until their exit is seen
        self._gpu_memory: int | None = None
        scheduler.specs.gpu_memory = lambda: self.gpu_memory  # default contexts follow the GPUs' memory
        self.ray: RayReading | None = None  # the Ray cluster as last read (at start, then before each Ray load)
        self._first_ray_read: asyncio.Task[None] | None = None

    @property
    def gpu_count(self) -> int:
        """How many GPUs this machine has: fixed for the daemon's life, so NVML is asked once."""
        if self._gpu_count is None:
            self._gpu_count = len(self.gpus.gpus())
        return self._gpu_count

    @property
    def gpu_memory(self) -> int:
        """The GPUs' total memory in bytes (0 without GPUs): fixed for the daemon's life, so NVML is asked once."""
        if self._gpu_memory is None:
            self._gpu_memory = sum(gpu.total for gpu in self.gpus.gpus())
        return self._gpu_memory

    @property
    def max_loaded(self) -> int:
        return self.settings.max_loaded_models or 3 * max(1, self.gpu_count)

    # deciding ----------------------------------------------------------------------------------------
    def start_loads(self) -> None:
        """Start PENDING loads (and wake sleepers someone waits for) in arrival order while there is room:
        under max_loaded_models and in GPU memory. Room is made by evicting idle runners, least recently used
        first; a busy runner is never evicted, and the load then waits (or, starved, drains one)."""
        scheduler = self.scheduler
        instances = scheduler.instances
        promised = len(scheduler.unloading)  # slots and memory that come back when those runners are gone
        for instance in capacity.waiting_loads(instances.values()):
            if not instance.queue:
                scheduler.forget(instance)
                continue
            if capacity.live_count(instances.values()) + len(scheduler.unloading) >= self.max_loaded:
                if promised > 0:
                    promised -= 1
                    continue
                if not self._evict(lambda _: True):
                    self._drain_for(instance, lambda _: True)
                    return
                continue
            if instance.spec.format == "safetensors" and self._first_ray_read and not self._first_ray_read.done():
                continue  # placed once the Ray cluster has been read at start (start_loads runs again then)
            placement = self._placement(instance)
            if placement == "failed":
                continue  # it cannot be placed at all
            if placement is None:  # fits only once other models leave the GPUs
                if scheduler.unloading or any(i.transition is not None for i in instances.values()):
                    return  # memory is on its way back
                if not self._evict(functools.partial(_other_on_a_gpu, instance)):
                    self._drain_for(instance, lambda i: bool(i.placement.gpus))
                    return
                continue
            if instance.state is State.SLEEPING:
                self._begin_wake(instance)
            else:
                self._begin_load(instance, placement)

    def _placement(self, instance: Instance) -> Placement | None | Literal["failed"]:
        """Where it goes now; None when it fits only once others leave; "failed" when it never fits."""
        free = capacity.free_gpus(self.gpus.gpus(), self.scheduler.instances.values())
        if instance.state is State.SLEEPING:  # it can only wake where its process lives
            return instance.placement if capacity.fits_again(instance, free) else None
        spec = instance.spec
        ray_gpus = self.settings.for_model(spec.name).ray_gpus
        room_coming = capacity.room_coming(instance, self.scheduler.instances.values(), self.scheduler.unloading)
        try:
            try:
                return place(spec.format, spec.estimate, free, spec.pinned, spec.layers, self._ray_cluster(), ray_gpus,
                             room_coming)
            except TooBig as e:
                if not ray_gpus or isinstance(e, NeedsGpu):
                    raise
                local = place(spec.format, spec.estimate, free, spec.pinned, spec.layers)  # fits here after all?
                log.warning("%s: %s; placed on this machine instead", spec.name, e)
                return local
        except TooBig as e:
            self._fail(instance, str(e), EngineUnavailable(str(e)) if isinstance(e, NeedsGpu) else LoadFailed(str(e)))
            return "failed"

    def _evict(self, eligible: capacity.Eligible) -> bool:
        choice = capacity.eviction_victim(self.scheduler.instances.values(), eligible)
        if choice is None:
            return False
        victim, how = choice
        victim.reason = "evicted"
        if how == "retire":
            log.info("%s: evicted (least recently used) to make room", victim.spec.name)
            self.retire(victim)
        else:
            log.info("%s: asleep and least recently used: unloaded to make room", victim.spec.name)
            self.begin_unload(victim)
        return True

    def _drain_for(self, waiting: Instance, eligible: capacity.Eligible) -> None:
        """Every runner is busy: once `waiting` has waited long enough, stop feeding the least recently used
        busy runner so that it frees its place. Until then, look again when the bound is reached."""
        now = time.monotonic()
        victim = capacity.starvation_victim(waiting, self.scheduler.instances.values(), eligible, now)
        if victim is None:
            left = capacity.STARVATION_SECONDS - (now - waiting.created)
            if left > 0 and waiting.expiry is None:
                waiting.expiry = asyncio.get_running_loop().call_later(left + 0.01, self._recheck, waiting)
            return
        log.info("%s: draining to make room for %s, which has waited %.1fs", victim.spec.name,
                 waiting.spec.name, now - waiting.created)
        victim.draining = True
        self.scheduler.advance(victim)

    def _recheck(self, waiting: Instance) -> None:
        waiting.expiry = None
        self.start_loads()

    def _ray_cluster(self) -> RayCluster | None:
        if self.settings.ray_address is None:
            return None
        if self.ray is not None:
            return self.ray.cluster(self.settings)
        per_node = self.settings.ray_gpus_per_node or self.gpu_count
        return RayCluster(self.settings.ray_nodes, per_node) if per_node else None

    def read_ray_soon(self) -> None:
        """At start, when a Ray cluster is set: read it in the background and log what it has."""
        if self.settings.ray_address is None:
            return

        async def read() -> None:
            try:
                log.info("%s", (await self.read_ray()).describe())
            except RayUnavailable as e:
                log.warning("%s; models placed on it fail until it answers", e.message)
            finally:
                self.scheduler.spawn(self._after_first_ray_read())

        self._first_ray_read = self.scheduler.spawn(read())

    async def _after_first_ray_read(self) -> None:
        self.start_loads()

    async def read_ray(self) -> RayReading:
        """Read the Ray cluster (RayUnavailable when it cannot be); placement counts on what it says."""
        assert self.settings.ray_address is not None
        self.ray = await read_cluster(self.settings.ray_address, self.settings.vllm_python)
        return self.ray

    async def _check_ray(self, instance: Instance) -> None:
        """Before a Ray load: the cluster, read again, must have the GPUs the placement counts on; if it is
        down or too small, the model goes where it fits on this machine, or fails with the reason."""
        placement = instance.placement
        need = placement.pipeline_parallel * placement.tensor_size
        try:
            reading = await self.read_ray()
            if reading.free_gpus < need:
                raise RayUnavailable(f"the model needs {need} GPUs of the Ray cluster; {reading.describe()}")
            instance.ray_nodes = tuple(n.address for n in reading.gpu_nodes)
        except RayUnavailable as e:
            local = _fits_here(instance.spec, capacity.free_gpus(self.gpus.gpus(), self.scheduler.instances.values()))
            if local is None:
                raise
            log.warning("%s: %s; placed on this machine instead", instance.spec.name, e.message)
            instance.placement = local

    def retire(self, instance: Instance) -> None:
        """Take an idle runner off its GPU: to sleep when its engine can (it wakes in well under a second
        where a cold start takes a minute or more), else unloaded."""
        runner = instance.runner
        if self.settings.vllm_sleep and instance.placement.gpus and runner is not None and runner.supports_sleep:
            self._begin_sleep(instance)
        else:
            self.begin_unload(instance)

    # transitions -------------------------------------------------------------------------------------
    def _begin_load(self, instance: Instance, placement: Placement) -> None:
        instance.state = State.LOADING
        instance.placement = placement
        instance.load_started = time.monotonic()
        self.scheduler.spawn(self._load(instance))

    async def _load(self, instance: Instance) -> None:
        try:
            if instance.placement.ray:
                await self._check_ray(instance)
            runner = instance.runner = self.runner_factory(instance.spec, instance.placement)
            log.info("%s: loading on %s (%s)", instance.spec.name, runner.backend, instance.placement.processor)
            await runner.start(self.settings.load_timeout)
        except asyncio.CancelledError:
            if instance.runner is not None:  # the daemon is stopping: leave no runner behind
                await instance.runner.stop()
            raise
        except Exception as e:
            message = e.message if isinstance(e, MgrError) else f"{type(e).__name__}: {e}"
            if instance.runner is not None:
                await instance.runner.stop()
            metrics.load_failed(instance.spec.name)
            self._fail(instance, message, e if isinstance(e, MgrError) else None)
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
        runner.client.on_hung = functools.partial(self._on_hung, instance)
        self._ready(instance, "load")

    def _ready(self, instance: Instance, how: metrics.Transition) -> None:
        metrics.transition(instance.spec.name, how, "request", instance.load_seconds_for(0.0))
        self.scheduler.advance(instance)
        if instance.idle:
            self.scheduler.schedule_expiry(instance)

    def _begin_sleep(self, instance: Instance) -> None:
        instance.state = State.SLEEPING
        instance.expires_at = None
        # Level 1 keeps the weights in host RAM (a fast wake); without room for them, level 2 drops them.
        level = 1 if psutil.virtual_memory().available >= instance.spec.size * 1.2 + (1 << 30) else 2
        instance.transition = self.scheduler.spawn(self._sleep(instance, level))

    async def _sleep(self, instance: Instance, level: int) -> None:
        began = time.monotonic()
        try:
            assert instance.runner is not None
            await instance.runner.sleep(level)
        except Exception as e:
            instance.transition = None
            log.warning("%s: could not sleep (%s); unloading instead", instance.spec.name, e)
            if instance.state is State.SLEEPING:
                self.begin_unload(instance)
            return
        instance.transition = None
        if instance.state is not State.SLEEPING:
            return  # it crashed or the daemon stopped meanwhile
        instance.sleep_level = level
        self._measure(instance)  # what it still holds on the GPU asleep
        log.info("%s: asleep (level %d, %s)", instance.spec.name, level, instance.reason)
        metrics.transition(instance.spec.name, "sleep", instance.reason, time.monotonic() - began)
        if instance.keep_alive == 0 and not instance.queue:
            self.begin_unload(instance)  # `unload` was asked while it fell asleep
        self.start_loads()  # its memory is back; and it wakes if requests came meanwhile

    def _begin_wake(self, instance: Instance) -> None:
        instance.state = State.WAKING
        instance.load_started = time.monotonic()
        self.scheduler.spawn(self._wake(instance))

    async def _wake(self, instance: Instance) -> None:
        try:
            assert instance.runner is not None
            await instance.runner.wake(instance.sleep_level)
        except Exception as e:
            log.warning("%s: could not wake (%s); starting it again", instance.spec.name, e)
            if instance.state is State.WAKING:
                self.begin_unload(instance)  # its waiters move to a fresh load
            return
        if instance.state is not State.WAKING:
            return
        instance.sleep_level = 0
        instance.state = State.READY
        instance.load_finished = time.monotonic()
        self._measure(instance)
        log.info("%s: awake in %.2fs", instance.spec.name, instance.load_finished - (instance.load_started or 0))
        self._ready(instance, "wake")

    def _measure(self, instance: Instance) -> None:
        """Learn what the runner really takes on its GPUs; the next load of this model uses that number."""
        pid = instance.runner.pid if instance.runner is not None else None
        if not instance.placement.gpus or pid is None:
            return
        instance.measured = self.gpus.used_by(pid)
        # llama.cpp takes what it needs, so its measured use is the better estimate next time, when it holds the
        # whole model on one GPU (what the estimate means); part of its layers, or a split, would teach too little or
        # too much. vLLM takes the share it is granted plus its CUDA context: learning that would grow its share at
        # every reload.
        if (instance.measured and instance.spec.format == "gguf" and instance.placement.gpu_layers < 0
                and len(instance.measured) == 1):
            self.scheduler.specs.learn(instance.spec, sum(instance.measured.values()))

    def _fail(self, instance: Instance, message: str, error: MgrError | None) -> None:
        if not self.scheduler.closed:  # at shutdown the runner was stopped on purpose
            log.warning("%s: load failed: %s", instance.spec.name, message)
        instance.state = State.FAILED
        instance.error = message
        instance.failed_until = time.monotonic() + FAILED_BACKOFF_SECONDS
        self.scheduler.reject(instance.queue, error if error is not None else LoadFailed(message))
        instance.queue.clear()
        instance.unloaded.set()
        self.start_loads()

    def _on_hung(self, instance: Instance) -> None:
        """A request to this runner timed out (runners/http.py: nothing for runner_timeout, or for
        runner_idle_timeout mid-answer): a runner that sends nothing is hung, so it is killed at once. Its exit
        is then a crash like any other (_on_exit): its queue moves to a fresh load."""
        runner = instance.runner
        if runner is None or runner.pid is None or runner.exited.done() or runner.pid in self._killed:
            return
        if instance.state not in (State.READY, State.SLEEPING, State.WAKING):
            return  # it is being stopped already
        log.warning("%s: the runner (pid %d) stopped answering; killing it so that it starts again",
                    instance.spec.name, runner.pid)
        self._killed.add(runner.pid)
        runner.exited.add_done_callback(lambda _: self._killed.discard(runner.pid or 0))
        kill_group(runner.pid)

    def _on_exit(self, instance: Instance) -> None:
        if instance.state not in (State.READY, State.SLEEPING, State.WAKING):
            return  # an unload or a shutdown we asked for
        code = instance.runner.exited.result() if instance.runner else None
        log.warning("%s: runner exited unexpectedly (code %s)", instance.spec.name, code)
        metrics.crashed(instance.spec.name)
        instance.state = State.UNLOADING  # in-flight requests see their connection break
        self.scheduler.forget(instance)
        instance.unloaded.set()
        self.scheduler.requeue(instance)
        self.start_loads()

    def begin_unload(self, instance: Instance) -> None:
        self.scheduler.cancel_expiry(instance)
        instance.state = State.UNLOADING
        self.scheduler.forget(instance)
        self.scheduler.unloading.add(instance)
        self.scheduler.requeue(instance)
        self.scheduler.spawn(self._unload(instance))

    async def _unload(self, instance: Instance) -> None:
        began = time.monotonic()
        try:
            if instance.runner is not None:
                await instance.runner.stop()
                await _memory_released(self.gpus, instance)
        finally:
            self.scheduler.unloading.discard(instance)
            instance.unloaded.set()
            log.info("%s: unloaded (%s) in %.2fs", instance.spec.name, instance.reason, time.monotonic() - began)
            metrics.transition(instance.spec.name, "unload", "evicted" if instance.draining else instance.reason,
                               time.monotonic() - began)
            self.start_loads()


async def _memory_released(gpus: GpuInventory, instance: Instance) -> None:
    """The GPU memory of a stopped runner counts as free only once NVML no longer shows it in use."""
    pid = instance.runner.pid if instance.runner is not None else None
    if not instance.placement.gpus or pid is None:
        return
    deadline = time.monotonic() + MEMORY_RELEASE_SECONDS
    while gpus.used_by(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def _fits_here(spec: LoadSpec, free: list[Gpu]) -> Placement | None:
    """Where a model goes on this machine now, if anywhere (a Ray placement's fallback)."""
    try:
        return place(spec.format, spec.estimate, free, spec.pinned, spec.layers)
    except TooBig:
        return None
