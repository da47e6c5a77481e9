"""Ollama's request options, checked and mapped onto the runners' OpenAI/vLLM sampling fields.

Unknown keys are ignored (LangChain sends mirostat, tfs_z, ...); a known key of the wrong type is a 400.
num_ctx changes how a model is loaded, so it goes to the scheduler, not to the runner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from mgr.registry.config import ConfigError, parse_duration

from ..errors import BadRequest
from ..protocol.shapes import ResponseFormat, SamplingFields

# Ollama's defaults (api/types.go DefaultOptions), applied because the runners default to OpenAI's.
OLLAMA_DEFAULTS: SamplingFields = {
    "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0,
    "repetition_penalty": 1.1, "repeat_last_n": 64,
}

# Ollama option -> (runner field, type)
_SAMPLING: dict[str, tuple[str, type[int] | type[float]]] = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "typical_p": ("typical_p", float),
    "repeat_penalty": ("repetition_penalty", float),
    "repeat_last_n": ("repeat_last_n", int),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", int),
    "num_predict": ("max_tokens", int),
}
_LOAD: dict[str, type[int] | type[float]] = {"num_ctx": int, "num_gpu": int, "num_thread": int, "num_batch": int}


@dataclasses.dataclass
class MappedOptions:
    sampling: SamplingFields
    num_ctx: int | None


def _number(key: str, value: Any, kind: type[int] | type[float]) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"option {key!r} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise BadRequest(f"option {key!r} must be a whole number, got {value!r}")
    return kind(value)


def map_options(options: Any) -> MappedOptions:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("options must be a JSON object")
    sampling: dict[str, Any] = dict(OLLAMA_DEFAULTS)
    for key, value in options.items():
        if value is None:
            continue
        if key in _SAMPLING:
            field, kind = _SAMPLING[key]
            sampling[field] = _number(key, value, kind)
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise BadRequest("option 'stop' must be a string or a list of strings")
            sampling["stop"] = value
        elif key in _LOAD:
            _number(key, value, _LOAD[key])
    if "max_tokens" in sampling and sampling["max_tokens"] < 0:
        del sampling["max_tokens"]  # -1 = no limit, -2 = fill the context: both mean "until the end"
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and int(num_ctx) < 1:
        raise BadRequest("option 'num_ctx' must be positive")
    return MappedOptions(cast(SamplingFields, sampling), int(num_ctx) if num_ctx is not None else None)


def map_format(fmt: Any) -> ResponseFormat | None:
    """Ollama's `format` ("json" or a JSON schema) as OpenAI's response_format."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise BadRequest('format must be "json" or a JSON schema object')


def parse_keep_alive(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ConfigError:
        raise BadRequest(f"keep_alive must be a duration such as 5m, 1h or a number of seconds, got {value!r}") \
            from None
