"""The Ollama API's model and status endpoints: the store (tags, show, create, copy, delete, blobs, pull),
what is loaded (ps, mgr's queue) and explicit load/unload. Translation only: the store and the scheduler
decide; status comes from the scheduler's frozen snapshots."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mgr.registry.errors import MgrError
from mgr.registry.pull import PullEvent
from mgr.registry.store import Store, check_digest

from ..errors import BadRequest
from ..instances import InstanceStatus
from ..pulls import Pulls
from ..scheduler import Scheduler
from ..version import VERSION
from .asgi import CleanupStreamingResponse, read_json
from .ollama import NDJSON, OllamaGeneration
from .operations import Target, optional_bool, required_str
from .options import map_options, parse_keep_alive

_UPLOAD_BUFFER = 4 << 20


def _rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1e6):06d}Z"


def _model_name(body: dict[str, Any]) -> str:
    """Ollama's current `model`, or its older `name`."""
    return body.get("model") or required_str(body, "name")


class OllamaModels:
    def __init__(self, scheduler: Scheduler, store: Store, pulls: Pulls, generation: OllamaGeneration) -> None:
        self.scheduler = scheduler
        self.store = store
        self.pulls = pulls
        self.generation = generation

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/delete", self.delete, methods=["DELETE"]),
            Route("/api/copy", self.copy, methods=["POST"]),
            Route("/api/create", self.create, methods=["POST"]),
            Route("/api/blobs/{digest}", self.blob, methods=["HEAD", "POST"]),
            Route("/api/pull", self.pull, methods=["POST"]),
            Route("/api/load", self.load, methods=["POST"]),
            Route("/api/unload", self.unload, methods=["POST"]),
            Route("/api/queue", self.queue, methods=["GET"]),
        ]

    # simple reads ------------------------------------------------------------------------------------
    async def root(self, _: Request) -> Response:
        return PlainTextResponse("mgr is running")

    async def version(self, _: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def tags(self, _: Request) -> Response:
        manifests = await asyncio.to_thread(self.store.list)
        return JSONResponse({"models": [
            {"name": m.name, "model": m.name, "modified_at": m.modified_at, "size": m.size,
             "digest": m.digest, "details": dict(m.details)}
            for m in manifests
        ]})

    async def ps(self, _: Request) -> Response:
        return JSONResponse({"models": [self._ps_entry(s) for s in self.scheduler.status()]})

    def _ps_entry(self, status: InstanceStatus) -> dict[str, Any]:
        try:
            details = dict(self.store.get(status.name).details)
        except LookupError:
            details = {}
        return {
            "name": status.name, "model": status.name, "size": status.size, "size_vram": status.size_vram,
            "digest": status.digest, "details": details, "expires_at": _rfc3339(status.expires_at),
            "loaded_at": _rfc3339(status.loaded_at), "context_length": status.context_length,
            "backend": status.backend, "state": status.state.value, "gpus": list(status.gpus),
            "num_parallel": status.num_parallel, "active": status.active, "queued": status.queued,
        }

    async def queue(self, _: Request) -> Response:
        """Who is waiting for what: per model, requests in flight and queued, and the bound over all."""
        models = [{"name": s.name, "state": s.state.value, "active": s.active, "queued": s.queued,
                   "num_parallel": s.num_parallel} for s in self.scheduler.status()]
        return JSONResponse({"models": models, "queued": sum(s.queued for s in self.scheduler.status()),
                             "max_queue": self.scheduler.settings.max_queue})

    async def load(self, request: Request) -> Response:
        """Explicit load (mgr's; Ollama's form is an empty prompt): {"model", "keep_alive"?, "options"?}."""
        body = await read_json(request)
        target = Target(required_str(body, "model"), map_options(body.get("options")).num_ctx,
                        parse_keep_alive(body.get("keep_alive")))
        return await self.generation.load_or_unload(request, target, False, chat=False)

    async def unload(self, request: Request) -> Response:
        body = await read_json(request)
        return await self.generation.load_or_unload(request, Target(required_str(body, "model"), None, 0),
                                                     False, chat=False)

    async def show(self, request: Request) -> Response:
        body = await read_json(request)
        manifest = await asyncio.to_thread(self.store.get, _model_name(body))
        return JSONResponse({
            "modelfile": "", "parameters": "", "license": "", "template": manifest.template,
            "details": dict(manifest.details), "model_info": dict(manifest.model_info),
            # as the scheduler sees them (for a vLLM model, what its parsers allow)
            "capabilities": list(self.scheduler.spec_for(manifest.name).capabilities),
            "modified_at": manifest.modified_at,
            "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in manifest.files],
            "source": dict(manifest.source),
        })

    # store changes -----------------------------------------------------------------------------------
    async def delete(self, request: Request) -> Response:
        name = _model_name(await read_json(request))
        await asyncio.to_thread(self.store.get, name)  # 404 before anything changes
        await self.scheduler.unload(name)
        await asyncio.to_thread(self.store.delete, name)
        return JSONResponse({})

    async def copy(self, request: Request) -> Response:
        body = await read_json(request)
        await asyncio.to_thread(self.store.copy, required_str(body, "source"), required_str(body, "destination"))
        return JSONResponse({})

    async def blob(self, request: Request) -> Response:
        try:
            digest = check_digest(request.path_params["digest"])
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if request.method == "HEAD":
            return Response(status_code=200 if self.store.has_blob(digest) else 404)
        if self.store.has_blob(digest):
            return Response(status_code=200)
        writer = await asyncio.to_thread(self.store.begin_blob)
        try:
            buffer = bytearray()
            async for chunk in request.stream():
                buffer += chunk
                if len(buffer) >= _UPLOAD_BUFFER:
                    await asyncio.to_thread(writer.write, bytes(buffer))
                    buffer.clear()
            await asyncio.to_thread(writer.write, bytes(buffer))
            await asyncio.to_thread(writer.commit, digest)
        except BaseException:
            writer.abort()
            raise
        return Response(status_code=201)

    async def pull(self, request: Request) -> Response:
        body = await read_json(request)
        reference = _model_name(body)
        stream = optional_bool(body, "stream", True)
        # Planning resolves the reference, lists the repo and chooses the files: a bad reference, a missing
        # repo or tag, or a gated repo fails here with its own status (400/404/401/403), before any 200.
        plan = await self.pulls.plan(reference)
        events = self.pulls.fetch(plan)
        if not stream:
            try:
                async for _ in events:
                    pass
            finally:
                await events.aclose()
            return JSONResponse({"status": "success"})
        return CleanupStreamingResponse(_pull_lines(events), NDJSON, [events.aclose])

    async def create(self, request: Request) -> Response:
        body = await read_json(request)
        name = required_str(body, "model") if "model" in body else required_str(body, "name")
        stream = optional_bool(body, "stream", True)
        files = body.get("files")
        if files is None and isinstance(body.get("from"), str):
            await asyncio.to_thread(self.store.copy, body["from"], name)
        else:
            if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
                raise BadRequest('files must map file names to blob digests: {"model.gguf": "sha256:..."}')
            try:
                await asyncio.to_thread(self.store.create, name, files, {"type": "upload"})
            except (MgrError, ValueError) as e:
                digests = [d for d in files.values() if d.startswith("sha256:") and len(d) == 71]
                await asyncio.to_thread(self.store.discard_unreferenced, digests)
                raise e if isinstance(e, MgrError) and e.status == 400 else BadRequest(str(e)) from None
        statuses = [{"status": "parsing model"}, {"status": "writing manifest"}, {"status": "success"}]
        if not stream:
            return JSONResponse(statuses[-1])
        return Response("".join(json.dumps(s) + "\n" for s in statuses), media_type=NDJSON)


async def _pull_lines(events: AsyncIterator[PullEvent]) -> AsyncIterator[bytes]:
    """Progress as NDJSON; a failure after the 200 was sent becomes a final {"error": ...} line."""
    try:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"
    except MgrError as e:
        yield json.dumps({"error": str(e)}).encode() + b"\n"


