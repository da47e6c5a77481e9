"""What both API adapters need: reading JSON bodies, holding a scheduler lease for exactly as long as a
response lives, noticing a client that leaves while it waits, and talking to a runner."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import ApiError, BadRequest, ClientGone
from ..runner_http import RunnerGone, RunnerHttp, RunnerResponse
from ..scheduler import Lease, Scheduler

T = TypeVar("T")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


async def read_json(request: Request) -> dict[str, Any]:
    return parse_json(await request.body())


async def read_body(receive: Receive) -> bytes:
    """The whole request body from ASGI messages (for handlers that run without a Request)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client closed the connection while sending its request")
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("missing request body: send a JSON object")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def require_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"missing or empty field {key!r}")
    return value


async def lease_for(receive: Receive, scheduler: Scheduler, model: str, num_ctx: int | None = None,
                    keep_alive: float | None = None) -> Lease:
    """A lease on the model's runner: at once on the fast path; otherwise after waiting (load, queue),
    unless the client leaves first."""
    lease = scheduler.try_acquire(model, num_ctx, keep_alive)
    if lease is not None:
        return lease
    return await unless_disconnected(receive, scheduler.acquire(model, num_ctx, keep_alive))


async def client_disconnected(receive: Receive) -> None:
    """Return when the client has gone; the request body must have been read already."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` (a queue wait, a load) but give up with ClientGone if the client goes away first;
    the body has been read, so the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(client_disconnected(receive))
    try:
        done, _ = await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, ApiError):
        pass
    raise ClientGone("client closed the connection while waiting")


class CleanupStreamingResponse(StreamingResponse):
    """A StreamingResponse that runs its cleanups (release the lease, close the upstream stream) whatever
    happens, also when the client leaves before the body generator ever starts."""

    def __init__(self, content: AsyncIterator[bytes], media_type: str,
                 cleanups: list[Callable[[], Awaitable[None] | None]]) -> None:
        super().__init__(content, media_type=media_type)
        self.cleanups = cleanups

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for cleanup in self.cleanups:
                result = cleanup()
                if result is not None:
                    await result


async def open_runner_stream(runners: RunnerHttp, url: str, body: dict[str, Any]) -> RunnerResponse:
    """POST to a runner and return the streaming response once its status is known; a runner error status
    becomes an ApiError with the runner's message."""
    try:
        response = await runners.post_json(url, body)
        if response.status_code != 200:
            raw = await response.read()
            await response.aclose()
            raise ApiError(runner_error_message(raw), response.status_code)
    except RunnerGone as e:
        raise ApiError(str(e), 502) from None
    return response


async def runner_answer(runners: RunnerHttp, url: str, body: dict[str, Any]) -> bytes:
    """A whole (not streamed) answer from a runner; cancelling the wait closes the runner connection, which
    stops the runner."""
    response = await open_runner_stream(runners, url, body)
    try:
        return await response.read()
    except RunnerGone:
        raise ApiError(RUNNER_STOPPED, 502) from None
    finally:
        await response.aclose()


def runner_error_message(raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error")
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return raw.decode("utf-8", errors="replace")[:500] or "the model runner failed"


RUNNER_STOPPED = "the model runner stopped unexpectedly; the next request starts a new one"


async def sse_events(response: RunnerResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an OpenAI SSE stream; raises ApiError for an error event or a broken stream."""
    pending = b""
    try:
        async for data in response.iter_bytes():
            lines = (pending + data).split(b"\n")
            pending = lines.pop()  # an incomplete last line waits for the rest
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise ApiError(runner_error_message(payload))
                yield event
    except RunnerGone:
        raise ApiError(RUNNER_STOPPED) from None
