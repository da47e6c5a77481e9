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
import functools
import json
import logging
import math
import os
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...protocol import shapes, sse, surrogates
from ...protocol.errors import openai_error_body
from ...protocol.runner_secret import RUNNER_SECRET_ENV, RequireSecret
from . import faults, prompts, truncation
from . import tools as tool_plans
from .engine import EmbedRequest, Engine, Event, EventUsage, Request
from .output import ChatOutput, Message, TextLogprobs, chat_logprobs, merge_text_logprobs
from .reasoning import CLOSE, OPEN, ReasoningSplitter, opens_block, thinks
from .sampling import BadRequest, SamplingParams
from .template import ChatTemplate, normalize_messages
from .tool_calls import MARKERS, ToolCallParser, detect_family

MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20
# Variables the runner gives every chat template itself: chat_template_kwargs cannot set them too.
TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")

log = logging.getLogger("mgr.runner")


def error_response(message: str, status: int) -> JSONResponse:
    return JSONResponse(openai_error_body(message, status), status)


async def _read_json(request: HttpRequest) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON (or nests too deep)") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if (where := surrogates.lone_surrogate(raw, body)) is not None:  # it must never reach the tokenizer
        raise BadRequest(surrogates.message(where))
    return body


async def _internal_error(_: HttpRequest, error: Exception) -> Response:
    """Whatever a handler did not expect: a short message in the protocol's shape (the log has the rest)."""
    status, message = faults.request_error(error)
    return error_response(message, status)


def _check_stream_options(body: dict[str, Any]) -> None:
    """`stream` and `stream_options` are read only once generation has started: their shape is checked before."""
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("stream must be true or false")
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise BadRequest('stream_options must be an object, as in {"include_usage": true}')
    if options.get("include_usage") is not None and not isinstance(options["include_usage"], bool):
        raise BadRequest("stream_options.include_usage must be true or false")


def _template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise BadRequest("chat_template_kwargs must be an object")
    taken = [key for key in TEMPLATE_VARIABLES if key in kwargs]
    if taken:
        raise BadRequest(f"chat_template_kwargs cannot set {', '.join(taken)}: the request's own fields do")
    return kwargs


def _chat_tokens(engine: Engine, text: str) -> list[int]:
    """A rendered chat's tokens, as the engine would read them (BOS added unless the template wrote it)."""
    return engine.tokenize(text, engine.add_bos and not (engine.bos_text and text.startswith(engine.bos_text)))


def _limits(engine: Engine) -> dict[str, int]:
    """The loaded model's context and vocabulary, which bound some sampling fields (0: not loaded yet)."""
    return {"n_ctx": engine.n_ctx_seq, "n_vocab": getattr(engine, "n_vocab", 0)}


def _submit(engine: Engine, request: Request, extras: Extras | None) -> None:
    if extras is not None:
        request.truncated, request.fault = extras.truncated, extras.fault
    engine.submit(request)


def _render(template: ChatTemplate, messages: list[dict[str, Any]], tools: Any, kwargs: dict[str, Any]) -> str:
    """The prompt; a template that fails on what this request sent (its kwargs, its messages) is a 400."""
    try:
        return template.render(messages, tools=tools, **kwargs)
    except BadRequest:
        raise
    except Exception as e:
        raise BadRequest(f"the chat template failed on this request ({type(e).__name__}: {e})") from None


async def _watch_disconnect(http: HttpRequest, *requests: Request) -> None:
    """Cancel the generation when the client goes away (the body is already read, so the next message
    is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            for request in requests:
                request.cancel()
            return


@dataclasses.dataclass
class Extras:
    """What a request asks beyond a plain answer; none of it: the plain path."""

    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the top N alternatives
    specials: frozenset[int] = frozenset()  # control tokens the parsers need rendered
    output: Callable[[], ChatOutput] | None = None  # chat: a choice's parsers (reasoning, tool calls)
    echo: str = ""  # completions: the prompt, put before the answer
    truncated: int = 0  # chat: prompt tokens already dropped to fit (truncation.py); the prompt is then token ids
    fault: faults.Fault | None = None  # the test hook (faults.py)
    token_ids: bool = False  # vLLM's return_token_ids: the prompt's and each choice's token ids, on the last chunk

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
            Route(shapes.TOKENIZE_PATH, self.tokenize, methods=["POST"]),
        ], exception_handlers={Exception: _internal_error},
            # the daemon's per-runner secret (protocol/runner_secret.py); none set (a test's runner): no check
            middleware=[Middleware(RequireSecret, secret=secret)] if (secret := os.environ.get(RUNNER_SECRET_ENV))
            else [])

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
            "cached_tokens": self.engine.cached_tokens,
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
            kwargs = _template_kwargs(body)
            effort = body.get("reasoning_effort")
            if effort is not None:
                if effort not in ("low", "medium", "high"):
                    raise BadRequest('reasoning_effort must be "low", "medium" or "high"')
                kwargs = {"reasoning_effort": effort, **kwargs}  # for templates that read it (gpt-oss)
            template, tools = prompts.request_template(body, self.template, self.engine), plan.tools
            _check_stream_options(body)
            params = SamplingParams.from_request(body, **_limits(self.engine))
            # an image prompt is never shortened (its images would no longer match its markers): too long is a 400
            fitted: truncation.Fitted | None = None
            if body.get("truncate") and not images and self.engine.n_ctx_seq:
                # rendered, tokenized and fitted in a worker thread: a long chat holds neither this loop nor
                # the engine thread, so the model's other clients go on meanwhile
                fitted = await asyncio.to_thread(truncation.fit, messages,
                                                 lambda conversation: _render(template, conversation, tools, kwargs),
                                                 functools.partial(_chat_tokens, self.engine), self.engine.n_ctx_seq)
                prompt = fitted.text
            else:
                prompt = _render(template, messages, tools, kwargs)
            extras = self._chat_extras(body, plan, kwargs, prompt, params, template)
            extras.fault = faults.requested_fault(body)
        except BadRequest as e:
            return error_response(str(e), 400)
        if fitted is not None:
            extras.truncated = fitted.dropped
        return await self._generate(http, body, params, fitted.tokens if fitted is not None else prompt,
                                    add_special=True, chat=True, extras=extras, images=tuple(images or ()))

    def _chat_extras(self, body: dict[str, Any], plan: tool_plans.ToolPlan, kwargs: dict[str, Any], prompt: str,
                     params: SamplingParams, template: ChatTemplate) -> Extras:
        """n, logprobs, and the parsers this chat request's output goes through (with the grammar of a
        forced call)."""
        source = template.source
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
            token_ids=_flag(body, "return_token_ids"),
        )

    async def completions(self, http: HttpRequest) -> Response:
        try:
            body = await _read_json(http)
            prompt = prompts.completion_prompt(body.get("prompt"))
            _check_stream_options(body)
            params = SamplingParams.from_request(body, **_limits(self.engine))
            echo = _flag(body, "echo")
            if echo and not isinstance(prompt, str):
                raise BadRequest("echo needs the prompt as text, not token ids")
            extras = Extras(n=_whole_number(body, "n", 1, MAX_CHOICES) or 1,
                            top_logprobs=_whole_number(body, "logprobs", 0, MAX_TOP_LOGPROBS),
                            echo=prompt if echo and isinstance(prompt, str) else "",
                            token_ids=_flag(body, "return_token_ids"), fault=faults.requested_fault(body))
            suffix = body.get("suffix")
            if suffix is not None and not isinstance(suffix, str):
                raise BadRequest("suffix must be a string")
            if suffix:
                prompt = prompts.fill_in_the_middle(self.engine, prompt, suffix)
        except BadRequest as e:
            return error_response(str(e), 400)
        return await self._generate(http, body, params, prompt, add_special=True, chat=False, extras=extras)

    async def tokenize(self, http: HttpRequest) -> Response:
        try:
            return JSONResponse(prompts.tokenize(await _read_json(http), self.template, self.engine))
        except BadRequest as e:
            return error_response(str(e), 400)

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
        request.fault = faults.requested_fault(body)
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

    async def _generate(self, http: HttpRequest, body: dict[str, Any], params: SamplingParams, prompt: str | list[int],
                        add_special: bool, chat: bool, shorter: Callable[[], Iterator[str]] = lambda: iter(()),
                        extras: Extras | None = None, images: tuple[bytes, ...] = ()) -> Response:
        if extras is not None and not extras.plain:
            return await self._generate_rich(http, body, params, prompt, add_special, chat, shorter, extras, images)
        request = Request(asyncio.get_running_loop(), params, prompt, add_special, shorter(), images=images)
        _submit(self.engine, request, extras)
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
        headers = _truncation_headers(first)
        if body.get("stream"):
            watcher.cancel()  # StreamingResponse watches for the disconnect itself
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(request, ident, created, chat, include_usage, extras is not None and extras.token_ids),
                media_type="text/event-stream", headers=headers,
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
        if extras is not None and extras.token_ids:
            _add_token_ids(answer, 0, event, chat)
        return JSONResponse(answer, headers=headers)

    async def _stream(self, request: Request, ident: str, created: int, chat: bool,
                      include_usage: bool, token_ids: bool = False) -> AsyncIterator[bytes]:
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
                    if token_ids:
                        _add_token_ids(last, 0, event, chat)
                    yield encode(last)
                    if include_usage:
                        summary = chunk(None, None)  # OpenAI's usage chunk: no choices
                        summary["choices"] = []
                        summary["usage"] = _usage(event)
                        yield encode(summary)
                    yield sse.DONE
                    return
        except Exception as e:  # after the 200: the stream's last event says it
            status, message = faults.request_error(e)
            yield encode(openai_error_body(message, status))
        finally:
            request.cancelled = True


    # n choices, parsers, logprobs, echo -----------------------------------------------------------------
    async def _generate_rich(self, http: HttpRequest, body: dict[str, Any], params: SamplingParams,
                             prompt: str | list[int], add_special: bool, chat: bool,
                             shorter: Callable[[], Iterator[str]], extras: Extras,
                             images: tuple[bytes, ...] = ()) -> Response:
        loop = asyncio.get_running_loop()
        requests = []
        for i in range(extras.n):
            # n samples, not n copies: a fixed seed moves on by one per choice
            own = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            requests.append(Request(loop, own, prompt, add_special, shorter(), top_logprobs=extras.top_logprobs,
                                    specials=extras.specials, images=images))
        for request in requests:
            _submit(self.engine, request, extras)
        watcher = asyncio.create_task(_watch_disconnect(http, *requests))
        headers: dict[str, str] = {}
        try:
            for request in requests:
                first = await request.events.get()
                headers = headers or _truncation_headers(first)
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
                                     media_type="text/event-stream", headers=headers)
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
        return JSONResponse(choices.answer(), headers=headers)

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
        except Exception as e:  # after the 200 (a parser's failure, say): the stream's last event says it
            status, message = faults.request_error(e)
            yield encode(openai_error_body(message, status))
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
        self.done_events: list[Event | None] = [None] * n  # for the token ids
        self.prompt_tokens = 0
        self.cached_tokens = 0
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
        if self.extras.token_ids:
            _add_token_ids(last, 0, event, self.chat)
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
            return self._with_token_ids({
                "id": self.ident, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": chat_choices, "usage": self.usage(), "timings": self.timings})
        text_choices: list[shapes.TextChoice] = [
            {"index": i, "text": "".join(self.texts[i]), "finish_reason": self.finish[i],
             "logprobs": merge_text_logprobs(self.text_logprob_parts[i]) if asked else None}
            for i in range(n)]
        answer: shapes.TextCompletion = {
            "id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": text_choices, "usage": self.usage(), "timings": self.timings}
        return self._with_token_ids(answer)

    def _with_token_ids(self, answer: shapes.ChatCompletion | shapes.TextCompletion) -> shapes.ChatCompletion | \
            shapes.TextCompletion:
        if self.extras.token_ids:
            for i, event in enumerate(self.done_events):
                if event is not None:
                    _add_token_ids(answer, i, event, self.chat)
        return answer

    # both -------------------------------------------------------------------------------------------------
    def _done(self, index: int, event: Event) -> shapes.FinishReason | None:
        usage: EventUsage = event.usage or {}
        self.prompt_tokens = usage.get("prompt_tokens", 0)  # the same prompt for every choice: counted once
        self.cached_tokens = usage.get("cached_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)
        self.timings = _timings(event)
        self.done_events[index] = event
        finish = event.finish_reason
        output = self.outputs[index]
        if output is not None and output.called and finish == "stop":
            finish = "tool_calls"
        self.finish[index] = finish
        return finish

    def usage(self) -> shapes.Usage:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return bool(value)


def _truncation_headers(started: Event) -> dict[str, str]:
    """A prompt cut to fit the context is never silent: the answer carries how many tokens were dropped."""
    truncated = (started.usage or {}).get("truncated", 0)
    return {shapes.TRUNCATED_HEADER: str(truncated)} if truncated else {}


def _add_token_ids(answer: Any, position: int, event: Event, chat: bool) -> None:
    """vLLM's return_token_ids shape: the prompt's ids (chat: on the answer or chunk; completions: on the
    choice) and the choice's generated ids. The llama.cpp runner sends them on the chunk with finish_reason."""
    usage: EventUsage = event.usage or {}
    choice = answer["choices"][position]
    (answer if chat else choice)["prompt_token_ids"] = usage.get("prompt_token_ids", [])
    choice["token_ids"] = usage.get("token_ids", [])


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
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)}}


def _timings(event: Event) -> shapes.Timings:
    usage: EventUsage = event.usage or {}
    return {"prompt_ms": usage.get("prompt_ms", 0.0), "predicted_ms": usage.get("predicted_ms", 0.0)}
