"""The routes the daemon serves: /openapi.json, their description from the daemon's own request and answer
types (the TypedDicts of protocol/shapes.py and api/ollama_shapes.py), for clients, generators and fuzzers
(schemathesis); and the JSON answer, in the called API's shape, for a path or a method it does not serve
(Starlette's own is plain text).

Every route the app serves is listed (the caller hands the router's routes and the relayed paths), so a new
route appears at once; `OPERATIONS` says which types its body and answers are. A route not in it is listed with
an open object body and answer until its types are added here. TypedDicts become components: their required
keys (`Required`, `total`) are the schema's, extra keys are allowed (the adapters pass unread fields through or
ignore them), `X | Y` is anyOf, `Literal` an enum. A streamed answer (`stream: true`) is its chunk type under
application/x-ndjson (Ollama) or text/event-stream (OpenAI); errors are the called API's shape.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Iterable, Mapping
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    Required,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from mgr.registry.errors import MgrError

from ..protocol import limits, shapes
from ..version import VERSION
from . import anthropic_shapes as anthropic
from . import ollama_shapes as ollama
from . import openai_shapes as openai
from . import responses_shapes as responses
from .constraints import Keywords

JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
Schema = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Operation:
    """What one method on one path takes and answers."""

    summary: str
    request: Any = None  # the JSON body's type; None: no body
    answer: Any = None  # the whole answer's type (application/json); None: no JSON answer
    chunk: Any = None  # a streamed answer's chunk type, when the body says stream: true
    stream_type: str = NDJSON
    required: tuple[str, ...] = ()  # keys the endpoint needs beyond its type's (a runner body's are all optional)
    status: int = 200
    text: bool = False  # a text/plain answer
    binary_body: bool = False  # the body is raw bytes (a blob upload)


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/"): Operation("Is the daemon running", text=True),
    ("HEAD", "/"): Operation("Is the daemon running"),
    ("GET", "/metrics"): Operation("Prometheus metrics (text exposition format 0.0.4)", text=True),
    ("HEAD", "/metrics"): Operation("Prometheus metrics"),
    ("GET", "/api/version"): Operation("The Ollama API version mgr answers as", answer=ollama.VersionAnswer),
    ("GET", "/api/tags"): Operation("Models in the store", answer=ollama.TagsAnswer),
    ("GET", "/api/ps"): Operation("Models loaded or loading, with their context length", answer=ollama.PsAnswer),
    ("GET", "/api/queue"): Operation("Requests in flight and queued, per model", answer=ollama.QueueAnswer),
    ("POST", "/api/show"): Operation("A model's details, template, parameters and capabilities",
                                     ollama.ModelRequest, ollama.ShowAnswer),
    ("DELETE", "/api/delete"): Operation("Delete a model", ollama.ModelRequest, ollama.Empty),
    ("POST", "/api/copy"): Operation("Copy a model under another name", ollama.CopyRequest, ollama.Empty),
    ("POST", "/api/create"): Operation("Create a model from blobs or over another model", ollama.CreateRequest,
                                       ollama.ProgressEvent, ollama.ProgressEvent),
    ("POST", "/api/pull"): Operation("Pull a model from Hugging Face or ModelScope", ollama.PullRequest,
                                     ollama.ProgressEvent, ollama.ProgressEvent),
    ("HEAD", "/api/blobs/{digest}"): Operation("Whether the store has a blob"),
    ("POST", "/api/blobs/{digest}"): Operation("Upload a blob (its sha256 digest in the path)", status=201,
                                               binary_body=True),
    ("POST", "/api/load"): Operation("Load a model", ollama.LoadRequest, ollama.GenerateChunk),
    ("POST", "/api/unload"): Operation("Unload a model", ollama.LoadRequest, ollama.GenerateChunk),
    ("POST", "/api/chat"): Operation("Chat", ollama.ChatRequest, ollama.ChatChunk, ollama.ChatChunk),
    ("POST", "/api/generate"): Operation("Generate from a prompt (fill-in-the-middle with a suffix)",
                                         ollama.GenerateRequest, ollama.GenerateChunk, ollama.GenerateChunk),
    ("POST", "/api/embed"): Operation("Embed inputs", ollama.EmbedRequest, ollama.EmbedAnswer),
    ("POST", "/api/embeddings"): Operation("Embed one prompt (legacy)", ollama.EmbeddingsRequest,
                                           ollama.EmbeddingsAnswer),
    ("GET", "/v1/models"): Operation("Models in the store", answer=shapes.ModelList),
    ("GET", "/v1/models/{model}"): Operation("One model", answer=shapes.ModelCard),
    ("POST", shapes.CHAT_PATH): Operation(
        "Chat completions (num_ctx, top-level or in options, sets the context)", openai.ChatCompletionRequest,
        shapes.ChatCompletion, shapes.ChatChunk, SSE, required=("model", "messages")),
    ("POST", shapes.COMPLETION_PATH): Operation(
        "Completions (a suffix: fill-in-the-middle; the prompt may be token ids)", openai.CompletionRequest,
        shapes.TextCompletion, shapes.TextChunk, SSE, required=("model", "prompt")),
    ("POST", shapes.EMBEDDING_PATH): Operation("Embeddings", openai.EmbeddingRequest, shapes.EmbeddingList,
                                               required=("model", "input")),
    ("POST", anthropic.MESSAGES_PATH): Operation(
        "Anthropic Messages", anthropic.MessagesRequest, anthropic.Message, dict[str, Any], SSE),
    ("POST", anthropic.COUNT_TOKENS_PATH): Operation("Anthropic token count", anthropic.CountTokensRequest,
                                                     anthropic.TokenCount),
    ("POST", "/v1/responses"): Operation("OpenAI Responses", responses.CreateRequest, responses.Response,
                                         dict[str, Any], SSE),
    ("GET", "/v1/responses/{response_id}"): Operation("A stored response", answer=responses.Response),
    ("DELETE", "/v1/responses/{response_id}"): Operation("Delete a stored response",
                                                         answer=responses.DeletedResponse),
    ("GET", "/v1/responses/{response_id}/input_items"): Operation("A stored response's input items",
                                                                  answer=responses.ItemList),
    ("GET", "/openapi.json"): Operation("This description", answer=dict[str, Any]),
}

_PREFIXES = {shapes.__name__: "OpenAI", openai.__name__: "OpenAI", ollama.__name__: "Ollama",
             anthropic.__name__: "Anthropic", responses.__name__: "Responses"}
_PATH_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]+)?\}")  # Starlette's {name} and {name:converter}


class _Components:
    """TypedDicts turned into JSON Schema components, each once, referred to by $ref."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}

    def schema(self, kind: Any) -> Schema:
        origin = get_origin(kind)
        if origin in (Required, NotRequired):
            return self.schema(get_args(kind)[0])
        if origin is Annotated:  # Annotated[list[X], NON_EMPTY]: what the value must hold beyond its type
            base, *extras = get_args(kind)
            schema = self.schema(base)
            for extra in extras:
                if isinstance(extra, Keywords):
                    schema = {**schema, **extra.schema()}
            return schema
        if kind is Any or kind is object:
            return {}
        if kind is None or kind is type(None):
            return {"type": "null"}
        if kind in (str, int, float, bool):
            return {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[kind]}
        if origin is Literal:
            values = list(get_args(kind))
            return {"enum": values} if len(values) > 1 else {"const": values[0]}
        if origin in (Union, types.UnionType):
            return {"anyOf": [self.schema(arg) for arg in get_args(kind)]}
        if origin is list:
            (item,) = get_args(kind) or (Any,)
            return {"type": "array", "items": self.schema(item)}
        if origin is dict:
            _, value = get_args(kind) or (str, Any)
            return {"type": "object", "additionalProperties": self.schema(value)}
        if is_typeddict(kind):
            return {"$ref": f"#/components/schemas/{self.typed_dict(kind)}"}
        raise TypeError(f"no JSON Schema for {kind!r}")

    def typed_dict(self, kind: Any) -> str:
        name: str = _PREFIXES.get(kind.__module__, "") + kind.__name__
        if name not in self.schemas:
            self.schemas[name] = {}  # taken before its fields are read, should a type refer to itself
            hints = get_type_hints(kind, include_extras=True)
            schema: Schema = {"type": "object", "properties": {
                key: _limited(name, key, self.schema(value)) for key, value in hints.items()}}
            required = sorted(_required_keys(kind, hints))
            if required:
                schema["required"] = required
            if kind.__doc__ and not kind.__doc__.startswith(f"{kind.__name__}("):  # not the generated one
                schema["description"] = " ".join(kind.__doc__.split())
            self.schemas[name] = schema
        return name


def _range(low: float, high: float | None = None) -> Schema:
    return {"minimum": low} if high is None else {"minimum": low, "maximum": high}


# What a field must hold beyond its type, as the adapters check it (api/fields.py, with the bounds of
# protocol/limits.py): in the description, so that clients, and the fuzzer that reads it (tests/test_fuzz_api.py),
# send what is accepted. By field name, for numbers; (component, field) where an API's bound differs.
_LIMITS: dict[str, Schema] = {
    **{field: _range(*bounds) for field, bounds in limits.SAMPLING_RANGES.items()},
    "repeat_penalty": _range(*limits.SAMPLING_RANGES["repetition_penalty"]),
    "max_tokens": _range(*limits.MAX_TOKENS_RANGE), "max_completion_tokens": _range(*limits.MAX_TOKENS_RANGE),
    "num_predict": _range(-2, limits.INT32_MAX), "num_ctx": _range(1, limits.INT32_MAX),
    "num_gpu": _range(-1, limits.INT32_MAX), "num_thread": _range(-1, limits.INT32_MAX),
    "num_batch": _range(-1, limits.INT32_MAX), "n": _range(1, limits.MAX_CHOICES),
    "best_of": _range(1, limits.MAX_CHOICES), "top_logprobs": _range(0, limits.MAX_TOP_LOGPROBS),
    "logprobs": _range(0, limits.MAX_TOP_LOGPROBS), "dimensions": _range(1, limits.MAX_DIMENSIONS),
    "max_output_tokens": _range(1, limits.INT32_MAX), "budget_tokens": _range(1024, limits.INT32_MAX),
}
_COMPONENT_LIMITS: dict[tuple[str, str], Schema] = {
    ("AnthropicMessagesRequest", "max_tokens"): _range(1, limits.INT32_MAX),
    ("ResponsesCreateRequest", "temperature"): _range(0, 2), ("ResponsesCreateRequest", "top_p"): _range(0, 1),
}
# Ollama's durations: 300, "300", "5m", "1h30m", "-1", "300ms" (registry/config.py parse_duration)
_DURATION = r"^(-?[0-9]+(\.[0-9]+)?(ms|s|m|h)?|(-?[0-9]+(\.[0-9]+)?(ms|s|m|h))+)$"


def _limited(component: str, key: str, schema: Schema) -> Schema:
    """A field's schema with what its value must hold (`_LIMITS`); a keep_alive string is a duration."""
    if key == "keep_alive":
        return {"anyOf": [{"type": "string", "pattern": _DURATION}, {"type": "number"}]}
    bound = _COMPONENT_LIMITS.get((component, key), _LIMITS.get(key))
    if bound is None:
        return schema
    if schema.get("type") in ("integer", "number"):
        return {**schema, **bound}
    if "anyOf" in schema:  # int | None
        return {"anyOf": [_limited(component, key, option) for option in schema["anyOf"]]}
    return schema


def _required_keys(kind: Any, hints: dict[str, Any]) -> set[str]:
    """The keys a TypedDict requires, read from its annotations: Python 3.11 computes `__required_keys__` before
    string annotations (`from __future__ import annotations`) are evaluated, so it misses Required and NotRequired.
    A key is required by its own class's `total` unless Required or NotRequired says otherwise."""
    bases = [base for base in getattr(kind, "__orig_bases__", ()) if is_typeddict(base)]
    inherited: set[str] = set()
    required: set[str] = set()
    for base in bases:
        base_hints = get_type_hints(base, include_extras=True)
        inherited |= set(base_hints)
        required |= _required_keys(base, base_hints)
    for key, hint in hints.items():
        if key in inherited:
            continue
        if get_origin(hint) is Required or (kind.__total__ and get_origin(hint) is not NotRequired):
            required.add(key)
    return required


def _error_schema(path: str) -> Schema:
    if path == anthropic.MESSAGES_PATH or path.startswith(anthropic.MESSAGES_PATH + "/"):
        return {"$ref": "#/components/schemas/AnthropicErrorBody"}
    if path.startswith("/v1/"):
        return {"$ref": "#/components/schemas/OpenAIErrorBody"}
    return {"$ref": "#/components/schemas/OllamaErrorAnswer"}


def _operation(method: str, path: str, op: Operation | None, components: _Components) -> Schema:
    if op is None:  # a route whose types are not in OPERATIONS yet: listed, open
        op = Operation(f"{method} {path}", request=dict[str, Any] if method in ("POST", "PUT", "PATCH") else None,
                       answer=dict[str, Any])
    result: Schema = {"summary": op.summary, "operationId": _operation_id(method, path)}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _PATH_PARAMETER.findall(path)]
    if parameters:
        result["parameters"] = parameters
    if op.binary_body:
        result["requestBody"] = {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    elif op.request is not None:
        body = components.schema(op.request)
        if op.required:
            body = {"allOf": [body, {"type": "object", "required": list(op.required)}]}
        result["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    content: Schema = {}
    if op.text:
        content["text/plain"] = {"schema": {"type": "string"}}
    if op.answer is not None:
        content[JSON] = {"schema": components.schema(op.answer)}
    if op.chunk is not None:
        described = "one JSON object per line" if op.stream_type == NDJSON else "data: lines, each a JSON object"
        content[op.stream_type] = {"schema": {**components.schema(op.chunk), "description": f"with stream: true, "
                                              f"{described} of this shape"}}
    answer: Schema = {"description": "OK"}
    if content and method != "HEAD":
        answer["content"] = content
    error = {"description": "An error, in the called API's shape",
             "content": {JSON: {"schema": _error_schema(path)}}}
    result["responses"] = {str(op.status): answer, "default": error}
    if method == "HEAD":
        result["responses"] = {str(op.status): answer, "404": {"description": "Not found"}}
    return result


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", _PATH_PARAMETER.sub(r"\1", path)).strip("_") or "root"
    return f"{method.lower()}_{words}"


def openapi(routes: Iterable[tuple[str, Iterable[str]]], version: str) -> Schema:
    """The description of `routes` (path, methods): every method of every path, with its types where
    OPERATIONS has them."""
    components = _Components()
    components.typed_dict(shapes.ErrorBody)
    components.typed_dict(ollama.ErrorAnswer)
    components.typed_dict(anthropic.ErrorBody)
    paths: dict[str, Schema] = {}
    for route_path, methods in routes:
        path = _PATH_PARAMETER.sub(r"{\1}", route_path)
        entry = paths.setdefault(path, {})
        for method in sorted(set(methods)):
            entry[method.lower()] = _operation(method, path, OPERATIONS.get((method, path)), components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "mgr", "version": version,
                 "description": "The Ollama API (/api/*) and the OpenAI API (/v1/*) as mgr serves them."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(components.schemas.items()))},
    }



def served(routes: Iterable[BaseRoute], relayed: Iterable[str]) -> list[tuple[str, set[str]]]:
    """(path, methods) of the router's routes and of the relayed POST endpoints."""
    listed = [(route.path, set(route.methods or ())) for route in routes if isinstance(route, Route)]
    return listed + [(path, {"POST"}) for path in relayed]


def openapi_route(relayed: Iterable[str]) -> Route:
    """GET /openapi.json, describing every route of the app that serves it."""
    relayed = list(relayed)

    async def describe(request: Request) -> Response:
        return JSONResponse(openapi(served(request.app.routes, relayed), VERSION))

    return Route("/openapi.json", describe, methods=["GET"])


class NoRoute(MgrError):
    """A path the daemon does not serve (404), or a method it does not take there (405, with Allow)."""


def no_route(method: str, path: str, status: int, headers: Mapping[str, str] | None = None) -> NoRoute:
    if status == 405:
        allowed = (headers or {}).get("Allow") or (headers or {}).get("allow") or ""
        return NoRoute(f"{method} is not allowed on {path}" + (f": it takes {allowed}" if allowed else ""), 405,
                       {"Allow": allowed} if allowed else None)
    if status == 404:
        return NoRoute(f"no such endpoint: {method} {path} (GET /openapi.json lists them)", 404)
    return NoRoute(f"{method} {path}: HTTP {status}", status, dict(headers or {}))
