"""Field checks every adapter shares, so that a request is refused (400, in the called API's shape) before any
work starts, a model load included, and nothing a client sends can make the daemon or a runner fail.

- Sampling numbers against the runner protocol's ranges (protocol/limits.py), under the name the client used
  (Ollama's `repeat_penalty`, OpenAI's `repetition_penalty`).
- The OpenAI relay's bodies: mgr reads a few fields and passes the rest to the runner as sent (operations.py);
  here every field of OpenAI's and vLLM's that the runners read is type-checked and bounded: messages and their
  tool calls, stream_options, chat_template_kwargs, n, logprobs, stop, logit_bias, response_format, the prompt's
  token ids, the embedding input. Fields neither knows pass through unread, as vLLM ignores them.

Strict JSON (no NaN, Infinity or 1e400, bounded nesting) is checked before, where bodies are parsed (asgi.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import BadRequest
from ..protocol import limits

_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")  # a logit_bias key


def _label(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _is_number(value: Any) -> bool:
    """A JSON number (strict JSON has no NaN or infinities; a body built otherwise is held to it too)."""
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)


def sampling_number(name: str, value: Any, field: str) -> int | float:
    """`value` as the runner protocol's `field` takes it (an int for top_k, repeat_last_n and seed), or a 400
    that calls it `name`."""
    low, high = limits.SAMPLING_RANGES[field]
    whole = field in limits.INTEGER_FIELDS
    if not _is_number(value):
        raise BadRequest(f"{name} must be a number, got {value!r}"[:300])
    if whole and value != int(value):
        raise BadRequest(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be from {_label(low)} to {_label(high)}, got {value!r}")
    return int(value) if whole else float(value)


def whole_number(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an int from `low` to `high`; a float with nothing after the point (8.0) counts, as in JSON
    Schema (and pydantic, so vLLM)."""
    if not _is_number(value) or value != int(value) or not low <= value <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {value!r}"[:300])
    return int(value)


def max_tokens(name: str, value: Any) -> int:
    return whole_number(name, value, *limits.MAX_TOKENS_RANGE)


def check_sampling(body: dict[str, Any]) -> None:
    """The sampling fields of a runner-protocol body (OpenAI's and vLLM's names; llama-server's repeat_penalty),
    checked, and whole numbers sent as 8.0 made ints in `body` (it passes to the runner as it is)."""
    for field in limits.SAMPLING_RANGES:
        if body.get(field) is not None:
            body[field] = sampling_number(field, body[field], field)
    if body.get("repeat_penalty") is not None:
        body["repeat_penalty"] = sampling_number("repeat_penalty", body["repeat_penalty"], "repetition_penalty")
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            body[key] = max_tokens(key, body[key])
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("stop must be a string or a list of strings")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadRequest("logit_bias must be an object mapping token ids to biases")
        for token, value in bias.items():
            if not _TOKEN_ID.fullmatch(token) or not _is_number(value) \
                    or not -limits.MAX_LOGIT_BIAS <= value <= limits.MAX_LOGIT_BIAS:
                raise BadRequest(f"logit_bias maps token ids to numbers from -{_label(limits.MAX_LOGIT_BIAS)} to "
                                 f"{_label(limits.MAX_LOGIT_BIAS)}, got {token[:40]!r}: {value!r}"[:300])


# the OpenAI relay's bodies ---------------------------------------------------------------------------------
Check = Callable[[Any], Any]  # the value as passed on (a whole number sent as 8.0 becomes 8), or a 400


def _flag(key: str) -> Check:
    def check(value: Any) -> Any:
        if not isinstance(value, bool):
            raise BadRequest(f"{key} must be true or false")
        return value
    return check


def _text(key: str) -> Check:
    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise BadRequest(f"{key} must be a string")
        return value
    return check


def _object(key: str, example: str) -> Check:
    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            raise BadRequest(f"{key} must be an object, as in {example}")
        return value
    return check


def _whole(key: str, low: int, high: int) -> Check:
    def check(value: Any) -> Any:
        return whole_number(key, value, low, high)
    return check


def _stream_options(value: Any) -> Any:
    if not isinstance(value, dict):
        raise BadRequest('stream_options must be an object, as in {"include_usage": true}')
    for key in ("include_usage", "continuous_usage_stats"):
        if value.get(key) is not None and not isinstance(value[key], bool):
            raise BadRequest(f"stream_options.{key} must be true or false")
    return value


def _response_format(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest('response_format must be {"type": "text"}, {"type": "json_object"} or '
                         '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    if kind == "json_schema":
        schema = value.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("schema", {}), dict):
            raise BadRequest('response_format.json_schema must be {"name": ..., "schema": {...}}')
    return value


def _encoding_format(value: Any) -> Any:
    if value not in ("float", "base64"):
        raise BadRequest('encoding_format must be "float" or "base64"')
    return value


# Fields the engines read (OpenAI's, and vLLM's extras both runners take), by what checks them. A field that
# is null is as good as absent.
_COMMON: dict[str, Check] = {
    "stream_options": _stream_options,
    "response_format": _response_format,
    "n": _whole("n", 1, limits.MAX_CHOICES),
    "best_of": _whole("best_of", 1, limits.MAX_CHOICES),
    "user": _text("user"),
    "grammar": _text("grammar"),
    "ignore_eos": _flag("ignore_eos"),
    "return_token_ids": _flag("return_token_ids"),
    "truncate": _flag("truncate"),
    "skip_special_tokens": _flag("skip_special_tokens"),
    "include_stop_str_in_output": _flag("include_stop_str_in_output"),
}
_CHAT: dict[str, Check] = {
    **_COMMON,
    "logprobs": _flag("logprobs"),
    "top_logprobs": _whole("top_logprobs", 0, limits.MAX_TOP_LOGPROBS),
    "chat_template_kwargs": _object("chat_template_kwargs", '{"enable_thinking": false}'),
    "chat_template": _text("chat_template"),
    "add_generation_prompt": _flag("add_generation_prompt"),
    "continue_final_message": _flag("continue_final_message"),
}
_COMPLETION: dict[str, Check] = {
    **_COMMON,
    "logprobs": _whole("logprobs", 0, limits.MAX_TOP_LOGPROBS),
    "echo": _flag("echo"),
}
_EMBEDDING: dict[str, Check] = {
    "encoding_format": _encoding_format,
    "dimensions": _whole("dimensions", 1, limits.MAX_DIMENSIONS),
    "user": _text("user"),
    "truncate": _flag("truncate"),
}


def _check(body: dict[str, Any], checks: dict[str, Check]) -> None:
    for key, check in checks.items():
        if body.get(key) is not None:
            body[key] = check(body[key])


def check_chat_body(body: dict[str, Any]) -> None:
    """An OpenAI chat completions body, every field the engines read (the adapter reads model, stream, tools,
    tool_choice, parallel_tool_calls and reasoning_effort itself)."""
    check_sampling(body)
    _check(body, _CHAT)
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise BadRequest("top_logprobs needs logprobs: true")
    check_messages(body.get("messages"))


def check_completion_body(body: dict[str, Any]) -> None:
    """An OpenAI (legacy) completions body; the prompt: a string, or token ids (or a list of either)."""
    check_sampling(body)
    _check(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        return
    raise BadRequest("prompt must be a string, a non-empty list of token ids (whole numbers from 0 to "
                     f"{limits.INT32_MAX}), or a list of either")


def check_embedding_body(body: dict[str, Any]) -> None:
    """An OpenAI embeddings body; input: a string or a non-empty list of strings (or of token ids)."""
    _check(body, _EMBEDDING)
    value = body.get("input")
    if isinstance(value, str) or _token_ids(value):
        return
    if isinstance(value, list) and value and all(isinstance(i, str) or _token_ids(i) for i in value):
        return
    raise BadRequest("input must be a string or a non-empty list of strings (or of token ids)")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= limits.INT32_MAX for t in value)


def check_messages(messages: Any) -> None:
    """OpenAI chat messages, as the engines' chat templates read them: an object per message with a string role;
    content a string, null or a list of parts (each an object with a type); tool_calls a list of function calls
    (a name, and arguments as JSON text or an object); name, tool_call_id and reasoning_content strings."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise BadRequest(f"{where} must be an object with a role (a string)")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise BadRequest(f"{where}.content must be a string, null or a list of content parts")
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]")
        for key in ("name", "tool_call_id", "reasoning_content", "reasoning"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise BadRequest(f"{where}.{key} must be a string")
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise BadRequest(f"{where}.tool_calls must be a list of tool calls")
            for j, call in enumerate(calls):
                _check_call(call, f"{where}.tool_calls[{j}]")


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise BadRequest(f'{where} must be a content part: an object with a "type"')
    if part["type"] == "text" and not isinstance(part.get("text"), str):
        raise BadRequest(f"{where}: a text part needs text (a string)")
    if part["type"] == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise BadRequest(f'{where}: an image_url part needs {{"image_url": {{"url": ...}}}}')


def _check_call(call: Any, where: str) -> None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f'{where} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, (str, dict)):
        raise BadRequest(f"{where}.function.arguments must be JSON text (or an object)")
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise BadRequest(f"{where}.id must be a string")
    if call.get("type") not in (None, "function"):
        raise BadRequest(f'{where}.type must be "function"')
