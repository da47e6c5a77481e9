"""The runner's HTTP face: the internal protocol every runner speaks (mgr.daemon.protocol): OpenAI chat and
text completions, streaming (SSE) or not, embeddings, and GET /health (200 ready, 503 loading).

Translation only: requests become engine Requests, engine Events become OpenAI chunks. Beyond OpenAI's
fields, the final chunk carries `timings` (prompt_ms, predicted_ms) so that the daemon can fill Ollama's
nanosecond metrics with the engine's own numbers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...protocol import shapes, sse
from ...protocol.errors import openai_error_body
from .engine import EmbedRequest, Engine, Event, EventUsage, Request
from .sampling import BadRequest, SamplingParams
from .template import ChatTemplate, normalize_messages


def error_response(message: str, status: int) -> JSONResponse:
    return JSONResponse(openai_error_body(message, status), status)


async def _read_json(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def _watch_disconnect(http: HttpRequest, request: Request) -> None:
    """Cancel the generation when the client goes away (the body is already read, so the next message
    is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            request.cancelled = True
            return


class RunnerApp:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self._template: ChatTemplate | None = None
        self.app = Starlette(routes=[
            Route(shapes.HEALTH_PATH, self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route(shapes.CHAT_PATH, self.chat, methods=["POST"]),
            Route(shapes.COMPLETION_PATH, self.completions, methods=["POST"]),
            Route(shapes.EMBEDDING_PATH, self.embeddings, methods=["POST"]),
        ])

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            e = self.engine
            self._template = ChatTemplate(e.chat_template, e.bos_text, e.eos_text)
        return self._template

    async def health(self, _: HttpRequest) -> Response:
        if not self.engine.ready.is_set() or self.engine.load_error:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({
            "status": "ok", "active": self.engine.active, "waiting": self.engine.waiting,
            "n_ctx_seq": self.engine.n_ctx_seq, "n_parallel": self.engine.config.n_parallel,
        })

    async def models(self, _: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "mgr"}
        ]})

    async def chat(self, http: HttpRequest) -> Response:
        try:
            body = await _read_json(http)
            messages = normalize_messages(body.get("messages"))
            tools = body.get("tools")
            if tools is not None and not isinstance(tools, list):
                raise BadRequest("tools must be a list")
            kwargs = body.get("chat_template_kwargs") or {}
            prompt = self.template.render(messages, tools=tools, **kwargs)
            shorter = (self.template.render(m, tools=tools, **kwargs)
                       for m in _shorter_conversations(messages, bool(body.get("truncate"))))
            params = SamplingParams.from_request(body)
        except BadRequest as e:
            return error_response(str(e), 400)
        return await self._generate(http, body, params, prompt, add_special=True, chat=True, shorter=shorter)

    async def completions(self, http: HttpRequest) -> Response:
        try:
            body = await _read_json(http)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string")
            params = SamplingParams.from_request(body)
        except BadRequest as e:
            return error_response(str(e), 400)
        return await self._generate(http, body, params, prompt, add_special=True, chat=False)

    async def embeddings(self, http: HttpRequest) -> Response:
        try:
            body = await _read_json(http)
            inputs = body.get("input")
            if isinstance(inputs, str):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
                raise BadRequest("input must be a string or a non-empty list of strings")
        except BadRequest as e:
            return error_response(str(e), 400)
        request = EmbedRequest(asyncio.get_running_loop(), inputs, truncate=bool(body.get("truncate", True)))
        self.engine.submit(request)
        try:
            event = await request.events.get()
        finally:
            request.cancelled = True
        if event.kind == "error":
            return error_response(event.text, event.status)
        usage: EventUsage = event.usage or {}
        as_base64 = body.get("encoding_format") == "base64"
        answer: shapes.EmbeddingList = {
            "object": "list", "model": self.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": _base64_floats(v) if as_base64 else v}
                     for i, v in enumerate(usage["data"])],
            "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]},
        }
        return JSONResponse(answer)

    async def _generate(self, http: HttpRequest, body: dict[str, Any], params: SamplingParams, prompt: str,
                        add_special: bool, chat: bool, shorter: Iterator[str] = iter(())) -> Response:
        request = Request(asyncio.get_running_loop(), params, prompt, add_special, shorter)
        self.engine.submit(request)
        watcher = asyncio.create_task(_watch_disconnect(http, request))
        try:
            first = await request.events.get()
        except BaseException:
            request.cancelled = True
            watcher.cancel()
            raise
        if first.kind == "error":
            watcher.cancel()
            return error_response(first.text, first.status)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.get("stream"):
            watcher.cancel()  # StreamingResponse watches for the disconnect itself
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(request, ident, created, chat, include_usage),
                media_type="text/event-stream",
            )
        try:
            parts: list[str] = []
            while True:
                event = await request.events.get()
                if event.kind == "text":
                    parts.append(event.text)
                elif event.kind == "error":
                    return error_response(event.text, event.status)
                elif event.kind == "done":
                    break
        finally:
            request.cancelled = True  # no-op when finished; frees the slot when we leave early
            watcher.cancel()
        content = "".join(parts)
        answer: shapes.ChatCompletion | shapes.TextCompletion
        if chat:
            answer = {
                "id": ident, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": event.finish_reason}],
                "usage": _usage(event), "timings": _timings(event),
            }
        else:
            answer = {
                "id": ident, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "text": content, "finish_reason": event.finish_reason, "logprobs": None}],
                "usage": _usage(event), "timings": _timings(event),
            }
        return JSONResponse(answer)

    async def _stream(self, request: Request, ident: str, created: int, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
        model = self.model_name
        encode = sse.encode  # per token: one local lookup

        def chunk(content: str | None, finish: shapes.FinishReason | None) -> shapes.Chunk:
            if chat:
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": {} if content is None else {"content": content},
                                     "finish_reason": finish}]}
            return {"id": ident, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}]}

        try:
            if chat:
                first: shapes.ChatChunk = {
                    "id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
                yield encode(first)
            while True:
                event = await request.events.get()
                if event.kind == "text":
                    yield encode(chunk(event.text, None))
                elif event.kind == "error":
                    yield encode(openai_error_body(event.text, event.status))
                    return
                elif event.kind == "done":
                    last = chunk(None, event.finish_reason)
                    last["timings"] = _timings(event)
                    yield encode(last)
                    if include_usage:
                        summary = chunk(None, None)  # OpenAI's usage chunk: no choices
                        summary["choices"] = []
                        summary["usage"] = _usage(event)
                        yield encode(summary)
                    yield sse.DONE
                    return
        finally:
            request.cancelled = True


def _shorter_conversations(messages: list[dict[str, Any]], allowed: bool) -> Iterator[list[dict[str, Any]]]:
    """When truncation is allowed: the conversation with its oldest messages dropped one by one; system
    messages and the last message always stay."""
    if not allowed:
        return
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    for i in range(1, len(rest)):
        yield system + rest[i:]


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's encoding_format=base64: little-endian float32, base64 encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _usage(event: Event) -> shapes.Usage:
    usage: EventUsage = event.usage or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings(event: Event) -> shapes.Timings:
    usage: EventUsage = event.usage or {}
    return {"prompt_ms": usage.get("prompt_ms", 0.0), "predicted_ms": usage.get("predicted_ms", 0.0)}
