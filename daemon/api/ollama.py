"""The Ollama API's generation endpoints (/api/chat, /api/generate, /api/embed, /api/embeddings): parse the
body into one internal request (operations.py), take a lease, call the runner through its typed client, and
render the runner's OpenAI chunks back as Ollama's NDJSON with nanosecond metrics and done_reason. Nothing is
decided here. The model and status endpoints are in ollama_models.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mgr.registry.errors import MgrError
from mgr.registry.store import Store

from ..errors import BadRequest
from ..instances import Lease
from ..protocol import shapes
from ..runners.http import RunnerResponse, events
from ..scheduler import Scheduler
from .asgi import CleanupStreamingResponse, lease_for, read_json, unless_disconnected
from .operations import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Target,
    optional_bool,
    optional_str,
    required_str,
    strings,
)
from .options import map_format, map_options, parse_keep_alive

NDJSON = "application/x-ndjson"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


# Ollama bodies -> internal requests ---------------------------------------------------------------------
def _message(message: Any, index: int) -> shapes.ChatMessage:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(f"messages[{index}] must be an object with a string role")
    if message.get("images"):
        raise BadRequest("this model does not accept images")
    content = message.get("content", "")
    if not isinstance(content, str):
        raise BadRequest(f"messages[{index}].content must be a string")
    result: shapes.ChatMessage = {"role": message["role"], "content": content}
    if message.get("tool_calls"):
        result["tool_calls"] = [
            {"id": f"call_{index}_{i}", "type": "function", "function": {
                "name": call.get("function", {}).get("name", ""),
                "arguments": json.dumps(call.get("function", {}).get("arguments", {})),
            }}
            for i, call in enumerate(message["tool_calls"])
        ]
    if message.get("tool_name"):
        result["name"] = message["tool_name"]
    return result


def _target(body: dict[str, Any], num_ctx: int | None) -> Target:
    return Target(required_str(body, "model"), num_ctx, parse_keep_alive(body.get("keep_alive")))


def chat_request(body: dict[str, Any]) -> ChatRequest:
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    options = map_options(body.get("options"))
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("tools must be a list")
    return ChatRequest(
        target=_target(body, options.num_ctx), messages=[_message(m, i) for i, m in enumerate(messages)],
        stream=optional_bool(body, "stream", True), sampling=options.sampling,
        response_format=map_format(body.get("format")), tools=tools,
        # Ollama drops the oldest messages (never the system prompt) when a chat outgrows num_ctx
        truncate=body.get("truncate", True) is not False,
    )


def generate_request(body: dict[str, Any]) -> ChatRequest | CompletionRequest:
    """/api/generate: a raw prompt is a completion; otherwise one user turn (after the system prompt)."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    if body.get("images"):
        raise BadRequest("this model does not accept images")
    options = map_options(body.get("options"))
    target = _target(body, options.num_ctx)
    stream = optional_bool(body, "stream", True)
    response_format = map_format(body.get("format"))
    if not prompt:  # an empty prompt loads (or with keep_alive 0 unloads) the model
        return ChatRequest(target, [], stream)
    if body.get("raw"):
        return CompletionRequest(target, prompt, stream, options.sampling, response_format)
    system = optional_str(body, "system")
    messages: list[shapes.ChatMessage] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return ChatRequest(target, messages, stream, options.sampling, response_format,
                       truncate=body.get("truncate", True) is not False)


def embedding_request(body: dict[str, Any], inputs: list[str]) -> EmbeddingRequest:
    options = map_options(body.get("options"))
    return EmbeddingRequest(_target(body, options.num_ctx), inputs, truncate=body.get("truncate", True) is not False)


class OllamaGeneration:
    def __init__(self, scheduler: Scheduler, store: Store) -> None:
        self.scheduler = scheduler
        self.store = store

    def routes(self) -> list[Route]:
        return [
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embeddings, methods=["POST"]),
        ]

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        op = chat_request(await read_json(request))
        if not op.messages:
            return await self.load_or_unload(request, op.target, op.stream, chat=True)
        return await self._generate(request, op, chat=True, started=started)

    async def generate(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        op = generate_request(await read_json(request))
        if isinstance(op, ChatRequest) and not op.messages:
            return await self.load_or_unload(request, op.target, op.stream, chat=False)
        return await self._generate(request, op, chat=False, started=started)

    async def embed(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await read_json(request)
        answer, lease = await self._embed(request, embedding_request(body, strings(body.get("input"), "input")))
        return JSONResponse({
            "model": lease.spec.name, "embeddings": [d["embedding"] for d in answer["data"]],
            "total_duration": time.perf_counter_ns() - started, "load_duration": int(lease.load_seconds * 1e9),
            "prompt_eval_count": answer["usage"]["prompt_tokens"],
        })

    async def embeddings(self, request: Request) -> Response:
        """The legacy endpoint: one prompt, one vector."""
        body = await read_json(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        answer, _ = await self._embed(request, embedding_request(body, [prompt]))
        return JSONResponse({"embedding": answer["data"][0]["embedding"]})

    async def _embed(self, request: Request, op: EmbeddingRequest) -> tuple[shapes.EmbeddingList, Lease]:
        lease = await lease_for(request.receive, self.scheduler, op.target)
        try:
            if not op.input:
                empty: shapes.EmbeddingList = {"object": "list", "model": lease.spec.name, "data": [],
                                               "usage": {"prompt_tokens": 0, "total_tokens": 0}}
                return empty, lease
            return await lease.client.embedding(op.runner_body(lease.spec.name)), lease
        finally:
            lease.release()

    async def load_or_unload(self, request: Request, target: Target, stream: bool, chat: bool) -> Response:
        if target.keep_alive == 0:
            await asyncio.to_thread(self.store.get, target.model)  # 404 for an unknown model
            await self.scheduler.unload(target.model)
            reason = "unload"
        else:
            await unless_disconnected(request.receive,
                                      self.scheduler.load(target.model, target.num_ctx, target.keep_alive))
            reason = "load"
        answer: dict[str, Any] = {"model": target.model, "created_at": now_iso(), "done": True, "done_reason": reason}
        if chat:
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        if stream:
            return Response(json.dumps(answer) + "\n", media_type=NDJSON)
        return JSONResponse(answer)

    async def _generate(self, request: Request, op: ChatRequest | CompletionRequest, chat: bool,
                        started: int) -> Response:
        lease = await lease_for(request.receive, self.scheduler, op.target)
        if not op.stream:
            try:
                # A runner sends a whole answer's headers only when it is done: the client may leave before
                # that, and then the runner must stop (the connection to it is closed).
                return JSONResponse(await unless_disconnected(request.receive, self._answer(op, lease, chat, started)))
            finally:
                lease.release()
        try:
            upstream = await self._open(op, lease)
        except BaseException:
            lease.release()
            raise
        chunks = _ollama_chunks(upstream, lease, chat, started)
        return CleanupStreamingResponse(_ndjson(chunks), NDJSON, [lease.release, upstream.aclose])

    @staticmethod
    async def _open(op: ChatRequest | CompletionRequest, lease: Lease) -> RunnerResponse:
        # Always a stream from the runner, with usage: a whole answer is gathered here, with the metrics.
        if isinstance(op, ChatRequest):
            return await lease.client.chat(op.runner_body(lease.spec.name, stream=True, usage=True))
        return await lease.client.completion(op.runner_body(lease.spec.name, stream=True, usage=True))

    async def _answer(self, op: ChatRequest | CompletionRequest, lease: Lease, chat: bool,
                      started: int) -> dict[str, Any]:
        """A whole answer: the runner's stream gathered into one final chunk."""
        upstream = await self._open(op, lease)
        try:
            return await _collect(_ollama_chunks(upstream, lease, chat, started), chat)
        finally:
            await upstream.aclose()


# runner chunks -> Ollama chunks ---------------------------------------------------------------------------
async def _ollama_chunks(upstream: RunnerResponse, lease: Lease, chat: bool,
                         started: int) -> AsyncIterator[dict[str, Any]]:
    """Runner SSE events -> Ollama chunks; the last one carries done_reason and the metrics."""
    model = lease.spec.name
    sent = time.perf_counter_ns()
    first_token: int | None = None
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    finish = "stop"
    calls: dict[int, dict[str, str]] = {}
    async for event in events(upstream):
        usage = event.get("usage") or usage
        timings = event.get("timings") or timings
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                finish = "length" if choice["finish_reason"] == "length" else "stop"
            delta = choice.get("delta") or {}
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
            piece = delta.get("content") if chat else choice.get("text", delta.get("content"))
            if piece:
                if first_token is None:
                    first_token = time.perf_counter_ns()
                yield {"model": model, "created_at": now_iso(),
                       **({"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}),
                       "done": False}
    if calls:
        yield {"model": model, "created_at": now_iso(), "done": False, "message": {
            "role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": c["name"], "arguments": _json_object(c["arguments"])}}
                           for _, c in sorted(calls.items())],
        }} if chat else {"model": model, "created_at": now_iso(), "response": "", "done": False}
    finished = time.perf_counter_ns()
    first_token = first_token or finished
    prompt_ns = int(timings["prompt_ms"] * 1e6) if "prompt_ms" in timings else first_token - sent
    eval_ns = int(timings["predicted_ms"] * 1e6) if "predicted_ms" in timings else finished - first_token
    yield {
        "model": model, "created_at": now_iso(),
        **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}),
        "done": True, "done_reason": finish,
        "total_duration": finished - started, "load_duration": int(lease.load_seconds * 1e9),
        "prompt_eval_count": int(usage.get("prompt_tokens", 0)), "prompt_eval_duration": prompt_ns,
        "eval_count": int(usage.get("completion_tokens", 0)), "eval_duration": eval_ns,
    }


async def _collect(chunks: AsyncIterator[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """One answer from the chunks of a stream: the final chunk with the whole text (and tool calls)."""
    parts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    async for chunk in chunks:
        if chunk["done"]:
            final = chunk
        elif chat:
            parts.append(chunk["message"]["content"])
            tool_calls += chunk["message"].get("tool_calls", [])
        else:
            parts.append(chunk["response"])
    if chat:
        final["message"] = {"role": "assistant", "content": "".join(parts)}
        if tool_calls:
            final["message"]["tool_calls"] = tool_calls
    else:
        final["response"] = "".join(parts)
    return final


def _json_object(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"arguments": text}


async def _ndjson(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """One JSON object per line; an error after the stream started becomes a final {"error": ...} line
    (the status, 200, was sent already)."""
    try:
        async for chunk in chunks:
            yield json.dumps(chunk).encode() + b"\n"
    except MgrError as e:
        yield json.dumps({"error": e.message}).encode() + b"\n"
