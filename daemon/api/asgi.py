"""ASGI plumbing both API adapters share: reading the body, noticing a client that leaves while it waits,
taking a lease unless the client leaves first, and a streaming response that releases what it holds
however it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mgr.registry.capabilities import Capability
from mgr.registry.errors import MgrError

from .. import metrics
from ..errors import BadRequest, ClientGone
from ..instances import Lease
from ..protocol import strict_json, surrogates
from ..scheduler import Scheduler
from .model_defaults import Operation, apply_model_defaults
from .operations import Target, unsupported
from .render import error_response

T = TypeVar("T")


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
        body = strict_json.loads(raw)  # no NaN, Infinity or 1e400; nesting bounded (without recursion)
    except ValueError as e:
        raise BadRequest(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if (where := surrogates.lone_surrogate(raw, body)) is not None:  # before it reaches a tokenizer
        raise BadRequest(surrogates.message(where))
    return body


async def lease_for(receive: Receive, scheduler: Scheduler, request: Target | Operation,
                    needs: Iterable[Capability] = ()) -> Lease:
    """A lease on the model's runner: at once on the fast path; otherwise after waiting (load, queue),
    unless the client leaves first. A model that lacks a capability the request `needs` (an operation's
    own needs()) is a 400 before anything loads. An operation gets the model's own defaults (its Modelfile's
    parameters, system prompt and history: model_defaults.py) under what it asks."""
    operation: Operation | None = None
    if isinstance(request, Target):
        target = request
    else:
        operation, target, needs = request, request.target, request.needs()
    if needs or operation is not None:
        spec = scheduler.spec_for(target.model, target.num_ctx)  # cached: no disk read on the fast path
        for capability in needs:
            if capability not in spec.capabilities:
                raise unsupported(target.model, capability)
        if operation is not None:
            apply_model_defaults(operation, spec)
    lease = scheduler.try_acquire(target.model, target.num_ctx, target.keep_alive)
    if lease is not None:
        metrics.leased(lease.spec.name, 0.0, 0.0)
        return lease
    asked = time.perf_counter()
    lease = await unless_disconnected(receive, scheduler.acquire(target.model, target.num_ctx, target.keep_alive))
    metrics.leased(lease.spec.name, time.perf_counter() - asked, lease.load_seconds)
    return lease


async def client_disconnected(receive: Receive) -> None:
    """Return when the client has gone; the request body must have been read already."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` (a queue wait, a load, a whole answer) but give up with ClientGone if the client
    goes away first; the body has been read, so the next ASGI message can only be the disconnect."""
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
    except (asyncio.CancelledError, MgrError):
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


async def fail_before_sending(exc: BaseException, lease: Lease | None, path: str, scope: Scope, receive: Receive,
                              send: Send) -> None:
    """A plain-ASGI endpoint (the relayed ones) failed before it sent anything: its lease goes back, a
    cancellation goes on, any other error is answered in the called API's shape."""
    if lease is not None:
        lease.release()
    if not isinstance(exc, Exception):
        raise exc
    await error_response(scope["method"], path, exc)(scope, receive, send)
