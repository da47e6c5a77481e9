"""What the scheduler keeps per model: the instance (its state, runner, queue), the lease a request holds
while it uses the runner, and the frozen status that /api/ps and `mgr ps` read.

States of an instance and what moves it (written once here; DESIGN.md points here):

    PENDING   --capacity free (or freed by evicting an idle LRU runner)-->  LOADING
    LOADING   --runner /health answers 200-->                                READY
    LOADING   --runner exits, load_timeout, engine missing-->                FAILED
    READY     --keep_alive expires while idle, unload, evicted, reload-->    UNLOADING
    READY     --keep_alive expires while idle, or evicted, and it can sleep-> SLEEPING (vLLM warm tier)
    READY     --a starved load waited STARVATION_SECONDS-->                  READY, draining (no new requests;
                                                                             UNLOADING when its last one ends)
    SLEEPING  --a request arrives and its GPUs have room again-->            WAKING --woken--> READY
    SLEEPING  --evicted for memory, unload-->                                UNLOADING
    READY/SLEEPING/WAKING --runner process exits (crash)-->                  (gone; its queue moves to a new PENDING)
    UNLOADING --process group gone-->                                        (gone)
    FAILED    --backoff elapsed and a new request arrives-->                 (replaced by a new PENDING)
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from .placement import CPU, Placement
from .runners.base import LoadSpec, Runner
from .runners.http import RunnerClient

# Why a runner moves (metrics.Reason): a request asked, keep_alive expired while idle, it made room for another
# model, it crashed (or hung and was killed), the daemon stopped.
Reason = Literal["request", "idle", "evicted", "crash", "shutdown"]


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
    arrived: float = dataclasses.field(default_factory=time.monotonic)


class Instance:
    """One model in (or on its way into, or out of) a runner. Written only by the scheduler."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        # the model the last request named: an alias sharing this runner (same files) shows under its own name,
        # as the user just asked for it
        self.shown_name = spec.name
        self.state = State.PENDING
        self.runner: Runner | None = None
        self.placement: Placement = CPU
        self.ray_nodes: tuple[str, ...] = ()
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
        self.reason: Reason = "request"  # why it sleeps or unloads next (metrics and logs)

    @property
    def idle(self) -> bool:
        return self.state is State.READY and self.active == 0 and not self.queue

    def load_seconds_for(self, arrived: float) -> float:
        """How much of a request's wait, since `arrived`, was this instance's load (or wake)."""
        if self.load_finished is None or self.load_started is None or self.load_finished <= arrived:
            return 0.0
        return self.load_finished - max(arrived, self.load_started)

    async def cached_tokens(self) -> int | None:
        """Prompt tokens its runner holds for later requests (llama.cpp's prompt cache), None where the runner does
        not say (vLLM's prefix cache, a runner not ready)."""
        return await self.runner.cached_tokens() if self.runner is not None and self.state is State.READY else None

    def status(self) -> InstanceStatus:
        expires = self.expires_at
        if self.state is State.SLEEPING:
            expires = None  # asleep until its memory is needed or it is unloaded
        elif expires is None and self.keep_alive >= 0:
            expires = time.time() + self.keep_alive  # busy: the timer starts when the last request ends
        spec = self.spec
        on_gpu = sum(self.measured.values()) or (spec.estimate if self.placement.gpus else 0)
        return InstanceStatus(
            name=self.shown_name, digest=spec.digest, state=self.state,
            backend=self.runner.backend if self.runner else "",
            size=max(spec.estimate, on_gpu), size_vram=on_gpu, gpus=self.placement.gpus,
            context_length=spec.num_ctx, num_parallel=spec.num_parallel, active=self.active,
            queued=len(self.queue), expires_at=expires, loaded_at=self.loaded_at, draining=self.draining,
            placement=self.placement, ray_nodes=self.ray_nodes,
        )


@dataclasses.dataclass(frozen=True)
class InstanceStatus:
    """A frozen snapshot of one instance, for /api/ps, /api/queue and `mgr ps` (never the live object)."""

    name: str
    digest: str
    state: State
    backend: str
    size: int  # bytes it takes, RAM and VRAM
    size_vram: int
    gpus: tuple[int, ...]
    context_length: int
    num_parallel: int
    active: int
    queued: int
    expires_at: float | None  # wall clock; None = never, or asleep
    loaded_at: float | None
    draining: bool
    placement: Placement = CPU
    ray_nodes: tuple[str, ...] = ()  # a Ray placement: the cluster's GPU machines when it was placed
    cached_tokens: int | None = None  # the runner's prompt cache (Scheduler.status_with_caches), None: not asked


class Lease:
    """The right to send requests to a runner until `release` (idempotent; call it exactly once in spirit).
    It hands the scheduler's callback back when released, so it never reaches into the scheduler."""

    __slots__ = ("_on_release", "_spec", "instance", "load_seconds", "released")

    def __init__(self, instance: Instance, load_seconds: float, on_release: Callable[[Instance], None],
                 spec: LoadSpec | None = None) -> None:
        self.instance = instance
        self._spec = spec  # the requested model's: an alias sharing the instance's runner answers under its name
        self.load_seconds = load_seconds  # how long this request waited for its model to load or wake
        self._on_release = on_release
        self.released = False

    @property
    def client(self) -> RunnerClient:
        assert self.instance.runner is not None
        return self.instance.runner.client

    @property
    def spec(self) -> LoadSpec:
        return self._spec or self.instance.spec

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release(self.instance)
