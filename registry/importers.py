"""Models already on disk, brought into the store without copying: Ollama's store, the Hugging Face and
ModelScope caches, and any GGUF file or safetensors folder (`mgr create NAME --from PATH --link`).

Each finder walks its layout and returns what it found (`Found`: a name, the files on disk, what they should
hash to when the layout says, what the model carries beyond its files, and where it came from) and what it
skipped, with why. `import_found` brings one in: each file through `Store.link_file` (hard link, reflink, or an
external record; hashed once), then `Store.create`, so an imported model is a model like any other.

Layouts, as the tools write them:
    Ollama        <root>/manifests/<host>/<namespace>/<model>/<tag>   (registry/ollama.py reads them)
                  <root>/blobs/sha256-<hex>
    Hugging Face  <root>/models--<owner>--<repo>/snapshots/<commit>/<path>   symlinks into ../../blobs/<hash>
                  <root>/models--<owner>--<repo>/refs/main                   the commit `main` was
                  A download in progress is blobs/<hash>.incomplete, linked from the snapshot only when done.
    ModelScope    <root>/models/<owner>--<name>/snapshots/<revision>/<path>  (modelscope_hub, SDK >= 1.38)
                  <root>/hub/models/<owner>/<name>/<path>  and  <root>/models/<owner>/<name>/<path>  (older SDKs;
                  dots in the name written as `___`; a download in progress leaves `._____temp/` or
                  `*.incomplete`)

Names: Ollama's models keep Ollama's names (`llama3.2:3b`); a cache's GGUF is `hf.co/<owner>/<repo>:<quant>`
(`modelscope.cn/...`) as a pull would name it, one model per quantization present; a safetensors snapshot is
`hf.co/<owner>/<repo>:latest`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from .errors import MgrError
from .metadata import InvalidModel
from .names import InvalidName, parse_name
from .ollama import GGUF_MAGIC, InvalidOllamaManifest, OllamaManifest, customization, display_name
from .selection import NoModelFiles, gguf_choices, select_projector, select_safetensors
from .sources import RemoteFile
from .store import Customization, DigestMismatch, ExternalFileChanged, LinkedFile, Store, check_file_path

Kind = Literal["ollama", "hf", "modelscope", "file"]
KINDS: tuple[Kind, ...] = ("ollama", "hf", "modelscope", "file")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REPO_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")


class ImportPathError(MgrError, ValueError):
    """A path to import from that is not there (404), not readable by the daemon (403), or not a layout or
    model file mgr knows (400)."""

    status = 400


@dataclasses.dataclass(frozen=True)
class Found:
    name: str
    files: dict[str, Path]  # the model's file name -> the file on disk
    expected: dict[str, str]  # file name -> the digest the layout promises (Ollama's blob names, HF's LFS hashes)
    source: dict[str, Any]  # recorded in the manifest
    custom: Customization | None = None
    adapters: dict[str, Path] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return sum(_size(p) for p in (*self.files.values(), *self.adapters.values()))


@dataclasses.dataclass(frozen=True)
class Skipped:
    where: str
    why: str


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def default_location(kind: Kind, env: dict[str, str] | None = None) -> Path:
    """Where each tool keeps its models for this user (the environment variables each tool reads first)."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home())
    cache = Path(env.get("XDG_CACHE_HOME") or home / ".cache")
    if kind == "ollama":
        if env.get("OLLAMA_MODELS"):
            return Path(env["OLLAMA_MODELS"])
        for candidate in (home / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")):
            if (candidate / "manifests").is_dir():
                return candidate
        return home / ".ollama" / "models"
    if kind == "hf":
        if env.get("HF_HUB_CACHE"):
            return Path(env["HF_HUB_CACHE"])
        return Path(env["HF_HOME"]) / "hub" if env.get("HF_HOME") else cache / "huggingface" / "hub"
    if kind == "modelscope":
        return Path(env["MODELSCOPE_CACHE"]) if env.get("MODELSCOPE_CACHE") else cache / "modelscope"
    raise ValueError(f"no default location for {kind}")


def _check_root(root: Path) -> Path:
    if not root.exists():
        raise ImportPathError(f"{root} does not exist", status=404)
    if not os.access(root, os.R_OK | os.X_OK if root.is_dir() else os.R_OK):
        raise ImportPathError(f"the daemon (uid {os.getuid()}) cannot read {root}", status=403)
    return root


# -- Ollama ---------------------------------------------------------------------------------------------------------
def find_ollama(root: Path) -> tuple[list[Found], list[Skipped]]:
    root = _check_root(root)
    manifests = root / "manifests"
    if not manifests.is_dir():
        raise ImportPathError(f"{root} is not an Ollama store: it has no manifests/ folder (expected "
                              "~/.ollama/models or /usr/share/ollama/.ollama/models, or $OLLAMA_MODELS)")
    found, skipped = [], []
    for path in sorted(p for p in manifests.glob("*/*/*/*") if p.is_file()):
        host, namespace, model, tag = path.relative_to(manifests).parts
        where = f"{path}"
        try:
            found.append(_ollama_model(root, path, display_name(host, namespace, model, tag)))
        except (InvalidOllamaManifest, InvalidName, OSError, ValueError) as e:
            skipped.append(Skipped(where, str(e)))
    return found, skipped


def _ollama_model(root: Path, path: Path, name: str) -> Found:
    manifest = OllamaManifest.parse(path.read_bytes(), str(path))
    layers = manifest.file_layers(str(path))
    blob = {layer.digest: root / "blobs" / layer.digest.replace(":", "-")
            for layer in (*layers.values(), *manifest.text_layers())}
    missing = [str(p) for p in blob.values() if not p.is_file()]
    if missing:
        raise ValueError(f"incomplete: {', '.join(missing)} missing (a pull still under way?)")
    texts = {}
    for layer in manifest.text_layers():
        data = blob[layer.digest].read_bytes()
        if len(data) != layer.size:
            raise ValueError(f"layer {blob[layer.digest]} has {len(data)} bytes, not {layer.size}")
        texts[layer.media_type] = data
    with blob[layers["model.gguf"].digest].open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"its model layer {blob[layers['model.gguf'].digest]} is not a GGUF file")
    custom, notes = customization(texts)
    files = {n: blob[layer.digest] for n, layer in layers.items() if n != "adapter.gguf"}
    adapters = {n: blob[layer.digest] for n, layer in layers.items() if n == "adapter.gguf"}
    str(parse_name(name))  # a name mgr can hold, or skipped
    return Found(name=name, files=files, adapters=adapters,
                 expected={n: layer.digest for n, layer in layers.items()},
                 source={"type": "import", "from": "ollama", "path": str(path), "manifest": manifest.digest},
                 custom=custom, notes=tuple(notes))


# -- Hugging Face and ModelScope caches ------------------------------------------------------------------------------
MAX_FILES = 10_000  # a snapshot or model folder holds tens of files; a path like / is not one
MAX_DEPTH = 3


def _files_in(folder: Path) -> dict[str, Path]:
    """Every file under a snapshot folder by its path there (symlinks followed: HF's point into blobs/), down to
    MAX_DEPTH folders; more than MAX_FILES is not a model's folder (ImportPathError)."""
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        depth = len(Path(dirpath).relative_to(folder).parts)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if depth < MAX_DEPTH else []
        if len(files) + len(filenames) > MAX_FILES:
            raise ImportPathError(f"{folder} holds more than {MAX_FILES} files: not a model's folder")
        for filename in filenames:
            if filename.startswith("."):
                continue
            full = Path(dirpath) / filename
            files[full.relative_to(folder).as_posix()] = full
    return files


def _snapshot_models(name_for: Callable[[str], str], repo: str, folder: Path, revision: str, kind: Kind,
                     skipped: list[Skipped]) -> list[Found]:
    """The models in one snapshot: each GGUF quantization (with the projector if there is one), and the
    safetensors model if it is complete."""
    files = _files_in(folder)
    broken = [p for p, full in files.items() if not full.is_file()]
    if broken:
        skipped.append(Skipped(str(folder), f"incomplete: {', '.join(broken[:5])} not downloaded"))
        return []
    if any(p.endswith(".incomplete") for p in files):
        skipped.append(Skipped(str(folder), "a download is under way"))
        return []
    remote = [RemoteFile(p, full.stat().st_size, None, None, "") for p, full in files.items()]
    source = {"type": "import", "from": kind, "repo": repo, "revision": revision, "path": str(folder)}
    found = []

    def expected_of(path: str) -> str | None:
        target = os.path.realpath(files[path])  # HF's blobs are named by sha256 for LFS files
        base = os.path.basename(target)
        return f"sha256:{base}" if kind == "hf" and _HEX64.fullmatch(base) else None

    def model(tag: str, chosen: list[RemoteFile], fmt: str) -> None:
        name = name_for(tag)
        by_name = {(f.path.rsplit("/", 1)[-1] if fmt == "gguf" else f.path): f.path for f in chosen}
        try:
            parse_name(name)
            for stored in by_name:
                check_file_path(stored)
        except ValueError as e:
            skipped.append(Skipped(str(folder), str(e)))
            return
        expected = {stored: digest for stored, path in by_name.items() if (digest := expected_of(path)) is not None}
        found.append(Found(name=name, files={stored: files[path] for stored, path in by_name.items()},
                           expected=expected, source={**source, "files": sorted(by_name.values())}))

    ggufs = [f for f in remote if f.path.lower().endswith(".gguf")]
    projector = select_projector(ggufs)
    for choice in gguf_choices(ggufs):
        split = re.search(r"-\d{5}-of-(\d{5})\.gguf$", choice.files[0].path, re.IGNORECASE)
        if split and len(choice.files) != int(split.group(1)):
            skipped.append(Skipped(f"{folder}/{choice.name}", f"{len(choice.files)} of {int(split.group(1))} "
                                   "parts downloaded"))
            continue
        model(choice.quant.upper(), [*choice.files, *([projector] if projector else [])], "gguf")
    if any(f.path.endswith(".safetensors") for f in remote):
        try:
            selection = select_safetensors(remote, repo=repo)
        except NoModelFiles as e:
            skipped.append(Skipped(str(folder), str(e)))
        else:
            names = {f.path for f in selection.files}
            index = next((p for p in files if p.endswith(".safetensors.index.json") and "/" not in p), None)
            if "config.json" not in names:
                skipped.append(Skipped(str(folder), "safetensors without config.json"))
            elif index is not None and not _shards_present(files[index], names):
                skipped.append(Skipped(str(folder), f"not every shard {index} names is downloaded"))
            else:
                model("latest", list(selection.files), "safetensors")
    return found


def _shards_present(index: Path, names: set[str]) -> bool:
    import json

    try:
        weights = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(weights, dict) and set(map(str, weights.values())) <= names


def _hub_name(host: str, repo: str, tag: str) -> str:
    return f"{host}/{repo}:{tag}"


def find_hf(root: Path) -> tuple[list[Found], list[Skipped]]:
    root = _check_root(root)
    repos = sorted(p for p in root.glob("models--*--*") if p.is_dir())
    if not repos and not root.name.startswith("models--") and (root / "hub").is_dir():
        return find_hf(root / "hub")  # HF_HOME given instead of its hub/
    found: list[Found] = []
    skipped: list[Skipped] = []
    for repo_dir in repos or [root]:
        owner_repo = repo_dir.name.removeprefix("models--").split("--", 1)
        if len(owner_repo) != 2 or not all(_REPO_PART.fullmatch(p) for p in owner_repo):
            skipped.append(Skipped(str(repo_dir), "not a models--<owner>--<repo> folder"))
            continue
        snapshot = _chosen_snapshot(repo_dir)
        if snapshot is None:
            skipped.append(Skipped(str(repo_dir), "no snapshot"))
            continue
        repo = "/".join(owner_repo)
        found += _snapshot_models(functools.partial(_hub_name, "hf.co", repo), repo, snapshot, snapshot.name, "hf",
                                  skipped)
    return found, skipped


def _chosen_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot `main` points at, else the newest."""
    snapshots = repo_dir / "snapshots"
    try:
        main = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    if main and (snapshots / main).is_dir() and "/" not in main:
        return snapshots / main
    existing = sorted((p for p in snapshots.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return existing[-1] if existing else None


def find_modelscope(root: Path) -> tuple[list[Found], list[Skipped]]:
    root = _check_root(root)
    found: list[Found] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for base in (root, root / "hub"):
        models = base / "models"
        if not models.is_dir():
            continue
        for repo_dir in sorted(p for p in models.iterdir() if p.is_dir()):
            if "--" in repo_dir.name:  # modelscope_hub: models/<owner>--<name>/snapshots/<revision>/
                owner, name = repo_dir.name.split("--", 1)
                snapshot = _chosen_snapshot(repo_dir)
                folders = [(owner, name, snapshot)] if snapshot is not None else []
            else:  # older SDKs: models/<owner>/<name>/ holds the files
                folders = [(repo_dir.name, p.name.replace("___", "."), p) for p in sorted(repo_dir.iterdir())
                           if p.is_dir()]
            for owner, name, folder in folders:
                repo = f"{owner}/{name}"
                if not all(_REPO_PART.fullmatch(p) for p in (owner, name)) or repo.lower() in seen:
                    continue
                if (folder / "._____temp").exists():
                    skipped.append(Skipped(str(folder), "a download is under way"))
                    continue
                seen.add(repo.lower())
                revision = folder.name if folder.parent.name == "snapshots" else "master"
                found += _snapshot_models(functools.partial(_hub_name, "modelscope.cn", repo), repo, folder,
                                          revision, "modelscope", skipped)
    if not found and not skipped:
        raise ImportPathError(f"{root} holds no ModelScope models (expected models/<owner>--<name>/snapshots/ "
                              "or hub/models/<owner>/<name>/; the cache is $MODELSCOPE_CACHE or ~/.cache/modelscope)",
                              status=404)
    return found, skipped


def find_path(path: Path, name: str) -> Found:
    """One model from a GGUF file or a safetensors folder anywhere (`mgr create NAME --from PATH --link`)."""
    path = _check_root(path).resolve()
    parse_name(name)
    source = {"type": "import", "from": "file", "path": str(path)}
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ImportPathError(f"{path} is not a GGUF file")
        stored = path.name if path.name.lower().endswith(".gguf") else "model.gguf"
        return Found(name=name, files={check_file_path(stored): path}, expected={}, source=source)
    skipped: list[Skipped] = []
    found = _snapshot_models(lambda tag: f"{name}-{tag}" if ":" not in name else name, "", path, "", "file", skipped)
    chosen = [f for f in found if f.name.endswith(":latest")] or found
    if len(chosen) != 1:
        why = "; ".join(s.why for s in skipped) or (
            f"it holds {len(found)} GGUF models: give one file" if found else "no .gguf file or config.json with "
            "*.safetensors")
        raise ImportPathError(f"{path}: {why}")
    return dataclasses.replace(chosen[0], name=name, source=source)


def find(kind: Kind, path: Path, name: str | None = None) -> tuple[list[Found], list[Skipped]]:
    if kind == "ollama":
        return find_ollama(path)
    if kind == "hf":
        return find_hf(path)
    if kind == "modelscope":
        return find_modelscope(path)
    if not name:
        raise ImportPathError("importing a file or folder needs the model's name")
    return [find_path(path, name)], []


# -- bringing them in ----------------------------------------------------------------------------------------------
def import_found(store: Store, found: Found, *, external: bool = False) -> dict[str, Any]:
    """Link each file into the store and create the model. Returns a line for the caller: its name, size, how
    each file came in, and the bytes that are new on disk (a reflink's count as none)."""
    linked: dict[str, LinkedFile] = {}
    for file_name, path in (*found.files.items(), *found.adapters.items()):
        linked[file_name] = store.link_file(path, found.expected.get(file_name), external=external)
    custom = found.custom or Customization()
    if found.adapters:
        custom = dataclasses.replace(custom, adapters={n: linked[n].digest for n in found.adapters})
    try:
        manifest = store.create(found.name, {n: linked[n].digest for n in found.files}, found.source, custom)
    except Exception:
        # not a model the store takes: drop the links this import made (a symlink or a link, never the file)
        store.discard_unreferenced([f.digest for f in linked.values() if f.mode != "present"], spare_uploads=False)
        raise
    modes = sorted({f.mode for f in linked.values()})
    return {"status": f"imported {manifest.name}", "model": manifest.name, "size": manifest.size,
            "modes": modes, "new_bytes": 0, "notes": list(found.notes)}


def run_import(store: Store, kind: Kind, path: Path, *, name: str | None = None, dry_run: bool = False,
               external: bool = False) -> Iterator[dict[str, Any]]:
    """The import as lines: one per model (imported, or what would be) and one per model skipped, then a
    summary. A model the store has already under that name with the same files is left as it is."""
    found, skipped = find(kind, path, name)
    imported = failed = 0
    size = 0
    for item in found:
        try:
            existing = store.get(item.name)
        except (LookupError, ValueError):
            existing = None
        if existing is not None and existing.source.get("path") == item.source.get("path") and not dry_run:
            yield {"status": f"{item.name} is already imported", "model": item.name, "size": existing.size}
            continue
        if dry_run:
            same_fs = all(_same_filesystem(p, store.blobs_dir) for p in item.files.values())
            yield {"status": f"would import {item.name}", "model": item.name, "size": item.size,
                   "modes": ["external"] if external else ["hardlink" if same_fs else "reflink or external"],
                   "new_bytes": 0, "notes": list(item.notes)}
            size += item.size
            continue
        try:
            line = import_found(store, item, external=external)
        except (InvalidModel, DigestMismatch, ExternalFileChanged, OSError, ValueError) as e:
            failed += 1
            yield {"status": f"skipped {item.name}: {e}", "model": item.name, "error": str(e)}
            continue
        imported += 1
        size += item.size
        yield line
    for s in skipped:
        yield {"status": f"skipped {s.where}: {s.why}", "skipped": s.where}
    verb = "would import" if dry_run else "imported"
    count = len(found) if dry_run else imported
    yield {"status": "success", "summary": f"{verb} {count} model(s), {size} bytes, 0 bytes copied",
           "imported": count, "size": size, "new_bytes": 0, "failed": failed, "skipped": len(skipped)}


def _same_filesystem(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False
