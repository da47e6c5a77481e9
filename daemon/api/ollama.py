"""The Ollama API's generation endpoints (/api/chat, /api/generate, /api/embed, /api/embeddings): parse the
body into one internal request (operations.py), take a lease, call the runner through its typed client, and
render the runner's OpenAI chunks back as Ollama's NDJSON with nanosecond metrics and done_reason. Nothing is
decided here. The model and status endpoints are in ollama_models.py."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mgr.registry.errors import MgrError
from mgr.registry.store import Store

from ..errors import BadRequest, RunnerFailed
from ..instances import Lease
from ..metrics import Generation
from ..protocol import shapes, strict_json
from ..protocol.limits import MAX_DIMENSIONS, MAX_TOP_LOGPROBS
from ..runners.http import RUNNER_STOPPED, RunnerGone, RunnerResponse, events
from ..scheduler import Scheduler
from . import fields
from .asgi import (
    client_disconnected,
    fail_before_sending,
    lease_for,
    parse_json,
    read_body,
    read_json,
    unless_disconnected,
)
from .operations import (
    ChatRequest,
    CompletionRequest,
    Effort,
    EmbeddingRequest,
    Target,
    jinja_template,
    optional_bool,
    optional_str,
    positive_int,
    required_str,
    strings,
    token_ids,
    tool_choice,
    tool_list,
    truncation_report,
)
from .options import map_format, map_options, parse_keep_alive
from .render import status_and_message

NDJSON = "application/x-ndjson"
NDJSON_TYPE = (b"content-type", NDJSON.encode())


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
                if not isinstance(arguments, (dict, str)):
                    raise BadRequest(f"messages[{index}].tool_calls[{i}].function.arguments must be an object")
                if call.get("id") is not None and not isinstance(call["id"], str):
                    raise BadRequest(f"messages[{index}].tool_calls[{i}].id must be a string")
                ident = call.get("id") or f"call_{index}_{i}"
                call_ids[function["name"]] = ident
                result["tool_calls"].append({"id": ident, "type": "function", "function": {
                    "name": function["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
        for key in ("tool_name", "name", "thinking"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise BadRequest(f"messages[{index}].{key} must be a string")
        name = message.get("tool_name") or message.get("name")
        if name:
            result["name"] = name
            if message["role"] == "tool" and name in call_ids:
                result["tool_call_id"] = call_ids[name]
        if message.get("thinking"):
            result["reasoning_content"] = message["thinking"]
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
    return optional_bool(body, "logprobs", False), positive_int(body, "top_logprobs", MAX_TOP_LOGPROBS)


def _target(body: dict[str, Any], num_ctx: int | None) -> Target:
    return Target(required_str(body, "model"), num_ctx, parse_keep_alive(body.get("keep_alive")))


def chat_request(body: dict[str, Any]) -> ChatRequest:
    raw = body.get("messages")
    if raw is None:
        raw = []
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
        truncate=optional_bool(body, "truncate", True),
    )


def generate_request(body: dict[str, Any]) -> ChatRequest | CompletionRequest:
    """/api/generate: a raw prompt is a completion; a suffix, fill-in-the-middle with the model's FIM tokens;
    otherwise one user turn (after the system prompt) through the chat template, the model's or the request's
    `template`, continuing `context` when it is sent back. Token ids come back as `context` unless raw."""
    prompt = optional_str(body, "prompt")
    options = map_options(body.get("options"))
    target = _target(body, options.num_ctx)
    stream = optional_bool(body, "stream", True)
    response_format = map_format(body.get("format"))
    raw = optional_bool(body, "raw", False)
    system = optional_str(body, "system")
    template = jinja_template(body.get("template"), "template")
    context = token_ids(body.get("context"), "context")
    if raw and (system or template or context):
        raise BadRequest("raw mode does not support template, system, or context")  # Ollama's words
    suffix = optional_str(body, "suffix")
    images = _images(body.get("images"), "images")
    logprobs, top = _logprobs(body)
    think = _think(body)
    truncate = optional_bool(body, "truncate", True)
    if not prompt:  # an empty prompt loads (or with keep_alive 0 unloads) the model
        return ChatRequest(target, [], stream)
    if raw or suffix:
        if images:
            raise BadRequest("images need the chat template: leave raw and suffix off")
        if context:
            raise BadRequest("context cannot be combined with suffix: send the whole prefix as the prompt")
        if template:
            raise BadRequest("a suffix is filled in with the model's fill-in-the-middle tokens: leave template off")
        return CompletionRequest(target, prompt, stream, options.sampling, response_format, suffix=suffix,
                                 logprobs=(top or 0) if logprobs else None, return_token_ids=not raw)
    if context and (images or think not in (None, False)):
        raise BadRequest("context cannot be combined with images or think: send the conversation to /api/chat")
    messages: list[shapes.ChatMessage] = [{"role": "system", "content": system}] if system else []
    content: str | list[dict[str, Any]] = [{"type": "text", "text": prompt}, *images] if images else prompt
    messages.append({"role": "user", "content": content})
    return ChatRequest(target, messages, stream, options.sampling, response_format, thinking=think,
                       logprobs=logprobs, top_logprobs=top, images=bool(images),
                       truncate=truncate, chat_template=template,
                       return_token_ids=True, context=context)


def embedding_request(body: dict[str, Any], inputs: list[str]) -> EmbeddingRequest:
    options = map_options(body.get("options"))
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = fields.whole_number("dimensions", dimensions, 1, MAX_DIMENSIONS)
    return EmbeddingRequest(_target(body, options.num_ctx), inputs, truncate=optional_bool(body, "truncate", True),
                            dimensions=dimensions)


class OllamaGeneration:
    def __init__(self, scheduler: Scheduler, store: Store) -> None:
        self.scheduler = scheduler
        self.store = store

    def routes(self) -> list[Route]:
        return [
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embeddings, methods=["POST"]),
        ]

    def relay_routes(self) -> dict[str, ASGIApp]:
        """/api/chat and /api/generate: POST endpoints served as plain ASGI ahead of the router, as the OpenAI
        relay's are (every `mgr run`, Open WebUI and Ollama client request crosses them; see `_stream`)."""
        return {"/api/chat": self._endpoint("/api/chat", chat=True),
                "/api/generate": self._endpoint("/api/generate", chat=False)}

    def _endpoint(self, path: str, chat: bool) -> ASGIApp:
        parse = chat_request if chat else generate_request

        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            started = time.perf_counter_ns()
            lease: Lease | None = None
            try:
                op = parse(parse_json(await read_body(receive)))
                if isinstance(op, ChatRequest) and not op.messages:
                    response = await self._load_or_unload(receive, op.target, op.stream, chat)
                else:
                    lease = await lease_for(receive, self.scheduler, op)
                    if op.stream:
                        upstream = await self._open(op, lease)
                    else:
                        # A runner sends a whole answer's headers only when it is done: the client may leave
                        # before that, and then the runner must stop (the connection to it is closed).
                        answer, headers = await unless_disconnected(receive, self._answer(op, lease, chat, started))
                        lease.release()
                        response = JSONResponse(answer, headers=headers)
            except BaseException as exc:  # nothing has been sent yet
                await fail_before_sending(exc, lease, path, scope, receive, send)
                return
            if lease is None or not op.stream:
                await response(scope, receive, send)
                return
            try:
                await _stream(upstream, _Rendering(lease, chat, started), receive, send)
            finally:
                lease.release()
                await upstream.aclose()
        return endpoint

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
        return await self._load_or_unload(request.receive, target, stream, chat)

    async def _load_or_unload(self, receive: Receive, target: Target, stream: bool, chat: bool) -> Response:
        if target.keep_alive == 0:
            await asyncio.to_thread(self.store.get, target.model)  # 404 for an unknown model
            await self.scheduler.unload(target.model)
            reason = "unload"
        else:
            await unless_disconnected(receive, self.scheduler.load(target.model, target.num_ctx, target.keep_alive))
            reason = "load"
        answer: dict[str, Any] = {"model": target.model, "created_at": now_iso(), "done": True, "done_reason": reason}
        if chat:
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        if stream:
            return Response(json.dumps(answer) + "\n", media_type=NDJSON)
        return JSONResponse(answer)

    @staticmethod
    async def _open(op: ChatRequest | CompletionRequest, lease: Lease) -> RunnerResponse:
        # Always a stream from the runner, with usage: a whole answer is gathered here, with the metrics.
        model = lease.spec.name
        if isinstance(op, ChatRequest) and op.context is not None:
            # Ollama's context sent back: the new turn, through the chat template, after the earlier tokens
            turn = await lease.client.tokenize(op.tokenize_body(model))
            op = op.continued(turn["tokens"])
        if isinstance(op, ChatRequest):
            return await lease.client.chat(op.runner_body(model, stream=True, usage=True))
        return await lease.client.completion(op.runner_body(model, stream=True, usage=True))

    async def _answer(self, op: ChatRequest | CompletionRequest, lease: Lease, chat: bool,
                      started: int) -> tuple[dict[str, Any], dict[str, str]]:
        """A whole answer: the runner's stream gathered into one final chunk; the headers to answer with."""
        upstream = await self._open(op, lease)
        try:
            headers = truncation_report(upstream.headers, lease.spec.name)
            return await _collect(_ollama_chunks(upstream, _Rendering(lease, chat, started)), chat), headers
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


_stamp_second = -1
_stamp_prefix = b""


def created_stamp() -> bytes:
    """now_iso() for every chunk of a stream, at a fraction of its cost: the date and time to the second are
    formatted once a second."""
    global _stamp_second, _stamp_prefix
    now = time.time()
    second = int(now)
    if second != _stamp_second:
        _stamp_prefix = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
        _stamp_second = second
    return b"%s.%06dZ" % (_stamp_prefix, int((now - second) * 1e6))


Part = tuple[str, str | None, list[dict[str, Any]]]  # (text, thinking, logprobs) of one choice's chunk

# The event nearly every token is: one choice that adds text and nothing else (vLLM's and mgr's runner's
# layout, compact or json.dumps's; the generated token ids when they were asked for). Its text is already a
# JSON string literal, copied into the Ollama line as it is: such an event is never parsed. vLLM 0.25 writes
# every field its server set, None too (pydantic's exclude_unset): a chat token ends `"finish_reason":null,
# "token_ids":null`, a completion token `"stop_reason":null,"prompt_token_ids":null,"token_ids":null`.
_PLAIN = re.compile(
    rb'"choices"\s*:\s*\[\s*\{\s*"index"\s*:\s*0\s*,\s*(?:"delta"\s*:\s*\{\s*"content"\s*:\s*(?P<content>"(?:[^"\\]|\\.)*")'
    rb'\s*\}|"text"\s*:\s*(?P<text>"(?:[^"\\]|\\.)*"))(?:\s*,\s*"logprobs"\s*:\s*null)?\s*,\s*"finish_reason"\s*:\s*null'
    rb'(?:\s*,\s*"stop_reason"\s*:\s*null)?(?:\s*,\s*"prompt_logprobs"\s*:\s*null)?'
    rb'(?:\s*,\s*"prompt_token_ids"\s*:\s*null)?'
    rb'(?:\s*,\s*"token_ids"\s*:\s*(?:null|\[(?P<ids>[0-9,\s]*)\]))?\s*\}\s*\]'
    rb'(?:\s*,\s*"usage"\s*:\s*null)?\s*\}\s*\Z')


def _runner_error(error: Any) -> MgrError:
    """A runner's error event as the error it is (as runners.http.events reads one)."""
    if not isinstance(error, dict):
        return RunnerFailed(str(error))
    code = error.get("code")
    return MgrError(str(error.get("message")), code if isinstance(code, int) and code >= 400 else 500)


class _Rendering:
    """One answer's runner SSE events -> Ollama chunks (content, thinking, logprobs); tool calls, gathered, in
    one chunk at the end; the last one carries done_reason and the metrics. Times and counts the answer for
    /metrics and the access log (metrics.Generation) as it goes. A stream renders each plain content chunk as
    bytes straight from a template (`line`): no dict is built and only the text is JSON-encoded."""

    __slots__ = ("answer_ids", "calls", "chat", "finish", "first_token", "generation", "lease", "model",
                 "prompt_ids", "sent", "started", "timings", "usage", "_end", "_head", "_tail")

    def __init__(self, lease: Lease, chat: bool, started: int) -> None:
        self.lease = lease
        self.model = lease.spec.name
        self.chat = chat
        self.started = started
        self.sent = time.perf_counter_ns()
        self.first_token: int | None = None
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.finish = "stop"
        self.calls: dict[int, dict[str, str]] = {}
        # return_token_ids: vLLM's shape (the prompt's ids on the chunk, or on the choice for completions; the
        # generated ids per choice, in any chunk), gathered into Ollama's context
        self.prompt_ids: list[int] | None = None
        self.answer_ids: list[int] = []
        self.generation = Generation(self.model)
        # json.dumps's own layout (", " and ": "), so a chunk reads the same whichever way it was written
        self._head = ('{"model": ' + json.dumps(self.model) + ', "created_at": "').encode()
        self._tail = (b'", "message": {"role": "assistant", "content": ' if chat else b'", "response": ')
        self._end = b'}, "done": false}\n' if chat else b', "done": false}\n'

    def plain(self, payload: bytes) -> bytes | None:
        """The Ollama line of an event that only adds text (b"" for empty text), straight from its bytes;
        None when the event is anything else (then it is parsed)."""
        match = _PLAIN.search(payload)
        if match is None:
            return None
        text = match["content"] if match["content"] is not None else (None if self.chat else match["text"])
        if text is None:
            return None
        if match["ids"]:
            self.answer_ids += [int(i) for i in match["ids"].split(b",")]
        if text == b'""':
            return b""
        if self.first_token is None:
            self.first_token = time.perf_counter_ns()
        self.generation.chunk()
        return b"".join((self._head, created_stamp(), self._tail, text, self._end))

    def parts(self, event: dict[str, Any]) -> list[Part]:
        """What one runner event adds that a client sees now; the rest (usage, ids, tool calls, the finish
        reason) is kept for the end."""
        if "usage" in event:
            self.usage = event["usage"] or self.usage
        if "timings" in event:
            self.timings = event["timings"] or self.timings
        if "prompt_token_ids" in event:
            self.prompt_ids = event["prompt_token_ids"] or self.prompt_ids
        parts: list[Part] = []
        output = False
        for choice in event.get("choices") or ():
            if "prompt_token_ids" in choice:
                self.prompt_ids = choice["prompt_token_ids"] or self.prompt_ids
            if "token_ids" in choice:
                self.answer_ids += choice["token_ids"] or []
            if choice.get("finish_reason"):
                self.finish = "length" if choice["finish_reason"] == "length" else "stop"
            delta = choice.get("delta") or {}
            calls = delta.get("tool_calls")
            if calls:
                output = True
                for call in calls:
                    slot = self.calls.setdefault(call.get("index", 0), {"id": "", "name": "", "arguments": ""})
                    function = call.get("function") or {}
                    slot["id"] = call.get("id") or slot["id"]
                    slot["name"] += function.get("name") or ""
                    slot["arguments"] += function.get("arguments") or ""
            piece = delta.get("content") if self.chat else choice.get("text", delta.get("content"))
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            logprobs = _ollama_logprobs(choice) if choice.get("logprobs") else []
            if piece or thinking or logprobs:
                output = output or bool(piece or thinking)
                if self.first_token is None:
                    self.first_token = time.perf_counter_ns()
                parts.append((piece or "", thinking, logprobs))
        if output:
            self.generation.chunk()
        return parts

    def chunk(self, part: Part) -> dict[str, Any]:
        piece, thinking, logprobs = part
        chunk: dict[str, Any] = {"model": self.model, "created_at": created_stamp().decode()}
        if self.chat:
            chunk["message"] = {"role": "assistant", "content": piece}
            if thinking:
                chunk["message"]["thinking"] = thinking
        else:
            chunk["response"] = piece
            if thinking:
                chunk["thinking"] = thinking
        if logprobs:
            chunk["logprobs"] = logprobs
        chunk["done"] = False
        return chunk

    def line(self, part: Part) -> bytes:
        piece, thinking, logprobs = part
        if thinking or logprobs:
            return json.dumps(self.chunk(part)).encode() + b"\n"
        return b"".join((self._head, created_stamp(), self._tail, json.dumps(piece).encode(), self._end))

    def last(self) -> list[dict[str, Any]]:
        """The chunks after the runner's last event: the tool calls (when any), then the final one."""
        model, chat = self.model, self.chat
        chunks: list[dict[str, Any]] = []
        if self.calls:
            tool_calls = [{"id": c["id"] or f"call_{i}", "function": {
                "index": i, "name": c["name"], "arguments": _json_object(c["arguments"])}}
                for i, (_, c) in enumerate(sorted(self.calls.items()))]
            chunks.append({"model": model, "created_at": now_iso(), "done": False,
                           **({"message": {"role": "assistant", "content": "", "tool_calls": tool_calls}} if chat
                              else {"response": ""})})
        finished = time.perf_counter_ns()
        first_token = self.first_token or finished
        timings, usage = self.timings, self.usage
        prompt_ns = int(timings["prompt_ms"] * 1e6) if "prompt_ms" in timings else first_token - self.sent
        eval_ns = int(timings["predicted_ms"] * 1e6) if "predicted_ms" in timings else finished - first_token
        last: dict[str, Any] = {
            "model": model, "created_at": now_iso(),
            **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}),
            "done": True, "done_reason": self.finish,
        }
        if self.prompt_ids is not None and not chat:
            last["context"] = [*self.prompt_ids, *self.answer_ids]
        chunks.append({
            **last,
            "total_duration": finished - self.started, "load_duration": int(self.lease.load_seconds * 1e9),
            "prompt_eval_count": int(usage.get("prompt_tokens", 0)), "prompt_eval_duration": prompt_ns,
            "eval_count": int(usage.get("completion_tokens", 0)), "eval_duration": eval_ns,
        })
        return chunks

    def done(self) -> None:
        """Counts the tokens the runner reported (once, however the answer ended)."""
        self.generation.done(int(self.usage.get("prompt_tokens") or 0), int(self.usage.get("completion_tokens") or 0))


async def _ollama_chunks(upstream: RunnerResponse, rendering: _Rendering) -> AsyncIterator[dict[str, Any]]:
    """The answer's Ollama chunks as dicts (a whole answer gathers them)."""
    try:
        async for event in events(upstream):
            for part in rendering.parts(event):
                yield rendering.chunk(part)
        for chunk in rendering.last():
            yield chunk
    finally:
        rendering.done()


async def _relay_lines(upstream: RunnerResponse, rendering: _Rendering, send: Send) -> None:
    """The runner's SSE events as Ollama lines, sent as each read of the runner's bytes arrives (several
    events in one read go in one send). An event that only adds text takes `_Rendering.plain`; any other is
    parsed. Raises the runner's error event, or RunnerFailed when the runner's stream breaks."""
    pending = b""
    try:
        async for data in upstream.iter_bytes():
            lines = (pending + data).split(b"\n")
            pending = lines.pop()  # an incomplete last line waits for the rest
            out: list[bytes] = []
            finished = False
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    finished = upstream.ended = True
                    break
                plain = rendering.plain(payload)
                if plain is not None:
                    if plain:
                        out.append(plain)
                    continue
                event = json.loads(payload)
                if "error" in event:
                    raise _runner_error(event["error"])
                out += [rendering.line(part) for part in rendering.parts(event)]
            if out:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            if finished:
                return
    except RunnerGone:
        raise RunnerFailed(RUNNER_STOPPED) from None


async def _stream(upstream: RunnerResponse, rendering: _Rendering, receive: Receive, send: Send) -> None:
    """A streamed answer, sent as the runner's events arrive: one NDJSON line per chunk. An error after the
    200 has gone out becomes a final {"error": ...} line. A client that leaves closes the runner connection,
    which is how the runner learns to stop generating; one watcher task per stream notices it."""
    async def abort_when_the_client_leaves() -> None:
        await client_disconnected(receive)
        upstream.abort()

    watcher = asyncio.ensure_future(abort_when_the_client_leaves())
    headers = [NDJSON_TYPE, *((name.lower().encode("latin-1"), value.encode("latin-1"))
                              for name, value in truncation_report(upstream.headers, rendering.model).items())]
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            await _relay_lines(upstream, rendering, send)
            tail = b"".join(json.dumps(chunk).encode() + b"\n" for chunk in rendering.last())
        except Exception as e:  # a failure mgr did not expect is "internal error" with an id, logged
            if watcher.done():
                tail = b""  # the client has gone: nobody to tell
            else:
                tail = json.dumps({"error": status_and_message(e)[1]}).encode() + b"\n"
        await send({"type": "http.response.body", "body": tail})
    finally:
        watcher.cancel()
        rendering.done()


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
        return strict_json.loads(text) if text else {}  # a model's NaN or a nesting too deep stays text
    except ValueError:
        return {"arguments": text}
