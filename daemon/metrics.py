"""The daemon's Prometheus metrics (GET /metrics) and the per-request record the access log prints.

Two kinds of numbers:
- Counted as things happen, into the process's registry (`REGISTRY`): requests by model, endpoint and
  status; tokens in and out; time to first token and inter-token latency; runner transitions (load, wake,
  sleep, unload) with their reasons and durations; crashes; pulled bytes. The hot path (one call per
  generated chunk) is one perf_counter and one histogram observe on a child whose labels were resolved
  once per request.
- Read at scrape time, never kept up to date: requests in flight and queued per model and each runner's GPU
  memory (the scheduler's frozen snapshots), and each GPU's memory (the GpuInventory).

`RequestRecord` is what one HTTP request did (its model, tokens, queue wait, load wait, time to first token);
logs.AccessLog makes one per request and holds it in a context variable, which the code that knows those
things fills in (`current()`), so nothing is passed through the adapters' signatures.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .gpus import Gpu, GpuInventory
from .instances import InstanceStatus, Reason

if TYPE_CHECKING:
    from .scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Transition = Literal["load", "wake", "sleep", "unload"]

Event = TypeVar("Event", bound=Mapping[str, object])

REGISTRY = CollectorRegistry(auto_describe=True)
# process_cpu_seconds_total and the rest of the daemon process's own (as vLLM's server exposes its): `mgr bench`
# reads it around each cell, so a run says how busy the daemon itself was
ProcessCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_TRANSITION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

REQUESTS = Counter("mgr_requests", "HTTP requests answered, by model (empty when none), endpoint and status",
                   ["model", "endpoint", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("mgr_request_duration_seconds", "HTTP requests from arrival to the last byte sent",
                            ["endpoint"], buckets=_TRANSITION_BUCKETS, registry=REGISTRY)
QUEUE_SECONDS = Histogram("mgr_queue_wait_seconds", "How long a request waited for a slot or a load, by model",
                          ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter("mgr_prompt_tokens", "Prompt tokens processed, by model", ["model"], registry=REGISTRY)
GENERATED_TOKENS = Counter("mgr_generation_tokens", "Tokens generated, by model", ["model"], registry=REGISTRY)
TTFT = Histogram("mgr_time_to_first_token_seconds", "From a request's runner slot to its first token",
                 ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
ITL = Histogram("mgr_inter_token_latency_seconds", "Between two chunks of one answer, by model", ["model"],
                buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TRANSITION_SECONDS = Histogram("mgr_runner_transition_seconds",
                               "Runner loads, wakes, sleeps and unloads: how long they took, and why",
                               ["model", "transition", "reason"], buckets=_TRANSITION_BUCKETS, registry=REGISTRY)
CRASHES = Counter("mgr_runner_crashes", "Runners that exited without being asked (or were killed as hung)",
                  ["model"], registry=REGISTRY)
LOAD_FAILURES = Counter("mgr_load_failures", "Loads that failed, by model", ["model"], registry=REGISTRY)
PULL_BYTES = Counter("mgr_pull_bytes", "Bytes downloaded by pulls", registry=REGISTRY)
PULL_SPEED = Gauge("mgr_pull_speed_bytes_per_second", "The average speed of the last pull that finished "
                   "(rate(mgr_pull_bytes_total) is the speed now)", registry=REGISTRY)
PULLS = Counter("mgr_pulls", "Pulls that ended, by outcome", ["outcome"], registry=REGISTRY)


@dataclasses.dataclass(slots=True)
class RequestRecord:
    """What one HTTP request did, for its access-log line and its request counter."""

    method: str
    path: str
    started: float = dataclasses.field(default_factory=time.perf_counter)
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0  # waiting for a slot or a load
    load_seconds: float = 0.0  # of which its model's load or wake
    leased_at: float = 0.0  # perf_counter when it got its runner slot; its answer is asked for right then
    first_token_seconds: float | None = None  # from leased_at


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("mgr_request", default=None)


def begin_request(record: RequestRecord) -> contextvars.Token[RequestRecord | None]:
    return _current.set(record)


def end_request(token: contextvars.Token[RequestRecord | None]) -> None:
    _current.reset(token)


def current() -> RequestRecord | None:
    """The request being answered (None outside one: a unit test calling a handler directly)."""
    return _current.get()


def leased(model: str, waited: float, load_seconds: float) -> None:
    """A request got its lease after `waited` seconds (0 on the fast path)."""
    record = _current.get()
    if record is not None:
        record.model = model
        record.leased_at = time.perf_counter()
        record.queue_seconds = waited
        record.load_seconds = load_seconds
    if waited:
        QUEUE_SECONDS.labels(model).observe(waited)


def request_done(record: RequestRecord, endpoint: str, status: int, seconds: float) -> None:
    REQUESTS.labels(record.model, endpoint, str(status)).inc()
    REQUEST_SECONDS.labels(endpoint).observe(seconds)


class Generation:
    """One answer's timing and tokens: `chunk()` for each part that carries output, `done()` once with the
    runner's usage."""

    __slots__ = ("_itl", "_last", "_record", "_sent", "_ttft", "model")

    def __init__(self, model: str) -> None:
        self.model = model
        self._record = _current.get()
        # The runner is asked as soon as the lease is granted; this object is made once its answer has begun
        # (a runner sends its headers with the first token), too late to start the clock.
        leased = self._record.leased_at if self._record is not None else 0.0
        self._sent = leased or time.perf_counter()
        self._last: float | None = None
        self._ttft = TTFT.labels(model)
        self._itl = ITL.labels(model)

    def chunk(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._ttft.observe(now - self._sent)
            if self._record is not None:
                self._record.first_token_seconds = now - self._sent
        else:
            self._itl.observe(now - self._last)
        self._last = now

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens:
            PROMPT_TOKENS.labels(self.model).inc(prompt_tokens)
        if completion_tokens:
            GENERATED_TOKENS.labels(self.model).inc(completion_tokens)
        if self._record is not None:
            self._record.prompt_tokens += prompt_tokens
            self._record.completion_tokens += completion_tokens


def _carries_output(chunk: Mapping[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") \
                or delta.get("tool_calls") or choice.get("text"):
            return True
    return False


async def metered(chunks: AsyncIterator[dict[str, Any]], model: str = "") -> AsyncIterator[dict[str, Any]]:
    """The runner's chat or completion chunks (runners.http.events), passed on unchanged, timed and counted
    under `model` ("": the model the request was leased, see `leased`)."""
    record = _current.get()
    generation = Generation(model or (record.model if record is not None else ""))
    usage: Mapping[str, Any] = {}
    try:
        async for chunk in chunks:
            if _carries_output(chunk):
                generation.chunk()
            usage = chunk.get("usage") or usage
            yield chunk
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()  # as if the caller had iterated `chunks` itself
        generation.done(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')  # one level nested: prompt_tokens_details


def usage_in(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last `"usage": {...}` in a relayed OpenAI body or SSE chunk: the
    relay passes the runner's bytes on as they are, so they are looked at, not parsed whole."""
    if b'"usage"' not in body:
        return None
    found = _USAGE.findall(body)
    if not found:
        return None
    try:
        usage = json.loads(found[-1])
    except ValueError:
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


_OUTPUT = re.compile(rb'"(?:content|text|reasoning_content|reasoning)"\s*:\s*"[^"]|"tool_calls"\s*:\s*\[\{')


class Relayed:
    """An OpenAI answer relayed as the runner's bytes: a chunk that carries output (not the role-only first
    delta, not the usage chunk) times the answer; the usage the runner reported (always in a whole answer; in a
    stream when the client asked for it with stream_options.include_usage) counts its tokens."""

    __slots__ = ("generation", "usage")

    def __init__(self, model: str) -> None:
        self.generation = Generation(model)
        self.usage: tuple[int, int] | None = None

    def chunk(self, data: bytes) -> None:
        if _OUTPUT.search(data):
            self.generation.chunk()
        if b'"usage"' in data:
            self.usage = usage_in(data) or self.usage

    def done(self) -> None:
        self.generation.done(*(self.usage or (0, 0)))


def whole_answer(model: str, body: bytes) -> None:
    """A whole OpenAI answer relayed as the runner's bytes: its usage counts its tokens (no token timing: it
    came at once)."""
    Generation(model).done(*(usage_in(body) or (0, 0)))


def transition(model: str, kind: Transition, reason: Reason, seconds: float) -> None:
    TRANSITION_SECONDS.labels(model, kind, reason).observe(seconds)


def crashed(model: str) -> None:
    CRASHES.labels(model).inc()
    TRANSITION_SECONDS.labels(model, "unload", "crash").observe(0.0)  # it was gone when the daemon saw it


def load_failed(model: str) -> None:
    LOAD_FAILURES.labels(model).inc()


async def metered_pull(events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    """A pull's progress events, passed on unchanged; the bytes each file advances are counted, and the pull's
    average speed is kept when it ends."""
    started = time.monotonic()
    done: dict[str, int] = {}
    fetched = 0
    outcome = "failed"
    try:
        async for event in events:
            digest, completed = event.get("digest"), event.get("completed")  # a file's progress
            if isinstance(digest, str) and isinstance(completed, int):
                step = completed - done.get(digest, 0)
                if step > 0:
                    PULL_BYTES.inc(step)
                    fetched += step
                    done[digest] = completed
            if event.get("status") == "success":
                outcome = "success"
            yield event
    finally:
        await events.aclose()  # closing this closes the pull (which cancels its download) at once, not at GC
        PULLS.labels(outcome).inc()
        elapsed = time.monotonic() - started
        if fetched and elapsed > 0:
            PULL_SPEED.set(fetched / elapsed)


class _Snapshot(Collector):
    """The numbers read at scrape time, from what the scheduler and NVML say now."""

    def __init__(self, statuses: Iterable[InstanceStatus], gpus: Iterable[Gpu]) -> None:
        self.statuses = list(statuses)
        self.gpus = list(gpus)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily("mgr_requests_in_flight", "Requests a runner is answering now, by model",
                                      labels=["model"])
        queued = GaugeMetricFamily("mgr_requests_queued", "Requests waiting for a slot or a load, by model",
                                   labels=["model"])
        state = GaugeMetricFamily("mgr_runner_state", "1 for the state each model's runner is in",
                                  labels=["model", "state", "backend"])
        runner_memory = GaugeMetricFamily("mgr_runner_gpu_memory_bytes",
                                          "GPU memory a model's runner holds (measured by NVML once loaded)",
                                          labels=["model"])
        for status in self.statuses:
            in_flight.add_metric([status.name], status.active)
            queued.add_metric([status.name], status.queued)
            state.add_metric([status.name, status.state.value, status.backend], 1)
            runner_memory.add_metric([status.name], status.size_vram)
        total = GaugeMetricFamily("mgr_gpu_memory_total_bytes", "Each GPU's memory", labels=["gpu", "name"])
        free = GaugeMetricFamily("mgr_gpu_memory_free_bytes", "Each GPU's free memory now", labels=["gpu", "name"])
        for gpu in self.gpus:
            total.add_metric([str(gpu.index), gpu.name], gpu.total)
            free.add_metric([str(gpu.index), gpu.name], gpu.free)
        return [in_flight, queued, state, runner_memory, total, free]


def exposition(statuses: Iterable[InstanceStatus], gpus: Iterable[Gpu]) -> bytes:
    """The text /metrics answers: the counted metrics, then the ones read now."""
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(statuses, gpus))
    return generate_latest(REGISTRY) + generate_latest(snapshot)


def metrics_route(scheduler: Scheduler, gpus: GpuInventory) -> Route:
    """GET /metrics: the scheduler's snapshots are taken on the event loop (its one writer's), NVML is read
    in a thread."""
    async def page(_: Request) -> Response:
        statuses = scheduler.status()
        devices = await asyncio.to_thread(gpus.gpus)
        return Response(exposition(statuses, devices), media_type=CONTENT_TYPE)

    return Route("/metrics", page, methods=["GET"])
