"""`mgr create NAME --from PATH`: check the model files here, upload the missing blobs, ask the daemon to build.

Everything that can be checked locally is checked before the daemon is contacted, so a typo in the path or a
folder with the wrong files fails in milliseconds with a message about the files, not about the network.
Blobs are content-addressed: a file the daemon already holds (same sha256) is never sent twice.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TextIO

from .client import APIError, Client
from .format import human_size

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
    }
)
FOLDER_SUFFIXES = (".safetensors", ".safetensors.index.json")


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


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read 1 MiB at a time so that a 100 GB model does not need 100 GB of RAM."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def create_model(client: Client, name: str, source: Path | str, out: TextIO = sys.stdout) -> int:
    """Validate, upload the blobs the daemon lacks, then stream the daemon's build statuses. Returns 0 on success.

    Raises CreateError for a bad source and APIError / DaemonUnreachable for the daemon's failures.
    """
    files = model_files(source)  # before any network traffic, see the module docstring
    digests: dict[str, str] = {}
    for relative, path in files.items():
        digest = "sha256:" + sha256_file(path)
        digests[relative] = digest
        if client.head(f"/api/blobs/{digest}") == 200:
            continue
        print(f"uploading {relative} ({human_size(path.stat().st_size)})", file=out, flush=True)
        client.upload(f"/api/blobs/{digest}", path)

    last = ""
    for item in client.stream_ndjson("POST", "/api/create", {"model": name, "files": digests, "stream": True}):
        status = str(item.get("status", ""))
        if status:
            print(status, file=out, flush=True)
            last = status
    if last != "success":
        raise APIError("the daemon ended the create stream without reporting success")
    return 0
