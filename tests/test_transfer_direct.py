"""The transfer engine's direct HTTP path (registry/rangeget.py) where tests/test_pull.py's fake hub does not
take it: TLS, redirects to another origin, keep-alive connections the server dropped, and the fallbacks to
httpx (a chunked body, a proxy in the environment)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mgr.registry import rangeget
from mgr.registry.store import Store
from mgr.registry.transfer import Downloader, FileSpec, TransferError, TransferOptions

DATA = bytes(range(256)) * 8192  # 2 MiB
SHA256 = hashlib.sha256(DATA).hexdigest()
OPTIONS = TransferOptions(part_size=512 << 10, connections=3, backoff=0.01, stall_timeout=2, retries=1)


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose here (a chunked body refused, a failed TLS handshake)


class Server:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose answers a test writes as a function of the handler."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None], tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                answer(self)

        self.httpd = _Quiet(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str = "/file", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_range(handler: BaseHTTPRequestHandler, close: bool = False) -> None:
    """Answer a Range GET for DATA with its 206."""
    first, _, last = handler.headers["Range"].removeprefix("bytes=").partition("-")
    start, end = int(first), int(last) + 1
    handler.send_response(206)
    handler.send_header("Content-Length", str(end - start))
    handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(DATA)}")
    handler.end_headers()
    handler.wfile.write(DATA[start:end])
    if close:  # drop the connection without saying so (no "Connection: close"), as idle servers do
        handler.close_connection = True


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.close()


def fetch(tmp_path: Path, url: str, headers: dict[str, str] | None = None,
          options: TransferOptions = OPTIONS) -> str:
    store = Store(tmp_path / "models")

    async def run() -> str:
        async with Downloader(store, options) as downloader:
            return await downloader.fetch(FileSpec(url, len(DATA), SHA256, None, "test/file", headers or {}))

    digest = asyncio.run(run())
    assert store.blob_path(digest).read_bytes() == DATA
    return digest


def test_tls_with_the_ca_bundle_httpx_would_use(tmp_path: Path, servers: list[Server],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    servers.append(server := Server(serve_range, tls=context))
    url = server.url(host="localhost", scheme="https")

    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert fetch(tmp_path / "a", url) == f"sha256:{SHA256}"
    assert len(server.requests) == 4  # one Range request per part: 2 MiB in 512 KiB parts

    monkeypatch.delenv("SSL_CERT_FILE")  # back to the system's or certifi's CAs: the certificate is not trusted
    with pytest.raises(TransferError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(tmp_path / "b", url)


def test_redirect_to_another_origin_drops_authorization(tmp_path: Path, servers: list[Server]) -> None:
    servers.append(cdn := Server(serve_range))

    def hub(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", cdn.url("/cdn/file"))
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    servers.append(origin := Server(hub))
    fetch(tmp_path, origin.url("/resolve/file"), {"Authorization": "Bearer secret", "User-Agent": "mgr-test"})
    assert all(r["authorization"] == "Bearer secret" for r in origin.requests)
    assert cdn.requests and all("authorization" not in r and r["user-agent"] == "mgr-test" for r in cdn.requests)
    assert {r["path"] for r in cdn.requests} == {"/cdn/file"}


def test_connections_the_server_dropped_are_replaced(servers: list[Server]) -> None:
    servers.append(server := Server(lambda h: serve_range(h, close=True)))
    client = rangeget.Client(connect_timeout=2, read_timeout=2)
    for start in (0, 100, 200):
        response = client.get(server.url(), {"Range": f"bytes={start}-{start + 9}"}, rangeget.Abort())
        assert (response.status, response.read(100)) == (206, DATA[start:start + 10])
        response.close()  # back to the pool: the next request finds it closed and opens another
    assert len(server.requests) == 3
    client.close()


def test_chunked_bodies_go_through_httpx(tmp_path: Path, servers: list[Server]) -> None:
    def chunked(handler: BaseHTTPRequestHandler) -> None:
        first, _, last = handler.headers["Range"].removeprefix("bytes=").partition("-")
        body = DATA[int(first):int(last) + 1]
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for i in range(0, len(body), 100_000):
            chunk = body[i:i + 100_000]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        handler.wfile.write(b"0\r\n\r\n")

    servers.append(server := Server(chunked))
    fetch(tmp_path, server.url())
    # Each part already asking found out (and asked again through httpx); the parts after went straight to httpx.
    assert 4 + 1 <= len(server.requests) <= 4 + OPTIONS.connections


def test_a_proxy_in_the_environment_sends_parts_through_httpx(tmp_path: Path, servers: list[Server],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    servers.append(server := Server(serve_range))
    direct: list[str] = []
    real_get = rangeget.Client.get
    monkeypatch.setattr(rangeget.Client, "get", lambda self, url, *a: direct.append(url) or real_get(self, url, *a))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # httpx honours NO_PROXY below and goes direct
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    fetch(tmp_path / "a", server.url())
    assert direct == [] and len(server.requests) == 4
    monkeypatch.delenv("HTTP_PROXY")
    fetch(tmp_path / "b", server.url())
    assert len(direct) == 4
