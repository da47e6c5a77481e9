"""The runner's HTTP face: the internal protocol every runner speaks (mgr.daemon.protocol): OpenAI chat and
text completions, streaming (SSE) or not, embeddings, and GET /health (200 ready, 503 loading).

Translation only: requests become engine Requests, engine Events become OpenAI chunks. Beyond OpenAI's
fields, the final chunk carries `timings` (prompt_ms, predicted_ms) so that the daemon can fill Ollama's
nanosecond metrics with the engine's own numbers.

A plain request (one choice, no tools, no reasoning split, no logprobs, no echo) takes `_stream` / the plain
whole answer, which do per token only what that needs; everything else takes `_generate_rich`: n choices
(one engine sequence each), each choice's text through its parsers (output.py: reasoning_content, tool
calls), logprobs, echo. Tools and tool_choice: tools.py; the parsers: tool_calls.py and reasoning.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...protocol import shapes, sse
from ...protocol.errors import openai_error_body
from . import tools as tool_plans
from .engine import EmbedRequest, Engine, Event, EventUsage, Request
from .output import ChatOutput, Message, TextLogprobs, chat_logprobs, merge_text_logprobs
from .reasoning import CLOSE, OPEN, ReasoningSplitter, opens_block, thinks
from .sampling import BadRequest, SamplingParams
from .template import ChatTemplate, normalize_messages
from .tool_calls import MARKERS, ToolCallParser, detect_family

MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20


def error_response(message: str, status: int) -> JSONResponse:
    return JSONResponse(openai_error_body(message, status), status)


async def _read_json(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def _watch_disconnect(http: HttpRequest, *requests: Request) -> None:
    """Cancel the generation when the client goes away (the body is already read, so the next message
    is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            for request in requests:
                request.cancelled = True
            return


@dataclasses.dataclass
class Extras:
    """What a request asks beyond a plain answer; none of it: the plain path."""

    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the top N alternatives
    specials: frozenset[int] = frozenset()  # control tokens the parsers need rendered
    output: Callable[[], ChatOutput] | None = None  # chat: a choice's parsers (reasoning, tool calls)
    echo: str = ""  # completions: the prompt, put before the answer

    @property
    def plain(self) -> bool:
        return self.n == 1 and self.top_logprobs is None and self.output is None and not self.echo


def _whole_number(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{key} must be a whole number from {low} to {high}")
    return value


class RunnerApp:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self._template: ChatTemplate | None = None
        self.app = Starlette(routes=[
            Route(shapes.HEALTH_PATH, self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route(shapes.CHAT_PATH, self.chat, methods=["POST"]),
            Route(shapes.COMPLETION_PATH, self.completions, methods=["POST"]),
            Route(shapes.EMBEDDING_PATH, self.embeddings, methods=["POST"]),
        ])

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            e = self.engine
            self._template = ChatTemplate(e.chat_template, e.bos_text, e.eos_text)
        return self._template

    async def health(self, _: HttpRequest) -> Response:
        if not self.engine.ready.is_set() or self.engine.load_error:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({
            "status": "ok", "active": self.engine.active, "waiting": self.engine.waiting,
            "n_ctx_seq": self.engine.n_ctx_seq, "n_parallel": self.engine.config.n_parallel,
        })

    async def models(self, _: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "mgr"}
        ]})

    async def chat(self, http: HttpRequest) -> Response:
        try:
            body = await _read_json(http)
            vision = self.engine.vision
            images: list[bytes] | None = [] if vision is not None else None
            messages = normalize_messages(body.get("messages"), images, vision.marker if vision else "")
            plan = tool_plans.plan(body)
            kwargs = body.get("chat_template_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise BadRequest("chat_template_kwargs must be an object")
            effort = body.get("reasoning_effort")
            if effort is not None:
                if effort not in ("low", "medium", "high"):
                    raise BadRequest('reasoning_effort must be "low", "medium" or "high"')
                kwargs = {"reasoning_effort": effort, **kwargs}  # for templates that read it (gpt-oss)
            template, tools = self.template, plan.tools
            prompt = template.render(messages, tools=tools, **kwargs)
            # an image prompt is never shortened (its images would no longer match its markers): too long is a 400
            truncate = bool(body.get("truncate")) and not images

            def shorter() -> Iterator[str]:
                return (template.render(m, tools=tools, **kwargs) for m in _shorter_conversations(messages, truncate))

            params = SamplingParams.from_request(body)
            extras = self._chat_extras(body, plan, kwargs, prompt, params)
        except BadRequest as e:
            return error_response(str(e), 400)
        return await self._generate(http, body, params, prompt, add_special=True, chat=True, shorter=shorter,
                                    extras=extras, images=tuple(images or ()))

    def _chat_extras(self, body: dict[str, Any], plan: tool_plans.ToolPlan, kwargs: dict[str, Any], prompt: str,
                     params: SamplingParams) -> Extras:
        """n, logprobs, and the parsers this chat request's output goes through (with the grammar of a
        forced call)."""
        source = self.template.source
        thinking = thinks(source) and kwargs.get("enable_thinking") is not False
        inside = thinking and opens_block(prompt)
        family = detect_family(source)
        if plan.mode == "forced":
            params.grammar = tool_plans.forced_grammar(plan, close_think=inside)
        markers: tuple[str, ...] = (OPEN, CLOSE) if thinking else ()
        if plan.mode == "auto":
            markers += MARKERS[family]
        output: Callable[[], ChatOutput] | None = None
        if thinking or plan.mode != "none":
            def output() -> ChatOutput:
                return ChatOutput(
                    ReasoningSplitter(inside) if thinking else None,
                    None if plan.mode == "none" else ToolCallParser(
                        family, plan.names, forced=plan.mode == "forced", max_calls=plan.max_calls))
        top = _whole_number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise BadRequest("logprobs must be true or false")
        if top and not logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        controls = self.engine.controls
        return Extras(
            n=_whole_number(body, "n", 1, MAX_CHOICES) or 1,
            top_logprobs=(top or 0) if logprobs else None,
            specials=frozenset(controls[m] for m in markers if m in controls),
            output=output,
        )

    async def completions(self, http: HttpRequest) -> Response:
        try:
            body = await _read_json(http)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string")
            params = SamplingParams.from_request(body)
            echo = body.get("echo")
            if echo is not None and not isinstance(echo, bool):
                raise BadRequest("echo must be true or false")
            extras = Extras(n=_whole_number(body, "n", 1, MAX_CHOICES) or 1,
                            top_logprobs=_whole_number(body, "logprobs", 0, MAX_TOP_LOGPROBS),
                            echo=prompt if echo else "")
            suffix = body.get("suffix")
            if suffix is not None and not isinstance(suffix, str):
                raise BadRequest("suffix must be a string")
            if suffix:
                if self.engine.fim is None:
                    raise BadRequest("this model has no fill-in-the-middle tokens, so it does not take a suffix")
                prefix_token, suffix_token, middle_token = self.engine.fim
                prompt = f"{prefix_token}{prompt}{suffix_token}{suffix}{middle_token}"
        except BadRequest as e:
            return error_response(str(e), 400)
        return await self._generate(http, body, params, prompt, add_special=True, chat=False, extras=extras)

    async def embeddings(self, http: HttpRequest) -> Response:
        try:
            body = await _read_json(http)
            inputs = body.get("input")
            if isinstance(inputs, str):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
                raise BadRequest("input must be a string or a non-empty list of strings")
            dimensions = _whole_number(body, "dimensions", 1, self.engine.n_embd)
        except BadRequest as e:
            return error_response(str(e), 400)
        request = EmbedRequest(asyncio.get_running_loop(), inputs, truncate=bool(body.get("truncate", True)))
        self.engine.submit(request)
        try:
            event = await request.events.get()
        finally:
            request.cancelled = True
        if event.kind == "error":
            return error_response(event.text, event.status)
        usage: EventUsage = event.usage or {}
        as_base64 = body.get("encoding_format") == "base64"
        if dimensions is not None:
            usage["data"] = [_cut(v, dimensions) for v in usage["data"]]
        answer: shapes.EmbeddingList = {
            "object": "list", "model": self.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": _base64_floats(v) if as_base64 else v}
                     for i, v in enumerate(usage["data"])],
            "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]},
        }
        return JSONResponse(answer)

    async def _generate(self, http: HttpRequest, body: dict[str, Any], params: SamplingParams, prompt: str,
                        add_special: bool, chat: bool, shorter: Callable[[], Iterator[str]] = lambda: iter(()),
                        extras: Extras | None = None, images: tuple[bytes, ...] = ()) -> Response:
        if extras is not None and not extras.plain:
            return await self._generate_rich(http, body, params, prompt, add_special, chat, shorter, extras, images)
        request = Request(asyncio.get_running_loop(), params, prompt, add_special, shorter(), images=images)
        self.engine.submit(request)
        watcher = asyncio.create_task(_watch_disconnect(http, request))
        try:
            first = await request.events.get()
        except BaseException:
            request.cancelled = True
            watcher.cancel()
            raise
        if first.kind == "error":
            watcher.cancel()
            return error_response(first.text, first.status)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.get("stream"):
            watcher.cancel()  # StreamingResponse watches for the disconnect itself
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(request, ident, created, chat, include_usage),
                media_type="text/event-stream",
            )
        try:
            parts: list[str] = []
            while True:
                event = await request.events.get()
                if event.kind == "text":
                    parts.append(event.text)
                elif event.kind == "error":
                    return error_response(event.text, event.status)
                elif event.kind == "done":
                    break
        finally:
            request.cancelled = True  # no-op when finished; frees the slot when we leave early
            watcher.cancel()
        content = "".join(parts)
        answer: shapes.ChatCompletion | shapes.TextCompletion
        if chat:
            answer = {
                "id": ident, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": event.finish_reason}],
                "usage": _usage(event), "timings": _timings(event),
            }
        else:
            answer = {
                "id": ident, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "text": content, "finish_reason": event.finish_reason, "logprobs": None}],
                "usage": _usage(event), "timings": _timings(event),
            }
        return JSONResponse(answer)

    async def _stream(self, request: Request, ident: str, created: int, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
        model = self.model_name
        encode = sse.encode  # per token: one local lookup

        def chunk(content: str | None, finish: shapes.FinishReason | None) -> shapes.Chunk:
            if chat:
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": {} if content is None else {"content": content},
                                     "finish_reason": finish}]}
            return {"id": ident, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}]}

        try:
            if chat:
                first: shapes.ChatChunk = {
                    "id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
                yield encode(first)
            while True:
                event = await request.events.get()
                if event.kind == "text":
                    yield encode(chunk(event.text, None))
                elif event.kind == "error":
                    yield encode(openai_error_body(event.text, event.status))
                    return
                elif event.kind == "done":
                    last = chunk(None, event.finish_reason)
                    last["timings"] = _timings(event)
                    yield encode(last)
                    if include_usage:
                        summary = chunk(None, None)  # OpenAI's usage chunk: no choices
                        summary["choices"] = []
                        summary["usage"] = _usage(event)
                        yield encode(summary)
                    yield sse.DONE
                    return
        finally:
            request.cancelled = True


    # n choices, parsers, logprobs, echo -----------------------------------------------------------------
    async def _generate_rich(self, http: HttpRequest, body: dict[str, Any], params: SamplingParams, prompt: str,
                             add_special: bool, chat: bool, shorter: Callable[[], Iterator[str]],
                             extras: Extras, images: tuple[bytes, ...] = ()) -> Response:
        loop = asyncio.get_running_loop()
        requests = []
        for i in range(extras.n):
            # n samples, not n copies: a fixed seed moves on by one per choice
            own = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            requests.append(Request(loop, own, prompt, add_special, shorter(), top_logprobs=extras.top_logprobs,
                                    specials=extras.specials, images=images))
        for request in requests:
            self.engine.submit(request)
        watcher = asyncio.create_task(_watch_disconnect(http, *requests))
        try:
            for request in requests:
                first = await request.events.get()
                if first.kind == "error":
                    watcher.cancel()
                    for other in requests:
                        other.cancelled = True
                    return error_response(first.text, first.status)
        except BaseException:
            watcher.cancel()
            for request in requests:
                request.cancelled = True
            raise
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        choices = _Choices(self.model_name, ident, created, chat, extras)
        if body.get("stream"):
            watcher.cancel()  # StreamingResponse watches for the disconnect itself
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._stream_rich(requests, choices, include_usage),
                                     media_type="text/event-stream")
        try:
            async with contextlib.aclosing(_merged(requests)) as events:
                async for index, event in events:
                    if event.kind == "error":
                        return error_response(event.text, event.status)
                    choices.whole(index, event)
        finally:
            for request in requests:
                request.cancelled = True
            watcher.cancel()
        return JSONResponse(choices.answer())

    async def _stream_rich(self, requests: list[Request], choices: _Choices,
                           include_usage: bool) -> AsyncIterator[bytes]:
        encode = sse.encode
        try:
            for index in range(len(requests)):
                for chunk in choices.opening(index):
                    yield encode(chunk)
            async with contextlib.aclosing(_merged(requests)) as events:
                async for index, event in events:
                    if event.kind == "error":
                        yield encode(openai_error_body(event.text, event.status))
                        return
                    for chunk in choices.streamed(index, event):
                        yield encode(chunk)
            if include_usage:
                yield encode(choices.usage_chunk())
            yield sse.DONE
        finally:
            for request in requests:
                request.cancelled = True


async def _merged(requests: list[Request]) -> AsyncGenerator[tuple[int, Event], None]:
    """The requests' events as they come, each with its choice index, until every request is done (or one
    fails: its error is the last)."""
    if len(requests) == 1:
        events = requests[0].events
        while True:
            event = await events.get()
            yield 0, event
            if event.kind in ("done", "error"):
                return
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def forward(index: int, request: Request) -> None:
        while True:
            event = await request.events.get()
            merged.put_nowait((index, event))
            if event.kind in ("done", "error"):
                return

    tasks = [asyncio.create_task(forward(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(requests)
        while remaining:
            index, event = await merged.get()
            yield index, event
            if event.kind == "error":
                return
            if event.kind == "done":
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()


class _Choices:
    """The choices of one answer as they are generated: each choice's parsers, logprobs and end, as stream
    chunks or as a whole answer."""

    def __init__(self, model: str, ident: str, created: int, chat: bool, extras: Extras) -> None:
        self.model, self.ident, self.created, self.chat, self.extras = model, ident, created, chat, extras
        n = extras.n
        self.outputs = [extras.output() if extras.output is not None else None for _ in range(n)]
        self.messages = [Message() for _ in range(n)]
        self.texts: list[list[str]] = [[extras.echo] if extras.echo else [] for _ in range(n)]
        self.chat_logprobs: list[list[shapes.TokenLogprob]] = [[] for _ in range(n)]
        self.text_logprobs = [TextLogprobs(len(extras.echo)) for _ in range(n)]
        self.text_logprob_parts: list[list[shapes.TextLogprobs]] = [[] for _ in range(n)]
        self.finish: list[shapes.FinishReason | None] = [None] * n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.timings: shapes.Timings = {"prompt_ms": 0.0, "predicted_ms": 0.0}

    # streamed ---------------------------------------------------------------------------------------------
    def _chat_chunk(self, index: int, delta: shapes.ChatDelta, finish: shapes.FinishReason | None,
                    logprobs: list[shapes.TokenLogprob] | None = None) -> shapes.ChatChunk:
        choice: shapes.ChatChunkChoice = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        return {"id": self.ident, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def _text_chunk(self, index: int, text: str, finish: shapes.FinishReason | None,
                    logprobs: shapes.TextLogprobs | None = None) -> shapes.TextChunk:
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    def opening(self, index: int) -> list[shapes.Chunk]:
        if self.chat:
            return [self._chat_chunk(index, {"role": "assistant", "content": ""}, None)]
        return [self._text_chunk(index, self.extras.echo, None)] if self.extras.echo else []

    def streamed(self, index: int, event: Event) -> list[shapes.Chunk]:
        if event.kind == "text":
            if self.chat:
                output = self.outputs[index]
                delta = output.feed(event.text) if output is not None else {"content": event.text}
                logprobs = chat_logprobs(event.logprobs or []) if self.extras.top_logprobs is not None else None
                return [self._chat_chunk(index, delta, None, logprobs)] if delta or logprobs else []
            text_logprobs = self.text_logprobs[index].shape(event.logprobs or []) \
                if self.extras.top_logprobs is not None else None
            return [self._text_chunk(index, event.text, None, text_logprobs)]
        if event.kind != "done":
            return []
        finish = self._done(index, event)
        chunks: list[shapes.Chunk] = []
        last: shapes.Chunk
        if self.chat:
            output = self.outputs[index]
            tail = output.finish() if output is not None else {}
            if tail:
                chunks.append(self._chat_chunk(index, tail, None))
            last = self._chat_chunk(index, {}, finish)
        else:
            last = self._text_chunk(index, "", finish)
        last["timings"] = _timings(event)
        chunks.append(last)
        return chunks

    def usage_chunk(self) -> shapes.Chunk:
        chunk: shapes.Chunk
        if self.chat:
            chunk = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "choices": [], "usage": self.usage()}
        else:
            chunk = {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                     "choices": [], "usage": self.usage()}
        return chunk

    # whole ------------------------------------------------------------------------------------------------
    def whole(self, index: int, event: Event) -> None:
        if event.kind == "text":
            if self.chat:
                output = self.outputs[index]
                self.messages[index].add(output.feed(event.text) if output is not None else {"content": event.text})
                if self.extras.top_logprobs is not None:
                    self.chat_logprobs[index] += chat_logprobs(event.logprobs or [])
            else:
                self.texts[index].append(event.text)
                if self.extras.top_logprobs is not None:
                    self.text_logprob_parts[index].append(self.text_logprobs[index].shape(event.logprobs or []))
        elif event.kind == "done":
            output = self.outputs[index]
            if output is not None:
                self.messages[index].add(output.finish())
            self._done(index, event)

    def answer(self) -> shapes.ChatCompletion | shapes.TextCompletion:
        n = self.extras.n
        asked = self.extras.top_logprobs is not None
        if self.chat:
            chat_choices: list[shapes.ChatChoice] = []
            for i in range(n):
                choice: shapes.ChatChoice = {"index": i, "message": self.messages[i].build(),
                                             "finish_reason": self.finish[i]}
                choice["logprobs"] = {"content": self.chat_logprobs[i]} if asked else None
                chat_choices.append(choice)
            return {"id": self.ident, "object": "chat.completion", "created": self.created, "model": self.model,
                    "choices": chat_choices, "usage": self.usage(), "timings": self.timings}
        text_choices: list[shapes.TextChoice] = [
            {"index": i, "text": "".join(self.texts[i]), "finish_reason": self.finish[i],
             "logprobs": merge_text_logprobs(self.text_logprob_parts[i]) if asked else None}
            for i in range(n)]
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": text_choices, "usage": self.usage(), "timings": self.timings}

    # both -------------------------------------------------------------------------------------------------
    def _done(self, index: int, event: Event) -> shapes.FinishReason | None:
        usage: EventUsage = event.usage or {}
        self.prompt_tokens = usage.get("prompt_tokens", 0)  # the same prompt for every choice: counted once
        self.completion_tokens += usage.get("completion_tokens", 0)
        self.timings = _timings(event)
        finish = event.finish_reason
        output = self.outputs[index]
        if output is not None and output.called and finish == "stop":
            finish = "tool_calls"
        self.finish[index] = finish
        return finish

    def usage(self) -> shapes.Usage:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _shorter_conversations(messages: list[dict[str, Any]], allowed: bool) -> Iterator[list[dict[str, Any]]]:
    """When truncation is allowed: the conversation with its oldest messages dropped one by one; system
    messages and the last message always stay."""
    if not allowed:
        return
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    for i in range(1, len(rest)):
        yield system + rest[i:]


def _cut(vector: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` of a vector, renormalized (as Ollama and OpenAI's smaller embeddings do)."""
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's encoding_format=base64: little-endian float32, base64 encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _usage(event: Event) -> shapes.Usage:
    usage: EventUsage = event.usage or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings(event: Event) -> shapes.Timings:
    usage: EventUsage = event.usage or {}
    return {"prompt_ms": usage.get("prompt_ms", 0.0), "predicted_ms": usage.get("predicted_ms", 0.0)}
