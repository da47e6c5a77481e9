"""The OpenAI API (/v1/*). The runners speak this protocol already, so a request is parsed into its internal
request (operations.py: the fields mgr reads; the rest passes through as sent), the scheduler finds the
runner, and the runner's answer is relayed byte for byte.

The three relayed endpoints are plain ASGI handlers that the app serves ahead of Starlette's router: every
request to a busy vLLM model crosses them, and at 256 concurrent streams the router, the middleware stack
and StreamingResponse's per-response task group cost as much as the relay itself (tests/bench/
relay_overhead.py measures it). They render errors exactly as the router's handlers do (api/render.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mgr.registry.store import Manifest, Store

from ..errors import BadRequest
from ..instances import Lease
from ..metrics import Relayed, whole_answer
from ..protocol import shapes
from ..protocol.errors import openai_error_body
from ..runners.http import RUNNER_STOPPED, RunnerGone, RunnerResponse, whole
from ..scheduler import Scheduler
from . import fields
from .asgi import client_disconnected, fail_before_sending, lease_for, parse_json, read_body, unless_disconnected
from .operations import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Target,
    optional_bool,
    required_str,
    tool_choice,
    tool_list,
    truncation_report,
)
from .options import context_option

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
JSON_TYPE = (b"content-type", b"application/json")
VLLM_REASONING, REASONING = b'"reasoning":', b'"reasoning_content":'

Operation = ChatRequest | CompletionRequest | EmbeddingRequest


def _model_entry(manifest: Manifest) -> dict[str, Any]:
    created = int(dt.datetime.fromisoformat(manifest.modified_at).timestamp())
    return {"id": manifest.name, "object": "model", "created": created, "owned_by": "mgr"}


# OpenAI bodies -> internal requests: the fields mgr reads are taken out, the rest passes through ---------------
def _rest(body: dict[str, Any], *taken: str) -> dict[str, Any]:
    # num_ctx (top-level or in Ollama-style options) is the scheduler's (the Target's): never the runner's
    return {k: v for k, v in body.items() if k not in taken and k not in ("num_ctx", "options")}


def _target(body: dict[str, Any]) -> Target:
    return Target(required_str(body, "model"), context_option(body))


def _has_image(messages: list[Any]) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in ("image_url", "input_image", "image")
                       for p in m["content"])
               for m in messages)


def chat_request(body: dict[str, Any]) -> ChatRequest:
    fields.check_chat_body(body)  # what passes through to the runner included
    messages = body["messages"]
    tools = tool_list(body.get("tools"))
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in ("low", "medium", "high"):
        raise BadRequest('reasoning_effort must be "low", "medium" or "high"')
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be true or false")
    return ChatRequest(
        _target(body), messages, optional_bool(body, "stream", False), tools=tools,
        tool_choice=tool_choice(body.get("tool_choice"), tools), parallel_tool_calls=parallel, thinking=effort,
        images=_has_image(messages),
        passthrough=_rest(body, "model", "messages", "stream", "tools", "tool_choice", "parallel_tool_calls",
                          "reasoning_effort"))


def completion_request(body: dict[str, Any]) -> CompletionRequest:
    if "prompt" not in body:
        raise BadRequest("missing field 'prompt'")
    fields.check_completion_body(body)
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise BadRequest("suffix must be a string")
    return CompletionRequest(_target(body), body["prompt"],
                             optional_bool(body, "stream", False), suffix=suffix,
                             passthrough=_rest(body, "model", "prompt", "stream", "suffix"))


def embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    if "input" not in body:
        raise BadRequest("missing field 'input'")
    fields.check_embedding_body(body)
    return EmbeddingRequest(_target(body), body["input"],
                            passthrough=_rest(body, "model", "input"))


class OpenAIApi:
    def __init__(self, scheduler: Scheduler, store: Store) -> None:
        self.scheduler = scheduler
        self.store = store

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
        ]

    def relay_routes(self) -> dict[str, ASGIApp]:
        """POST endpoints served as plain ASGI, ahead of the router."""
        return {
            shapes.CHAT_PATH: self._relay_endpoint(shapes.CHAT_PATH, chat_request),
            shapes.COMPLETION_PATH: self._relay_endpoint(shapes.COMPLETION_PATH, completion_request),
            shapes.EMBEDDING_PATH: self._relay_endpoint(shapes.EMBEDDING_PATH, embedding_request),
        }

    async def models(self, _: Request) -> Response:
        manifests = await asyncio.to_thread(self.store.list)
        return JSONResponse({"object": "list", "data": [_model_entry(m) for m in manifests]})

    async def model(self, request: Request) -> Response:
        # the name from the path itself: Starlette's route pattern ends in `$`, which matches before a final
        # newline, so its path parameter would take "smollm2\n" for "smollm2"
        name = request.scope["path"].removeprefix("/v1/models/")
        return JSONResponse(_model_entry(await asyncio.to_thread(self.store.get, name)))

    def _relay_endpoint(self, path: str, parse: Callable[[dict[str, Any]], Operation]) -> ASGIApp:
        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            lease: Lease | None = None
            try:
                op = parse(parse_json(await read_body(receive)))
                lease = await lease_for(receive, self.scheduler, op)
                stream = not isinstance(op, EmbeddingRequest) and op.stream
                rename = _renames_reasoning(lease)
                if not stream:
                    # A runner sends a whole answer's headers only when it is done: the client may leave
                    # before that, and then the runner must stop (the connection to it is closed).
                    content, reported = await unless_disconnected(receive, _whole(op, lease))
                    whole_answer(lease.spec.name, content)
                    if rename:
                        content = content.replace(VLLM_REASONING, REASONING)
                    lease.release()
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        JSON_TYPE, (b"content-length", str(len(content)).encode()), *_encoded(reported)]})
                    await send({"type": "http.response.body", "body": content})
                    return
                upstream = await _open(op, lease)
            except BaseException as exc:  # nothing has been sent yet
                await fail_before_sending(exc, lease, path, scope, receive, send)
                return
            try:
                await _relay_stream(upstream, receive, send, rename,
                                    _encoded(truncation_report(upstream.headers, lease.spec.name)),
                                    Relayed(lease.spec.name))
            finally:
                lease.release()
                await upstream.aclose()
        return endpoint


async def _open(op: Operation, lease: Lease) -> RunnerResponse:
    # The runner knows the model by its full name ("smol:latest"); vLLM refuses any other.
    model = lease.spec.name
    if isinstance(op, ChatRequest):
        return await lease.client.chat(op.runner_body(model, stream=op.stream))
    if isinstance(op, CompletionRequest):
        return await lease.client.completion(op.runner_body(model, stream=op.stream))
    return await lease.client.open(shapes.EMBEDDING_PATH, op.runner_body(model))


async def _whole(op: Operation, lease: Lease) -> tuple[bytes, dict[str, str]]:
    """The answer, and the headers it is relayed with (a prompt cut to fit the context is reported)."""
    upstream = await _open(op, lease)
    return await whole(upstream), truncation_report(upstream.headers, lease.spec.name)


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


def _renames_reasoning(lease: Lease) -> bool:
    """vLLM 0.25 names the reasoning `reasoning`; clients read `reasoning_content` (vLLM's earlier name,
    llama-server's and mgr's own runner's): rename it on the way through, for vLLM models that reason."""
    parsers = lease.spec.parsers
    return parsers is not None and parsers.reasoning_parser is not None


async def _relay_stream(upstream: RunnerResponse, receive: Receive, send: Send, rename: bool = False,
                        headers: list[tuple[bytes, bytes]] | None = None, relayed: Relayed | None = None) -> None:
    """Relay the runner's SSE body as it arrives. A client that leaves closes the runner connection, which
    is how the runner learns to stop generating; one watcher task per stream notices it."""
    async def abort_when_the_client_leaves() -> None:
        await client_disconnected(receive)
        upstream.abort()

    watcher = asyncio.ensure_future(abort_when_the_client_leaves())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + (headers or [])})
        try:
            async for chunk in upstream.iter_bytes():
                if relayed is not None:
                    relayed.chunk(chunk)
                if rename:  # a JSON key: inside a string its quotes would be escaped, so nothing else matches
                    chunk = chunk.replace(VLLM_REASONING, REASONING)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except RunnerGone:
            if not watcher.done():  # the runner failed, not the client: say so in the stream
                error = openai_error_body(RUNNER_STOPPED, 502)
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"\n\ndata: " + json.dumps(error).encode() + b"\n\n"})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
        if relayed is not None:
            relayed.done()
