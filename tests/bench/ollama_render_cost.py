"""The daemon's CPU per streamed token on the Ollama API (/api/chat) against the OpenAI relay, measured in one
process without sockets or a server, so that a busy machine does not blur it (tests/bench/relay_overhead.py
measures the whole path, with the noise of the load generator and the stand-in sharing the cores). A runner
stream of vLLM-shaped chat events is fed through each path's own code, its output thrown away; not a test.

    .venv/bin/python tests/bench/ollama_render_cost.py [--events 200000]
    PYTHONPATH=/tmp/old-tree .venv/bin/python tests/bench/ollama_render_cost.py    (an older mgr, to compare)

Older trees (before issue 16) rendered through `_ollama_chunks` + `_ndjson` (a StreamingResponse's body);
newer ones through `_relay_lines` (plain ASGI). The relay's cost is `_relay_stream` in api/openai.py.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

EVENT = (b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1764555555,"model":"smol:latest",'
         b'"choices":[{"index":0,"delta":{"content":" word"},"logprobs":null,"finish_reason":null,'
         b'"token_ids":null}]}\n\n')  # vLLM 0.25's layout: every field its server set, None too
ROLE = (b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1764555555,"model":"smol:latest",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n')
USAGE = (b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1764555555,"model":"smol:latest",'
         b'"choices":[],"usage":{"prompt_tokens":12,"total_tokens":140,"completion_tokens":128}}\n\ndata: [DONE]\n\n')


class Upstream:
    """A runner's response: the events one read at a time, as the daemon's pool hands them over."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.headers: dict[str, str] = {}

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        yield ROLE
        for _ in range(self.tokens):
            yield EVENT
        yield USAGE

    def abort(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def sink(_: dict[str, Any]) -> None:
    pass


async def never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def one(path: str, tokens: int) -> None:
    from mgr.daemon.api import ollama, openai

    lease: Any = SimpleNamespace(spec=SimpleNamespace(name="smol:latest"), load_seconds=0.0)
    upstream: Any = Upstream(tokens)
    if path == "openai":
        await openai._relay_stream(upstream, never, sink, False, [], openai.Relayed("smol:latest"))
    elif hasattr(ollama, "_relay_lines"):
        await ollama._stream(upstream, ollama._Rendering(lease, True, 0), never, sink)
    else:  # before issue 16: the chunks as dicts, then json.dumps per line (StreamingResponse's body iterator)
        async for _ in ollama._ndjson(ollama._ollama_chunks(upstream, lease, True, 0)):  # type: ignore[attr-defined]
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer")
    args = parser.parse_args()
    from mgr.daemon.api import ollama

    print(f"mgr's ollama.py from {ollama.__file__}")
    for path in ("ollama", "openai"):
        answers = args.events // args.tokens

        async def run(path: str = path, answers: int = answers) -> None:
            for _ in range(answers):
                await one(path, args.tokens)

        asyncio.run(run(answers=10))  # warm
        started = time.process_time()
        asyncio.run(run())
        cpu = time.process_time() - started
        print(f"{'/api/chat' if path == 'ollama' else '/v1/chat/completions (relay)':30s} "
              f"{cpu / (answers * args.tokens) * 1e6:6.2f} us CPU per token, {cpu / answers * 1e6:7.0f} us per answer "
              f"of {args.tokens} tokens")


if __name__ == "__main__":
    main()
