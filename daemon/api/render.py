"""How an error looks to the client: the status it carries, and the body in the shape of the API that was
called (Ollama: {"error": "..."}; OpenAI: {"error": {"message", "type", "param", "code"}}). Used by the
app's exception handlers and by the OpenAI relay, which answers outside the router."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from mgr.registry.inspect import InvalidModel
from mgr.registry.names import InvalidName
from mgr.registry.store import ModelNotFound

from ..errors import ApiError, ClientGone

log = logging.getLogger("mgr.daemon")


def status_and_message(exc: Exception) -> tuple[int, str, dict[str, str]]:
    if isinstance(exc, ApiError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, ModelNotFound):
        return 404, str(exc), {}
    if isinstance(exc, (InvalidName, InvalidModel)):
        return 400, str(exc), {}
    log.exception("unexpected error", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}", {}


def openai_error_body(message: str, status: int) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            503: "server_busy"}.get(status, "server_error")
    code = "model_not_found" if status == 404 else status
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(method: str, path: str, exc: Exception) -> JSONResponse:
    status, message, headers = status_and_message(exc)
    if isinstance(exc, ClientGone):
        log.info("499 %s %s: %s", method, path, message)
    if path.startswith("/v1/"):
        return JSONResponse(openai_error_body(message, status), status, headers=headers)
    return JSONResponse({"error": message}, status, headers=headers)
