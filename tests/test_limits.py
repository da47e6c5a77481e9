"""Request limits against a real `mgr serve` (daemon/guards.py, the uvicorn settings in daemon/server.py): body caps
per endpoint (413 in the called API's shape), the header cap (431), header and idle timeouts, the connection
limit; and the settings that set them (registry/config.py)."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Daemon

from mgr.registry.config import ConfigError, load_settings

MiB = 1 << 20
LIMITS = {"MGR_MAX_BODY_SIZE": "1MiB", "MGR_MAX_CONTROL_BODY_SIZE": "16KiB", "MGR_MAX_HEADER_SIZE": "16KiB",
          "MGR_HEADER_TIMEOUT": "1s", "MGR_IDLE_TIMEOUT": "1", "MGR_MAX_CONNECTIONS": "8"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("limited"), extra_env=LIMITS)
    d.start()
    yield d
    d.stop()


def raw_exchange(daemon: Daemon, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Send `head` (and the start of a body), then read whatever comes back until the daemon closes."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as conn:
        conn.sendall(head + body)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received and _complete(received):
                break
        return received


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_and_json(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def post_head(daemon: Daemon, path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_body_past_the_cap_is_413_before_it_is_read_in_each_apis_shape(limited: Daemon) -> None:
    """Only the headers and a first piece are sent: the answer comes without the daemon waiting for the rest."""
    for path in ("/api/chat", "/api/generate", "/api/create", "/v1/chat/completions", "/v1/messages",
                 "/v1/embeddings", "/v1/responses"):
        status, body = status_and_json(raw_exchange(limited, post_head(limited, path, 2 * MiB), b'{"model": "x"'))
        assert status == 413, path
        if path == "/v1/messages":
            assert body["error"] == {"type": "request_too_large", "message": body["error"]["message"]}  # type: ignore
        elif path.startswith("/v1/"):
            assert body["error"]["code"] == 413  # type: ignore[index]
            assert "MGR_MAX_BODY_SIZE" in body["error"]["message"]  # type: ignore[index]
        else:
            assert "MGR_MAX_BODY_SIZE" in str(body["error"])
    # the other model endpoints take the small cap
    for path in ("/api/show", "/api/pull", "/api/copy", "/api/load"):
        status, body = status_and_json(raw_exchange(limited, post_head(limited, path, 20_000), b"{"))
        assert status == 413, path
        assert "MGR_MAX_CONTROL_BODY_SIZE" in str(body["error"])


def test_a_body_under_the_cap_is_read(limited: Daemon) -> None:
    padding = "x" * (MiB - 1000)
    answer = httpx.post(limited.base_url + "/api/chat", json={"model": "nope", "messages": [
        {"role": "user", "content": padding}]}, timeout=30)
    assert answer.status_code == 404  # read and parsed: the model is missing
    # head and a body 60x the header cap in one write: only the head counts against MGR_MAX_HEADER_SIZE
    body = json.dumps({"model": "nope", "prompt": "p" * (960 * 1024)}).encode()
    status, error = status_and_json(raw_exchange(limited, post_head(limited, "/api/generate", len(body)), body))
    assert status == 404 and "nope" in str(error["error"])
    assert httpx.post(limited.base_url + "/api/show", json={"model": "nope", "x": "y" * 10_000}).status_code == 404


def test_a_chunked_body_is_counted_as_it_arrives(limited: Daemon) -> None:
    def pieces() -> Iterator[bytes]:
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536  # 2.5 MiB in all, no Content-Length
        yield b'"}]}'

    answer = httpx.post(limited.base_url + "/v1/chat/completions", content=pieces(), timeout=30)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == 413
    assert answer.headers["connection"] == "close"
    small = httpx.post(limited.base_url + "/api/chat", content=iter([b'{"model": "nope", ', b'"messages": []}']))
    assert small.status_code == 404


def test_a_blob_upload_is_capped_by_the_free_disk(limited: Daemon) -> None:
    digest = "sha256:" + "ab" * 32
    status, body = status_and_json(raw_exchange(limited, post_head(limited, f"/api/blobs/{digest}", 1 << 60)))
    assert status == 413
    assert "free space" in str(body["error"])
    # a blob past the JSON caps is fine (2 MiB): what the disk holds decides
    data = b"z" * (2 * MiB)
    uploaded = httpx.post(limited.base_url + f"/api/blobs/sha256:{hashlib.sha256(data).hexdigest()}", content=data)
    assert uploaded.status_code == 201


def test_a_huge_header_is_431(limited: Daemon) -> None:
    head = (f"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1:{limited.port}\r\nX-Big: {'a' * 20_000}\r\n\r\n").encode()
    response = raw_exchange(limited, head)
    assert response.startswith(b"HTTP/1.1 431 ")
    assert b"MGR_MAX_HEADER_SIZE" in response
    # one that never ends is refused once past the cap, without waiting for the rest
    endless = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{limited.port}\r\nX-Big: {'a' * 17_000}".encode()
    assert raw_exchange(limited, endless).startswith(b"HTTP/1.1 431 ")
    # headers under the cap, with a body in the same read, are fine
    assert httpx.get(limited.base_url + "/api/tags", headers={"X-Fine": "a" * 10_000}).status_code == 200


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(limited: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", limited.port), timeout=10) as slow:
        started = time.monotonic()
        slow.sendall(b"GET / HTTP/1.1\r\n")  # and the rest never comes
        assert silent.recv(1024) == b""  # closed by the daemon
        assert slow.recv(1024) == b""
        waited = time.monotonic() - started
    assert 0.8 <= waited < 5, waited


def test_an_idle_keep_alive_connection_is_closed(limited: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as conn:
        conn.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{limited.port}\r\n\r\n".encode())
        response = b""
        while not (b"\r\n\r\n" in response and _complete(response)):  # the whole answer, however it is cut up
            response += conn.recv(65536)
        assert response.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert conn.recv(1024) == b""
        assert time.monotonic() - started < 5


def test_connections_past_the_limit_are_503(limited: Daemon) -> None:
    sockets = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(8)]
    try:
        time.sleep(0.2)
        assert httpx.get(limited.base_url + "/api/tags").status_code == 503
    finally:
        for held in sockets:
            held.close()
    time.sleep(0.3)
    assert httpx.get(limited.base_url + "/api/tags").status_code == 200


def test_the_defaults(daemon: Daemon) -> None:
    """64 MiB for generation; 1 MiB for the rest; 64 KiB of headers."""
    status, _ = status_and_json(raw_exchange(daemon, post_head(daemon, "/api/chat", 64 * MiB + 1)))
    assert status == 413
    status, _ = status_and_json(raw_exchange(daemon, post_head(daemon, "/api/show", MiB + 1)))
    assert status == 413
    assert httpx.get(daemon.base_url + "/api/tags", headers={"X-Fine": "a" * 60_000}).status_code == 200
    big = f"GET / HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 70_000}\r\n\r\n".encode()
    assert raw_exchange(daemon, big).startswith(b"HTTP/1.1 431 ")


def test_the_settings(tmp_path: Path) -> None:
    env = {"MGR_CONFIG": str(tmp_path / "none.toml")}
    defaults = load_settings(env=env)
    assert (defaults.max_body_size, defaults.max_control_body_size, defaults.max_header_size) == (64 * MiB, MiB,
                                                                                                 64 << 10)
    assert defaults.api_keys == () and defaults.origins == ()
    keys = tmp_path / "keys"
    keys.write_text("k1\n# comment\n\n k2 \n")
    chosen = load_settings(env={**env, "MGR_MAX_BODY_SIZE": "128MiB", "MGR_MAX_HEADER_SIZE": "8192",
                                "MGR_HEADER_TIMEOUT": "2s", "MGR_API_KEYS": "a, b,", "MGR_API_KEYS_FILE": str(keys),
                                "MGR_ORIGINS": "https://x.example, app://*"})
    assert chosen.max_body_size == 128 * MiB and chosen.max_header_size == 8192 and chosen.header_timeout == 2.0
    assert chosen.api_keys == ("a", "b", "k1", "k2")
    assert chosen.origins == ("https://x.example", "app://*")
    for name, bad in (("MGR_MAX_BODY_SIZE", "lots"), ("MGR_MAX_BODY_SIZE", "0"), ("MGR_HEADER_TIMEOUT", "0"),
                      ("MGR_MAX_CONNECTIONS", "-1"), ("MGR_API_KEYS_FILE", str(tmp_path / "missing"))):
        with pytest.raises(ConfigError, match="(?i)" + name.removeprefix("MGR_")):  # the variable or the key
            load_settings(env={**env, name: bad})
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no key"):
        load_settings(env={**env, "MGR_API_KEYS_FILE": str(tmp_path / "empty")})
