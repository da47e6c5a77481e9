"""Benchmark: a growing chat, time to first token turn by turn, mgr (the daemon and its llama.cpp runner, prompt
cache on) against llama.cpp's own llama-server (the `xllamacpp` package), on the same GGUF, in one run.

Not a pytest test. Run:

    .venv/bin/python tests/bench/bench_prompt_cache.py [--turns 9] [--repeats 3] [--model PATH]

Every turn sends the whole conversation again, as chat clients do: a system prompt, then per earlier turn a user
message and an assistant answer of fixed text (the same history for both servers, about 215 tokens a turn), then
the new user message; the server generates --tokens tokens (ignore_eos). Each server gets the same model file,
threads, slots and context per slot; only one runs at a time. A conversation is run --repeats times (each one
different from its first words on, so that no cache carries over), after one warm-up chat; the table shows the
median TTFT per turn (send to first content chunk, streamed /v1/chat/completions), the ratio mgr / llama-server,
and the prompt tokens mgr read from its cache. The targets (issue 21): every turn at most 1.1x llama-server,
turn 1 at most 1.05x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import DEFAULT_GGUF, MgrServer, Server, XLlamaCppServer, wait_for_idle

TOPICS = ["lighthouses", "sourdough bread", "glaciers", "chess openings", "honey bees", "old maps", "tea",
          "volcanoes", "jazz", "kites", "orchards", "submarines"]


def user_message(run: int, turn: int) -> str:
    topic = TOPICS[(run * 5 + turn) % len(TOPICS)]
    return (f"Conversation {run}, question {turn}: tell me about {topic}. I am writing a long report for a school "
            f"project about {topic} and I would like to know where the idea came from, who worked on it first, "
            "what changed over the last hundred years, which mistakes people often make when they talk about "
            "it, and what a beginner should read first. Please keep the answer short and plain, with no lists.")


def assistant_message(turn: int) -> str:
    return (f"Here is a short answer for part {turn}. It began long ago as a practical craft, and over time people "
            "wrote down what worked and what did not. In the last century better tools and easier travel spread the "
            "knowledge widely, and a few careful writers corrected old errors. A beginner should start with a "
            "general history, then one practical guide, and then visit a place where it is done today.")


def conversation(run: int, turn: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
    for earlier in range(1, turn):
        messages += [{"role": "user", "content": user_message(run, earlier)},
                     {"role": "assistant", "content": assistant_message(earlier)}]
    return messages + [{"role": "user", "content": user_message(run, turn)}]


async def one_turn(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> tuple[float, int, int]:
    """(TTFT in ms, prompt tokens, cached prompt tokens) of one streamed answer."""
    sent = time.perf_counter()
    ttft, prompt, cached = None, 0, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                ttft = (time.perf_counter() - sent) * 1000
            if event.get("usage"):
                prompt = event["usage"]["prompt_tokens"]
                cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    if ttft is None:
        raise RuntimeError("no content came back")
    return ttft, prompt, cached


async def chat_turns(server: Server, run: int, turns: int, tokens: int) -> list[tuple[float, int, int]]:
    """(TTFT in ms, prompt tokens, cached tokens) for each turn of one conversation."""
    rows = []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in range(1, turns + 1):
            body = {"model": server.model, "messages": conversation(run, turn), "max_tokens": tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            try:
                rows.append(await one_turn(client, server.base_url + "/v1/chat/completions", body))
            except httpx.RemoteProtocolError:  # a kept-alive connection the server had closed: once more
                rows.append(await one_turn(client, server.base_url + "/v1/chat/completions", body))
    return rows


def measure(server: Server, args: argparse.Namespace) -> list[list[tuple[float, int, int]]]:
    server.start()
    try:
        server.warm()
        asyncio.run(chat_turns(server, 99, 2, args.tokens))  # a warm-up chat (threads, allocations)
        runs = []
        for run in range(args.repeats):
            wait_for_idle(args.idle_wait)
            runs.append(asyncio.run(chat_turns(server, run, args.turns, args.tokens)))
        return runs
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(os.environ.get("MGR_TEST_GGUF", DEFAULT_GGUF)))
    p.add_argument("--turns", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3, help="conversations per server (the median is shown)")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated a turn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4, help="slots of mgr and llama-server")
    p.add_argument("--ctx", type=int, default=4096, help="context per slot, in tokens")
    p.add_argument("--idle-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per run")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-prompt-cache-") as tmp:
        measured = {}
        for kind in (MgrServer, XLlamaCppServer):
            server = kind(args, Path(tmp))
            print(f"measuring {server.name} ...", file=sys.stderr, flush=True)
            measured[server.name] = measure(server, args)
            print(f"  {server.description}\n  TTFT ms: {[round(r[0]) for r in measured[server.name][0]]}",
                  file=sys.stderr, flush=True)
    mgr, peer = measured["mgr"], measured["xllamacpp"]
    print(f"\nTTFT per turn, median of {args.repeats} conversations ({args.model.name}, {args.threads} threads, "
          f"{args.parallel} slots, {args.tokens} tokens a turn)\n")
    print("| turn | prompt tokens | mgr ms | llama-server ms | mgr / llama-server | mgr cached tokens |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for t in range(args.turns):
        ours = statistics.median(run[t][0] for run in mgr)
        theirs = statistics.median(run[t][0] for run in peer)
        ratio = ours / theirs
        worst = max(worst, ratio)
        print(f"| {t + 1} | {mgr[0][t][1]} | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x | {mgr[0][t][2]} |")
    first = statistics.median(r[0][0] for r in mgr) / statistics.median(r[0][0] for r in peer)
    print(f"\nturn 1: {first:.2f}x (target <= 1.05x); worst turn: {worst:.2f}x (target <= 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
