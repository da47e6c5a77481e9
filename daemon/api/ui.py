"""The web console: the static page in daemon/ui (GET /ui, /ui/{file}), the catalog's short names it suggests
(/ui/catalog.json), and what the page needs that the Ollama API lacks: a runner's log, tailed (GET /api/logs).

The page is plain files (no build step), served with their content type, an ETag and `Cache-Control: no-cache`
(the browser keeps them and asks again with If-None-Match: an upgraded daemon is never shown with old files),
and a Content-Security-Policy that allows nothing from another origin. Those files and the catalog's names hold
nothing secret, so the guards let a browser fetch them without an API key (the page asks for the key and sends
it with every API call); /api/logs is guarded like every other API path.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mgr.registry.catalog import default_catalog
from mgr.registry.errors import MgrError

from ..errors import BadRequest
from ..runners.base import runner_log_path
from ..scheduler import Scheduler
from .openapi import no_route
from .operations import required_str

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # the folder is flat: no "/" and no "..", ever
# Everything from the daemon itself; styles only from style.css (a script may still set element.style);
# images the user attaches are shown as blob:/data: URLs; no frame may hold the page (clickjacking).
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
_STATIC_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                   "Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer",
                   "X-Frame-Options": "DENY"}
LOG_TAIL_BYTES = 256 * 1024  # the most a log's first answer reads back
MAX_LOG_LINES = 5000
LOG_POLL_SECONDS = 0.5


class NoRunnerLog(MgrError):
    status = 404


class WebConsole:
    def __init__(self, scheduler: Scheduler, ui_dir: Path = UI_DIR) -> None:
        self.scheduler = scheduler
        self.ui_dir = ui_dir

    def routes(self) -> list[Route]:
        return [
            Route("/ui", self.page, methods=["GET", "HEAD"]),
            Route("/ui/catalog.json", self.catalog, methods=["GET", "HEAD"]),
            Route("/ui/{name}", self.page, methods=["GET", "HEAD"]),
            Route("/api/logs", self.logs, methods=["GET"]),
        ]

    async def page(self, request: Request) -> Response:
        """index.html at /ui and /ui/, any other file of the folder by its name."""
        name = request.path_params.get("name") or "index.html"
        path = self.ui_dir / name
        if not _FILE_NAME.fullmatch(name) or not await asyncio.to_thread(path.is_file):
            raise no_route(request.method, request.url.path, 404)
        body = await asyncio.to_thread(path.read_bytes)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {**_STATIC_HEADERS, "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        media_type = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return Response(body if request.method == "GET" else b"", headers=headers, media_type=media_type)

    async def catalog(self, _: Request) -> Response:
        """The catalog's short names, for the page's suggestions: each with its formats, and the families'
        default sizes."""
        catalog = default_catalog()
        return JSONResponse({
            "models": [{"name": name, "formats": sorted(entry.repos)}
                       for name, entry in sorted(catalog.entries.items())],
            "latest": catalog.latest,
        }, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def logs(self, request: Request) -> Response:
        """GET /api/logs?model=NAME[&lines=N][&follow=true]: the last N lines (200) of the model's runner log as
        text; with follow, the stream stays open and sends what the runner writes next, until the client
        leaves or the daemon shuts down. 404 for a model the store lacks or that never ran."""
        model = required_str(dict(request.query_params), "model")
        lines = _lines(request.query_params.get("lines", "200"))
        follow = request.query_params.get("follow", "false").lower() in ("1", "true", "yes")
        spec = await asyncio.to_thread(self.scheduler.spec_for, model)  # ModelNotFound: 404
        shared = self.scheduler.find(spec)  # an alias's runner is the one that loaded its files, with its log
        path = runner_log_path(self.scheduler.settings.runner_log_dir, shared.spec if shared is not None else spec)
        if not await asyncio.to_thread(path.is_file):
            raise NoRunnerLog(f'model "{spec.name}" has no runner log: it has not been loaded here yet')
        tail, position = await asyncio.to_thread(_tail, path, lines)
        return StreamingResponse(self._follow(path, tail, position) if follow else _once(tail),
                                 media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    async def _follow(self, path: Path, tail: bytes, position: int) -> AsyncIterator[bytes]:
        yield tail
        while not self.scheduler.closed:  # a drain ends the stream, so it never holds the shutdown up
            await asyncio.sleep(LOG_POLL_SECONDS)
            more, position = await asyncio.to_thread(_read_from, path, position)
            if more:
                yield more


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _lines(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_LOG_LINES:
        raise BadRequest(f"lines must be a whole number from 1 to {MAX_LOG_LINES}, got {text[:40]!r}")
    return int(text)


def _tail(path: Path, lines: int) -> tuple[bytes, int]:
    """The last `lines` whole lines (from at most LOG_TAIL_BYTES back), and where the file ends."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        start = max(0, end - LOG_TAIL_BYTES)
        f.seek(start)
        data = f.read(end - start)
    if start:  # the first line read is cut
        data = data[data.find(b"\n") + 1:]
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept), end


def _read_from(path: Path, position: int) -> tuple[bytes, int]:
    """What was written after `position` (from the start again if the file was replaced by a shorter one)."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end < position:
                position = 0
            f.seek(position)
            data = f.read(min(end - position, LOG_TAIL_BYTES))
    except OSError:
        return b"", position
    return data, position + len(data)
