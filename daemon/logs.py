"""The daemon's logs: one stream on stderr (journald takes it as is under systemd), as text or JSON lines, and
the access log: one line per request with its model, API, status, tokens and durations.

`MGR_DEBUG=1` logs at DEBUG (mgr's own loggers; httpx and the other libraries stay at WARNING);
`MGR_LOG_FORMAT=json` writes one JSON object per line (time, level, logger, message, and for an access line
its fields under "request").
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .tracing import Traces

access_log = logging.getLogger("mgr.access")
log = logging.getLogger("mgr.daemon")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        request = getattr(record, "request", None)
        if request is not None:
            line["request"] = request
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(debug: bool, log_format: str) -> None:
    """Set up the one handler on the root logger; uvicorn's loggers (given no config of their own) reach it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("mgr", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # the access log is mgr's own


def api_of(path: str) -> str:
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/responses"):
        return "responses"
    if path.startswith("/v1/"):
        return "openai"
    return "mgr"


class AccessLog:
    """ASGI middleware around the whole app: a RequestRecord per HTTP request (metrics.current() while it is
    answered), then its counter and its access-log line once the last byte has gone (or the client left)."""

    def __init__(self, app: ASGIApp, endpoint_of: Callable[[str], str], traces: Traces | None = None) -> None:
        self.app = app
        self.endpoint_of = endpoint_of  # path -> a bounded label: the route's template, or "other"
        self.traces = traces  # OpenTelemetry, when configured (tracing.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = metrics.RequestRecord(scope["method"], scope["path"])
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if access_log.isEnabledFor(logging.DEBUG):  # MGR_DEBUG: a request that never ends is seen too
            access_log.debug("%s %s begins", record.method, record.path)
        token = metrics.begin_request(record)
        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.end_request(token)
            self._done(record, status or 499)  # nothing sent: the client left first (nginx's 499)

    def _done(self, record: metrics.RequestRecord, status: int) -> None:
        seconds = time.perf_counter() - record.started
        endpoint = self.endpoint_of(record.path)
        metrics.request_done(record, endpoint, status, seconds)
        if self.traces is not None:
            try:
                self.traces.request(record, endpoint, status, api_of(record.path), seconds)
            except Exception:  # a tracing fault never fails a request
                log.debug("could not trace %s %s", record.method, record.path, exc_info=True)
        if endpoint == "/metrics" and status == 200 and not access_log.isEnabledFor(logging.DEBUG):
            return  # a scrape every few seconds would drown the requests
        fields: dict[str, Any] = {
            "method": record.method, "path": record.path, "status": status, "api": api_of(record.path),
            "model": record.model, "duration_ms": round(seconds * 1000, 1),
        }
        if record.queue_seconds:
            fields["queue_ms"] = round(record.queue_seconds * 1000, 1)
        if record.load_seconds:
            fields["load_ms"] = round(record.load_seconds * 1000, 1)
        if record.first_token_seconds is not None:
            fields["ttft_ms"] = round(record.first_token_seconds * 1000, 1)
        if record.prompt_tokens or record.completion_tokens:
            fields["prompt_tokens"] = record.prompt_tokens
            fields["completion_tokens"] = record.completion_tokens
        text = " ".join(f"{key}={value}" for key, value in fields.items()
                        if key not in ("method", "path", "status") and value != "")
        access_log.info("%s %s %d %s", record.method, record.path, status, text, extra={"request": fields})


class Endpoints:
    """A request path -> its endpoint label: the route's own path ("/v1/models/{model}" for any model), or
    "other" for a path no route has, so that the label's values stay a fixed set."""

    def __init__(self, paths: list[str], templates: list[tuple[re.Pattern[str], str]]) -> None:
        self.paths = frozenset(paths)
        self.templates = templates

    def __call__(self, path: str) -> str:
        if path in self.paths:
            return path
        return next((template for pattern, template in self.templates if pattern.match(path)), "other")

    @classmethod
    def of(cls, routes: list[BaseRoute], relay_paths: list[str]) -> Endpoints:
        paths = list(relay_paths)
        templates: list[tuple[re.Pattern[str], str]] = []
        for route in routes:
            if isinstance(route, Route):
                if "{" in route.path:
                    templates.append((route.path_regex, route.path))
                else:
                    paths.append(route.path)
        return cls(paths, templates)
