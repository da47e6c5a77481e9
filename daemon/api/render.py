"""How an error looks to the client, decided once for every API: the status and headers an `MgrError`
carries (anything else is a 500 and is logged), and the body in the shape of the API that was called
(Ollama: {"error": "..."}; OpenAI: protocol/errors.openai_error_body). Used by the app's exception handler
and by the OpenAI relay, which answers outside the router."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from mgr.registry.errors import MgrError
from mgr.registry.store import ModelNotFound

from ..errors import ClientGone
from ..protocol.errors import openai_error_body

log = logging.getLogger("mgr.daemon")


def status_and_message(exc: Exception) -> tuple[int, str, dict[str, str]]:
    if isinstance(exc, MgrError):
        return exc.status, exc.message, exc.headers
    log.exception("unexpected error", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}", {}


def error_response(method: str, path: str, exc: Exception) -> JSONResponse:
    status, message, headers = status_and_message(exc)
    if isinstance(exc, ClientGone):
        log.info("499 %s %s: %s", method, path, message)
    if path.startswith("/v1/"):
        code = "model_not_found" if isinstance(exc, ModelNotFound) else None
        return JSONResponse(openai_error_body(message, status, code=code), status, headers=headers)
    return JSONResponse({"error": message}, status, headers=headers)
