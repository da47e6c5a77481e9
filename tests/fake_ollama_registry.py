"""A local fake of Ollama's registry (registry.ollama.ai), as `ollama pull` sees it (server/images.go,
server/download.go): OCI distribution paths on a threaded HTTP/1.1 server on 127.0.0.1.

    GET  /v2/{namespace}/{model}/manifests/{tag}   the manifest (application/vnd.docker.distribution.manifest.v2+json);
                                                   404 {"errors": [{"code": "MANIFEST_UNKNOWN", ...}]}
    HEAD|GET /v2/{namespace}/{model}/blobs/{digest} 307 to /cdn/{digest}, as the real one sends to its CDN
    HEAD|GET /cdn/{digest}                          the bytes, with Range (206 + Content-Range)

Models are built from layers (media type, bytes or a file on disk); a config blob is made for each, as Ollama's
has. A blob can be throttled or corrupted (one byte flipped as it is sent), and every body byte sent is counted
per digest, so a test can assert what a resumed pull fetched again. Also `write_ollama_store`: the same models
laid out as Ollama's own store on disk (manifests/<host>/<namespace>/<model>/<tag>, blobs/sha256-<hex>).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
SYSTEM = "application/vnd.ollama.image.system"
PARAMS = "application/vnd.ollama.image.params"
LICENSE = "application/vnd.ollama.image.license"
_CHUNK = 64 * 1024


@dataclasses.dataclass
class Blob:
    content: bytes | Path
    digest: str
    size: int

    @classmethod
    def of(cls, content: bytes | Path) -> Blob:
        if isinstance(content, Path):
            h = hashlib.sha256()
            with content.open("rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            return cls(content, f"sha256:{h.hexdigest()}", content.stat().st_size)
        return cls(content, f"sha256:{hashlib.sha256(content).hexdigest()}", len(content))

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.content, bytes):
            return self.content[start:end]
        with self.content.open("rb") as f:
            f.seek(start)
            return f.read(end - start)


class FakeOllamaRegistry:
    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str, str], bytes] = {}  # (namespace, model, tag) -> manifest bytes
        self.blobs: dict[str, Blob] = {}
        self.corrupt: set[str] = set()
        self.rates: dict[str, float] = {}
        self.served: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add_model(self, namespace: str, model: str, tag: str,
                  layers: Sequence[tuple[str, bytes | Path]]) -> dict[str, Any]:
        built = []
        for media, content in layers:
            blob = Blob.of(content)
            self.blobs[blob.digest] = blob
            built.append({"mediaType": media, "digest": blob.digest, "size": blob.size})
        config = Blob.of(json.dumps({"model_format": "gguf", "model_family": "llama", "file_type": "Q4_1",
                                     "rootfs": {"type": "layers", "diff_ids": [b["digest"] for b in built]}}).encode())
        self.blobs[config.digest] = config
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                    "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
                    "layers": built}
        self.manifests[(namespace, model, tag)] = json.dumps(manifest).encode()
        return manifest

    def digest_of(self, namespace: str, model: str, tag: str, media: str) -> str:
        manifest = json.loads(self.manifests[(namespace, model, tag)])
        return str(next(layer["digest"] for layer in manifest["layers"] if layer["mediaType"] == media))

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeOllamaRegistry:
        handler = type("Handler", (_Handler,), {"registry": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeOllamaRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_MANIFEST = re.compile(r"^/v2/([^/]+)/([^/]+)/manifests/([^/]+)$")
_BLOB = re.compile(r"^/v2/([^/]+)/([^/]+)/blobs/(sha256:[0-9a-f]{64})$")
_CDN = re.compile(r"^/cdn/(sha256:[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    registry: FakeOllamaRegistry
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, body, {"Content-Type": "application/json"}, head)

    def _route(self, head: bool) -> None:
        registry = self.registry
        with registry._lock:
            registry.requests.append((self.command, self.path, self.headers.get("Range")))
        if m := _MANIFEST.match(self.path):
            manifest = registry.manifests.get((m.group(1), m.group(2), m.group(3)))
            if manifest is None:
                return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown", head)
            return self._send(200, manifest, {"Content-Type": MANIFEST_TYPE}, head)
        if m := _BLOB.match(self.path):
            if m.group(3) not in registry.blobs:
                return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry", head)
            return self._send(307, b"", {"Location": f"/cdn/{m.group(3)}"}, head)
        if m := _CDN.match(self.path):
            blob = registry.blobs.get(m.group(1))
            if blob is None:
                return self._send(404, b"not found", head=head)
            return self._serve(blob, head)
        return self._error(404, "NAME_UNKNOWN", "not found", head)

    def _serve(self, blob: Blob, head: bool) -> None:
        start, end, status = 0, blob.size, 200
        wanted = self.headers.get("Range")
        if wanted and (m := _RANGE.match(wanted)):
            start = int(m.group(1))
            end = min(blob.size, int(m.group(2)) + 1) if m.group(2) else blob.size
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{blob.size}")
        self.end_headers()
        if head:
            return
        registry = self.registry
        offset = start
        try:
            while offset < end:
                chunk = bytearray(blob.read(offset, min(end, offset + _CHUNK)))
                if blob.digest in registry.corrupt and offset <= blob.size // 2 < offset + len(chunk):
                    chunk[blob.size // 2 - offset] ^= 0xFF
                rate = registry.rates.get(blob.digest)
                if rate:
                    time.sleep(len(chunk) / rate)
                self.wfile.write(chunk)
                with registry._lock:
                    registry.served[blob.digest] += len(chunk)
                offset += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass


def write_ollama_store(root: Path, host: str, namespace: str, model: str, tag: str,
                       layers: Sequence[tuple[str, bytes | Path]]) -> dict[str, Any]:
    """Lay a model out as Ollama's store does; a file layer is hard-linked in where it can be (no test copies
    100 MB when it need not). Returns the manifest."""
    built = []
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for media, content in layers:
        blob = Blob.of(content)
        target = root / "blobs" / blob.digest.replace(":", "-")
        if not target.exists():
            if isinstance(content, Path):
                try:
                    os.link(content, target)
                except OSError:
                    shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
        built.append({"mediaType": media, "digest": blob.digest, "size": blob.size})
    config = json.dumps({"model_format": "gguf", "file_type": "Q4_1"}).encode()
    config_blob = Blob.of(config)
    (root / "blobs" / config_blob.digest.replace(":", "-")).write_bytes(config)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": config_blob.digest, "size": config_blob.size},
                "layers": built}
    path = root / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return manifest
