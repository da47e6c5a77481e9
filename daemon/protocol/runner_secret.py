"""The per-runner secret: a runner's port is on loopback, where any local process could reach it and so skip the
daemon's queue, its caps and its keys. The daemon makes a random secret for each runner it starts and hands it
over in the runner's environment (never on the command line, which `ps` shows to every user); the runner refuses
any request without `Authorization: Bearer <secret>` but its health check. vLLM gets the same secret as its own
VLLM_API_KEY (checked on its /v1 routes). A runner started without one (tests/serving.py) checks nothing.

Stdlib only (a protocol leaf, imported by runner processes too).
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import openai_error_body
from .shapes import HEALTH_PATH

RUNNER_SECRET_ENV = "MGR_RUNNER_SECRET"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def bearer(secret: str) -> str:
    """The Authorization header's value for `secret`."""
    return f"Bearer {secret}"


class RequireSecret:
    """ASGI middleware of a runner: every HTTP request but GET /health must carry the runner's secret."""

    def __init__(self, app: Asgi, secret: str) -> None:
        self.app = app
        self.expected = bearer(secret).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != HEALTH_PATH:
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                body = openai_error_body("this runner answers only the mgr daemon that started it", 401)
                await _send_json(send, 401, body)
                return
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
