"""What the daemon refuses before any work: one ASGI middleware around the whole app (the OpenAI relay paths
included), and the HTTP protocol's own limits on what uvicorn reads before the app sees a request.

In order, for each HTTP request:
1. Host (DNS rebinding): bound to a loopback address, a Host header that names something else (a page on
   evil.example.com whose name a rebinding DNS answer pointed at 127.0.0.1) gets 403. Loopback names are
   localhost (and *.localhost, which browsers never resolve elsewhere), 127.0.0.0/8 and [::1], on any port.
2. Origin: a browser sends one on every cross-origin request (and every POST). One that is not allowed gets 403,
   whatever its method or content type, so a page's `fetch(url, {mode: "no-cors", body})` with a text/plain body
   (which needs no preflight) never acts. Allowed: Ollama's defaults (http(s)://localhost, 127.0.0.1, 0.0.0.0 and
   [::1] on any port; app://, file://, tauri://, vscode-webview://, vscode-file://) plus `origins` (MGR_ORIGINS;
   `*` is a wildcard, "*" alone allows any). Allowed origins get CORS headers; their preflight (OPTIONS with
   Access-Control-Request-Method) is answered here.
3. Keys: with `api_keys` set, every request but GET / and the web console's files (GET /ui/...) carries one,
   as `Authorization: Bearer <key>` or Anthropic's `x-api-key: <key>`; 401 otherwise. A key is compared in
   constant time with every key.
4. Body size: a Content-Length past the endpoint's cap is 413 before a byte of the body is read; a chunked body
   is counted as it is read and fails with 413 when it passes the cap. The caps: `max_body_size` (64 MiB) for
   generation, embeddings, create and the OpenAI/Anthropic endpoints (images travel as base64), blob uploads the
   free space of the models' disk, `max_control_body_size` (1 MiB) for the other model endpoints.

Errors are MgrErrors drawn by api/render.py in the called API's shape. A request with none of the headers
above costs a pass over its header list and a few comparisons; an Origin's verdict is cached.

`limited_http_protocol` is uvicorn's httptools protocol with two limits uvicorn lacks: a cap on a request's line
and headers (431, with the connection closed, before they are buffered whole) and a deadline for them to arrive
(`header_timeout`: a connection that sends nothing, or headers a byte at a time, is closed).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mgr.registry.config import Settings
from mgr.registry.errors import MgrError

from .api.render import error_response


class Unauthorized(MgrError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(MgrError):
    status = 403


class BodyTooLarge(MgrError):
    status = 413

    def __init__(self, message: str) -> None:
        # the rest of the body is not read: the connection cannot carry another request
        super().__init__(message, headers={"Connection": "close"})


DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for scheme in ("http", "https") for host in ("localhost", "127.0.0.1", "0.0.0.0",
                                                                              "[::1]") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
# Generation, embeddings, create and everything under /v1: the large cap; blobs: the free disk; the rest: small
LARGE_BODY_PATHS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/create"})
BLOBS_PREFIX = "/api/blobs/"
PREFLIGHT_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
PREFLIGHT_HEADERS = b"Authorization, Content-Type, User-Agent, Accept, X-Requested-With, X-Api-Key, " \
                    b"Anthropic-Version, Anthropic-Beta, OpenAI-Beta"
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})
_CACHE_LIMIT = 1024  # verdicts kept per header value (a client sending many different values only misses)


def is_loopback_bind(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host_header(value: str) -> bool:
    """A Host header's name (any port) is localhost, *.localhost, 127.x.x.x or [::1]."""
    value = value.strip().lower()
    if value.startswith("["):
        name = value[1:].partition("]")[0]
    else:
        name = value.rpartition(":")[0] if value.count(":") == 1 else value
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_matcher(extra: tuple[str, ...]) -> Callable[[str], bool]:
    patterns = [p.strip().lower().rstrip("/") for p in (*DEFAULT_ORIGINS, *extra) if p.strip()]
    if "*" in patterns:
        return lambda _: True
    # `*` matches within one part of an origin (a port, a subdomain), never across a "/"
    regex = re.compile("|".join(re.escape(p).replace(r"\*", "[^/]*") for p in patterns))
    return lambda origin: regex.fullmatch(origin.lower()) is not None


def key_matches(given: bytes, keys: tuple[bytes, ...]) -> bool:
    """Constant time in the keys' values: compared with every key, each in full (hmac.compare_digest tells only
    whether the lengths differ)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


class Guards:
    """The ASGI middleware described above, around the daemon's app."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.check_host = is_loopback_bind(settings.bind_host)
        self.origin_allowed = origin_matcher(settings.origins)
        self.keys = tuple(key.encode() for key in settings.api_keys)
        self.max_body = settings.max_body_size
        self.max_control_body = settings.max_control_body_size
        self.models_dir = settings.models_dir
        self._hosts: dict[bytes, bool] = {}
        self._origins: dict[bytes, bool] = {}
        self._caps: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # in C: cheaper than a Python loop over them (of a repeated name, the last)
        host, origin, length = headers.get(b"host"), headers.get(b"origin"), headers.get(b"content-length")
        method, path = scope["method"], scope["path"]
        if host is not None and self.check_host and not self._hosts.get(host) and not self._host_allowed(host):
            await self._refuse(scope, receive, send, Forbidden(
                "this server answers only requests for a loopback host (localhost, 127.0.0.1, [::1]); "
                f"got Host: {host.decode('latin-1')[:100]}"))
            return
        if origin is not None:
            if not self._origin_allowed(origin):
                await self._refuse(scope, receive, send, Forbidden(
                    f"origin {origin.decode('latin-1')[:200]} is not allowed; add it to MGR_ORIGINS"))
                return
            send = _with_cors(send, origin)
            if method == "OPTIONS" and b"access-control-request-method" in headers:
                await _preflight(headers.get(b"access-control-request-headers"), send)
                return
        if self.keys and not _open_without_key(method, path) and not self._key_given(
                authorization := headers.get(b"authorization"), api_key := headers.get(b"x-api-key")):
            await self._refuse(scope, receive, send, Unauthorized(
                "missing API key: send it as Authorization: Bearer <key> (or x-api-key: <key>)"
                if authorization is None and api_key is None else "invalid API key"))
            return
        if method not in _BODYLESS:
            cap = self._caps.get(path) or self._body_cap(path)
            if length is not None:
                if length.isdigit() and int(length) > cap:
                    await self._refuse(scope, receive, send, BodyTooLarge(_too_large(path, cap)))
                    return
            else:  # chunked: counted as it arrives
                receive = _capped(receive, cap, path)
        await self.app(scope, receive, send)

    def _host_allowed(self, host: bytes) -> bool:
        verdict = self._hosts.get(host)
        if verdict is None:
            verdict = is_loopback_host_header(host.decode("latin-1"))
            if len(self._hosts) < _CACHE_LIMIT:
                self._hosts[host] = verdict
        return verdict

    def _origin_allowed(self, origin: bytes) -> bool:
        verdict = self._origins.get(origin)
        if verdict is None:
            verdict = self.origin_allowed(origin.decode("latin-1"))
            if len(self._origins) < _CACHE_LIMIT:
                self._origins[origin] = verdict
        return verdict

    def _key_given(self, authorization: bytes | None, api_key: bytes | None) -> bool:
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer" and key_matches(token.strip(), self.keys):
                return True
        return api_key is not None and key_matches(api_key.strip(), self.keys)

    def _body_cap(self, path: str) -> int:
        if path.startswith(BLOBS_PREFIX):  # never cached: the disk's free space changes
            try:
                return shutil.disk_usage(self.models_dir).free
            except OSError:  # no models folder yet: the store makes it, and the disk answers for itself
                return shutil.disk_usage(_existing_parent(self.models_dir)).free
        cap = self.max_body if path.startswith("/v1/") or path in LARGE_BODY_PATHS else self.max_control_body
        if len(self._caps) < _CACHE_LIMIT:
            self._caps[path] = cap
        return cap

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: MgrError) -> None:
        await error_response(scope["method"], scope["path"], error)(scope, receive, send)


def _open_without_key(method: str, path: str) -> bool:
    """GET / (is the daemon running) and the web console's static files (api/ui.py: nothing secret; the page
    asks for the key, then sends it with every API call)."""
    return method in ("GET", "HEAD") and (path == "/" or path == "/ui" or path.startswith("/ui/"))


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _too_large(path: str, cap: int) -> str:
    if path.startswith(BLOBS_PREFIX):
        return f"the blob is larger than the free space on the models' disk ({cap} bytes)"
    large = path.startswith("/v1/") or path in LARGE_BODY_PATHS
    setting = "MGR_MAX_BODY_SIZE" if large else "MGR_MAX_CONTROL_BODY_SIZE"
    return f"request body too large: at most {cap} bytes for {path} ({setting})"


def _capped(receive: Receive, cap: int, path: str) -> Receive:
    read = 0

    async def capped_receive() -> Message:
        nonlocal read
        message = await receive()
        read += len(message.get("body", b""))
        if read > cap:
            raise BodyTooLarge(_too_large(path, cap))
        return message

    return capped_receive


def _with_cors(send: Send, origin: bytes) -> Send:
    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"access-control-allow-origin", origin),
                                  (b"vary", b"Origin")]
        await send(message)

    return send_with_cors


async def _preflight(asked: bytes | None, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-methods", PREFLIGHT_METHODS),
        # an allowed origin may send whatever headers it asks for; keys still decide what it may do
        (b"access-control-allow-headers", asked if asked is not None else PREFLIGHT_HEADERS),
        (b"access-control-max-age", b"86400"),
    ]})
    await send({"type": "http.response.body", "body": b""})


def limited_http_protocol(max_header_size: int, header_timeout: float) -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol with the header cap (431) and the header deadline; None where httptools is
    missing (uvicorn's h11 then caps headers with h11_max_incomplete_event_size, answering 400)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        """Counts the bytes of each request's line and headers as they arrive, and times them."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head_bytes = 0
            self.head_tail = b""  # the last bytes of the head so far: its end can straddle two reads
            self.reading_head = True
            self.head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.reading_head:
                # the head's size up to its blank line (the body may come in the same read), before parsing
                seen = self.head_tail + data
                end = seen.find(b"\r\n\r\n")
                self.head_bytes += end + 4 - len(self.head_tail) if end >= 0 else len(data)
                if self.head_bytes > max_header_size:
                    self._stop_deadline()
                    self._refuse_head()
                    return
                self.head_tail = seen[-3:]
                if self.head_deadline is None:  # the next request on a kept-alive connection begins
                    self._start_deadline()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.reading_head = False
            self._stop_deadline()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.reading_head, self.head_bytes, self.head_tail = True, 0, b""

        def _start_deadline(self) -> None:
            self.head_deadline = self.loop.call_later(header_timeout, self._head_too_slow)

        def _stop_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _head_too_slow(self) -> None:
            self.head_deadline = None
            if self.reading_head and not self.transport.is_closing():
                self.transport.close()

        def _refuse_head(self) -> None:
            body = (b'{"error": "request headers too large: at most %d bytes (MGR_MAX_HEADER_SIZE)"}'
                    % max_header_size)
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return LimitedHttpToolsProtocol
