"""The one builder of OpenAI-shaped error bodies: the daemon's OpenAI API, its relay and the llama.cpp runner
all answer errors through `openai_error_body`, and read a runner's error through `error_message`."""

from __future__ import annotations

import json

from .shapes import ErrorBody

# OpenAI's error types by HTTP status (what its SDKs map back to exception classes).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "server_busy"}


def openai_error_body(message: str, status: int, *, code: str | int | None = None,
                      param: str | None = None) -> ErrorBody:
    """{"error": {"message", "type", "param", "code"}}; `code` defaults to the HTTP status, as vLLM sends it."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status if code is None else code}}


def error_message(raw: bytes) -> str:
    """The message of an error body a runner sent (ours, vLLM's, or anything else it might say)."""
    try:
        error = json.loads(raw).get("error")
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return raw.decode("utf-8", errors="replace")[:500] or "the model runner failed"
