"""A model's own defaults, what its create or Modelfile set (PARAMETER, SYSTEM, MESSAGE), applied under every
request on it, in the one place each API passes through (asgi.lease_for, once the model is known). The
request's own values win, as in Ollama (server/routes.go: modelOptions, and the chat and generate handlers):

- parameters: Ollama's options, mapped onto runner sampling fields as a request's options are (options.py),
  set where the request set nothing: an OpenAI or Anthropic field of the same meaning (max_tokens,
  temperature, stop, ...) wins, and so does an Ollama option. An Ollama request's sampling arrives with
  Ollama's defaults filled in (options.OLLAMA_DEFAULTS); there, a value equal to Ollama's default counts as
  not set, so the model's value replaces it (a request that asks for exactly Ollama's default temperature on
  a model whose PARAMETER says otherwise gets the model's: the one case this cannot tell apart).
  num_ctx is the load's (specs.py reads the model's), not a sampling field.
- system: a chat without a system message gets the model's, first.
- messages: the model's history goes before the conversation (after its system messages), as Ollama puts
  it on /api/chat and on /api/generate (where `context` continues an earlier answer, without it).

Raw completions (no chat template) get the parameters only, as in Ollama; embeddings none of these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from ..protocol import shapes
from ..runners.base import LoadSpec
from .operations import ChatRequest, CompletionRequest, EmbeddingRequest
from .options import _SAMPLING, OLLAMA_DEFAULTS, map_options

Operation = ChatRequest | CompletionRequest | EmbeddingRequest

# The names other APIs give a runner sampling field, in the fields they pass through as sent
_SAME_AS: dict[str, tuple[str, ...]] = {"max_tokens": ("max_tokens", "max_completion_tokens")}


def apply_model_defaults(op: Operation, spec: LoadSpec) -> None:
    """Put the model's parameters, system prompt and history under `op` (which is changed in place)."""
    if isinstance(op, EmbeddingRequest):
        return
    if spec.parameters:
        _sampling_under(op, spec.parameters)
    if isinstance(op, ChatRequest) and (spec.system or spec.messages):
        history = () if op.context is not None else spec.messages  # an answer's context already holds it
        op.messages = with_history(op.messages, spec.system, history)


def with_history(messages: list[shapes.ChatMessage], system: str,
                 history: Iterable[Mapping[str, str]]) -> list[shapes.ChatMessage]:
    """The conversation with the model's system prompt (unless it has its own) and history before it."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") == "system":
        lead += 1
    first = list(messages[:lead]) or ([{"role": "system", "content": system}] if system else [])
    earlier = [cast(shapes.ChatMessage, {"role": m["role"], "content": m["content"]}) for m in history]
    return [*first, *earlier, *messages[lead:]]


def _sampling_under(op: ChatRequest | CompletionRequest, parameters: Mapping[str, Any]) -> None:
    mapped = cast(dict[str, Any], map_options(parameters).sampling)
    ollama_defaults = all(field in op.sampling for field in OLLAMA_DEFAULTS)  # an Ollama request's options
    sampling = cast(dict[str, Any], op.sampling)
    for name in parameters:
        field = _SAMPLING[name][0] if name in _SAMPLING else name if name == "stop" else None
        if field is None or field not in mapped:  # a load option (num_ctx, ...), or num_predict -1: no limit
            continue
        if any(key in op.passthrough for key in _SAME_AS.get(field, (field,))):
            continue
        if field in sampling and not (ollama_defaults and sampling[field] == OLLAMA_DEFAULTS.get(field)):
            continue
        sampling[field] = mapped[field]
