"""The Ollama API (/api/*): translate to the scheduler, the store and the runners' OpenAI protocol, and back
to Ollama's shapes: NDJSON streams, nanosecond metrics, done_reason. Nothing is decided here."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mgr.registry.errors import PullError
from mgr.registry.inspect import InvalidModel
from mgr.registry.store import BlobNotFound, DigestMismatch, Store, check_digest

from ..errors import ApiError, BadRequest
from ..pulls import Pulls
from ..runner_http import RunnerHttp, RunnerResponse
from ..scheduler import Instance, Lease, Scheduler, State
from ..version import VERSION
from .common import (
    CleanupStreamingResponse, lease_for, now_iso, open_runner_stream, read_json, require_str, runner_answer,
    sse_events, unless_disconnected,
)
from .options import map_format, map_options, parse_keep_alive

NDJSON = "application/x-ndjson"
_UPLOAD_BUFFER = 4 << 20


def _rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1e6):06d}Z"


def _to_openai_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(f"messages[{index}] must be an object with a string role")
    if message.get("images"):
        raise BadRequest("this model does not accept images")
    content = message.get("content", "")
    if not isinstance(content, str):
        raise BadRequest(f"messages[{index}].content must be a string")
    result: dict[str, Any] = {"role": message["role"], "content": content}
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


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    return stream


class OllamaApi:
    def __init__(self, scheduler: Scheduler, store: Store, runners: RunnerHttp, pulls: Pulls) -> None:
        self.scheduler = scheduler
        self.store = store
        self.runners = runners
        self.pulls = pulls

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/delete", self.delete, methods=["DELETE"]),
            Route("/api/copy", self.copy, methods=["POST"]),
            Route("/api/create", self.create, methods=["POST"]),
            Route("/api/blobs/{digest}", self.blob, methods=["HEAD", "POST"]),
            Route("/api/pull", self.pull, methods=["POST"]),
            Route("/api/load", self.load, methods=["POST"]),
            Route("/api/unload", self.unload, methods=["POST"]),
            Route("/api/queue", self.queue, methods=["GET"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embeddings, methods=["POST"]),
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
        return JSONResponse({"models": [self._ps_entry(i) for i in self.scheduler.snapshot()]})

    def _ps_entry(self, instance: Instance) -> dict[str, Any]:
        spec = instance.spec
        try:
            details = dict(self.store.get(spec.name).details)
        except LookupError:
            details = {}
        expires = instance.expires_at
        if instance.state is State.SLEEPING:
            expires = None  # asleep until its memory is needed or it is unloaded
        elif expires is None and instance.keep_alive >= 0:
            expires = time.time() + instance.keep_alive  # busy: the timer starts when the last request ends
        on_gpu = sum(instance.measured.values()) or (spec.estimate if instance.placement.gpus else 0)
        return {
            "name": spec.name, "model": spec.name, "size": max(spec.estimate, on_gpu), "size_vram": on_gpu,
            "digest": spec.digest,
            "details": details, "expires_at": _rfc3339(expires), "loaded_at": _rfc3339(instance.loaded_at),
            "context_length": spec.num_ctx, "backend": instance.runner.backend if instance.runner else "",
            "state": instance.state.value, "gpus": list(instance.placement.gpus), "num_parallel": spec.num_parallel,
            "active": instance.active, "queued": len(instance.queue),
        }

    async def queue(self, _: Request) -> Response:
        """Who is waiting for what: per model, requests in flight and queued, and the bound over all."""
        models = [{"name": i.spec.name, "state": i.state.value, "active": i.active, "queued": len(i.queue),
                   "num_parallel": i.spec.num_parallel} for i in self.scheduler.snapshot()]
        return JSONResponse({"models": models, "queued": sum(m["queued"] for m in models),
                             "max_queue": self.scheduler.settings.max_queue})

    async def load(self, request: Request) -> Response:
        """Explicit load (mgr's; Ollama's form is an empty prompt): {"model", "keep_alive"?, "options"?}."""
        body = await read_json(request)
        options = map_options(body.get("options"))
        return await self._load_or_unload(request, require_str(body, "model"),
                                          parse_keep_alive(body.get("keep_alive")), options.num_ctx, False, chat=False)

    async def unload(self, request: Request) -> Response:
        body = await read_json(request)
        return await self._load_or_unload(request, require_str(body, "model"), 0, None, False, chat=False)

    async def show(self, request: Request) -> Response:
        body = await read_json(request)
        manifest = await asyncio.to_thread(self.store.get, body.get("model") or require_str(body, "name"))
        capabilities = ["completion"]
        if "tools" in manifest.template:
            capabilities.append("tools")
        return JSONResponse({
            "modelfile": "", "parameters": "", "license": "", "template": manifest.template,
            "details": dict(manifest.details), "model_info": dict(manifest.model_info),
            "capabilities": capabilities, "modified_at": manifest.modified_at,
            "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in manifest.files],
            "source": dict(manifest.source),
        })

    # store changes -----------------------------------------------------------------------------------
    async def delete(self, request: Request) -> Response:
        body = await read_json(request)
        name = body.get("model") or require_str(body, "name")
        await asyncio.to_thread(self.store.get, name)  # 404 before anything changes
        await self.scheduler.unload(name)
        await asyncio.to_thread(self.store.delete, name)
        return JSONResponse({})

    async def copy(self, request: Request) -> Response:
        body = await read_json(request)
        await asyncio.to_thread(self.store.copy, require_str(body, "source"), require_str(body, "destination"))
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
        except DigestMismatch as e:
            raise BadRequest(str(e)) from None
        except BaseException:
            writer.abort()
            raise
        return Response(status_code=201)

    async def pull(self, request: Request) -> Response:
        body = await read_json(request)
        reference = body.get("model") or require_str(body, "name")
        stream = _stream_flag(body)
        events = self.pulls.events(reference)
        # Read ahead until the repo is listed, so that a bad reference, a missing repo or tag, or a gated
        # repo gets its own status (400/404/401/403) rather than an error line under a 200.
        head: list[dict[str, Any]] = []
        try:
            async for event in events:
                head.append(event)
                if "digest" in event or event.get("status") in ("writing manifest", "success"):
                    break
        except PullError as e:
            raise ApiError(str(e), e.http_status) from None
        except InvalidModel as e:
            raise BadRequest(str(e)) from None
        if not stream:
            try:
                async for event in events:
                    pass
            except PullError as e:
                raise ApiError(str(e), e.http_status) from None
            except InvalidModel as e:
                raise BadRequest(str(e)) from None
            return JSONResponse({"status": "success"})
        return CleanupStreamingResponse(_pull_lines(head, events), NDJSON, [events.aclose])

    async def create(self, request: Request) -> Response:
        body = await read_json(request)
        name = require_str(body, "model") if "model" in body else require_str(body, "name")
        stream = _stream_flag(body)
        files = body.get("files")
        if files is None and isinstance(body.get("from"), str):
            await asyncio.to_thread(self.store.copy, body["from"], name)
        else:
            if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
                raise BadRequest('files must map file names to blob digests: {"model.gguf": "sha256:..."}')
            try:
                await asyncio.to_thread(self.store.create, name, files, {"type": "upload"})
            except (InvalidModel, BlobNotFound, ValueError) as e:
                digests = [d for d in files.values() if isinstance(d, str) and d.startswith("sha256:")]
                await asyncio.to_thread(self.store.discard_unreferenced, [d for d in digests if len(d) == 71])
                raise BadRequest(str(e)) if not isinstance(e, BlobNotFound) else ApiError(str(e), 400) from None
        statuses = [{"status": "parsing model"}, {"status": "writing manifest"}, {"status": "success"}]
        if not stream:
            return JSONResponse(statuses[-1])
        return Response("".join(json.dumps(s) + "\n" for s in statuses), media_type=NDJSON)

    # generation --------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await read_json(request)
        model = require_str(body, "model")
        stream = _stream_flag(body)
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise BadRequest("messages must be a list")
        options = map_options(body.get("options"))
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        if not messages:
            return await self._load_or_unload(request, model, keep_alive, options.num_ctx, stream, chat=True)
        runner_body: dict[str, Any] = {
            "messages": [_to_openai_message(m, i) for i, m in enumerate(messages)],
            "stream": True, "stream_options": {"include_usage": True}, **options.sampling,
            # Ollama drops the oldest messages (never the system prompt) when a chat outgrows num_ctx
            "truncate": body.get("truncate", True) is not False,
        }
        if response_format := map_format(body.get("format")):
            runner_body["response_format"] = response_format
        if body.get("tools"):
            runner_body["tools"] = body["tools"]
        return await self._generate(request, model, "/v1/chat/completions", runner_body, options.num_ctx,
                                    keep_alive, stream, chat=True, started=started)

    async def generate(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await read_json(request)
        model = require_str(body, "model")
        stream = _stream_flag(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        if body.get("images"):
            raise BadRequest("this model does not accept images")
        options = map_options(body.get("options"))
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        if not prompt:
            return await self._load_or_unload(request, model, keep_alive, options.num_ctx, stream, chat=False)
        runner_body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}, **options.sampling}
        if response_format := map_format(body.get("format")):
            runner_body["response_format"] = response_format
        if body.get("raw"):
            runner_body["prompt"] = prompt
            path = "/v1/completions"
        else:
            system = body.get("system")
            messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
            runner_body["messages"] = messages + [{"role": "user", "content": prompt}]
            runner_body["truncate"] = body.get("truncate", True) is not False
            path = "/v1/chat/completions"
        return await self._generate(request, model, path, runner_body, options.num_ctx, keep_alive, stream,
                                    chat=False, started=started)

    async def embed(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await read_json(request)
        model = require_str(body, "model")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise BadRequest("input must be a string or a list of strings")
        answer, lease = await self._embed(request, model, inputs, body)
        return JSONResponse({
            "model": lease.spec.name, "embeddings": [d["embedding"] for d in answer["data"]],
            "total_duration": time.perf_counter_ns() - started, "load_duration": int(lease.load_seconds * 1e9),
            "prompt_eval_count": answer.get("usage", {}).get("prompt_tokens", 0),
        })

    async def embeddings(self, request: Request) -> Response:
        """The legacy endpoint: one prompt, one vector."""
        body = await read_json(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        answer, _ = await self._embed(request, require_str(body, "model"), [prompt], body)
        return JSONResponse({"embedding": answer["data"][0]["embedding"]})

    async def _embed(self, request: Request, model: str, inputs: list[str],
                     body: dict[str, Any]) -> tuple[dict[str, Any], Lease]:
        options = map_options(body.get("options"))
        lease = await lease_for(request.receive, self.scheduler, model, options.num_ctx,
                                parse_keep_alive(body.get("keep_alive")))
        try:
            if not inputs:
                return {"data": [], "usage": {"prompt_tokens": 0}}, lease
            answer = await runner_answer(self.runners, lease.base_url + "/v1/embeddings", {
                "input": inputs, "truncate": body.get("truncate", True) is not False})
            return json.loads(answer), lease
        finally:
            lease.release()

    async def _load_or_unload(self, request: Request, model: str, keep_alive: float | None,
                              num_ctx: int | None, stream: bool, chat: bool) -> Response:
        if keep_alive == 0:
            await asyncio.to_thread(self.store.get, model)  # 404 for an unknown model
            await self.scheduler.unload(model)
            reason = "unload"
        else:
            await unless_disconnected(request.receive, self.scheduler.load(model, num_ctx, keep_alive))
            reason = "load"
        answer: dict[str, Any] = {"model": model, "created_at": now_iso(), "done": True, "done_reason": reason}
        if chat:
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        if stream:
            return Response(json.dumps(answer) + "\n", media_type=NDJSON)
        return JSONResponse(answer)

    async def _generate(self, request: Request, model: str, path: str, runner_body: dict[str, Any],
                        num_ctx: int | None, keep_alive: float | None, stream: bool, chat: bool,
                        started: int) -> Response:
        lease = await lease_for(request.receive, self.scheduler, model, num_ctx, keep_alive)
        url = lease.base_url + path
        if not stream:
            try:
                # A runner sends a whole answer's headers only when it is done: the client may leave before
                # that, and then the runner must stop (the connection to it is closed).
                return JSONResponse(await unless_disconnected(
                    request.receive, self._answer(url, runner_body, lease, chat, started)))
            finally:
                lease.release()
        try:
            upstream = await open_runner_stream(self.runners, url, runner_body)
        except BaseException:
            lease.release()
            raise
        chunks = self._chunks(upstream, lease, chat, started)
        return CleanupStreamingResponse(_ndjson(chunks), NDJSON, [lease.release, upstream.aclose])

    async def _answer(self, url: str, runner_body: dict[str, Any], lease: Lease, chat: bool,
                      started: int) -> dict[str, Any]:
        """A whole answer: the runner's stream gathered into one final chunk."""
        upstream = await open_runner_stream(self.runners, url, runner_body)
        try:
            return await _collect(self._chunks(upstream, lease, chat, started), chat)
        finally:
            await upstream.aclose()

    async def _chunks(self, upstream: RunnerResponse, lease: Lease, chat: bool,
                      started: int) -> AsyncIterator[dict[str, Any]]:
        """Runner SSE events -> Ollama chunks; the last one carries done_reason and the metrics."""
        model = lease.spec.name
        sent = time.perf_counter_ns()
        first_token: int | None = None
        usage: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        finish = "stop"
        calls: dict[int, dict[str, Any]] = {}
        async for event in sse_events(upstream):
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
        final: dict[str, Any] = {
            "model": model, "created_at": now_iso(),
            **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}),
            "done": True, "done_reason": finish,
            "total_duration": finished - started, "load_duration": int(lease.load_seconds * 1e9),
            "prompt_eval_count": int(usage.get("prompt_tokens", 0)), "prompt_eval_duration": prompt_ns,
            "eval_count": int(usage.get("completion_tokens", 0)), "eval_duration": eval_ns,
        }
        yield final


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


async def _pull_lines(head: list[dict[str, Any]], events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    for event in head:
        yield json.dumps(event).encode() + b"\n"
    try:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"
    except (PullError, InvalidModel) as e:
        yield json.dumps({"error": str(e)}).encode() + b"\n"


async def _ndjson(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """One JSON object per line; an error after the stream started becomes a final {"error": ...} line
    (the status, 200, was sent already)."""
    try:
        async for chunk in chunks:
            yield json.dumps(chunk).encode() + b"\n"
    except ApiError as e:
        yield json.dumps({"error": e.message}).encode() + b"\n"
