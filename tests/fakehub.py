"""A local fake of the Hugging Face and ModelScope HTTP APIs, as their real clients see them (DESIGN.md §6).

One threaded HTTP/1.1 server on 127.0.0.1 and a free port serves three endpoints by path prefix:

    {url}/hf        Hugging Face         GET /api/models/{repo}/revision/{rev}, GET /api/models/{repo}/tree/{rev}
    {url}/mirror    hf-mirror (same repos as /hf)       HEAD|GET /{repo}/resolve/{rev}/{path} (LFS -> 302 to /cdn)
    {url}/ms        ModelScope           GET /api/v1/models/{repo}/repo/files, GET /api/v1/models/{repo}/repo?FilePath=

Repos are built from bytes or from a file on disk (the real GGUF). Faults can be injected per file: drop the
connection after N bytes, answer a status (500, 429 + Retry-After) once, stall, corrupt one byte; a throttle
slows a file down. Every body byte sent is counted per (endpoint, repo/path), so a test can assert that a
resumed pull did not fetch bytes it already had.

Also the tests' helpers for the store: `import_file` (a file on disk into the blobs) and `partial_state` (what an
interrupted download recorded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    from mgr.registry.store import Store

HF_PREFIXES = ("hf", "mirror")
MS_PREFIX = "ms"
_CHUNK = 64 * 1024


# -- test data ---------------------------------------------------------------------------------------------------
def tiny_gguf(label: str = "tiny", n_floats: int = 16, seed: int = 0, tmp_dir: Path | None = None) -> bytes:
    """A small valid GGUF (one tensor, general.architecture=llama) whose bytes differ by label and seed."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        path = Path(d) / "m.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name(label)
        writer.add_context_length(2048)
        rng = np.random.default_rng(seed)
        writer.add_tensor("token_embd.weight", rng.standard_normal(n_floats).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def tiny_safetensors(n_floats: int = 16, seed: int = 0) -> bytes:
    import numpy as np

    data = np.random.default_rng(seed).standard_normal(n_floats).astype(np.float32).tobytes()
    tensor = {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, len(data)]}
    header = json.dumps({"model.embed_tokens.weight": tensor})
    header_bytes = header.encode() + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def safetensors_repo_files(seed: int = 0) -> dict[str, bytes]:
    """A small safetensors model repo, with the files a pull must skip."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048,
              "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 1, "torch_dtype": "float32"}
    return {
        "config.json": json.dumps(config).encode(),
        "generation_config.json": b'{"max_new_tokens": 64}',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}',
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}).encode(),
        "model.safetensors": tiny_safetensors(4096, seed),
        "pytorch_model.bin": b"\x80\x02pickle" * 100,
        "onnx/model.onnx": b"onnx" * 100,
        "original/consolidated.00.pth": b"pth" * 100,
        "README.md": b"# test model\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
    }


def import_file(store: Store, path: Path) -> str:
    """Copy a file on disk into the store's blobs; its digest "sha256:<hex>" (what `store.create` takes)."""
    writer = store.begin_blob()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                writer.write(chunk)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def partial_state(store: Store, key: str) -> dict[str, Any] | None:
    """The recorded state (parts.json) of an interrupted download of the file keyed `key` (its sha256)."""
    try:
        state: dict[str, Any] = json.loads((store.tmp_dir / f"{key}.parts.json").read_text())
        return state
    except (OSError, ValueError):
        return None


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def dead_endpoint() -> str:
    """A URL nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- the hub's model ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FakeFile:
    path: str
    data: bytes | None
    disk: Path | None
    size: int
    sha256: str
    git_sha1: str
    lfs: bool

    @classmethod
    def make(cls, path: str, content: bytes | Path, lfs_threshold: int) -> FakeFile:
        if isinstance(content, Path):
            h = hashlib.sha256()
            with content.open("rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            size = content.stat().st_size
            return cls(path, None, content, size, h.hexdigest(), "0" * 40, True)
        lfs = len(content) >= lfs_threshold or path.endswith((".gguf", ".safetensors", ".bin"))
        return cls(path, content, None, len(content), hashlib.sha256(content).hexdigest(), git_blob_sha1(content), lfs)

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.disk is not None
        with self.disk.open("rb") as f:
            f.seek(start)
            return f.read(end - start)


@dataclasses.dataclass
class FakeRepo:
    hub: str  # "hf" | "modelscope"
    repo_id: str
    files: dict[str, FakeFile]
    commit: str
    gated: bool = False
    private: bool = False
    token: str | None = None  # the token that opens a gated or private repo


@dataclasses.dataclass
class Fault:
    kind: str  # "drop" | "status" | "stall" | "corrupt"
    path: str
    times: int = 1
    after: int = 0  # drop / stall: body bytes sent first
    status: int = 500
    retry_after: str | None = None
    seconds: float = 5.0  # stall
    offset: int = 0  # corrupt: the file offset whose byte is flipped


class FakeHub:
    def __init__(self, page_size: int | None = None) -> None:
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.faults: list[Fault] = []
        self.throttles: dict[str, float] = {}  # path -> bytes per second per response
        self.served: Counter[tuple[str, str]] = Counter()  # (endpoint prefix, "repo/path") -> body bytes
        self.requests: list[tuple[str, str]] = []  # (method, path) as received
        self.page_size = page_size
        self.active = 0  # byte responses being sent right now
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- setup ---------------------------------------------------------------------------------------------
    def add_repo(self, hub: str, repo_id: str, files: Mapping[str, bytes | Path], *, gated: bool = False,
                 private: bool = False, token: str | None = None, lfs_threshold: int = 1024) -> FakeRepo:
        assert hub in ("hf", "modelscope")
        made = {p: FakeFile.make(p, c, lfs_threshold) for p, c in files.items()}
        commit = hashlib.sha1(repr(sorted((p, f.sha256) for p, f in made.items())).encode()).hexdigest()
        repo = FakeRepo(hub, repo_id, made, commit, gated, private, token)
        self.repos[(hub, repo_id)] = repo
        return repo

    def fail(self, path: str, kind: str, **kwargs: Any) -> Fault:
        fault = Fault(kind, path, **kwargs)
        with self.lock:
            self.faults.append(fault)
        return fault

    def throttle(self, path: str, bytes_per_second: float | None) -> None:
        with self.lock:
            if bytes_per_second is None:
                self.throttles.pop(path, None)
            else:
                self.throttles[path] = bytes_per_second

    def bytes_served(self, path: str, prefix: str | None = None) -> int:
        with self.lock:
            return sum(n for (p, key), n in self.served.items() if key.endswith("/" + path) and prefix in (None, p))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no body is being sent: a client that hung up is noticed only at the server's next write."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.active, "the fake hub is still sending"

    def reset_counters(self) -> None:
        with self.lock:
            self.served.clear()
            self.requests.clear()

    def take_fault(self, path: str, kinds: tuple[str, ...], start: int = 0, end: int = 0) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.path != path or fault.kind not in kinds or fault.times <= 0:
                    continue
                if fault.kind == "corrupt" and not start <= fault.offset < end:
                    continue
                fault.times -= 1
                return fault
        return None

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def hf_endpoint(self) -> str:
        return f"{self.url}/hf"

    @property
    def mirror_endpoint(self) -> str:
        return f"{self.url}/mirror"

    @property
    def modelscope_endpoint(self) -> str:
        return f"{self.url}/ms"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- HTTP --------------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: Mapping[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), headers, head=head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:]
        cookie = self.headers.get("Cookie", "")
        for part in cookie.split(";"):
            k, _, v = part.strip().partition("=")
            if k == "m_session_id":
                return v
        return None

    def _route(self, head: bool) -> None:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path))
        prefix, _, rest = split.path.lstrip("/").partition("/")
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            if prefix in HF_PREFIXES:
                self._hf(prefix, "/" + rest, query, head)
            elif prefix == MS_PREFIX:
                self._ms("/" + rest, query, head)
            else:
                self._json(404, {"error": "unknown endpoint"}, head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- Hugging Face ----------------------------------------------------------------------------------------
    def _hf_denied(self, repo: FakeRepo, head: bool) -> bool:
        """401/403 the way the Hub answers gated and private repos; False when access is granted."""
        token = self._token()
        if not (repo.gated or repo.private) or (token is not None and token == repo.token):
            return False
        if repo.private:
            self._json(401, {"error": "Repository Not Found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository Not Found"}, head=head)
        elif token is None:
            msg = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
                   "to access it. Please log in.")
            self._json(401, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg}, head=head)
        else:
            msg = (f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                   f"Visit https://huggingface.co/{repo.repo_id} to ask for access.")
            self._json(403, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg}, head=head)
        return True

    def _hf_repo(self, repo_id: str, head: bool) -> FakeRepo | None:
        repo = self.hub.repos.get(("hf", repo_id))
        if repo is None:
            self._json(404, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, head=head)
        return repo

    def _hf_rev_ok(self, repo: FakeRepo, rev: str, head: bool) -> bool:
        if unquote(rev) in ("main", repo.commit):
            return True
        self._json(404, {"error": f"Invalid rev id: {rev}"},
                   {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {rev}"}, head=head)
        return False

    def _hf(self, prefix: str, path: str, query: dict[str, str], head: bool) -> None:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = self._hf_repo(f"{parts[2]}/{parts[3]}", head)
            if repo is None or (repo.private and self._hf_denied(repo, head)):
                return
            if not self._hf_rev_ok(repo, parts[5], head):
                return
            if parts[4] == "revision":
                siblings = [{"rfilename": p} for p in sorted(repo.files)]
                info = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": repo.private,
                        "gated": "manual" if repo.gated else False, "siblings": siblings}
                self._json(200, info, head=head)
            else:
                self._hf_tree(prefix, repo, parts[5], query, head)
            return
        if parts[0] == "cdn":
            repo = self.hub.repos.get(("hf", f"{parts[1]}/{parts[2]}"))
            file = repo.files.get(unquote("/".join(parts[3:]))) if repo else None
            if file is None:
                self._json(404, {"error": "no such object"}, head=head)
                return
            self._serve_bytes(prefix, repo, file, head, {"ETag": f'"{file.sha256}"'})  # type: ignore[arg-type]
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._hf_repo(f"{parts[0]}/{parts[1]}", head)
            if repo is None or self._hf_denied(repo, head) or not self._hf_rev_ok(repo, parts[3], head):
                return
            file_path = unquote("/".join(parts[4:]))
            file = repo.files.get(file_path)
            if file is None:
                self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head=head)
                return
            common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
            if file.lfs:
                location = f"/{prefix}/cdn/{repo.repo_id}/{quote(file.path)}"
                self._send(302, b"", {**common, "Location": location, "X-Linked-Etag": f'"{file.sha256}"',
                                      "X-Linked-Size": str(file.size), "ETag": f'"{file.git_sha1}"'}, head=head)
            else:
                self._serve_bytes(prefix, repo, file, head, {**common, "ETag": f'"{file.git_sha1}"'})
            return
        self._json(404, {"error": f"no route {path}"}, head=head)

    def _hf_tree(self, prefix: str, repo: FakeRepo, rev: str, query: dict[str, str], head: bool) -> None:
        entries: list[dict[str, Any]] = []
        folders = sorted({"/".join(p.split("/")[:i]) for p in repo.files for i in range(1, p.count("/") + 1)})
        recursive = query.get("recursive", "false").lower() == "true"
        for folder in folders:
            if recursive or "/" not in folder:
                oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            if not recursive and "/" in f.path:
                continue
            entry: dict[str, Any] = {"type": "file", "size": f.size, "path": f.path}
            if f.lfs:
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {f.size}\n".encode()
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(pointer)}
            else:
                entry["oid"] = f.git_sha1
            entries.append(entry)
        headers = {}
        if self.hub.page_size:
            start = int(query.get("cursor", "0"))
            end = start + self.hub.page_size
            if end < len(entries):
                base = f"http://{self.headers['Host']}/{prefix}/api/models/{repo.repo_id}/tree/{rev}"
                headers["Link"] = f'<{base}?recursive={str(recursive).lower()}&expand=false&cursor={end}>; rel="next"'
            entries = entries[start:end]
        self._json(200, entries, headers, head=head)

    # -- ModelScope ------------------------------------------------------------------------------------------
    def _ms_error(self, status: int, message: str, head: bool) -> None:
        self._json(status, {"Code": 10010205001 if status == 404 else status, "Message": message,
                            "RequestId": "fake", "Success": False}, head=head)

    def _ms(self, path: str, query: dict[str, str], head: bool) -> None:
        parts = path.strip("/").split("/")
        if parts[0] == "cdn":
            repo = self.hub.repos.get(("modelscope", f"{parts[1]}/{parts[2]}"))
            file = repo.files.get(unquote("/".join(parts[3:]))) if repo else None
            if file is None:
                self._ms_error(404, "object not found", head)
                return
            self._serve_bytes(MS_PREFIX, repo, file, head, {})  # type: ignore[arg-type]
            return
        if parts[:3] != ["api", "v1", "models"] or len(parts) < 5:
            self._ms_error(404, f"no route {path}", head)
            return
        repo_id = f"{parts[3]}/{parts[4]}"
        repo = self.hub.repos.get(("modelscope", repo_id))
        if repo is None:
            self._ms_error(404, f"model {repo_id} not found", head)
            return
        if repo.private or repo.gated:
            token = self._token()
            if token is None:
                self._ms_error(401, "the model is private: log in to access it", head)
                return
            if token != repo.token:
                self._ms_error(403, "you have no permission on this model", head)
                return
        rest = parts[5:]
        revision = query.get("Revision", "master")
        if revision not in ("master", repo.commit):
            self._ms_error(404, f"revision {revision} not found", head)
            return
        if rest == ["repo", "files"]:
            files = [{"Name": f.path.rsplit("/", 1)[-1], "Path": f.path, "Type": "blob", "Size": f.size,
                      "Sha256": f.sha256, "Revision": repo.commit, "IsLFS": f.lfs, "Mode": "33188"}
                     for f in sorted(repo.files.values(), key=lambda f: f.path)]
            self._json(200, {"Code": 200, "Data": {"Files": files}, "Message": "success", "RequestId": "fake",
                             "Success": True}, head=head)
        elif rest == ["repo"]:
            file = repo.files.get(query.get("FilePath", ""))
            if file is None:
                self._ms_error(404, "file not found", head)
            elif file.lfs:
                self._send(302, b"", {"Location": f"/{MS_PREFIX}/cdn/{repo.repo_id}/{quote(file.path)}"}, head=head)
            else:
                self._serve_bytes(MS_PREFIX, repo, file, head, {})
        elif rest == ["revisions"]:
            branches = [{"Revision": "master", "CommitId": repo.commit}]
            self._json(200, {"Code": 200, "Data": {"RevisionMap": {"Branches": branches, "Tags": []}}, "Success": True},
                       head=head)
        elif rest == []:
            self._json(200, {"Code": 200, "Data": {"Name": parts[4], "Path": parts[3], "Revision": "master"},
                             "Success": True}, head=head)
        else:
            self._ms_error(404, f"no route {path}", head)

    # -- bytes -----------------------------------------------------------------------------------------------
    def _serve_bytes(self, prefix: str, repo: FakeRepo, file: FakeFile, head: bool, headers: Mapping[str, str]) -> None:
        hub = self.hub
        if not head:
            fault = hub.take_fault(file.path, ("status",))
            if fault is not None:
                extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._send(fault.status, b'{"error":"injected"}', extra)
                return
        start, end, status = 0, file.size, 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and file.size:
            first, _, last = range_header[6:].partition("-")
            start = int(first) if first else max(0, file.size - int(last))
            end = min(file.size, int(last) + 1) if first and last else file.size
            if start >= file.size:
                self._send(416, b"", {"Content-Range": f"bytes */{file.size}"}, head=head)
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{file.size}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        with hub.lock:
            hub.active += 1
        try:
            self._send_body(prefix, repo, file, start, end)
        finally:
            with hub.lock:
                hub.active -= 1

    def _send_body(self, prefix: str, repo: FakeRepo, file: FakeFile, start: int, end: int) -> None:
        hub = self.hub
        key = (prefix, f"{repo.repo_id}/{file.path}")
        cut = hub.take_fault(file.path, ("drop", "stall"))
        corrupt = hub.take_fault(file.path, ("corrupt",), start, end)
        began = time.monotonic()
        sent = 0
        pos = start
        while pos < end:
            chunk = file.read(pos, min(end, pos + _CHUNK))
            if corrupt is not None and pos <= corrupt.offset < pos + len(chunk):
                i = corrupt.offset - pos
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
            if cut is not None and sent + len(chunk) > cut.after:
                chunk = chunk[: cut.after - sent]
                self._write(key, chunk)
                if cut.kind == "stall":
                    time.sleep(cut.seconds)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._write(key, chunk)
            sent += len(chunk)
            pos += len(chunk)
            rate = hub.throttles.get(file.path)
            if rate:
                ahead = sent / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    def _write(self, key: tuple[str, str], chunk: bytes) -> None:
        self.wfile.write(chunk)
        with self.hub.lock:
            self.hub.served[key] += len(chunk)
