"""One internal request per operation (chat, completion, embedding): every API adapter parses its body into
one of these, with the field checks below, and the runner body is built from it in one place. The Anthropic
and Responses adapters plug in here the same way.

The runner protocol is OpenAI's (daemon/protocol), so fields an adapter does not need to read travel in
`passthrough` as the client sent them (an OpenAI client's vLLM extras, say); the engines validate those.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from mgr.registry.capabilities import Capability

from ..errors import BadRequest
from ..protocol import shapes
from ..protocol.limits import INT32_MAX

log = logging.getLogger("mgr.daemon")

Effort = Literal["low", "medium", "high"]
# How a missing capability is named in Ollama's 400: "<model>" does not support <this>
CAPABILITY_WORDS: dict[Capability, str] = {"vision": "images", "insert": "insert", "tools": "tools",
                                           "thinking": "thinking", "completion": "completion",
                                           "embedding": "embeddings"}


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Which model, and what of it the scheduler needs to know (num_ctx changes how it is loaded)."""

    model: str
    num_ctx: int | None = None
    keep_alive: float | None = None  # seconds; None = the model's or the daemon's default


@dataclasses.dataclass(slots=True)
class ChatRequest:
    target: Target
    messages: list[shapes.ChatMessage]
    stream: bool  # what the client asked; the runner may be asked otherwise (see runner_body)
    sampling: shapes.SamplingFields = dataclasses.field(default_factory=lambda: shapes.SamplingFields())
    response_format: shapes.ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: shapes.ToolChoice | None = None  # None: "auto" when there are tools
    parallel_tool_calls: bool | None = None
    thinking: bool | Effort | None = None  # Ollama's think, OpenAI's reasoning_effort; None = the model's way
    logprobs: bool = False
    top_logprobs: int | None = None
    images: bool = False  # some message carries an image
    truncate: bool | None = None  # mgr's extension; None = the runner's default (no truncation)
    chat_template: str | None = None  # a Jinja chat template for this request only (Ollama's `template`)
    return_token_ids: bool = False  # the prompt's and the answer's token ids back (Ollama's `context`)
    context: list[int] | None = None  # token ids the prompt continues (Ollama's `context`, sent back)
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)

    def needs(self) -> list[Capability]:
        """What the model must be able to do. A forced tool call (required, or a named function) is not
        among them: the runners enforce it with a grammar even where the template has no tool syntax."""
        needed: list[Capability] = ["completion"]
        if self.tools and self.tool_choice in (None, "auto"):
            needed.append("tools")
        if self.thinking not in (None, False):
            needed.append("thinking")
        if self.images:
            needed.append("vision")
        return needed

    def runner_body(self, model: str, *, stream: bool, usage: bool = False) -> shapes.ChatBody:
        body: shapes.ChatBody = _generation_body(self, model, stream, usage)  # type: ignore[assignment]
        body["messages"] = self.messages
        if self.tools and self.tool_choice != "none":
            body["tools"] = self.tools
            if self.tool_choice is not None:
                body["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = self.parallel_tool_calls
        if self.thinking is not None:
            kwargs = dict(body.get("chat_template_kwargs") or {})
            kwargs["enable_thinking"] = self.thinking is not False
            body["chat_template_kwargs"] = kwargs
            if isinstance(self.thinking, str):
                body["reasoning_effort"] = self.thinking
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs:
                body["top_logprobs"] = self.top_logprobs
        if self.truncate is not None:
            body["truncate"] = self.truncate
        if self.chat_template is not None:
            body["chat_template"] = self.chat_template
        if self.return_token_ids:
            body["return_token_ids"] = True
        return body

    def tokenize_body(self, model: str) -> shapes.TokenizeChatBody:
        """The new turn as the model will read it after `context`: its messages through the chat template."""
        body: shapes.TokenizeChatBody = {"model": model, "messages": self.messages, "add_generation_prompt": True}
        if self.chat_template is not None:
            body["chat_template"] = self.chat_template
        return body

    def continued(self, tokens: list[int]) -> CompletionRequest:
        """The request as a completion whose prompt is `context` followed by the new turn's `tokens`: both
        engines read a prompt given as token ids as it is."""
        return CompletionRequest(self.target, [*(self.context or []), *tokens], self.stream, self.sampling,
                                 self.response_format, return_token_ids=self.return_token_ids,
                                 passthrough=self.passthrough)


@dataclasses.dataclass(slots=True)
class CompletionRequest:
    """A raw prompt, no chat template."""

    target: Target
    prompt: str | list[Any]  # OpenAI also takes a list of prompts or of token ids
    stream: bool
    sampling: shapes.SamplingFields = dataclasses.field(default_factory=lambda: shapes.SamplingFields())
    response_format: shapes.ResponseFormat | None = None
    suffix: str = ""  # fill-in-the-middle
    logprobs: int | None = None  # alternatives per token
    return_token_ids: bool = False  # the prompt's and the answer's token ids back (Ollama's `context`)
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)

    def needs(self) -> list[Capability]:
        return ["completion", "insert"] if self.suffix else ["completion"]

    def runner_body(self, model: str, *, stream: bool, usage: bool = False) -> shapes.CompletionBody:
        body: shapes.CompletionBody = _generation_body(self, model, stream, usage)  # type: ignore[assignment]
        body["prompt"] = self.prompt  # a list: token ids (or, from OpenAI clients, several prompts)
        if self.suffix:
            body["suffix"] = self.suffix
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        if self.return_token_ids:
            body["return_token_ids"] = True
        return body


def _generation_body(op: ChatRequest | CompletionRequest, model: str, stream: bool, usage: bool) -> dict[str, Any]:
    """What chat and completion bodies share: the passed-through fields, sampling, model, stream, format."""
    body: dict[str, Any] = {**op.passthrough, **op.sampling, "model": model, "stream": stream}
    if usage:
        body["stream_options"] = {"include_usage": True}
    if op.response_format is not None:
        body["response_format"] = op.response_format
    return body


@dataclasses.dataclass(slots=True)
class EmbeddingRequest:
    target: Target
    input: str | list[Any]  # strings; OpenAI clients may send token ids
    truncate: bool | None = None
    dimensions: int | None = None
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)

    def needs(self) -> list[Capability]:
        return []  # as Ollama: any model embeds (a generative one through its last hidden state)

    def runner_body(self, model: str) -> shapes.EmbeddingBody:
        body: shapes.EmbeddingBody = {**self.passthrough}  # type: ignore[typeddict-item]
        body["model"] = model
        body["input"] = self.input  # type: ignore[typeddict-item]
        if self.truncate is not None:
            body["truncate"] = self.truncate
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        return body


def truncation_report(runner_headers: Mapping[str, str], model: str) -> dict[str, str]:
    """A prompt the runner cut to fit the context is never silent: the client's answer carries the runner's
    header (the number of prompt tokens dropped), and the daemon's log says so."""
    dropped = runner_headers.get(shapes.TRUNCATED_HEADER.lower())
    if not dropped:
        return {}
    log.warning("%s: the prompt did not fit the context: %s tokens dropped (oldest messages first)", model, dropped)
    return {shapes.TRUNCATED_HEADER: dropped}


# Go's text/template (Ollama's TEMPLATE language): {{ .Prompt }}, {{ if .System }}, {{ range .Messages }}, {{ end }}
_GO_TEMPLATE = re.compile(r"\{\{-?\s*(?:[.$]|(?:if|range|with|template|block|define)\s|(?:end|else)\s*-?\}\})")


def jinja_template(value: Any, key: str) -> str | None:
    """A chat template a request sends for itself: mgr's runners render Jinja chat templates (as Hugging Face
    transformers does), not Ollama's Go templates."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string (a Jinja chat template)")
    if _GO_TEMPLATE.search(value):
        raise BadRequest(f"{key} looks like a Go template ({{{{ .Prompt }}}}, {{{{ if .System }}}}): mgr renders "
                         "Jinja chat templates, as in a model's tokenizer_config.json ({% for message in messages %})")
    return value


def token_ids(value: Any, key: str) -> list[int] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX for t in value):
        raise BadRequest(f"{key} must be a list of token ids (whole numbers from 0 to {INT32_MAX})")
    return value


def unsupported(model: str, capability: Capability) -> BadRequest:
    """Ollama's words, in every API."""
    return BadRequest(f'"{model}" does not support {CAPABILITY_WORDS[capability]}')


def tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> shapes.ToolChoice | None:
    """OpenAI's tool_choice, checked: none, auto, required, or a function named in `tools`."""
    if value is None or value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise BadRequest('tool_choice "required" needs tools')
        return value  # type: ignore[no-any-return]
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        names = {(t.get("function") or {}).get("name") for t in tools or [] if isinstance(t, dict)}
        if not isinstance(name, str) or name not in names:
            raise BadRequest(f"tool_choice names the function {name!r}, which is not among the tools")
        return {"type": "function", "function": {"name": name}}
    raise BadRequest('tool_choice must be "none", "auto", "required" or '
                     '{"type": "function", "function": {"name": ...}}')


def tool_list(value: Any) -> list[dict[str, Any]] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRequest("tools must be a list of tool objects")
    for i, tool in enumerate(value):
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest('every tool needs {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        if tool.get("type") not in (None, "function"):
            raise BadRequest(f'tools[{i}].type must be "function"')
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise BadRequest(f"tools[{i}].function.description must be a string")
    return value


def positive_int(body: dict[str, Any], key: str, upper: int | None = None) -> int | None:
    """A whole number from 0 (8.0 counts, as in JSON Schema)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 0 or (upper is not None and value > upper):
        raise BadRequest(f"{key} must be a whole number from 0" + (f" to {upper}" if upper is not None else ""))
    return int(value)


# field checks: one wording for every adapter -----------------------------------------------------------
def required_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"missing or empty field {key!r}")
    return value


def optional_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value


def optional_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


def strings(value: Any, key: str) -> list[str]:
    """A string or a list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise BadRequest(f"{key} must be a string or a list of strings")
    return value
