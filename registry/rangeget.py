"""A small blocking HTTP/1.1 client for the byte transfer of pulls: GET (a Range of) a file, read its body
straight into the caller's buffer.

Why not httpx: it reads a body 64 KiB at a time through httpcore, anyio and h11, some 16,000 trips through
Python per GiB, and at loopback or LAN speed those, not the network, bounded a pull. Here a worker thread
receives a whole buffer (1 MiB) per call: on plain TCP one recv with MSG_WAITALL, with the GIL released while
the kernel copies. Listing and everything else stay on httpx / huggingface_hub.

Only what fetching a file needs: GET with the caller's headers; redirects (the hubs send LFS files to a CDN;
like httpx, Authorization is not sent on to another origin); bodies framed by Content-Length or by the end of
the connection; keep-alive; TLS verified against the CA bundle httpx would use. No proxies, no chunked bodies:
`Unsupported` tells the caller to use httpx for that file.

Timeouts: `connect_timeout` per connection attempt; `read_timeout` is a stall timeout, no byte for that long.
On TLS it is exact (the ssl module polls before each read). On plain TCP the kernel's SO_RCVTIMEO bounds each
whole 1 MiB recv instead, so a stall is noticed after one to two timeouts. Every blocking step except the DNS
lookup can be interrupted from another thread with `Abort.abort()`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

MAX_HEAD = 64 << 10  # status line and headers; more is not a file server
MAX_REDIRECTS = 10
MAX_DRAINED = 64 << 10  # a redirect's body up to this size is read off so that its connection can be reused
IDLE_TIMEOUT = 30.0  # seconds a pooled connection may sit unused; servers close idle ones at about this age
MAX_IDLE_PER_ORIGIN = 16
_REDIRECT_STATUS = {301, 302, 303, 307, 308}


class TransportError(Exception):
    """The connection failed or timed out, or the server broke HTTP: worth another attempt."""


class Unsupported(Exception):
    """The response needs what this client does not do (a chunked body): fetch that file with httpx."""


class Aborted(Exception):
    """`Abort.abort()` was called while the request ran."""


class Abort:
    """Lets the event loop stop a worker thread that is blocked in connect, send or recv: shutting its socket
    down wakes it at once (recv returns what it had so far, then nothing)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.aborted = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.aborted:
                raise Aborted
            self._socket = sock

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    # socket.socket's own shutdown, not SSLSocket's, which would drop the TLS state under the reader.
                    socket.socket.shutdown(self._socket, socket.SHUT_RDWR)


def ssl_context() -> ssl.SSLContext:
    """The verification httpx does with trust_env (our listing client's setting): SSL_CERT_FILE, SSL_CERT_DIR or
    certifi's bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    elif os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    else:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


Origin = tuple[str, str, int]  # scheme, host, port


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise Unsupported(f"cannot fetch {url!r}")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


class _Connection:
    def __init__(self, sock: socket.socket, origin: Origin) -> None:
        self.sock = sock
        self.origin = origin
        self.tls = origin[0] == "https"
        self.pending = bytearray()  # bytes received after the response head: the start of the body
        self.idle_since = 0.0

    def recv_into(self, view: memoryview) -> int:
        """Fill `view`; fewer bytes only at the end of the stream, on a timeout after some bytes, or on abort."""
        if self.pending:
            n = min(len(view), len(self.pending))
            view[:n] = self.pending[:n]
            del self.pending[:n]
            return n
        if not self.tls:
            try:
                return self.sock.recv_into(view, len(view), socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO ran out without a byte
                raise TimeoutError("no data") from None
        got = 0
        while got < len(view):  # TLS hands out one record (<= 16 KiB) per read
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                if got:
                    return got  # the next call raises again, with nothing lost
                raise
            if not n:
                break
            got += n
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Response:
    """Status and headers (names lower-cased) of the final response; its body through `readinto`. Call `close`:
    a connection whose body was read to the end goes back to the pool."""

    def __init__(self, client: Client, conn: _Connection, abort: Abort, url: str, version: str, status: int,
                 headers: dict[str, str]) -> None:
        self.url = url
        self.status = status
        self.headers = headers
        self._client = client
        self._conn: _Connection | None = conn
        self._abort = abort
        length = headers.get("content-length")
        self._remaining = int(length) if length is not None and length.isdigit() else None
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        self._reusable = version == "HTTP/1.1" and "close" not in tokens and self._remaining is not None
        if length is not None and self._remaining is None:
            self.close()
            raise TransportError(f"bad Content-Length {length!r} from {url}")
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            self.close()
            raise Unsupported(f"{url} answered with Transfer-Encoding: {headers['transfer-encoding']}")

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) bytes of the body, as many as arrive (fewer only at its end or after a timeout);
        0 once the body is over, also when the connection closed early (the caller counts its bytes)."""
        if self._remaining is not None:
            view = view[: self._remaining]
        if self._conn is None or not view:
            return 0
        try:
            n = self._conn.recv_into(view)
        except TimeoutError:
            raise TransportError(f"no data for {self._client.read_timeout:g} s from {self.url}") from None
        except OSError as e:
            raise TransportError(f"{type(e).__name__} reading from {self.url}: {e}") from None
        if self._remaining is not None:
            self._remaining -= n
        return n

    def read(self, limit: int) -> bytes:
        """At most `limit` bytes of the body (for error messages)."""
        buffer = memoryview(bytearray(limit))
        got = 0
        while got < limit and (n := self.readinto(buffer[got:])):
            got += n
        return bytes(buffer[:got])

    def drain(self) -> None:
        """Read off a small rest of the body, so that the connection can serve the next request."""
        if self._remaining is not None and 0 < self._remaining <= MAX_DRAINED:
            with contextlib.suppress(TransportError):
                self.read(self._remaining)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Aborted):
            self._abort.attach(None)
        # Bytes past the body would be taken for the next response's: such a connection is not reused.
        if self._reusable and self._remaining == 0 and not conn.pending and not self._abort.aborted:
            self._client.check_in(conn)
        else:
            conn.close()


class Client:
    """Connection pool and request logic; thread-safe. One per Downloader."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._lock = threading.Lock()
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def get(self, url: str, headers: Mapping[str, str], abort: Abort) -> Response:
        """GET `url`, following redirects. Raises TransportError, Unsupported, Aborted."""
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(url, headers, abort)
            location = response.headers.get("location")
            if response.status not in _REDIRECT_STATUS or not location:
                return response
            response.drain()
            response.close()
            target = urljoin(url, location)
            if not _same_origin(url, target):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise TransportError(f"more than {MAX_REDIRECTS} redirects, the last to {url}")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # -- internals -------------------------------------------------------------------------------------------
    def _request(self, url: str, headers: Mapping[str, str], abort: Abort) -> Response:
        origin = _origin(url)
        request = _request_head(url, headers)
        conn = self._check_out(origin)
        while True:
            reused = conn is not None
            conn = conn or self._connect(origin, abort)
            abort.attach(conn.sock)
            try:
                conn.sock.sendall(request)
                version, status, fields = _read_head(conn)
            except (OSError, TransportError) as e:
                conn.close()
                if abort.aborted:
                    raise Aborted from None
                if reused and not isinstance(e, _Garbled):
                    conn = None  # the server had closed the idle connection: once more on a new one
                    continue
                if isinstance(e, TransportError):
                    raise
                raise TransportError(f"{type(e).__name__} from {url}: {e}") from None
            return Response(self, conn, abort, url, version, status, fields)

    def _connect(self, origin: Origin, abort: Abort) -> _Connection:
        scheme, host, port = origin
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise TransportError(f"cannot resolve {host}: {e}") from None
        error: OSError | None = None
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            try:
                abort.attach(sock)
                sock.settimeout(self.connect_timeout)
                sock.connect(address)
                if scheme == "https":
                    return _Connection(self._handshake(sock, host, abort), origin)
                # Plain TCP: blocking, so that MSG_WAITALL takes 1 MiB per call; the kernel enforces the stall timeout.
                sock.settimeout(None)
                timeval = struct.pack("ll", int(self.read_timeout), int(self.read_timeout % 1 * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
                return _Connection(sock, origin)
            except Aborted:
                sock.close()
                raise
            except OSError as e:
                sock.close()
                if abort.aborted:
                    raise Aborted from None
                error = e
        raise TransportError(f"cannot connect to {host}:{port}: {error}")

    def _handshake(self, sock: socket.socket, host: str, abort: Abort) -> socket.socket:
        if self._ssl is None:
            self._ssl = ssl_context()
        sock.settimeout(self.read_timeout)  # the ssl module polls with it before each read: an exact stall timeout
        tls = self._ssl.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        try:
            abort.attach(tls)  # wrap_socket detached `sock`: shutting that one down would no longer reach the fd
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls

    def _check_out(self, origin: Origin) -> _Connection | None:
        now = time.monotonic()
        with self._lock:
            conns = self._idle.get(origin, [])
            while conns:
                conn = conns.pop()
                if now - conn.idle_since < IDLE_TIMEOUT:
                    return conn
                conn.close()
        return None

    def check_in(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            conns = self._idle.setdefault(conn.origin, [])
            if len(conns) < MAX_IDLE_PER_ORIGIN:
                conns.append(conn)
                return
        conn.close()


class _Garbled(TransportError):
    """The server answered something that is not HTTP/1.x: a fresh connection would not help."""


def _same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b)


def _request_head(url: str, headers: Mapping[str, str]) -> bytes:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}", "Accept: */*"]
    for name, value in headers.items():
        if any(c in f"{name}{value}" for c in "\r\n"):
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_head(conn: _Connection) -> tuple[str, int, dict[str, str]]:
    """Receive the status line and headers, skipping interim (1xx) responses; what follows stays in `pending`."""
    buffer = conn.pending
    while True:
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEAD:
                raise _Garbled("the response head is over 64 KiB")
            try:
                chunk = conn.sock.recv(65536)
            except BlockingIOError:
                raise TimeoutError("no response") from None
            if not chunk:
                raise ConnectionResetError("the server closed the connection before answering")
            buffer += chunk
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[: end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise _Garbled(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        if 100 <= int(code) < 200:
            continue  # 100 Continue, 103 Early Hints: the real answer follows
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise _Garbled(f"bad header line {line[:80]!r}")
            key = name.strip().lower()
            fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
        return version, int(code), fields
