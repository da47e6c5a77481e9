"""The Ollama API's model and status endpoints: the store (tags, show, create, copy, delete, blobs, pull),
what is loaded (ps, mgr's queue) and explicit load/unload. Translation only: the store and the scheduler
decide; status comes from the scheduler's frozen snapshots."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from mgr.registry.config import MAX_DURATION_SECONDS
from mgr.registry.errors import MgrError
from mgr.registry.importers import KINDS, ImportPathError, default_location, run_import
from mgr.registry.modelfile import MESSAGE_ROLES, check_parameters, check_template, render_modelfile, render_parameters
from mgr.registry.pull import PullEvent
from mgr.registry.store import Customization, Manifest, Store, UnreadableFile, check_digest

from ..errors import BadRequest
from ..instances import InstanceStatus
from ..pulls import Pulls
from ..scheduler import Scheduler
from ..version import OLLAMA_API_VERSION, VERSION
from .asgi import CleanupStreamingResponse, read_json
from .ollama import NDJSON, OllamaGeneration
from .operations import Target, jinja_template, optional_bool, optional_str, required_str
from .options import map_options, parse_keep_alive
from .render import status_and_message

_UPLOAD_BUFFER = 4 << 20
# What Ollama shows for keep_alive -1 (its longest duration, 2**63 ns: about 292 years, so year 2318): clients
# type expires_at as a date, and a null breaks them.
_FOREVER_SECONDS = MAX_DURATION_SECONDS
_LAST_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z: the last time RFC 3339 (and Python's gmtime) can write


def _rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    timestamp = min(max(timestamp, 0.0), _LAST_TIMESTAMP)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1e6):06d}Z"


def _model_name(body: dict[str, Any]) -> str:
    """Ollama's current `model`, or its older `name`."""
    return required_str(body, "model" if body.get("model") not in (None, "") else "name")


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
            Route("/api/import", self.import_models, methods=["POST"]),
            Route("/api/verify", self.verify, methods=["POST"]),
            Route("/api/disk", self.disk, methods=["GET"]),
        ]

    # simple reads ------------------------------------------------------------------------------------
    async def root(self, request: Request) -> Response:
        if "text/html" in request.headers.get("accept", ""):  # a browser: the web console (api/ui.py)
            return RedirectResponse("/ui", status_code=302)
        return PlainTextResponse("mgr is running")

    async def version(self, _: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION, "mgr_version": VERSION})

    async def tags(self, _: Request) -> Response:
        manifests = await asyncio.to_thread(self.store.list)
        return JSONResponse({"models": [
            {"name": m.name, "model": m.name, "modified_at": m.modified_at, "size": m.size,
             "digest": m.digest, "details": dict(m.details)}
            for m in manifests
        ]})

    async def ps(self, _: Request) -> Response:
        return JSONResponse({"models": [self._ps_entry(s) for s in await self.scheduler.status_with_caches()]})

    def _ps_entry(self, status: InstanceStatus) -> dict[str, Any]:
        try:
            details = dict(self.store.get(status.name).details)
        except LookupError:
            details = {}
        entry = self._ps_fields(status, details)
        if status.placement.ray:  # vLLM over the Ray cluster: its shape and the machines it had
            entry["ray"] = {"nodes": list(status.ray_nodes), "pipeline_parallel": status.placement.pipeline_parallel,
                            "tensor_parallel": status.placement.tensor_size}
        if status.cached_tokens is not None:  # mgr's: prompt tokens the llama.cpp runner keeps for later requests
            entry["cached_tokens"] = status.cached_tokens
        return entry

    @staticmethod
    def _ps_fields(status: InstanceStatus, details: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": status.name, "model": status.name, "size": status.size, "size_vram": status.size_vram,
            "digest": status.digest, "details": details, "expires_at": _rfc3339(
                time.time() + _FOREVER_SECONDS if status.expires_at is None else status.expires_at),
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
        spec = self.scheduler.spec_for(manifest.name)
        adapter = self.store.adapter_path(manifest)
        return JSONResponse({
            "modelfile": render_modelfile(manifest.name, str(spec.model_path), [str(adapter)] if adapter else [],
                                          manifest.effective_template, manifest.system, manifest.parameters,
                                          manifest.messages, manifest.license),
            # num_ctx always: clients (Continue) size their prompts by it; it is what the model loads with
            "parameters": render_parameters({"num_ctx": spec.num_ctx, **manifest.parameters}),
            "license": "\n".join(manifest.license), "template": manifest.effective_template,
            "system": manifest.system, "messages": [dict(m) for m in manifest.messages],
            "details": {"parent_model": manifest.source.get("from", ""), **manifest.details},
            "model_info": dict(manifest.model_info),
            # as the scheduler sees them (for a vLLM model, what its parsers allow)
            "capabilities": list(spec.capabilities),
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
        # a client told the store has the blob names it in a create next instead of uploading it: its grace
        # period starts again, as an upload's does
        if await asyncio.to_thread(self.store.claim_upload, digest):
            return Response(status_code=200)
        if request.method == "HEAD":
            return Response(status_code=404)
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
        await asyncio.to_thread(self.store.claim_upload, digest)
        return Response(status_code=201)

    async def pull(self, request: Request) -> Response:
        body = await read_json(request)
        reference = _model_name(body)
        if reference != reference.strip():  # names are taken whole, as everywhere else (registry/names.py)
            raise BadRequest(f"invalid model reference {reference!r}: it has whitespace around it")
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

    async def import_models(self, request: Request) -> Response:
        """mgr's: models already on this machine (Ollama's store, the HF and ModelScope caches, a file) into the
        store without copying (registry/importers.py); for clients on this machine only, as the paths are its."""
        if (request.client.host if request.client else "") not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            raise ImportPathError("importing files is only for clients on the daemon's machine", status=403)
        body = await read_json(request)
        kind = required_str(body, "from")
        if kind not in KINDS:
            raise BadRequest(f"from must be one of {', '.join(KINDS)}")
        path = optional_str(body, "path") or ("" if kind == "file" else str(default_location(kind)))
        if not os.path.isabs(path):
            raise BadRequest("path must be an absolute path on the daemon's machine")
        lines = run_import(self.store, KINDS[KINDS.index(kind)], Path(path), name=optional_str(body, "model") or None,
                           dry_run=optional_bool(body, "dry_run", False),
                           external=optional_bool(body, "external", False))
        first = await asyncio.to_thread(next, lines)  # finding what is there: a bad path is its 4xx before the 200
        if not optional_bool(body, "stream", True):
            done = [first, *await asyncio.to_thread(list, lines)]
            return JSONResponse({**done[-1], "lines": done[:-1]})

        async def produce() -> AsyncIterator[dict[str, Any]]:
            line: dict[str, Any] | None = first
            while line is not None:
                yield line
                line = await asyncio.to_thread(next, lines, None)

        return CleanupStreamingResponse(_pull_lines(produce()), NDJSON, [])

    async def verify(self, request: Request) -> Response:
        """Hash again the model's external files that changed since they were verified (mgr's)."""
        hashed = await asyncio.to_thread(self.store.verify, _model_name(await read_json(request)))
        return JSONResponse({"status": "success", "verified": hashed})

    async def disk(self, _: Request) -> Response:
        """What each model takes on disk: the store's own bytes, linked, external, shared; what rm would free."""
        return JSONResponse({"models": await asyncio.to_thread(self.store.disk_usage)})

    async def create(self, request: Request) -> Response:
        """Ollama's create: a model from uploaded blobs (`files`) or over a model in the store (`from`: its
        blobs named again, never copied), with what the request adds (system, template, parameters,
        messages, license, adapters) over what the base had."""
        body = await read_json(request)
        name = required_str(body, "model") if "model" in body else required_str(body, "name")
        stream = optional_bool(body, "stream", True)
        base, files = optional_str(body, "from"), body.get("files")
        if optional_str(body, "quantize"):
            raise BadRequest("mgr does not quantize models: pull the quantization you want, as in "
                             "hf.co/{owner}/{repo}:Q4_K_M")
        if base and files:
            raise BadRequest("give either 'from' (a model) or 'files' (uploaded blobs), not both")
        if not base and not files:
            raise BadRequest("neither 'from' or 'files' was specified")
        custom = _customization(body)
        if base:
            manifest = await asyncio.to_thread(self.store.derive, name, base, custom)
        else:
            manifest = await self._create_from_files(name, _digests(files, "files"), custom)
        statuses = [{"status": "parsing model"}, {"status": "using existing layers" if base else "creating model"},
                    *([{"status": "using adapter"}] if manifest.adapters else []),
                    {"status": "writing manifest"}, {"status": "success"}]
        if not stream:
            return JSONResponse(statuses[-1])
        return Response("".join(json.dumps(s) + "\n" for s in statuses), media_type=NDJSON)


    async def _create_from_files(self, name: str, files: dict[str, str], custom: Customization) -> Manifest:
        """A failed create deletes only a blob refused for its own bytes (a .gguf that is no GGUF: of no use to
        anyone as one); every other blob it named keeps its grace period, which may be another client's fresh
        upload, or this client's, for a create it sends again fixed."""
        try:
            return await asyncio.to_thread(self.store.create, name, files, {"type": "upload"}, custom)
        except UnreadableFile as e:
            await asyncio.to_thread(functools.partial(self.store.discard_unreferenced, [e.digest],
                                                      spare_uploads=False))
            raise
        except MgrError:
            raise
        except ValueError as e:  # a file name or digest the store refuses
            raise BadRequest(str(e)) from None


def _digests(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
        raise BadRequest(f'{key} must map file names to blob digests: {{"model.gguf": "sha256:..."}}')
    return value


def _customization(body: dict[str, Any]) -> Customization:
    """What a create request adds beyond the files, checked: a bad field is a 400 before anything changes."""
    template = jinja_template(body.get("template"), "template")
    if template is not None:
        check_template(template)
    license_ = body.get("license")
    if isinstance(license_, str):
        license_ = [license_] if license_ else []
    if license_ is not None and (not isinstance(license_, list) or not all(isinstance(t, str) for t in license_)):
        raise BadRequest("license must be a string or a list of strings")
    adapters = body.get("adapters")
    return Customization(
        system=optional_str(body, "system") or None, template=template,
        parameters=_parameters(body.get("parameters")), messages=_history(body.get("messages")),
        license=tuple(license_ or ()), adapters=_digests(adapters, "adapters") if adapters else {},
    )


def _parameters(value: Any) -> dict[str, Any]:
    """A create's parameters: typed as a Modelfile's, and in the ranges a request's options are held to (a
    model whose own temperature every request would refuse is never made)."""
    parameters = check_parameters(value)
    map_options(parameters)
    return parameters


def _history(value: Any) -> tuple[dict[str, str], ...]:
    """A create's `messages`: the conversation put before every request's."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("messages must be a list of {role, content} objects")
    history = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES \
                or not isinstance(message.get("content", ""), str):
            raise BadRequest(f"messages[{i}] must be {{role, content}} with a role of "
                                 f"{', '.join(MESSAGE_ROLES)} and a string content")
        history.append({"role": message["role"], "content": message.get("content") or ""})
    return tuple(history)


async def _pull_lines(events: AsyncIterator[PullEvent] | AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Progress as NDJSON; a failure after the 200 was sent becomes a final {"error": ...} line."""
    try:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"
    except Exception as e:  # never a cut stream: a failure mgr did not expect is "internal error" with an id, logged
        yield json.dumps({"error": status_and_message(e)[1]}).encode() + b"\n"


