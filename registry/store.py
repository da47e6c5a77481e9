"""The content-addressed model store.

    <models>/blobs/sha256-<hex>        file contents, deduplicated across models
    <models>/manifests/<quoted name>.json
                                        one per model: its files (relative path -> digest), format, details,
                                        source; written last and atomically, so a model is visible only
                                        when complete
    <models>/tmp/                       blobs being written; renamed into blobs/ only once verified
    <models>/links/<model id>/          folders of symlinks into blobs/, named as the model's files, for engines
                                        that want a directory (vLLM) or find files by name (split GGUFs)

Every blob is hashed while it is written and lands under its digest only when the hash matches; a crash
leaves at most a file in tmp/, never a wrong blob. Methods are synchronous and thread-safe (the daemon calls
them from worker threads); the lock guards manifest writes against garbage collection.
"""

from __future__ import annotations

import builtins  # `list` in the class body below is Store.list
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .capabilities import Capability, capabilities, is_projector
from .catalog import Format, as_format
from .errors import MgrError
from .metadata import InvalidModel, inspect_gguf, inspect_safetensors
from .names import ModelName, parse_name

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
# Uploaded blobs that no manifest names yet survive garbage collection this long, so that a client
# between `POST /api/blobs` and `POST /api/create` does not lose its upload.
UPLOAD_GRACE_SECONDS = 3600.0
# A pull's partial download (tmp/<key>.partial + .parts.json) can be resumed: never delete one younger than this.
RESUMABLE_GRACE_SECONDS = 86400.0


class ModelNotFound(MgrError, LookupError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found, try pulling it first')
        self.name = name


class BlobNotFound(MgrError, LookupError):
    status = 400  # a create that names a blob never uploaded


class DigestMismatch(MgrError, ValueError):
    status = 400


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ValueError(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def check_file_path(path: str) -> str:
    """A model file's path relative to the model: `a.gguf` or `sub/a.safetensors`, never leaving the folder."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if not all(_FILE_PART.match(p) for p in parts):
        raise ValueError(f"invalid file name {path!r}: use relative paths of letters, digits, '.', '_', '+', '-'")
    return path


def _format(value: object) -> Format:
    fmt = as_format(value) if isinstance(value, str) else None
    if fmt is None:
        raise ValueError(f"unknown model format {value!r}: expected gguf or safetensors")
    return fmt


@dataclasses.dataclass(frozen=True)
class ModelFile:
    path: str
    digest: str
    size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    format: Format
    files: tuple[ModelFile, ...]
    details: Mapping[str, Any]
    model_info: Mapping[str, Any]
    template: str
    source: Mapping[str, Any]
    created_at: str
    modified_at: str

    @property
    def digest(self) -> str:
        """The model's identity: a hash over its files, so equal content means an equal ID."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            h.update(f"{f.path}\0{f.digest}\n".encode())
        return h.hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def capabilities(self) -> list[Capability]:
        return capabilities(self.template, self.model_info, (f.path for f in self.files))

    @property
    def context_length(self) -> int | None:
        arch = self.model_info.get("general.architecture")
        value = self.model_info.get(f"{arch}.context_length")
        return int(value) if value else None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schema_version"] = 1
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            name=data["name"],
            format=_format(data["format"]),
            files=tuple(ModelFile(**f) for f in data["files"]),
            details=data.get("details", {}),
            model_info=data.get("model_info", {}),
            template=data.get("template", ""),
            source=data.get("source", {}),
            created_at=data["created_at"],
            modified_at=data.get("modified_at", data["created_at"]),
        )


class BlobWriter:
    """Writes one blob into tmp/, hashing as it goes; `commit` verifies and moves it under its digest."""

    def __init__(self, store: Store) -> None:
        self._store = store
        store.tmp_dir.mkdir(parents=True, exist_ok=True)  # survive an admin clearing the store under us
        self.tmp_path = store.tmp_dir / f"{uuid.uuid4().hex}.partial"
        self._file = self.tmp_path.open("wb")
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)

    def commit(self, expected: str | None = None) -> str:
        digest = f"sha256:{self._hash.hexdigest()}"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if expected is not None and digest != expected:
            self.tmp_path.unlink(missing_ok=True)
            raise DigestMismatch(f"the uploaded bytes hash to {digest}, not {expected}")
        self._store.adopt_blob(self.tmp_path, digest)
        return digest

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.manifests_dir = root / "manifests"
        self.tmp_dir = root / "tmp"
        self.links_dir = root / "links"
        for d in (self.blobs_dir, self.manifests_dir, self.tmp_dir, self.links_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Bumped on every manifest write or delete, so callers can cache what they derive from manifests.
        self.generation = 0

    # blobs -------------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / check_digest(digest).replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def begin_blob(self) -> BlobWriter:
        return BlobWriter(self)

    def adopt_blob(self, path: Path, digest: str) -> None:
        """Move a file already verified to hash to `digest` into blobs/ (a pull hashes while it downloads,
        so this does not hash again)."""
        target = self.blob_path(digest)
        if target.exists():
            path.unlink(missing_ok=True)  # deduplicated: the store already had these bytes
        else:
            os.replace(path, target)
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename survives a power loss
            finally:
                os.close(dir_fd)
        os.utime(target)  # restart its grace period: the manifest that names it comes next

    # manifests ---------------------------------------------------------------------------------------
    def _manifest_path(self, name: ModelName) -> Path:
        return self.manifests_dir / (quote(name.key, safe="") + ".json")

    def get(self, name: str) -> Manifest:
        parsed = parse_name(name)
        try:
            data = json.loads(self._manifest_path(parsed).read_text())
        except FileNotFoundError:
            raise ModelNotFound(name) from None
        return Manifest.from_json(data)

    def list(self) -> list[Manifest]:
        result = []
        for path in self.manifests_dir.glob("*.json"):
            try:
                result.append(Manifest.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable manifest hides one model; it must not hide them all
        return sorted(result, key=lambda m: m.modified_at, reverse=True)

    def _write_manifest(self, manifest: Manifest) -> None:
        path = self._manifest_path(parse_name(manifest.name))
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.manifest"
        with tmp.open("w") as f:
            json.dump(manifest.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.generation += 1

    def create(self, name: str, files: Mapping[str, str], source: Mapping[str, Any]) -> Manifest:
        """Make a model from blobs already in the store. Raises InvalidModel, BlobNotFound, ValueError."""
        parsed = parse_name(name)
        if not files:
            raise InvalidModel("a model needs at least one file")
        paths = {check_file_path(p): check_digest(d) for p, d in files.items()}
        with self._lock:
            missing = [p for p, d in paths.items() if not self.has_blob(d)]
            if missing:
                raise BlobNotFound(f"the store has no blob for {', '.join(missing)}; upload it first")
            on_disk = {p: self.blob_path(d) for p, d in paths.items()}
            ggufs = sorted(p for p in paths if p.lower().endswith(".gguf") and not is_projector(p))
            if len([p for p in paths if is_projector(p)]) > 1:
                raise InvalidModel("a model holds at most one vision projector (mmproj) file")
            if ggufs:
                if len(ggufs) > 1 and not all(re.search(r"-\d{5}-of-\d{5}\.gguf$", p) for p in ggufs):
                    raise InvalidModel(f"a model holds one GGUF (or the parts of one split GGUF), got {ggufs}")
                info = inspect_gguf(on_disk[ggufs[0]])
                model_format: Format = "gguf"
            elif any(p.endswith(".safetensors") for p in paths):
                info = inspect_safetensors(on_disk)
                model_format = "safetensors"
            else:
                raise InvalidModel("a model needs a .gguf file, or config.json and *.safetensors files")
            stamp = now_iso()
            manifest = Manifest(
                name=str(parsed),
                format=model_format,
                files=tuple(ModelFile(p, d, on_disk[p].stat().st_size) for p, d in sorted(paths.items())),
                details=info["details"],
                model_info=info["model_info"],
                template=info["template"],
                source=dict(source),
                created_at=stamp,
                modified_at=stamp,
            )
            self._write_manifest(manifest)
            return manifest

    def copy(self, source: str, destination: str) -> Manifest:
        with self._lock:
            original = self.get(source)
            manifest = dataclasses.replace(original, name=str(parse_name(destination)), modified_at=now_iso())
            self._write_manifest(manifest)
            return manifest

    def delete(self, name: str) -> Manifest:
        """Remove the manifest, then every blob no other model uses."""
        with self._lock:
            manifest = self.get(name)
            self._manifest_path(parse_name(name)).unlink()
            self.generation += 1
            shutil.rmtree(self.links_dir / manifest.digest, ignore_errors=True)
            self.discard_unreferenced([f.digest for f in manifest.files])
            return manifest

    def _referenced(self) -> set[str]:
        return {f.digest for m in self.list() for f in m.files}

    def discard_unreferenced(self, digests: Iterable[str]) -> builtins.list[str]:
        """Delete these blobs unless a manifest names them (used after a delete or a failed create)."""
        with self._lock:
            referenced = self._referenced()
            removed = [d for d in set(digests) if d not in referenced and self.has_blob(d)]
            for digest in removed:
                self.blob_path(digest).unlink(missing_ok=True)
            return removed

    def collect_garbage(self, grace_seconds: float = UPLOAD_GRACE_SECONDS) -> builtins.list[str]:
        """Delete blobs no manifest names and older than the upload grace, and stale tmp files."""
        cutoff = time.time() - grace_seconds
        with self._lock:
            referenced = self._referenced()
            removed: builtins.list[str] = []
            for path in self.blobs_dir.glob("sha256-*"):
                digest = path.name.replace("-", ":", 1)
                if digest not in referenced and path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed.append(digest)
            resumable_cutoff = time.time() - max(grace_seconds, RESUMABLE_GRACE_SECONDS)
            for path in self.tmp_dir.iterdir():
                stem = path.name.split(".")[0]
                resumable = (self.tmp_dir / f"{stem}.parts.json").exists()
                if path.stat().st_mtime < (resumable_cutoff if resumable else cutoff):
                    path.unlink(missing_ok=True)
            return removed

    # serving -----------------------------------------------------------------------------------------
    def model_path(self, manifest: Manifest) -> Path:
        """What an engine opens: a GGUF blob; for a split GGUF the first part in a folder of links named as
        the parts were (llama.cpp finds the others by name beside it); for safetensors the folder of links."""
        if manifest.format == "gguf":
            parts = sorted(f.path for f in manifest.files
                           if f.path.lower().endswith(".gguf") and not is_projector(f.path))
            if len(parts) == 1:
                return self.blob_path(next(f.digest for f in manifest.files if f.path == parts[0]))
            return self._linked(manifest) / parts[0]
        return self._linked(manifest)

    def projector_path(self, manifest: Manifest) -> Path | None:
        """A GGUF vision model's projector (mmproj) blob, for llama.cpp's --mmproj; None for other models."""
        found = next((f for f in manifest.files if is_projector(f.path)), None)
        return self.blob_path(found.digest) if found is not None and manifest.format == "gguf" else None

    def _linked(self, manifest: Manifest) -> Path:
        folder = self.links_dir / manifest.digest
        if not folder.is_dir():
            staging = self.links_dir / f".{uuid.uuid4().hex}"
            for f in manifest.files:
                link = staging / f.path
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.blob_path(f.digest))
            try:
                os.replace(staging, folder)
            except OSError:  # another thread made it first
                shutil.rmtree(staging, ignore_errors=True)
        return folder
