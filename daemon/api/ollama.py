"""The Ollama API's generation endpoints (/api/chat, /api/generate, /api/embed, /api/embeddings): parse the
body into one internal request (operations.py), take a lease, call the runner through its typed client, and
render the runner's OpenAI chunks back as Ollama's NDJSON with nanosecond metrics and done_reason. Nothing is
decided here. The model and status endpoints are in ollama_models.py."""

from __future__ import annotations

import asyncio
import base64
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
    Effort,
    EmbeddingRequest,
    Target,
    optional_bool,
    optional_str,
    positive_int,
    required_str,
    strings,
    tool_choice,
    tool_list,
)
from .options import map_format, map_options, parse_keep_alive

NDJSON = "application/x-ndjson"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


# Ollama bodies -> internal requests ---------------------------------------------------------------------
_IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                (b"RIFF", "image/webp"))


def _image_part(data: Any, where: str) -> dict[str, Any]:
    """An Ollama image (base64, no data: prefix) as an OpenAI image_url part with a data URL."""
    if not isinstance(data, str) or not data:
        raise BadRequest(f"{where} must be base64-encoded image data")
    try:
        head = base64.b64decode(data[:64], validate=True)
    except ValueError:
        raise BadRequest(f"{where} is not valid base64") from None
    kind = next((t for magic, t in _IMAGE_TYPES if head.startswith(magic)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}}


def _images(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list of base64-encoded images")
    return [_image_part(image, f"{where}[{i}]") for i, image in enumerate(value)]


def _messages(raw: list[Any]) -> list[shapes.ChatMessage]:
    """Ollama messages as OpenAI's: tool calls with JSON-string arguments and ids, which the tool results
    that follow refer to (Ollama matches them by tool_name); images as image_url parts."""
    messages: list[shapes.ChatMessage] = []
    call_ids: dict[str, str] = {}  # function name -> id of its latest call
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a string role")
        content = message.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a string")
        result: shapes.ChatMessage = {"role": message["role"], "content": content}
        images = _images(message.get("images"), f"messages[{index}].images")
        if images:
            result["content"] = [{"type": "text", "text": content}, *images]
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise BadRequest(f"messages[{index}].tool_calls must be a list")
            result["tool_calls"] = []
            for i, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise BadRequest(f"messages[{index}].tool_calls[{i}] needs a function with a name")
                arguments = function.get("arguments", {})
                ident = str(call.get("id") or f"call_{index}_{i}")
                call_ids[function["name"]] = ident
                result["tool_calls"].append({"id": ident, "type": "function", "function": {
                    "name": function["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
        name = message.get("tool_name") or message.get("name")
        if isinstance(name, str) and name:
            result["name"] = name
            if message["role"] == "tool" and name in call_ids:
                result["tool_call_id"] = call_ids[name]
        thinking = message.get("thinking")
        if isinstance(thinking, str) and thinking:
            result["reasoning_content"] = thinking
        messages.append(result)
    return messages


def _think(body: dict[str, Any]) -> bool | Effort | None:
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return think
    if think in ("low", "medium", "high"):
        return think  # type: ignore[no-any-return]
    raise BadRequest('think must be true, false, "low", "medium" or "high"')


def _logprobs(body: dict[str, Any]) -> tuple[bool, int | None]:
    return optional_bool(body, "logprobs", False), positive_int(body, "top_logprobs", 20)


def _target(body: dict[str, Any], num_ctx: int | None) -> Target:
    return Target(required_str(body, "model"), num_ctx, parse_keep_alive(body.get("keep_alive")))


def chat_request(body: dict[str, Any]) -> ChatRequest:
    raw = body.get("messages") or []
    if not isinstance(raw, list):
        raise BadRequest("messages must be a list")
    options = map_options(body.get("options"))
    messages = _messages(raw)
    logprobs, top = _logprobs(body)
    tools = tool_list(body.get("tools"))
    return ChatRequest(
        target=_target(body, options.num_ctx), messages=messages,
        stream=optional_bool(body, "stream", True), sampling=options.sampling,
        response_format=map_format(body.get("format")), tools=tools,
        # mgr goes past Ollama here (its #17921): tool_choice and parallel_tool_calls as OpenAI's, enforced
        tool_choice=tool_choice(body.get("tool_choice"), tools),
        parallel_tool_calls=optional_bool(body, "parallel_tool_calls", True) if tools else None,
        thinking=_think(body), logprobs=logprobs, top_logprobs=top,
        images=any(isinstance(m.get("content"), list) for m in messages),
        # Ollama drops the oldest messages (never the system prompt) when a chat outgrows num_ctx
        truncate=body.get("truncate", True) is not False,
    )


def generate_request(body: dict[str, Any]) -> ChatRequest | CompletionRequest:
    """/api/generate: a raw prompt is a completion; otherwise one user turn (after the system prompt)."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    options = map_options(body.get("options"))
    target = _target(body, options.num_ctx)
    stream = optional_bool(body, "stream", True)
    response_format = map_format(body.get("format"))
    if not prompt:  # an empty prompt loads (or with keep_alive 0 unloads) the model
        return ChatRequest(target, [], stream)
    system = optional_str(body, "system")
    suffix = optional_str(body, "suffix")
    images = _images(body.get("images"), "images")
    logprobs, top = _logprobs(body)
    if body.get("raw") or suffix:
        if images:
            raise BadRequest("images need the chat template: leave raw and suffix off")
        return CompletionRequest(target, prompt, stream, options.sampling, response_format, suffix=suffix,
                                 logprobs=(top or 0) if logprobs else None)
    messages: list[shapes.ChatMessage] = [{"role": "system", "content": system}] if system else []
    content: str | list[dict[str, Any]] = [{"type": "text", "text": prompt}, *images] if images else prompt
    messages.append({"role": "user", "content": content})
    return ChatRequest(target, messages, stream, options.sampling, response_format, thinking=_think(body),
                       logprobs=logprobs, top_logprobs=top, images=bool(images),
                       truncate=body.get("truncate", True) is not False)


def embedding_request(body: dict[str, Any], inputs: list[str]) -> EmbeddingRequest:
    options = map_options(body.get("options"))
    dimensions = positive_int(body, "dimensions")
    if dimensions == 0:
        raise BadRequest("dimensions must be at least 1")
    return EmbeddingRequest(_target(body, options.num_ctx), inputs, truncate=body.get("truncate", True) is not False,
                            dimensions=dimensions)


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
        lease = await lease_for(request.receive, self.scheduler, op.target, op.needs())
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
def _ollama_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """A choice's logprobs in Ollama's shape ([{token, logprob, bytes, top_logprobs}]), from chat's
    (already that shape) or legacy completions' (parallel lists)."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        return []
    if logprobs.get("content") is not None:
        return list(logprobs["content"])
    tops = logprobs.get("top_logprobs") or []
    return [{"token": token, "logprob": logprob,
             "top_logprobs": [{"token": t, "logprob": v} for t, v in (tops[i] or {}).items()] if i < len(tops) else []}
            for i, (token, logprob) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [],
                                                     strict=False))]


async def _ollama_chunks(upstream: RunnerResponse, lease: Lease, chat: bool,
                         started: int) -> AsyncIterator[dict[str, Any]]:
    """Runner SSE events -> Ollama chunks (content, thinking, logprobs); tool calls, gathered, in one chunk at
    the end; the last one carries done_reason and the metrics."""
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
                slot = calls.setdefault(call.get("index", 0), {"id": "", "name": "", "arguments": ""})
                function = call.get("function") or {}
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
            piece = delta.get("content") if chat else choice.get("text", delta.get("content"))
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            logprobs = _ollama_logprobs(choice)
            if piece or thinking or logprobs:
                if first_token is None:
                    first_token = time.perf_counter_ns()
                chunk: dict[str, Any] = {"model": model, "created_at": now_iso()}
                if chat:
                    chunk["message"] = {"role": "assistant", "content": piece or ""}
                    if thinking:
                        chunk["message"]["thinking"] = thinking
                else:
                    chunk["response"] = piece or ""
                    if thinking:
                        chunk["thinking"] = thinking
                if logprobs:
                    chunk["logprobs"] = logprobs
                chunk["done"] = False
                yield chunk
    if calls:
        tool_calls = [{"id": c["id"] or f"call_{i}", "function": {
            "index": i, "name": c["name"], "arguments": _json_object(c["arguments"])}}
            for i, (_, c) in enumerate(sorted(calls.items()))]
        yield {"model": model, "created_at": now_iso(), "done": False,
               **({"message": {"role": "assistant", "content": "", "tool_calls": tool_calls}} if chat
                  else {"response": ""})}
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
    """One answer from the chunks of a stream: the final chunk with the whole text, thinking, tool calls and
    logprobs."""
    parts: list[str] = []
    thoughts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    async for chunk in chunks:
        if chunk["done"]:
            final = chunk
            continue
        logprobs += chunk.get("logprobs", [])
        if chat:
            parts.append(chunk["message"]["content"])
            thoughts.append(chunk["message"].get("thinking", ""))
            tool_calls += chunk["message"].get("tool_calls", [])
        else:
            parts.append(chunk["response"])
            thoughts.append(chunk.get("thinking", ""))
    thinking = "".join(thoughts)
    if chat:
        final["message"] = {"role": "assistant", "content": "".join(parts)}
        if thinking:
            final["message"]["thinking"] = thinking
        if tool_calls:
            final["message"]["tool_calls"] = tool_calls
    else:
        final["response"] = "".join(parts)
        if thinking:
            final["thinking"] = thinking
    if logprobs:
        final["logprobs"] = logprobs
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
