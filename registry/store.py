"""The content-addressed model store.

    <models>/blobs/sha256-<hex>        file contents, deduplicated across models
    <models>/manifests/<quoted name>.json
                                        one per model: its files (relative path -> digest), format, details,
                                        source, and what a create added (system, template, parameters,
                                        messages, license, adapters); written last and atomically, so a model
                                        is visible only when complete
    <models>/tmp/                       blobs being written; renamed into blobs/ only once verified
    <models>/links/<model id>/          folders of symlinks into blobs/, named as the model's files, for engines
                                        that want a directory (vLLM) or find files by name (split GGUFs)
    <models>/imports/sha256-<hex>.json  how an imported blob came in without a copy (`link_file`): a hard link
                                        or a reflink of a file elsewhere (mgr's own name for those bytes), or an
                                        external file (blobs/ then holds a symlink to it, and the record holds its
                                        size, mtime and inode as verified)

Imports (`mgr import`, `create --link`) bring files in without copying their bytes: a hard link when the file is on
the store's filesystem, a reflink (FICLONE) where the filesystem shares extents, else a symlink to the file with its
record. Every imported file is hashed once, as every blob is. An external file is mgr's only to read: deleting a
model, or garbage collection, removes the symlink and the record, never the file. Its size, mtime and inode are
re-checked (at most once a second, on the spec cache's `generation` read): a file that changed makes its models
refuse to load (ExternalFileChanged, 409) until `verify` has hashed it again.

A model derived from another (`/api/create` with `from`, a Modelfile's FROM name) names the same blobs: nothing
is copied, and deleting the base keeps every blob the derived model still names.

Every blob is hashed while it is written and lands under its digest only when the hash matches; a crash
leaves at most a file in tmp/, never a wrong blob. Methods are synchronous and thread-safe (the daemon calls
them from worker threads); the lock guards manifest writes against garbage collection.
"""

from __future__ import annotations

import builtins  # `list` in the class body below is Store.list
import dataclasses
import datetime as dt
import errno
import fcntl
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
from typing import Any, Literal
from urllib.parse import quote

from .capabilities import Capability, capabilities, is_projector
from .catalog import Format, as_format
from .errors import MgrError
from .gguf_header import GGUFError, read_header
from .metadata import InvalidModel, inspect_gguf, inspect_safetensors
from .names import ModelName, parse_name

# Matched whole (fullmatch): `$` would match before a final newline
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
# Uploaded blobs that no manifest names yet survive garbage collection this long, so that a client
# between `POST /api/blobs` and `POST /api/create` does not lose its upload (to anyone else's failure either).
UPLOAD_GRACE_SECONDS = 3600.0
# A pull's partial download (tmp/<key>.partial + .parts.json) can be resumed: never delete one younger than this.
RESUMABLE_GRACE_SECONDS = 86400.0
# How often the external files' size, mtime and inode are looked at again (`Store.generation`).
EXTERNAL_RECHECK_SECONDS = 1.0
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int), a reflink of a whole file
_HASH_CHUNK = 8 << 20

ImportMode = Literal["hardlink", "reflink", "external"]


class ModelNotFound(MgrError, LookupError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found, try pulling it first')
        self.name = name


class BlobNotFound(MgrError, LookupError):
    status = 400  # a create that names a blob never uploaded


class DigestMismatch(MgrError, ValueError):
    status = 400


class UnreadableFile(InvalidModel):
    """A model file whose bytes are not what its name says (a .gguf that is no GGUF): of no use to any model as
    that file, so a failed create may drop its blob, where it keeps every other (another client's fresh upload
    among them: UPLOAD_GRACE_SECONDS)."""

    def __init__(self, message: str, digest: str) -> None:
        super().__init__(message)
        self.digest = digest


class ExternalFileChanged(MgrError):
    """A model file mgr records outside its store (an import without a copy) has changed or gone since it was
    verified: the model is refused until `mgr verify` hashes it again (409: the file's state, not the request)."""

    status = 409


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class InvalidFile(MgrError, ValueError):
    """A digest or a model file's name the store refuses (a 400 wherever a client sent it)."""

    status = 400


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidFile(f"invalid digest {str(digest)[:100]!r}: expected sha256:<64 lowercase hex>")
    return digest


def check_file_path(path: str) -> str:
    """A model file's path relative to the model: `a.gguf` or `sub/a.safetensors`, never leaving the folder."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if not all(_FILE_PART.fullmatch(p) for p in parts):
        raise InvalidFile(f"invalid file name {str(path)[:200]!r}: use relative paths of letters, digits, '.', '_', "
                          "'+', '-'")
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
class Customization:
    """What a create sets beyond the files (Ollama's template, system, params, messages, license and adapter
    layers). Over a base model, as Ollama's create does: a template, system prompt or messages given replace
    the base's, parameters are merged over the base's (these win), licenses are added, adapters replace."""

    system: str | None = None
    template: str | None = None  # a Jinja chat template (checked by the caller: modelfile.check_template)
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # checked: modelfile.check_parameters
    messages: tuple[Mapping[str, str], ...] = ()
    license: tuple[str, ...] = ()
    adapters: Mapping[str, str] = dataclasses.field(default_factory=dict)  # file name -> blob digest


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    format: Format
    files: tuple[ModelFile, ...]
    details: Mapping[str, Any]
    model_info: Mapping[str, Any]
    template: str  # the model's own chat template (GGUF metadata, tokenizer_config.json)
    source: Mapping[str, Any]
    created_at: str
    modified_at: str
    # What a create added; absent from older manifests, which read as the defaults.
    system: str = ""
    chat_template: str = ""  # a Jinja chat template given at create: the engines use it instead of `template`
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Ollama's options by name
    messages: tuple[Mapping[str, str], ...] = ()  # put before every conversation
    license: tuple[str, ...] = ()
    adapters: tuple[ModelFile, ...] = ()  # a LoRA adapter: one GGUF, or a PEFT folder's files

    @property
    def digest(self) -> str:
        """The model's identity: a hash over its files (and what a create added, when it added anything), so
        equal content means an equal ID: copies share it, a derived model with its own settings does not."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            h.update(f"{f.path}\0{f.digest}\n".encode())
        added = {key: value for key, value in self._added().items() if value}
        if added:
            h.update(json.dumps(added, sort_keys=True, default=list).encode())
        return h.hexdigest()

    def _added(self) -> dict[str, Any]:
        return {"system": self.system, "chat_template": self.chat_template, "parameters": dict(self.parameters),
                "messages": [dict(m) for m in self.messages], "license": list(self.license),
                "adapters": [f"{f.path}\0{f.digest}" for f in self.adapters]}

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files) + sum(f.size for f in self.adapters)

    @property
    def effective_template(self) -> str:
        """The chat template requests are rendered with: the one given at create, else the model's own."""
        return self.chat_template or self.template

    @property
    def blob_digests(self) -> list[str]:
        """Every blob this model names (its files and its adapter's)."""
        return [f.digest for f in (*self.files, *self.adapters)]

    @property
    def capabilities(self) -> list[Capability]:
        return capabilities(self.effective_template, self.model_info, (f.path for f in self.files))

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
            system=data.get("system") or "",
            chat_template=data.get("chat_template") or "",
            parameters=data.get("parameters") or {},
            messages=tuple(data.get("messages") or ()),
            license=tuple(data.get("license") or ()),
            adapters=tuple(ModelFile(**f) for f in data.get("adapters") or ()),
        )

    def customized(self, custom: Customization, adapters: tuple[ModelFile, ...] | None) -> Manifest:
        """This manifest with `custom` applied over what it already carries (see Customization)."""
        return dataclasses.replace(
            self,
            system=self.system if custom.system is None else custom.system,
            chat_template=self.chat_template if custom.template is None else custom.template,
            parameters={**self.parameters, **custom.parameters},
            messages=tuple(dict(m) for m in custom.messages) or self.messages,
            license=(*self.license, *custom.license),
            adapters=self.adapters if adapters is None else adapters,
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


def _file_state(path: Path) -> tuple[int, int, int] | None:
    """What says a file is still the one verified: size, mtime and inode (None: gone or unreadable)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None


def hash_file(path: Path) -> str:
    """sha256 of a file as a digest (reading it: the one cost of an import without a copy)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _reflink(source: Path, target: Path) -> bool:
    """A copy-on-write clone of `source` at `target` (btrfs, XFS, bcachefs...): no bytes copied. False where the
    filesystem cannot (or the two are on different filesystems); nothing is left at `target` then."""
    try:
        with source.open("rb") as src, target.open("xb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        return True
    except OSError:
        target.unlink(missing_ok=True)
        return False


@dataclasses.dataclass(frozen=True)
class LinkedFile:
    """A file brought into the store by `Store.link_file`."""

    digest: str
    size: int
    mode: ImportMode | Literal["present"]  # present: the store had these bytes already


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.manifests_dir = root / "manifests"
        self.tmp_dir = root / "tmp"
        self.links_dir = root / "links"
        self.imports_dir = root / "imports"
        for d in (self.blobs_dir, self.manifests_dir, self.tmp_dir, self.links_dir, self.imports_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # digest -> when a client last uploaded it or was told the store has it (time.time()), until a manifest
        # names it: a failed pull or a delete leaves these alone for UPLOAD_GRACE_SECONDS, as garbage collection
        # does by the blob's mtime
        self._uploads: dict[str, float] = {}
        # Bumped on every manifest write or delete, so callers can cache what they derive from manifests.
        self._generation = 0
        # External files as last looked at (digest -> (size, mtime_ns, ino) or None when gone), and when
        self._external_seen: dict[str, tuple[int, int, int] | None] = {}
        self._external_checked = 0.0
        self._externals: dict[str, dict[str, Any]] = {}  # digest -> record, of the external ones only
        for record_path in self.imports_dir.glob("sha256-*.json"):
            record = _read_record(record_path)
            if record is not None and record.get("mode") == "external":
                self._externals[record_path.name.removesuffix(".json").replace("-", ":", 1)] = record

    @property
    def generation(self) -> int:
        """Changes whenever a manifest is written or deleted, or an external file is seen to change (looked at
        at most every EXTERNAL_RECHECK_SECONDS): what is derived from a model (its load spec) is derived again,
        and a changed file is refused there (`model_path`)."""
        now = time.monotonic()
        if now - self._external_checked >= EXTERNAL_RECHECK_SECONDS:
            self._external_checked = now
            seen = {digest: _file_state(Path(record["path"])) for digest, record in dict(self._externals).items()}
            if seen != self._external_seen:
                self._external_seen = seen
                self._generation += 1
        return self._generation

    # blobs -------------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / check_digest(digest).replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def begin_blob(self) -> BlobWriter:
        return BlobWriter(self)

    def claim_upload(self, digest: str) -> bool:
        """A client uploaded this blob, or asked whether the store has it (and will name it in a create rather
        than upload it): its grace period starts again. False when the store does not have it."""
        path = self.blob_path(digest)
        if not path.is_file():
            return False
        try:
            os.utime(path, follow_symlinks=False)  # an external file's own mtime is the user's, not ours
        except FileNotFoundError:
            return False
        now = time.time()
        with self._lock:
            self._uploads = {d: at for d, at in self._uploads.items() if at > now - UPLOAD_GRACE_SECONDS}
            self._uploads[digest] = now
        return True

    def adopt_blob(self, path: Path, digest: str) -> None:
        """Move a file already verified to hash to `digest` into blobs/ (a pull hashes while it downloads,
        so this does not hash again)."""
        target = self.blob_path(digest)
        if target.exists() and not target.is_symlink():
            path.unlink(missing_ok=True)  # deduplicated: the store already had these bytes
        else:
            # new, or the store had them only as an external file (or a symlink to one that is gone): now its own
            os.replace(path, target)
            self._forget_import(digest)
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename survives a power loss
            finally:
                os.close(dir_fd)
        os.utime(target, follow_symlinks=False)  # restart its grace period: the manifest that names it comes next

    # imports: files brought in without a copy --------------------------------------------------------
    def _import_record_path(self, digest: str) -> Path:
        return self.imports_dir / (check_digest(digest).replace(":", "-") + ".json")

    def import_record(self, digest: str) -> dict[str, Any] | None:
        """How this blob came in, when it was imported: mode, path, size, mtime_ns, ino, verified_at."""
        return _read_record(self._import_record_path(digest))

    def _forget_import(self, digest: str) -> None:
        self._import_record_path(digest).unlink(missing_ok=True)
        self._externals.pop(digest, None)

    def _record_import(self, digest: str, mode: ImportMode, source: Path, state: tuple[int, int, int]) -> None:
        record = {"mode": mode, "path": str(source), "size": state[0], "mtime_ns": state[1], "ino": state[2],
                  "verified_at": now_iso()}
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.import"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self._import_record_path(digest))
        if mode == "external":
            self._externals[digest] = record
            self._external_seen[digest] = state
        else:
            self._externals.pop(digest, None)

    def link_file(self, source: Path, expected: str | None = None, *, external: bool = False) -> LinkedFile:
        """Bring the file at `source` into blobs/ without copying its bytes: hashed (and checked against
        `expected`), then a hard link (same filesystem), a reflink (a filesystem that shares extents), or else
        recorded where it is (`external`: that only). Raises DigestMismatch, ExternalFileChanged (it changed
        while being hashed), OSError (unreadable)."""
        source = source.resolve()
        before = _file_state(source)
        if before is None or not source.is_file():
            raise FileNotFoundError(errno.ENOENT, "no such file", str(source))
        if expected is not None and self.has_blob(expected) and not self.blob_path(expected).is_symlink():
            return LinkedFile(expected, before[0], "present")  # the store's own copy: nothing to hash or link
        digest = hash_file(source)
        if expected is not None and digest != expected:
            raise DigestMismatch(f"{source} hashes to {digest}, not {expected} as its name or manifest says")
        changed = ExternalFileChanged(f"{source} changed while it was being imported; import it again")
        with self._lock:
            target = self.blob_path(digest)
            if target.exists() and not target.is_symlink():
                return LinkedFile(digest, before[0], "present")
            if target.is_symlink() and self._externals.get(digest, {}).get("path") == str(source):
                if _file_state(source) != before:
                    raise changed
                self._record_import(digest, "external", source, before)  # verified again
                return LinkedFile(digest, before[0], "external")
            staging = self.tmp_dir / f"{uuid.uuid4().hex}.link"
            mode: ImportMode = "external"
            if not external:
                try:
                    os.link(source, staging)
                    mode = "hardlink"
                except OSError:  # another filesystem (EXDEV), someone else's file (protected_hardlinks), ...
                    if _reflink(source, staging):
                        mode = "reflink"
            if mode == "external":
                staging.symlink_to(source)
            if _file_state(source) != before:
                staging.unlink(missing_ok=True)
                raise changed
            os.replace(staging, target)  # over a symlink to a file that is gone, if there was one
            self._record_import(digest, mode, source, before)
            return LinkedFile(digest, before[0], mode)

    def check_external(self, manifest: Manifest) -> None:
        """Raises ExternalFileChanged when one of the model's external files is not as verified."""
        for f in (*manifest.files, *manifest.adapters):
            record = self._externals.get(f.digest)
            if record is None:
                continue
            state = _file_state(Path(record["path"]))
            if state is None:
                raise ExternalFileChanged(
                    f"{manifest.name}: its file {f.path} was {record['path']}, which is gone: import it again, or "
                    f"`mgr rm {manifest.name}`")
            if state != (record["size"], record["mtime_ns"], record["ino"]):
                raise ExternalFileChanged(
                    f"{manifest.name}: its file {f.path} ({record['path']}) changed since it was verified: "
                    f"run `mgr verify {manifest.name}` to check its bytes again")

    def verify(self, name: str) -> builtins.list[str]:
        """Hash the model's external files that changed since verified: the same bytes are recorded as verified
        again (and the model serves again); other bytes raise ExternalFileChanged. Returns the paths hashed."""
        manifest = self.get(name)
        hashed = []
        for f in (*manifest.files, *manifest.adapters):
            record = self._externals.get(f.digest)
            if record is None:
                continue
            path = Path(record["path"])
            before = _file_state(path)
            if before == (record["size"], record["mtime_ns"], record["ino"]):
                continue
            if before is None:
                raise ExternalFileChanged(f"{manifest.name}: its file {f.path} was {path}, which is gone")
            digest = hash_file(path)
            hashed.append(str(path))
            if digest != f.digest:
                raise ExternalFileChanged(
                    f"{manifest.name}: its file {f.path} ({path}) now hashes to {digest}, not {f.digest}: these "
                    f"are other bytes; import the file again as a new model, or `mgr rm {manifest.name}`")
            if _file_state(path) != before:
                raise ExternalFileChanged(f"{path} changed while it was being verified; verify it again")
            with self._lock:
                self._record_import(f.digest, "external", path, before)
        return hashed

    def disk_usage(self) -> builtins.list[dict[str, Any]]:
        """Per model: its size, how much of it is the store's own bytes, hard-linked or reflinked with files
        elsewhere, or external files; shared with other models in the store; and what deleting it would free."""
        with self._lock:
            manifests = self.list()
            users: dict[str, int] = {}
            for m in manifests:
                for digest in set(m.blob_digests):
                    users[digest] = users.get(digest, 0) + 1
            result = []
            for m in manifests:
                usage = dict.fromkeys(("stored", "hardlink", "reflink", "external", "shared", "frees"), 0)
                for f in {f.digest: f for f in (*m.files, *m.adapters)}.values():
                    record = self.import_record(f.digest)
                    mode = record["mode"] if record is not None else "stored"
                    try:
                        links = self.blob_path(f.digest).lstat().st_nlink
                    except OSError:
                        links = 1
                    if mode == "hardlink" and links <= 1:
                        mode = "stored"  # the other name is gone: these bytes are now only the store's
                    usage[mode if mode in usage else "stored"] += f.size
                    if users.get(f.digest, 0) > 1:
                        usage["shared"] += f.size
                    elif mode == "stored" and links <= 1:
                        usage["frees"] += f.size
                result.append({"name": m.name, "size": m.size, **usage})
            return result

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
        self._generation += 1
        for digest in manifest.blob_digests:  # named now: the upload's grace has done its work
            self._uploads.pop(digest, None)

    def create(self, name: str, files: Mapping[str, str], source: Mapping[str, Any],
               custom: Customization | None = None) -> Manifest:
        """Make a model from blobs already in the store, with what `custom` adds. Raises InvalidModel,
        BlobNotFound, ValueError."""
        parsed = parse_name(name)
        if not files:
            raise InvalidModel("a model needs at least one file")
        paths = {check_file_path(p): check_digest(d) for p, d in files.items()}
        with self._lock:
            on_disk = self._blobs(paths)
            ggufs = sorted(p for p in paths if p.lower().endswith(".gguf") and not is_projector(p))
            if len([p for p in paths if is_projector(p)]) > 1:
                raise InvalidModel("a model holds at most one vision projector (mmproj) file")
            if ggufs:
                if len(ggufs) > 1 and not all(re.search(r"-\d{5}-of-\d{5}\.gguf$", p) for p in ggufs):
                    raise InvalidModel(f"a model holds one GGUF (or the parts of one split GGUF), got {ggufs}")
                try:
                    info = inspect_gguf(on_disk[ggufs[0]], ggufs[0])
                except InvalidModel as e:
                    raise UnreadableFile(str(e), paths[ggufs[0]]) from None
                if read_header(on_disk[ggufs[0]]).metadata.get("general.type") == "adapter":
                    raise InvalidModel(f"{ggufs[0]} is a LoRA adapter, not a model: give it as an adapter "
                                       "(ADAPTER in a Modelfile) over the model it was trained for")
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
            custom = custom or Customization()
            manifest = manifest.customized(custom, self._adapter(custom.adapters, manifest))
            self._write_manifest(manifest)
            return manifest

    def derive(self, name: str, base: str, custom: Customization) -> Manifest:
        """A model over `base`'s blobs (named again, never copied) with `custom` applied over the base's own
        settings, as Ollama's create with `from`. Raises ModelNotFound, InvalidModel, BlobNotFound."""
        with self._lock:
            original = self.get(base)
            stamp = now_iso()
            manifest = dataclasses.replace(original, name=str(parse_name(name)), created_at=stamp, modified_at=stamp,
                                           source={**original.source, "from": original.name})
            manifest = manifest.customized(custom, self._adapter(custom.adapters, manifest))
            self._write_manifest(manifest)
            return manifest

    def _blobs(self, paths: Mapping[str, str]) -> dict[str, Path]:
        missing = [p for p, d in paths.items() if not self.has_blob(d)]
        if missing:
            raise BlobNotFound(f"the store has no blob for {', '.join(missing)}; upload it first")
        return {p: self.blob_path(d) for p, d in paths.items()}

    def _adapter(self, files: Mapping[str, str], model: Manifest) -> tuple[ModelFile, ...] | None:
        """The adapter's files, checked against the model they adapt (None: none given, the base's stays).
        llama.cpp takes one GGUF LoRA adapter of the model's architecture; vLLM a PEFT folder
        (adapter_config.json and adapter_model.safetensors)."""
        if not files:
            return None
        paths = {check_file_path(p): check_digest(d) for p, d in files.items()}
        on_disk = self._blobs(paths)
        if model.format == "gguf":
            if len(paths) != 1 or not next(iter(paths)).lower().endswith(".gguf"):
                raise InvalidModel(f"a GGUF model takes one GGUF LoRA adapter file, got {sorted(paths)}")
            path = next(iter(paths))
            try:
                header = read_header(on_disk[path]).metadata
            except GGUFError as e:
                raise InvalidModel(f"adapter {path}: {e}") from None
            if header.get("general.type") != "adapter" or header.get("adapter.type") != "lora":
                raise InvalidModel(f"adapter {path} is not a GGUF LoRA adapter (general.type adapter, adapter.type "
                                   "lora): convert it with llama.cpp's convert_lora_to_gguf.py")
            arch = model.model_info.get("general.architecture")
            if header.get("general.architecture") != arch:
                raise InvalidModel(f"adapter {path} is for {header.get('general.architecture')!r} models, "
                                   f"not {arch!r}")
        elif "adapter_config.json" not in paths or not any(p.endswith(".safetensors") for p in paths):
            raise InvalidModel("a safetensors model takes a PEFT LoRA adapter folder: adapter_config.json and "
                               f"adapter_model.safetensors, got {sorted(paths)}")
        return tuple(ModelFile(p, d, on_disk[p].stat().st_size) for p, d in sorted(paths.items()))

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
            self._generation += 1
            if not any(m.digest == manifest.digest for m in self.list()):  # a copy still uses its links
                shutil.rmtree(self.links_dir / manifest.digest, ignore_errors=True)
                shutil.rmtree(self.links_dir / f"{manifest.digest}-adapter", ignore_errors=True)
            self.discard_unreferenced(manifest.blob_digests)
            return manifest

    def _referenced(self) -> set[str]:
        return {digest for m in self.list() for digest in m.blob_digests}

    def discard_unreferenced(self, digests: Iterable[str], *, spare_uploads: bool = True) -> builtins.list[str]:
        """Delete these blobs unless a manifest names them (after a delete or a failed pull), or a client claimed
        them within UPLOAD_GRACE_SECONDS (`spare_uploads`: false only for a blob refused for its own bytes)."""
        with self._lock:
            referenced = self._referenced()
            recent = time.time() - UPLOAD_GRACE_SECONDS
            spared = {d for d, at in self._uploads.items() if at > recent} if spare_uploads else set()
            removed = [d for d in set(digests) if d not in referenced and d not in spared and self.has_blob(d)]
            for digest in removed:
                self.blob_path(digest).unlink(missing_ok=True)  # an external file's symlink, never the file
                self._forget_import(digest)
                self._uploads.pop(digest, None)
            return removed

    def collect_garbage(self, grace_seconds: float = UPLOAD_GRACE_SECONDS) -> builtins.list[str]:
        """Delete blobs no manifest names and older than the upload grace, and stale tmp files."""
        cutoff = time.time() - grace_seconds
        with self._lock:
            referenced = self._referenced()
            removed: builtins.list[str] = []
            for path in self.blobs_dir.glob("sha256-*"):
                digest = path.name.replace("-", ":", 1)
                # lstat: an external file's symlink is judged by its own age, and only the symlink goes
                if digest not in referenced and path.lstat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    self._forget_import(digest)
                    removed.append(digest)
            for record in self.imports_dir.glob("sha256-*.json"):  # a record whose blob went another way
                if not os.path.lexists(self.blobs_dir / record.name.removesuffix(".json")):
                    record.unlink(missing_ok=True)
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
        the parts were (llama.cpp finds the others by name beside it); for safetensors the folder of links.
        Raises ExternalFileChanged when one of its files is an external file that changed since verified."""
        self.check_external(manifest)
        if manifest.format == "gguf":
            parts = sorted(f.path for f in manifest.files
                           if f.path.lower().endswith(".gguf") and not is_projector(f.path))
            if len(parts) == 1:
                return self.blob_path(next(f.digest for f in manifest.files if f.path == parts[0]))
            return self._linked(manifest) / parts[0]
        return self._linked(manifest)

    def projector_path(self, manifest: Manifest) -> Path | None:
        """A GGUF vision model's projector (mmproj) blob, for llama.cpp's --mmproj; None for other models."""
        self.check_external(manifest)
        found = next((f for f in manifest.files if is_projector(f.path)), None)
        return self.blob_path(found.digest) if found is not None and manifest.format == "gguf" else None

    def adapter_path(self, manifest: Manifest) -> Path | None:
        """What an engine opens for the model's LoRA adapter: the GGUF blob (llama.cpp), or a folder of links
        named as the PEFT files were (vLLM); None without one."""
        if not manifest.adapters:
            return None
        if manifest.format == "gguf":
            return self.blob_path(manifest.adapters[0].digest)
        return self._linked(manifest, adapter=True)

    def _linked(self, manifest: Manifest, adapter: bool = False) -> Path:
        folder = self.links_dir / (f"{manifest.digest}-adapter" if adapter else manifest.digest)
        if not folder.is_dir():
            staging = self.links_dir / f".{uuid.uuid4().hex}"
            for f in manifest.adapters if adapter else manifest.files:
                link = staging / f.path
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.blob_path(f.digest))
            try:
                os.replace(staging, folder)
            except OSError:  # another thread made it first
                shutil.rmtree(staging, ignore_errors=True)
        return folder
