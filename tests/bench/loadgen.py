"""A load generator for streaming OpenAI completions that is never the bottleneck it measures.

One Python process relaying hundreds of SSE streams saturates its own core before a fast server does (on
the H100, an httpx client at 256 streams swung vLLM's measured throughput between 6,000 and 11,000 tok/s
from run to run). Here the clients are spread over several processes, each a plain asyncio loop (uvloop when
installed) with a minimal HTTP/1.1 reader; every client opens its keep-alive connection first, then all
start together at one instant agreed through CLOCK_MONOTONIC, which every process on the machine shares.

A cell is closed-loop for a fixed time, as vLLM's own serving benchmark runs at a fixed concurrency: each
client sends its next request as soon as its previous one ends, until `duration` has passed (requests
running then are finished and counted). A cell of several seconds averages the engine's own step-to-step
jitter, which one burst of single requests does not (on the H100 the same burst swung by 20%).

    from loadgen import run_cell
    cell = run_cell("http://127.0.0.1:8000", "smol:latest", clients=256, tokens=128, duration=8)
    cell.tok_s, cell.ttft_p50_ms

Aggregate tok/s = completion tokens of every request / (last end - first send). Time to first token counts
from the moment a request is written to the first event that carries text.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROMPT = "Write a long story about a lighthouse keeper and a storm."


@dataclass(frozen=True)
class Cell:
    clients: int
    tok_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    tokens: int
    requests: int
    wall_s: float


def split_cpus() -> tuple[set[int], set[int]]:
    """This process's CPUs in two halves of whole physical cores: (servers, load generator). Pinning each side
    to its own cores keeps a busy client process from landing on the hyper-thread sibling of the engine's
    Python loop, which is CPU-bound for a small model and slowed by such a neighbour at random."""
    cpus = sorted(os.sched_getaffinity(0))
    cores: dict[str, list[int]] = {}
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        key = siblings.read_text().strip() if siblings.exists() else str(cpu)
        cores.setdefault(key, []).append(cpu)
    groups = list(cores.values())
    if len(groups) < 2:
        return set(cpus), set(cpus)
    half = len(groups) // 2
    return {c for g in groups[:half] for c in g}, {c for g in groups[half:] for c in g}


def request_bytes(host: str, port: int, model: str, tokens: int, path: str = "/v1/completions") -> bytes:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True,
                       "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _read_stream(reader: asyncio.StreamReader) -> tuple[float, int]:
    """Reads one chunked SSE response; returns (monotonic time of the first text, completion tokens)."""
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"status {status!r}: {(await reader.read(2000))!r}")
    await reader.readuntil(b"\r\n\r\n")
    first = 0.0
    generated = 0
    body = bytearray()  # de-chunked bytes not yet split into lines
    pending = bytearray()  # raw bytes not yet de-chunked
    done = False
    while not done:
        data = await reader.read(1 << 18)
        if not data:
            raise RuntimeError("connection closed mid-response")
        pending += data
        while (line_end := pending.find(b"\r\n")) >= 0:
            size = int(bytes(pending[:line_end]), 16)
            if size == 0:
                # the last chunk, then the empty trailer line: read all of it, the connection is reused
                while not pending.endswith(b"\r\n\r\n"):
                    more = await reader.read(16)
                    if not more:
                        raise RuntimeError("connection closed in the last chunk")
                    pending += more
                done = True
                break
            if len(pending) < line_end + 2 + size + 2:
                break
            body += pending[line_end + 2:line_end + 2 + size]
            del pending[:line_end + 4 + size]
        *lines, rest = bytes(body).split(b"\n")
        body = bytearray(rest)
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            if not first and b'"text":"' in line and b'"text":""' not in line:
                first = time.monotonic()
            if b'"usage":{' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                generated = usage.get("completion_tokens", generated)
    return first, generated


async def _clients(url: str, model: str, count: int, tokens: int, duration: float, ready: object, go: object,
                   start_at: object) -> list[tuple[float, float, int, float]]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = request_bytes(host, port, model, tokens)
    connections = [await asyncio.open_connection(host, port, limit=1 << 20) for _ in range(count)]
    ready.put(count)  # type: ignore[attr-defined]
    await asyncio.to_thread(go.wait)  # type: ignore[attr-defined]
    delay = start_at.value - time.monotonic()  # type: ignore[attr-defined]
    if delay > 0:
        await asyncio.sleep(delay)

    deadline = start_at.value + duration  # type: ignore[attr-defined]

    Row = tuple[float, float, int, float]  # sent, first text, completion tokens, ended

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[Row]:
        done: list[Row] = []
        while not done or time.monotonic() < deadline:
            sent = time.monotonic()
            writer.write(payload)
            first, generated = await _read_stream(reader)
            if not first:
                raise RuntimeError("the stream carried no text")
            done.append((sent, first, generated, time.monotonic()))
        writer.close()
        return done

    return [row for rows in await asyncio.gather(*(client(r, w) for r, w in connections)) for row in rows]


FORK = multiprocessing.get_context("fork")  # the clients' closures and queues pass to the workers as they are


def _in_process(make: Callable[[int], Awaitable[list[Any]]], share: int, results: Any,
                cpus: set[int] | None) -> None:
    """A load-generator process: pinned, its clients on uvloop when installed; it sends back its rows or its
    error, so that the parent never waits forever."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop  # type: ignore[import-not-found]
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        results.put(runner(make(share)))
    except BaseException as e:
        results.put(f"{type(e).__name__}: {e}")


def _fork_clients(clients: int, processes: int, cpus: set[int] | None,
                  make: Callable[[int], Awaitable[list[Any]]]) -> Callable[[], list[Any]]:
    """Start `processes` workers, each running `make(its share of the clients)`; returns the function that
    waits for all their rows."""
    results = FORK.Queue()
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    workers = [FORK.Process(target=_in_process, args=(make, n, results, cpus), daemon=True) for n in shares]
    for worker in workers:
        worker.start()

    def collect() -> list[Any]:
        rows: list[Any] = []
        for _ in workers:
            part = results.get(timeout=900)
            if isinstance(part, str):
                raise RuntimeError(f"load generator process failed: {part}")
            rows += part
        for worker in workers:
            worker.join(timeout=10)
        return rows
    return collect


def run_cell(url: str, model: str, clients: int, tokens: int = 128, processes: int = 8,
             duration: float = 8.0, cpus: set[int] | None = None) -> Cell:
    processes = max(1, min(processes, clients))
    ready, go, start_at = FORK.Queue(), FORK.Event(), FORK.Value("d", 0.0)
    collect = _fork_clients(clients, processes, cpus, lambda share: _clients(
        url, model, share, tokens, duration, ready, go, start_at))
    assert sum(ready.get(timeout=60) for _ in range(processes)) == clients
    start_at.value = time.monotonic() + 0.2  # every process is awake and waiting by then
    go.set()
    rows: list[tuple[float, float, int, float]] = collect()
    started = min(sent for sent, _, _, _ in rows)
    wall = max(ended for _, _, _, ended in rows) - started
    ttfts = sorted((first - sent) * 1000 for sent, first, _, _ in rows)
    total = sum(generated for _, _, generated, _ in rows)
    return Cell(clients, total / wall, statistics.median(ttfts), ttfts[int(0.9 * (len(ttfts) - 1))], total,
                len(rows), wall)


@dataclass(frozen=True)
class PairedRounds:
    """Rounds of `clients` simultaneous requests, alternating between two targets A B B A A B ..., so that
    both see the same engine within seconds of each other."""
    clients: int
    rounds: int
    tok_s: dict[str, float]  # tokens / summed round walls, per target
    ttft_p50_ms: dict[str, float]
    ratio_paired: float  # median over neighbouring (first, second) round pairs of tok/s second / first
    added_ttft_paired_ms: float  # median over the same pairs of the difference of their TTFT p50


def _target_of(round_index: int) -> int:
    return (round_index + round_index // 2) % 2  # 0 1 1 0 0 1 1 0 ...


async def _round_clients(urls: list[str], model: str, count: int, tokens: int, rounds: int, ready: object,
                         barrier: object) -> list[tuple[int, float, float, int, float]]:
    targets, hosts = [], []
    for url in urls:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        connections = [await asyncio.open_connection(host, port, limit=1 << 20) for _ in range(count)]
        targets.append((request_bytes(host, port, model, tokens), connections))
        hosts.append((host, port))
    ready.put(count)  # type: ignore[attr-defined]

    async def one(r: int, payload: bytes, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> tuple[int, float, float, int, float]:
        sent = time.monotonic()
        writer.write(payload)
        first, generated = await _read_stream(reader)
        if not first:
            raise RuntimeError("the stream carried no text")
        return r, sent, first, generated, time.monotonic()

    rows = []
    for r in range(rounds):
        payload, connections = targets[_target_of(r)]
        # A server closes keep-alive connections idle for a few seconds (uvicorn: 5 s), which the other
        # target's rounds can outlast: reconnect those before the round starts, as an HTTP client would.
        for i, (reader, writer) in enumerate(connections):
            if reader.at_eof() or writer.is_closing():
                writer.close()
                connections[i] = await asyncio.open_connection(*hosts[_target_of(r)], limit=1 << 20)
        await asyncio.to_thread(barrier.wait)  # type: ignore[attr-defined]
        rows += await asyncio.gather(*(one(r, payload, reader, writer) for reader, writer in connections))
    return rows


def run_paired_rounds(targets: dict[str, str], model: str, clients: int, rounds: int, tokens: int = 128,
                      processes: int = 8, cpus: set[int] | None = None) -> PairedRounds:
    """`targets`: two names -> base URLs. Every client holds a keep-alive connection to each."""
    (name_a, url_a), (name_b, url_b) = targets.items()
    processes = max(1, min(processes, clients))
    ready, barrier = FORK.Queue(), FORK.Barrier(processes)
    collect = _fork_clients(clients, processes, cpus, lambda share: _round_clients(
        [url_a, url_b], model, share, tokens, rounds, ready, barrier))
    assert sum(ready.get(timeout=60) for _ in range(processes)) == clients
    rows: list[tuple[int, float, float, int, float]] = collect()
    per_round: list[tuple[float, float, int]] = []  # wall, TTFT p50 ms, tokens
    for r in range(rounds):
        mine = [row for row in rows if row[0] == r]
        wall = max(row[4] for row in mine) - min(row[1] for row in mine)
        per_round.append((wall, statistics.median((row[2] - row[1]) * 1000 for row in mine),
                          sum(row[3] for row in mine)))
    names = (name_a, name_b)
    tok_s, ttft = {}, {}
    for index, name in enumerate(names):
        picked = [r for r in range(rounds) if _target_of(r) == index]
        tok_s[name] = sum(per_round[r][2] for r in picked) / sum(per_round[r][0] for r in picked)
        ttft[name] = statistics.median((rows[i][2] - rows[i][1]) * 1000 for i in range(len(rows))
                                       if _target_of(rows[i][0]) == index)
    ratios, added = [], []
    for r in range(0, rounds - 1, 2):  # (0,1) (2,3) ...: each pair holds one round of each target
        a, b = (r, r + 1) if _target_of(r) == 0 else (r + 1, r)
        ratios.append((per_round[b][2] / per_round[b][0]) / (per_round[a][2] / per_round[a][0]))
        added.append(per_round[b][1] - per_round[a][1])
    return PairedRounds(clients, rounds, tok_s, ttft, statistics.median(ratios), statistics.median(added))
