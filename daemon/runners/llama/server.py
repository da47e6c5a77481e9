"""The runner's HTTP face: the internal protocol every runner speaks (DESIGN.md): OpenAI chat and text
completions, streaming (SSE) or not, and GET /health (200 ready, 503 loading).

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

from .engine import EmbedRequest, Engine, Event, Request
from .sampling import BadRequest, SamplingParams
from .template import ChatTemplate, normalize_messages


def error_response(message: str, status: int) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


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
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
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
        usage = event.usage or {}
        encode = _base64_floats if body.get("encoding_format") == "base64" else (lambda v: v)
        return JSONResponse({
            "object": "list", "model": self.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(usage["data"])],
            "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]},
        })

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
        usage = _usage(event)
        content = "".join(parts)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": event.finish_reason}
            if chat else {"index": 0, "text": content, "finish_reason": event.finish_reason, "logprobs": None}
        )
        return JSONResponse({
            "id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.model_name, "choices": [choice], "usage": usage, "timings": _timings(event),
        })

    async def _stream(self, request: Request, ident: str, created: int, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": ident, "object": kind, "created": created, "model": self.model_name}

        def chunk(content: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {} if content is None else {"content": content}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
            return {**head, "choices": [choice]}

        try:
            if chat:
                yield _sse({**head, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            while True:
                event = await request.events.get()
                if event.kind == "text":
                    yield _sse(chunk(event.text, None))
                elif event.kind == "error":
                    yield _sse({"error": {"message": event.text, "type": "server_error", "code": event.status}})
                    return
                elif event.kind == "done":
                    yield _sse({**chunk(None, event.finish_reason), "timings": _timings(event)})
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(event)})
                    yield b"data: [DONE]\n\n"
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


def _sse(event: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _usage(event: Event) -> dict[str, int]:
    usage = event.usage or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings(event: Event) -> dict[str, float]:
    usage = event.usage or {}
    return {"prompt_ms": float(usage.get("prompt_ms", 0.0)), "predicted_ms": float(usage.get("predicted_ms", 0.0))}
