"""How an error looks to the client, decided once for every API: the status and headers an `MgrError`
carries (anything else is a 500 and is logged), and the body in the shape of the API that was called
(Ollama: {"error": "..."}; OpenAI: protocol/errors.openai_error_body; Anthropic, under /v1/messages:
{"type": "error", "error": {"type", "message"}}). Used by the app's exception handler, by the OpenAI relay,
which answers outside the router, and by the Anthropic stream for an error after its 200."""

from __future__ import annotations

import logging
import secrets

from starlette.responses import JSONResponse

from mgr.registry.errors import MgrError
from mgr.registry.store import ModelNotFound

from ..errors import ClientGone, QueueFull
from ..protocol.errors import openai_error_body
from .anthropic_shapes import MESSAGES_PATH, ErrorType
from .anthropic_shapes import ErrorBody as AnthropicErrorBody

log = logging.getLogger("mgr.daemon")

# Anthropic's error types by HTTP status (its SDKs map the status back to exception classes)
_ANTHROPIC_TYPES: dict[int, ErrorType] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
    529: "overloaded_error"}


def status_and_message(exc: Exception) -> tuple[int, str, dict[str, str]]:
    if isinstance(exc, MgrError):
        return exc.status, exc.message, exc.headers
    return 500, internal_error(exc), {}


def internal_error(exc: BaseException) -> str:
    """What a client is told of a failure mgr did not expect: "internal error" and a short id; the log has
    the id with the traceback. Never the exception's text, which can hold paths, data or code."""
    incident = secrets.token_hex(4)
    log.error("internal error %s", incident, exc_info=exc)
    return f"internal error (id {incident}: the daemon's log has the details)"


def error_response(method: str, path: str, exc: Exception) -> JSONResponse:
    status, message, headers = status_and_message(exc)
    if isinstance(exc, ClientGone):
        log.info("499 %s %s: %s", method, path, message)
    if path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/"):
        status = anthropic_status(exc, status)
        return JSONResponse(anthropic_error_body(message, status), status, headers=headers)
    if path.startswith("/v1/"):
        code = "model_not_found" if isinstance(exc, ModelNotFound) else None
        return JSONResponse(openai_error_body(message, status, code=code), status, headers=headers)
    return JSONResponse({"error": message}, status, headers=headers)


def anthropic_status(exc: Exception, status: int) -> int:
    """A full queue is Anthropic's 529 overloaded_error, which its SDKs and Claude Code back off and retry on
    (with our Retry-After); every other status is the error's own."""
    return 529 if isinstance(exc, QueueFull) else status


def anthropic_error_body(message: str, status: int) -> AnthropicErrorBody:
    kind = _ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_stream_error(exc: Exception) -> AnthropicErrorBody:
    """The body of the `error` event that ends an Anthropic stream after its 200 went out."""
    status, message, _ = status_and_message(exc)
    return anthropic_error_body(message, anthropic_status(exc, status))
