"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens, as the anthropic SDKs and
Claude Code (ANTHROPIC_BASE_URL pointing at mgr) send them.

Translation only, both ways: the body becomes the one internal ChatRequest (anthropic_request.py), which takes
its lease and runner call as every API's does (forced tool calls enforced by the runners, capabilities checked
by lease_for); the runner's OpenAI chunks become Anthropic's content blocks (`Blocks`), streamed as its events
(message_start, ping, content_block_start/delta/stop, message_delta, message_stop) or gathered into one
message. Errors are rendered in Anthropic's shape by render.py, before the 200 and, as an `error` event,
after it.

Keys: the SDKs send `x-api-key` or `Authorization: Bearer`; both are accepted and ignored, as mgr has no keys
yet (a check would go first in `AnthropicApi.messages` / `count_tokens`, before the body is read, or ahead
of every API in DaemonApp).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..instances import Lease
from ..metrics import metered
from ..protocol import strict_json
from ..runners.http import RunnerResponse, events
from ..scheduler import Scheduler
from . import anthropic_shapes as wire
from .anthropic_request import messages_request, tokenize_body
from .asgi import CleanupStreamingResponse, lease_for, read_json, unless_disconnected
from .operations import ChatRequest
from .render import anthropic_stream_error

SSE = "text/event-stream"
PING_SECONDS = 10.0  # a ping while the runner is quiet (a long prompt's prefill) keeps proxies from closing


# runner chunks -> Anthropic content blocks -----------------------------------------------------------------
class Blocks:
    """The runner's chat chunks as Anthropic's stream events: a block opens when the kind of output changes
    (reasoning -> thinking, content -> text, each tool call -> tool_use) and closes when the next opens; the
    end is one message_delta (stop reason, usage) and message_stop."""

    def __init__(self, stop_sequences: list[str], show_thinking: bool) -> None:
        self.stop_sequences = stop_sequences
        self.show_thinking = show_thinking
        self.index = -1  # the open block's index
        self.open: str | None = None  # its type
        self.call: int | None = None  # the runner's index of the tool call it holds
        self.tool_used = False
        self.finish: str | None = None
        self.stop_string: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0

    def feed(self, chunk: dict[str, Any]) -> list[wire.StreamEvent]:
        out: list[wire.StreamEvent] = []
        usage = chunk.get("usage")
        if usage:
            self.input_tokens = int(usage.get("prompt_tokens") or 0)
            self.output_tokens = int(usage.get("completion_tokens") or 0)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")  # vLLM 0.25 says reasoning
            if thought:
                out += self._into("thinking")
                if self.show_thinking:
                    out.append(self._delta({"type": "thinking_delta", "thinking": thought}))
            if delta.get("content"):
                out += self._into("text")
                out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                if self.open != "tool_use" or call.get("index", 0) != self.call:
                    out += self._into("tool_use", call, function)
                if function.get("arguments"):
                    out.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                stop = choice.get("stop_reason")  # vLLM's; a runner that does not say leaves it end_turn
                self.stop_string = stop if isinstance(stop, str) and stop in self.stop_sequences else None
        return out

    def end(self) -> list[wire.StreamEvent]:
        out = self._close()
        reason: wire.StopReason
        if self.finish == "length":
            reason = "max_tokens"
        elif self.tool_used or self.finish == "tool_calls":
            reason = "tool_use"
        else:
            reason = "stop_sequence" if self.stop_string is not None else "end_turn"
        out.append({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": self.stop_string},
                    "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}})
        out.append({"type": "message_stop"})
        return out

    def _into(self, kind: str, call: dict[str, Any] | None = None,
              function: dict[str, Any] | None = None) -> list[wire.StreamEvent]:
        if self.open == kind and kind != "tool_use":
            return []
        out = self._close()
        self.index += 1
        self.open = kind
        block: wire.ContentBlock
        if kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        elif kind == "text":
            block = {"type": "text", "text": ""}
        else:
            assert call is not None and function is not None
            self.call = call.get("index", 0)
            self.tool_used = True
            block = {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": function.get("name") or "",
                     "input": {}}
        out.append({"type": "content_block_start", "index": self.index, "content_block": block})
        return out

    def _close(self) -> list[wire.StreamEvent]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: wire.TextDelta | wire.ThinkingDelta | wire.InputJsonDelta) -> wire.BlockDelta:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}


def gather(start: wire.Message, stream: list[wire.StreamEvent]) -> wire.Message:
    """A whole message from its stream events (what the SDKs' accumulators do)."""
    message = start
    inputs: dict[int, list[str]] = {}
    for event in stream:
        if event["type"] == "content_block_start":
            message["content"].append(dict(event["content_block"]))  # type: ignore[arg-type]
        elif event["type"] == "content_block_delta":
            block: Any = message["content"][event["index"]]
            delta: Any = event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                inputs.setdefault(event["index"], []).append(delta["partial_json"])
        elif event["type"] == "message_delta":
            message["stop_reason"] = event["delta"]["stop_reason"]
            message["stop_sequence"] = event["delta"]["stop_sequence"]
            message["usage"]["input_tokens"] = event["usage"]["input_tokens"]
            message["usage"]["output_tokens"] = event["usage"]["output_tokens"]
    for index, pieces in inputs.items():
        message["content"][index]["input"] = _json_object("".join(pieces))  # type: ignore[typeddict-unknown-key]
    return message


def _json_object(text: str) -> dict[str, Any]:
    """A call's arguments as the tool_use input object (the runners send JSON text; text that is not an
    object is kept, as ollama.py keeps it)."""
    try:
        value = strict_json.loads(text) if text.strip() else {}  # a model's NaN would be no JSON to the client
    except ValueError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}


def _sse(event: wire.StreamEvent | wire.ErrorBody) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


PING: wire.Ping = {"type": "ping"}


# the endpoints ----------------------------------------------------------------------------------------------
class AnthropicApi:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def routes(self) -> list[Route]:
        return [
            Route(wire.MESSAGES_PATH, self.messages, methods=["POST"]),
            Route(wire.COUNT_TOKENS_PATH, self.count_tokens, methods=["POST"]),
        ]

    async def messages(self, request: Request) -> Response:
        op, shown = messages_request(await read_json(request))
        blocks = Blocks(list(op.sampling.get("stop", [])), shown)  # the client's: a model's own stops end turns
        lease = await lease_for(request.receive, self.scheduler, op)
        start = _start(op.target.model)
        if not op.stream:
            try:
                # A runner sends a whole answer's headers only when it is done: the client may leave before
                # that, and then the runner must stop (the connection to it is closed).
                return JSONResponse(await unless_disconnected(request.receive, self._whole(op, lease, blocks, start)))
            finally:
                lease.release()
        try:
            upstream = await self._open(op, lease)
        except BaseException:
            lease.release()
            raise
        return CleanupStreamingResponse(_stream(upstream, blocks, start), SSE, [lease.release, upstream.aclose])

    async def count_tokens(self, request: Request) -> Response:
        """The prompt's tokens as the model's tokenizer counts them, its chat template applied (the runner
        renders and counts it, the model's own system prompt and history included: the model is loaded for
        that, as for a generation, and a request the model cannot serve is the same 400)."""
        op, _ = messages_request(await read_json(request), counting=True)
        lease = await lease_for(request.receive, self.scheduler, op)
        try:
            answer = await unless_disconnected(request.receive,
                                               lease.client.tokenize(tokenize_body(op, lease.spec.name)))
        finally:
            lease.release()
        count: wire.TokenCount = {"input_tokens": answer["count"]}
        return JSONResponse(count)

    @staticmethod
    async def _open(op: ChatRequest, lease: Lease) -> RunnerResponse:
        # Always a stream with usage from the runner: a whole answer is gathered here.
        return await lease.client.chat(op.runner_body(lease.spec.name, stream=True, usage=True))

    async def _whole(self, op: ChatRequest, lease: Lease, blocks: Blocks, start: wire.Message) -> wire.Message:
        upstream = await self._open(op, lease)
        stream: list[wire.StreamEvent] = []
        try:
            async for chunk in metered(events(upstream), lease.spec.name):
                stream += blocks.feed(chunk)
        finally:
            await upstream.aclose()
        return gather(start, stream + blocks.end())


def _start(model: str) -> wire.Message:
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}}


async def _stream(upstream: RunnerResponse, blocks: Blocks, start: wire.Message) -> AsyncIterator[bytes]:
    """message_start and a ping, the blocks' events as the runner's chunks come (a ping whenever the runner
    is quiet for PING_SECONDS), then the end; an error after the 200 is an `error` event, Anthropic's way."""
    yield _sse({"type": "message_start", "message": start})
    yield _sse(PING)
    chunks = aiter(metered(events(upstream)))
    pending: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(chunks))
            while not (await asyncio.wait({pending}, timeout=PING_SECONDS))[0]:
                yield _sse(PING)
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                break
            for event in blocks.feed(chunk):
                yield _sse(event)
        for event in blocks.end():
            yield _sse(event)
    except Exception as e:  # after the 200: an `error` event (a failure mgr did not expect: "internal error", logged)
        yield _sse(anthropic_stream_error(e))
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
