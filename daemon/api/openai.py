"""The OpenAI API (/v1/*). The runners speak this protocol already, so requests pass through almost as they
are: the adapter only finds the runner (through the scheduler) and relays bytes, which keeps the daemon's
added latency near zero."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mgr.registry.store import Manifest, Store

from ..errors import ApiError, BadRequest
from ..scheduler import Scheduler
from ..runner_http import RunnerGone, RunnerHttp, RunnerResponse
from .common import (
    RUNNER_STOPPED, CleanupStreamingResponse, lease_for, open_runner_stream, read_json, require_str,
)


def _model_entry(manifest: Manifest) -> dict[str, Any]:
    created = int(dt.datetime.fromisoformat(manifest.modified_at).timestamp())
    return {"id": manifest.name, "object": "model", "created": created, "owned_by": "mgr"}


class OpenAIApi:
    def __init__(self, scheduler: Scheduler, store: Store, runners: RunnerHttp) -> None:
        self.scheduler = scheduler
        self.store = store
        self.runners = runners

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]

    async def models(self, _: Request) -> Response:
        manifests = await asyncio.to_thread(self.store.list)
        return JSONResponse({"object": "list", "data": [_model_entry(m) for m in manifests]})

    async def model(self, request: Request) -> Response:
        return JSONResponse(_model_entry(await asyncio.to_thread(self.store.get, request.path_params["model"])))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise BadRequest("messages must be a non-empty list")
        return await self._relay(request, body, "/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        body = await read_json(request)
        if "prompt" not in body:
            raise BadRequest("missing field 'prompt'")
        return await self._relay(request, body, "/v1/completions")

    async def embeddings(self, request: Request) -> Response:
        body = await read_json(request)
        if "input" not in body:
            raise BadRequest("missing field 'input'")
        return await self._relay(request, body, "/v1/embeddings")

    async def _relay(self, request: Request, body: dict[str, Any], path: str) -> Response:
        model = require_str(body, "model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
        lease = await lease_for(request, self.scheduler, model)
        # The runner knows the model by its full name ("smol:latest"); vLLM refuses any other.
        body = {**body, "model": lease.spec.name}
        try:
            upstream = await open_runner_stream(self.runners, lease.base_url + path, body)
        except BaseException:
            lease.release()
            raise
        if stream:
            return CleanupStreamingResponse(_relay_sse(upstream), "text/event-stream",
                                            [lease.release, upstream.aclose])
        try:
            content = await upstream.read()
        except RunnerGone:
            raise ApiError(RUNNER_STOPPED, 502) from None
        finally:
            lease.release()
            await upstream.aclose()
        return Response(content, media_type="application/json")


async def _relay_sse(upstream: RunnerResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.iter_bytes():
            yield chunk
    except RunnerGone:
        error = {"error": {"message": RUNNER_STOPPED, "type": "server_error", "code": 502}}
        yield b"\n\ndata: " + json.dumps(error).encode() + b"\n\n"


def openai_error_body(message: str, status: int) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            503: "server_busy"}.get(status, "server_error")
    code = "model_not_found" if status == 404 else status
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}

