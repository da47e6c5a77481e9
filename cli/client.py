"""A tiny HTTP client for the mgr daemon, on the stdlib only.

The CLI must start in milliseconds, so it cannot import httpx; `http.client` is enough for a JSON API on
localhost. Every call opens its own connection: the CLI makes a handful of requests per invocation, and a
fresh connection per stream means that closing it (Ctrl+C during an answer) cancels exactly that request.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Connecting to localhost either works at once or not at all; a short limit turns a wrong MGR_HOST into an
# error instead of a hang. A control call (list, ps, show, ...) gets CONTROL_TIMEOUT for its answer. Calls that
# may wait minutes for a load, a pull or an upload have no read limit; they first ask GET /api/version with
# CONTROL_TIMEOUT, so a daemon that accepts connections but never answers is an error, not a hang.
CONNECT_TIMEOUT = 10.0
CONTROL_TIMEOUT = 30.0
UPLOAD_BLOCK = 1 << 20
API_KEY_ENV = "MGR_API_KEY"  # one of the daemon's keys (its MGR_API_KEYS), sent with every request


class DaemonUnreachable(Exception):
    """Nothing answers at the base URL (the daemon is not running, or MGR_HOST points elsewhere)."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(f"could not connect to mgr at {base_url}: {reason}")
        self.base_url = base_url
        self.reason = reason


class APIError(Exception):
    """The daemon answered with an error: an HTTP status >= 400, or an `{"error": ...}` line in a stream."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ConnectionLost(APIError):
    """The connection broke after it was made (the daemon stopped or crashed mid-request)."""


class DaemonTimeout(ConnectionLost):
    """The daemon accepted the connection but did not answer in time (stuck, or not mgr)."""


class Client:
    """Requests against one daemon, e.g. `Client("http://127.0.0.1:11434")`."""

    def __init__(self, base_url: str, timeout: float = CONTROL_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "") or not parts.hostname:
            raise ValueError(f"unsupported base URL {base_url!r}; expected http://host:port")
        self._host = parts.hostname
        self._port = parts.port or 80
        key = os.environ.get(API_KEY_ENV, "").strip()
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}

    # -- public calls ---------------------------------------------------------------------------------------

    def request_json(self, method: str, path: str, body: Any = None, wait: bool = False) -> dict[str, Any]:
        """Send `body` as JSON (None = no body) and return the decoded JSON answer ({} for an empty one).
        `wait`: the answer may take minutes (a load); otherwise it must come within the client's timeout."""
        conn, response = self._send(method, path, body, wait)
        try:
            with self._guard():
                data = response.read()
        finally:
            conn.close()
        if not data.strip():
            return {}
        try:
            decoded = json.loads(data)
        except ValueError:
            raise APIError(f"the daemon sent a non-JSON answer to {method} {path}", response.status) from None
        return decoded if isinstance(decoded, dict) else {"value": decoded}

    def stream_ndjson(self, method: str, path: str, body: Any = None) -> Generator[dict[str, Any], None, None]:
        """Yield each JSON object of an NDJSON answer as soon as its line arrives.

        An `{"error": ...}` line raises APIError after the lines before it were yielded. Closing the generator
        (or an exception in the consumer, such as KeyboardInterrupt) closes the connection, which tells the
        daemon to stop generating.
        """
        conn, response = self._send(method, path, body, wait=True)
        try:
            while True:
                with self._guard():
                    line = response.readline()
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    raise APIError(f"the daemon sent a line that is not JSON: {line[:200]!r}") from None
                if not isinstance(item, dict):
                    continue
                if item.get("error"):
                    raise APIError(str(item["error"]), response.status)
                yield item
        finally:
            conn.close()

    def head(self, path: str) -> int:
        """The HTTP status of a HEAD request (no error for 4xx: callers ask "do you have it?")."""
        conn = self._connect(self.timeout)
        try:
            with self._guard():
                conn.request("HEAD", path, headers=self._auth)
                response = conn.getresponse()
                response.read()
            return response.status
        finally:
            conn.close()

    def upload(self, path: str, file_path: Path | str, progress: Callable[[int], None] | None = None) -> int:
        """POST the raw bytes of `file_path` in 1 MiB blocks with a Content-Length (not chunked: the daemon can
        then check the size before reading). Returns the status; raises APIError on >= 400."""
        file_path = Path(file_path)
        size = file_path.stat().st_size
        with file_path.open("rb") as f:  # outside the guard: a file error is not a connection error
            self.ping()
            conn = self._connect(None)
            try:
                with self._guard():
                    conn.putrequest("POST", path)
                    conn.putheader("Content-Type", "application/octet-stream")
                    conn.putheader("Content-Length", str(size))
                    for name, value in self._auth.items():
                        conn.putheader(name, value)
                    conn.endheaders()
                    try:
                        sent = 0
                        while block := f.read(UPLOAD_BLOCK):
                            conn.send(block)
                            sent += len(block)
                            if progress is not None:
                                progress(sent)
                    except OSError:
                        # The daemon may answer early (a 4xx) and close its end; its answer says more than
                        # "broken pipe", so read it. With no answer to read, the guard reports the lost connection.
                        pass
                    response = conn.getresponse()
                    data = response.read()
            finally:
                conn.close()
        if response.status >= 400:
            raise APIError(_error_message(data, response), response.status)
        return response.status

    # -- plumbing -------------------------------------------------------------------------------------------

    def ping(self) -> None:
        """GET /api/version within the timeout: the daemon answers (raises DaemonTimeout otherwise)."""
        conn, response = self._send("GET", "/api/version", None, wait=False)
        try:
            with self._guard():
                response.read()
        finally:
            conn.close()

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise DaemonUnreachable(self.base_url, e.strerror or str(e)) from None
        assert conn.sock is not None
        conn.sock.settimeout(timeout)  # None: reads wait as long as the model needs (see CONTROL_TIMEOUT)
        return conn

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn a broken connection into ConnectionLost, so that only the CLI's own output raises OSError."""
        try:
            yield
        except TimeoutError:
            raise DaemonTimeout(
                f"mgr at {self.base_url} accepted the connection but did not answer within {self.timeout:.0f}s; "
                "it may be stuck: see `mgr status`, restart it (`mgr stop-server`, then `mgr serve --detach`), "
                "or check that MGR_HOST points at mgr") from None
        except (http.client.HTTPException, OSError) as e:
            reason = f"{e.__class__.__name__}: {e}"
            raise ConnectionLost(f"lost the connection to mgr at {self.base_url} ({reason})") from None

    def _send(self, method: str, path: str, body: Any,
              wait: bool) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a JSON request; return the open connection and a response whose status is < 400. With `wait`,
        the daemon is pinged first and the answer then has no time limit."""
        if wait:
            self.ping()
        conn = self._connect(None if wait else self.timeout)
        try:
            headers = {"Accept": "application/json, application/x-ndjson", **self._auth}
            payload = None
            if body is not None:
                payload = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            with self._guard():
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                error_body = response.read() if response.status >= 400 else b""
            if response.status >= 400:
                raise APIError(_error_message(error_body, response), response.status)
            return conn, response
        except BaseException:
            conn.close()
            raise


def _error_message(data: bytes, response: http.client.HTTPResponse) -> str:
    """The daemon's `{"error": "..."}` text, or the status line when the body is something else."""
    try:
        decoded = json.loads(data)
        if isinstance(decoded, dict) and decoded.get("error"):
            if response.status == 401:  # the daemon has keys: say where the CLI takes one from
                return f"{decoded['error']} (the daemon needs an API key: set {API_KEY_ENV})"
            return str(decoded["error"])
    except ValueError:
        pass
    text = data.decode(errors="replace").strip()
    return text[:500] if text else f"{response.status} {response.reason}"
