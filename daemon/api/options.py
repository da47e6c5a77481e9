"""Ollama's request options, checked and mapped onto the runners' OpenAI/vLLM sampling fields.

Unknown keys are ignored (LangChain sends mirostat, tfs_z, ...); a known key of the wrong type is a 400.
num_ctx changes how a model is loaded, so it goes to the scheduler, not to the runner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from mgr.registry.config import MAX_DURATION_SECONDS, ConfigError, parse_duration

from ..errors import BadRequest
from ..protocol.limits import INT32_MAX
from ..protocol.shapes import ResponseFormat, SamplingFields
from . import fields

# Ollama's defaults (api/types.go DefaultOptions), applied because the runners default to OpenAI's.
OLLAMA_DEFAULTS: SamplingFields = {
    "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0,
    "repetition_penalty": 1.1, "repeat_last_n": 64,
}

# Ollama option -> (runner field, type); each checked against its range (protocol/limits.py)
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
    "num_predict": ("max_tokens", int),  # -1: no limit, -2: fill the context
}
# How a model loads: (lowest, highest); -1 is Ollama's "automatic" for the others
_LOAD: dict[str, tuple[int, int]] = {"num_ctx": (1, INT32_MAX), "num_gpu": (-1, INT32_MAX),
                                     "num_thread": (-1, INT32_MAX), "num_batch": (-1, INT32_MAX)}


@dataclasses.dataclass
class MappedOptions:
    sampling: SamplingFields
    num_ctx: int | None


def map_options(options: Any) -> MappedOptions:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("options must be a JSON object")
    sampling: dict[str, Any] = dict(OLLAMA_DEFAULTS)
    for key, value in options.items():
        if value is None:
            continue
        if key == "num_predict":
            sampling["max_tokens"] = fields.whole_number("option 'num_predict'", value, -2, INT32_MAX)
        elif key in _SAMPLING:
            field = _SAMPLING[key][0]
            sampling[field] = fields.sampling_number(f"option {key!r}", value, field)
        elif key == "ignore_eos":  # vLLM's and llama-server's: every answer as long as num_predict (mgr bench)
            if not isinstance(value, bool):
                raise BadRequest("option 'ignore_eos' must be true or false")
            sampling["ignore_eos"] = value
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise BadRequest("option 'stop' must be a string or a list of strings")
            sampling["stop"] = value
        elif key in _LOAD:
            fields.whole_number(f"option {key!r}", value, *_LOAD[key])
    if "max_tokens" in sampling and sampling["max_tokens"] < 0:
        del sampling["max_tokens"]  # -1 = no limit, -2 = fill the context: both mean "until the end"
    num_ctx = options.get("num_ctx")
    return MappedOptions(cast(SamplingFields, sampling), int(num_ctx) if num_ctx is not None else None)


def context_option(body: dict[str, Any]) -> int | None:
    """num_ctx in an OpenAI body, top-level or in Ollama's `options` (what apps that speak the OpenAI API can
    set): for the scheduler, as the Ollama API's options.num_ctx is. The other options keys are Ollama's and
    mean nothing to the OpenAI API: they are ignored, as Ollama ignores options it does not know."""
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("options must be a JSON object")
    value = body.get("num_ctx")
    if value is None and options:
        value = options.get("num_ctx")
    if value is None:
        return None
    return fields.whole_number("num_ctx", value, 1, INT32_MAX)


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
    """Seconds; negative = forever (Ollama's -1), and so is the longest duration there is or anything past it
    (parse_duration clamps 1e308 to it); NaN, a non-number and a non-duration are a 400."""
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise BadRequest(f"keep_alive must be a duration such as 5m, 1h or a number of seconds, got {value!r}")
    try:
        seconds = parse_duration(value)
    except ConfigError:
        raise BadRequest(f"keep_alive must be a duration such as 5m, 1h or a number of seconds, got {value!r}") \
            from None
    return -1.0 if seconds >= MAX_DURATION_SECONDS else seconds
