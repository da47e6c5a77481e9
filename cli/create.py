"""`mgr create NAME --from PATH` and `mgr create NAME -f Modelfile`: check the model files here, upload the
missing blobs, ask the daemon to build.

A Modelfile (Ollama's: registry/modelfile.py) is read here, as Ollama's CLI reads it: a FROM or ADAPTER path
(relative to the Modelfile's folder, `~` expanded) becomes uploaded blobs, a FROM that names no file is a model
in the store, and everything else (PARAMETER, TEMPLATE, SYSTEM, MESSAGE, LICENSE) travels in the request.
Everything that can be checked locally is checked before the daemon is contacted, so a typo in the path or a
folder with the wrong files fails in milliseconds with a message about the files, not about the network.
Blobs are content-addressed: a file the daemon already holds (same sha256) is never sent twice. The new name
is checked first (before hashing gigabytes); hashing and uploading show their progress (a line rewritten in
place on a terminal, one line per step elsewhere).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mgr.registry.modelfile import Modelfile, ModelfileError, parse_modelfile
from mgr.registry.names import InvalidName, parse_name

from .client import APIError, Client
from .format import human_size
from .terminal import is_tty

GGUF_MAGIC = b"GGUF"
HASH_BLOCK = 1 << 20

# The top-level files of a Hugging Face model folder that a runner needs; everything else (pytorch_model.bin,
# original/, README.md, images) is left behind.
FOLDER_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.txt",
        # a vision model's image and video processors (transformers 5 writes processor_config.json)
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
    }
)
FOLDER_SUFFIXES = (".safetensors", ".safetensors.index.json")
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})  # a PEFT LoRA folder


class CreateError(Exception):
    """The source path cannot become a model; the message says what is wrong with it."""


def model_files(source: Path | str) -> dict[str, Path]:
    """The files to send for `source`, by the relative name the daemon will store them under.

    A `.gguf` file gives itself; a folder gives its safetensors weights plus config and tokenizer files.
    Raises CreateError when the path is missing or does not hold a model.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise CreateError(f"{source} does not exist")
    if source.is_file():
        with source.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise CreateError(f"{source} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return {source.name: source}
    if not source.is_dir():
        raise CreateError(f"{source} is neither a file nor a folder")
    files = {
        entry.name: entry
        for entry in sorted(source.iterdir())
        if entry.is_file() and (entry.name in FOLDER_FILES or entry.name.endswith(FOLDER_SUFFIXES))
    }
    if "config.json" not in files:
        raise CreateError(
            f"{source} has no config.json; a model folder needs config.json and *.safetensors files "
            "(or pass a .gguf file)"
        )
    if not any(name.endswith(".safetensors") for name in files):
        raise CreateError(
            f"{source} has no *.safetensors files; only safetensors weights are supported "
            "(convert pytorch_model.bin first, or pass a .gguf file)"
        )
    return files


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The hex sha256 of a file, read 1 MiB at a time so that a 100 GB model does not need 100 GB of RAM;
    `progress` hears the bytes hashed so far."""
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


class StepProgress:
    """`hashing NAME  45% (44 MB/98 MB)`: one line rewritten at most 10 times a second on a terminal; elsewhere
    one line when a step starts."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = is_tty(out)
        self._shown = 0.0

    def step(self, verb: str, name: str, total: int) -> Callable[[int], None]:
        if not self.live:
            print(f"{verb} {name} ({human_size(total)})", file=self.out, flush=True)

        def update(done: int) -> None:
            if not self.live or (done < total and time.monotonic() - self._shown < 0.1):
                return
            self._shown = time.monotonic()
            percent = 100 * done // total if total else 100
            self.out.write(f"\r\x1b[K{verb} {name} {percent:3d}% ({human_size(done)}/{human_size(total)})")
            if done >= total:
                self.out.write("\n")
            self.out.flush()
        return update


def check_name(name: str) -> None:
    """The new model's name, checked before any file is read (a typo must not cost a 100 GB hash)."""
    try:
        parse_name(name)
    except InvalidName as e:
        raise CreateError(str(e)) from None


def adapter_files(source: Path) -> dict[str, Path]:
    """A LoRA adapter's files: a GGUF adapter file, or a PEFT folder (adapter_config.json and
    adapter_model.safetensors). Raises CreateError."""
    if not source.exists():
        raise CreateError(f"ADAPTER {source} does not exist")
    if source.is_file():
        with source.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise CreateError(f"ADAPTER {source} is not a GGUF file: give a GGUF LoRA adapter (llama.cpp's "
                                  "convert_lora_to_gguf.py makes one) or a PEFT adapter folder")
        return {source.name: source}
    files = {entry.name: entry for entry in sorted(source.iterdir()) if entry.name in ADAPTER_FILES}
    if set(files) != ADAPTER_FILES:
        raise CreateError(f"ADAPTER {source} is a folder without {' and '.join(sorted(ADAPTER_FILES - set(files)))}"
                          ": a PEFT LoRA adapter folder holds adapter_config.json and adapter_model.safetensors")
    return files


def read_modelfile(path: Path) -> Modelfile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CreateError(f"{path} does not exist: give a Modelfile with -f, or a model file with --from") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CreateError(f"{path} cannot be read as a Modelfile: {e}") from None
    try:
        return parse_modelfile(text)
    except ModelfileError as e:
        raise CreateError(f"{path}, {e}") from None


def _local(value: str, folder: Path) -> Path | None:
    """A FROM or ADAPTER value as a path, when it is one: it exists, or is written as a path (./, /, ~, .gguf)."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if path.exists() or value.startswith((".", "/", "~")) or value.lower().endswith(".gguf"):
        return path
    return None


def modelfile_request(modelfile: Modelfile, folder: Path) -> tuple[dict[str, Any], dict[str, Path], dict[str, Path]]:
    """The /api/create fields of a Modelfile (all but the name), and the model and adapter files to upload."""
    request: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for source in modelfile.sources:
        path = _local(source, folder)
        if path is not None:
            files.update(model_files(path))
        elif len(modelfile.sources) > 1:
            raise CreateError(f"FROM {source}: a model name must be the only FROM (several FROM lines are files "
                              "that make one model together)")
        else:
            request["from"] = source
    if len(modelfile.adapters) > 1:
        raise CreateError("a model takes one ADAPTER")
    adapters: dict[str, Path] = {}
    for value in modelfile.adapters:
        path = _local(value, folder)
        adapters = adapter_files(path if path is not None else folder / value)
    for key, text in (("template", modelfile.template), ("system", modelfile.system)):
        if text is not None:
            request[key] = text
    if modelfile.parameters:
        request["parameters"] = modelfile.parameters
    if modelfile.messages:
        request["messages"] = modelfile.messages
    if modelfile.licenses:
        request["license"] = modelfile.licenses
    return request, files, adapters


def _upload(client: Client, files: dict[str, Path], out: TextIO) -> dict[str, str]:
    """The files' digests; the blobs the daemon lacks are sent."""
    digests: dict[str, str] = {}
    steps = StepProgress(out)
    for relative, path in files.items():
        size = path.stat().st_size
        hashed = steps.step("hashing", relative, size)
        digest = "sha256:" + sha256_file(path, hashed)
        hashed(size)
        digests[relative] = digest
        if client.head(f"/api/blobs/{digest}") == 200:
            print(f"{relative}: the daemon has it already", file=out, flush=True)
            continue
        sent = steps.step("uploading", relative, size)
        client.upload(f"/api/blobs/{digest}", path, sent)
        sent(size)
    return digests


def create_from_modelfile(client: Client, name: str, path: Path | str, out: TextIO = sys.stdout) -> int:
    """`mgr create NAME -f Modelfile`. Raises CreateError (a bad Modelfile names its line) before any upload."""
    check_name(name)
    path = Path(path).expanduser()
    request, files, adapters = modelfile_request(read_modelfile(path), path.resolve().parent)
    if files:
        request["files"] = _upload(client, files, out)
    if adapters:
        request["adapters"] = _upload(client, adapters, out)
    return _build(client, {"model": name, **request, "stream": True}, out)


def create_model(client: Client, name: str, source: Path | str, out: TextIO = sys.stdout, link: bool = False) -> int:
    """Validate, upload the blobs the daemon lacks, then stream the daemon's build statuses. Returns 0 on success.
    `link`: the daemon brings the file or folder in where it is, without a copy (cli/importer.py).

    Raises CreateError for a bad source and APIError / DaemonUnreachable for the daemon's failures.
    """
    check_name(name)
    files = model_files(source)  # before any network traffic, see the module docstring
    if link:
        from .importer import run_import

        path = str(Path(source).expanduser().absolute())
        return run_import(client, {"from": "file", "path": path, "model": name})
    return _build(client, {"model": name, "files": _upload(client, files, out), "stream": True}, out)


def _build(client: Client, request: dict[str, Any], out: TextIO) -> int:
    last = ""
    for item in client.stream_ndjson("POST", "/api/create", request):
        status = str(item.get("status", ""))
        if status:
            print(status, file=out, flush=True)
            last = status
    if last != "success":
        raise APIError("the daemon ended the create stream without reporting success")
    return 0
