#!/usr/bin/env python3
"""STAND-IN for vLLM's OpenAI server, for measuring the daemon's own cost on a machine without a GPU. It
loads no model: it streams completions shaped like vLLM 0.25's (one SSE event per token, a usage event, then
[DONE]) paced like a continuous batcher, every running stream getting its next token at each engine step.
It is as cheap per token as asyncio allows, so that what a benchmark sees on top of it is the daemon.

    python tests/bench/paced_vllm.py --port N [--step-ms 10]     (other vLLM flags are accepted and ignored)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

# vLLM 0.25 writes every field its server set, None too (its protocol models, exclude_unset)
EVENT = ('data: {{"id":"cmpl-{rid}","object":"text_completion","created":{created},"model":"{model}",'
         '"choices":[{{"index":0,"text":" word","logprobs":null,"finish_reason":{finish},"stop_reason":null,'
         '"prompt_token_ids":null,"token_ids":null}}]}}\n\n')
CHAT_EVENT = ('data: {{"id":"chatcmpl-{rid}","object":"chat.completion.chunk","created":{created},"model":"{model}",'
              '"choices":[{{"index":0,"delta":{{"content":" word"}},"logprobs":null,"finish_reason":{finish},'
              '"token_ids":null}}]}}\n\n')
CHAT_ROLE = ('data: {{"id":"chatcmpl-{rid}","object":"chat.completion.chunk","created":{created},"model":"{model}",'
             '"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,'
             '"finish_reason":null}}]}}\n\n')
USAGE = ('data: {{"id":"cmpl-{rid}","object":"text_completion","created":{created},"model":"{model}",'
         '"choices":[],"usage":{{"prompt_tokens":12,"total_tokens":{total},"completion_tokens":{n}}}}}\n\n')


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stream:
    __slots__ = ("transport", "left", "rid", "model", "usage", "created", "event")

    def __init__(self, transport: asyncio.Transport, tokens: int, rid: int, model: str, usage: bool,
                 chat: bool = False) -> None:
        self.transport, self.left, self.rid, self.model, self.usage = transport, tokens, rid, model, usage
        self.created = int(time.time())
        self.event = CHAT_EVENT if chat else EVENT


class Engine:
    """Every step, each running stream gets one token, the way vLLM's scheduler decodes a batch."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.running: list[tuple[Stream, int]] = []
        self.waiting: list[Stream] = []
        self.wake = asyncio.Event()

    def submit(self, stream: Stream) -> None:
        self.waiting.append(stream)
        self.wake.set()

    async def run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            await asyncio.sleep(self.step)
            self.running += [(s, s.left) for s in self.waiting]
            self.waiting.clear()
            still = []
            for stream, total in self.running:
                if stream.transport.is_closing():
                    continue  # the client went away: stop generating for it
                stream.left -= 1
                last = stream.left == 0
                data = stream.event.format(rid=stream.rid, created=stream.created, model=stream.model,
                                    finish='"length"' if last else "null").encode()
                if last:
                    if stream.usage:
                        data += USAGE.format(rid=stream.rid, created=stream.created, model=stream.model,
                                             total=total + 12, n=total).encode()
                    data += b"data: [DONE]\n\n"
                    stream.transport.write(chunk(data) + b"0\r\n\r\n")
                else:
                    stream.transport.write(chunk(data))
                    still.append((stream, total))
            self.running = still


class Connection(asyncio.Protocol):
    engine: Engine
    counter = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self.handle(head.split(" ")[0], head.split(" ")[1], body)

    def respond(self, status: str, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (status.encode(), len(body), body))

    def handle(self, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path in ("/health", "/is_sleeping"):
            self.respond("200 OK", b'{"is_sleeping":false}' if path == "/is_sleeping" else b"")
            return
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            self.respond("404 Not Found", b'{"error":{"message":"the paced stand-in only streams completions"}}')
            return
        chat = path == "/v1/chat/completions"
        request = json.loads(body)
        Connection.counter += 1
        if not request.get("stream"):
            self.respond("400 Bad Request", b'{"error":{"message":"the paced stand-in only streams"}}')
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        stream = Stream(self.transport, int(request.get("max_tokens") or 16), Connection.counter,
                        request.get("model", "stand-in"), usage, chat)
        if chat:  # vLLM's first chat chunk: the role, no content yet
            self.transport.write(chunk(CHAT_ROLE.format(rid=stream.rid, created=stream.created,
                                                        model=stream.model).encode()))
        self.engine.submit(stream)


async def serve(port: int, step: float) -> None:
    Connection.engine = Engine(step)
    server = await asyncio.get_running_loop().create_server(Connection, "127.0.0.1", port, backlog=4096)
    print(f"paced vLLM stand-in on 127.0.0.1:{port}, one token per stream every {step * 1000:g} ms", flush=True)
    async with server:
        await Connection.engine.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-ms", type=float, default=10.0)
    args, _ = parser.parse_known_args()
    try:
        import uvloop  # type: ignore[import-not-found]
        uvloop.run(serve(args.port, args.step_ms / 1000))
    except ImportError:
        asyncio.run(serve(args.port, args.step_ms / 1000))


if __name__ == "__main__":
    main()
