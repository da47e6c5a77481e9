"""The load generator behind `mgr bench` (imported by its handler only): streamed requests through the
Ollama or the OpenAI API, measured as vLLM's `vllm bench serve` measures them.

One Python process reading hundreds of streams saturates its own core before a fast server does (on the
H200 a single-process client at 64 and 256 streams made direct vLLM swing between 6.8k and 14.3k tokens/s).
So a cell's requests are spread over several forked processes, each a plain asyncio loop (uvloop when it is
installed) with a minimal HTTP/1.1 reader over keep-alive connections it opens before the clock starts; all
of them start at one instant agreed through CLOCK_MONOTONIC, which every process on the machine shares. Each
process measures its own CPU time and how late its loop wakes: a process busy >= 85 % of the cell, or a loop
late by > 5 ms at the median, means the numbers are the client's, and the cell says so (`saturated`).
Several cells can run as one (run_cells: `mgr bench --together`), their requests interleaved through the same
streams.

A cell is `requests` requests at most `concurrency` at a time (vLLM's --max-concurrency): closed loop, or
arriving as a Poisson process of `rate` requests/s (vLLM's --request-rate). Time to first token counts from
the moment a request is written to the first event that carries output; inter-token latency is the gap
between successive output events; TPOT is (latency - TTFT) / (output tokens - 1). Throughput divides by the
cell's duration, from the start instant to the last answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

FORK = multiprocessing.get_context("fork")  # the plan passes to the workers as it is
SATURATED_CPU = 0.85  # a client process busy this share of the cell's wall time is the bottleneck
SATURATED_LAG_MS = 5.0  # ... or its loop waking this late at the median
LAG_TICK = 0.005
API_PATHS = {("ollama", "chat"): "/api/chat", ("ollama", "completion"): "/api/generate",
             ("openai", "chat"): "/v1/chat/completions", ("openai", "completion"): "/v1/completions"}

# words that are one token each in the common BPE vocabularies (with their leading space)
WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
    "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
    "company", "system", "program", "question", "work", "government", "number", "night", "point", "home",
    "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book",
    "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father",
    "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name", "team",
    "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others", "level", "office",
    "door", "health", "person", "art", "war", "history", "party", "result", "change", "morning", "reason",
    "research", "girl", "guy", "moment", "air", "teacher", "force", "education",
)


class BenchError(Exception):
    """A benchmark that cannot run as asked (a server that refuses the warm-up, a bad dataset)."""


# -- what is sent ----------------------------------------------------------------------------------------
def random_prompts(count: int, words: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts of about `words` tokens: random words, so that no two share a prefix a
    prompt cache could reuse (vLLM's random dataset draws random token ids for the same reason)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, words))) for _ in range(count)]


def sharegpt_prompts(path: str, count: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, output length) pairs from a ShareGPT-style JSON file (a list of {"conversations": [{"from":
    "human", "value"}, {"from": "gpt", "value"}, ...]}): each conversation's first turn and the length of its
    answer, in tokens estimated at 4 characters each (no tokenizer here). Like vLLM's sampler: conversations
    with under two turns, a prompt or answer under 4 tokens, a prompt over 1,024 or both over 2,048 are left out."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read the dataset {path}: {e}") from None
    if not isinstance(data, list):
        raise BenchError(f"{path}: expected a JSON list of conversations (ShareGPT's format)")
    rng = random.Random(seed)
    rng.shuffle(data)
    pairs: list[tuple[str, int]] = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, answer = (t.get("value") if isinstance(t, dict) else None for t in turns[:2])
        if not isinstance(prompt, str) or not isinstance(answer, str):
            continue
        prompt_len, output_len = max(1, len(prompt) // 4), max(1, len(answer) // 4)
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        pairs.append((prompt, output_len))
        if len(pairs) == count:
            break
    if not pairs:
        raise BenchError(f"{path}: no usable conversation (ShareGPT's format: conversations of from/value turns)")
    return [pairs[i % len(pairs)] for i in range(count)]


OPENAI_NAMES = {"repeat_penalty": "repetition_penalty"}  # Ollama's option names that vLLM's API spells otherwise


def request_body(api: str, endpoint: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool,
                 sampling: dict[str, Any] | None = None) -> bytes:
    """One streamed request in the API's own shape. ignore_eos is vLLM's and llama-server's field, and an
    option of mgr's Ollama API; servers that do not know it ignore it (then the answer may end early, which
    the output token counts show). `sampling`: Ollama option names and values, sent as options through the
    Ollama API and as top-level fields (vLLM's names) through the OpenAI API."""
    body: dict[str, Any]
    if api == "ollama":
        options: dict[str, Any] = {"num_predict": max_tokens}
        if ignore_eos:
            options["ignore_eos"] = True
        options.update(sampling or {})
        body = {"model": model, "stream": True, "options": options}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            # raw: the prompt as it is, as /v1/completions and `vllm bench serve` send it. Without raw,
            # /api/generate wraps the prompt in the chat template (the work /api/chat measures), so a
            # completion through Ollama's API would do more than the same completion through OpenAI's.
            body["prompt"] = prompt
            body["raw"] = True
    else:
        body = {"model": model, "stream": True, "max_tokens": max_tokens,
                "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True
        body.update({OPENAI_NAMES.get(k, k): v for k, v in (sampling or {}).items()})
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: a server's base URL, the API and endpoint, and the headers every request carries."""

    url: str
    api: str  # "ollama" | "openai"
    kind: str = "chat"  # "chat" | "completion"
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        return API_PATHS[(self.api, self.kind)]

    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise BenchError(f"unsupported URL {self.url!r}: expected http://host:port")
        return parts.hostname, parts.port or 80

    def request_head(self, length: int) -> bytes:
        host, port = self.address()
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return (f"POST {self.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"{extra}Content-Length: {length}\r\n\r\n").encode()


# -- reading one streamed answer -------------------------------------------------------------------------
_OUTPUT = re.compile(rb'"(?:content|text|response|thinking|reasoning_content|reasoning)"\s*:\s*"[^"]'
                     rb'|"tool_calls"\s*:\s*\[\s*\{')


@dataclass
class Outcome:
    """One request as the client saw it (monotonic seconds)."""

    sent: float
    first: float = 0.0
    ended: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    load: int = 0  # which of run_cells' loads it belongs to


class _Stream:
    """Decodes one HTTP/1.1 answer (chunked, sized or until close) into lines as its bytes arrive, and
    notes what each line carries."""

    def __init__(self, outcome: Outcome, api: str) -> None:
        self.outcome = outcome
        self.api = api
        self.events = 0
        self.last = 0.0
        self.lines = bytearray()

    def feed(self, data: bytes, now: float) -> None:
        self.lines += data
        if b"\n" not in data:
            return
        *complete, rest = bytes(self.lines).split(b"\n")
        self.lines = bytearray(rest)
        for line in complete:
            self.line(line, now)

    def line(self, line: bytes, now: float) -> None:
        if self.api == "openai":
            if not line.startswith(b"data:"):
                return
            line = line[5:].strip()
            if line == b"[DONE]":
                return
        if not line.strip():
            return
        outcome = self.outcome
        if _OUTPUT.search(line):
            self.events += 1
            if not outcome.first:
                outcome.first = now
            else:
                outcome.itl.append(now - self.last)
            self.last = now
        if b'"error"' in line or b'"usage"' in line or b'"done":true' in line or b'"done": true' in line:
            try:
                event = json.loads(line)
            except ValueError:
                return
            if not isinstance(event, dict):
                return
            if event.get("error"):
                error = event["error"]
                outcome.error = str(error.get("message", error) if isinstance(error, dict) else error)[:300]
            usage = event.get("usage")
            if isinstance(usage, dict):
                outcome.output_tokens = int(usage.get("completion_tokens") or 0)
                outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            if event.get("done") is True:
                outcome.output_tokens = int(event.get("eval_count") or 0)
                outcome.prompt_tokens = int(event.get("prompt_eval_count") or 0)


class Closed(Exception):
    """The server closed the connection."""


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                    outcome: Outcome, api: str) -> bool:
    """Send one request and read its whole answer; returns whether the connection can be used again."""
    writer.write(request)
    status_line = await reader.readline()
    if not status_line:
        raise Closed("the server closed the connection")
    head = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for raw in head.decode("latin-1").split("\r\n"):
        name, sep, value = raw.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    stream = _Stream(outcome, api)
    body = bytearray()
    keep = headers.get("connection") != "close"

    def take(data: bytes) -> None:
        if status == 200:
            stream.feed(data, time.monotonic())
        elif len(body) < 2000:
            body.extend(data)

    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise Closed("the server closed the connection mid-answer")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            take(await reader.readexactly(size))
            await reader.readexactly(2)
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            data = await reader.read(min(left, 1 << 16))
            if not data:
                raise Closed("the server closed the connection mid-answer")
            left -= len(data)
            take(data)
    else:
        while data := await reader.read(1 << 16):
            take(data)
        keep = False
    outcome.ended = time.monotonic()
    if stream.lines:
        stream.line(bytes(stream.lines), outcome.ended)
    if status != 200:
        text = body.decode("utf-8", "replace").strip()
        try:
            error = json.loads(text).get("error", text)
            text = str(error.get("message", error) if isinstance(error, dict) else error)
        except (ValueError, AttributeError):
            pass
        outcome.error = f"HTTP {status}: {text[:300]}"
    elif not outcome.error and not stream.events:
        outcome.error = "the answer carried no output"
    if not outcome.output_tokens:
        outcome.output_tokens = stream.events  # a server that reports no counts: one token per event
    return keep


# -- one worker process ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    endpoints: tuple[Endpoint, ...]  # run_cells' loads' endpoints, by load index
    # (arrival offset in seconds, or -1 for closed loop; load index; whole request)
    requests: list[tuple[float, int, bytes]]
    concurrency: int
    slot: int  # this worker's place in the progress array


@dataclass
class _WorkerResult:
    outcomes: list[Outcome]
    cpu_seconds: float
    lag_p50_ms: float


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _worker(plan: _Plan, ready: Any, start_at: Any, progress: Any) -> _WorkerResult:
    addresses = [endpoint.address() for endpoint in plan.endpoints]

    async def connect(load: int) -> Connection:
        host, port = addresses[load]
        return await asyncio.open_connection(host, port, limit=1 << 20)

    # a stream: its keep-alive connection to each load's server (None: connect when a request needs it)
    free: asyncio.Queue[list[Connection | None]] = asyncio.Queue()
    for _ in range(plan.concurrency):
        connections: list[Connection | None] = []
        for load in range(len(plan.endpoints)):
            try:
                connections.append(await connect(load))
            except OSError:
                connections.append(None)  # connect again when the request is sent; its error is its outcome
        free.put_nowait(connections)
    ready.put(plan.slot)
    while start_at.value == 0.0:
        await asyncio.sleep(0.002)
    delay = start_at.value - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    started = start_at.value
    cpu_before = time.process_time()
    lags: list[float] = []
    running = True

    async def measure_lag() -> None:
        while running:
            before = time.monotonic()
            await asyncio.sleep(LAG_TICK)
            lags.append(time.monotonic() - before - LAG_TICK)

    ticker = asyncio.ensure_future(measure_lag())
    outcomes: list[Outcome] = []

    async def one(load: int, request: bytes, connections: list[Connection | None]) -> None:
        connection = connections[load]
        outcome = Outcome(sent=0.0, load=load)
        try:
            for attempt in range(2):
                if connection is None:
                    connection = await connect(load)
                reader, writer = connection
                outcome = Outcome(sent=time.monotonic(), load=load)
                try:
                    if not await _exchange(reader, writer, request, outcome, plan.endpoints[load].api):
                        writer.close()
                        connection = None
                    break
                except (Closed, ConnectionError, asyncio.IncompleteReadError) as e:
                    writer.close()
                    connection = None
                    if attempt or outcome.first:  # a keep-alive connection the server had closed: once more
                        outcome.error = f"{type(e).__name__}: {e}"
                        break
        except (OSError, ValueError, asyncio.LimitOverrunError) as e:
            outcome.error = f"{type(e).__name__}: {e}"
            if connection is not None:
                connection[1].close()
            connection = None
        if not outcome.ended:
            outcome.ended = time.monotonic()
        outcomes.append(outcome)
        progress[2 * plan.slot] += 1
        progress[2 * plan.slot + 1] += outcome.output_tokens if not outcome.error else 0
        connections[load] = connection
        free.put_nowait(connections)

    tasks = []
    for offset, load, request in plan.requests:
        if offset >= 0:
            wait = started + offset - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        stream = await free.get()
        tasks.append(asyncio.ensure_future(one(load, request, stream)))
    await asyncio.gather(*tasks)
    running = False
    cpu = time.process_time() - cpu_before
    await ticker
    while not free.empty():
        for left in free.get_nowait():
            if left is not None:
                left[1].close()
    lags.sort()
    return _WorkerResult(outcomes, cpu, lags[len(lags) // 2] * 1000 if lags else 0.0)


def _in_process(plan: _Plan, ready: Any, start_at: Any, progress: Any, results: Any) -> None:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        run: Callable[..., _WorkerResult] = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        results.put(run(_worker(plan, ready, start_at, progress)))
    except BaseException as e:  # the parent must never wait forever
        results.put(f"{type(e).__name__}: {e}")


# -- a cell ----------------------------------------------------------------------------------------------------
def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, which vLLM's report uses)."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _summary(values_s: list[float]) -> dict[str, float]:
    values = sorted(v * 1000 for v in values_s)
    return {"mean": sum(values) / len(values) if values else 0.0, "p50": _percentile(values, 50),
            "p90": _percentile(values, 90), "p99": _percentile(values, 99)}


@dataclass
class CellResult:
    """What `vllm bench serve` reports for one run, under its names where it has them (ms, per second)."""

    concurrency: int
    request_rate: float  # inf: closed loop
    num_prompts: int
    completed: int
    errors: int
    duration: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    client_processes: int
    client_cpu: float  # the busiest client process's CPU time / the cell's duration
    client_lag_ms: float  # the worst of the client loops' median lateness
    saturated: bool
    first_errors: list[str]
    started: float  # the start instant, seconds since the epoch (the cells run_cells ran as one share it)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if math.isinf(self.request_rate):
            values["request_rate"] = "inf"
        return values


@dataclass(frozen=True)
class Load:
    """One cell's requests: every body sent to `endpoint`."""

    endpoint: Endpoint
    bodies: Sequence[bytes]


def run_cell(endpoint: Endpoint, bodies: Sequence[bytes], concurrency: int, rate: float = math.inf,
             processes: int = 0, seed: int = 0,
             on_progress: Callable[[int, int, float], None] | None = None) -> CellResult:
    """Send every body in `bodies` (one request each), at most `concurrency` at a time, from `processes`
    worker processes (0: one per 16 streams, at most half the cores, at least one)."""
    return run_cells([Load(endpoint, bodies)], concurrency, rate, processes, seed, on_progress)[0]


def run_cells(loads: Sequence[Load], concurrency: int, rate: float = math.inf, processes: int = 0, seed: int = 0,
              on_progress: Callable[[int, int, float], None] | None = None) -> list[CellResult]:
    """Several cells as one: the loads' requests interleaved (the first of each load, then the second of each,
    ...) through the same `concurrency` streams, each stream sending every request to its own load's server.
    A CellResult per load, in order, over the common duration. Every load then meets the servers behind them
    at the same moments and in every place of their batches, so for paths to one engine the engine's swings
    and a batch's order (which stream is prefilled first, which finishes first) fall on all of them alike:
    cells one after the other saw vLLM against itself scatter 0.76-1.23, and separate streams at once gave the
    streams that happened to go first the lower time to first token for the rest of the cell. With one load
    this is a plain cell."""
    order = sorted(((i, number) for number, load in enumerate(loads) for i in range(len(load.bodies))))
    requests = len(order)
    concurrency = max(1, min(concurrency, requests))
    if processes <= 0:
        processes = max(1, min(math.ceil(concurrency / 16), (os.cpu_count() or 2) // 2))
    processes = max(1, min(processes, concurrency))
    offsets = [-1.0] * requests
    if not math.isinf(rate):
        rng = random.Random(seed)
        at = 0.0
        for i in range(requests):
            offsets[i] = at
            at += rng.expovariate(rate)

    def planned(k: int) -> tuple[float, int, bytes]:
        i, number = order[k]
        load = loads[number]
        return offsets[k], number, load.endpoint.request_head(len(load.bodies[i])) + load.bodies[i]

    plans = []
    for p in range(processes):
        # whole rounds (one request of each load) per process, so that every process sends every load's requests
        # (a process per load would give each load streams of its own again)
        mine = [k for k in range(requests) if k // len(loads) % processes == p]
        share = concurrency // processes + (1 if p < concurrency % processes else 0)
        plans.append(_Plan(tuple(load.endpoint for load in loads), [planned(k) for k in mine], max(1, share), p))
    ready, results = FORK.Queue(), FORK.Queue()
    start_at = FORK.Value("d", 0.0)
    progress = FORK.Array("q", 2 * processes, lock=False)
    workers = [FORK.Process(target=_in_process, args=(plan, ready, start_at, progress, results), daemon=True)
               for plan in plans]
    for worker in workers:
        worker.start()
    started_wall = 0.0
    try:
        for _ in workers:
            ready.get(timeout=120)
        monotonic, wall = time.monotonic(), time.time()
        start_at.value, started_wall = monotonic + 0.1, wall + 0.1
        parts: list[_WorkerResult] = []
        while len(parts) < len(workers):
            try:
                part = results.get(timeout=0.5)
            except Exception:  # queue.Empty: report progress, then wait again
                if not any(w.is_alive() for w in workers) and results.empty():
                    raise BenchError("the load generator's processes ended without an answer") from None
            else:
                if isinstance(part, str):
                    raise BenchError(f"a load generator process failed: {part}")
                parts.append(part)
            if on_progress is not None:
                done = sum(progress[2 * p] for p in range(processes))
                tokens = sum(progress[2 * p + 1] for p in range(processes))
                on_progress(done, tokens, max(0.0, time.monotonic() - start_at.value))
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
    started = start_at.value
    outcomes = [o for part in parts for o in part.outcomes]
    duration = max(max((o.ended for o in outcomes), default=started) - started, 1e-9)
    client_cpu = max(part.cpu_seconds for part in parts) / duration
    lag = max(part.lag_p50_ms for part in parts)
    return [_cell([o for o in outcomes if o.load == number], duration, started_wall, len(load.bodies),
                  concurrency, rate, processes, client_cpu, lag)
            for number, load in enumerate(loads)]


def _cell(outcomes: list[Outcome], duration: float, started_wall: float, requests: int, concurrency: int,
          rate: float, processes: int, client_cpu: float, lag: float) -> CellResult:
    """One load's numbers from its outcomes, over `duration`: from the start instant to the last answer of any
    load run with it (a plain cell's own last answer)."""
    good = [o for o in outcomes if not o.error]
    bad = [o for o in outcomes if o.error]
    output = sum(o.output_tokens for o in good)
    prompt = sum(o.prompt_tokens for o in good)
    return CellResult(
        concurrency=concurrency, request_rate=rate, num_prompts=requests, completed=len(good), errors=len(bad),
        duration=duration, request_throughput=len(good) / duration, output_throughput=output / duration,
        total_token_throughput=(output + prompt) / duration, total_input_tokens=prompt, total_output_tokens=output,
        ttft_ms=_summary([o.first - o.sent for o in good]),
        tpot_ms=_summary([(o.ended - o.first) / (o.output_tokens - 1) for o in good if o.output_tokens > 1]),
        itl_ms=_summary([gap for o in good for gap in o.itl]),
        e2el_ms=_summary([o.ended - o.sent for o in good]),
        client_processes=processes, client_cpu=client_cpu, client_lag_ms=lag,
        saturated=client_cpu >= SATURATED_CPU or lag > SATURATED_LAG_MS,
        first_errors=sorted({o.error for o in bad})[:3], started=started_wall)
