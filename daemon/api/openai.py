"""The OpenAI API (/v1/*). The runners speak this protocol already, so requests pass through almost as they
are: the adapter finds the runner (through the scheduler) and relays bytes.

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
from ..runner_http import RunnerGone, RunnerHttp, RunnerResponse
from ..scheduler import Lease, Scheduler
from .common import (
    RUNNER_STOPPED, client_disconnected, lease_for, open_runner_stream, parse_json, read_body, require_str,
    runner_answer, unless_disconnected,
)
from .render import error_response

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
JSON_TYPE = (b"content-type", b"application/json")


def _model_entry(manifest: Manifest) -> dict[str, Any]:
    created = int(dt.datetime.fromisoformat(manifest.modified_at).timestamp())
    return {"id": manifest.name, "object": "model", "created": created, "owned_by": "mgr"}


def _check_chat(body: dict[str, Any]) -> None:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest("messages must be a non-empty list")


def _requires(field: str) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        if field not in body:
            raise BadRequest(f"missing field {field!r}")
    return check


class OpenAIApi:
    def __init__(self, scheduler: Scheduler, store: Store, runners: RunnerHttp) -> None:
        self.scheduler = scheduler
        self.store = store
        self.runners = runners

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
        ]

    def relay_routes(self) -> dict[str, ASGIApp]:
        """POST endpoints served as plain ASGI, ahead of the router."""
        return {
            "/v1/chat/completions": self._relay_endpoint("/v1/chat/completions", _check_chat),
            "/v1/completions": self._relay_endpoint("/v1/completions", _requires("prompt")),
            "/v1/embeddings": self._relay_endpoint("/v1/embeddings", _requires("input")),
        }

    async def models(self, _: Request) -> Response:
        manifests = await asyncio.to_thread(self.store.list)
        return JSONResponse({"object": "list", "data": [_model_entry(m) for m in manifests]})

    async def model(self, request: Request) -> Response:
        return JSONResponse(_model_entry(await asyncio.to_thread(self.store.get, request.path_params["model"])))

    def _relay_endpoint(self, path: str, check: Callable[[dict[str, Any]], None]) -> ASGIApp:
        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            lease: Lease | None = None
            try:
                lease, body, stream = await self._admit(check, receive)
                url = lease.base_url + path
                if not stream:
                    # A runner sends a whole answer's headers only when it is done: the client may leave
                    # before that, and then the runner must stop (the connection to it is closed).
                    content = await unless_disconnected(receive, runner_answer(self.runners, url, body))
                    lease.release()
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [JSON_TYPE, (b"content-length", str(len(content)).encode())]})
                    await send({"type": "http.response.body", "body": content})
                    return
                upstream = await open_runner_stream(self.runners, url, body)
            except BaseException as exc:  # nothing has been sent yet
                if lease is not None:
                    lease.release()
                if not isinstance(exc, Exception):
                    raise  # cancelled
                await error_response(scope["method"], path, exc)(scope, receive, send)
                return
            try:
                await _relay_stream(upstream, receive, send)
            finally:
                lease.release()
                await upstream.aclose()
        return endpoint

    async def _admit(self, check: Callable[[dict[str, Any]], None],
                     receive: Receive) -> tuple[Lease, dict[str, Any], bool]:
        """Validate the request and take a lease on the model's runner (waiting for a load or a slot unless
        the client leaves); returns the lease, the body for the runner and whether it streams."""
        body = parse_json(await read_body(receive))
        check(body)
        model = require_str(body, "model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
        lease = await lease_for(receive, self.scheduler, model)
        # The runner knows the model by its full name ("smol:latest"); vLLM refuses any other.
        body["model"] = lease.spec.name
        return lease, body, stream


async def _relay_stream(upstream: RunnerResponse, receive: Receive, send: Send) -> None:
    """Relay the runner's SSE body as it arrives. A client that leaves closes the runner connection, which
    is how the runner learns to stop generating; one watcher task per stream notices it."""
    async def abort_when_the_client_leaves() -> None:
        await client_disconnected(receive)
        upstream.abort()

    watcher = asyncio.ensure_future(abort_when_the_client_leaves())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        try:
            async for chunk in upstream.iter_bytes():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except RunnerGone:
            if not watcher.done():  # the runner failed, not the client: say so in the stream
                error = {"error": {"message": RUNNER_STOPPED, "type": "server_error", "code": 502}}
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"\n\ndata: " + json.dumps(error).encode() + b"\n\n"})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
