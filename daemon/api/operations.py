"""One internal request per operation (chat, completion, embedding): every API adapter parses its body into
one of these, with the field checks below, and the runner body is built from it in one place. The Anthropic
and Responses adapters plug in here the same way.

The runner protocol is OpenAI's (daemon/protocol), so fields an adapter does not need to read travel in
`passthrough` as the client sent them (an OpenAI client's vLLM extras, say); the engines validate those.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import BadRequest
from ..protocol import shapes


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
    truncate: bool | None = None  # mgr's extension; None = the runner's default (no truncation)
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)

    def runner_body(self, model: str, *, stream: bool, usage: bool = False) -> shapes.ChatBody:
        body: shapes.ChatBody = {**self.passthrough, **self.sampling}  # type: ignore[typeddict-item]
        body["model"] = model
        body["messages"] = self.messages
        body["stream"] = stream
        if usage:
            body["stream_options"] = {"include_usage": True}
        if self.response_format is not None:
            body["response_format"] = self.response_format
        if self.tools:
            body["tools"] = self.tools
        if self.truncate is not None:
            body["truncate"] = self.truncate
        return body


@dataclasses.dataclass(slots=True)
class CompletionRequest:
    """A raw prompt, no chat template."""

    target: Target
    prompt: str | list[Any]  # OpenAI also takes a list of prompts or of token ids
    stream: bool
    sampling: shapes.SamplingFields = dataclasses.field(default_factory=lambda: shapes.SamplingFields())
    response_format: shapes.ResponseFormat | None = None
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)

    def runner_body(self, model: str, *, stream: bool, usage: bool = False) -> shapes.CompletionBody:
        body: shapes.CompletionBody = {**self.passthrough, **self.sampling}  # type: ignore[typeddict-item]
        body["model"] = model
        body["prompt"] = self.prompt  # type: ignore[typeddict-item]  # a list only from OpenAI clients
        body["stream"] = stream
        if usage:
            body["stream_options"] = {"include_usage": True}
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


@dataclasses.dataclass(slots=True)
class EmbeddingRequest:
    target: Target
    input: str | list[Any]  # strings; OpenAI clients may send token ids
    truncate: bool | None = None
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)

    def runner_body(self, model: str) -> shapes.EmbeddingBody:
        body: shapes.EmbeddingBody = {**self.passthrough}  # type: ignore[typeddict-item]
        body["model"] = model
        body["input"] = self.input  # type: ignore[typeddict-item]
        if self.truncate is not None:
            body["truncate"] = self.truncate
        return body


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
