"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items. A request is parsed into the one internal ChatRequest (responses_input.py),
the stored conversation of `previous_response_id` going first; the lease is taken as for any chat (capability
checks in lease_for); the runner's chat chunks become Responses output items and events
(responses_events.py). Both engines are served by the same path.

Responses are stored (unless `store: false`) in the state folder (daemon/responses_store.py: bounded, on
disk, surviving restarts) before the client hears they are done, so a continuation can follow at once. A
failed or abandoned response is not stored: there is nothing to continue from. Errors are the router's, in
OpenAI's shape (render.py); after the stream's 200, a runner failure is a response.failed event."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import BadRequest
from ..instances import Lease
from ..metrics import metered
from ..responses_store import ResponseStore
from ..runners.http import RunnerResponse, events
from ..scheduler import Scheduler
from . import responses_shapes as rs
from .asgi import CleanupStreamingResponse, lease_for, read_json, unless_disconnected
from .render import status_and_message
from .responses_events import OutputAssembler
from .responses_input import ResponsesRequest, new_id, parse

log = logging.getLogger("mgr.daemon")
SSE = "text/event-stream"


class ResponsesApi:
    def __init__(self, scheduler: Scheduler, store: ResponseStore) -> None:
        self.scheduler = scheduler
        self.store = store

    def routes(self) -> list[Route]:
        return [
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/input_items", self.input_items, methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response:
        req = parse(await read_json(request))
        context: list[rs.Item] = []
        if req.previous_response_id is not None:
            previous = await self._stored(req.previous_response_id, "Previous response")
            context = [*previous["input_items"], *previous["response"]["output"]]
            req.with_context(context)
        op = req.op
        lease = await lease_for(request.receive, self.scheduler, op)
        assembler = OutputAssembler(_in_progress(req, lease.spec.name), req.summary, req.reasoning_text_included)
        if not op.stream:
            try:
                # A client that leaves before the answer is whole closes the runner connection: the runner stops.
                response = await unless_disconnected(request.receive, _whole(req, lease, assembler))
            finally:
                lease.release()
            await self._keep(req, context, response)
            return JSONResponse(response)
        try:
            upstream = await _open(req, lease)
        except BaseException:
            lease.release()
            raise
        return CleanupStreamingResponse(self._stream(req, context, upstream, assembler), SSE,
                                        [lease.release, upstream.aclose])

    async def retrieve(self, request: Request) -> Response:
        if request.query_params.get("stream", "false").lower() != "false":
            raise BadRequest("mgr does not stream a stored response again: GET it without stream")
        return JSONResponse((await self._stored(request.path_params["response_id"]))["response"])

    async def delete(self, request: Request) -> Response:
        ident = request.path_params["response_id"]
        await asyncio.to_thread(self.store.delete, ident)
        deleted: rs.DeletedResponse = {"id": ident, "object": "response.deleted", "deleted": True}
        return JSONResponse(deleted)

    async def input_items(self, request: Request) -> Response:
        """The items the model saw for a response (the conversation it continued, then its own input), paged
        as OpenAI pages lists: limit (1 to 100, 20), order (desc by default), after (an item id)."""
        query = request.query_params
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise BadRequest("limit must be a whole number from 1 to 100")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequest('order must be "asc" or "desc"')
        items = (await self._stored(request.path_params["response_id"]))["input_items"]
        if order == "desc":
            items = items[::-1]
        start = 0
        after = query.get("after")
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise BadRequest(f"after: no input item {after!r} in this response")
            start = ids.index(after) + 1
        page = items[start:start + limit]
        listed: rs.ItemList = {"object": "list", "data": page, "first_id": page[0].get("id") if page else None,
                               "last_id": page[-1].get("id") if page else None,
                               "has_more": start + limit < len(items)}
        return JSONResponse(listed)

    async def _stream(self, req: ResponsesRequest, context: list[rs.Item], upstream: RunnerResponse,
                      assembler: OutputAssembler) -> AsyncIterator[bytes]:
        for event in assembler.opening():
            yield _sse(event)
        try:
            async for chunk in metered(events(upstream)):
                for event in assembler.feed(chunk):
                    yield _sse(event)
        except Exception as e:  # the runner failed after the 200: the stream says so, as OpenAI's does
            yield _sse(assembler.failed(status_and_message(e)[1]))
            return
        *done, last = assembler.closing()
        for event in done:
            yield _sse(event)
        await self._keep(req, context, assembler.response)
        yield _sse(last)

    async def _stored(self, ident: str, what: str = "Response") -> rs.StoredResponse:
        return cast(rs.StoredResponse, await asyncio.to_thread(self.store.get, ident, what))

    async def _keep(self, req: ResponsesRequest, context: list[rs.Item], response: rs.Response) -> None:
        if not req.store:
            return
        record: rs.StoredResponse = {"response": response, "input_items": [*context, *req.items]}
        try:
            await asyncio.to_thread(self.store.put, response["id"], record)
        except OSError as e:  # the answer is good; only a continuation from it will not be found
            log.warning("could not store response %s: %s", response["id"], e)


def _in_progress(req: ResponsesRequest, model: str) -> rs.Response:
    echo = req.echo
    return {
        "id": new_id("resp"), "object": "response", "created_at": int(time.time()), "completed_at": None,
        "status": "in_progress", "error": None, "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": echo["max_output_tokens"], "model": model, "output": [],
        "parallel_tool_calls": echo["parallel_tool_calls"], "previous_response_id": req.previous_response_id,
        "reasoning": echo["reasoning"], "store": req.store, "temperature": echo["temperature"],
        "top_p": echo["top_p"], "text": echo["text"], "tool_choice": echo["tool_choice"], "tools": echo["tools"],
        "truncation": echo["truncation"], "usage": None, "metadata": echo["metadata"], "background": False,
    }


async def _open(req: ResponsesRequest, lease: Lease) -> RunnerResponse:
    # Always a stream from the runner, with usage; the runner knows the model by its full name.
    return await lease.client.chat(req.op.runner_body(lease.spec.name, stream=True, usage=True))


async def _whole(req: ResponsesRequest, lease: Lease, assembler: OutputAssembler) -> rs.Response:
    upstream = await _open(req, lease)
    try:
        async for chunk in metered(events(upstream), lease.spec.name):
            for _ in assembler.feed(chunk):
                pass
    finally:
        await upstream.aclose()
    for _ in assembler.closing():
        pass
    return assembler.response


def _sse(event: rs.Event) -> bytes:
    """OpenAI's framing: the event's type as the SSE event name, the event as its data."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
